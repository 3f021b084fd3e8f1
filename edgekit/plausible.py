"""Plausibility, the check before the models: a window whose samples leave the range recorded in the bundle,
or whose features are not finite, never reaches a model; the agent defers it as `implausible` with a
reason naming the channel or feature.

Why: a sample like 4e300 is finite, passes every line check, and turns into NaN features (its square
overflows); models then answer NaN and a gate written with `>` accepts it (issue 10; FIELD-NOTES.md). The
range comes from the training data (manifest `input.plausible`, written by export); bundles without one
get the finiteness checks only.

The envelope (`EnvelopeCheck`, manifest `input.envelope`, issue 14) is the tighter check inside that range:
what the training data showed per channel (its range, and how much it moves within a window) and per
feature. A window outside it still runs through the models (the reviewer sees what they say) but none is
trusted: the gate defers it with reasons naming the channel or feature (`out_of_range:<channel>`,
`stuck:<channel>`, `feature_range:<feature>`, `relation:<channel>`). One dead channel among eight moves an
autoencoder's error over 104 features too little to defer (issue 14 measured 87 % of such windows accepted); a
check per channel does not dilute it. A gain or a swapped wiring can keep every channel inside its own range:
`ChannelRelations` checks how each channel moves with the others, as training showed, and names the channel
that breaks it. Must not import onnxruntime, paho or torch: it only compares numbers.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Plausibility:
    channels: tuple[str, ...]
    low: np.ndarray | None  # (C,) float64, or None: finiteness only
    high: np.ndarray | None

    @classmethod
    def from_manifest(cls, manifest: Any) -> Plausibility:
        inp = manifest.input
        channels = tuple(inp.channels or ())
        rng = inp.plausible
        if rng is None:
            return cls(channels, None, None)
        return cls(channels, np.asarray(rng.low, dtype=np.float64), np.asarray(rng.high, dtype=np.float64))

    def windows(self, data: np.ndarray, extremes: tuple[np.ndarray, np.ndarray] | None = None
                ) -> list[str | None]:
        """(n, W, C) raw windows -> per window None (plausible) or why not, naming the channel. `extremes`:
        the windows' per-channel (min, max), (n, C) each, when the caller has them already."""
        if extremes is None and self.low is not None and self.high is not None and len(data) == 1:
            # one window (the paced path): one pass, no per-channel extremes unless something is off
            if ((data >= self.low) & (data <= self.high)).all():
                return [None]
        lo, hi = extremes if extremes is not None else (data.min(axis=1), data.max(axis=1))  # NaN propagates
        if self.low is None or self.high is None:
            bad = ~(np.isfinite(lo) & np.isfinite(hi))
        else:
            bad = ~((lo >= self.low) & (hi <= self.high))  # NaN fails both comparisons
        out: list[str | None] = [None] * len(data)
        if not bad.any():
            return out
        for i in np.flatnonzero(bad.any(axis=1)).tolist():
            c = int(np.flatnonzero(bad[i])[0])
            column = data[i, :, c]
            name = self.channels[c] if c < len(self.channels) else f"ch{c}"
            nonfinite = ~np.isfinite(column)
            if nonfinite.any():
                out[i] = f"channel {name!r} is not finite (got {float(column[nonfinite][0])!r})"
                continue
            assert self.low is not None and self.high is not None
            value = float(lo[i, c]) if lo[i, c] < self.low[c] else float(hi[i, c])
            out[i] = (f"channel {name!r} = {value:.6g}, outside the plausible range "
                      f"[{self.low[c]:.6g}, {self.high[c]:.6g}] recorded in the bundle")
        return out

    @staticmethod
    def features(normalised: np.ndarray, raw: np.ndarray, names: Sequence[str]) -> list[str | None]:
        """(n, F) features as the models get them -> per row None or why not, naming the first bad feature.
        Checked after normalisation to float32: a raw value past float32's range becomes inf there."""
        bad = ~np.isfinite(normalised)
        out: list[str | None] = [None] * len(normalised)
        if not bad.any():
            return out
        for i in np.flatnonzero(bad.any(axis=1)).tolist():
            f = int(np.flatnonzero(bad[i])[0])
            name = names[f] if f < len(names) else f"f{f}"
            out[i] = f"feature {name!r} is not finite for the model (raw value {float(raw[i, f])!r})"
        return out


