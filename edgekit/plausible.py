"""Plausibility, the check before the models: a window whose samples leave the range recorded in the bundle,
or whose features are not finite, never reaches a model; the agent defers it as `implausible` with a
reason naming the channel or feature.

Why: a sample like 4e300 is finite, passes every line check, and turns into NaN features (its square
overflows); models then answer NaN and a gate written with `>` accepts it (issue 10; FIELD-NOTES.md). The
range comes from the training data (manifest `input.plausible`, written by export); bundles without one
get the finiteness checks only. Must not import onnxruntime, paho or torch: it only compares numbers.
"""

from __future__ import annotations

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

    def windows(self, data: np.ndarray) -> list[str | None]:
        """(n, W, C) raw windows -> per window None (plausible) or why not, naming the channel."""
        if self.low is not None and self.high is not None and len(data) == 1:
            # one window (the paced path): one pass, no per-channel extremes unless something is off
            if ((data >= self.low) & (data <= self.high)).all():
                return [None]
        lo, hi = data.min(axis=1), data.max(axis=1)  # (n, C); NaN propagates into both
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
