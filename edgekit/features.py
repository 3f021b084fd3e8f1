"""Window -> feature vector. Extractors are looked up by the config's `kind` in EXTRACTORS.

Vectorised numpy over a batch of windows (n, size, C): the agent calls the same code on one window that
training called on thousands, so the numbers agree bitwise. numpy only; never imports a sibling stage.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from pydantic import ValidationError

from edgekit.errors import ConfigError
from edgekit.manifest import PARAM_EXTRACTORS, SPECTRAL_STATS, TIME_STATS, FeatureParams, band_bins
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
    if not (math.isfinite(rate_hz) and rate_hz > 0):
        raise ValueError(f"rate_hz must be a finite number > 0 (got {rate_hz!r})")
    return windows


# How the code below stays bit-identical to the plain formulas (tests/reference_features.py pins them)
# while making few numpy calls, which is what one window costs (~1-2 us per call, whatever the size):
# - x.sum(axis) / n is what x.mean(axis) computes (numpy's _mean is that sum and a true divide);
# - several reductions run as one over arrays stacked along a new OUTERMOST axis (buffers written with
#   out=), so every output element is still summed over the same elements in the same order;
# - a boolean band mask is a contiguous range of rFFT bins (frequencies are sorted), so it is a slice;
# - max|x| = max(max x, -min x), and max|x - m| = max(max x - m, m - min x): rounding is monotone and
#   symmetric, so these are the same floats (up to the sign of a zero, made +0.0 where it is an output);
# - what depends only on (size, rate_hz) is computed once (_plan).
_add = np.add.reduce
_max = np.maximum.reduce
_min = np.minimum.reduce


class _Plan:
    """What depends only on the window size and rate, not on the data (a plain class: a dataclass would
    cost ~1 ms of the agent's start)."""

    __slots__ = ("idx", "idx_sq", "freqs", "bands", "step_band", "rfft")

    def __init__(self, idx: np.ndarray, idx_sq: np.float64, freqs: np.ndarray, bands: tuple[slice, slice, slice],
                 step_band: slice, rfft: Callable[[np.ndarray], np.ndarray]) -> None:
        self.idx = idx  # (1, size, 1) sample index minus its mean, for the least-squares slope
        self.idx_sq = idx_sq  # sum of idx^2
        self.freqs = freqs  # rFFT bin frequencies without DC, (size // 2,)
        self.bands = bands  # thirds of 0..Nyquist (Nyquist in the top band), over `freqs`
        self.step_band = step_band  # STEP_BAND_HZ, over `freqs`
        self.rfft = rfft  # np.fft.rfft(x, axis=1), or the same kernel called directly


def _range(mask: np.ndarray) -> slice:
    """The slice that selects what the boolean `mask` selects; the mask must be one contiguous run."""
    hits = np.flatnonzero(mask)
    if len(hits) == 0:
        return slice(0, 0)
    lo, hi = int(hits[0]), int(hits[-1]) + 1
    if hi - lo != len(hits):  # cannot happen for masks over sorted frequencies
        raise AssertionError(f"mask is not one contiguous run: {mask}")
    return slice(lo, hi)


def _rfft_axis1(size: int) -> Callable[[np.ndarray], np.ndarray]:
    """np.fft.rfft(x, axis=1) for windows of `size`. numpy >= 2 computes it with a gufunc behind ~4 us of
    Python; calling that gufunc directly is the same computation (checked bit for bit on a probe here),
    and np.fft.rfft itself is used wherever the gufunc is not there or does not match."""

    def public(x: np.ndarray) -> np.ndarray:
        return np.fft.rfft(x, axis=1)

    try:
        from numpy.fft import _pocketfft_umath as pfu  # numpy >= 2.0

        kernel = pfu.rfft_n_even if size % 2 == 0 else pfu.rfft_n_odd
        axes = [(1,), (), (1,)]

        def direct(x: np.ndarray) -> np.ndarray:
            out = np.empty((x.shape[0], size // 2 + 1, *x.shape[2:]), dtype=np.complex128)
            return kernel(x, 1, axes=axes, out=out)

        probe = np.sin(np.arange(6.0 * size).reshape(2, size, 3) * 0.7) * 1e3  # numpy.random: a 15 ms import
        if np.array_equal(direct(probe).view(np.uint64), public(probe).view(np.uint64)):
            return direct
    except Exception:  # a numpy without that gufunc, or with another signature: the public function
        pass
    return public


def _plan(size: int, rate_hz: float) -> _Plan:
    """The plan for this size and rate; cached for Python and numpy float64 rates (another type, e.g. a
    float32 rate, rounds differently: its plan is computed afresh, as the plain formulas would)."""
    if type(rate_hz) in (float, int, np.float64):
        return _cached_plan(size, float(rate_hz))
    return _make_plan(size, rate_hz)


def _make_plan(size: int, rate_hz: float) -> _Plan:
    idx = np.arange(size, dtype=np.float64)
    idx -= idx.mean()
    freqs = np.fft.rfftfreq(size, d=1.0 / rate_hz)[1:]
    nyq = rate_hz / 2.0
    band_of = np.minimum((freqs / nyq * 3.0).astype(np.int64), 2)  # 0, 1, 2 (Nyquist in the top band)
    in_step = (freqs >= STEP_BAND_HZ[0]) & (freqs <= STEP_BAND_HZ[1])
    plan = _Plan(idx=idx[None, :, None], idx_sq=(idx * idx).sum(), freqs=freqs,
                 bands=(_range(band_of == 0), _range(band_of == 1), _range(band_of == 2)),
                 step_band=_range(in_step), rfft=_rfft_axis1(size))
    plan.idx.flags.writeable = False
    plan.freqs.flags.writeable = False
    return plan


_cached_plan = functools.lru_cache(maxsize=64)(_make_plan)


def _power(plan: _Plan, xc: np.ndarray) -> np.ndarray:
    """One-sided power spectrum over axis 1 of the mean-removed x (n, size, ...) without the DC bin."""
    spec = plan.rfft(xc)[:, 1:]
    re, im = spec.real, spec.imag
    power = re * re
    power += im * im
    return power


class MachineFeatures:
    """Generic per-channel statistics for machine monitoring; any channel count.

    Per channel: mean, std, min, max, ptp, rms, kurtosis, skewness, crest, slope (units per second,
    least squares), band_low/band_mid/band_high (share of the AC rFFT power in thirds of 0..Nyquist).
    Kurtosis is Fisher's (excess) and skewness the moment skewness, as scipy.stats.kurtosis/skew (biased).
    Crest is the peak deviation from the mean over the std, so an offset does not hide a spike. A flat
    channel (std below _FLAT_RTOL of its scale) has std, kurtosis, skewness, crest and bands 0.
    """

    kind = "machine"
    per_channel = ("mean", "std", "min", "max", "ptp", "rms", "kurtosis", "skewness", "crest", "slope",
                   "band_low", "band_mid", "band_high")

    def names(self, channels: Sequence[str]) -> list[str]:
        return [f"{ch}.{f}" for ch in channels for f in self.per_channel]

    def __call__(self, windows: np.ndarray, rate_hz: float) -> np.ndarray:
        x = _check(windows, rate_hz)
        n, size, c = x.shape
        plan = _plan(size, rate_hz)
        f = np.zeros((13, n, c))  # one row per feature, in per_channel order
        mean, std, mn, mx, ptp, rms, _, _, _, slope = f[:10]
        _add(x, 1, out=mean)
        mean /= size
        _min(x, 1, out=mn)
        _max(x, 1, out=mx)
        np.subtract(mx, mn, out=ptp)

        buf = np.empty((6, n, size, c))
        xc = np.subtract(x, mean[:, None, :], out=buf[0])
        np.multiply(xc, xc, out=buf[3])
        np.multiply(buf[3], xc, out=buf[2])
        np.multiply(buf[2], xc, out=buf[1])
        np.multiply(x, x, out=buf[4])
        np.multiply(xc, plan.idx, out=buf[5])
        sums = _add(buf[1:], 2)  # (5, n, c): sums of xc^4, xc^3, xc^2, x^2, xc * idx
        num, den = np.empty((2, 3, n, c))  # kurtosis, skewness, crest = num / den
        np.divide(sums[:2], size, out=num[:2])  # 4th and 3rd central moments
        var, msq = sums[2:4] / size
        np.sqrt(var, out=std)
        np.sqrt(msq, out=rms)
        np.maximum(mx - mean, mean - mn, out=num[2])  # max |x - mean|
        np.multiply(var, var, out=den[0])
        np.multiply(var, std, out=den[1])
        den[2] = std
        ok = std > _FLAT_RTOL * np.maximum(mx, -mn)  # std above rounding noise of the channel's max |x|
        np.divide(num, den, out=f[6:9], where=ok)
        np.subtract(f[6], 3.0, out=f[6], where=ok)  # excess kurtosis; stays +0.0 where not ok
        np.divide(sums[4], plan.idx_sq, out=slope)
        slope *= rate_hz
        np.copyto(std, 0.0, where=~ok)

        power = _power(plan, xc)
        total = _add(power, 1)
        bands = np.empty((3, n, c))
        for b, band in enumerate(plan.bands):
            _add(power[:, band], 1, out=bands[b])
        np.divide(bands, total, out=f[10:], where=ok & (total > 0))
        out = np.empty((n, c, 13), dtype=np.float32)  # channel-major, as names()
        np.copyto(out, f.transpose(1, 2, 0))
        return out.reshape(n, c * 13)


# Rows of GaitFeatures' statistics pool -> its derived columns, in `derived` order.
_GAIT_POOL = ("acc.mean", "gyr.mean", "yaw.mean", "acc.std", "gyr.std", "yaw.std", "acc.max", "gyr.max",
              "yaw.max", "acc.min", "gyr.min", "yaw.min", "dom_freq", "dom_power", "step_band", "yaw.max_abs",
              "yaw.angle")


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
    _take = [_GAIT_POOL.index(k) for k in ("acc.mean", "acc.std", "acc.min", "acc.max", "gyr.mean", "gyr.std",
                                            "gyr.max", "dom_freq", "dom_power", "step_band", "yaw.mean",
                                            "yaw.std", "yaw.max_abs", "yaw.angle")]

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
        plan = _plan(size, rate_hz)
        out = np.empty((n, 32), dtype=np.float32)

        # Per channel: mean, std (0 when flat), rms.
        per = np.empty((3, n, 6))
        mean = per[0]
        _add(x, 1, out=mean)
        mean /= size
        sq = np.empty((2, n, size, 6))  # (x - mean)^2, x^2
        xc = x - mean[:, None, :]
        np.multiply(xc, xc, out=sq[0])
        np.multiply(x, x, out=sq[1])
        var_msq = _add(sq, 2)
        var_msq /= size
        np.sqrt(var_msq, out=per[1:])  # std, rms
        np.copyto(per[1], 0.0, where=~(per[1] > _FLAT_RTOL * _max(np.abs(x), 1)))
        np.copyto(out[:, :18].reshape(n, 6, 3), per.transpose(1, 2, 0))

        # Rows: acceleration magnitude, gyro magnitude, yaw rate (turning about the vertical), each (n, size).
        sig = np.empty((3, n, size))
        mags = sig[:2].transpose(1, 2, 0)  # (n, size, 2) view
        _add(sq[1].reshape(n, size, 2, 3), 3, out=mags)
        np.sqrt(mags, out=mags)
        g = mean[:, :3]
        g_norm = np.sqrt(_add(g * g, 1))
        up = np.zeros((n, 3))  # unit vertical, 0 without gravity
        np.divide(g, g_norm[:, None], out=up, where=(g_norm > 0)[:, None])
        _add(x[:, :, 3:] * up[:, None, :], 2, out=sig[2])  # rad/s about the vertical

        pool = np.zeros((len(_GAIT_POOL), n))
        sums = _add(sig, 2)  # (3, n)
        means = np.divide(sums, size, out=pool[0:3])
        _max(sig, 2, out=pool[6:9])
        _min(sig, 2, out=pool[9:12])
        cen = sig - means[:, :, None]
        power = _power(plan, cen[0])  # of the acceleration magnitude, mean removed
        cen *= cen
        var = _add(cen, 2)
        var /= size
        np.sqrt(var, out=pool[3:6])
        total = _add(power, 1)
        a_ok = (pool[3] > _FLAT_RTOL * pool[6]) & (total > 0)  # acc_mag >= 0: its max is its max |.|
        k = power.argmax(axis=1)
        np.copyto(pool[12], plan.freqs[k], where=a_ok)
        num = np.empty((2, n))
        num[0] = power[np.arange(n), k]
        _add(power[:, plan.step_band], 1, out=num[1])
        np.divide(num, total, out=pool[13:15], where=a_ok)
        np.maximum(pool[8], -pool[11], out=pool[15])
        pool[15] += 0.0  # max |yaw| of an all-zero yaw is +0.0, as abs() gives, not max(0.0, -0.0)
        np.degrees(np.abs(sums[2]) / rate_hz, out=pool[16])
        np.copyto(out[:, 18:], pool.take(self._take, axis=0).T)
        return out


class _SpectralPlan:
    """What SpectralFeatures needs for one (params, size, rate): the FFT bins of each band, the taper's
    scale, the spectrum's frequencies. A plain class, as _Plan."""

    __slots__ = ("freqs", "scale", "mirror", "bands", "carrier", "env_bands", "log_bins")

    def __init__(self, params: FeatureParams, size: int, rate_hz: float) -> None:
        try:
            params.check(rate_hz, size)
        except ValueError as exc:
            raise ConfigError(str(exc), where="features.params") from None
        last = size // 2
        self.freqs = np.arange(1, last + 1, dtype=np.float64) * (rate_hz / size)  # Hz of AC bins 1..K
        # Periodic Hann w[t] = 0.5 - 0.5 cos(2 pi t / size), applied as its 3-tap kernel on the rFFT bins
        # (X_w[k] = X[k]/2 - (X[k-1] + X[k+1])/4), so one FFT serves the spectrum and the envelope.
        taper = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(size) / size)
        scale = np.full(last, 2.0 / (size * float((taper * taper).sum())))
        if size % 2 == 0:
            scale[-1] /= 2.0  # the Nyquist bin has no mirror image
        self.scale = scale
        self.mirror = last - 1 if size % 2 == 0 else last  # X[last + 1] = conj(X[mirror])
        self.bands = self._edges([band_bins(b, rate_hz, size) for b in params.bands_hz])
        env = params.envelope
        self.carrier = None if env is None else band_bins(env.carrier_hz, rate_hz, size)
        self.env_bands = None if env is None else self._edges([band_bins(b, rate_hz, size) for b in env.bands_hz])
        self.log_bins = math.log(last) if last > 1 else 0.0
        for a in (self.freqs, self.scale):
            a.flags.writeable = False

    @staticmethod
    def _edges(bins: list[tuple[int, int]]) -> np.ndarray | None:
        """Band edges as indices into the AC power (bin k at k - 1), flattened for np.add.reduceat; the power
        array carries one zero bin after the last, so an index may be K."""
        if not bins:
            return None
        return np.array([i for k0, k1 in bins for i in (k0 - 1, k1 - 1)], dtype=np.intp)


def _tapered_power(plan: _SpectralPlan, spec: np.ndarray) -> np.ndarray:
    """(n, C, K + 1) one-sided power of the Hann-tapered signal whose untapered rFFT is `spec` (n, C, K + 1):
    bins 1..K in [..., :K] (unit^2, adding up to the tapered mean square), a zero bin at [..., K]."""
    n, c, k1 = spec.shape
    tap = np.empty((n, c, k1 - 1), dtype=spec.dtype)  # X[k + 1] for k = 1..K, then the kernel
    tap[..., :-1] = spec[..., 2:]
    np.conjugate(spec[..., plan.mirror], out=tap[..., -1])
    tap += spec[..., :-1]
    tap *= -0.25
    tap += 0.5 * spec[..., 1:]
    power = np.empty((n, c, k1))
    ac = power[..., :-1]
    np.multiply(tap.real, tap.real, out=ac)
    ac += tap.imag * tap.imag
    ac *= plan.scale
    power[..., -1] = 0.0
    return power


def _band_values(power: np.ndarray, edges: np.ndarray, total: np.ndarray, how: str, out: np.ndarray) -> None:
    """Each band's power (the sum of its bins; np.add.reduceat: one sum per band, whatever the batch) into
    `out` (bands, n, C), as power, rms or share of `total` (n, C)."""
    sums = np.add.reduceat(power, edges, axis=2)[..., ::2]  # (n, C, bands): even segments are the bands
    vals = sums.transpose(2, 0, 1)
    if how == "power":
        out[...] = vals
    elif how == "rms":
        np.sqrt(vals, out=out)
    else:
        np.divide(vals, total, out=out, where=total > 0)


class SpectralFeatures:
    """Per-channel features in the units of the field, configured by FeatureParams (edgekit/manifest.py):
    time statistics, band powers over bands in Hz, spectral statistics and envelope-spectrum band powers;
    any channel count and rate. Names: '<channel>.<stat>', '<channel>.band_<lo>_<hi>Hz',
    '<channel>.env_band_<lo>_<hi>Hz'.

    The spectrum is the rFFT of the mean-removed window with a periodic Hann taper, scaled so that bins
    1..K add up to the tapered window's mean square (a tone of amplitude A whose main lobe lies in a band
    gives that band A^2/2). The envelope: the window's rFFT bins of the carrier band, doubled and inverse-
    transformed, are the analytic signal of the band-passed window (a brick-wall band-pass, as in Randall &
    Antoni 2011); its magnitude, mean removed, gets the same spectrum. A flat channel (std below _FLAT_RTOL
    of max |x|) gives 0 for std, crest, kurtosis, skewness and every spectrum value.

    Works channel-major ((n, C, size), one copy): reductions and FFTs then run over contiguous rows, ~10x
    faster than over the strided window axis for a few channels of kHz data. Every value is a reduction
    over one row, so a window's features are the same bits alone or in any batch.
    """

    kind = "spectral"

    def __init__(self, params: FeatureParams) -> None:
        self.params = params
        self.per_channel = tuple(params.per_channel())
        self._time = [TIME_STATS.index(s) for s in params.time]
        self._spectral = [SPECTRAL_STATS.index(s) for s in params.spectral]
        # the time statistics that need the window's moments (its mean-removed powers), and the spectrum
        self._moments = bool(set(self._time) - set(_LEVEL_STATS))
        self._plans: dict[tuple[int, float], _SpectralPlan] = {}

    def names(self, channels: Sequence[str]) -> list[str]:
        return self.params.names(list(channels))

    def plan(self, size: int, rate_hz: float) -> _SpectralPlan:
        """The plan for this size and rate (ConfigError naming the band when one does not fit); cached for
        Python and numpy float64 rates, as _plan."""
        if type(rate_hz) not in (float, int, np.float64):
            return _SpectralPlan(self.params, size, rate_hz)
        key = (size, float(rate_hz))
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 64:
                self._plans.clear()
            plan = self._plans[key] = _SpectralPlan(self.params, size, float(rate_hz))
        return plan

    def __call__(self, windows: np.ndarray, rate_hz: float) -> np.ndarray:
        x = _check(windows, rate_hz)
        n, size, c = x.shape
        plan = self.plan(size, rate_hz)
        x = np.ascontiguousarray(x.transpose(0, 2, 1))  # (n, C, size)
        f = np.zeros((len(self.per_channel), n, c))  # one row per feature, in per_channel order
        if plan.bands is None and not self._spectral and plan.carrier is None and not self._moments:
            t = np.zeros((len(TIME_STATS), n, c))  # mean, peak and ptp only: no moments to compute
            _level_stats(x, t)
            f[:] = t[self._time]
            return _channel_major(f, n, c)
        xc, ok = self._time_stats(x, f)
        row = len(self._time)
        if plan.bands is None and not self._spectral and plan.carrier is None:
            return _channel_major(f, n, c)
        p = self.params
        spec = np.fft.rfft(xc)  # (n, C, K + 1)
        power = _tapered_power(plan, spec)
        ac = power[..., :-1]
        total = _add(ac, 2)  # (n, C)
        ok &= total > 0
        if plan.bands is not None:
            _band_values(power, plan.bands, total, p.band_value, f[row:row + len(p.bands_hz)])
            row += len(p.bands_hz)
        if self._spectral:
            self._spectral_stats(plan, ac, total, ok, f[row:row + len(self._spectral)])
            row += len(self._spectral)
        if plan.carrier is not None and plan.env_bands is not None and p.envelope is not None:
            k0, k1 = plan.carrier
            env = np.abs(np.fft.ifft(spec[..., k0:k1], n=size))  # the band moved to 0 Hz: same magnitude
            env *= 2.0  # one-sided band -> analytic signal
            env_mean = _add(env, 2)
            env_mean /= size
            env -= env_mean[..., None]
            env_power = _tapered_power(plan, np.fft.rfft(env))
            env_total = _add(env_power[..., :-1], 2)
            _band_values(env_power, plan.env_bands, env_total, p.band_value, f[row:])
        f[len(self._time):] *= ok  # flat channels: 0 for everything from the spectrum
        return _channel_major(f, n, c)

    def _time_stats(self, x: np.ndarray, f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The asked time statistics of x (n, C, size) into f[:len(time)]; returns the mean-removed x and
        which channels are not flat."""
        n, c, size = x.shape
        t = np.zeros((len(TIME_STATS), n, c))  # TIME_STATS order
        mean, std, rms, peak, ptp = t[:5]
        mn, mx = _level_stats(x, t)
        buf = np.empty((5, n, c, size))
        xc = np.subtract(x, mean[..., None], out=buf[0])
        np.multiply(xc, xc, out=buf[3])
        np.multiply(buf[3], xc, out=buf[2])
        np.multiply(buf[2], xc, out=buf[1])
        np.multiply(x, x, out=buf[4])
        sums = _add(buf[1:], 3)  # (4, n, c): sums of xc^4, xc^3, xc^2, x^2
        sums /= size  # 4th and 3rd central moments, variance, mean square
        np.sqrt(sums[2:], out=t[1:3])  # std, rms
        ok = std > _FLAT_RTOL * np.maximum(mx, -mn)
        var = sums[2]
        num, den = np.empty((2, 3, n, c))  # crest, kurtosis, skewness = num / den
        num[0] = peak
        num[1:] = sums[:2]
        den[0] = std
        np.multiply(var, var, out=den[1])
        np.multiply(var, std, out=den[2])
        np.divide(num, den, out=t[5:], where=ok)
        np.subtract(t[6], 3.0, out=t[6], where=ok)  # excess kurtosis; stays 0 where flat
        np.copyto(std, 0.0, where=~ok)
        f[: len(self._time)] = t[self._time]
        return xc, ok

    def _spectral_stats(self, plan: _SpectralPlan, ac: np.ndarray, total: np.ndarray, ok: np.ndarray,
                        out: np.ndarray) -> None:
        """The asked centroid_hz, spread_hz, entropy, dominant_hz of the AC power (n, C, K) into `out`."""
        n, c, _ = ac.shape
        s = np.zeros((len(SPECTRAL_STATS), n, c))
        safe = np.where(ok, total, 1.0)
        centroid = s[0]
        _add(ac * plan.freqs, 2, out=centroid)
        centroid /= safe
        if 1 in self._spectral:
            dev = plan.freqs - centroid[..., None]
            dev *= dev
            dev *= ac
            _add(dev, 2, out=s[1])
            s[1] /= safe
            np.sqrt(s[1], out=s[1])
        if 2 in self._spectral and plan.log_bins > 0:  # -sum p ln p = ln T - sum P ln P / T, p = P / T
            logp = np.zeros_like(ac)
            np.log(ac, out=logp, where=ac > 0)
            logp *= ac
            plogp = _add(logp, 2)
            plogp /= safe
            np.log(safe, out=s[2])
            s[2] -= plogp
            s[2] /= plan.log_bins
        if 3 in self._spectral:
            s[3] = plan.freqs[ac.argmax(axis=2)]
        out[...] = s[self._spectral]


# TIME_STATS that need no moment of the window: its level and extremes
_LEVEL_STATS = tuple(TIME_STATS.index(s) for s in ("mean", "peak", "ptp"))


def _level_stats(x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (n, C, size) -> mean, peak and ptp into t's TIME_STATS rows (the same arithmetic whether or not the
    moments follow); returns the window minima and maxima."""
    size = x.shape[2]
    mean, peak, ptp = t[0], t[3], t[4]
    _add(x, 2, out=mean)
    mean /= size
    mn, mx = _min(x, 2), _max(x, 2)
    np.subtract(mx, mn, out=ptp)
    np.maximum(mx - mean, mean - mn, out=peak)
    return mn, mx


def _channel_major(f: np.ndarray, n: int, c: int) -> np.ndarray:
    """(F, n, C) float64 -> (n, C * F) float32, channel-major as the names."""
    out = np.empty((n, c, f.shape[0]), dtype=np.float32)
    np.copyto(out, f.transpose(1, 2, 0))
    return out.reshape(n, c * f.shape[0])


@functools.lru_cache(maxsize=32)
def _spectral(params: FeatureParams) -> SpectralFeatures:
    return SpectralFeatures(params)


EXTRACTORS: dict[str, Extractor] = {
    "machine": MachineFeatures(),
    "gait": GaitFeatures(),
    "spectral": SpectralFeatures(FeatureParams()),  # its defaults; other params: extractor("spectral", params)
}

Params = FeatureParams | Mapping[str, Any] | None


def extractor(kind: str, params: Params = None) -> Extractor:
    """The extractor registered as `kind`, configured by `params` (a FeatureParams or its dict; None: the
    defaults). ConfigError for an unknown kind, for params given to an extractor that takes none, and for
    params that do not validate. Resolve once and call it per batch: the agent's pipeline does."""
    try:
        found = EXTRACTORS[kind]
    except KeyError:
        raise ConfigError(f"unknown feature kind {kind!r}", where="features.kind",
                          hint=f"known kinds: {', '.join(sorted(EXTRACTORS))}") from None
    if params is None:
        return found
    if kind not in PARAM_EXTRACTORS:
        raise ConfigError(f"extractor {kind!r} takes no params (only {', '.join(PARAM_EXTRACTORS)} does)",
                          where="features.params", hint="remove [features.params] or use extractor 'spectral'")
    if not isinstance(params, FeatureParams):
        try:
            params = FeatureParams.model_validate(params)
        except ValidationError as exc:
            first = exc.errors()[0]
            key = ".".join(str(p) for p in first["loc"])
            message = first["msg"].removeprefix("Value error, ")
            raise ConfigError(f"{key}: {message}" if key else message, where="features.params") from None
    return _spectral(params)


def extract(kind: str, windows: np.ndarray, rate_hz: float, params: Params = None) -> np.ndarray:
    """Features (n, F) float32 of windows (n, size, C) with the extractor registered as `kind`, configured
    by `params` (extractors that take none: None)."""
    return extractor(kind, params)(windows, rate_hz)


def feature_names(kind: str, channels: Sequence[str], params: Params = None) -> list[str]:
    """The names of the columns `extract(kind, ..., params)` returns for these channels."""
    return extractor(kind, params).names(channels)


def window_features(kind: str, window: Window, channels: Sequence[str], rate_hz: float,
                    params: Params = None) -> Features:
    """The agent's per-window call: the same numbers as row `seq` of `extract` over the whole stream."""
    ex = extractor(kind, params)
    return Features(names=tuple(ex.names(channels)), values=ex(window.data[None, :, :], rate_hz)[0])


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
    README ships with the study's data). Steps, on the magnitude sqrt(x^2+y^2+z^2):

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
