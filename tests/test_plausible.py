"""The plausibility check before the models: what it refuses and how it names the channel or feature."""

from __future__ import annotations

import numpy as np

from edgekit.plausible import MAX_NAMED, NAME_MAX, EnvelopeCheck, Plausibility, StillRuns


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


# --- the input envelope (issue 14) --------------------------------------------------------------------

CHANNELS = ("a", "b", "c")
FEATURES = ("a.mean", "b.mean", "c.std", "mag")


def envelope() -> EnvelopeCheck:
    """Channels a, b, c in [0, 10] (c in [0, 1]); a and c stuck below a spread of 0.1, b never (it was flat in
    training); features in [0, 1]."""
    return EnvelopeCheck(CHANNELS, FEATURES, np.array([0.0, 0.0, 0.0]), np.array([10.0, 10.0, 1.0]),
                         np.array([0.1, 0.0, 0.1]), np.zeros(4), np.ones(4))


def extremes(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return data.min(axis=1), data.max(axis=1)


def test_envelope_names_stuck_and_out_of_range_channels_and_features():
    env = envelope()
    rng = np.random.default_rng(0)
    data = np.empty((6, 8, 3))
    data[:] = rng.uniform(0.2, 0.8, size=data.shape)  # every channel moves, inside its range
    raw = np.full((6, 4), 0.5)
    data[1, :, 0] = 0.5  # a stuck (flat)
    data[1, :, 1] = 0.5  # b flat too, but b was flat in training: never stuck
    data[2, 3, 1] = 25.0  # b far above (1.5 widths)
    data[2, 4, 2] = -0.2  # c a little below (0.2 widths)
    raw[3] = [3.0, 0.5, 0.5, -1.0]  # a.mean 2 widths out, mag 1 width out
    data[4, :, 0] = 0.5  # a stuck, a.mean out (left out: a is named), mag out
    raw[4] = [3.0, 0.5, 0.5, 1.5]
    data[5, :, 0] = np.nan  # NaN fails every comparison: outside
    lo, hi = extremes(data)
    assert env.reasons(lo, hi, raw) == [
        (), ("stuck:a",), ("out_of_range:b", "out_of_range:c"), ("feature_range:a.mean", "feature_range:mag"),
        ("stuck:a", "feature_range:mag"), ("out_of_range:a",)]
    np.testing.assert_array_equal(env.outside(lo, hi, raw), [False, True, True, True, True, True])
    edges = np.array([[[0.0, 0.0, 0.0], [10.0, 10.0, 1.0]]])  # the bounds themselves are inside
    assert env.reasons(*extremes(edges), np.array([[0.0, 1.0, 0.0, 1.0]])) == [()]


def test_envelope_names_at_most_three_and_each_fits_the_contract():
    env = EnvelopeCheck(("x,1", "y" * 200), ("x,1.mean", "f2", "f3", "f4"), np.zeros(2), np.ones(2), np.zeros(2),
                        np.zeros(4), np.ones(4))
    lo, hi = np.array([[2.0, 2.0]]), np.array([[3.0, 3.0]])
    named = env.reasons(lo, hi, np.full((1, 4), 5.0))[0]
    assert len(named) == MAX_NAMED
    assert named[0] == "out_of_range:x 1" and named[1].startswith("out_of_range:yyy") and len(named[1]) == NAME_MAX
    assert named[2] == "feature_range:f2"  # x,1.mean is x,1's: named already
    assert all("," not in r for r in named)


def test_envelope_on_a_batch_is_the_envelope_on_each_window_bit_for_bit():
    env = envelope()
    rng = np.random.default_rng(3)
    data = rng.uniform(0.0, 1.0, size=(500, 8, 3)) * rng.choice([1.0, 1.05], size=(500, 1, 3))
    data[rng.random(500) < 0.3, :, 0] = 0.5  # stuck a
    data[rng.random(500) < 0.1, 2, 2] = np.nan
    raw = rng.normal(0.5, 0.2, size=(500, 4))
    lo, hi = extremes(data)
    batch = env.reasons(lo, hi, raw)
    one = [env.reasons(lo[i:i + 1], hi[i:i + 1], raw[i:i + 1])[0] for i in range(500)]
    assert batch == one
    assert 0 < sum(map(bool, batch)) < 500
    np.testing.assert_array_equal(env.outside(lo, hi, raw), [bool(r) for r in batch])
    # channels only (no feature envelope), and features only
    no_features = EnvelopeCheck(CHANNELS, FEATURES, env.low, env.high, env.stuck_below)
    assert no_features.reasons(lo, hi, None) == [tuple(r for r in b if not r.startswith("feature_range"))
                                                  for b in no_features.reasons(lo, hi, raw)]
    only_features = EnvelopeCheck(CHANNELS, FEATURES, f_low=env.f_low, f_high=env.f_high)
    assert not only_features.checks_channels
    assert only_features.reasons(None, None, raw) == [
        only_features.reasons(None, None, raw[i:i + 1])[0] for i in range(500)]


def test_still_runs_count_across_batches_as_in_one():
    rng = np.random.default_rng(5)
    still = rng.random((200, 3)) < np.array([0.1, 0.7, 1.0])
    whole = StillRuns(3).update(still)
    runs = StillRuns(3)
    parts = [runs.update(still[a:a + k]) for a, k in ((0, 1), (1, 7), (8, 0), (8, 100), (108, 92))]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    for c in range(3):  # by hand: the still windows in a row up to each one
        run, want = 0, []
        for v in still[:, c]:
            run = run + 1 if v else 0
            want.append(run)
        np.testing.assert_array_equal(whole[:, c], want)
    runs.reset()
    np.testing.assert_array_equal(runs.update(np.ones((2, 3), dtype=bool)), [[1, 1, 1], [2, 2, 2]])


def test_a_channel_flat_now_and_then_is_stuck_only_after_a_longer_run():
    """b is still below 0.1 now and then in training (stuck_after 4: more than twice its longest still run);
    a is stuck in one still window, as before."""
    env = EnvelopeCheck(CHANNELS, FEATURES, np.zeros(3), np.array([10.0, 10.0, 1.0]), np.array([0.1, 0.1, 0.0]),
                        stuck_after=np.array([1, 4, 1]))
    assert env.counts_runs
    data = np.random.default_rng(1).uniform(0.2, 0.8, size=(8, 8, 3))
    data[1:7, :, 1] = 0.5  # b flat for 6 windows
    data[2, :, 0] = 0.5  # a flat once
    lo, hi = extremes(data)
    runs = StillRuns(3)
    got = [env.reasons(lo[i:i + 1], hi[i:i + 1], None, runs.update(env.still(lo[i:i + 1], hi[i:i + 1])))[0]
           for i in range(8)]
    assert got == [(), (), ("stuck:a",), (), ("stuck:b",), ("stuck:b",), ("stuck:b",), ()]
    all_runs = StillRuns(3).update(env.still(lo, hi))
    assert env.reasons(lo, hi, None, all_runs) == got
    np.testing.assert_array_equal(env.outside(lo, hi, None, all_runs), [bool(r) for r in got])
    # without runs (export calibration: a split is not one stream) b is never stuck, a still is
    assert env.reasons(lo, hi, None) == [("stuck:a",) if i == 2 else () for i in range(8)]
