"""What a person gets with a deferred window (issue 15): the Review message, its signal with each channel's
unit and the range the training windows covered (the bundle's input envelope), and each feature's
percentile in the training population (edgekit/population.py), so the hub's case page can say what is
unusual without the bundle. Built once per bundle by the agent. numpy only; must not import onnxruntime,
paho, the hub or torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekit.contract import messages
from edgekit.population import Placer


class ReviewBuilder:
    """The bundle's facts a review carries, read once from its manifest: channel names, units and training
    ranges (None when the bundle has none), and a Placer for the features' percentiles (None: no population)."""

    def __init__(self, manifest: Any) -> None:
        inp = manifest.input
        self.channels = list(inp.channels or [])
        self.rate_hz = inp.rate_hz
        self.feature_names = list(inp.feature_names)
        units = inp.units or {}
        self.units = [str(units.get(c, "")) for c in self.channels] if units else None
        env = inp.envelope.channels if inp.envelope is not None else None
        self.ranges = ([[float(lo), float(hi)] for lo, hi in zip(env.low, env.high)]
                       if env is not None and len(env.low) == len(self.channels) else None)
        population = getattr(manifest, "population", None)
        self.placer = Placer(population, self.feature_names) if population is not None else None

    def review(self, result: messages.Result, features: np.ndarray | None, points: list[list[float]],
               start_s: float | None, relative: np.ndarray | None = None) -> messages.Review:
        """The Review of a deferred `result`: its raw features (None: the window never reached the features),
        the signal's `points` (downsampled per channel) from `start_s`, and with a baseline the features
        relative to it (None: no baseline yet, or none in the bundle)."""
        named = {} if features is None else dict(zip(self.feature_names, features.tolist()))
        placed = None
        if self.placer is not None and features is not None:
            row = self.placer.place(np.asarray(features, dtype=np.float64)[None, :])[0]
            placed = {n: round(float(p), 1) for n, p in zip(self.feature_names, row.tolist()) if np.isfinite(p)}
        signal = messages.Signal(self.channels, self.rate_hz, start_s, points, self.units, self.ranges)
        rel = None if relative is None else dict(zip(self.feature_names, relative.tolist()))
        return messages.Review(result, named, signal, placed, rel)
