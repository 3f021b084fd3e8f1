"""Frozen copy of the feature extractors as edgekit/features.py had them at commit d902351, before the
single-window fast path: the definition the fast path must reproduce bit for bit (tests/test_features.py).

Do not edit or "tidy" this file: it is a reference, not code in use. Changing a feature on purpose means
changing it here too, in the same commit, and retraining the bundles that depend on it.
"""

from __future__ import annotations

import numpy as np

_FLAT_RTOL = 1e-10
STEP_BAND_HZ = (0.5, 3.0)


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

    def __call__(self, windows: np.ndarray, rate_hz: float) -> np.ndarray:
        x = _check(windows, rate_hz)
        n, size, c = x.shape
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


REFERENCE = {"machine": MachineFeatures(), "gait": GaitFeatures()}
