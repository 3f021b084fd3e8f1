"""`edgekit inspect BUNDLE`: what a person deploying a bundle needs to know, read from its manifest after the
checks the agent makes (every sha256; the signature when a public key is given). Agent side: imports only
edgekit.manifest and edgekit.errors (never torch, onnx, the training side or the hub), so it runs on a device.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from edgekit.manifest import SIGNATURE_FILE, InputSpec, Manifest, Recording, load_bundle

SCHEMA = "edgekit.inspect/1"
DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab", " ": "space", "|": "pipe"}
# Feature names printed in full up to this many; longer lists are summarised (--features lists them).
FEATURES_IN_FULL = 12
WIDTH = 110  # the text's lines, indent included, wrap here (the project's line length; one screen)
INDENT = 11


def inspect_bundle(bundle: Path, *, public_key: Path | None = None) -> dict[str, Any]:
    """The bundle's facts as one JSON-able dict (schema edgekit.inspect/1). Raises ModelError naming the file
    when the bundle is missing or corrupt, a file's sha256 does not match, or the signature does not verify
    under `public_key`."""
    bundle = Path(bundle)
    manifest = load_bundle(bundle, public_key=public_key)
    return {
        "schema": SCHEMA,
        "bundle": str(bundle),
        "task": manifest.task,
        "created_at": manifest.created_at,
        "edgekit_version": manifest.edgekit_version,
        "code_version": manifest.code_version,
        "data_fingerprint": manifest.data_fingerprint,
        "input": input_contract(manifest.input),
        "labels": {"labels": list(manifest.labels), "normal": manifest.normal_label,
                   "positive": manifest.positive_label},
        "gate": _gate(manifest),
        "models": _models(manifest),
        "parity": {"passed": manifest.parity.get("passed"), "report": manifest.parity.get("report"),
                   "int8_files": sorted({m.file for m in manifest.models.values()
                                         if m.quantization == "int8-qdq"})},
        "files": {"count": len(manifest.files), "sha256_match": True, "sha256": dict(manifest.files)},
        "signature": _signature(bundle, public_key),
    }


def channel_units(inp: InputSpec) -> list[str | None] | None:
    """One unit per channel when the manifest records them (`input.units`, channel -> unit), else None:
    bundles exported before units were recorded, or from a recipe without data.units, have none."""
    if not inp.units:
        return None
    return [inp.units.get(name) for name in inp.channels or []]


def input_contract(inp: InputSpec) -> dict[str, Any]:
    """The input section of the report: what a stream must look like for this bundle."""
    channels = inp.channels or []
    units = channel_units(inp)
    rng = inp.plausible
    # an extractor's parameters (bands in Hz, statistics), in manifests that record them; their names say
    # the same in the text (e.g. 'band_100_500Hz'), the JSON carries them whole
    params = inp.feature_params
    rows = [{"name": name,
             "unit": units[i] if units else None,
             "plausible_low": rng.low[i] if rng else None,
             "plausible_high": rng.high[i] if rng else None} for i, name in enumerate(channels)]
    window = None
    if inp.window_size is not None:
        window = {"size": inp.window_size, "hop": inp.window_hop, "size_s": _seconds(inp.window_size, inp.rate_hz),
                  "hop_s": _seconds(inp.window_hop, inp.rate_hz)}
    return {
        "kind": inp.kind, "extractor": inp.extractor, "rate_hz": inp.rate_hz, "window": window,
        "channels": rows, "units_recorded": units is not None,
        "plausible_basis": rng.basis if rng else None,
        "features": {"count": len(inp.feature_names), "names": list(inp.feature_names),
                     "params": params.model_dump(mode="json") if params is not None else None},
        "recording": inp.recording.model_dump(mode="json") if inp.recording else None,
        "imputation": inp.imputation, "max_gap_s": inp.max_gap_s,
        "baseline": None if inp.baseline is None else {
            "windows": inp.baseline.windows, "std_floor": inp.baseline.std_floor, "basis": inp.baseline.basis,
            "seconds": _seconds((inp.baseline.windows - 1) * (inp.window_hop or 1) + (inp.window_size or 1),
                                inp.rate_hz)},
    }


def _seconds(samples: int | None, rate_hz: float | None) -> float | None:
    return samples / rate_hz if samples is not None and rate_hz else None


def _gate(manifest: Manifest) -> dict[str, Any]:
    th, cal = manifest.thresholds, manifest.gate_calibration
    return {
        "thresholds": th.model_dump(mode="json"),
        "method": cal.method, "target_error": cal.target_error, "delta": cal.delta, "valid": cal.valid,
        "expected_deferral": 1.0 - cal.test_coverage, "expected_error": cal.test_error, "n_test": cal.n_test,
        "cal_deferral": 1.0 - cal.cal_coverage, "cal_error": cal.cal_error, "n_cal": cal.n_cal,
        "p_value": cal.p_value, "ood_quantile": cal.ood_quantile, "ood_reference": cal.ood_reference,
    }


def _models(manifest: Manifest) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for role, spec in manifest.models.items():
        summary = manifest.parity.get("models", {}).get(role, {})
        int8 = None
        if "decision_agreement" in summary:
            int8 = {"decision_agreement": summary["decision_agreement"], "metric": summary.get("metric"),
                    "heldout_fp32": summary.get("heldout_fp32"), "heldout_int8": summary.get("heldout_int8"),
                    "pass": summary.get("int8_pass")}
        out[role] = {"file": spec.file, "fp32_file": spec.fp32_file, "quantization": spec.quantization,
                     "reason": spec.quantization_reason, "input": spec.input,
                     "input_shape": list(spec.input_shape), "parity_pass": summary.get("pass"), "int8": int8}
    return out


def _signature(bundle: Path, public_key: Path | None) -> dict[str, Any]:
    """load_bundle has already verified the signature when a key was given (or raised)."""
    if public_key is not None:
        return {"state": "verified", "public_key": str(public_key)}
    if (bundle / SIGNATURE_FILE).is_file():
        return {"state": "signed, not verified", "public_key": None}
    return {"state": "unsigned", "public_key": None}


# --- the text a person reads ---------------------------------------------------------------------


def text(report: dict[str, Any], *, list_features: bool = False) -> str:
    """The report as compact, grouped lines; long feature lists summarised unless `list_features`."""
    lines: list[str] = []

    def section(name: str, *body: str) -> None:
        for i, line in enumerate(body):
            lead = f"{name:<{INDENT - 1}} " if i == 0 else " " * INDENT
            lines.extend(textwrap.wrap(line, WIDTH, initial_indent=lead, subsequent_indent=" " * (INDENT + 4),
                                       break_on_hyphens=False, break_long_words=False)
                         if len(lead + line) > WIDTH else [(lead + line).rstrip()])

    section("bundle", f"{report['bundle']} (task {report['task']})",
            f"exported {report['created_at']} by edgekit {report['edgekit_version']} (code "
            f"{report['code_version']}), data {report['data_fingerprint'][:16]}")
    inp = report["input"]
    section("input", *_input_lines(inp))
    section("features", *_feature_lines(inp, list_features))
    if inp["kind"] == "window":
        section("replay", *_recording_lines(inp["recording"], len(inp["channels"])),
                *([f"a step over {_num(inp['max_gap_s'])} s splits the stream: no window spans it"]
                  if inp["max_gap_s"] else []))
    if inp.get("baseline"):
        b = inp["baseline"]
        section("baseline", f"each device learns its machine's normal from its first {b['windows']} windows "
                f"({_num(b['seconds'])} s; deferred as 'commissioning'), or a baseline file, or again on command; "
                f"the models see features relative to it, its std floored at {_num(b['std_floor'])} x the "
                "training spread")
    labels = report["labels"]
    section("labels", ", ".join(name + (" (normal)" if name == labels["normal"] else "")
                                + (" (positive)" if name == labels["positive"] else "")
                                for name in labels["labels"]))
    section("gate", *_gate_lines(report["gate"]))
    section("models", *_model_lines(report["models"]))
    section("parity", *_parity_lines(report["parity"], report["models"]))
    section("files", f"{report['files']['count']} listed, every sha256 matches, none unlisted")
    sig = report["signature"]
    section("signature", {"verified": f"signed, verified with {sig['public_key']}",
                          "signed, not verified": f"signed ({SIGNATURE_FILE}), not verified: give --public-key",
                          "unsigned": "unsigned"}[sig["state"]])
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _fixed(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _input_lines(inp: dict[str, Any]) -> list[str]:
    if inp["kind"] == "table":
        out = [f"table rows: {inp['features']['count']} values per case (no sample stream: no channels, rate "
               "or window)"]
        imp = inp.get("imputation")
        if imp:
            missing = ", ".join(f"{k} ({n})" for k, n in imp.get("missing", {}).items()) or "none"
            out.append(f"an empty cell gets its column's training-split {imp.get('method')} (--json lists them); "
                       f"empty cells in the training data: {missing}")
        return out
    rate, win = inp["rate_hz"], inp["window"]
    head = f"{len(inp['channels'])} channels at {_num(rate)} Hz" if rate else f"{len(inp['channels'])} channels"
    if win:
        head += (f"; window {win['size']} samples ({_num(win['size_s'])} s), hop {win['hop']} samples "
                 f"({_num(win['hop_s'])} s)" if rate else f"; window {win['size']} samples, hop {win['hop']}")
    out = [head]
    rows = inp["channels"]
    units = inp["units_recorded"]
    ranged = inp["plausible_basis"] is not None
    if not (units or ranged):
        return [*out, "channels: " + ", ".join(r["name"] for r in rows),
                "no plausible range in the bundle: only non-finite samples are refused",
                "units: not recorded in this bundle"]
    width = max([len("channel"), *(len(r["name"]) for r in rows)])
    unit_w = max([len("unit"), *(len(r["unit"] or "-") for r in rows)]) if units else 0
    header = f"  {'channel':<{width}}" + (f"  {'unit':<{unit_w}}" if units else "")
    out.append(header + ("  plausible range" if ranged else ""))
    for r in rows:
        line = f"  {r['name']:<{width}}" + (f"  {r['unit'] or '-':<{unit_w}}" if units else "")
        if ranged:
            line += f"  {_num(r['plausible_low'])} .. {_num(r['plausible_high'])}"
        out.append(line.rstrip())
    if ranged:
        out.append(f"plausible range: {inp['plausible_basis']}")
        out.append("a sample outside it defers its window as 'implausible' before any model")
    else:
        out.append("no plausible range in the bundle: only non-finite samples are refused")
    if not units:
        out.append("units: not recorded in this bundle")
    return out


def feature_summary(names: list[str], channels: list[str]) -> str:
    """`names` in a line: 'CHANNEL.STAT' names grouped by their stats ('mean, std of 6 channels'), other
    names listed."""
    if not names or not all("." in n for n in names):
        shown = ", ".join(names[:FEATURES_IN_FULL])
        return shown + (f", ... ({len(names) - FEATURES_IN_FULL} more)" if len(names) > FEATURES_IN_FULL else "")
    groups: dict[str, list[str]] = {}
    for name in names:
        prefix, stat = name.rsplit(".", 1)
        groups.setdefault(prefix, []).append(stat)
    by_stats: dict[tuple[str, ...], list[str]] = {}
    for prefix, stats in groups.items():
        by_stats.setdefault(tuple(stats), []).append(prefix)
    parts = []
    for stats, prefixes in by_stats.items():
        if len(prefixes) == 1:
            parts.append(f"{prefixes[0]}: {', '.join(stats)}")
        elif prefixes == channels:
            parts.append(f"{', '.join(stats)} of each channel")
        elif set(prefixes) <= set(channels):
            parts.append(f"{', '.join(stats)} of {len(prefixes)} channels")
        else:
            parts.append(f"{', '.join(stats)} of {', '.join(prefixes)}")
    return "; ".join(parts)


def _feature_lines(inp: dict[str, Any], list_features: bool) -> list[str]:
    names = inp["features"]["names"]
    head = f"{inp['extractor']} extractor, {len(names)} features"
    if list_features:
        return [head + ":", *(f"  {i:>3}  {name}" for i, name in enumerate(names))]
    summary = feature_summary(names, [r["name"] for r in inp["channels"]])
    more = " (--features lists them)" if len(names) > FEATURES_IN_FULL else ""
    return [f"{head}{more}:", f"  {summary}"]


def _recording_lines(rec: dict[str, Any] | None, n_channels: int) -> list[str]:
    """The layout `replay` reads by default (the training recordings'), as the README's [source.layout]."""
    if rec is None:
        return ["no recording layout in the bundle: a replay needs [source.layout]"]
    layout = Recording.model_validate(rec)
    delim = DELIMITERS.get(layout.delimiter, repr(layout.delimiter))
    out = [f"{delim}-separated text, column names on line {layout.header_line}, the {n_channels} channels by name"]
    if layout.time_column:
        fmt = "ISO 8601, read as UTC" if layout.time_format == "iso" else "seconds"
        out.append(f"time from column '{layout.time_column}' ({fmt})")
    elif layout.rate_hz:
        out.append(f"no time column: sample clock at {_num(layout.rate_hz)} Hz")
    else:
        out.append(f"no time column: rate from the lines above the header matching '{layout.rate_pattern}'")
    if layout.counter_column:
        wrap = f", wraps at {layout.counter_wrap}" if layout.counter_wrap else ""
        out.append(f"packet counter '{layout.counter_column}' must not go back{wrap}")
    return out


def _gate_lines(gate: dict[str, Any]) -> list[str]:
    th = gate["thresholds"]
    target = f"target error {_pct(gate['target_error'])} at delta {_num(gate['delta'])}, {gate['method']}"
    if th["defer_all"] or not gate["valid"]:
        return ["defers every case (expected deferral 100%): no threshold met the target error on calibration",
                f"{target}; calibration split {gate['n_cal']} cases"]
    return [
        f"defers when autoencoder score > {_num(th['ood_max_score'])} (ood), predictor confidence < "
        f"{_num(th['min_confidence'])} (low_confidence), or disagreement with the second opinion > "
        f"{_num(th['max_disagreement'])} (disagreement)",
        f"expected deferral {_pct(gate['expected_deferral'])}, error {_pct(gate['expected_error'])} among "
        f"accepted (held-out split, {gate['n_test']} cases)",
        f"calibration split: {_pct(gate['cal_deferral'])} deferred, error {_pct(gate['cal_error'])} among "
        f"accepted ({gate['n_cal']} cases)",
        target,
    ]


def _model_lines(models: dict[str, Any]) -> list[str]:
    role_w = max(len(r) for r in models)
    file_w = max(len(m["file"]) for m in models.values())
    return [f"{role:<{role_w}}  {m['file']:<{file_w}}  {m['quantization']:<8}  {m['input']} "
            f"[{', '.join('N' if d is None else str(d) for d in m['input_shape'])}]" for role, m in models.items()]


def _parity_lines(parity: dict[str, Any], models: dict[str, Any]) -> list[str]:
    out = [f"{'passed' if parity['passed'] else 'FAILED'} ({parity['report']}); INT8 in use: "
           f"{', '.join(parity['int8_files']) or 'none'}"]
    for role, m in models.items():
        i8 = m["int8"]
        if i8:
            verdict = "passes" if i8["pass"] else "fails"
            out.append(f"{role}: INT8 agrees with fp32 on {_pct(i8['decision_agreement'])} of decisions, held-out "
                       f"{i8['metric']} {_fixed(i8['heldout_fp32'])} -> {_fixed(i8['heldout_int8'])}: {verdict}")
            out.append(f"  {m['reason']}")
        else:
            out.append(f"{role}: {m['reason']}")
    return out
