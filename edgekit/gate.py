"""The gate: accept a window's prediction, or defer it to a person with the reasons and the scores.

Three independent checks against thresholds calibrated at export (edgekit/manifest.py `thresholds`):
    ood             autoencoder reconstruction error > ood_max_score   (input unlike the training data)
    disagreement    total variation distance between predictor and second opinion > max_disagreement
    low_confidence  predictor's top probability < min_confidence
Must not import onnxruntime, paho or torch: it only compares numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekit.values import GateDecision

REASONS = ("ood", "disagreement", "low_confidence")


def confidence(probs: np.ndarray) -> np.ndarray:
    """Top-class probability per row."""
    return probs.max(axis=-1)


def disagreement(probs: np.ndarray, second_probs: np.ndarray) -> np.ndarray:
    """Total variation distance between two probability vectors per row (0 = same, 1 = disjoint)."""
    return 0.5 * np.abs(probs - second_probs).sum(axis=-1)


@dataclass(frozen=True)
class Gate:
    ood_max_score: float
    min_confidence: float
    max_disagreement: float
    enabled: bool = True
    defer_all: bool = False  # export could certify no threshold for the target error: a person decides all

    def __post_init__(self) -> None:
        for name in ("ood_max_score", "min_confidence", "max_disagreement"):
            value = getattr(self, name)
            if not np.isfinite(value):
                raise ValueError(f"Gate.{name} must be finite (got {value!r})")

    @property
    def thresholds(self) -> dict[str, float]:
        return {"ood_max_score": float(self.ood_max_score), "min_confidence": float(self.min_confidence),
                "max_disagreement": float(self.max_disagreement)}

    def decide(self, probs: np.ndarray, second_probs: np.ndarray | None, ood_score: float | None) -> GateDecision:
        """One window: `probs` (K,), `second_probs` (K,) or None, the autoencoder score or None."""
        conf = float(probs.max())
        scores = {"confidence": conf}
        reasons = []
        if ood_score is not None:
            scores["ood"] = float(ood_score)
            if ood_score > self.ood_max_score:
                reasons.append("ood")
        if second_probs is not None:
            dis = float(0.5 * np.abs(probs - second_probs).sum())
            scores["disagreement"] = dis
            if dis > self.max_disagreement:
                reasons.append("disagreement")
        if conf < self.min_confidence or self.defer_all:
            reasons.append("low_confidence")
        if not self.enabled:
            reasons = []
        return GateDecision("defer" if reasons else "accept", tuple(reasons), scores, self.thresholds)
