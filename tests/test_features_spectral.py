"""The 'spectral' extractor (issue 12): band powers in Hz, the envelope spectrum, time and spectral statistics,
checked against independent computations (scipy's periodogram, Hilbert transform and moments) and known
signals; one window alone gives the same bits as in any batch."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.errors import ConfigError
from edgekit.features import EXTRACTORS, extract, extractor, feature_names, window_features
from edgekit.manifest import TIME_STATS, FeatureParams, band_bins
from edgekit.values import Window

signal = pytest.importorskip("scipy.signal")
stats = pytest.importorskip("scipy.stats")

RATE = 1000.0
BANDS = ((0.0, 100.0), (100.0, 200.0), (200.0, 350.0), (350.0, 500.0), (120.0, 180.0))


def named(params: FeatureParams | None, row: np.ndarray, channels: list[str]) -> dict[str, float]:
    return dict(zip(feature_names("spectral", channels, params), row.tolist()))


def periodogram_bands(x: np.ndarray, rate: float, bands: tuple[tuple[float, float], ...]) -> np.ndarray:
    """Band powers of a 1-D signal the textbook way: scipy's Hann periodogram (mean removed, one-sided
    density) times the bin width, summed over the bins lo <= f < hi (Nyquist kept by a band ending there)."""
    f, pxx = signal.periodogram(x, fs=rate, window="hann", detrend="constant", scaling="density")
    df = rate / len(x)
    out = []
    for lo, hi in bands:
        sel = (f >= lo) & ((f < hi) | (hi >= rate / 2)) & (f > 0)
        out.append(pxx[sel].sum() * df)
    return np.array(out)


def test_names_follow_params_and_default_is_registered() -> None:
    params = FeatureParams(time=("rms", "kurtosis"), bands_hz=((10, 100), (12.5, 25)), spectral=("dominant_hz",),
                           envelope={"carrier_hz": (200, 400), "bands_hz": ((5, 15),)})
    assert feature_names("spectral", ["Accel_X", "Accel_Y"], params) == [
        "Accel_X.rms", "Accel_X.kurtosis", "Accel_X.band_10_100Hz", "Accel_X.band_12.5_25Hz",
        "Accel_X.dominant_hz", "Accel_X.env_band_5_15Hz",
        "Accel_Y.rms", "Accel_Y.kurtosis", "Accel_Y.band_10_100Hz", "Accel_Y.band_12.5_25Hz",
        "Accel_Y.dominant_hz", "Accel_Y.env_band_5_15Hz"]
    x = np.random.default_rng(0).normal(size=(4, 500, 2))
    assert extract("spectral", x, RATE, params).shape == (4, 12)
    assert extract("spectral", np.zeros((0, 500, 2)), RATE, params).shape == (0, 12)
    # No params: the defaults (every time and spectral statistic, no bands), the registered instance.
    default = feature_names("spectral", ["a"])
    assert default == [f"a.{s}" for s in (*TIME_STATS, "centroid_hz", "spread_hz", "entropy", "dominant_hz")]
    assert extractor("spectral") is EXTRACTORS["spectral"]
    assert np.array_equal(extract("spectral", x, RATE), extract("spectral", x, RATE, FeatureParams()))
    # A dict is validated into FeatureParams: the same extractor.
    assert extractor("spectral", params.model_dump()) is extractor("spectral", params)


def test_a_sine_lands_its_power_in_its_band() -> None:
    t = np.arange(1000) / RATE
    x = np.stack([2.0 * np.sin(2 * np.pi * 150.0 * t),  # on a bin: power A^2 / 2 = 2 unit^2
                  2.0 * np.sin(2 * np.pi * 151.37 * t + 0.3),  # between bins: Hann leaks a little
                  2.0 * np.sin(2 * np.pi * 500.0 * t + 0.5)], axis=1)  # at Nyquist
    power = named(FeatureParams(bands_hz=BANDS), extract("spectral", x[None], RATE, FeatureParams(bands_hz=BANDS))[0],
                  ["a", "b", "c"])
    assert power["a.band_100_200Hz"] == pytest.approx(2.0, rel=1e-6)
    assert power["a.band_120_180Hz"] == pytest.approx(2.0, rel=1e-6)  # bands may overlap
    for other in ("0_100", "200_350", "350_500"):
        assert power[f"a.band_{other}Hz"] < 1e-12
    assert power["b.band_100_200Hz"] == pytest.approx(2.0, rel=2e-3)
    assert power["b.band_100_200Hz"] > 1e4 * power["b.band_200_350Hz"]
    assert power["c.band_350_500Hz"] > 0.9  # the band ending at Nyquist holds the Nyquist bin
    assert power["c.dominant_hz"] == 500.0
    assert power["a.centroid_hz"] == pytest.approx(150.0, rel=1e-9)
    assert power["a.dominant_hz"] == 150.0
    assert power["a.spread_hz"] == pytest.approx(1.0 / np.sqrt(3.0), rel=1e-5)  # Hann lobe 1/4, 1, 1/4 at 1 Hz bins
    rms = FeatureParams(bands_hz=BANDS, band_value="rms")
    share = FeatureParams(bands_hz=BANDS, band_value="share")
    assert named(rms, extract("spectral", x[None], RATE, rms)[0], ["a", "b", "c"])["a.band_100_200Hz"] == \
        pytest.approx(np.sqrt(2.0), rel=1e-6)
    assert named(share, extract("spectral", x[None], RATE, share)[0], ["a", "b", "c"])["a.band_100_200Hz"] == \
        pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("size", [1000, 999, 256, 37])
def test_band_powers_equal_scipys_periodogram(size: int) -> None:
    rng = np.random.default_rng(size)
    x = rng.normal(size=(3, size, 2)) * [1.0, 30.0] + [5.0, -2.0]
    x[1, :, 1] += np.sin(2 * np.pi * 220.0 * np.arange(size) / RATE) * 50.0
    params = FeatureParams(bands_hz=BANDS, time=(), spectral=())
    got = extract("spectral", x, RATE, params).reshape(3, 2, len(BANDS))
    for i in range(3):
        for c in range(2):
            assert np.allclose(got[i, c], periodogram_bands(x[i, :, c], RATE, BANDS), rtol=1e-6, atol=0)
    # 'share' is power over all AC power (every bin but DC)
    share = extract("spectral", x, RATE, params.model_copy(update={"band_value": "share"})).reshape(3, 2, -1)
    total = periodogram_bands(x[0, :, 0], RATE, ((0.0, RATE / 2),))[0]
    assert np.allclose(share[0, 0], periodogram_bands(x[0, :, 0], RATE, BANDS) / total, rtol=1e-6)


def test_spectral_statistics_equal_the_periodograms() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 800, 1))
    x[1, :, 0] = np.sin(2 * np.pi * 100.0 * np.arange(800) / RATE) + 0.1 * x[1, :, 0]
    params = FeatureParams(time=(), spectral=("centroid_hz", "spread_hz", "entropy", "dominant_hz"))
    got = extract("spectral", x, RATE, params)
    for i in range(2):
        f, pxx = signal.periodogram(x[i, :, 0], fs=RATE, window="hann", detrend="constant", scaling="density")
        f, pxx = f[1:], pxx[1:]
        p = pxx / pxx.sum()
        centroid = (f * p).sum()
        want = [centroid, np.sqrt((((f - centroid) ** 2) * p).sum()), -(p * np.log(p)).sum() / np.log(len(p)),
                f[pxx.argmax()]]
        assert np.allclose(got[i], want, rtol=1e-5)
    assert got[0, 2] > 0.9 > 0.5 > got[1, 2]  # white noise is spread out, a tone is not


def test_time_statistics_equal_scipys_moments() -> None:
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.gamma(2.0, size=(4, 300, 1)) + 10.0, rng.standard_t(5, size=(4, 300, 1))], axis=2)
    params = FeatureParams(spectral=())
    row = extract("spectral", x, RATE, params).reshape(4, 2, len(TIME_STATS))
    for i in range(4):
        for c in range(2):
            s = x[i, :, c]
            got = dict(zip(TIME_STATS, row[i, c].tolist()))
            dev = np.abs(s - s.mean()).max()
            want = {"mean": s.mean(), "std": s.std(), "rms": np.sqrt((s * s).mean()), "peak": dev,
                    "ptp": np.ptp(s), "crest": dev / s.std(), "kurtosis": stats.kurtosis(s),
                    "skewness": stats.skew(s)}
            assert got == pytest.approx(want, rel=1e-5)
    t = np.arange(1000) / RATE
    known = np.stack([np.sin(2 * np.pi * 50.0 * t), np.sign(np.sin(2 * np.pi * 50.0 * t + 0.1))], axis=1)
    k = named(params, extract("spectral", known[None], RATE, params)[0], ["sine", "square"])
    assert k["sine.kurtosis"] == pytest.approx(-1.5, abs=1e-9)  # excess kurtosis of a sine
    assert k["square.kurtosis"] == pytest.approx(-2.0, abs=1e-9)  # of a +-1 square wave
    assert k["sine.crest"] == pytest.approx(np.sqrt(2), rel=1e-6) and k["square.crest"] == pytest.approx(1.0)


def am(t: np.ndarray, carrier_hz: float, mod_hz: float, depth: float) -> np.ndarray:
    return (1.0 + depth * np.cos(2 * np.pi * mod_hz * t)) * np.sin(2 * np.pi * carrier_hz * t)


ENV = FeatureParams(time=(), spectral=(), envelope={"carrier_hz": (250, 450), "bands_hz": ((5, 15), (15, 25), (35, 45))})


def test_envelope_of_an_am_carrier_shows_the_modulation() -> None:
    t = np.arange(2000) / RATE  # 0.5 Hz bins
    x = np.stack([am(t, 350.0, 10.0, 0.5), am(t, 350.0, 40.0, 0.8), np.sin(2 * np.pi * 350.0 * t)], axis=1)
    x += 0.5 * np.sin(2 * np.pi * 60.0 * t)[:, None]  # outside the carrier band: filtered away
    e = named(ENV, extract("spectral", x[None], RATE, ENV)[0], ["m10", "m40", "pure"])
    assert e["m10.env_band_5_15Hz"] == pytest.approx(0.5 ** 2 / 2, rel=1e-6)  # envelope 1 + m cos: AC power m^2/2
    assert e["m10.env_band_15_25Hz"] < 1e-12 and e["m10.env_band_35_45Hz"] < 1e-12
    assert e["m40.env_band_35_45Hz"] == pytest.approx(0.8 ** 2 / 2, rel=1e-6)
    assert max(e[f"pure.env_band_{b}Hz"] for b in ("5_15", "15_25", "35_45")) < 1e-12  # no modulation


def test_envelope_equals_scipys_hilbert_of_the_band_passed_signal() -> None:
    rng = np.random.default_rng(11)
    x = rng.normal(size=(2, 1000, 2))
    got = extract("spectral", x, RATE, ENV).reshape(2, 2, -1)
    k0, k1 = band_bins(ENV.envelope.carrier_hz, RATE, 1000)
    for i in range(2):
        for c in range(2):
            spec = np.fft.fft(x[i, :, c] - x[i, :, c].mean())
            keep = np.zeros(1000, bool)
            keep[k0:k1] = keep[1000 - k1 + 1:1000 - k0 + 1] = True  # the band and its mirror image
            band_passed = np.fft.ifft(np.where(keep, spec, 0)).real
            envelope = np.abs(signal.hilbert(band_passed))
            assert np.allclose(got[i, c], periodogram_bands(envelope, RATE, ENV.envelope.bands_hz), rtol=1e-6)


def test_envelope_finds_a_bearing_fault_frequency() -> None:
    """Impacts at 87 Hz (an outer-race fault's BPFO) ring a 3 kHz resonance; the raw spectrum shows the
    resonance, the envelope spectrum the impact rate (Randall & Antoni 2011, figure 2's idea)."""
    rate, size, bpfo = 20000.0, 8000, 87.0
    rng = np.random.default_rng(2)
    t = np.arange(size) / rate
    x = 0.05 * rng.normal(size=size)
    ring = np.exp(-t[:200] * 1500.0) * np.sin(2 * np.pi * 3000.0 * t[:200])
    for start in np.arange(0.002, t[-1] - 0.01, 1 / bpfo):
        i = int(start * rate)
        x[i:i + 200] += ring
    params = FeatureParams(time=("kurtosis",), spectral=(), envelope={
        "carrier_hz": (2000, 4000), "bands_hz": ((bpfo - 3, bpfo + 3), (120, 126), (2 * bpfo - 3, 2 * bpfo + 3))})
    row = named(params, extract("spectral", x[None, :, None], rate, params)[0], ["acc"])
    assert row["acc.kurtosis"] > 3  # impulsive
    assert row["acc.env_band_84_90Hz"] > 20 * row["acc.env_band_120_126Hz"]
    assert row["acc.env_band_171_177Hz"] > 5 * row["acc.env_band_120_126Hz"]  # and its harmonic


@pytest.mark.parametrize("shape", [(9, 1000, 3), (5, 257, 1), (4, 2048, 8), (6, 40, 2)])
def test_one_window_gives_the_same_bits_as_in_a_batch(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(shape[1])
    x = rng.normal(size=shape) * rng.choice([1e-6, 1.0, 1e5], size=shape[2])
    x[0, :, 0] = 2.5  # flat channel
    params = FeatureParams(bands_hz=((0, 100), (100, 250), (250, 500)),
                           envelope={"carrier_hz": (250, 500), "bands_hz": ((0, 50), (50, 100))})
    batch = extract("spectral", x, RATE, params)
    assert np.all(np.isfinite(batch))
    names = feature_names("spectral", [f"c{i}" for i in range(shape[2])], params)
    for i in range(shape[0]):
        one = extract("spectral", x[i:i + 1], RATE, params)
        assert np.array_equal(one.view(np.uint32), batch[i:i + 1].view(np.uint32)), i
        w = Window(seq=i, start_s=0.0, end_s=1.0, data=x[i])
        assert np.array_equal(window_features("spectral", w, [f"c{i}" for i in range(shape[2])], RATE,
                                              params).values, batch[i])
    assert np.array_equal(extract("spectral", x[::-1], RATE, params), batch[::-1])
    flat = dict(zip(names, batch[0].tolist()))
    assert flat["c0.mean"] == 2.5 and flat["c0.rms"] == 2.5
    for stat in ("std", "crest", "kurtosis", "skewness", "band_0_100Hz", "entropy", "dominant_hz",
                 "env_band_0_50Hz"):
        assert flat[f"c0.{stat}"] == 0.0


def test_float32_windows_agree_with_float64_within_float32_rounding() -> None:
    rng = np.random.default_rng(8)
    x64 = rng.normal(size=(5, 1000, 3)) * 4.0 + 1.0
    params = FeatureParams(bands_hz=BANDS, envelope={"carrier_hz": (250, 450), "bands_hz": ((5, 15),)})
    a = extract("spectral", x64, RATE, params)
    b = extract("spectral", x64.astype(np.float32), RATE, params)
    assert np.allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(a).max())


def test_bands_that_do_not_fit_the_windows_are_named() -> None:
    x = np.zeros((1, 1000, 1))
    with pytest.raises(ConfigError, match=r"features\.params: bands_hz\[1\]: band \[400, 600\] Hz reaches above "
                                          r"Nyquist \(500 Hz at rate_hz 1000\)"):
        extract("spectral", x, RATE, {"bands_hz": [[0, 400], [400, 600]]})
    with pytest.raises(ConfigError, match=r"envelope.carrier_hz: band \[400, 700\] Hz reaches above Nyquist"):
        extract("spectral", x, RATE, {"envelope": {"carrier_hz": [400, 700], "bands_hz": [[1, 5]]}})
    with pytest.raises(ConfigError, match=r"bands_hz\[0\]: band \[100.2, 100.7\] Hz holds no FFT bin of a 1000-sample "
                                          r"window at 1000 Hz \(bins every 1 Hz\)"):
        extract("spectral", x, RATE, {"bands_hz": [[100.2, 100.7]]})
    extract("spectral", x, RATE, {"bands_hz": [[100, 100.5]]})  # one bin (100 Hz) is enough


def test_params_are_checked() -> None:
    with pytest.raises(ConfigError, match="extractor 'machine' takes no params"):
        extract("machine", np.zeros((1, 8, 1)), 1.0, FeatureParams())
    with pytest.raises(ConfigError, match="takes no params"):
        feature_names("gait", ["a"] * 6, {"bands_hz": [[0, 1]]})
    with pytest.raises(ConfigError, match=r"features.params: bands_hz: a band is \[lo, hi\] Hz with 0 <= lo < hi"):
        extract("spectral", np.zeros((1, 8, 1)), 1.0, {"bands_hz": [[5, 2]]})
    bad = [({"time": ["rms", "rms"]}, "statistics named twice"),
           ({"time": ["median"]}, "time.0"),
           ({"bands_hz": [[0, float("nan")]]}, "both finite"),
           ({"bands_hz": [[10, 100], [10.0000001, 100]]}, "would both be named '10_100Hz'"),
           ({"time": [], "spectral": []}, "asks for no features"),
           ({"envelope": {"carrier_hz": [100, 200], "bands_hz": [[90, 110]]}}, "above the carrier band's width"),
           ({"envelope": {"carrier_hz": [100, 200], "bands_hz": []}}, "at least 1 item"),
           ({"bands": [[0, 1]]}, "Extra inputs")]
    for params, message in bad:
        with pytest.raises(ConfigError, match=message):
            extractor("spectral", params)
