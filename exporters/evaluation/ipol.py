"""Evaluate edgekit.gait.segment against the IPOL annotations: per-trial errors, summaries, table, plot.

numpy and matplotlib only (no torch). The segmentation's tuned constants were chosen on subjects 1-5
(TUNING_SUBJECTS), so the summary reports those and the held-out subjects 6-15 separately.

References per trial (sample indices in `<subject>-<trial>.json`, converted with the 100 Hz rate):
walk start/end = TrialBoundaries (first heel strike, last toe-off), turn = UTurnBoundaries, steps =
len(LeftFootEvents) + len(RightFootEvents). Errors are detected minus reference (seconds, steps).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.datasets import ipol_files, read_ipol
from edgekit.errors import DataError
from edgekit.gait import segment

log = logging.getLogger(__name__)

TUNING_SUBJECTS = frozenset({1, 2, 3, 4, 5})
ERRORS = ("walk_start_s", "walk_end_s", "turn_start_s", "turn_end_s", "steps")


def trial_errors(path: Path) -> dict[str, Any]:
    """Segment one annotated trial and compare with its annotation."""
    table = read_ipol(path)
    meta = table.meta
    if "TrialBoundaries" not in meta:
        raise DataError("no annotation file beside the trial", where=str(path),
                        hint="the <subject>-<trial>.json file must sit next to the _lb.txt file")
    rate = table.rate_hz
    seg = segment(table.values, rate)
    (a, b), (c, d) = meta["TrialBoundaries"], meta["UTurnBoundaries"]
    ref_steps = len(meta["LeftFootEvents"]) + len(meta["RightFootEvents"])
    row: dict[str, Any] = {
        "trial": path.name.replace("_lb.txt", ""), "subject": int(meta["Subject"]),
        "held_out": int(meta["Subject"]) not in TUNING_SUBJECTS,
        "ref_steps": ref_steps, "steps_found": seg.steps,
        "walk_start_s": seg.walk_start_s - a / rate, "walk_end_s": seg.walk_end_s - b / rate,
        "turn_start_s": seg.turn_start_s - c / rate, "turn_end_s": seg.turn_end_s - d / rate,
        "steps": float(seg.steps - ref_steps),
    }
    return row


def _summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per error: median and IQR of |error| over trials, median signed error, and mean +- sd across
    subjects of each subject's mean |error|. NaN errors (phase not found) are counted as misses."""
    out: dict[str, dict[str, float]] = {}
    for key in ERRORS:
        err = np.array([r[key] for r in rows], dtype=float)
        found = np.isfinite(err)
        e = np.abs(err[found])
        subjects = sorted({r["subject"] for r in rows})
        per_subject = []
        for s in subjects:
            v = np.array([abs(r[key]) for r in rows if r["subject"] == s and math.isfinite(r[key])])
            if len(v):
                per_subject.append(float(v.mean()))
        ps = np.array(per_subject)
        out[key] = {
            "n": int(found.sum()), "missed": int((~found).sum()),
            "median_abs": float(np.median(e)) if len(e) else math.nan,
            "q1_abs": float(np.percentile(e, 25)) if len(e) else math.nan,
            "q3_abs": float(np.percentile(e, 75)) if len(e) else math.nan,
            "median_signed": float(np.median(err[found])) if len(e) else math.nan,
            "subject_mean_abs": float(ps.mean()) if len(ps) else math.nan,
            "subject_sd_abs": float(ps.std(ddof=1)) if len(ps) > 1 else math.nan,
        }
    return out


def evaluate(files: list[Path] | None = None) -> dict:
    """Run `segment` on every IPOL trial (or `files`) and summarise the errors.

    Returns {"trials": [per-trial rows], "summary": {"all" | "tuning" | "held_out": {error: stats}},
    "tuning_subjects": [...], "note": ...}. Row keys: trial, subject, held_out, ref_steps, steps_found
    and the errors in ERRORS (detected - reference; seconds, steps).
    """
    paths = list(files) if files is not None else ipol_files()
    if not paths:
        raise DataError("no IPOL trials to evaluate", hint="check EDGEKIT_DATA_DIR/ipol_gait/GaitData")
    rows = [trial_errors(Path(p)) for p in paths]
    groups = {"all": rows, "tuning": [r for r in rows if not r["held_out"]],
              "held_out": [r for r in rows if r["held_out"]]}
    summary = {name: _summary(g) for name, g in groups.items() if g}
    log.info("eval_ipol trials=%d held_out=%d", len(rows), len(groups["held_out"]))
    return {
        "trials": rows, "summary": summary, "tuning_subjects": sorted(TUNING_SUBJECTS),
        "note": "segmentation constants were chosen on subjects 1-5 only; 'held_out' is subjects 6-15",
    }


def table(result: dict) -> str:
    """Plain-text summary table, one block per group (tuning / held-out / all)."""
    lines = [result.get("note", "")]
    head = (f"{'error':<14}{'n':>4}{'missed':>7}{'median |e|':>12}{'IQR |e|':>13}{'median e':>10}"
            f"{'subject mean±sd |e|':>22}")
    for group in ("tuning", "held_out", "all"):
        stats = result["summary"].get(group)
        if not stats:
            continue
        label = {"tuning": "subjects 1-5 (constants chosen here)", "held_out": "held-out subjects 6-15",
                 "all": "all subjects"}[group]
        lines += ["", f"{label} (times in s, steps in steps):", head]
        for key in ERRORS:
            s = stats[key]
            iqr = f"{s['q1_abs']:.2f}-{s['q3_abs']:.2f}"
            spread = f"{s['subject_mean_abs']:.2f} ± {s['subject_sd_abs']:.2f}"
            lines.append(f"{key:<14}{s['n']:>4}{s['missed']:>7}{s['median_abs']:>12.2f}{iqr:>13}"
                         f"{s['median_signed']:>10.2f}{spread:>22}")
    return "\n".join(lines)


def plot(result: dict, out_png: Path) -> Path:
    """Box plots of the absolute errors per quantity, tuning vs held-out subjects (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["trials"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [4, 1]})
    times = ERRORS[:4]
    for offset, held, color in ((-0.2, False, "tab:blue"), (0.2, True, "tab:orange")):
        data = [[abs(r[k]) for r in rows if r["held_out"] == held and math.isfinite(r[k])] for k in times]
        if any(data):
            bp = axes[0].boxplot(data, positions=np.arange(len(times)) + offset, widths=0.35,
                                 patch_artist=True, manage_ticks=False)
            for box in bp["boxes"]:
                box.set_facecolor(color)
        steps = [abs(r["steps"]) for r in rows if r["held_out"] == held]
        if steps:
            bp = axes[1].boxplot([steps], positions=[offset], widths=0.35, patch_artist=True,
                                 manage_ticks=False)
            bp["boxes"][0].set_facecolor(color)
    axes[0].set_xticks(np.arange(len(times)), [t.removesuffix("_s") for t in times])
    axes[0].set_ylabel("|detected - annotated| (s)")
    axes[1].set_xticks([0], ["steps"])
    axes[1].set_ylabel("|step count error|")
    axes[0].set_title("IPOL gait: blue subjects 1-5 (tuning), orange 6-15 (held out)")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
