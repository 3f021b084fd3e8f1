"""Relations between channels (issue 14, edgekit/plausible.py ChannelRelations): fitted at export on training
windows (exporters/export/export.py input_relations), they defer and name the channel of a 10x gain or a swap
that keeps every channel inside its own range, and leave held-out clean windows alone. Synthetic channels
shaped like SKAB's: two accelerometers that read in a ratio of 0.6-0.95 (a gain on either lands inside the
other's range), a current that follows the load, and a channel of its own."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnx", reason="export (the train extra) fits the relations")

from edgekit.exporters.export.export import input_relations  # noqa: E402
from edgekit.manifest import InputEnvelope, RelationEnvelope  # noqa: E402
from edgekit.plausible import ChannelRelations, EnvelopeCheck, relation_stats  # noqa: E402

CHANNELS = ("acc1", "acc2", "current", "temp")


def windows(n: int, seed: int, size: int = 8) -> np.ndarray:
    """(n, size, 4) windows: a load between idle (0.03) and running (0.6) drives both accelerometers and the
    current; the temperature wanders on its own."""
    rng = np.random.default_rng(seed)
    load = np.exp(rng.uniform(np.log(0.03), np.log(0.6), size=(n, 1)))
    ratio = rng.uniform(0.62, 0.93, size=(n, 1))
    acc2 = load * (1 + 0.05 * rng.standard_normal((n, size)))
    acc1 = ratio * load * (1 + 0.05 * rng.standard_normal((n, size)))
    current = 1.0 + 3.0 * load + 0.02 * rng.standard_normal((n, size))
    temp = rng.uniform(60, 90, size=(n, 1)) + 0.1 * rng.standard_normal((n, size))
    return np.stack([acc1, acc2, current, temp], axis=2)


def extremes(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return data.min(axis=1), data.max(axis=1)


@pytest.fixture(scope="module")
def relations() -> ChannelRelations:
    fitted = input_relations(extremes(windows(4000, 0)), extremes(windows(1000, 1)))
    assert fitted is not None
    return ChannelRelations.from_envelope(CHANNELS, RelationEnvelope.model_validate(fitted))


def test_relations_are_fitted_on_the_statistics_the_agent_computes(relations: ChannelRelations) -> None:
    assert relations.log_level.tolist() == [True, True, True, True]  # every channel's windows stay above 0
    lo, hi = extremes(windows(4000, 0))
    z = (relation_stats(lo, hi, relations.log_level, relations.level_floor, relations.spread_floor)
         - relations.mean) / relations.std
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-9)
    np.testing.assert_allclose(z.std(axis=0), 1.0, atol=1e-9)
    assert relations.weights.shape == (5, 4, 2, 9)
    for e in range(4):  # set e + 1 leaves channel e out: no weight on its two statistics
        assert not relations.weights[e + 1][:, :, [e, 4 + e]].any()
    for k in range(4):  # no channel predicts itself
        assert not relations.weights[:, k][:, :, [k, 4 + k]].any()


def test_clean_held_out_windows_keep_the_relations(relations: ChannelRelations) -> None:
    lo, hi = extremes(windows(2000, 2))
    assert relations.outside(lo, hi).mean() < 0.01


@pytest.mark.parametrize("fault,channel,named", [
    ("gain", 0, {"acc1"}), ("gain", 1, {"acc2"}), ("swap", 0, {"acc1", "acc2"})])
def test_a_gain_or_a_swap_inside_every_range_is_deferred_and_named(relations: ChannelRelations, fault: str,
                                                                   channel: int, named: set[str]) -> None:
    data = windows(2000, 3)
    idle = data[:, :, 1].mean(axis=1) < 0.06  # at idle, 10x acc1 is an ordinary running level of acc1
    if fault == "gain":
        data[:, :, channel] *= 10.0
    else:
        data[:, :, [0, 1]] = data[:, :, [1, 0]]
    lo, hi = extremes(data)
    out = relations.outside(lo, hi)
    names = relations.name(lo, hi)
    right = np.array([e is not None and CHANNELS[e] in named for e in names])
    assert out.mean() > 0.97 and (out & right).mean() > 0.95, (out.mean(), (out & right).mean())
    if fault == "gain" and channel == 0:
        train_hi = extremes(windows(4000, 0))[1][:, 0].max()
        assert (hi[idle, 0] < train_hi).mean() > 0.9  # inside acc1's own range, yet named
        assert (out & right)[idle].mean() > 0.95


def test_the_envelope_names_a_relation_last_and_alike_in_any_batch(relations: ChannelRelations) -> None:
    data = windows(300, 4)
    data[::3, :, 0] *= 10.0
    lo, hi = extremes(data)
    env = EnvelopeCheck(CHANNELS, (), np.full(4, -100.0), np.full(4, 100.0), np.zeros(4), relations=relations)
    batch = env.reasons(lo, hi, None)
    assert batch == [env.reasons(lo[i:i + 1], hi[i:i + 1], None)[0] for i in range(300)]
    assert sum(r == ("relation:acc1",) for r in batch[::3]) >= 0.95 * 100
    np.testing.assert_array_equal(env.outside(lo, hi, None), [bool(r) for r in batch])
    # out of range first: a relation of a channel named already adds nothing
    tight = EnvelopeCheck(CHANNELS, (), np.full(4, -100.0), np.array([0.5, 100, 100, 100]), np.zeros(4),
                          relations=relations)
    over = np.flatnonzero(hi[:, 0] > 0.5)
    assert len(over) > 30
    for r in tight.reasons(lo[over], hi[over], None):
        assert r[0] == "out_of_range:acc1" and "relation:acc1" not in r, r


def test_too_few_channels_or_windows_fit_no_relations() -> None:
    lo, hi = extremes(windows(4000, 0))
    assert input_relations((lo[:, :1], hi[:, :1]), None) is None
    assert input_relations((lo[:20], hi[:20]), None) is None


def test_the_manifest_refuses_relations_of_the_wrong_shape(relations: ChannelRelations) -> None:
    fitted = input_relations(extremes(windows(4000, 0)), None)
    assert fitted is not None
    RelationEnvelope.model_validate(fitted)
    bad = {**fitted, "weights": [w[:-1] for w in fitted["weights"]]}
    with pytest.raises(ValueError, match=r"relations.weights must be 5 x 4 x 2 x 9 for 4 channels"):
        RelationEnvelope.model_validate(bad)
    with pytest.raises(ValueError, match=r"relations.std and relations.spread_floor must be > 0"):
        RelationEnvelope.model_validate({**fitted, "std": [0.0] * 8})
    env = InputEnvelope.model_validate({"channels": None, "features": None, "basis": "x"})
    assert "relations" not in env.model_dump()  # absent, not null: older bundles keep their bytes


def test_export_sets_a_still_run_for_a_channel_flat_now_and_then() -> None:
    """Channel 0 always moves (stuck in one window below its floor); channel 1 is flat in some windows (a
    quantised reading), at most 3 in a row within a recording (4 across the two recordings' boundary, which
    does not count): still below 0.1 x its quietest moving window, stuck after 2 x 3 + 1 windows."""
    from edgekit.exporters.export.export import _stuck_runs

    spread = np.array([[1.0, 0.5], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.2],
                       [1.0, 0.0], [1.0, 0.0], [1.0, 0.3], [1.0, 0.0], [1.0, 0.0]])
    lo = np.zeros_like(spread)
    groups = np.array(["a"] * 6 + ["b"] * 4)
    below, after = _stuck_runs(np.array([0.1, 0.0]), (lo, spread, groups), None)
    np.testing.assert_allclose(below, [0.1, 0.1 * 0.2], rtol=0.01)  # the 0.001 quantile of 0.2, 0.3, 0.5
    assert after.tolist() == [1, 7]
    # the calibration windows' runs count too, and their quietest moving window
    cal = (np.zeros((5, 2)), np.array([[1.0, 0.1], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]), None)
    below, after = _stuck_runs(np.array([0.1, 0.0]), (lo, spread, groups), cal)
    np.testing.assert_allclose(below, [0.1, 0.1 * 0.1])
    assert after.tolist() == [1, 9]
    # a channel that never moved is never stuck
    below, after = _stuck_runs(np.array([0.1, 0.0]), (lo, spread * [1, 0], None), None)
    assert below.tolist() == [0.1, 0.0] and after.tolist() == [1, 1]
