"""Recipe -> arrays: every task's rows as features (n, F), optional windows (n, W, C), labels and groups.

Window tasks cut recordings with edgekit.window.sliding_windows and compute features with
edgekit.features.extract — the very code the edge agent runs, so training and device see the same numbers.
Table tasks read a CSV/TSV; empty cells stay NaN here (imputation is fitted on the train split in train.py).
numpy and edgekit only (no torch): problems with files and columns raise DataError naming them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit import baseline as baseline_mod
from edgekit import datasets
from edgekit.errors import ConfigError, DataError
from edgekit.exporters.training import recordings
from edgekit.features import extract, feature_names
from edgekit.recipe import Recipe
from edgekit.window import sliding_windows

log = logging.getLogger(__name__)



@dataclass
class TaskData:
    """Every row of a task before splitting. `features` may hold NaN (tables, before imputation)."""

    kind: str  # "window" | "table"
    extractor: str
    features: np.ndarray  # (n, F) float64
    feature_names: list[str]
    y: np.ndarray  # (n,) int64, index into recipe.labels
    files: list[Path]  # raw files read, for the data fingerprint
    windows: np.ndarray | None = None  # (n, W, C) float64, raw
    split_groups: np.ndarray | None = None  # (n,) str: rows sharing a value stay in one split
    report_groups: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n,) str, per-group metrics
    channels: list[str] | None = None
    rate_hz: float | None = None
    recording: dict[str, Any] | None = None  # the files' layout (manifest.Recording), for the agent's replay
    units: dict[str, str] | None = None  # channel -> unit, as the recipe gives them
    max_gap_s: float | None = None  # the step in time that split the recordings
    source: str = ""  # where the rows came from, for error messages
    problems: list[str] = field(default_factory=list)  # lines dropped and files skipped while reading
    # [baseline] recipes (edgekit/baseline.py): each row's recording (file or chunk), whether the row is one of
    # its recording's first `windows` windows (its commissioning: never a training row), and per recording
    # the raw features' mean and std over those windows
    recording_id: np.ndarray | None = None  # (n,) str
    in_baseline: np.ndarray | None = None  # (n,) bool
    baselines: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.y)
        if n == 0:
            raise DataError("no rows", where=self.source, hint="check the path and the recipe's filters")
        if self.features.shape != (n, len(self.feature_names)):
            raise ValueError(f"features shape {self.features.shape} != ({n}, {len(self.feature_names)})")
        if self.windows is not None and len(self.windows) != n:
            raise ValueError(f"windows {self.windows.shape} do not match {n} rows")


def _resolve(recipe: Recipe, recipe_dir: Path) -> Path:
    rel = recipe.data.resolved_path()
    p = Path(rel)
    if p.is_absolute():
        path = p
    elif recipe.data.relative_to == "recipe":
        path = recipe_dir / p
    else:
        path = datasets.data_dir() / p
    if not path.exists():
        hint = ("set EDGEKIT_DATA_DIR to the folder the recipe's data.path is relative to"
                if recipe.data.relative_to == "data_dir" else "the path is relative to the recipe file")
        raise DataError("not found", where=f"{path} (data.path)", hint=hint)
    return path


def _age_band(age: np.ndarray, edges: list[float]) -> np.ndarray:
    names = [f"<{edges[0]:g}"] + [f"{a:g}-{b:g}" for a, b in zip(edges, edges[1:])] + [f">={edges[-1]:g}"]
    out = np.array([names[int(np.searchsorted(edges, a, side="right"))] if np.isfinite(a) else "unknown"
                    for a in age], dtype=object)
    return out.astype(str)


# --- window tasks --------------------------------------------------------------------------------


def _size_hop(recipe: Recipe) -> tuple[int, int]:
    if recipe.window is None:  # the recipe's validator already requires [window] for window loaders
        raise ConfigError(f"[window] is required for loader {recipe.data.loader!r}", where="window")
    return recipe.window.size, recipe.window.hop


def _window_rows(values: np.ndarray, recipe: Recipe, rate_hz: float) -> tuple[np.ndarray, np.ndarray]:
    size, hop = _size_hop(recipe)
    win = sliding_windows(values, size, hop)
    params = recipe.features.params
    feats = extract(recipe.features.extractor, win, rate_hz, params) if len(win) else np.empty((0, 0), np.float32)
    return win, feats


def load_recordings(recipe: Recipe, recipe_dir: Path) -> TaskData:
    """Windows over the recipe's recordings (exporters/training/recordings.py reads them). A window's label
    is that of its last (or centre) sample, as [data.label] says; its split group the file (or chunk) or a
    file field; windows never span a gap, a dropped line or a chunk boundary."""
    d = recipe.data
    assert d.channels is not None and d.label is not None
    root = _resolve(recipe, recipe_dir)
    ctx = recordings.Context(recipe, root)
    size, hop = _size_hop(recipe)
    offset = size - 1 if d.label.at == "last" else size // 2
    parts: list[tuple[recordings.Part, str, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]] = []
    pieces: list[tuple[recordings.Part, str, np.ndarray, np.ndarray, np.ndarray]] = []
    files: list[Path] = []
    for fs in d.files:
        for path in recordings.list_files(root, fs, d.max_files):
            part = recordings.read_part(ctx, path, fs.label)
            files.append(path)
            if part is None:
                continue
            for group, a, b in _pieces(part, fs.chunk_rows):
                win, f = _window_rows(part.values[a:b], recipe, ctx.rate_hz or 1.0)
                y = part.labels[a:b][np.arange(len(win), dtype=np.int64) * hop + offset]
                pieces.append((part, group, win, f, y))
    base = _baselines(recipe, pieces)
    for k, (part, group, win, f, y) in enumerate(pieces):
        parts.append((part, group, win[y >= 0], f[y >= 0], y[y >= 0], base[k][y >= 0] if base else None))
    for line in ctx.problems:
        log.warning("recordings %s", line)
    parts = [p for p in parts if len(p[2])]
    if not parts:
        raise DataError(f"no full windows of {size} samples with a label", where=str(root),
                        hint="check data.files, data.layout and data.label, or lower window.size"
                        + (f"; {len(ctx.problems)} problems logged, first: {ctx.problems[0]}" if ctx.problems else ""))
    return TaskData(
        kind="window", extractor=recipe.features.extractor,
        features=np.concatenate([p[3] for p in parts]).astype(np.float64),
        feature_names=feature_names(recipe.features.extractor, list(d.channels), recipe.features.params),
        y=np.concatenate([p[4] for p in parts]).astype(np.int64), files=files,
        windows=np.concatenate([p[2] for p in parts]),
        split_groups=_split_groups(recipe, parts), report_groups=_report_groups(recipe, parts),
        channels=list(d.channels), rate_hz=float(ctx.rate_hz or 1.0), source=str(root),
        recording=d.layout.model_dump() if d.layout else None, problems=ctx.problems,
        units=dict(d.units) or None, max_gap_s=ctx.max_gap_s,
        recording_id=np.concatenate([np.full(len(p[2]), p[1]) for p in parts]) if recipe.baseline else None,
        in_baseline=np.concatenate([p[5] for p in parts]) if recipe.baseline else None,
        baselines=_base_stats(recipe, pieces) if recipe.baseline else {},
    )


def _baselines(recipe: Recipe, pieces: list[tuple[Any, str, np.ndarray, np.ndarray, np.ndarray]]
               ) -> list[np.ndarray]:
    """Per piece, (windows,) True for the windows that are among its recording's (file's or chunk's) first
    [baseline] windows, counted over every window the agent would see (labelled or not); [] without one."""
    if recipe.baseline is None:
        return []
    seen: dict[str, int] = {}
    out = []
    for _, group, win, _, _ in pieces:
        before = seen.get(group, 0)
        out.append(before + np.arange(len(win)) < recipe.baseline.windows)
        seen[group] = before + len(win)
    return out


def _base_stats(recipe: Recipe, pieces: list[tuple[Any, str, np.ndarray, np.ndarray, np.ndarray]]
               ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per recording with more windows than its baseline, the raw features' mean and std over its first
    [baseline] windows (edgekit/baseline.py fit, the agent's rule); shorter recordings are baseline only."""
    assert recipe.baseline is not None
    n = recipe.baseline.windows
    feats: dict[str, list[np.ndarray]] = {}
    for _, group, _, f, _ in pieces:
        feats.setdefault(group, []).append(f)
    out = {}
    for group, fs in feats.items():
        f = np.concatenate(fs)
        if len(f) > n:
            out[group] = baseline_mod.fit(f[:n])
    return out


