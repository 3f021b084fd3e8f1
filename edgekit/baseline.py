"""Each machine's own normal (issue 14, commissioning): features relative to the first N windows of a device.

Why: two pumps of one model idle at different flow rates, pressures and temperatures; a model trained on
absolute levels learns which recording it saw, and a new machine looks abnormal from its first window. In
the field condition monitoring compares a machine with its own commissioning readings. A recipe's
`[baseline] windows = N` makes that the product: training standardises every recording's features by its own
first N windows, and the agent does the same with the device's own first N windows (or a baseline file, or
N windows again on command) before the bundle's usual normalisation, so the models only ever see "relative
to this machine's normal". The rule is `relative` below, once, used by training and by the agent.

A feature whose baseline std is tiny (a quantity that did not move in N windows) would turn every later
wobble into a huge deviation, so its std is floored at `std_floor` (the recipe's, e.g. 0.1) times that
feature's spread over the training split (its std over every train window, before any baseline): a
deviation counts in units of at least a tenth of how much the feature varies across all training machines.

numpy only (training imports it; the agent holds it with its outbox state). Must not import onnxruntime,
paho, torch or the training side.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgekit.errors import ConfigError

SCHEMA = "edgekit.baseline/1"
MIN_STD = 1e-6  # a floor never below this (training's own STD_FLOOR): no division by zero
Source = Literal["learned", "command", "file"]
SOURCES: tuple[Source, ...] = ("learned", "command", "file")


# --- the rule --------------------------------------------------------------------------------------


def std_floor(spread: np.ndarray, fraction: float) -> np.ndarray:
    """Per feature, the least std a baseline divides by: `fraction` x the feature's training spread (its std
    over the train split's windows), at least MIN_STD."""
    return np.maximum(fraction * np.asarray(spread, dtype=np.float64), MIN_STD)


