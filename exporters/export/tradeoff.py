"""The deferral budget's other side (issue 15): what the exported gate's accepted windows get wrong at each
share of windows deferred, so an operator who sets a budget on the hub sees what it would cost.

The curve moves the gate's one calibrated knob, `min_confidence` = lam with `max_disagreement` = 1 - lam
(calibrate.gate_score's nested family), over the cal and test splits' outputs of the files the bundle uses,
with the out-of-distribution threshold and the input envelope held as exported; each point is the agent's own
rule (calibrate.accept_mask). Only the exported point carries the Learn-then-Test guarantee (error <= target
with probability >= 1 - delta); the others are what the same models did on these splits. A budget is met by
exporting with another target (`edgekit export --target-error`) or by a better model, never by the gate
accepting a window past its thresholds: the hub only flags a device over its budget.

Written into the bundle as deferral.json, report/deferral.html and report/deferral.png (matplotlib Agg).
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from .calibrate import accept_mask, gate_score

log = logging.getLogger(__name__)

SHARES = (0.0, 0.05, 0.10, 0.15, 0.20, 0.30, 0.40, 0.50, 0.60, 0.80)  # the table's rows: shares deferred


def curve(split: dict[str, np.ndarray], thresholds: dict[str, Any], outside: np.ndarray | None) -> dict[str, Any]:
    """Share deferred and error on the accepted windows at each lam among the split's gate scores (and 0)."""
    y = np.asarray(split["y"])
    wrong = np.argmax(split["probs"], axis=-1) != y
    lams = np.unique(np.concatenate([[0.0], gate_score(split["probs"], split["second"])]))
    deferred, error = [], []
    for lam in lams:
        th = {**thresholds, "min_confidence": float(lam), "max_disagreement": float(1.0 - lam), "defer_all": False}
        acc = accept_mask(split["probs"], split["second"], split["score"], th, outside)
        deferred.append(1.0 - float(acc.mean()) if len(acc) else 1.0)
        error.append(float(wrong[acc].mean()) if acc.any() else None)
    return {"lam": lams.tolist(), "deferred": deferred, "error": error}


def at_share(c: dict[str, Any], share: float) -> dict[str, Any] | None:
    """The curve's point that defers the least while deferring at least `share` (None: none does)."""
    best = None
    for lam, d, e in zip(c["lam"], c["deferred"], c["error"]):
        if d >= share - 1e-12 and (best is None or d < best["deferred"]):
            best = {"lam": lam, "deferred": d, "error": e}
    return best


def tradeoff(outputs: dict[str, dict[str, np.ndarray]], thresholds: dict[str, Any],
             outside: dict[str, np.ndarray | None], windows_per_hour: float | None,
             calibration: dict[str, Any]) -> dict[str, Any]:
    """The curves on cal and test, the table at SHARES, and the exported point, as JSON-able data."""
    curves = {s: curve(outputs[s], thresholds, outside.get(s)) for s in ("cal", "test")}
    kept = {s: _thin(c) for s, c in curves.items()}
    rows = []
    for share in SHARES:
        point = at_share(curves["test"], share)
        if point is None:
            continue
        cal = at_share(curves["cal"], share)
        rows.append({"share": share, "test_deferred": point["deferred"], "test_error": point["error"],
                     "cal_error": None if cal is None else cal["error"], "min_confidence": point["lam"],
                     "per_hour": None if windows_per_hour is None else point["deferred"] * windows_per_hour})
    exported = {"min_confidence": thresholds.get("min_confidence"), "defer_all": bool(thresholds.get("defer_all")),
                "test_deferred": 1.0 - calibration.get("test_coverage", 0.0), "test_error": calibration.get("test_error"),
                "cal_deferred": 1.0 - calibration.get("cal_coverage", 0.0), "cal_error": calibration.get("cal_error"),
                "target_error": calibration.get("target_error"), "delta": calibration.get("delta")}
    if windows_per_hour is not None:
        exported["per_hour"] = exported["test_deferred"] * windows_per_hour
    return {"schema": "edgekit.deferral-tradeoff/1", "windows_per_hour": windows_per_hour, "rows": rows,
            "exported": exported, "curves": kept}


def _thin(c: dict[str, Any], step: float = 0.005) -> dict[str, Any]:
    """The curve at most every `step` of share deferred (the first point of each step): the plot's resolution,
    a few KB in the bundle instead of one point per window."""
    out: dict[str, list[Any]] = {"lam": [], "deferred": [], "error": []}
    last = None
    for lam, d, e in zip(c["lam"], c["deferred"], c["error"]):
        key = round(d / step)
        if key != last:
            out["lam"].append(lam), out["deferred"].append(d), out["error"].append(e)
            last = key
    return out


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