def _pieces(part: recordings.Part, chunk_rows: int | None) -> list[tuple[str, int, int]]:
    """(split group, start, end) of the part's segments, cut again every `chunk_rows` rows ('file#k')."""
    n = len(part.values)
    chunks = [(part.rel, 0, n)] if chunk_rows is None else [
        (f"{part.rel}#{k}", a, min(a + chunk_rows, n)) for k, a in enumerate(range(0, n, chunk_rows))]
    bounds = part.starts
    return [(g, max(a, s), min(b, e)) for g, a, b in chunks for s, e in zip(bounds, bounds[1:])
            if min(b, e) > max(a, s)]


def _split_groups(recipe: Recipe, parts: list[Any]) -> np.ndarray | None:
    key = recipe.splits.group_by
    if key is None:
        return None
    if key == "file":
        return np.concatenate([np.full(len(p[2]), p[1]) for p in parts])
    missing = next((p[0].path for p in parts if key not in p[0].fields), None)
    if missing is not None:
        raise DataError(f"no field {key!r} for splits.group_by (fields: {sorted(parts[0][0].fields)})",
                        where=str(missing), hint="name it in data.name_pattern or the sidecar")
    return np.concatenate([np.full(len(p[2]), f"{key}-{p[0].fields[key]}") for p in parts])