# The envelope's reasons, each with the channel or feature it names after the ':' (gate.REASON_TEXT's keys).
ENVELOPE_REASONS = ("stuck", "out_of_range", "feature_range", "relation")
# Names per window: a result's reasons are kept comma-joined in 512 characters by the hub, and a person reads
# the first few; channels are named before features, and a feature of a channel already named is left out.
MAX_NAMED = 3
NAME_MAX = 100  # characters of one reason (the contract's limit is 128)


def _reason(kind: str, name: str) -> str:
    """`kind:name`, short enough for the contract and without the comma the hub joins reasons with."""
    return f"{kind}:{name.replace(',', ' ')}"[:NAME_MAX]


def _channel_of(feature: str, channels: Sequence[str]) -> str | None:
    """The channel a feature is computed from ('<channel>.<stat>'), or None for a derived feature."""
    head = feature.rsplit(".", 1)[0]
    return head if head in channels else None


def relation_stats(lo: np.ndarray, hi: np.ndarray, log_level: np.ndarray, level_floor: np.ndarray,
                   spread_floor: np.ndarray) -> np.ndarray:
    """THE statistics the relations are between, from each window's per-channel extremes (n, C) each: per
    channel its level (the midrange; its log, floored at `level_floor`, for a channel whose training windows
    never reached 0: a gain or a change of units is then a shift) and its log spread (max - min, floored at
    `spread_floor`: a still window is as quiet as the quietest moving one), (n, 2C): levels, then spreads.
    Export fits the relations on these (exporters/export/export.py), the agent checks them."""
    out = np.empty((len(lo), 2 * lo.shape[1]))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        _fill_stats(out, lo, hi, np.flatnonzero(log_level), level_floor, spread_floor)
    return out


def _fill_stats(out: np.ndarray, lo: np.ndarray, hi: np.ndarray, log_idx: np.ndarray, level_floor: np.ndarray,
                spread_floor: np.ndarray) -> None:
    """relation_stats into `out[:, :2C]`, in place (the agent's path: no temporaries it can avoid)."""
    c = lo.shape[1]
    level, spread = out[:, :c], out[:, c:2 * c]
    np.multiply(lo, 0.5, out=level)
    level += 0.5 * hi  # not (lo + hi) / 2: no overflow past float64 for huge readings
    if len(log_idx):
        level[:, log_idx] = np.log(np.maximum(level[:, log_idx], level_floor[log_idx]))
    np.subtract(hi, lo, out=spread)
    np.maximum(spread, spread_floor, out=spread)
    np.log(spread, out=spread)


