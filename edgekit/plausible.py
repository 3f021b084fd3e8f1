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
`stuck:<channel>`, `feature_range:<feature>`). One dead channel among eight moves an autoencoder's error
over 104 features too little to defer (issue 14 measured 87 % of such windows accepted); a check per channel
does not dilute it. Must not import onnxruntime, paho or torch: it only compares numbers.
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
ENVELOPE_REASONS = ("stuck", "out_of_range", "feature_range")
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


@dataclass(frozen=True)
class EnvelopeCheck:
    """The envelope rule, once: per window, which channels left their training range (`out_of_range`),
    which stopped moving (`stuck`: spread below `stuck_below`, 0 = never) and which raw features left theirs
    (`feature_range`). Vectorised over a batch; every flag is an elementwise comparison, so a window gets
    the same reasons alone as in any batch. NaN fails each comparison and is outside. Export calibration
    calls `outside` on its splits' window extremes and features (exporters/export/export.py)."""

    channels: tuple[str, ...]
    features: tuple[str, ...]
    low: np.ndarray | None = None  # (C,) or None: no channel checks
    high: np.ndarray | None = None
    stuck_below: np.ndarray | None = None
    f_low: np.ndarray | None = None  # (F,) or None: no feature checks
    f_high: np.ndarray | None = None

    @classmethod
    def from_manifest(cls, manifest: Any) -> EnvelopeCheck | None:
        """The bundle's envelope, or None for a bundle without one (it behaves as before)."""
        inp = manifest.input
        env = getattr(inp, "envelope", None)
        if env is None:
            return None
        ch, ft = env.channels, env.features

        def arr(values: Any) -> np.ndarray | None:
            return None if values is None else np.asarray(values, dtype=np.float64)

        return cls(tuple(inp.channels or ()), tuple(inp.feature_names),
                   arr(ch and ch.low), arr(ch and ch.high), arr(ch and ch.stuck_below),
                   arr(ft and ft.low), arr(ft and ft.high))

    @property
    def checks_channels(self) -> bool:
        return self.low is not None

    def flags(self, lo: np.ndarray | None, hi: np.ndarray | None, raw: np.ndarray | None
              ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """(stuck (n, C), out_of_range (n, C), feature_range (n, F)) booleans, None where not checked:
        `lo`/`hi` the windows' per-channel min and max, `raw` the raw features."""
        stuck = out = feat = None
        if self.low is not None and lo is not None and hi is not None:
            assert self.high is not None and self.stuck_below is not None
            out = ~((lo >= self.low) & (hi <= self.high))
            stuck = (hi - lo) < self.stuck_below  # NaN compares False: a NaN window is `out` already
        if self.f_low is not None and self.f_high is not None and raw is not None:
            feat = ~((raw >= self.f_low) & (raw <= self.f_high))
        return stuck, out, feat

    @functools.cached_property
    def _lower(self) -> np.ndarray:
        """The bounds as one row of lower limits: [low, -high, stuck_below, f_low, -f_high]."""
        parts = []
        if self.low is not None and self.high is not None and self.stuck_below is not None:
            parts += [self.low, -self.high, self.stuck_below]
        if self.f_low is not None and self.f_high is not None:
            parts += [self.f_low, -self.f_high]
        return np.concatenate(parts) if parts else np.empty(0)

    def outside(self, lo: np.ndarray | None, hi: np.ndarray | None, raw: np.ndarray | None) -> np.ndarray:
        """(n,) True where any check defers the window: what export calibration removes from acceptance.
        One comparison of each window's [lo, -hi, hi - lo, raw, -raw] with `_lower` (negation is exact and
        NaN fails `>=`, so it is `flags`' test): the window-at-a-time path pays a handful of numpy calls."""
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

    def reasons(self, lo: np.ndarray | None, hi: np.ndarray | None, raw: np.ndarray | None
                ) -> list[tuple[str, ...]]:
        """Per window the reasons naming what left the envelope (an empty tuple: inside it), at most
        MAX_NAMED: stuck channels, then channels out of range (furthest first, in envelope widths), then
        features out of range (furthest first) whose channel is not named yet."""
        n = len(lo) if lo is not None else len(raw) if raw is not None else 0
        result: list[tuple[str, ...]] = [()] * n
        rows = np.flatnonzero(self.outside(lo, hi, raw))
        if not len(rows):
            return result
        if len(rows) < n:  # the per-check flags of the windows outside only (elementwise: the same values)
            lo, hi, raw = (None if a is None else a[rows] for a in (lo, hi, raw))
        stuck, out, feat = self.flags(lo, hi, raw)
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