def _report_groups(recipe: Recipe, parts: list[Any]) -> dict[str, np.ndarray]:
    d = recipe.data
    groups = {c: np.concatenate([np.full(len(p[2]), p[0].fields.get(c, "unknown")) for p in parts]).astype(str)
              for c in d.group_columns}
    if d.age_column and d.age_bands:
        def age(p: Any) -> float:
            try:
                return float(p[0].fields.get(d.age_column, "nan"))
            except ValueError:
                return float("nan")

        groups["age_band"] = _age_band(np.concatenate([np.full(len(p[2]), age(p)) for p in parts]), d.age_bands)
    return groups


# --- table tasks ---------------------------------------------------------------------------------


def load_table(recipe: Recipe, recipe_dir: Path) -> TaskData:
    """One row per example. Target: class indices 0..K-1 in the order of `labels`. Empty cells -> NaN."""
    path = _resolve(recipe, recipe_dir)
    d = recipe.data
    columns, target, exclude = list(d.features or []), d.target, d.exclude_column
    if target is None or not columns:
        raise DataError("needs feature columns and a target", where=f"{path} (data.features, data.target)")
    header, rows = datasets.read_table(path)
    wanted = {"data.features": columns, "data.target": [target], "data.group_columns": d.group_columns}
    if exclude:
        wanted["data.exclude_column"] = [exclude]
    if d.age_column:
        wanted["data.age_column"] = [d.age_column]
    for key, cols in wanted.items():
        missing = [c for c in cols if c not in header]
        if missing:
            raise DataError(f"missing column(s) {missing}; the file has {header}", where=f"{path} ({key})")
    if exclude:
        flag = datasets.column_matrix(path, header, rows, [exclude])[:, 0]
        rows = [r for r, f in zip(rows, flag) if f != 1]
    if not rows:
        raise DataError("no rows left", where=str(path), hint=f"every row has {exclude}=1" if exclude else None)
    x = datasets.column_matrix(path, header, rows, columns)
    t = datasets.column_matrix(path, header, rows, [target])[:, 0]
    if np.isnan(t).any():
        i = int(np.flatnonzero(np.isnan(t))[0])
        raise DataError(f"column {target!r} is empty in a row", where=f"{path}:{i + 2} (data.target)")
    k = len(recipe.labels)
    bad = ~np.isin(t, np.arange(k))
    if bad.any():
        raise DataError(f"column {target!r} must hold class indices 0..{k - 1} for labels {recipe.labels} "
                        f"(got {float(t[bad][0]):g})", where=f"{path} (data.target)")
    all_nan = [c for c, col in zip(columns, x.T) if np.isnan(col).all()]
    if all_nan:
        raise DataError(f"column(s) {all_nan} are empty in every row", where=f"{path} (data.features)")
    if d.imputation == "none" and np.isnan(x).any():
        i, j = (int(v[0]) for v in np.nonzero(np.isnan(x)))
        raise DataError(f"column {columns[j]!r} is empty in a row", where=f"{path} (data.features)",
                        hint="set data.imputation = 'median' to fill it with the training median")
    groups: dict[str, np.ndarray] = {}
    for col in d.group_columns:
        j = header.index(col)
        groups[col] = np.array([r[j].strip() or "unknown" for r in rows]).astype(str)
    if d.age_column and d.age_bands:
        age = datasets.column_matrix(path, header, rows, [d.age_column])[:, 0]
        groups["age_band"] = _age_band(age, d.age_bands)
    return TaskData(
        kind="table", extractor=recipe.features.extractor, features=x, feature_names=columns, y=t.astype(np.int64),
        files=[path], report_groups=groups, source=str(path),
    )


LOADERS = {"recordings": load_recordings, "table": load_table}


def load_task(recipe: Recipe, recipe_dir: Path) -> TaskData:
    """All rows of the recipe's task; DataError when a file, column or class is missing."""
    data = LOADERS[recipe.data.loader](recipe, recipe_dir)
    counts = np.bincount(data.y, minlength=len(recipe.labels))
    log.info("task_loaded task=%s rows=%d features=%d counts=%s", recipe.task, len(data.y),
             len(data.feature_names), counts.tolist())
    empty = [lab for lab, c in zip(recipe.labels, counts) if c == 0]
    if empty:
        raise DataError(f"no rows of class(es) {empty}", where=data.source,
                        hint="every label needs examples; check `labels` and the data")
    if not np.isfinite(data.features[~np.isnan(data.features)]).all():
        raise DataError("features hold inf", where=data.source)
    return data