@dataclass(frozen=True)
class ChannelRelations:
    """How the channels move together in the training data (manifest `input.envelope.relations`): per
    channel, linear models of its two statistics (relation_stats, standardised by `mean` and `std`) from the
    other channels' statistics, fitted on the train split, and the range of each model's residual. Model set
    0 uses every other channel; set e + 1 leaves channel e out too (its coefficients are 0).

    `outside`: a window whose residual under set 0 leaves its range broke a relation training always showed
    (a 10x gain on one of two accelerometers that read in a fixed ratio; two channels swapped). `name`: which
    channel broke it: the channel e whose removal leaves the others most alike their training relations (the
    least sum of squared residuals under set e + 1, each in half-widths of its range from the range's
    centre), as a faulty channel's own relations and every relation it feeds go wrong together."""

    channels: tuple[str, ...]
    log_level: np.ndarray  # (C,) bool
    level_floor: np.ndarray  # (C,)
    spread_floor: np.ndarray  # (C,)
    mean: np.ndarray  # (2C,)
    std: np.ndarray  # (2C,)
    weights: np.ndarray  # (C + 1, C, 2, 2C + 1): per model set, channel, statistic: coefficients, intercept
    low: np.ndarray  # (C + 1, C, 2) residual range; (e + 1, e) unused
    high: np.ndarray

    @classmethod
    def from_envelope(cls, channels: Sequence[str], rel: Any) -> ChannelRelations:
        """From the manifest's `input.envelope.relations`."""
        def arr(v: Any, dtype: Any = np.float64) -> np.ndarray:
            return np.asarray(v, dtype=dtype)

        return cls(tuple(channels), arr(rel.log_level, bool), arr(rel.level_floor), arr(rel.spread_floor),
                   arr(rel.mean), arr(rel.std), arr(rel.weights), arr(rel.low), arr(rel.high))

    @functools.cached_property
    def _matrix(self) -> np.ndarray:
        """(2C + 1, (C + 1) x C x 2): every model's residual as one linear map of a window's raw statistics and
        a 1 (the standardisation folded in), so a window costs one matrix product: with z = (s - mean) / std,
        residual = z[own] - w . z - intercept = sum_j ((own == j) - w_j) / std_j x s_j - ((own == j) - w_j)
        . mean / std - intercept."""
        c = len(self.channels)
        w = self.weights[..., :2 * c]  # (C + 1, C, 2, 2C)
        own = np.zeros_like(w)
        for k in range(c):
            own[:, k, 0, k] = 1.0
            own[:, k, 1, c + k] = 1.0
        a = (own - w) / self.std  # coefficients on the raw statistics
        a0 = -(a * self.mean).sum(axis=-1) - self.weights[..., 2 * c]
        return np.concatenate([a.reshape(-1, 2 * c), a0.reshape(-1, 1)], axis=1).T.copy()

    @functools.cached_property
    def _log(self) -> np.ndarray:
        return np.flatnonzero(self.log_level)

    @functools.cached_property
    def _first(self) -> np.ndarray:
        """`_matrix`'s columns of set 0 (the detection), contiguous."""
        return self._matrix[:, :2 * len(self.channels)].copy()

    def _stats1(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        c = len(self.channels)
        s1 = np.empty((len(lo), 2 * c + 1))
        s1[:, 2 * c] = 1.0
        _fill_stats(s1, lo, hi, self._log, self.level_floor, self.spread_floor)
        return s1

    def residuals(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """(n, C + 1, C, 2): each window's residual under every model; set 0's by the very arithmetic of
        `outside` (export sets the ranges from these: a window on a range's edge is inside it here too)."""
        c = len(self.channels)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            s1 = self._stats1(lo, hi)
            r = s1 @ self._matrix
            r[:, :2 * c] = s1 @ self._first
        return r.reshape(len(lo), -1, c, 2)

    def outside(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """(n,) True where a residual of model set 0 leaves its range (NaN fails, so it is outside)."""
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            r = self._stats1(lo, hi) @ self._first
            return ~((r >= self._first_low) & (r <= self._first_high)).all(axis=1)

    @functools.cached_property
    def _first_low(self) -> np.ndarray:
        return self.low[0].ravel().copy()

    @functools.cached_property
    def _first_high(self) -> np.ndarray:
        return self.high[0].ravel().copy()

    def name(self, lo: np.ndarray, hi: np.ndarray) -> list[int | None]:
        """Per window, the index of the channel that best explains a broken relation, or None when no
        statistic is finite enough to say."""
        c = len(self.channels)
        centre, scale = self._leave_one_out
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            s1 = self._stats1(lo, hi)
            # each residual of sets 1.. in half-widths of its range from the range's centre, squared, summed
            # per set (a left-out channel's own entries weigh 0: its scale is 0)
            dev = ((((s1 @ self._rest) - centre) * scale) ** 2).reshape(len(lo), c, 2 * c).sum(axis=2)
        dev = np.where(np.isfinite(dev), dev, np.inf)
        best = dev.argmin(axis=1)
        return [int(e) if np.isfinite(dev[i, e]) else None for i, e in enumerate(best.tolist())]

    @functools.cached_property
    def _rest(self) -> np.ndarray:
        """`_matrix`'s columns of sets 1.. (the naming), contiguous."""
        return self._matrix[:, 2 * len(self.channels):].copy()

    @functools.cached_property
    def _leave_one_out(self) -> tuple[np.ndarray, np.ndarray]:
        """Sets 1..'s range centres and 2 / widths, flat in `_rest`'s order; scale 0 for set e + 1's channel e."""
        c = len(self.channels)
        used = np.broadcast_to(~np.eye(c, dtype=bool)[:, :, None], (c, c, 2))
        width = np.where(used, self.high[1:] - self.low[1:], 1.0)
        return (0.5 * (self.high[1:] + self.low[1:])).ravel(), np.where(used, 2.0 / width, 0.0).ravel()


class StillRuns:
    """Per channel, how many windows in a row have been still (spread below the envelope's `stuck_below`), up
    to and including each window of a stream: the state behind `stuck_after` (a channel that is flat now and
    then in training, e.g. a quantised pressure reading, is stuck only when flat for longer than training ever
    showed). One per device stream (the pipeline's); windows must come in order."""

    def __init__(self, channels: int) -> None:
        self._carry = np.zeros(channels, dtype=np.int64)

    def reset(self) -> None:
        """A new stream (another recording, a restarted device): nothing was still before it."""
        self._carry = np.zeros_like(self._carry)  # a new array: runs handed out before stay as they were

    def update(self, still: np.ndarray) -> np.ndarray:
        """(n, C) booleans for the next n windows -> (n, C) the still run ending at each (0 where not still)."""
        still = np.asarray(still, dtype=bool)
        n = len(still)
        if n == 1:  # the paced path
            self._carry = np.where(still[0], self._carry + 1, 0)
            return self._carry[None]
        if not n:
            return np.zeros(still.shape, dtype=np.int64)
        at = np.arange(1, n + 1)[:, None]
        last_moving = np.maximum.accumulate(np.where(still, 0, at), axis=0)  # 1-based row of the last non-still
        runs = at - last_moving + np.where(last_moving == 0, self._carry, 0)
        self._carry = runs[-1].copy()
        return runs


@dataclass(frozen=True)
class EnvelopeCheck:
    """The envelope rule, once: per window, which channels left their training range (`out_of_range`),
    which stopped moving (`stuck`: spread below `stuck_below`, 0 = never, in `stuck_after` windows in a row,
    counted by the caller's StillRuns), which raw features left theirs (`feature_range`) and which channel
    broke the relations between channels (`relation`, ChannelRelations). Vectorised over a batch; every flag
    but the still runs is a function of the window alone, so a window gets the same reasons alone as in any
    batch. NaN fails each comparison and is outside. Export calibration calls `outside` on its splits' window
    extremes and features (exporters/export/export.py), without runs: there a channel with `stuck_after` > 1
    is never stuck (a split's windows are not one stream)."""

    channels: tuple[str, ...]
    features: tuple[str, ...]
    low: np.ndarray | None = None  # (C,) or None: no channel checks
    high: np.ndarray | None = None
    stuck_below: np.ndarray | None = None
    f_low: np.ndarray | None = None  # (F,) or None: no feature checks
    f_high: np.ndarray | None = None
    stuck_after: np.ndarray | None = None  # (C,) windows in a row; None: 1 for every channel
    relations: ChannelRelations | None = None

    @classmethod
    def from_manifest(cls, manifest: Any) -> EnvelopeCheck | None:
        """The bundle's envelope, or None for a bundle without one (it behaves as before)."""
        inp = manifest.input
        env = getattr(inp, "envelope", None)
        if env is None:
            return None
        return cls.from_envelope(inp.channels or (), inp.feature_names, env)

    @classmethod
    def from_envelope(cls, channels: Sequence[str], features: Sequence[str], env: Any) -> EnvelopeCheck:
        """From a manifest.InputEnvelope (export builds one from the envelope it writes)."""
        ch, ft = env.channels, env.features

        def arr(values: Any) -> np.ndarray | None:
            return None if values is None else np.asarray(values, dtype=np.float64)

        channels = tuple(channels)
        rel = env.relations
        return cls(channels, tuple(features),
                   arr(ch and ch.low), arr(ch and ch.high), arr(ch and ch.stuck_below),
                   arr(ft and ft.low), arr(ft and ft.high),
                   None if ch is None or ch.stuck_after is None else np.asarray(ch.stuck_after, dtype=np.int64),
                   None if rel is None else ChannelRelations.from_envelope(channels, rel))

    @property
    def checks_channels(self) -> bool:
        return self.low is not None or self.relations is not None

    @property
    def counts_runs(self) -> bool:
        """Whether a channel needs more than one still window to be stuck (the caller keeps StillRuns)."""
        return self.stuck_after is not None and bool((self.stuck_after > 1).any())

    def still(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """(n, C) True where a channel's window is still (spread below `stuck_below`): StillRuns' input."""
        assert self.stuck_below is not None
        return (hi - lo) < self.stuck_below

    @functools.cached_property
    def _stuck_at_once(self) -> np.ndarray:
        """`stuck_below` where one still window is stuck, 0 (never) where it takes a run of them."""
        assert self.stuck_below is not None
        if self.stuck_after is None:
            return self.stuck_below
        return np.where(self.stuck_after <= 1, self.stuck_below, 0.0)

    def _stuck(self, lo: np.ndarray, hi: np.ndarray, runs: np.ndarray | None) -> np.ndarray:
        if runs is None or self.stuck_after is None:
            return (hi - lo) < self._stuck_at_once  # NaN compares False: a NaN window is `out` already
        return (runs >= self.stuck_after) & ((hi - lo) < self.stuck_below)

    def flags(self, lo: np.ndarray | None, hi: np.ndarray | None, raw: np.ndarray | None,
              runs: np.ndarray | None = None) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """(stuck (n, C), out_of_range (n, C), feature_range (n, F)) booleans, None where not checked:
        `lo`/`hi` the windows' per-channel min and max, `raw` the raw features, `runs` StillRuns' counts."""
        stuck = out = feat = None
        if self.low is not None and lo is not None and hi is not None:
            assert self.high is not None and self.stuck_below is not None
            out = ~((lo >= self.low) & (hi <= self.high))
            stuck = self._stuck(lo, hi, runs)
        if self.f_low is not None and self.f_high is not None and raw is not None:
            feat = ~((raw >= self.f_low) & (raw <= self.f_high))
        return stuck, out, feat

    @functools.cached_property
    def _lower(self) -> np.ndarray:
        """The bounds as one row of lower limits: [low, -high, stuck_below, f_low, -f_high] (stuck_below 0
        where a channel takes a run of still windows: StillRuns' part)."""
        parts = []
        if self.low is not None and self.high is not None and self.stuck_below is not None:
            parts += [self.low, -self.high, self._stuck_at_once]
        if self.f_low is not None and self.f_high is not None:
            parts += [self.f_low, -self.f_high]
        return np.concatenate(parts) if parts else np.empty(0)

    def outside(self, lo: np.ndarray | None, hi: np.ndarray | None, raw: np.ndarray | None,
                runs: np.ndarray | None = None) -> np.ndarray:
        """(n,) True where any check defers the window: what export calibration removes from acceptance.
        One comparison of each window's [lo, -hi, hi - lo, raw, -raw] with `_lower` (negation is exact and
        NaN fails `>=`, so it is `flags`' test): the window-at-a-time path pays a handful of numpy calls; then
        the still runs (`runs`, StillRuns' counts, where a channel takes more than one window) and the
        relations."""
        return self._outside(lo, hi, raw, runs)[0]

    def _outside(self, lo: np.ndarray | None, hi: np.ndarray | None, raw: np.ndarray | None,
                 runs: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """`outside`, and the relations' part of it (None without relations)."""
        out = self._outside_ranges(lo, hi, raw)
        if runs is not None and self.counts_runs and lo is not None and hi is not None:
            out |= self._stuck(lo, hi, runs).any(axis=1)
        related = None
        if self.relations is not None and lo is not None and hi is not None:
            related = self.relations.outside(lo, hi)
            out |= related
        return out, related

    def _outside_ranges(self, lo: np.ndarray | None, hi: np.ndarray | None, raw: np.ndarray | None) -> np.ndarray:
        n = len(lo) if lo is not None else len(raw) if raw is not None else 0
        c = len(self.low) if self.low is not None else 0
        parts: list[tuple[np.ndarray, bool]] = []  # (values, negated)
        lower = []
        if c and lo is not None and hi is not None:
            parts += [(lo, False), (hi, True), (hi - lo, False)]
            lower.append(self._lower[:3 * c])
        if self.f_low is not None and raw is not None:
            parts += [(raw, False), (raw, True)]
            lower.append(self._lower[3 * c:])
        if not parts:
            return np.zeros(n, dtype=bool)
        width = sum(v.shape[1] for v, _ in parts)
        buf = np.empty((n, width))
        at = 0
        for v, negated in parts:
            k = v.shape[1]
            if negated:
                np.negative(v, out=buf[:, at:at + k])
            else:
                buf[:, at:at + k] = v
            at += k
        bounds = lower[0] if len(lower) == 1 else self._lower
        return ~(buf >= bounds).all(axis=1)

    def reasons(self, lo: np.ndarray | None, hi: np.ndarray | None, raw: np.ndarray | None,
                runs: np.ndarray | None = None) -> list[tuple[str, ...]]:
        """Per window the reasons naming what left the envelope (an empty tuple: inside it), at most
        MAX_NAMED: stuck channels, then channels out of range (furthest first, in envelope widths), then
        features out of range (furthest first) whose channel is not named yet, then the channel that broke
        the relations, when not named yet. `runs`: StillRuns' counts for these windows (None: one still
        window at most)."""
        n = len(lo) if lo is not None else len(raw) if raw is not None else 0
        result: list[tuple[str, ...]] = [()] * n
        outside, broke_all = self._outside(lo, hi, raw, runs)
        rows = np.flatnonzero(outside)
        if not len(rows):
            return result
        if len(rows) < n:  # the per-check flags of the windows outside only (elementwise: the same values)
            lo, hi, raw, runs = (None if a is None else a[rows] for a in (lo, hi, raw, runs))
        stuck, out, feat = self.flags(lo, hi, raw, runs)
        related: list[int | None] = [None] * len(rows)
        if broke_all is not None and lo is not None and hi is not None:
            broke = np.flatnonzero(broke_all[rows])
            if len(broke):
                for k, e in zip(broke.tolist(), self.relations.name(lo[broke], hi[broke])):  # type: ignore[union-attr]
                    related[k] = e
        for i, w in enumerate(rows.tolist()):  # i: the row in the flags, w: the window in the batch
            named: list[str] = []
            seen: set[str] = set()
            if stuck is not None:
                for c in np.flatnonzero(stuck[i]).tolist():
                    named.append(_reason("stuck", self.channels[c]))
                    seen.add(self.channels[c])
            if out is not None and lo is not None and hi is not None and out[i].any():
                assert self.low is not None and self.high is not None
                for c in self._furthest(out[i], lo[i], hi[i], self.low, self.high):
                    named.append(_reason("out_of_range", self.channels[c]))
                    seen.add(self.channels[c])
            if feat is not None and raw is not None and feat[i].any() and len(named) < MAX_NAMED:
                assert self.f_low is not None and self.f_high is not None
                for j in self._furthest(feat[i], raw[i], raw[i], self.f_low, self.f_high):
                    channel = _channel_of(self.features[j], self.channels)
                    if channel is None or channel not in seen:
                        named.append(_reason("feature_range", self.features[j]))
                        if channel is not None:
                            seen.add(channel)
                    if len(named) >= MAX_NAMED:
                        break
            e = related[i]
            if e is not None and self.channels[e] not in seen and len(named) < MAX_NAMED:
                named.append(_reason("relation", self.channels[e]))
            result[w] = tuple(named[:MAX_NAMED])
        return result

    @staticmethod
    def _furthest(bad: np.ndarray, lo: np.ndarray, hi: np.ndarray, low: np.ndarray, high: np.ndarray) -> list[int]:
        """Indices flagged in `bad`, furthest outside first (in widths of their envelope; NaN first)."""
        idx = np.flatnonzero(bad)
        width = np.maximum(high[idx] - low[idx], np.finfo(np.float64).tiny)
        excess = np.maximum(low[idx] - lo[idx], hi[idx] - high[idx]) / width
        excess = np.where(np.isnan(excess), np.inf, excess)
        return idx[np.argsort(-excess, kind="stable")].tolist()
