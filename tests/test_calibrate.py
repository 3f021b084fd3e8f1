"""Learn-then-Test gate calibration: the risk guarantee holds over repetitions, edge cases, no torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from edgekit.errors import ExportError
from edgekit.exporters.export.calibrate import (
    accept_mask,
    calibrate_gate,
    gate_score,
    ltt_threshold,
    min_accepted,
)


def _draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """score ~ U(0, 1); P(error | score) = 0.3 (1 - score)^2, so P(error | score >= lam) = 0.1 (1 - lam)^2."""
    scores = rng.uniform(0.0, 1.0, n)
    errors = rng.uniform(0.0, 1.0, n) < 0.3 * (1.0 - scores) ** 2
    return scores, errors


def _true_risk(lam: float) -> float:
    return 0.1 * (1.0 - lam) ** 2


def test_guarantee_holds_over_seeded_repetitions() -> None:
    target, delta, reps = 0.05, 0.1, 300
    violations, coverages = 0, []
    for seed in range(reps):
        scores, errors = _draw(np.random.default_rng(seed), 1000)
        res = ltt_threshold(scores, errors, target, delta)
        if res["valid"]:
            violations += _true_risk(res["lambda"]) > target
            coverages.append(1.0 - res["lambda"])
    # violations ~ Binomial(reps, <= delta): allow three standard deviations of slack
    slack = 3 * np.sqrt(reps * delta * (1 - delta))
    assert violations <= reps * delta + slack, f"{violations}/{reps} runs exceeded the target"
    # and it is not vacuous: the oracle threshold accepts 1 - lam* = sqrt(0.5) ~ 0.71 of cases
    assert len(coverages) >= 0.97 * reps
    assert 0.45 < float(np.mean(coverages)) <= 0.75


def test_perfect_model_accepts_everything() -> None:
    scores = np.linspace(0.1, 1.0, 500)
    res = ltt_threshold(scores, np.zeros(500), 0.05, 0.1)
    assert res["valid"] and res["n_accepted"] == 500 and res["coverage"] == 1.0
    assert res["lambda"] == pytest.approx(0.1)


def test_hopeless_model_defers_everything() -> None:
    rng = np.random.default_rng(0)
    res = ltt_threshold(rng.uniform(size=400), np.ones(400), 0.05, 0.1)
    assert res["valid"] is False and res["lambda"] == np.inf
    assert res["n_accepted"] == 0 and res["coverage"] == 0.0


def test_too_few_cases_to_certify() -> None:
    # 20 cases with zero errors cannot show error <= 5 % at delta 0.1 (needs >= 45)
    assert min_accepted(0.05, 0.1) == 45
    res = ltt_threshold(np.linspace(0, 1, 20), np.zeros(20), 0.05, 0.1)
    assert res["valid"] is False and res["n_tested"] == 0


def test_fixed_sequence_stops_at_first_failure() -> None:
    # confident cases are right, then a band of errors, then right again: the lax tail must not be reached
    scores = np.concatenate([np.full(200, 0.9), np.full(50, 0.5), np.full(500, 0.1)])
    errors = np.concatenate([np.zeros(200), np.ones(50), np.zeros(500)])
    res = ltt_threshold(scores, errors, 0.05, 0.1, grid=np.array([0.9, 0.5, 0.1]))
    assert res["valid"] and res["lambda"] == 0.9 and res["n_accepted"] == 200


def test_bad_input_raises() -> None:
    with pytest.raises(ExportError, match="differ in length"):
        ltt_threshold(np.zeros(3), np.zeros(4), 0.05, 0.1)
    with pytest.raises(ExportError, match=r"in \(0, 1\)"):
        ltt_threshold(np.zeros(3), np.zeros(3), 0.0, 0.1)
    with pytest.raises(ExportError, match="NaN"):
        ltt_threshold(np.array([np.nan]), np.zeros(1), 0.05, 0.1)


def _outputs(rng: np.random.Generator, n: int, noise: float) -> dict[str, np.ndarray]:
    y = rng.integers(0, 3, n)
    logits = rng.normal(0, 1, (n, 3)) + 3.0 * np.eye(3)[y] * rng.uniform(0, 1, (n, 1))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    second = np.clip(probs + rng.normal(0, noise, probs.shape), 1e-3, None)
    second /= second.sum(-1, keepdims=True)
    return {"probs": probs, "second": second, "score": rng.gamma(2.0, 1.0, n), "y": y}


def test_calibrate_gate_thresholds_and_test_report() -> None:
    rng = np.random.default_rng(1)
    cal, test = _outputs(rng, 3000, 0.05), _outputs(rng, 3000, 0.05)
    res = calibrate_gate(cal, test, normal_index=0, target_error=0.1, delta=0.1)
    th, rep = res["thresholds"], res["calibration"]
    assert rep["valid"] and not th["defer_all"]
    assert th["max_disagreement"] == pytest.approx(1.0 - th["min_confidence"])
    assert th["ood_max_score"] == pytest.approx(np.quantile(cal["score"][cal["y"] == 0], 0.99))
    accepted = accept_mask(test["probs"], test["second"], test["score"], th)
    assert rep["test_coverage"] == pytest.approx(accepted.mean())
    realised = float((test["probs"].argmax(-1) != test["y"])[accepted].mean())
    assert rep["test_error"] == pytest.approx(realised)
    assert realised <= 0.1 + 0.02  # held-out error near or under the target (finite-sample slack)
    assert 0.0 < rep["test_coverage"] < 1.0
    # gate_score is the nested family: accepted iff min(conf, 1 - tv) >= lambda (and not OOD)
    s = gate_score(test["probs"], test["second"])
    assert np.array_equal(accepted, (s >= th["min_confidence"]) & (test["score"] <= th["ood_max_score"]))


def test_calibrate_gate_defers_all_when_nothing_is_valid() -> None:
    rng = np.random.default_rng(2)
    cal, test = _outputs(rng, 300, 0.05), _outputs(rng, 300, 0.05)
    cal["y"] = (cal["probs"].argmax(-1) + 1) % 3  # always wrong
    cal["y"][:30] = 0  # keep some normal cases for the OOD quantile
    res = calibrate_gate(cal, test, normal_index=0, target_error=0.05, delta=0.1)
    th = res["thresholds"]
    assert th["defer_all"] and th["min_confidence"] > 1.0
    assert res["calibration"]["valid"] is False and res["calibration"]["test_coverage"] == 0.0
    assert not accept_mask(test["probs"], test["second"], test["score"], {**th, "defer_all": False}).any()


def test_calibrate_imports_no_torch() -> None:
    code = ("import sys; import edgekit.exporters.export.calibrate; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
