"""Model quality on the real datasets, beside the published results: `edgekit eval NAME`.

EVALUATIONS maps each name to `run_<name>(json_out, plot_out, progress) -> dict`; `table(name, result)`
gives the plain-text table the README shows unedited. The metric helpers here are numpy only; the
evaluations themselves (eval_skab, eval_fall, eval_deferral, eval_ipol) are imported when run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import ConfigError

log = logging.getLogger(__name__)


# --- metrics ---------------------------------------------------------------------------------------


def binary_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    """Pooled binary metrics, positive = anomaly / faller.

    f1; far = FP / (FP + TN) (false alarm rate, SKAB's FAR); mar = FN / (FN + TP) (missed alarm rate);
    sensitivity = 1 - mar, specificity = 1 - far, precision, accuracy and the four counts.
    An undefined ratio (0/0) is reported as 0.0.
    """
    y = np.asarray(y_true).astype(bool).ravel()
    p = np.asarray(y_pred).astype(bool).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length ({y.size} vs {p.size})")
    tp = int((y & p).sum())
    fp = int((~y & p).sum())
    fn = int((y & ~p).sum())
    tn = int((~y & ~p).sum())

    def ratio(a: int, b: int) -> float:
        return a / b if b else 0.0

    return {"f1": ratio(2 * tp, 2 * tp + fp + fn), "far": ratio(fp, fp + tn), "mar": ratio(fn, fn + tp),
            "sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
            "precision": ratio(tp, tp + fp), "accuracy": ratio(tp + tn, y.size),
            "tp": tp, "fp": fp, "fn": fn, "tn": tn, "n": int(y.size)}


def coverage_risk_curve(confidence: np.ndarray, errors: np.ndarray) -> dict[str, np.ndarray]:
    """Error on accepted cases against coverage when the least confident are deferred first.

    Cases sorted by confidence (high first); point k accepts the k most confident (k = 1..n):
    coverage = k / n, deferred = 1 - coverage, risk = errors among them / k. Ties in confidence are
    accepted together (the gate cannot split them), so only the last point of each tie run is kept.
    """
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    err = np.asarray(errors).astype(np.float64).ravel()
    if conf.shape != err.shape or conf.size == 0:
        raise ValueError(f"confidence and errors must be non-empty and equal in length ({conf.size}, {err.size})")
    order = np.argsort(-conf, kind="stable")
    c_sorted = conf[order]
    cum = np.cumsum(err[order])
    k = np.arange(1, conf.size + 1)
    last_of_tie = np.r_[c_sorted[1:] != c_sorted[:-1], True]
    k, cum = k[last_of_tie], cum[last_of_tie]
    return {"coverage": k / conf.size, "deferred": 1.0 - k / conf.size, "risk": cum / k,
            "threshold": c_sorted[last_of_tie]}


def risk_at_coverage(curve: dict[str, np.ndarray], coverages: np.ndarray) -> np.ndarray:
    """The curve's risk at given coverages (step function: the largest point with coverage <= c)."""
    cov = curve["coverage"]
    idx = np.searchsorted(cov, np.asarray(coverages, dtype=np.float64), side="right") - 1
    idx = np.clip(idx, 0, cov.size - 1)
    return curve["risk"][idx]


def mean_sd(values: list[float] | np.ndarray) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


# --- JSON ------------------------------------------------------------------------------------------


def _plain(obj: Any) -> Any:
    """numpy -> JSON-able; arrays over 50 items are dropped (the JSON is a summary, not a dump)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items() if not (isinstance(v, np.ndarray) and v.size > 50)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def write_json(result: dict[str, Any], path: Path | None) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_plain(result), indent=2) + "\n")
    log.info("eval_json_written path=%s", path)


# --- the evaluations -------------------------------------------------------------------------------


def run_skab(json_out: Path | None, plot_out: Path | None, progress: bool = True) -> dict[str, Any]:
    from . import eval_skab

    result = eval_skab.evaluate_skab(progress=progress)
    if plot_out is not None:
        eval_skab.plot(result, Path(plot_out))
    result = {k: v for k, v in result.items() if k != "rows"}
    write_json(result, json_out)
    return result


def run_fall(json_out: Path | None, plot_out: Path | None, progress: bool = True) -> dict[str, Any]:
    from . import eval_fall

    result = eval_fall.evaluate_fall(progress=progress)
    if plot_out is not None:
        eval_fall.plot(result, Path(plot_out))
    result = {k: v for k, v in result.items() if k != "oof"}
    write_json(result, json_out)
    return result


def run_ipol(json_out: Path | None, plot_out: Path | None, progress: bool = True) -> dict[str, Any]:
    from . import eval_ipol

    result = eval_ipol.evaluate()
    if plot_out is not None:
        eval_ipol.plot(result, Path(plot_out))
    write_json(result, json_out)
    return result


def run_deferral(json_out: Path | None, plot_out: Path | None, progress: bool = True) -> dict[str, Any]:
    from . import eval_deferral

    result = eval_deferral.evaluate_deferral(progress=progress)
    if plot_out is not None:
        eval_deferral.plot(result, Path(plot_out))
    write_json(result, json_out)
    return result


EVALUATIONS: dict[str, Callable[[Path | None, Path | None, bool], dict[str, Any]]] = {
    "skab": run_skab,
    "fall-screening": run_fall,
    "ipol": run_ipol,
    "deferral": run_deferral,
}


def table(name: str, result: dict[str, Any]) -> str:
    """The plain-text table of evaluation `name` for `result` (what the README shows)."""
    if name == "skab":
        from .eval_skab import table as t
    elif name == "fall-screening":
        from .eval_fall import table as t
    elif name == "ipol":
        from .eval_ipol import table as t
    elif name == "deferral":
        from .eval_deferral import table as t
    else:
        raise ConfigError(f"unknown evaluation {name!r}", where="eval",
                          hint=f"known: {', '.join(EVALUATIONS)}")
    return t(result)
