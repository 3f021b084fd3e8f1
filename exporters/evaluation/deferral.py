"""Deferral guarantee: does "answer alone only where the error stays under target_error" hold on data?

The gate's acceptance threshold is chosen by Learn-then-Test (export/calibrate.py ltt_threshold: fixed-
sequence binomial tests, P(risk > target) <= delta) on a random calibration half; the realised error on the
accepted cases of the other half is measured. Repeated over R random splits of the same model outputs
(the models are fitted once: only the cal/test assignment changes). If the method holds, the fraction of
splits whose realised test error exceeds the target is at most delta, up to the binomial noise of R splits
and of a finite test half (the bound printed is the 95 % quantile of Binomial(R, delta) / R).
"""

from __future__ import annotations

import logging
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binom

from edgekit.exporters.export.calibrate import ltt_threshold, min_accepted

from . import fall_screening, skab

log = logging.getLogger(__name__)

TARGETS = (0.02, 0.05, 0.10)
DELTA = 0.1  # split_trials' default; evaluate_deferral uses each recipe's gate.delta
SPLITS = 100
CAL_FRACTION = 0.5


def violation_bound(splits: int, delta: float, level: float = 0.95) -> float:
    """Largest violation fraction still consistent (at `level`) with P(violation) <= delta per split."""
    return float(binom.ppf(level, splits, delta)) / splits


