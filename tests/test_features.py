"""Feature extractors: names match columns, finite on flat and real data, identical on edge and server."""

from __future__ import annotations

import numpy as np
import pytest
from reference_features import REFERENCE

from edgekit.datasets import FALL_FEATURES, IPOL_CHANNELS, ipol_files, read_ipol, read_skab, skab_files
from edgekit.errors import ConfigError
from edgekit.features import (
    EXTRACTORS,
    TUG_FEATURES,
    butter_lowpass,
    extract,
    feature_names,
    tug_frequency_features,
    window_features,
)
from edgekit.window import Windower, sliding_windows

CHANNELS = {"machine": ["a", "b", "c"], "gait": list(IPOL_CHANNELS)}


def named(kind: str, row: np.ndarray, channels: list[str]) -> dict[str, float]:
    return dict(zip(feature_names(kind, channels), row.tolist()))


@pytest.mark.parametrize("kind", sorted(EXTRACTORS))
def test_names_match_columns_and_constant_input_is_finite(kind: str) -> None:
    channels = CHANNELS[kind] if kind == "machine" else list(IPOL_CHANNELS)
    x = np.full((4, 64, len(channels)), 5.1)
    x[1] = 0.0
    out = extract(kind, x, 100.0)
    names = feature_names(kind, channels)
    assert out.shape == (4, len(names)) and out.dtype == np.float32
    assert len(set(names)) == len(names)
    assert extract(kind, np.zeros((0, 64, len(channels))), 100.0).shape == (0, len(names))  # no windows
    assert np.all(np.isfinite(out))
    row = named(kind, out[0], channels)
    ch = channels[0]
    assert row[f"{ch}.mean"] == pytest.approx(5.1) and row[f"{ch}.std"] == 0.0
    if kind == "machine":
        for stat in ("kurtosis", "skewness", "crest", "slope", "band_low"):
            assert row[f"{ch}.{stat}"] == 0.0


def test_machine_features_of_known_signals() -> None:
    rate = 50.0
    t = np.arange(500) / rate
    x = np.stack([np.sin(2 * np.pi * 2.0 * t), 3.0 + 0.5 * t, np.sin(2 * np.pi * 20.0 * t)], axis=1)
    row = named("machine", extract("machine", x[None], rate)[0], CHANNELS["machine"])
    assert row["a.rms"] == pytest.approx(np.sqrt(0.5), rel=1e-4)
    assert row["a.crest"] == pytest.approx(np.sqrt(2), rel=5e-3)
    assert row["a.kurtosis"] == pytest.approx(-1.5, abs=1e-3)  # excess kurtosis of a sine
    assert row["a.band_low"] > 0.99  # 2 Hz in 0..8.3 Hz
    assert row["b.slope"] == pytest.approx(0.5, rel=1e-5)  # units per second
    assert row["b.ptp"] == pytest.approx(0.5 * t[-1], rel=1e-5)
    assert row["c.band_high"] > 0.99  # 20 Hz in 16.7..25 Hz


def test_gait_dominant_frequency_and_yaw_angle() -> None:
    rate = 100.0
    t = np.arange(400) / rate  # 0.25 Hz bins: 1.75 Hz falls on a bin
    up = np.array([0.8, 0.0, 0.6])  # gravity along a tilted axis, as on a real lower back
    acc = (9.81 + 1.5 * np.sin(2 * np.pi * 1.75 * t))[:, None] * up
    gyr = np.full((400, 1), np.radians(45.0)) * up  # 45 deg/s about the vertical for 4 s = 180 deg
    row = named("gait", extract("gait", np.concatenate([acc, gyr], 1)[None], rate)[0], list(IPOL_CHANNELS))
    assert row["acc_mag.dom_freq_hz"] == pytest.approx(1.75)
    assert row["acc_mag.dom_power"] > 0.99
    assert row["acc_mag.step_band_rel"] > 0.99
    assert row["yaw.abs_angle_deg"] == pytest.approx(180.0, rel=1e-5)
    assert row["yaw.mean"] == pytest.approx(np.radians(45.0), rel=1e-5)


def test_unknown_kind_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="gait, machine"):
        extract("vibration", np.zeros((1, 8, 1)), 1.0)
    with pytest.raises(ConfigError, match="6 channels"):
        extract("gait", np.zeros((1, 8, 3)), 100.0)
    with pytest.raises(ValueError, match="rate_hz"):
        extract("machine", np.zeros((1, 8, 1)), 0.0)


