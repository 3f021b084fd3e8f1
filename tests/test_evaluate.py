"""Metric and deferral code of the evaluations, on hand-computed and synthetic cases (fast: no training);
on real data (data, torch, slow), that the evaluations fit the models the recipes define, not copies."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.exporters import metrics
from edgekit.exporters.evaluation import evaluate
from edgekit.exporters.evaluation.deferral import skab_confidence, split_trials, violation_bound
from edgekit.exporters.evaluation.fall_screening import gate_confidence, youden_threshold


def test_binary_metrics_hand_computed() -> None:
    # 10 rows: 4 anomalies; the detector flags rows 1, 2, 3 (anomalies) and 5, 6 (normal)
    y = np.array([0, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    p = np.array([0, 1, 1, 1, 0, 1, 1, 0, 0, 0])
    m = metrics.binary_metrics(y, p)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (3, 2, 1, 4)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))  # 6/9
    assert m["far"] == pytest.approx(2 / 6)
    assert m["mar"] == pytest.approx(1 / 4)
    assert m["sensitivity"] == pytest.approx(0.75)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["accuracy"] == pytest.approx(0.7)


def test_binary_metrics_degenerate_and_mismatch() -> None:
    m = metrics.binary_metrics(np.zeros(5), np.zeros(5))
    assert m["f1"] == 0.0 and m["far"] == 0.0 and m["mar"] == 0.0 and m["accuracy"] == 1.0
    with pytest.raises(ValueError, match="differ in length"):
        metrics.binary_metrics(np.zeros(3), np.zeros(4))


def test_coverage_risk_curve_properties() -> None:
    rng = np.random.default_rng(0)
    conf = rng.random(500)
    errors = rng.random(500) < (1 - conf)  # less confident -> more errors
    curve = metrics.coverage_risk_curve(conf, errors)
    assert np.all(np.diff(curve["coverage"]) > 0)
    assert curve["coverage"][-1] == 1.0
    assert curve["risk"][-1] == pytest.approx(errors.mean())  # nothing deferred: the base error
    assert np.allclose(curve["deferred"], 1 - curve["coverage"])
    # informative confidence: deferring the least confident half lowers the error on what is kept
    half = metrics.risk_at_coverage(curve, np.array([0.5]))[0]
    assert half < errors.mean() - 0.1
    # with a perfectly ordered confidence the risk never decreases as coverage grows
    perfect = metrics.coverage_risk_curve(-np.arange(100.0), np.arange(100) >= 70)
    assert np.all(np.diff(perfect["risk"]) >= 0)
    assert perfect["risk"][69] == 0.0


def test_coverage_risk_curve_ties_accepted_together() -> None:
    curve = metrics.coverage_risk_curve(np.array([1.0, 1.0, 0.5, 0.5]), np.array([0, 1, 0, 0]))
    assert curve["coverage"].tolist() == [0.5, 1.0]
    assert curve["risk"].tolist() == [0.5, 0.25]


def test_registry_has_a_table_for_every_evaluation() -> None:
    assert set(evaluate.EVALUATIONS) == set(evaluate.TABLES) == {"skab", "fall-screening", "ipol", "deferral", "trials",
                                                                   "sensor-faults", "incidents", "review-loop"}
    from edgekit.cli import evaluate as eval_cmd

    assert set(eval_cmd.params[0].type.choices) == set(evaluate.EVALUATIONS)  # `edgekit eval NAME` offers them all


def test_trials_table_counts_each_bundle() -> None:
    result = {"trials": 3, "bundles": {"b": {"answered": 2, "accepted": 1, "deferred": 1,
                                              "not_scored": {"too_short": 1}, "defer_reasons": {"ood": 1},
                                              "labels": {"x": 2}}}}
    text = evaluate.TABLES["trials"](result)
    assert "IPOL, 3 trials" in text
    assert text.splitlines()[2].split()[:5] == ["b", "2", "1", "1", "1"]
    assert "not scored: {'too_short': 1}" in text


def test_json_drops_big_arrays_and_non_finite(tmp_path) -> None:
    out = tmp_path / "r.json"
    evaluate.write_json({"f1": np.float64(0.5), "big": np.zeros(100), "small": np.arange(3),
                         "inf": float("inf")}, out)
    import json

    data = json.loads(out.read_text())
    assert data == {"f1": 0.5, "small": [0, 1, 2], "inf": None}


def test_deferral_holds_on_synthetic_scores_with_known_error_rate() -> None:
    """Scores with a known error curve: P(error | confidence c) = 0.3 * (1 - c). LTT at delta 0.1 must keep
    the realised error under the target in (nearly) all but a delta share of splits, and answer something."""
    rng = np.random.default_rng(1)
    conf = rng.random(20_000)
    errors = rng.random(conf.size) < 0.3 * (1 - conf)
    res = split_trials(conf, errors, targets=(0.05, 0.10), delta=0.1, splits=40, seed=0)
    for key in ("0.05", "0.1"):
        t = res["targets"][key]
        assert t["valid_rate"] == 1.0
        assert t["coverage_mean"] > 0.2  # the error among the top fraction is well under target
        assert t["violation_rate_noise"] <= res["bound"]
        assert t["error_mean"] <= t["target_error"]
    # error among accepted cases with confidence >= lam is 0.15 (1 - lam): for target 0.05 the best lam is
    # 2/3, so coverage cannot exceed 1/3 (plus a little sampling slack)
    assert res["targets"]["0.05"]["coverage_mean"] <= 0.36


def test_deferral_defers_everything_when_too_few_cases() -> None:
    conf = np.linspace(0, 1, 30)
    errors = np.zeros(30, dtype=bool)
    res = split_trials(conf, errors, targets=(0.02,), delta=0.1, splits=5)
    t = res["targets"]["0.02"]
    assert t["valid_rate"] == 0.0 and t["coverage_mean"] == 0.0 and t["violation_rate"] == 0.0


def test_violation_bound() -> None:
    assert violation_bound(100, 0.1) == pytest.approx(0.15)
    assert 0.1 <= violation_bound(1000, 0.1) < 0.12


def test_gate_confidences() -> None:
    c = skab_confidence(np.array([0.5, 0.9, 0.1, 1.0]))
    assert c.tolist() == pytest.approx([0.0, 0.8, 0.8, 1.0])  # sure of 'normal' as of 'anomaly'
    g = gate_confidence(np.array([0.9, 0.9]), np.array([0.5, 0.5]), np.array([True, False]))
    assert g[0] == pytest.approx(0.4) and g[1] < 0  # a disagreement is deferred before any agreement


def test_youden_threshold_separates() -> None:
    y = np.array([0, 0, 0, 1, 1])
    prob = np.array([0.1, 0.2, 0.3, 0.6, 0.7])
    thr = youden_threshold(y, prob)
    assert 0.3 < thr < 0.6
    assert metrics.binary_metrics(y, prob >= thr)["accuracy"] == 1.0


def test_skab_error_sources_hand_computed() -> None:
    from edgekit.exporters.evaluation.skab import error_sources

    files = np.array(["a"] * 10 + ["b"] * 6)
    y = np.array([0, 0, 1, 1, 1, 1, 0, 0, 0, 0] + [0, 1, 1, 1, 0, 0])
    p = np.array([1, 0, 0, 1, 1, 1, 1, 1, 0, 0] + [0, 0, 0, 0, 0, 0])
    e = error_sources(y, p, files, lag_rows=2)
    assert (e["normal_before"], e["fa_before"], e["normal_after"], e["fa_after"], e["fa_between"]) == (3, 1, 6, 2, 0)
    assert (e["miss_lag"], e["miss_later"]) == (3, 1)  # a: row 2 (onset); b: rows 1, 2 (onset) and 3
    assert e["files_f1_below_half"] == ["b"]  # a: F1 6/10


@pytest.mark.data
def test_fall_rows_on_real_data(data_dir) -> None:
    from edgekit.exporters.evaluation.fall_screening import load_fall

    x, y = load_fall()
    assert x.shape == (73, 9) and int(y.sum()) == 20  # the study's usable participants and fallers


def test_skab_rows_take_the_agents_latest_result() -> None:
    """Each row takes the result of the last window that ended at or before it; the alarm is the anomaly label
    or a refusal naming a channel; commissioning and rows before any result are no alarm."""
    from edgekit.contract.messages import Result
    from edgekit.exporters.evaluation.skab import row_decisions

    def res(end_s: float, decision: str, label: str | None, reasons: list[str], p: float | None) -> Result:
        probs = {} if p is None else {"normal": 1 - p, "anomaly": p}
        return Result(id="d:1", seq=1, site="s", device="d", ts=0.0, start_s=end_s - 7, end_s=end_s,
                      model_version="m", task="skab", label=label, confidence=None, probs=probs, decision=decision,
                      reasons=reasons, scores={}, thresholds={})

    results = [res(10, "defer", None, ["commissioning"], None), res(12, "accept", "normal", [], 0.1),
               res(14, "defer", "anomaly", ["low_confidence"], 0.6), res(16, "defer", "normal", ["stuck:Current"], 0.2),
               res(18, "defer", "normal", ["ood"], 0.3), res(20, "defer", None, ["implausible"], None)]
    rows = row_decisions(results, np.array([9.0, 10, 11, 12, 13.5, 14, 16, 17, 18, 20, 25]), "anomaly")
    assert rows["alarm"].tolist() == [False, False, False, False, False, True, True, True, False, True, True]
    assert rows["state"].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2]
    assert rows["ood"].tolist() == [False] * 8 + [True, False, False]
    assert np.isnan(rows["p"][[0, 1, 9]]).all() and rows["p"][5] == pytest.approx(0.6)


@pytest.mark.data
@pytest.mark.torch
@pytest.mark.slow
def test_skab_eval_replays_each_file_through_a_fresh_agent(data_dir) -> None:
    """`edgekit eval skab` on 8 valve1 files (1 epoch): the shipped recipe trained per fold without the files it
    scores, exported signed and INT8, each file replayed through a fresh Agent whose first windows (inside the 400
    fit rows) are its commissioning; one decision per test row."""
    pytest.importorskip("torch")
    from edgekit import datasets
    from edgekit.exporters.evaluation.skab import FIT_ROWS, SkabEval, evaluate_skab, table

    files = datasets.skab_files("valve1")[:8]
    names = tuple(f"valve1/{p.name}" for p in files)
    result = evaluate_skab(progress=False, config=SkabEval(files=names, epochs=1))
    rows = result["rows"]
    assert result["n_files"] == 8 and result["n_held_out_files"] == 4
    assert len(rows["y"]) == sum(len(datasets.read_skab(p).values) - FIT_ROWS for p in files)
    # row 400 still waits for the first answered window (ending at row 401): one row per file
    assert result["rows_by_state"]["commissioning or none"] == 8
    assert len(result["bundles"]) == 2 and all(set(b) == {"predictor", "gate", "second_opinion"}
                                                for b in result["bundles"])
    text = table(result)
    assert "the agent, shipped recipe (ours)" in text and "Conv-AE" in text and "target F1" in text


@pytest.mark.data
@pytest.mark.torch
def test_fall_eval_fits_the_recipes_models(data_dir) -> None:
    pytest.importorskip("torch")
    from edgekit.exporters.evaluation.fall_screening import (
        FallDesign,
        _fit_mlp,
        _fit_predict,
        fall_recipe,
        load_fall,
    )

    _, recipe = fall_recipe(FallDesign())
    x, y = load_fall()
    model = _fit_mlp(x, y, recipe, seed=0)
    widths = [m.out_features for m in model.body if hasattr(m, "out_features")]
    assert widths == [*recipe.predictor.hidden, 2]
    assert {m.p for m in model.body if hasattr(m, "p")} == {recipe.predictor.dropout}
    prob = _fit_predict("second", x, y, x[:5], recipe, seed=0)
    assert prob.shape == (5,) and np.all((prob >= 0) & (prob <= 1))
