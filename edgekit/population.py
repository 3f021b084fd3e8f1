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
    probs = np.asarray(population.probs, dtype=np.float64)
    out = {}
    for name, value in features.items():
        q = population.quantiles.get(name)
        if q is None or value is None or not np.isfinite(value):
            continue
        qs = np.asarray(q, dtype=np.float64)
        # a flat stretch of quantiles (many equal training values): the middle of the stretch, not its edge
        lo, hi = np.interp(value, qs, probs, left=0.0, right=100.0), np.interp(-value, -qs[::-1], probs[::-1])
        out[name] = round(float((lo + hi) / 2), 1)
    return out
