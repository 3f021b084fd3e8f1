"""Cut a (T, C) stream into fixed windows: `sliding_windows` for training, `Windower` for the agent.

Both give bitwise-identical window arrays for the same samples (tests/test_window.py proves it), so the
features computed on the server and on the edge device are the same numbers. numpy only.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from edgekit.values import Sample, Window

log = logging.getLogger(__name__)


def _check_size_hop(size: int, hop: int) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"window size must be an integer >= 1 (got {size!r})")
    if isinstance(hop, bool) or not isinstance(hop, (int, np.integer)) or hop < 1:
        raise ValueError(f"window hop must be an integer >= 1 (got {hop!r})")


def sample_rate(t: np.ndarray) -> float | None:
    """Samples per second of time stamps `t` (seconds): 1 / the mean of the steps within half of the median
    step, so gaps and a missed sample do not count and stamps rounded to the microsecond (a float64 epoch
    holds ~0.2 us) still give 1000 Hz, not 1000.07. None without two increasing stamps."""
    steps = np.diff(np.asarray(t, dtype=np.float64))
    steps = steps[(steps > 0) & np.isfinite(steps)]
    if not len(steps):
        return None
    med = float(np.partition(steps, (len(steps) - 1) // 2)[(len(steps) - 1) // 2])  # a step, not an average
    rate = 1.0 / float(steps[np.abs(steps - med) <= 0.5 * med].mean())  # holds that step at least
    return rate if math.isfinite(rate) and rate > 0 else None


def sliding_windows(values: np.ndarray, size: int, hop: int) -> np.ndarray:
    """Windows starting at samples 0, hop, 2*hop, ... (full windows only), shape (n, size, C) float64.

    Returns a fresh C-contiguous array, the same layout `Windower` hands out, so reductions over it
    round identically. `values` shape (T, C); T < size gives shape (0, size, C).
    """
    _check_size_hop(size, hop)
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"values must be 2-D (T, channels) (got shape {values.shape})")
    values = np.asarray(values, dtype=np.float64)
    n_rows, channels = values.shape
    if n_rows < size:
        return np.empty((0, size, channels), dtype=np.float64)
    n = (n_rows - size) // hop + 1
    index = np.arange(n)[:, None] * hop + np.arange(size)[None, :]
    return np.ascontiguousarray(values[index])


class Windower:
    """Streaming windower: push samples one at a time (or in bulk), get a `Window` per completed window.

    Emits the same windows as `sliding_windows` over everything pushed so far: the first after `size`
    samples, then one every `hop` samples. Keeps a preallocated ring of 2*size rows, each sample written
    twice (at i and i+size) so the latest `size` samples are always one contiguous slice.
    """

    def __init__(self, size: int, hop: int, channels: int, max_gap_s: float | None = None) -> None:
        """`max_gap_s`: a step in time longer than this starts the windows afresh after it, so no window
        spans the gap (training splits recordings at the same gaps: manifest input.max_gap_s)."""
        _check_size_hop(size, hop)
        if max_gap_s is not None and not max_gap_s > 0:
            raise ValueError(f"max_gap_s must be > 0 or None (got {max_gap_s!r})")
        self.max_gap_s = max_gap_s
        if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or channels < 1:
            raise ValueError(f"channels must be an integer >= 1 (got {channels!r})")
        self.size = int(size)
        self.hop = int(hop)
        self.channels = int(channels)
        self._buf = np.zeros((2 * self.size, self.channels), dtype=np.float64)
        self._times = np.zeros(2 * self.size, dtype=np.float64)
        self._count = 0  # samples pushed so far
        self._seq = 0  # windows emitted so far
        self._last_t = -np.inf
        self.gaps = 0  # gaps longer than max_gap_s seen so far

    @property
    def count(self) -> int:
        """Samples pushed so far."""
        return self._count

    def reset(self) -> None:
        """Forget every sample (e.g. after a gap in the stream); the next window has seq 0 again."""
        self._count = 0
        self._seq = 0
        self._last_t = -np.inf

    def _gap(self, t: float) -> bool:
        """True (and the samples before forgotten, seq kept) when `t` follows the last sample by more than
        max_gap_s."""
        if self.max_gap_s is None or self._count == 0 or not t - self._last_t > self.max_gap_s:
            return False
        self._count = 0
        self.gaps += 1
        return True

    def _completes(self, count: int) -> bool:
        return count >= self.size and (count - self.size) % self.hop == 0

    def push(self, sample: Sample) -> Window | None:
        """Add one sample; return the window it completes, or None."""
        values = sample.values
        if values.shape != (self.channels,):
            raise ValueError(f"sample has shape {values.shape}, windower expects ({self.channels},)")
        if sample.t_s < self._last_t:
            raise ValueError(f"sample time {sample.t_s} goes back before {self._last_t}")
        self._gap(sample.t_s)
        i = self._count % self.size
        self._buf[i] = values
        self._buf[i + self.size] = values
        self._times[i] = sample.t_s
        self._times[i + self.size] = sample.t_s
        self._last_t = float(sample.t_s)
        self._count += 1
        if not self._completes(self._count):
            return None
        first = (i + 1) % self.size  # ring position of the oldest of the latest `size` samples
        window = Window(seq=self._seq, start_s=float(self._times[first]),
                        end_s=float(self._times[first + self.size - 1]),
                        data=self._buf[first:first + self.size].copy())
        self._seq += 1
        return window

    def _checked(self, t: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(t, values) as float64 and the time steps from the last sample; ValueError naming the sample when
        shapes disagree, a value is not finite or time goes back."""
        t = np.asarray(t, dtype=np.float64)
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or values.shape[1] != self.channels:
            raise ValueError(f"values has shape {values.shape}, windower expects (T, {self.channels})")
        if t.shape != (values.shape[0],):
            raise ValueError(f"t has shape {t.shape}, expected ({values.shape[0]},) to match values")
        if not (np.all(np.isfinite(t)) and np.all(np.isfinite(values))):
            bad = int(np.flatnonzero(~(np.isfinite(t) & np.all(np.isfinite(values), axis=1)))[0])
            raise ValueError(f"sample {bad} is not finite (t={t[bad]!r}, values={values[bad].tolist()!r})")
        steps = np.diff(np.concatenate(([self._last_t], t)))
        if np.any(steps < 0):
            bad = int(np.flatnonzero(steps < 0)[0])
            raise ValueError(f"sample time {t[bad]} goes back before {self._last_t if bad == 0 else t[bad - 1]}")
        return t, values, steps

    def push_many(self, t: np.ndarray, values: np.ndarray) -> list[Window]:
        """Add many samples at once (bulk replay): same windows as pushing them one by one."""
        t, values, steps = self._checked(t, values)
        m = values.shape[0]
        if m == 0:
            return []
        if self.max_gap_s is not None:
            cuts = np.flatnonzero(steps[1:] > self.max_gap_s) + 1  # gaps inside the block
            if len(cuts):
                bounds = [0, *cuts.tolist(), m]
                return [w for a, b in zip(bounds, bounds[1:]) for w in self.push_many(t[a:b], values[a:b])]
            self._gap(float(t[0]))

        # Retained history (latest min(count, size) samples, oldest first) followed by the new samples.
        kept = min(self._count, self.size)
        first = self._count % self.size  # ring position of the oldest kept sample when the ring is full
        if kept < self.size:
            first = 0
        hist_v = self._buf[first:first + kept]
        hist_t = self._times[first:first + kept]
        all_v = np.concatenate((hist_v, values))
        all_t = np.concatenate((hist_t, t))
        base = self._count - kept  # global index of all_v[0]

        # Window k covers global samples [k*hop, k*hop+size); new windows end inside the new samples.
        end_lo, end_hi = self._count, self._count + m - 1  # global index range of the new samples
        k_lo = max(0, -(-(end_lo - self.size + 1) // self.hop))
        k_hi = (end_hi - self.size + 1) // self.hop if end_hi >= self.size - 1 else -1
        out: list[Window] = []
        if k_hi >= k_lo:
            starts = np.arange(k_lo, k_hi + 1) * self.hop - base
            index = starts[:, None] + np.arange(self.size)[None, :]
            data = all_v[index]  # fancy indexing: a fresh (n, size, C) array
            for j in range(len(starts)):
                s = int(starts[j])
                out.append(Window(seq=self._seq + j, start_s=float(all_t[s]),
                                  end_s=float(all_t[s + self.size - 1]), data=data[j].copy()))
            self._seq += len(starts)

        # Write the latest `size` samples back into the ring at their positions (twice each).
        tail = min(self.size, len(all_v))
        glob = np.arange(self._count + m - tail, self._count + m)
        pos = glob % self.size
        self._buf[pos] = all_v[-tail:]
        self._buf[pos + self.size] = all_v[-tail:]
        self._times[pos] = all_t[-tail:]
        self._times[pos + self.size] = all_t[-tail:]
        self._count += m
        self._last_t = float(t[-1])
        return out
