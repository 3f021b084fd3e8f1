"""The plausibility check before the models: what it refuses and how it names the channel or feature."""

from __future__ import annotations

import numpy as np

from edgekit.plausible import Plausibility


def test_windows_outside_the_range_or_not_finite_are_named():
    p = Plausibility(("a", "b"), np.array([-1.0, 0.0]), np.array([1.0, 10.0]))
    data = np.zeros((4, 5, 2))
    data[1, 2, 1] = 4e300
    data[2, 0, 0] = -1.5
    data[3, 4, 1] = np.nan
    why = p.windows(data)
    assert why[0] is None
    assert why[1] == "channel 'b' = 4e+300, outside the plausible range [0, 10] recorded in the bundle"
    assert why[2] == "channel 'a' = -1.5, outside the plausible range [-1, 1] recorded in the bundle"
    assert why[3] == "channel 'b' is not finite (got nan)"
    edges = np.array([[[-1.0, 0.0], [1.0, 10.0]]])  # the range's own ends are plausible
    assert p.windows(edges) == [None]


def test_without_a_range_only_finiteness_is_checked():
    p = Plausibility(("a",), None, None)
    data = np.array([[[1e300]], [[np.inf]]])
    assert p.windows(data) == [None, "channel 'a' is not finite (got inf)"]


def test_features_past_float32_are_refused_by_name():
    raw = np.array([[1.0, 1e39], [2.0, 3.0]])
    with np.errstate(over="ignore"):
        normalised = raw.astype(np.float32)  # 1e39 -> inf in float32
    assert Plausibility.features(normalised, raw, ["mean", "energy"]) == [
        "feature 'energy' is not finite for the model (raw value 1e+39)", None]
