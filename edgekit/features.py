"""Window -> feature vector. Extractors are looked up by the config's `kind` in EXTRACTORS.

Vectorised numpy over a batch of windows (n, size, C): the agent calls the same code on one window that
training called on thousands, so the numbers agree bitwise. numpy only; never imports a sibling stage.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from edgekit.errors import ConfigError
from edgekit.values import Features, Window

log = logging.getLogger(__name__)

# Relative tolerance below which a channel counts as flat (std ~ rounding noise of its mean): its shape
# statistics (kurtosis, skewness, crest) and band shares are then defined as 0 instead of 0/0.
_FLAT_RTOL = 1e-10
# Acceleration band that holds the step rhythm of walking (cadence ~1.6-2.2 Hz, the whole 0.5-3 Hz band
# used by Zijlstra & Hof 2003 and Mancini et al. 2011 for trunk-accelerometer gait analysis).
STEP_BAND_HZ = (0.5, 3.0)


class Extractor(Protocol):
    """Feature names for given channel names, and features (n, F) float32 for windows (n, size, C)."""

    kind: str

    def names(self, channels: Sequence[str]) -> list[str]: ...

    def __call__(self, windows: np.ndarray, rate_hz: float) -> np.ndarray: ...


def _check(windows: np.ndarray, rate_hz: float) -> np.ndarray:
    windows = np.asarray(windows, dtype=np.float64)
    if windows.ndim != 3:
        raise ValueError(f"windows must be 3-D (n, size, channels) (got shape {windows.shape})")
    if windows.shape[1] < 2:
        raise ValueError(f"windows need at least 2 samples each (got size {windows.shape[1]})")
    if not (np.isfinite(rate_hz) and rate_hz > 0):
        raise ValueError(f"rate_hz must be a finite number > 0 (got {rate_hz!r})")
    return windows


def _safe_div(num: np.ndarray, den: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """num/den where `ok`, else 0 (no warnings, no NaN)."""
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=ok)
    return out


def _moments(x: np.ndarray) -> dict[str, np.ndarray]:
    """Per-window, per-channel statistics of x (n, size, C) reduced over axis 1."""
    mean = x.mean(axis=1)
    xc = x - mean[:, None, :]
    var = (xc * xc).mean(axis=1)
    std = np.sqrt(var)
    scale = np.abs(x).max(axis=1)
    ok = std > _FLAT_RTOL * scale
    std = np.where(ok, std, 0.0)  # rounding noise of a flat channel reads as exactly 0
    m3 = (xc * xc * xc).mean(axis=1)
    m4 = (xc * xc * xc * xc).mean(axis=1)
    return {
        "mean": mean, "std": std, "ok": ok, "xc": xc,
        "min": x.min(axis=1), "max": x.max(axis=1),
        "rms": np.sqrt((x * x).mean(axis=1)),
        # Fisher (excess) kurtosis and the moment skewness, as scipy.stats.kurtosis/skew (biased).
        "kurtosis": np.where(ok, _safe_div(m4, var * var, ok) - 3.0, 0.0),
        "skewness": _safe_div(m3, var * std, ok),
        # Crest factor of the fluctuation: peak deviation from the mean over its RMS (the std), so an
        # offset does not hide a spike; 0 for a flat channel.
        "crest": _safe_div(np.abs(xc).max(axis=1), std, ok),
    }


def _power(xc: np.ndarray) -> np.ndarray:
    """One-sided power spectrum over axis 1 of the mean-removed x (n, size, C) -> (n, size//2+1, C)."""
    spec = np.fft.rfft(xc, axis=1)
    return spec.real * spec.real + spec.imag * spec.imag


class MachineFeatures:
    """Generic per-channel statistics for machine monitoring; any channel count.

    Per channel: mean, std, min, max, ptp, rms, kurtosis, skewness, crest, slope (units per second,
    least squares), band_low/band_mid/band_high (share of the AC rFFT power in thirds of 0..Nyquist).
    """

    kind = "machine"
    per_channel = ("mean", "std", "min", "max", "ptp", "rms", "kurtosis", "skewness", "crest", "slope",
                   "band_low", "band_mid", "band_high")

    def names(self, channels: Sequence[str]) -> list[str]:
        return [f"{ch}.{f}" for ch in channels for f in self.per_channel]

    def __call__(self, windows: np.ndarray, rate_hz: float) -> np.ndarray:
        x = _check(windows, rate_hz)
        n, size, c = x.shape
        m = _moments(x)
        ok = m["ok"]
        idx = np.arange(size, dtype=np.float64)
        idx -= idx.mean()
        slope = (m["xc"] * idx[None, :, None]).sum(axis=1) / (idx * idx).sum() * rate_hz
        power = _power(m["xc"])[:, 1:, :]  # drop DC
        freqs = np.fft.rfftfreq(size, d=1.0 / rate_hz)[1:]
        nyq = rate_hz / 2.0
        band_of = np.minimum((freqs / nyq * 3.0).astype(np.int64), 2)  # 0, 1, 2 (Nyquist in the top band)
        total = power.sum(axis=1)
        good = ok & (total > 0)
        bands = [_safe_div(power[:, band_of == b, :].sum(axis=1), total, good) for b in range(3)]
        cols = [m["mean"], m["std"], m["min"], m["max"], m["max"] - m["min"], m["rms"], m["kurtosis"],
                m["skewness"], m["crest"], slope, *bands]
        out = np.stack(cols, axis=2)  # (n, C, 13): channel-major, as names()
        return out.reshape(n, c * len(self.per_channel)).astype(np.float32)


class GaitFeatures:
    """Features of a lower-back IMU window: channels Acc_X, Acc_Y, Acc_Z (m/s^2), Gyr_X, Gyr_Y, Gyr_Z
    (rad/s), ~100 Hz, in that order.

    The vertical axis is the window's mean acceleration direction (gravity dominates it at the lower back
    whatever the sensor's mounting), so `yaw` (gyro projected on it, rad/s) is the turning rate.
    """

    kind = "gait"
    per_channel = ("mean", "std", "rms")
    derived = ("acc_mag.mean", "acc_mag.std", "acc_mag.min", "acc_mag.max",
               "gyr_mag.mean", "gyr_mag.std", "gyr_mag.max",
               "acc_mag.dom_freq_hz", "acc_mag.dom_power", "acc_mag.step_band_rel",
               "yaw.mean", "yaw.std", "yaw.max_abs", "yaw.abs_angle_deg")

    def names(self, channels: Sequence[str]) -> list[str]:
        if len(channels) != 6:
            raise ConfigError(f"gait features need 6 channels (acc xyz, gyr xyz) (got {list(channels)})",
                              where="features.kind", hint="use kind 'machine' for other sensors")
        return [f"{ch}.{f}" for ch in channels for f in self.per_channel] + list(self.derived)

    def __call__(self, windows: np.ndarray, rate_hz: float) -> np.ndarray:
        x = _check(windows, rate_hz)
        n, size, c = x.shape
        if c != 6:
            raise ConfigError(f"gait features need 6 channels (acc xyz, gyr xyz) (got {c})",
                              where="features.kind", hint="use kind 'machine' for other sensors")
        m = _moments(x)
        per = np.stack([m["mean"], m["std"], m["rms"]], axis=2).reshape(n, 18)

        acc, gyr = x[:, :, :3], x[:, :, 3:]
        acc_mag = np.sqrt((acc * acc).sum(axis=2))  # (n, size)
        gyr_mag = np.sqrt((gyr * gyr).sum(axis=2))
        am = acc_mag.mean(axis=1)
        ac = acc_mag - am[:, None]
        a_std = np.sqrt((ac * ac).mean(axis=1))
        g_mean = gyr_mag.mean(axis=1)
        gc = gyr_mag - g_mean[:, None]

        spec = np.fft.rfft(ac, axis=1)
        power = (spec.real * spec.real + spec.imag * spec.imag)[:, 1:]  # drop DC
        freqs = np.fft.rfftfreq(size, d=1.0 / rate_hz)[1:]
        total = power.sum(axis=1)
        a_ok = (a_std > _FLAT_RTOL * np.abs(acc_mag).max(axis=1)) & (total > 0)
        k = power.argmax(axis=1)
        dom_f = np.where(a_ok, freqs[k], 0.0)
        dom_p = _safe_div(power[np.arange(n), k], total, a_ok)
        in_band = (freqs >= STEP_BAND_HZ[0]) & (freqs <= STEP_BAND_HZ[1])
        step_rel = _safe_div(power[:, in_band].sum(axis=1), total, a_ok)

        g = m["mean"][:, :3]
        g_norm = np.sqrt((g * g).sum(axis=1))
        up = _safe_div(g, g_norm[:, None], (g_norm > 0)[:, None])  # unit vertical, 0 without gravity
        yaw = (gyr * up[:, None, :]).sum(axis=2)  # (n, size) rad/s about the vertical
        y_mean = yaw.mean(axis=1)
        yc = yaw - y_mean[:, None]
        derived = np.stack([
            am, a_std, acc_mag.min(axis=1), acc_mag.max(axis=1),
            g_mean, np.sqrt((gc * gc).mean(axis=1)), gyr_mag.max(axis=1),
            dom_f, dom_p, step_rel,
            y_mean, np.sqrt((yc * yc).mean(axis=1)), np.abs(yaw).max(axis=1),
            np.degrees(np.abs(yaw.sum(axis=1)) / rate_hz),
        ], axis=1)
        return np.concatenate([per, derived], axis=1).astype(np.float32)


EXTRACTORS: dict[str, Extractor] = {
    "machine": MachineFeatures(),
    "gait": GaitFeatures(),
}


def _extractor(kind: str) -> Extractor:
    try:
        return EXTRACTORS[kind]
    except KeyError:
        raise ConfigError(f"unknown feature kind {kind!r}", where="features.kind",
                          hint=f"known kinds: {', '.join(sorted(EXTRACTORS))}") from None


def extract(kind: str, windows: np.ndarray, rate_hz: float) -> np.ndarray:
    """Features (n, F) float32 of windows (n, size, C) with the extractor registered as `kind`."""
    return _extractor(kind)(windows, rate_hz)


def feature_names(kind: str, channels: Sequence[str]) -> list[str]:
    """The names of the columns `extract(kind, ...)` returns for these channels."""
    return _extractor(kind).names(channels)


def window_features(kind: str, window: Window, channels: Sequence[str], rate_hz: float) -> Features:
    """The agent's per-window call: the same numbers as row `seq` of `extract` over the whole stream."""
    values = extract(kind, window.data[None, :, :], rate_hz)[0]
    return Features(names=tuple(feature_names(kind, channels)), values=values)


# --- Fall-screening TUG features (Bet, Castro & Ponti 2021) -----------------------------------------

TUG_FEATURES = ("pse", "psp1", "psp2", "psp3", "pspf1", "pspf2", "pspf3", "wpsp", "cpt")


def butter_lowpass(x: np.ndarray, cutoff_hz: float, rate_hz: float, order: int) -> np.ndarray:
    """Causal low-pass Butterworth of a 1-D signal, zero initial state: what scipy's
    `lfilter(*butter(order, cutoff_hz / (rate_hz / 2)), x)` computes, in numpy (no per-sample loop).

    Digital poles from the bilinear transform of the analog prototype pre-warped to the cut-off; the
    impulse response h[n] = c0 [n = 0] + sum_k r_k p_k^n (partial fractions), applied by FFT convolution.
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    k = np.arange(1, order + 1)
    analog = np.exp(1j * np.pi * (2 * k + order - 1) / (2 * order))  # unit-cutoff prototype poles
    fs2 = 2.0 * rate_hz
    warped = fs2 * np.tan(np.pi * cutoff_hz / rate_hz)
    sa = analog * warped
    poles = (1 + sa / fs2) / (1 - sa / fs2)
    # H(z) = g (1 + z^-1)^N / prod(1 - p_k z^-1), g so that H(1) = 1.
    gain = np.prod(1 - poles).real / 2.0 ** order
    others = poles[None, :] / poles[:, None]  # p_j / p_k
    np.fill_diagonal(others, 0.0)
    residues = gain * (1 + 1 / poles) ** order / np.prod(1 - others, axis=1)
    direct = gain / np.prod(-poles)
    h = (residues[:, None] * poles[:, None] ** np.arange(n)[None, :]).sum(axis=0).real
    h[0] += direct.real
    size = 1 << int(np.ceil(np.log2(2 * n)))
    return np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(h, size), size)[:n]


def tug_frequency_features(acc: np.ndarray, rate_hz: float, *, cutoff_hz: float = 3.667, order: int = 3,
                           n_bins: int = 49) -> dict[str, float]:
    """The nine frequency features of a whole TUG accelerometer recording, as in the fall-screening study.

    Followed: P. Bet, P. C. Castro, M. A. Ponti, "Foreseeing future falls with accelerometer features in
    active community-dwelling older persons with no recent history of falls", Exp. Gerontology 143, 2021,
    and the definitions in the authors' published `gaitAnalysis.py` (`data_features`, MIT licence; its
    README ships in ../shared/datasets/fall_screening/). Steps, on the magnitude sqrt(x^2+y^2+z^2):

    1. low-pass Butterworth, order 3, cut-off 3.667 Hz (the study ran scipy `lfilter` at fs = 100 Hz);
    2. power spectrum |FFT|^2 of the whole signal (DC kept), bins are FFT indices (so they depend on the
       recording length, as in the study: bin k is k * rate_hz / T Hz);
    3. S = power of bins 1..49 ("maxfr = 50");
       pse  = -sum(p * ln(1e-4 + p)) with p = S min-max scaled to [0, 1];
       psp1, pspf1 = max and FFT-bin index of z-scored S (mean/population std over the 49 bins);
       wpsp = (pspf1 - 1) * psp1 (the study weights by the 0-based position, which matches its file);
       psp2, pspf2 = max of z-scored S after zeroing the peak and 3 bins each side;
       psp3, pspf3 = the same after also zeroing the 2nd peak and 2 bins each side;
    4. cpt = (sum(w * P / max(w * P)) - 1) * 100 over bins 0..49 (DC included) with w_k = 1 - k/100.

    Step 1 is reproduced with numpy only: the Butterworth filter is designed as scipy `butter` does
    (analog prototype, pre-warped bilinear transform) and applied as `lfilter` would (causal, zero initial
    state, so the start-up transient the study's numbers contain is kept) by convolving with its impulse
    response, computed in closed form from the poles. A flat spectrum gives pse = 0 and psp = 0 instead of
    NaN. The study's raw data is not public, so its `featuresAcc.npy` cannot be reproduced bit for bit.
    """
    acc = np.asarray(acc, dtype=np.float64)
    if acc.ndim != 2 or acc.shape[1] != 3:
        raise ValueError(f"acc must have shape (T, 3) (got {acc.shape})")
    if not (np.isfinite(rate_hz) and rate_hz > 0):
        raise ValueError(f"rate_hz must be a finite number > 0 (got {rate_hz!r})")
    if not 0 < cutoff_hz < rate_hz / 2:
        raise ValueError(f"cutoff_hz must be in (0, {rate_hz / 2}) (got {cutoff_hz!r})")
    if acc.shape[0] // 2 < n_bins:
        raise ValueError(f"need at least {2 * n_bins} samples for {n_bins} spectrum bins (got {acc.shape[0]})")
    mag = np.sqrt((acc * acc).sum(axis=1))
    mag = butter_lowpass(mag, cutoff_hz, rate_hz, order)
    spec = np.fft.fft(mag)[: n_bins + 1]
    power = spec.real * spec.real + spec.imag * spec.imag

    s = power[1:]
    span = s.max() - s.min()
    flat = span <= 1e-12 * max(float(power.max()), 1e-300)
    p = np.zeros_like(s) if flat else (s - s.min()) / span
    pse = float(-(p * np.log(1e-4 + p)).sum())
    sd = s.std()
    z = np.zeros_like(s) if flat or sd == 0 else (s - s.mean()) / sd

    def peak(zz: np.ndarray, around: int) -> tuple[float, int, np.ndarray]:
        i = int(zz.argmax())
        value = float(zz[i])
        zz = zz.copy()
        zz[max(0, i - around): i + around + 1] = 0.0
        return value, i, zz

    psp1, i1, z = peak(z, 3)
    psp2, i2, z = peak(z, 2)
    psp3, i3, _ = peak(z, 0)
    weights = 1.0 - np.arange(n_bins + 1) / 100.0
    wp = power * weights
    top = wp.max()
    cpt = float((wp / top).sum() - 1.0) * 100.0 if top > 0 else 0.0
    return {"pse": pse, "psp1": psp1, "psp2": psp2, "psp3": psp3, "pspf1": float(i1 + 1),
            "pspf2": float(i2 + 1), "pspf3": float(i3 + 1), "wpsp": float(i1 * psp1), "cpt": cpt}
