// edgekit hub: keyboard shortcuts for labelling (issue 15). No external scripts: the hub may run offline.
// On a page with a label form: 1-9 choose the label with that number, Enter saves, N opens the next incident.
// Keys typed into a text field are left alone.
(function () {
  "use strict";
  document.addEventListener("keydown", function (ev) {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) { return; }
    var t = ev.target;
    var typing = t && (t.tagName === "TEXTAREA" || (t.tagName === "INPUT" && t.type !== "radio") || t.isContentEditable);
    if (typing) { return; }
    var form = document.querySelector("form.label");
    if (!form) { return; }
    if (/^[1-9]$/.test(ev.key)) {
      var radio = form.querySelector('input[type=radio][data-key="' + ev.key + '"]');
      if (radio) {
        radio.checked = true;
        radio.focus();
        if (radio.value === "__other__") { var other = form.querySelector("input[name=other]"); if (other) { other.focus(); } }
        ev.preventDefault();
      }
    } else if (ev.key === "Enter") {
      if (form.querySelector("input[type=radio]:checked")) { ev.preventDefault(); form.requestSubmit(); }
    } else if (ev.key === "n" || ev.key === "N") {
      var next = document.getElementById("next-incident");
      if (next) { ev.preventDefault(); window.location.href = next.href; }
    }
  });
})();
