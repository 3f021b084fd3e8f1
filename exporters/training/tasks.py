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

from edgekit import datasets
from edgekit.errors import ConfigError, DataError
from edgekit.features import extract, feature_names
from edgekit.recipe import Recipe
from edgekit.window import sliding_windows

log = logging.getLogger(__name__)

FALL_TARGET = "faller_12m"
FALL_EXCLUDE = "excluded"


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
    source: str = ""  # where the rows came from, for error messages

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
        hint = ("set EDGEKIT_DATA_DIR to the folder holding skab/, ipol_gait/, fall_screening/"
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
    feats = extract(recipe.features.extractor, win, rate_hz) if len(win) else np.empty((0, 0), np.float32)
    return win, feats


def _skab_files(recipe: Recipe, root: Path) -> tuple[list[Path], Path]:
    """The fault files of `data.skab_groups` (in SKAB's numeric order) and anomaly-free.csv."""
    files: list[Path] = []
    for g in recipe.data.skab_groups:
        folder = root / g
        if not folder.is_dir():
            raise DataError("not found", where=str(folder), hint="data.path must point at SKAB's data/ folder")
        files.extend(sorted(folder.glob("*.csv"), key=lambda p: (len(p.stem), p.stem)))
    if recipe.data.max_files:
        files = files[: recipe.data.max_files]
    free = root / "anomaly-free" / "anomaly-free.csv"
    if not free.is_file():
        raise DataError("not found", where=str(free), hint="SKAB's normal recording is needed for normal data")
    return files, free


def load_skab(recipe: Recipe, recipe_dir: Path) -> TaskData:
    """SKAB fault files plus anomaly-free.csv. A window's label is the `anomaly` flag of its LAST row.

    Why the last row: the agent decides when a window completes, so the label says "is the pump faulty
    now", the per-row question of SKAB's own scoring. anomaly-free.csv is cut into chunks of
    `data.normal_chunk_rows` rows, each its own split group (one 9,405-row group would land in one split).
    """
    root = _resolve(recipe, recipe_dir)
    size, hop = _size_hop(recipe)
    if len(recipe.labels) != 2:
        raise DataError(f"skab has two classes (normal, anomaly) (got labels {recipe.labels})", where="labels")
    normal_idx = recipe.labels.index(recipe.normal_label)
    files, free = _skab_files(recipe, root)
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, str, str]] = []  # windows, features, y, group, folder
    for path in files:
        table = datasets.read_skab(path)
        if "anomaly" not in table.labels:
            raise DataError("missing column 'anomaly'", where=str(path))
        win, f = _window_rows(table.values, recipe, table.rate_hz)
        flag = table.labels["anomaly"][np.arange(len(win)) * hop + size - 1].astype(bool)
        parts.append((win, f, np.where(flag, 1 - normal_idx, normal_idx),
                      f"{path.parent.name}/{path.name}", path.parent.name))
    table = datasets.read_skab(free)
    chunk = recipe.data.normal_chunk_rows
    for k, start in enumerate(range(0, len(table.values), chunk)):
        win, f = _window_rows(table.values[start:start + chunk], recipe, table.rate_hz)
        parts.append((win, f, np.full(len(win), normal_idx), f"anomaly-free/anomaly-free.csv#{k}", "anomaly-free"))
    parts = [p for p in parts if len(p[0])]
    if not parts:
        raise DataError(f"no full windows of {size} rows", where=str(root), hint="lower window.size")
    channels = list(datasets.SKAB_CHANNELS)
    return TaskData(
        kind="window", extractor=recipe.features.extractor,
        features=np.concatenate([p[1] for p in parts]).astype(np.float64),
        feature_names=feature_names(recipe.features.extractor, channels),
        y=np.concatenate([p[2] for p in parts]).astype(np.int64), files=[*files, free],
        windows=np.concatenate([p[0] for p in parts]),
        split_groups=np.concatenate([np.full(len(p[0]), p[3]) for p in parts]),
        report_groups={"folder": np.concatenate([np.full(len(p[0]), p[4]) for p in parts])},
        channels=channels, rate_hz=1.0, source=str(root), recording=datasets.SKAB_RECORDING.model_dump(),
    )