def _per_hour(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def windows_per_hour(inp: Any) -> float | None:
    """Windows a device judges per hour of sensor time (rate / hop), None when the bundle reads no windows."""
    rate, hop = getattr(inp, "rate_hz", None), getattr(inp, "window_hop", None)
    return 3600.0 * float(rate) / float(hop) if rate and hop else None


def table(t: dict[str, Any]) -> str:
    """The plain-text table (README, logs): one row per share deferred on the test split."""
    lines = [f"{'deferred (test)':>16}{'error on accepted (test)':>26}{'(cal)':>10}{'min_confidence':>16}"
             f"{'deferred / device-hour':>24}"]
    for r in t["rows"]:
        per_h = "-" if r["per_hour"] is None else f"{r['per_hour']:.0f}"
        lines.append(f"{_pct(r['test_deferred']):>16}{_pct(r['test_error']):>26}{_pct(r['cal_error']):>10}"
                     f"{r['min_confidence']:>16.3f}{per_h:>24}")
    e = t["exported"]
    per_h = f", {e['per_hour']:.0f} deferred per device-hour" if e.get("per_hour") is not None else ""
    lines.append(f"exported gate: defers {_pct(e['test_deferred'])} of the test split at {_pct(e['test_error'])} "
                  f"error on accepted (target {_pct(e['target_error'])}, delta {e['delta']}){per_h}")
    return "\n".join(lines)


def write(out: Path, outputs: dict[str, dict[str, np.ndarray]], calibration: dict[str, Any],
          outside: dict[str, np.ndarray | None], inp: Any) -> dict[str, Any]:
    """deferral.json, report/deferral.html and report/deferral.png in the bundle directory `out`, from export's
    outputs, its recalibrate() result and the run's input (rate and hop: windows per device-hour)."""
    t = tradeoff(outputs, calibration["thresholds"], outside, windows_per_hour(inp), calibration["calibration"])
    (out / "deferral.json").write_text(json.dumps(t) + "\n", encoding="utf-8")
    report = out / "report"
    report.mkdir(exist_ok=True)
    _plot(t, report / "deferral.png")
    rows = "".join(
        f"<tr><td>{_pct(r['test_deferred'])}</td><td>{_pct(r['test_error'])}</td><td>{_pct(r['cal_error'])}</td>"
        f"<td>{r['min_confidence']:.3f}</td><td>{_per_hour(r['per_hour'])}</td></tr>" for r in t["rows"])
    e = t["exported"]
    (report / "deferral.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>Deferral and error</title>"
        "<h1>What a deferral budget costs</h1>"
        f"<p>Exported gate: defers {_pct(e['test_deferred'])} of the test split at {_pct(e['test_error'])} error on "
        f"the accepted windows (target {_pct(e['target_error'])} with probability {1 - (e['delta'] or 0):.2f}: the "
        "only point with that guarantee). Deferring less would mean accepting windows the gate was calibrated to "
        "defer; a budget is met by another target at export or a better model, never by the gate.</p>"
        "<table border='1' cellpadding='4'><tr><th>deferred (test)</th><th>error on accepted (test)</th>"
        f"<th>(cal)</th><th>min_confidence</th><th>deferred per device-hour</th></tr>{rows}</table>"
        "<p><img src='deferral.png' alt='error on accepted windows against share deferred'></p>"
        f"<pre>{html.escape(table(t))}</pre>\n", encoding="utf-8")
    log.info("export_deferral_tradeoff rows=%d exported_deferred=%.3f", len(t["rows"]), e["test_deferred"])
    return t


def _plot(t: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for split, style in (("cal", ":"), ("test", "-")):
        c = t["curves"][split]
        pts = [(d, e) for d, e in zip(c["deferred"], c["error"]) if e is not None]
        if pts:
            ax.plot([100 * d for d, _ in pts], [100 * e for _, e in pts], style, label=f"{split} split")
    e = t["exported"]
    if e["test_error"] is not None:
        ax.plot([100 * e["test_deferred"]], [100 * e["test_error"]], "o", color="C3", label="exported gate (test)")
    if e["target_error"] is not None:
        ax.axhline(100 * e["target_error"], color="0.5", lw=0.8, ls="--", label="target error")
    ax.set_xlabel("windows deferred (%)")
    ax.set_ylabel("error on accepted windows (%)")
    ax.set_xlim(0, 100)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
