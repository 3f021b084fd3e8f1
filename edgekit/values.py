"""Typed values passed between the stages of the data's path. Each checks its invariants on construction.

source -> Sample (or SampleBlock) -> window -> Window -> features -> Features -> gate/predict -> GateDecision, Prediction
-> Result. Must not import any stage module (they import this).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np


@dataclass(frozen=True, slots=True)
class Sample:
    """One multi-channel reading. `t_s` is the sensor's time in seconds."""

    t_s: float
    values: np.ndarray  # float64, shape (channels,)

    def __post_init__(self) -> None:
        if self.values.ndim != 1:
            raise ValueError(f"Sample.values must be 1-D (got shape {self.values.shape})")
        if not np.isfinite(self.t_s):
            raise ValueError(f"Sample.t_s must be finite (got {self.t_s!r})")
        if not np.isfinite(self.values).all():
            raise ValueError(f"Sample.values must be finite (got {self.values.tolist()!r})")


@dataclass(frozen=True, slots=True)
class SampleBlock:
    """Consecutive validated readings in one value: `t_s` (n,) seconds, `values` (n, channels) float64.

    What a source yields when it has many samples at once (a file replayed at speed 0, a simulation), so
    the agent windows them with one `Windower.push_many` call instead of n `push` calls. Same invariants
    as n `Sample`s plus time order inside the block (equal times allowed, as `Windower` allows them).
    """

    t_s: np.ndarray  # float64, shape (n,), n >= 1
    values: np.ndarray  # float64, shape (n, channels)

    def __post_init__(self) -> None:
        t, v = self.t_s, self.values
        if t.ndim != 1 or len(t) == 0:
            raise ValueError(f"SampleBlock.t_s must be 1-D and non-empty (got shape {t.shape})")
        if v.ndim != 2 or v.shape[0] != t.shape[0]:
            raise ValueError(f"SampleBlock.values must be ({len(t)}, channels) (got shape {v.shape})")
        if not np.isfinite(t).all():
            bad = int(np.flatnonzero(~np.isfinite(t))[0])
            raise ValueError(f"SampleBlock.t_s must be finite (got {float(t[bad])!r} at row {bad})")
        if not np.isfinite(v).all():
            bad = int(np.flatnonzero(~np.isfinite(v).all(axis=1))[0])
            raise ValueError(f"SampleBlock.values must be finite (got {v[bad].tolist()!r} at row {bad})")
        steps = np.diff(t)
        if (steps < 0).any():
            bad = int(np.flatnonzero(steps < 0)[0]) + 1
            raise ValueError(f"SampleBlock.t_s goes back at row {bad}: {float(t[bad])!r} after {float(t[bad - 1])!r}")

    def __len__(self) -> int:
        return int(self.t_s.shape[0])

    def samples(self) -> list[Sample]:
        """The same readings one `Sample` each (for consumers that take one at a time)."""
        return [Sample(float(self.t_s[k]), self.values[k]) for k in range(len(self))]


@dataclass(frozen=True, slots=True)
class Quarantined:
    """A line or message from a source that could not become a Sample, and why."""

    where: str  # e.g. "1-1_lb.txt:57"
    reason: str
    raw: str


@dataclass(frozen=True, slots=True)
class Window:
    """`data` holds `size` consecutive samples, shape (size, channels); `seq` counts windows from 0."""

    seq: int
    start_s: float
    end_s: float
    data: np.ndarray

    def __post_init__(self) -> None:
        if self.data.ndim != 2:
            raise ValueError(f"Window.data must be 2-D (size, channels) (got shape {self.data.shape})")
        if self.end_s < self.start_s:
            raise ValueError(f"Window end_s {self.end_s} before start_s {self.start_s}")


@dataclass(frozen=True, slots=True)
class Features:
    names: tuple[str, ...]
    values: np.ndarray  # float32, shape (len(names),)

    def __post_init__(self) -> None:
        if self.values.shape != (len(self.names),):
            raise ValueError(f"Features.values shape {self.values.shape} != ({len(self.names)},)")


@dataclass(frozen=True, slots=True)
class GateDecision:
    """`defer` hands the case to a person; `reasons` say why (ood, disagreement, low_confidence)."""

    action: Literal["accept", "defer"]
    reasons: tuple[str, ...]
    scores: dict[str, float]
    thresholds: dict[str, float]

    def __post_init__(self) -> None:
        if self.action not in ("accept", "defer"):
            raise ValueError(f"GateDecision.action must be accept or defer (got {self.action!r})")
        if (self.action == "defer") != bool(self.reasons):
            raise ValueError(f"GateDecision: defer needs reasons and accept none (got {self.action}, {self.reasons})")


@dataclass(frozen=True, slots=True)
class Prediction:
    label: str
    confidence: float
    probs: tuple[float, ...]
    second_label: str | None = None
    second_probs: tuple[float, ...] | None = None


@dataclass(frozen=True, slots=True)
class Result:
    """What the agent publishes for one window."""

    id: str
    seq: int
    window: Window
    features: Features
    prediction: Prediction
    decision: GateDecision
    created_s: float = field(default=0.0)