def fit(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, F) raw features of the baseline windows -> per-feature mean and std (ddof 0), float64."""
    x = np.asarray(raw, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"a baseline needs at least 2 windows of features (got shape {x.shape})")
    return x.mean(axis=0), x.std(axis=0)


def relative(raw: np.ndarray, mean: np.ndarray, std: np.ndarray, floor: np.ndarray) -> np.ndarray:
    """THE rule: (raw - mean) / max(std, floor), per feature, in float64: how many of this machine's own
    standard deviations each feature sits from its baseline."""
    return (np.asarray(raw, dtype=np.float64) - mean) / np.maximum(std, floor)


# --- one device's baseline ---------------------------------------------------------------------------


def bundle_key(inp: Any, windows: int) -> str:
    """What a stored baseline must match to serve a bundle: the features it is of (extractor, parameters,
    names, channels, rate, window and hop) and its window count. A new bundle with the same features keeps
    the device's baseline (the floors are the bundle's, applied at use); other features learn again."""
    params = inp.feature_params.model_dump(mode="json") if getattr(inp, "feature_params", None) else None
    facts = {"extractor": inp.extractor, "params": params, "features": list(inp.feature_names),
             "channels": list(inp.channels or []), "rate_hz": inp.rate_hz, "window_size": inp.window_size,
             "window_hop": inp.window_hop, "windows": int(windows)}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Baseline:
    """One device's normal: per-feature mean and std (unfloored) of `windows` windows, where it came from
    (`learned`: its first windows; `command`: windows learned again on command; `file`: a baseline file) and
    since when (unix time), for the bundle `key` names (bundle_key)."""

    mean: np.ndarray
    std: np.ndarray
    windows: int
    source: Source
    since: float
    key: str

    def __post_init__(self) -> None:
        if self.mean.shape != self.std.shape or self.mean.ndim != 1:
            raise ValueError(f"baseline mean {self.mean.shape} and std {self.std.shape} must be one vector each")
        if not (np.isfinite(self.mean).all() and np.isfinite(self.std).all() and (self.std >= 0).all()):
            raise ValueError("baseline mean and std must be finite, std >= 0")
        if self.source not in SOURCES:
            raise ValueError(f"baseline source must be one of {SOURCES} (got {self.source!r})")

    def to_obj(self, names: Sequence[str] = ()) -> dict[str, Any]:
        return {"schema": SCHEMA, "key": self.key, "windows": self.windows, "source": self.source,
                "since": self.since, "features": list(names), "mean": self.mean.tolist(), "std": self.std.tolist()}

    def encode(self, names: Sequence[str] = ()) -> bytes:
        return json.dumps(self.to_obj(names)).encode()

    @classmethod
    def decode(cls, data: bytes, where: str, names: Sequence[str] | None = None) -> Baseline:
        """A filed baseline's bytes; ConfigError naming `where` when it is not one (or, given `names`, of
        other features)."""
        try:
            obj = json.loads(data)
        except ValueError as exc:
            raise ConfigError(f"not JSON: {exc}", where=where) from None
        return cls.from_obj(obj, where, names)

    @classmethod
    def from_obj(cls, obj: Any, where: str, names: Sequence[str] | None = None) -> Baseline:
        """A stored or filed baseline (to_obj's dict); ConfigError naming `where` when it is not one (or, given
        `names`, of other features)."""
        try:
            if not isinstance(obj, dict) or obj.get("schema") != SCHEMA:
                raise ValueError(f"schema must be {SCHEMA!r}")
            feats = obj.get("features") or []
            if names is not None and feats and list(feats) != list(names):
                raise ValueError(f"it holds {len(feats)} features starting {feats[:2]}, the bundle's are "
                                 f"{len(names)} starting {list(names)[:2]}")
            mean = np.asarray(obj["mean"], dtype=np.float64)
            std = np.asarray(obj["std"], dtype=np.float64)
            if names is not None and len(mean) != len(names):
                raise ValueError(f"it holds {len(mean)} values per feature, the bundle has {len(names)} features")
            since = float(obj.get("since") or 0.0)
            return cls(mean, std, int(obj["windows"]), obj.get("source", "file"), since, str(obj["key"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"not a usable baseline: {exc}", where=where,
                              hint="write one with edgekit.baseline.write_file, or let the device learn its own") from None


def write_file(path: Path, baseline: Baseline, names: Sequence[str]) -> Path:
    """A baseline file ([baseline] file in the agent's config): JSON, schema edgekit.baseline/1."""
    path = Path(path)
    path.write_bytes(baseline.encode(names) + b"\n")
    return path


def read_file(path: Path, key: str, names: Sequence[str]) -> tuple[Baseline, str]:
    """A baseline file for the bundle `key` names, as a `file` baseline, and the file's sha256 (a changed file
    is loaded again at the next start). ConfigError naming the file when it is missing, unreadable or of
    other features."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the baseline file: {exc.strerror or exc}", where=str(path)) from None
    b = Baseline.decode(data, str(path), names)
    if b.key != key:
        raise ConfigError(f"baseline file was made for other features or another window count (key {b.key}, "
                          f"the bundle's is {key})", where=str(path),
                          hint="use a baseline learned with this bundle's features, or let the device learn one")
    return Baseline(b.mean, b.std, b.windows, "file", b.since or time.time(), b.key), hashlib.sha256(data).hexdigest()


# --- commissioning: learning one --------------------------------------------------------------------


@dataclass
class Commissioning:
    """A device's baseline state: learning (the raw features of its first plausible windows, up to `needed`)
    or ready (`baseline`). Used from the agent's processing thread only; a command from another thread asks
    through the agent, which calls `restart` between batches."""

    needed: int
    floor: np.ndarray
    key: str
    baseline: Baseline | None = None
    source: Source = "learned"
    _rows: list[np.ndarray] = field(default_factory=list)
    _count: int = 0
    completed: bool = False  # set when take() finished a baseline; the agent stores it and clears this

    @classmethod
    def from_manifest(cls, manifest: Any) -> Commissioning | None:
        """The bundle's commissioning (manifest input.baseline), or None for a bundle without one."""
        spec = getattr(manifest.input, "baseline", None)
        if spec is None:
            return None
        return cls(spec.windows, std_floor(np.asarray(spec.spread, np.float64), spec.std_floor),
                   bundle_key(manifest.input, spec.windows))

    @property
    def ready(self) -> bool:
        return self.baseline is not None

    @property
    def learned(self) -> int:
        """Windows learned so far (`needed` once ready)."""
        return self.needed if self.ready else self._count

    def take(self, raw: np.ndarray) -> int:
        """Learn from the first rows of `raw` (n, F), up to the windows still needed; returns how many it took.
        Taking the last one fits the baseline (`ready`, `completed`)."""
        if self.ready or not len(raw):
            return 0
        k = min(self.needed - self._count, len(raw))
        self._rows.append(np.array(raw[:k], dtype=np.float64))
        self._count += k
        if self._count >= self.needed:
            mean, std = fit(np.concatenate(self._rows))
            self.baseline = Baseline(mean, std, self.needed, self.source, time.time(), self.key)
            self._rows, self._count, self.completed = [], 0, True
        return k

    def use(self, baseline: Baseline) -> None:
        """Serve from a stored or filed baseline (its key checked by the caller)."""
        self.baseline, self._rows, self._count, self.completed = baseline, [], 0, False

    def restart(self, source: Source) -> None:
        """Forget the baseline and learn again from the next `needed` windows."""
        self.baseline, self.source, self._rows, self._count, self.completed = None, source, [], 0, False

    def relative(self, raw: np.ndarray) -> np.ndarray:
        """`raw` (n, F) relative to the ready baseline (the rule)."""
        if self.baseline is None:
            raise RuntimeError("no baseline yet: commissioning is still learning")
        return relative(raw, self.baseline.mean, self.baseline.std, self.floor)

    def state(self) -> dict[str, Any]:
        """What the status and metrics say: state, windows learned of needed, and once ready its source and
        since when (unix time)."""
        if self.baseline is None:
            return {"state": "learning", "windows": self._count, "of": self.needed, "source": self.source}
        return {"state": "ready", "windows": self.baseline.windows, "of": self.needed,
                "source": self.baseline.source, "since": self.baseline.since}
