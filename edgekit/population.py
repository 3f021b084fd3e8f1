"""Where a case's features stand in the training population: each feature's percentile (0-100) among the
training split's values, from quantiles the bundle carries (manifest `population`, written by export).

A reviewer or clinician reads "TUG 14.2 s (97th percentile)" faster than 14.2 beside a table of normals. The
quantiles are the training split's, before normalisation; numpy only, on the agent and the hub alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# 0, 1, 2.5, 5, 10, ..., 90, 95, 97.5, 99, 100: percentiles between these are interpolated linearly, so the
# tails, where a case worth a second look sits, are resolved to a percent.
PROBS = (0.0, 1.0, 2.5, 5.0, *np.arange(10.0, 91.0, 10.0).tolist(), 95.0, 97.5, 99.0, 100.0)


def quantiles(x: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """The manifest's `population` from the training split's raw features `x` (n, F): per finite feature
    column, its values at PROBS (NaNs ignored; a column with no finite value is left out)."""
    x = np.asarray(x, dtype=np.float64)
    out: dict[str, list[float]] = {}
    for j, name in enumerate(names):
        col = x[:, j][np.isfinite(x[:, j])]
        if len(col):
            out[name] = np.percentile(col, PROBS).tolist()
    return {"probs": list(PROBS), "n": int(len(x)), "quantiles": out}


def percentiles(population: Any, features: dict[str, float | None]) -> dict[str, float]:
    """Each feature's percentile in `population` (the manifest's Population, or None: {}), rounded to 0.1.
    Features the population lacks and non-finite values are left out; a value outside the training range
    gets 0 or 100 (the page says "below/above every training case")."""
    if population is None:
        return {}
    names = [n for n, v in features.items() if n in population.quantiles and v is not None]
    if not names:
        return {}
    placed = Placer(population, names).place(np.asarray([[features[n] for n in names]], dtype=np.float64))[0]
    return {n: round(float(p), 1) for n, p in zip(names, placed) if np.isfinite(p)}


class Placer:
    """`percentiles` for whole rows of features in `names` order at once (the agent places every deferred
    window's features; 104 features on this VM, busy: ~90 us for one row, ~30 us a row in a batch of 100, where
    one np.interp per feature took ~360 us a row).

    Between two different quantiles a value's percentile is interpolated linearly; on a flat stretch of
    equal quantiles (many equal training values) it is the middle of the stretch, not its edge; below the
    lowest 0, above the highest 100. A feature the population lacks, or a value that is not finite, is NaN."""

    def __init__(self, population: Any, names: Sequence[str]) -> None:
        probs = np.asarray(population.probs, dtype=np.float64)
        self.names = list(names)
        self.known = np.array([n in population.quantiles for n in self.names], dtype=bool)
        q = np.full((len(self.names), len(probs)), np.nan)
        for j, n in enumerate(self.names):
            if self.known[j]:
                q[j] = population.quantiles[n]
        self.q = q
        self.probs = probs

    def place(self, x: np.ndarray) -> np.ndarray:
        """(n, F) features in `names` order -> (n, F) percentiles (NaN where unknown or not finite)."""
        x = np.asarray(x, dtype=np.float64)
        q, p = self.q[None, :, :], self.probs
        last = len(p) - 1
        v = x[:, :, None]
        upper_i = np.sum(q <= v, axis=2)  # quantiles at or below the value
        lower_i = np.sum(q < v, axis=2)  # strictly below
        up = self._side(x, upper_i - 1, upper_i, last)
        lo = self._side(x, lower_i - 1, lower_i, last)
        out = (up + lo) / 2
        out[:, ~self.known] = np.nan
        out[~np.isfinite(x)] = np.nan
        return out

    def _side(self, x: np.ndarray, a: np.ndarray, b: np.ndarray, last: int) -> np.ndarray:
        """The linear interpolation of x between quantiles a and b (0 below the first, 100 past the last)."""
        p = self.probs
        ac, bc = np.maximum(a, 0), np.minimum(b, last)
        cols = np.arange(x.shape[1])[None, :]
        qa, qb = self.q[cols, ac], self.q[cols, bc]
        width = qb - qa
        flat = width <= 0
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.minimum(np.maximum((x - qa) / np.where(flat, 1.0, width), 0.0), 1.0)
        frac[flat] = 0.0
        out = p[ac] + frac * (p[bc] - p[ac])
        out[a < 0] = p[0]
        out[b > last] = p[last]
        return out