@pytest.mark.data
@pytest.mark.parametrize("kind,size,hop", [("machine", 60, 10), ("gait", 256, 64)])
def test_edge_features_equal_server_features_bitwise(data_dir, kind: str, size: int, hop: int) -> None:
    table = read_skab(skab_files("valve2")[0]) if kind == "machine" else read_ipol(ipol_files()[5])
    server = extract(kind, sliding_windows(table.values, size, hop), table.rate_hz)
    windower = Windower(size, hop, len(table.channels))
    edge = np.stack([window_features(kind, w, table.channels, table.rate_hz).values
                     for w in windower.push_many(table.t_s, table.values)])
    assert server.shape == edge.shape and len(server) > 10
    assert np.all(np.isfinite(server))
    assert np.array_equal(server, edge)  # bitwise: the same numbers reach the model on both sides


def bits(a: np.ndarray) -> np.ndarray:
    """The float32 bit patterns: equal bits, not merely equal values (0.0 vs -0.0, NaN payloads)."""
    assert a.dtype == np.float32
    return np.ascontiguousarray(a).view(np.uint32)


def assert_same_as_reference(kind: str, windows: np.ndarray, rate_hz: float) -> None:
    """extract() on the batch and on each window alone equals the frozen pre-fast-path code, bit for bit."""
    want = REFERENCE[kind](windows, rate_hz)
    batch = extract(kind, windows, rate_hz)
    assert batch.shape == want.shape and batch.flags.c_contiguous
    assert np.array_equal(bits(batch), bits(want)), f"{kind} batch differs from the reference"
    for i in range(len(windows)):
        one = extract(kind, windows[i:i + 1], rate_hz)
        assert np.array_equal(bits(one), bits(want[i:i + 1])), f"{kind} window {i} differs from the reference"


@pytest.mark.data
@pytest.mark.parametrize("kind,size,hop", [("machine", 32, 4), ("machine", 60, 10), ("gait", 128, 64),
                                           ("gait", 256, 64)])
def test_features_pinned_to_the_reference_on_recorded_windows(data_dir, kind: str, size: int, hop: int) -> None:
    """The recipes' window sizes (skab 32/4, ipol_gait 128/64) and the server-edge test's, on real files."""
    if kind == "machine":
        tables = [read_skab(skab_files(part)[0]) for part in ("valve1", "valve2", "other")]
    else:
        tables = [read_ipol(path) for path in ipol_files()[:3]]
    for table in tables:
        windows = sliding_windows(table.values, size, hop)
        assert len(windows) > 10
        assert_same_as_reference(kind, windows, table.rate_hz)


