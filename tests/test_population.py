"""Where a window's features stand among the training windows (edgekit/population.py): Placer, which the agent
runs on every deferred window's features (issue 15), gives population.percentiles' rule (linear between
quantiles, the middle of a flat stretch, 0 and 100 outside) on whole rows at once."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from edgekit.population import Placer, percentiles, quantiles


def _reference(population: SimpleNamespace, features: dict[str, float]) -> dict[str, float]:
    """population.percentiles as it was: one np.interp each way per feature (the middle of a flat stretch)."""
    probs = np.asarray(population.probs, dtype=np.float64)
    out = {}
    for name, value in features.items():
        qs = np.asarray(population.quantiles[name], dtype=np.float64)
        lo, hi = np.interp(value, qs, probs, left=0.0, right=100.0), np.interp(-value, -qs[::-1], probs[::-1])
        out[name] = round(float((lo + hi) / 2), 1)
    return out


def test_placer_gives_the_per_feature_rule_on_whole_rows() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 4))
    x[:, 2] = np.round(x[:, 2])  # ties: flat stretches of quantiles
    x[:300, 3] = 0.0
    names = ["a", "b", "c", "d"]
    pop = SimpleNamespace(**quantiles(x, names))
    rows = rng.normal(size=(300, 4)) * 2
    rows[::3, 2] = np.round(rows[::3, 2])
    rows[::3, 3] = 0.0
    placed = Placer(pop, [*names, "unknown"]).place(np.column_stack([rows, np.zeros(len(rows))]))
    assert np.isnan(placed[:, 4]).all()
    for row, got in zip(rows, placed):
        want = _reference(pop, dict(zip(names, row.tolist())))
        assert {n: round(float(p), 1) for n, p in zip(names, got)} == want
        assert percentiles(pop, dict(zip(names, row.tolist()))) == want
    assert np.isnan(Placer(pop, names).place(np.array([[np.nan, np.inf, 0.0, 0.0]]))[0, :2]).all()
