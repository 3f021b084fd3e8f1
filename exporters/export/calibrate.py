"""Gate thresholds from the calibration split, computed on the outputs of the models the bundle uses.

Risk control by Learn-then-Test (Angelopoulos, Bates, Candes, Jordan, Lei 2021, arXiv:2110.01052): fixed-
sequence testing over a grid from strict to lax with exact binomial p-values. Pure numpy/scipy: no torch.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from scipy.stats import binom

from edgekit.errors import ExportError
from edgekit.gate import Gate

log = logging.getLogger(__name__)

DEFAULT_GRID_POINTS = 200
# The walk starts where START_FACTOR * min_accepted cases are accepted: at exactly min_accepted a single
# error ends the whole sequence, so a little more data at the first test buys robustness.
START_FACTOR = 2


def min_accepted(target_error: float, delta: float) -> int:
    """Fewest accepted cases for which zero errors can reject 'error > target' at level delta."""
    return int(math.ceil(math.log(delta) / math.log(1.0 - target_error)))


def ltt_threshold(scores: np.ndarray, errors: np.ndarray, target_error: float, delta: float,
                  grid: np.ndarray | None = None) -> dict[str, Any]:
    """The laxest lambda with P(error | score >= lambda) <= target_error, with probability >= 1 - delta.

    `scores`: higher = more confident (-inf = never accepted); `errors`: 1 where the model was wrong.
    For each lambda, H0: the error rate among accepted cases exceeds target_error. Given n accepted cases,
    their errors are Binomial(n, risk), so p = P(Binomial(n, target_error) <= k errors) is a valid p-value.
    Fixed-sequence testing walks the grid from strict to lax, rejecting while p <= delta, and stops at the
    first failure: the family-wise error rate stays <= delta without a multiplicity correction.
    Grid points accepting fewer than START_FACTOR * `min_accepted` cases are skipped (at fewer than
    min_accepted a rejection is impossible); that choice looks at the scores only, never at the errors.
    The default grid is up to 200 score quantiles. Returns lambda (inf when none valid), n_accepted,
    n_errors, error, coverage, p_value, valid, n_tested.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    errors = np.asarray(errors).astype(bool).ravel()
    if scores.shape != errors.shape:
        raise ExportError(f"scores and errors differ in length ({scores.size} vs {errors.size})",
                          where="ltt_threshold")
    if not 0.0 < target_error < 1.0 or not 0.0 < delta < 1.0:
        raise ExportError(f"target_error and delta must be in (0, 1) (got {target_error}, {delta})",
                          where="ltt_threshold", hint="e.g. target_error=0.05, delta=0.1")
    if np.isnan(scores).any():
        raise ExportError("scores contain NaN", where="ltt_threshold")
    n = scores.size
    if grid is None:
        finite = scores[np.isfinite(scores)]
        grid = np.unique(np.quantile(finite, np.linspace(0.0, 1.0, DEFAULT_GRID_POINTS))) if finite.size \
            else np.array([])
    grid = np.sort(np.asarray(grid, dtype=np.float64).ravel())[::-1]  # strict -> lax

    # counts for every grid point at once: accepted = score >= lambda
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    cum_errors = np.concatenate([[0], np.cumsum(errors[order])])
    n_acc = np.searchsorted(-sorted_scores, -grid, side="right")  # count of scores >= lambda
    k_err = cum_errors[n_acc]
    p_values = np.where(n_acc > 0, binom.cdf(k_err, np.maximum(n_acc, 1), target_error), 1.0)

    n_min = START_FACTOR * min_accepted(target_error, delta)
    best, tested = _fixed_sequence(n_acc, p_values, n_min, delta)
    if best is None:
        out = {"lambda": math.inf, "n_accepted": 0, "n_errors": 0, "error": None, "coverage": 0.0,
               "p_value": float(p_values[n_acc >= n_min][0]) if (n_acc >= n_min).any() else 1.0,
               "valid": False, "n_tested": tested, "n": n}
    else:
        na, ke = int(n_acc[best]), int(k_err[best])
        out = {"lambda": float(grid[best]), "n_accepted": na, "n_errors": ke, "error": ke / na,
               "coverage": na / n if n else 0.0, "p_value": float(p_values[best]), "valid": True,
               "n_tested": tested, "n": n}
    log.debug("ltt_threshold lambda=%s valid=%s coverage=%.3f", out["lambda"], out["valid"], out["coverage"])
    return out


def _fixed_sequence(n_acc: np.ndarray, p_values: np.ndarray, n_min: int, delta: float) -> tuple[int | None, int]:
    """Walk the grid (strict -> lax) rejecting while p <= delta; stop at the first failure. Points accepting
    fewer than `n_min` cases are not tests. Returns the last rejected index (None: none) and the tests run."""
    best: int | None = None
    tested = 0
    for i in range(len(n_acc)):
        if n_acc[i] < n_min:
            continue  # cannot reject here whatever the errors: not a test
        tested += 1
        if p_values[i] <= delta:
            best = i
        else:
            break
    return best, tested