def load_ipol(recipe: Recipe, recipe_dir: Path) -> TaskData:
    """IPOL lower-back IMU trials. A window's label is the phase (still/walk/turn) of its CENTRE sample."""
    root = _resolve(recipe, recipe_dir)
    size, hop = _size_hop(recipe)
    if len(recipe.labels) != 3:
        raise DataError(f"ipol phases are still, walk, turn (got labels {recipe.labels})", where="labels")
    files = sorted(root.glob("*_lb.txt"), key=_ipol_key)
    if recipe.data.max_files:
        files = files[: recipe.data.max_files]
    if not files:
        raise DataError("no *_lb.txt trials", where=str(root))
    feats, wins, ys, subjects, trials, genders, ages = [], [], [], [], [], [], []
    rate = None
    used: list[Path] = []
    for path in files:
        table = datasets.read_ipol(path)
        if "phase" not in table.labels:
            raise DataError("no annotation JSON beside the trial (phase labels)", where=str(path))
        if rate is None:
            rate = table.rate_hz
        elif table.rate_hz != rate:
            raise DataError(f"rate {table.rate_hz} Hz differs from the first trial's {rate} Hz", where=str(path))
        win, f = _window_rows(table.values, recipe, table.rate_hz)
        used += [path, path.with_name(path.name.replace("_lb.txt", ".json"))]
        if not len(win):
            continue
        centre = np.arange(len(win)) * hop + size // 2
        ys.append(table.labels["phase"][centre].astype(np.int64))
        feats.append(f)
        wins.append(win)
        n = len(win)
        subjects.append(np.full(n, f"subject-{table.meta['Subject']}"))
        trials.append(np.full(n, path.name))
        genders.append(np.full(n, str(table.meta.get("Gender", "unknown"))))
        ages.append(np.full(n, float(table.meta.get("Age", np.nan))))
    if not feats:
        raise DataError(f"no full windows of {size} samples", where=str(root), hint="lower window.size")
    channels = list(datasets.IPOL_CHANNELS)
    groups = {"gender": np.concatenate(genders)}
    if recipe.data.age_bands:
        groups["age_band"] = _age_band(np.concatenate(ages), recipe.data.age_bands)
    split = {"subject": np.concatenate(subjects), "file": np.concatenate(trials), None: None}
    return TaskData(
        kind="window", extractor=recipe.features.extractor,
        features=np.concatenate(feats).astype(np.float64),
        feature_names=feature_names(recipe.features.extractor, channels),
        y=np.concatenate(ys), files=used, windows=np.concatenate(wins),
        split_groups=split[recipe.splits.group_by], report_groups=groups, channels=channels,
        rate_hz=float(rate or 100.0), source=str(root), recording=datasets.IPOL_RECORDING.model_dump(),
    )


def _ipol_key(p: Path) -> tuple[int, int]:
    subject, trial = p.name.replace("_lb.txt", "").split("-")
    return int(subject), int(trial)


# --- table tasks ---------------------------------------------------------------------------------


def load_table(recipe: Recipe, recipe_dir: Path) -> TaskData:
    """One row per example. Target: class indices 0..K-1 in the order of `labels`. Empty cells -> NaN."""
    path = _resolve(recipe, recipe_dir)
    d = recipe.data
    fall = d.loader == "fall_screening"
    columns = list(d.features) if d.features else (list(datasets.FALL_FEATURES) if fall else [])
    target = d.target or (FALL_TARGET if fall else None)
    exclude = d.exclude_column or (FALL_EXCLUDE if fall else None)
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
        kind="table", extractor="table", features=x, feature_names=columns, y=t.astype(np.int64),
        files=[path], report_groups=groups, source=str(path),
    )


LOADERS = {"skab": load_skab, "ipol": load_ipol, "fall_screening": load_table, "table": load_table}


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
