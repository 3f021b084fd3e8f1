import numpy as np
import pytest

from edgekit.gate import Gate


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
