import numpy as np
import pytest

from edgekit.gate import Gate, OodAttribution


def test_each_reason_and_accept():
    g = Gate(ood_max_score=1.0, min_confidence=0.8, max_disagreement=0.3)
    sure = np.array([0.95, 0.05])
    d = g.decide(sure, sure, 0.5)
    assert d.action == "accept" and d.reasons == ()
    assert d.scores == pytest.approx({"confidence": 0.95, "ood": 0.5, "disagreement": 0.0})
    assert g.decide(sure, sure, 1.5).reasons == ("ood",)
    assert g.decide(sure, np.array([0.4, 0.6]), 0.5).reasons == ("disagreement",)
    d = g.decide(np.array([0.6, 0.4]), np.array([0.2, 0.8]), 2.0)
    assert d.action == "defer" and d.reasons == ("ood", "disagreement", "low_confidence")
    assert d.thresholds == {"ood_max_score": 1.0, "min_confidence": 0.8, "max_disagreement": 0.3}


def test_defer_all_and_disabled():
    sure = np.array([0.99, 0.01])
    assert Gate(1.0, 0.5, 0.5, defer_all=True).decide(sure, sure, 0.0).action == "defer"
    assert Gate(1.0, 0.5, 0.5, enabled=False).decide(np.array([0.5, 0.5]), sure, 9.0).action == "accept"