def tv_distance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Total variation distance between rows of two probability matrices: 0.5 * sum |p - q|."""
    return 0.5 * np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)).sum(axis=-1)


def gate_score(probs: np.ndarray, second_probs: np.ndarray) -> np.ndarray:
    """One score for the nested family 'confidence >= lam and disagreement <= 1 - lam': min(conf, 1 - tv)."""
    confidence = np.asarray(probs, np.float64).max(axis=-1)
    return np.minimum(confidence, 1.0 - tv_distance(probs, second_probs))


def accept_mask(probs: np.ndarray, second_probs: np.ndarray, ood_score: np.ndarray,
                thresholds: dict[str, Any], outside: np.ndarray | None = None) -> np.ndarray:
    """What the agent's gate accepts under `thresholds` (and the input envelope's mask `outside`, or None):
    the agent's own rule (edgekit.gate), not a copy."""
    return Gate.from_thresholds(thresholds).verdicts(probs, second_probs, ood_score, outside).accept


def calibrate_gate(cal: dict[str, np.ndarray], test: dict[str, np.ndarray], *, normal_index: int,
                   target_error: float, delta: float, ood_quantile: float = 0.99,
                   ood_reference: str = "normal", outside: dict[str, np.ndarray | None] | None = None
                   ) -> dict[str, Any]:
    """Thresholds from the cal split; realised error/coverage on the test split.

    `cal`/`test` hold 'probs' [N, K] (predictor), 'second' [N, K] (second opinion), 'score' [N] (autoencoder),
    'y' [N]. ood_max_score is the `ood_quantile` quantile of autoencoder scores of the cal cases the
    autoencoder was fitted on (`ood_reference`: "normal" cases, or "all"), so about 1 - ood_quantile of
    such in-distribution cases are deferred as out of distribution; min_confidence and
    max_disagreement come from ltt_threshold on gate_score among the cases the OOD check lets through.
    `outside`: per split ("cal", "test") the rows the input envelope defers (the agent never accepts them),
    or None; those rows are never accepted here either.
    """
    outside = outside or {}
    if not 0.5 <= ood_quantile < 1.0:
        raise ExportError(f"ood_quantile must be in [0.5, 1) (got {ood_quantile})", where="calibrate_gate")
    if ood_reference not in ("normal", "all"):
        raise ExportError(f"ood_reference must be 'normal' or 'all' (got {ood_reference!r})",
                          where="run.json:models.autoencoder.fit_on")
    y = np.asarray(cal["y"])
    scores = np.asarray(cal["score"])
    normal_scores = scores[y == normal_index] if ood_reference == "normal" else scores
    if normal_scores.size == 0:
        raise ExportError("calibration split has no normal cases for the OOD threshold",
                          where="splits.npz:cal_y", hint="check normal_label in run.json")
    ood_max = float(np.quantile(normal_scores, ood_quantile))
    errors = np.argmax(cal["probs"], axis=-1) != y
    score = gate_score(cal["probs"], cal["second"])
    passed = np.asarray(cal["score"]) <= ood_max
    if outside.get("cal") is not None:
        passed &= ~np.asarray(outside["cal"], dtype=bool)
    score = np.where(passed, score, -np.inf)
    ltt = ltt_threshold(score, errors, target_error, delta)
    if ltt["valid"]:
        thresholds = {"ood_max_score": ood_max, "min_confidence": ltt["lambda"],
                      "max_disagreement": 1.0 - ltt["lambda"], "defer_all": False}
    else:
        # min_confidence 2.0 > any probability: a gate that ignores defer_all still defers everything
        thresholds = {"ood_max_score": ood_max, "min_confidence": 2.0, "max_disagreement": 0.0,
                      "defer_all": True}
    cal_acc = accept_mask(cal["probs"], cal["second"], cal["score"], thresholds, outside.get("cal"))
    test_acc = accept_mask(test["probs"], test["second"], test["score"], thresholds, outside.get("test"))
    test_err = np.argmax(test["probs"], axis=-1) != np.asarray(test["y"])
    n_cal, n_test = int(y.size), int(len(test["y"]))
    report = {
        "method": "ltt-fixed-sequence-binomial",
        "target_error": float(target_error), "delta": float(delta), "ood_quantile": float(ood_quantile),
        "ood_reference": ood_reference,
        "n_cal": n_cal, "cal_accepted": int(cal_acc.sum()),
        "cal_error": float(errors[cal_acc].mean()) if cal_acc.any() else None,
        "cal_coverage": float(cal_acc.mean()) if n_cal else 0.0,
        "p_value": ltt["p_value"], "valid": bool(ltt["valid"]),
        "n_test": n_test, "test_accepted": int(test_acc.sum()),
        "test_error": float(test_err[test_acc].mean()) if test_acc.any() else None,
        "test_coverage": float(test_acc.mean()) if n_test else 0.0,
    }
    log.info("gate_calibrated valid=%s min_confidence=%.4f ood_max_score=%.5g cal_coverage=%.3f "
             "test_coverage=%.3f test_error=%s", report["valid"], thresholds["min_confidence"], ood_max,
             report["cal_coverage"], report["test_coverage"], report["test_error"])
    return {"thresholds": thresholds, "calibration": report}