def split_trials(confidence: np.ndarray, errors: np.ndarray, *, targets: tuple[float, ...] = TARGETS,
                 delta: float = DELTA, splits: int = SPLITS, cal_fraction: float = CAL_FRACTION,
                 seed: int = 0, groups: np.ndarray | None = None) -> dict[str, Any]:
    """R random cal/test splits of fixed (confidence, errors); per target: realised test error on the
    accepted cases, coverage, and how often the realised error exceeded the target.

    `groups`: when given, whole groups (e.g. recordings) go to cal or test together; LTT's binomial test
    then no longer has independent cases, so that variant is a stress test, not a guarantee.
    A split where LTT finds no valid threshold defers everything: coverage 0, no violation.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    err = np.asarray(errors).astype(bool)
    rng = np.random.default_rng(seed)
    raw: dict[float, dict[str, list[float]]] = {t: {"error": [], "coverage": [], "n_accepted": [], "valid": []}
                                                 for t in targets}
    uniq = np.unique(groups) if groups is not None else None
    for _ in range(splits):
        if uniq is None:
            cal = rng.random(conf.size) < cal_fraction
        else:
            chosen = rng.permutation(uniq)[: int(round(cal_fraction * uniq.size))]
            cal = np.isin(groups, chosen)
        test = ~cal
        for t in targets:
            res = ltt_threshold(conf[cal], err[cal], t, delta)
            acc = test & (conf >= res["lambda"]) if res["valid"] else np.zeros_like(test)
            n_acc = int(acc.sum())
            r = raw[t]
            r["error"].append(float(err[acc].mean()) if n_acc else float("nan"))
            r["coverage"].append(n_acc / int(test.sum()))
            r["n_accepted"].append(n_acc)
            r["valid"].append(float(res["valid"]))
    return summarise({f"{t:g}": {k: np.asarray(v, dtype=np.float64) for k, v in r.items()}
                      for t, r in raw.items()}, delta=delta, cal_fraction=cal_fraction, n=int(conf.size),
                     base_error=float(err.mean()))


def summarise(raw: dict[str, dict[str, np.ndarray]], *, delta: float, cal_fraction: float, n: int,
              base_error: float) -> dict[str, Any]:
    """Per target, from per-split arrays (error, coverage, n_accepted, valid): the reported numbers.

    Two violation counts: `violation_rate`, the share of splits whose realised test error exceeds the
    target; and `violation_rate_noise`, the share where it exceeds the target by more than the test half's
    own one-sided 95 % binomial noise (1.645 * sqrt(t (1 - t) / accepted)). LTT bounds the probability that
    the selected threshold's true risk exceeds the target; a finite test half measures that risk with noise,
    so a threshold whose true risk sits just under the target reads as a violation about half the time in
    the raw count. `holds` is judged on the noise-aware count; both are printed.
    """
    splits = len(next(iter(raw.values()))["error"])
    bound = violation_bound(splits, delta)
    out: dict[str, Any] = {"delta": delta, "splits": splits, "cal_fraction": cal_fraction, "bound": bound,
                           "n": n, "base_error": base_error, "targets": {}}
    for key, r in raw.items():
        t = float(key)
        e, n_acc = r["error"], r["n_accepted"]
        answered = np.isfinite(e) & (n_acc > 0)
        slack = 1.645 * np.sqrt(t * (1 - t) / np.maximum(n_acc, 1))
        viol = answered & (np.nan_to_num(e) > t)
        viol_noise = answered & (np.nan_to_num(e) > t + slack)
        out["targets"][key] = {
            "target_error": t, "min_accepted": min_accepted(t, delta),
            "error_mean": float(e[answered].mean()) if answered.any() else None,
            "error_p90": float(np.quantile(e[answered], 0.9)) if answered.any() else None,
            "coverage_mean": float(r["coverage"].mean()), "coverage_sd": float(r["coverage"].std(ddof=1)),
            "violation_rate": float(viol.mean()), "violation_rate_noise": float(viol_noise.mean()),
            "valid_rate": float(r["valid"].mean()),
            "holds": bool(viol_noise.mean() <= bound),
            "errors": e, "coverages": r["coverage"], "n_accepted": n_acc,
        }
    return out


def skab_confidence(prob: np.ndarray) -> np.ndarray:
    """The agent's confidence in a SKAB row's answer: its predictor's probability of the label it gave,
    rescaled to 0..1 (2 |p - 0.5| for a binary task)."""
    return np.abs(2.0 * np.asarray(prob, np.float64) - 1.0)


def evaluate_deferral(progress: bool = True, splits: int = SPLITS) -> dict[str, Any]:
    """SKAB (the agent's per-row alarms, edgekit eval skab; row-level and file-level splits) and fall screening
    (out-of-fold decisions of the recipe's predictor + second opinion, one CV repeat per split); delta is
    each task's recipe gate.delta (edgekit/recipes/skab.toml, fall_screening.toml)."""
    t0 = time.perf_counter()
    skab_delta = skab.shipped_recipe(skab.SkabEval().recipe)[1].gate.delta
    fall_delta = fall_screening.fall_recipe(fall_screening.FallDesign())[1].gate.delta
    rows = skab.evaluate_skab(progress=progress)["rows"]
    answered = np.isfinite(rows["p"])  # rows whose latest result a model answered (not commissioning)
    rows = {k: v[answered] for k, v in rows.items()}
    errors = rows["alarm"] != rows["y"].astype(bool)
    conf = skab_confidence(rows["p"])
    out: dict[str, Any] = {"delta": {"skab": skab_delta, "fall": fall_delta}, "splits": splits}
    out["skab"] = split_trials(conf, errors, delta=skab_delta, splits=splits, seed=1)
    out["skab_by_file"] = split_trials(conf, errors, delta=skab_delta, splits=splits, seed=2, groups=rows["file"])

    fall = fall_screening.evaluate_fall(progress=progress)
    oof = fall["oof"]
    rng = np.random.default_rng(3)
    fall_trials = []
    per_split = max(1, splits // len(oof))
    for i, rep in enumerate(oof):
        fall_trials.append(split_trials(rep["confidence"], rep["errors"], delta=fall_delta, splits=per_split,
                                        seed=int(rng.integers(1 << 31)) + i))
    out["fall"] = _merge(fall_trials)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    log.info("eval_deferral seconds=%.1f", out["seconds"])
    return out


def _merge(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool split_trials results from several sources of model outputs (e.g. CV repeats)."""
    first = trials[0]
    raw = {key: {"error": np.concatenate([t["targets"][key]["errors"] for t in trials]),
                 "coverage": np.concatenate([t["targets"][key]["coverages"] for t in trials]),
                 "n_accepted": np.concatenate([t["targets"][key]["n_accepted"] for t in trials]),
                 "valid": np.concatenate([np.full(t["splits"], t["targets"][key]["valid_rate"]) for t in trials])}
           for key in first["targets"]}
    return summarise(raw, delta=first["delta"], cal_fraction=first["cal_fraction"], n=first["n"],
                     base_error=float(np.mean([t["base_error"] for t in trials])))


LABELS = {
    "skab": "SKAB agent's alarms, rows split at random",
    "skab_by_file": "SKAB agent's alarms, files split (stress)",
    "fall": "fall screening combined, participants split",
}


def _f(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.3f}"


def table(result: dict[str, Any]) -> str:
    deltas = ", ".join(f"{k} {v:g}" for k, v in result["delta"].items())
    lines = [f"Deferral guarantee: Learn-then-Test (fixed-sequence binomial), delta (recipe gate.delta): {deltas}, "
             f"cal/test halves, {result['splits']} random splits",
             f"{'case':<44}{'target':>7}{'base err':>9}{'test err':>9}{'p90 err':>8}{'coverage':>10}"
             f"{'> target':>9}{'> t+noise':>10}{'bound':>7}{'holds':>6}"]
    for key in ("skab", "skab_by_file", "fall"):
        res = result[key]
        for tk, t in res["targets"].items():
            lines.append(f"{LABELS[key]:<44}{tk:>7}{_f(res['base_error']):>9}{_f(t['error_mean']):>9}"
                         f"{_f(t['error_p90']):>8}{_f(t['coverage_mean'], True):>10}"
                         f"{_f(t['violation_rate'], True):>9}{_f(t['violation_rate_noise'], True):>10}"
                         f"{_f(res['bound'], True):>7}"
                         f"{'yes' if t['holds'] else 'NO':>6}")
    lines += textwrap.wrap("test err: mean realised error on the accepted test cases (splits that answered any); coverage: "
                 "share of test cases answered alone; > target: share of splits whose realised error exceeded the "
                 "target; > t+noise: share where it exceeded it by more than the test half's own 95 % binomial "
                 "noise (LTT bounds the true risk, which a finite test half measures with noise); bound: 95 % "
                 "quantile of Binomial(splits, delta) / splits; holds: > t+noise <= bound. A split with no "
                 "valid threshold defers everything (coverage 0). SKAB decisions are the agent's alarms (edgekit eval "
                 "skab, cross-fitted by file); their confidence is its predictor's, 2 |P(anomaly) - 0.5|. Fall: "
                 "the recipe's predictor + second opinion (mean probability), confidence = margin from the in-fold cut, "
                 "disagreements deferred first.", 110)
    return "\n".join(lines)


def plot(result: dict[str, Any], out_png: Path) -> Path:
    """Realised test error per split against the target, and coverage, for each case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("skab", "skab_by_file", "fall")
    fig, axes = plt.subplots(2, len(keys), figsize=(4 * len(keys), 6), sharey="row")
    for j, key in enumerate(keys):
        res = result[key]
        targets = list(res["targets"].values())
        pos = np.arange(len(targets))
        errs = [t["errors"][np.isfinite(t["errors"])] for t in targets]
        axes[0, j].boxplot([e if e.size else [np.nan] for e in errs], positions=pos, widths=0.5)
        axes[0, j].scatter(pos, [t["target_error"] for t in targets], marker="_", s=600, color="tab:red",
                           label="target")
        axes[0, j].set_title(LABELS[key], fontsize=9)
        axes[1, j].boxplot([t["coverages"] for t in targets], positions=pos, widths=0.5)
        for ax in axes[:, j]:
            ax.set_xticks(pos, [f"{t['target_error']:g}" for t in targets])
        axes[1, j].set_xlabel("target error")
    axes[0, 0].set_ylabel("realised error on accepted test cases")
    axes[1, 0].set_ylabel("coverage (answered alone)")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