def test_non_finite_threshold_is_refused():
    with pytest.raises(ValueError, match="ood_max_score"):
        Gate(float("nan"), 0.5, 0.5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scores_defer_even_with_the_gate_disabled(bad):
    sure = np.array([0.95, 0.05])
    for enabled in (True, False):
        g = Gate(1.0, 0.5, 0.5, enabled=enabled)
        assert g.decide(sure, sure, bad).reasons[-1] == "non_finite"
        assert g.decide(np.array([bad, 0.05]), sure, 0.1).action == "defer"
        assert g.decide(sure, np.array([0.9, bad]), 0.1).action == "defer"
    assert Gate(1.0, 0.5, 0.5, enabled=False).refuse("implausible").reasons == ("implausible",)
    with pytest.raises(ValueError, match="refuse"):
        Gate(1.0, 0.5, 0.5).refuse("ood")


def test_agent_gate_and_export_calibration_accept_the_same_rows():
    """The agent decides with Gate.decide_many, export reports coverage with calibrate.accept_mask: one rule."""
    from edgekit.exporters.export.calibrate import accept_mask

    rng = np.random.default_rng(7)
    n = 5000
    probs = rng.dirichlet([1.0, 1.0, 1.0], size=n).astype(np.float32)
    second = rng.dirichlet([1.0, 1.0, 1.0], size=n).astype(np.float32)
    score = rng.exponential(1.0, size=n).astype(np.float32)
    # hostile rows: NaN and inf in every input, and scores exactly on the thresholds
    probs[:20, 0] = np.nan
    second[20:40, 1] = np.inf
    score[40:60] = np.nan
    score[60:80] = 1.5
    probs[80:100] = np.array([0.6, 0.3, 0.1], dtype=np.float32)
    th = {"ood_max_score": 1.5, "min_confidence": float(np.float32(0.6)), "max_disagreement": 0.4,
          "defer_all": False}
    agent_accepts = np.array([d.action == "accept" for d in Gate.from_thresholds(th).decide_many(probs, second, score)])
    np.testing.assert_array_equal(agent_accepts, accept_mask(probs, second, score, th))
    assert not agent_accepts[:60].any()  # every non-finite row is deferred
    assert 0.1 < agent_accepts.mean() < 0.9  # the rule is not trivially all-or-nothing here
    one_by_one = [Gate.from_thresholds(th).decide(probs[i], second[i], float(score[i])).action == "accept"
                  for i in range(200)]
    np.testing.assert_array_equal(one_by_one, agent_accepts[:200])
    assert not accept_mask(probs, second, score, {**th, "defer_all": True}).any()


def test_one_window_decides_as_the_batch_does_bit_for_bit():
    """Gate.decide (the paced, window-at-a-time path of EdgePipeline) and Gate.decide_many share Gate.rule:
    the same reasons and the same scores for every row, NaN and inf included, and on thresholds that float32
    cannot hold, with scores on either side of them (the batch compares float32 arrays in float32)."""
    rng = np.random.default_rng(11)
    n = 3000
    probs = rng.dirichlet([1.0, 1.0], size=n).astype(np.float32)
    second = rng.dirichlet([1.0, 1.0], size=n).astype(np.float32)
    th = {"ood_max_score": 1.3000000001, "min_confidence": 0.7, "max_disagreement": 0.2, "defer_all": False}
    score = rng.exponential(1.0, size=n).astype(np.float32)
    edge = np.float32(th["ood_max_score"])
    score[:30] = [np.nextafter(edge, np.float32(d)) for d in (-np.inf, np.inf, 0)] * 10
    probs[30:60] = np.array([np.float32(0.7), 1 - np.float32(0.7)], dtype=np.float32)
    probs[60:70, 1] = np.nan
    second[70:80, 0] = -np.inf
    score[80:90] = np.inf
    for gate in (Gate.from_thresholds(th), Gate.from_thresholds({**th, "defer_all": True}),
                 Gate.from_thresholds(th, enabled=False)):
        batch = gate.decide_many(probs, second, score)
        one = [gate.decide(probs[i], second[i], score[i]) for i in range(n)]
        assert list(map(repr, one)) == list(map(repr, batch))  # repr: NaN scores compare equal
        assert gate.decide(probs[0], None, None) == gate.decide_many(probs[:1], None, None)[0]
    assert {r for d in batch for r in d.reasons} == {"non_finite"}  # disabled: only non_finite remains


def test_envelope_reasons_stand_where_the_rule_says_envelope():
    """A window outside the input envelope is deferred whatever the models say, its reasons naming what left
    the envelope first; the batch and the lone window agree; a disabled gate turns the envelope off."""
    g = Gate(ood_max_score=1.0, min_confidence=0.8, max_disagreement=0.3)
    sure = np.array([0.95, 0.05])
    named = ("stuck:Flow", "feature_range:Pressure.std")
    d = g.decide(sure, sure, 0.5, named)
    assert d.action == "defer" and d.reasons == named
    assert g.decide(sure, sure, 1.5, named).reasons == (*named, "ood")
    assert g.decide(sure, sure, 0.5, ()).action == "accept"
    probs = np.array([sure, sure, [0.6, 0.4]])
    batch = g.decide_many(probs, probs, np.array([0.5, 2.0, 0.5]), [named, (), ("out_of_range:T",)])
    assert [b.reasons for b in batch] == [named, ("ood",), ("out_of_range:T", "low_confidence")]
    assert batch == [g.decide(probs[i], probs[i], s, e)
                     for i, (s, e) in enumerate(zip([0.5, 2.0, 0.5], [named, (), ("out_of_range:T",)]))]
    off = Gate(1.0, 0.8, 0.3, enabled=False)
    assert off.decide(sure, sure, 0.5, named).action == "accept"
    assert off.refuse("implausible", named).reasons == ("implausible",)
    assert g.refuse("implausible", ("out_of_range:T",)).reasons == ("implausible", "out_of_range:T")
    v = g.verdicts(probs, probs, np.array([0.5, 0.5, 0.5]), np.array([True, False, False]))
    np.testing.assert_array_equal(v.accept, [False, True, False])


def test_calibration_never_accepts_a_row_the_envelope_defers():
    from edgekit.exporters.export.calibrate import accept_mask, calibrate_gate

    rng = np.random.default_rng(5)
    n = 4000
    y = rng.integers(0, 2, size=n)
    probs = np.where(rng.random((n, 1)) < 0.9, np.eye(2)[y], np.eye(2)[1 - y]) * 0.9 + 0.05
    split = {"probs": probs, "second": probs, "score": rng.exponential(0.1, size=n), "y": y}
    outside = rng.random(n) < 0.2
    out = calibrate_gate(split, split, normal_index=0, target_error=0.2, delta=0.1,
                         outside={"cal": outside, "test": outside})
    accepted = accept_mask(probs, probs, split["score"], out["thresholds"], outside)
    assert not accepted[outside].any() and accepted[~outside].mean() > 0.5
    assert out["calibration"]["cal_accepted"] == accepted.sum()


def test_ood_attribution_shares_by_channel_and_derived_feature():
    att = OodAttribution.for_features(["a.mean", "a.std", "b.mean", "mag"], ["a", "b"], top=2)
    assert att.names == ("a", "b", "mag")
    errors = np.array([[1.0, 2.0, 6.0, 1.0], [0.0, 0.0, 0.0, 0.0], [5.0, 0.0, 1.0, 4.0], [np.nan, 1, 1, 1]])
    assert att(errors) == [{"b": 0.6, "a": 0.3}, {}, {"a": 0.5, "mag": 0.4}, {}]