@pytest.mark.parametrize("kind", sorted(REFERENCE))  # 'spectral' came later: tests/test_features_spectral.py
def test_features_pinned_to_the_reference_on_awkward_windows(kind: str) -> None:
    """Shapes and values that take other paths inside numpy: one channel (reductions become pairwise sums),
    odd and tiny sizes, flat and all-zero channels, a spike, huge and tiny scales, integer input."""
    rng = np.random.default_rng(7)
    shapes = [(5, 64, 6), (3, 33, 6), (2, 2, 6), (1, 127, 6), (4, 300, 6)]
    if kind == "machine":
        shapes += [(3, 64, 1), (2, 9, 1), (5, 17, 2), (1, 1000, 3), (2, 8, 8), (64, 32, 8)]
    for n, size, c in shapes:
        x = rng.normal(size=(n, size, c)) * rng.choice([1e-8, 1.0, 1e6], size=c) + rng.normal(size=c) * 10
        x[0, :, 0] = 3.3  # flat channel
        if n > 1:
            x[1] = 0.0  # silent window
            x[1, size // 2, c - 1] = 50.0  # one spike
        for rate in (1.0, 100.0, 7.3, 25, np.float32(7.3)):
            assert_same_as_reference(kind, x, rate)
    ints = rng.integers(-5, 5, size=(3, 40, 6))
    assert_same_as_reference(kind, ints, 50.0)


@pytest.mark.data
def test_gait_features_see_the_turn_on_real_data(data_dir) -> None:
    table = read_ipol(ipol_files()[0])
    a, b = table.meta["UTurnBoundaries"]
    centre = (a + b) // 2
    rows = extract("gait", np.stack([table.values[centre - 100:centre + 100],
                                     table.values[a - 400:a - 200]]), table.rate_hz)
    turn, walk = (named("gait", r, list(IPOL_CHANNELS)) for r in rows)
    assert turn["yaw.abs_angle_deg"] > 60 > walk["yaw.abs_angle_deg"]
    assert 1.2 < walk["acc_mag.dom_freq_hz"] < 2.5  # walking: one acceleration peak per step


def test_tug_features_of_a_known_spectrum() -> None:
    rate = 100.0
    t = np.arange(1000) / rate  # bin k is k * 0.1 Hz
    mag = 9.81 + 2.0 * np.sin(2 * np.pi * 1.0 * t) + 1.0 * np.sin(2 * np.pi * 2.5 * t)
    acc = np.stack([mag, np.zeros_like(mag), np.zeros_like(mag)], 1)
    f = tug_frequency_features(acc, rate)
    assert tuple(f) == TUG_FEATURES == FALL_FEATURES
    assert (f["pspf1"], f["pspf2"]) == (10.0, 25.0)
    assert f["wpsp"] == pytest.approx(9 * f["psp1"])
    assert f["psp1"] > f["psp2"] > f["psp3"]
    assert all(np.isfinite(v) for v in f.values())
    flat = tug_frequency_features(np.full((300, 3), 1.0), rate)  # only the filter's start-up transient
    assert all(np.isfinite(v) for v in flat.values())
    silent = tug_frequency_features(np.zeros((300, 3)), rate)
    assert silent["pse"] == 0.0 and silent["psp1"] == 0.0 and silent["cpt"] == 0.0
    with pytest.raises(ValueError, match="98 samples"):
        tug_frequency_features(np.ones((50, 3)), rate)


@pytest.mark.data
def test_tug_features_agree_with_the_studys_recursive_filter(data_dir) -> None:
    """Reference: the study's own steps (scipy butter + lfilter, then |FFT|^2) on a real IPOL trial."""
    signal = pytest.importorskip("scipy.signal")
    table = read_ipol(ipol_files()[0])
    acc = table.values[:, :3]
    ours = tug_frequency_features(acc, 100.0)
    b, a = signal.butter(3, 3.667 / 50.0, btype="low")
    mag = signal.lfilter(b, a, np.sqrt((acc * acc).sum(1)))
    s = np.abs(np.fft.fft(mag)) ** 2
    z = (s[1:50] - s[1:50].mean()) / s[1:50].std()
    p = (s[1:50] - s[1:50].min()) / (s[1:50].max() - s[1:50].min())
    w = s[:50] * (1 - np.arange(50) / 100)
    assert ours["pspf1"] == z.argmax() + 1
    assert ours["psp1"] == pytest.approx(z.max(), rel=1e-9)
    assert ours["pse"] == pytest.approx(-(p * np.log(1e-4 + p)).sum(), rel=1e-9)
    assert ours["cpt"] == pytest.approx((np.sum(w / w.max()) - 1) * 100, rel=1e-9)


def test_butter_lowpass_matches_scipy_lfilter() -> None:
    signal = pytest.importorskip("scipy.signal")
    x = np.random.default_rng(3).normal(size=2000) + 9.8
    for cutoff, order in [(3.667, 3), (10.0, 5), (1.0, 2)]:
        b, a = signal.butter(order, cutoff / 50.0)
        assert np.allclose(butter_lowpass(x, cutoff, 100.0, order), signal.lfilter(b, a, x), atol=1e-10)


@pytest.mark.data
def test_published_features_follow_the_definitions_used(data_dir) -> None:
    """The study's featuresAcc.npy obeys wpsp = (pspf1 - 1) * psp1 and psp1 >= psp2, psp3 (z-scores)."""
    rows = np.load(data_dir / "fall_screening" / "featuresAcc.npy", allow_pickle=True)[:, 1:10].astype(float)
    pse, psp1, psp2, psp3, pspf1, _, _, wpsp, cpt = rows.T
    assert np.allclose(wpsp, (pspf1 - 1) * psp1)
    assert np.all(psp1 >= psp2) and np.all(psp1 >= psp3)
    assert np.all((pspf1 >= 1) & (pspf1 <= 49))
    assert np.all(cpt > 0) and np.all(pse > 0)
