"""Train a recipe: predictor (torch), dense autoencoder (torch, normal rows), second opinion (scikit-learn).

`train(recipe_path, out)` writes a run directory that the exporter (export/export.py) reads: its layout and
run.json (`RunMeta`) are the contract in edgekit/contract/run.py, binding for both sides. `_train` runs named
steps over one typed `Split` per split: load -> split (-> baseline) -> impute (-> extra labels) -> normalise ->
fit predictor -> fit autoencoder -> fit second opinion -> score -> write.

Baseline ([baseline] recipes, edgekit/baseline.py): each recording's first N windows are its commissioning, no
row of any split; every other row's features are made relative to them (the agent's rule) before the
normalisation below, which then works on those relative features.

Normalisation: mean/std of the TRAIN split (std floored at 1e-6); test is never used for fitting or
calibration. Windows (cnn1d): raw (W, C) windows as edgekit.window cuts them, (w - mean[c]) / std[c] with
per-channel statistics over every training sample, then transposed to (C, W). Features are computed in
float64 by edgekit.features.extract (float32 out) and normalised in float64, then stored as float32.
The autoencoder's score is its per-row mean squared reconstruction error; it is fitted on training rows of
`normal_label` only, or on every training row when models.autoencoder.fit_on is "all" (multi-class tasks).
Table tasks: features are the recipe's columns in order; with imputation, empty cells get the train
median. Extra labels (train(extra_labels=...)) join the train split only, after the split.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import pickle
import random
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import StratifiedGroupKFold, train_test_split
from sklearn.svm import SVC
from torch import nn
from tqdm import tqdm

import edgekit
from edgekit.baseline import relative, std_floor
from edgekit.contract.run import (
    AutoencoderModel,
    GateTarget,
    Imputation,
    PredictorModel,
    RunInput,
    RunMeta,
    RunModels,
    SecondOpinionModel,
    write_run,
)
from edgekit.errors import ConfigError, DataError
from edgekit.exporters.metrics import auc, classification_metrics
from edgekit.exporters.training.models import build, save_checkpoint
from edgekit.exporters.training.tasks import TaskData, load_task
from edgekit.manifest import BaselineSpec, Normalize, Stats
from edgekit.recipe import PredictorSection, Recipe, load_recipe

log = logging.getLogger(__name__)

STD_FLOOR = 1e-6
SECOND_OPINIONS: dict[str, tuple[type, dict[str, Any]]] = {
    # class_weight balanced: the minority class (faults, fallers) must not be ignored.
    "random_forest": (RandomForestClassifier, {"n_estimators": 200, "class_weight": "balanced", "n_jobs": 1}),
    "svm": (SVC, {"probability": True, "class_weight": "balanced"}),
}


# --- seeding and device --------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Same seed, same splits, weights and batch order (on one device kind and thread count)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed for deterministic cuBLAS
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- splits, imputation, normalisation -----------------------------------------------------------


def split_indices(y: np.ndarray, groups: np.ndarray | None, cal: float, test: float, seed: int,
                  labels: list[str], where: str) -> dict[str, np.ndarray]:
    """Stratified train/cal/test row indices; with `groups`, no group is in two splits."""
    counts = np.bincount(y, minlength=len(labels))
    few = [f"{lab} ({c})" for lab, c in zip(labels, counts) if c < 3]
    if few:
        raise DataError(f"too few rows of class(es) {', '.join(few)}: a stratified train/cal/test split needs "
                        "at least 3 of each", where=where, hint="add data or drop the class from labels")
    idx = np.arange(len(y))
    if groups is None:
        try:
            rest, te = train_test_split(idx, test_size=test, stratify=y, random_state=seed)
            tr, ca = train_test_split(rest, test_size=cal / (1 - test), stratify=y[rest], random_state=seed)
        except ValueError as exc:
            raise DataError(f"cannot stratify the split: {exc}", where=where,
                            hint="change splits.cal/test or add data") from None
    else:
        n_groups = len(np.unique(groups))
        k_test = max(2, round(1 / test))
        k_cal = max(2, round((1 - test) / cal))
        if n_groups < k_test + 1:
            raise DataError(f"{n_groups} groups cannot make a grouped split with test={test}", where=where,
                            hint="lower splits.test or set splits.group_by to none")
        rest, te = next(StratifiedGroupKFold(k_test, shuffle=True, random_state=seed).split(idx, y, groups))
        sub_tr, sub_ca = next(StratifiedGroupKFold(k_cal, shuffle=True, random_state=seed)
                              .split(rest, y[rest], groups[rest]))
        tr, ca = rest[sub_tr], rest[sub_ca]
    out = {"train": np.sort(tr), "cal": np.sort(ca), "test": np.sort(te)}
    for name, rows in out.items():
        missing = [lab for k, lab in enumerate(labels) if not np.any(y[rows] == k)]
        if missing:
            raise DataError(f"split {name!r} has no rows of class(es) {missing} ({len(rows)} rows)", where=where,
                            hint="change seed or splits.cal/test, or add data for that class")
    return out


def fit_imputation(x_train: np.ndarray, names: list[str], method: str, where: str) -> dict[str, float] | None:
    """Train-split median of every feature column (method 'median'); None for 'none'."""
    if method == "none":
        return None
    values = {}
    for j, name in enumerate(names):
        col = x_train[:, j]
        if np.isnan(col).all():
            raise DataError(f"column {name!r} is empty in every training row; no median to impute",
                            where=where, hint="add data or drop the column from data.features")
        values[name] = float(np.nanmedian(col))
    return values


def apply_imputation(x: np.ndarray, names: list[str], values: dict[str, float] | None) -> np.ndarray:
    if values is None:
        return x
    x = x.copy()
    for j, name in enumerate(names):
        x[np.isnan(x[:, j]), j] = values[name]
    return x


def fit_normalizer(x: np.ndarray, axis: int | tuple[int, ...] = 0) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=axis)
    std = np.maximum(x.std(axis=axis), STD_FLOOR)
    return mean, std


# --- extra labels from the hub -------------------------------------------------------------------


def read_extra_labels(path: Path, labels: list[str], names: list[str], need_window: bool,
                      channels: list[str] | None, window_size: int | None, extra: Any = None,
                      need_relative: bool = False
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, dict[str, Any]]:
    """Reviewed results exported by the hub (`edgekit labels export`): column `label` (a label name) and the
    raw features, either as one column per feature name or as a `features` column holding a JSON list
    (feature order) or object (name -> value). cnn1d tasks also need `window`: JSON list of W rows of C
    values (the hub's export writes the review's signal there: the raw window when the agent's
    gate.downsample_points is at least the window's size). `result_id`, `incident_id` and other columns are
    ignored.

    A label the recipe does not know ("sensor fault", "valve closed") is a DataError listing every such
    label with its rows, unless the recipe's [extra_labels] (`extra`, recipe.ExtraLabelsSection) maps it to
    one of `labels` or skips it (counted): a typed label is never guessed. A hub may hold cases of other
    models: rows whose features or window are empty, unreadable or of another shape are skipped and counted.
    A file with rows but none usable is a DataError (probably another task's file).
    `need_relative` (a recipe with a [baseline]): the models read features relative to each device's
    baseline, so each row also needs its `relative` column (a JSON object, name -> value: what the agent's
    review sent); a row without one (a window deferred while its device learned its baseline, or sent by an
    agent before reviews carried it) is skipped and counted as without_baseline.
    Returns raw features (n, F), y (n,), windows (n, W, C) or None, relative features (n, F) or None, and the
    counts: unknown_label (always empty: kept for run.json readers), mapped_label and skipped_label per label,
    unreadable_features, and with `need_relative` without_baseline.
    """
    rows, per_column = _read_labels_csv(path, names, need_window, need_relative)
    shape = (window_size, len(channels or [])) if need_window else None
    mapping: dict[str, str] = dict(getattr(extra, "map", None) or {})
    skip = set(getattr(extra, "skip", None) or ())
    xs, ys, ws, rs = [], [], [], []
    without_baseline = 0
    unknown: dict[str, int] = {}
    mapped: dict[str, int] = {}
    skipped: dict[str, int] = {}
    unreadable: list[int] = []
    for row in rows:
        lab = row["label"]
        if lab not in labels and lab not in mapping and lab not in skip:
            unknown[lab] = unknown.get(lab, 0) + 1
    if unknown:
        hints = {lab: difflib.get_close_matches(lab, labels, n=1) for lab in unknown}
        listed = "; ".join(f"{lab!r} ({n} rows{f', did you mean {hints[lab][0]!r}?' if hints[lab] else ''})"
                           for lab, n in sorted(unknown.items(), key=lambda kv: -kv[1]))
        raise DataError(f"labels the recipe does not know: {listed}", where=str(path),
                        hint=f"the recipe's labels are {labels}; map the others to one of them or skip them in "
                             "the recipe: [extra_labels] map = { \"valve closed\" = \"anomaly\" }, "
                             "skip = [\"sensor fault\"]")
    for i, row in enumerate(rows, start=2):
        lab = row["label"]
        if lab in skip and lab not in labels:
            skipped[lab] = skipped.get(lab, 0) + 1
            continue
        if lab not in labels:
            mapped[lab] = mapped.get(lab, 0) + 1
            lab = mapping[lab]
        try:
            vec, win = _labelled_row(row, names, per_column, shape)
            rel = _relative_row(row, names) if need_relative else None
        except (ValueError, KeyError, TypeError):
            unreadable.append(i)
            continue
        if need_relative and rel is None:
            without_baseline += 1
            continue
        if rel is not None:
            rs.append(rel)
        xs.append(vec)
        ys.append(labels.index(lab))
        if win is not None:
            ws.append(win)
    _log_skipped(path, skipped, mapped, unreadable)
    if without_baseline:
        log.warning("extra_labels_skipped reason=without_baseline rows=%d file=%s (no features relative to a "
                    "device baseline: deferred while it was learned, or from an older agent)", without_baseline, path)
    if rows and not xs:
        raise DataError(f"none of {len(rows)} rows is usable (skipped by the recipe: {skipped}; "
                        f"unreadable features or windows: {len(unreadable)}"
                        + (f"; without features relative to a device baseline: {without_baseline}"
                           if need_relative else "") + ")", where=str(path))
    x = np.asarray(xs, dtype=np.float64).reshape(len(xs), len(names))
    w = None
    if need_window:
        w = np.stack(ws) if ws else np.empty((0, window_size or 0, len(channels or [])))
    r = np.asarray(rs, dtype=np.float64).reshape(len(rs), len(names)) if need_relative else None
    counts: dict[str, Any] = {"unknown_label": {}, "mapped_label": mapped, "skipped_label": skipped,
                              "unreadable_features": len(unreadable)}
    if need_relative:
        counts["without_baseline"] = without_baseline
    return x, np.asarray(ys, dtype=np.int64), w, r, counts


def _read_labels_csv(path: Path, names: list[str], need_window: bool, need_relative: bool = False
                     ) -> tuple[list[dict[str, str]], bool]:
    """The labels file's rows, once its header has what the task needs; and whether the features come one
    column per name (else as a `features` JSON column)."""
    if not path.is_file():
        raise DataError("not found", where=str(path), hint="the CSV of reviewed labels from `edgekit labels export`")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        rows = list(reader)
    if "label" not in header:
        raise DataError(f"missing column 'label'; the file has {header}", where=str(path))
    per_column = all(n in header for n in names)
    if not per_column and "features" not in header:
        missing = [n for n in names if n not in header]
        raise DataError(f"needs a 'features' JSON column or one column per feature; missing {missing[:5]}"
                        f"{' ...' if len(missing) > 5 else ''}", where=str(path),
                        hint="was it exported from a hub serving this task's model?")
    if need_window and "window" not in header:
        raise DataError("cnn1d tasks need a 'window' column (JSON list of rows of channel values)",
                        where=str(path), hint="the hub's export carries features only: use an mlp recipe for it")
    if need_relative and "relative" not in header:
        raise DataError("a recipe with [baseline] needs the 'relative' column (each case's features relative to "
                        "its device's baseline, JSON)", where=str(path),
                        hint="export it again with this version's `edgekit labels export`; cases from agents "
                             "older than the column are skipped")
    return rows, per_column


def _labelled_row(row: dict[str, str], names: list[str], per_column: bool, window_shape: tuple[Any, int] | None
                  ) -> tuple[list[float], np.ndarray | None]:
    """One row's raw features (and window, when `window_shape` is given); ValueError, KeyError or TypeError
    when they are missing, unreadable, of another length or not finite."""
    if per_column:
        vec = [float(row[n]) for n in names]
    else:
        raw = json.loads(row["features"])
        vec = [float(raw[n]) for n in names] if isinstance(raw, dict) else [float(v) for v in raw]
    win = None
    if window_shape is not None:
        win = np.asarray(json.loads(row["window"]), dtype=np.float64)
        if win.shape != window_shape:
            raise ValueError(f"window shape {win.shape}")
    if len(vec) != len(names) or not np.all(np.isfinite(vec)):
        raise ValueError("features of another length, or not finite")
    return vec, win


def _relative_row(row: dict[str, str], names: list[str]) -> list[float] | None:
    """One row's features relative to its device's baseline (the `relative` JSON object), None when the cell
    is empty; ValueError, KeyError or TypeError when unreadable, incomplete or not finite."""
    cell = (row.get("relative") or "").strip()
    if not cell:
        return None
    rel = json.loads(cell)
    if not isinstance(rel, dict):
        raise TypeError("relative is not an object")
    vec = [float(rel[n]) for n in names]
    if not np.all(np.isfinite(vec)):
        raise ValueError("relative features not finite")
    return vec


def _log_skipped(path: Path, skipped: dict[str, int], mapped: dict[str, int], unreadable: list[int]) -> None:
    for lab, n in skipped.items():
        log.info("extra_labels_skipped reason=recipe_skips label=%r rows=%d file=%s", lab, n, path)
    for lab, n in mapped.items():
        log.info("extra_labels_mapped label=%r rows=%d file=%s", lab, n, path)
    if unreadable:
        log.warning("extra_labels_skipped reason=unreadable_features rows=%d first_line=%d file=%s",
                    len(unreadable), unreadable[0], path)


# --- torch fitting -------------------------------------------------------------------------------


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    perm = rng.permutation(n)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


# Fewer cal rows than this: keep the last epoch; the cal loss of a handful of rows is noise (fall_screening's
# 18 cal rows picked epoch 0, an untrained model at log loss 0.693).
EARLY_STOP_MIN_CAL = 200
HINGE_SPAN = 0.05  # a hinge's slope is 1 / (spread of the feature over this fraction of rows each side)
HINGE_MAX_SLOPE = 300.0  # per normalised unit; caps the slope where a feature is locally flat


def init_hinges(layer: nn.Linear, x: np.ndarray, seed: int) -> None:
    """Start the first layer as a bank of hinges: unit u watches feature u % F only, its kink at a random
    training quantile, slope 1 / (local spread of that feature there), sign alternating per round.

    Why: features with several operating regimes (SKAB's flow rate sits at ~32, ~76 or ~126 depending on the
    rig set-up) put a fault's 1-2 unit shift at 0.02-0.05 of the global std. Adam moves a weight by about
    `lr` per step, so the ~100x weights that resolve such a shift are out of reach in a few hundred steps,
    and the default init starts at |w| < 0.1; the MLP fits file-specific offsets instead. Kinks placed where
    the training rows are dense give the resolution a rank transform would (cal balanced accuracy on SKAB:
    0.74 with the default init, 0.88 with a train-fitted quantile transform, which the manifest cannot
    carry), with the same architecture, so export and agent are untouched. Used when the first hidden layer
    has at least 2 units per feature (skab: 416 for 104); narrower layers keep the default init.
    """
    h, f = layer.weight.shape
    cols = np.sort(np.asarray(x, dtype=np.float64), axis=0)
    n = len(cols)
    if n < 2 or f == 0:
        return
    span = max(1, int(n * HINGE_SPAN))
    rng = np.random.default_rng(seed)
    weight = np.zeros((h, f), dtype=np.float64)
    bias = np.zeros(h, dtype=np.float64)
    for u in range(h):
        j = u % f
        k = int(rng.uniform(0.02, 0.98) * (n - 1))
        spread = cols[min(k + span, n - 1), j] - cols[max(k - span, 0), j]
        slope = 1.0 / max(spread, 1.0 / HINGE_MAX_SLOPE)
        sign = 1.0 if (u // f) % 2 == 0 else -1.0
        weight[u, j] = sign * slope
        bias[u] = -sign * slope * cols[k, j]
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight).to(layer.weight))
        layer.bias.copy_(torch.from_numpy(bias).to(layer.bias))


def new_predictor(pcfg: PredictorSection, p_kwargs: dict[str, Any], x_train: np.ndarray, seed: int) -> nn.Module:
    """The recipe's predictor before fitting: seeded init, and for an MLP with >= 2 first-layer units per
    feature (room for a rising and a falling hinge each) the hinge start of init_hinges on `x_train` (the
    normalised training features). One place for this choice: `_train` and the evaluations (evaluation/skab.py,
    evaluation/fall_screening.py) build the predictor they report through it.
    """
    torch.manual_seed(seed)
    model = build(pcfg.arch, **p_kwargs)
    n_feat = x_train.shape[1]
    if pcfg.arch == "mlp" and pcfg.hidden[0] >= 2 * n_feat:
        init_hinges(model.body[0], x_train, seed)
        log.info("predictor_init kind=hinges units=%d features=%d", pcfg.hidden[0], n_feat)
    return model


def fit_predictor(model: nn.Module, x: np.ndarray, y: np.ndarray, x_cal: np.ndarray, y_cal: np.ndarray,
                  n_classes: int, cfg: Any, device: torch.device, seed: int,
                  progress: bool) -> tuple[dict[str, list[float]], int]:
    """Class-weighted cross-entropy on the model's logits; returns per-epoch train and cal loss, and the
    (0-based) epoch whose weights the model ends with: the one with the lowest cal loss (early stopping).

    Why: on SKAB the cal loss is lowest after 1-3 epochs and then climbs (0.50 -> 0.97 by epoch 30) while the
    train loss keeps falling: the MLP learns the training files' own levels, and its softmax ends near 1.0
    on the windows it gets wrong. Only the epoch is chosen on cal; the cal rows never train a weight. With
    fewer than EARLY_STOP_MIN_CAL cal rows the last epoch is kept.
    """
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    weight = torch.tensor(len(y) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32, device=device)
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    xc, yc = torch.from_numpy(x_cal).to(device), torch.from_numpy(y_cal).to(device)
    rng = np.random.default_rng(seed)
    history: dict[str, list[float]] = {"train": [], "cal": []}
    best_loss, best_epoch = float("inf"), -1
    best_state: dict[str, torch.Tensor] = {}
    for epoch in tqdm(range(cfg.epochs), desc="predictor", disable=not progress, leave=False):
        model.train()
        total = 0.0
        for idx in _batches(len(y), cfg.batch_size, rng):
            b = torch.from_numpy(idx).to(device)
            opt.zero_grad()
            loss = loss_fn(model.logits(xt[b]), yt[b])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        model.eval()
        with torch.no_grad():
            history["train"].append(total / len(y))
            history["cal"].append(float(loss_fn(model.logits(xc), yc)))
        if np.isfinite(history["cal"][-1]) and history["cal"][-1] < best_loss:
            best_loss, best_epoch = history["cal"][-1], epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if len(y_cal) < EARLY_STOP_MIN_CAL:
        best_epoch, best_loss = len(history["cal"]) - 1, history["cal"][-1] if history["cal"] else float("nan")
    elif best_state:
        model.load_state_dict(best_state)
    log.info("predictor_fit epochs=%d best_epoch=%d cal_loss=%.4f last_cal_loss=%.4f", cfg.epochs, best_epoch,
             best_loss, history["cal"][-1] if history["cal"] else float("nan"))
    return history, best_epoch


def fit_autoencoder(model: nn.Module, x: np.ndarray, x_cal: np.ndarray, cfg: Any, device: torch.device,
                    seed: int, progress: bool) -> dict[str, list[float]]:
    """Mean squared reconstruction error (the model's forward is that score per row)."""
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    xt, xc = torch.from_numpy(x).to(device), torch.from_numpy(x_cal).to(device)
    rng = np.random.default_rng(seed + 1)
    history: dict[str, list[float]] = {"train": [], "cal": []}
    for _ in tqdm(range(cfg.epochs), desc="autoencoder", disable=not progress, leave=False):
        model.train()
        total = 0.0
        for idx in _batches(len(x), cfg.batch_size, rng):
            b = torch.from_numpy(idx).to(device)
            opt.zero_grad()
            loss = model(xt[b]).mean()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        model.eval()
        with torch.no_grad():
            history["train"].append(total / len(x))
            history["cal"].append(float(model(xc).mean()) if len(x_cal) else float("nan"))
    return history


def _predict(model: nn.Module, x: np.ndarray, device: torch.device) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(x).to(device)).cpu().numpy().astype(np.float64)


def fit_second_opinion(recipe: Recipe, x: np.ndarray, y: np.ndarray, where: str) -> Any:
    """RandomForest or SVC on the normalised features; recipe params override our defaults."""
    cls, defaults = SECOND_OPINIONS[recipe.second_opinion.kind]
    params = dict(recipe.second_opinion.params)
    allowed = sorted(cls().get_params())
    for key in params:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            raise ConfigError(f"unknown parameter for {cls.__name__}" + (f", did you mean {close[0]!r}?" if close else ""),
                              where=f"{where}: second_opinion.params.{key}")
    est = cls(**{**defaults, "random_state": recipe.seed, **params})
    try:
        with warnings.catch_warnings():
            # scikit-learn 1.9 deprecates SVC(probability=True) (removal planned for 1.11); skl2onnx
            # converts it directly, so it stays until the exporter handles CalibratedClassifierCV.
            warnings.filterwarnings("ignore", message=".*probability.*deprecated", category=FutureWarning)
            est.fit(x, y)
    except ValueError as exc:  # scikit-learn's InvalidParameterError is a ValueError
        raise ConfigError(f"{cls.__name__} rejected the parameters: {exc}", where=f"{where}: second_opinion.params"
                          ) from None
    return est


# --- metrics -------------------------------------------------------------------------------------


def split_metrics(y: np.ndarray, probs: np.ndarray, second: np.ndarray, ae_score: np.ndarray,
                  labels: list[str], normal: int) -> dict[str, Any]:
    m = classification_metrics(y, probs, labels, normal)
    m["second_opinion"] = classification_metrics(y, second, labels, normal)
    m["agreement"] = float((probs.argmax(1) == second.argmax(1)).mean()) if len(y) else None
    is_normal = y == normal
    m["autoencoder"] = {
        "score_mean_normal": float(ae_score[is_normal].mean()) if is_normal.any() else None,
        "score_mean_other": float(ae_score[~is_normal].mean()) if (~is_normal).any() else None,
        "auc_other_vs_normal": auc((~is_normal).astype(int), ae_score),
    }
    return m


def group_metrics(groups: dict[str, np.ndarray], y: np.ndarray, probs: np.ndarray, labels: list[str],
                  normal: int) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, values in groups.items():
        out[name] = {}
        for v in sorted(np.unique(values)):
            rows = values == v
            m = classification_metrics(y[rows], probs[rows], labels, normal)
            out[name][str(v)] = {key: m[key] for key in ("n", "accuracy", "balanced_accuracy", "auc",
                                                         "sensitivity", "specificity") if key in m}
    return out


# --- the run's steps, over one typed value per split ------------------------------------------------


def fingerprint(files: list[Path], extra: Path | None) -> str:
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: str(p)):
        h.update(f.read_bytes())
    if extra is not None:
        h.update(extra.read_bytes())
    return h.hexdigest()



@dataclass(frozen=True)
class Split:
    """One split's rows on their way through training. `raw`: (n, F) float64 features after imputation; `y`:
    (n,) int64 label indices; `window`: (n, W, C) raw windows (cnn1d tasks only); `group`: (n,) split group
    (group_by) or None; `report`: report group name -> (n,) values; `x` / `w`: the normalised float32 model
    inputs, features (n, F) and windows (n, C, W), set by `_normalise`; `extremes`: (n, 2, C) each raw
    window's per-channel min and max (window tasks; NaN for extra-label rows without a window), from which
    export sets the input envelope; `rel`: (n, F) float64 features relative to each row's recording's baseline
    ([baseline] recipes, edgekit/baseline.py), which the models read in place of `raw`, else None."""

    raw: np.ndarray
    y: np.ndarray
    window: np.ndarray | None = None
    group: np.ndarray | None = None
    report: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    x: np.ndarray | None = None
    w: np.ndarray | None = None
    extremes: np.ndarray | None = None
    rel: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.y)
        arrays = {"raw": self.raw, "window": self.window, "group": self.group, "x": self.x, "w": self.w,
                  "extremes": self.extremes, "rel": self.rel,
                  **{f"report.{k}": v for k, v in self.report.items()}}
        for name, a in arrays.items():
            if a is not None and len(a) != n:
                raise ValueError(f"Split.{name} has {len(a)} rows, y has {n}")

    @property
    def feats(self) -> np.ndarray:
        """The features the models read before normalisation: relative to the baseline, or raw."""
        return self.raw if self.rel is None else self.rel

    def model_input(self, kind: str) -> np.ndarray:
        """The normalised input of a model that takes `kind` ("features" or "window")."""
        a = self.w if kind == "window" else self.x
        if a is None:
            raise ValueError(f"split has no normalised {kind} (run _normalise first)")
        return a


@dataclass
class Fitted:
    """A trained torch model, what rebuilds it (arch and kwargs for save_checkpoint) and its loss per epoch."""

    model: nn.Module
    arch: str
    kwargs: dict[str, Any]
    history: dict[str, list[float]]
    best_epoch: int | None = None


@dataclass(frozen=True)
class Scores:
    """Every model's output on one split: predictor and second-opinion probabilities (n, K) and the
    autoencoder's score (n,), as float64."""

    y: np.ndarray
    probs: np.ndarray
    ae_score: np.ndarray
    second: np.ndarray


def _predictor_input(recipe: Recipe) -> str:
    """What the predictor takes: "window" for a cnn1d, else "features"."""
    return "window" if recipe.predictor.arch == "cnn1d" else "features"


def _load_recipe(recipe_path: Path, epochs: int | None, overrides: dict[str, Any] | None = None
                 ) -> tuple[Recipe, torch.device]:
    """Step 1: the recipe (with the epochs and other dotted-key overrides), seeds set, the device picked."""
    overrides = dict(overrides or {})
    if epochs is not None:
        overrides.update({"predictor.epochs": epochs, "autoencoder.epochs": epochs})
    recipe = load_recipe(recipe_path, overrides or None)
    seed_everything(recipe.seed)
    device = pick_device()
    log.info("train_start task=%s device=%s seed=%d recipe=%s", recipe.task, device.type, recipe.seed,
             recipe_path)
    return recipe, device


def channel_range(windows: np.ndarray) -> dict[str, list[float]]:
    """Per-channel min and max of raw (n, W, C) training windows."""
    return {"min": windows.min(axis=(0, 1)).tolist(), "max": windows.max(axis=(0, 1)).tolist()}


def window_extremes(windows: np.ndarray) -> np.ndarray:
    """(n, 2, C) float64: each raw (n, W, C) window's per-channel min and max (splits.npz window_min/max)."""
    return np.stack([windows.min(axis=1), windows.max(axis=1)], axis=1).astype(np.float64)


def _describe_input(recipe: Recipe, data: TaskData, train_rows: np.ndarray,
                    baseline: BaselineSpec | None = None) -> RunInput:
    """run.json's input: what the models' inputs are built from (channel_range: the train split's windows)."""
    return RunInput(baseline=baseline,
        kind=data.kind, extractor=data.extractor, channels=data.channels, rate_hz=data.rate_hz,
        window_size=recipe.window.size if recipe.window else None,
        window_hop=recipe.window.hop if recipe.window else None,
        feature_names=data.feature_names, feature_params=recipe.features.params,
        channel_range=channel_range(data.windows[train_rows]) if data.windows is not None else None,
        recording=data.recording, units=data.units, max_gap_s=data.max_gap_s)


def _split(recipe: Recipe, data: TaskData) -> dict[str, np.ndarray]:
    """Step 2: train/cal/test rows (split_indices). With a [baseline], the rows that are their recording's
    baseline windows are no cases (the agent answers none of them) and are left out before splitting."""
    where = f"{data.source} (splits)"
    if data.in_baseline is None:
        return split_indices(data.y, data.split_groups, recipe.splits.cal, recipe.splits.test, recipe.seed,
                             recipe.labels, where=where)
    rows = np.flatnonzero(~data.in_baseline)
    if not len(rows):
        assert recipe.baseline is not None
        raise DataError(f"every window is a baseline window: no recording has more than [baseline] windows = "
                        f"{recipe.baseline.windows}", where=where, hint="lower baseline.windows or use longer recordings")
    groups = data.split_groups[rows] if data.split_groups is not None else None
    sub = split_indices(data.y[rows], groups, recipe.splits.cal, recipe.splits.test, recipe.seed, recipe.labels,
                        where=where)
    return {name: rows[ix] for name, ix in sub.items()}


def _commission(recipe: Recipe, data: TaskData, rows: dict[str, np.ndarray]
                ) -> tuple[BaselineSpec | None, np.ndarray | None]:
    """Step 2b ([baseline] recipes): every row's features relative to its own recording's first windows
    (edgekit/baseline.py `relative`, the agent's rule), each baseline std floored at std_floor x the feature's
    spread over the train split's rows. Returns the manifest's spec and the relative features (n, F)."""
    cfg = recipe.baseline
    if cfg is None or data.recording_id is None:
        return None, None
    spread = data.features[rows["train"]].std(axis=0)
    floor = std_floor(spread, cfg.std_floor)
    rel = np.zeros_like(data.features, dtype=np.float64)
    for name, (mean, std) in data.baselines.items():
        at = data.recording_id == name
        rel[at] = relative(data.features[at], mean, std, floor)
    log.info("baseline windows=%d std_floor=%g recordings=%d baseline_rows=%d", cfg.windows, cfg.std_floor,
             len(data.baselines), int(np.sum(data.in_baseline)) if data.in_baseline is not None else 0)
    spec = BaselineSpec(
        windows=cfg.windows, std_floor=cfg.std_floor, spread=spread.tolist(),
        basis=f"each recording (file, or chunk of one) relative to the mean and std of its own first {cfg.windows} "
              f"windows, which are no training, calibration or test rows; a std below {cfg.std_floor:g} x the "
              "feature's std over the train split is raised to it")
    return spec, rel


def _impute(recipe: Recipe, data: TaskData, rows: dict[str, np.ndarray], rel: np.ndarray | None = None
            ) -> tuple[Imputation | None, dict[str, Split]]:
    """Step 3: empty cells get the train split's median (recipe data.imputation); one Split per split."""
    values = fit_imputation(data.features[rows["train"]], data.feature_names, recipe.data.imputation,
                            where=data.source)
    imputation = None
    if values is not None:
        log.info("imputation method=median columns=%d missing_cells=%d", len(values),
                 int(np.isnan(data.features).sum()))
        missing = np.isnan(data.features).sum(axis=0)
        imputation = Imputation(method="median", values=values,
                                missing={n: int(c) for n, c in zip(data.feature_names, missing) if c})
    raw = apply_imputation(data.features, data.feature_names, values)
    use_window = _predictor_input(recipe) == "window"
    splits = {
        name: Split(raw=raw[r], y=data.y[r],
                    window=data.windows[r] if use_window and data.windows is not None else None,
                    group=data.split_groups[r] if data.split_groups is not None else None,
                    report={k: v[r] for k, v in data.report_groups.items()},
                    extremes=window_extremes(data.windows[r]) if data.windows is not None else None,
                    rel=rel[r] if rel is not None else None)
        for name, r in rows.items()}
    return imputation, splits


def _join_extra_labels(train: Split, path: Path, recipe: Recipe, data: TaskData
                       ) -> tuple[Split, int, dict[str, Any]]:
    """Step 3b: the hub's reviewed labels appended to the train split (group and report groups
    "extra_labels"). Returns the new train split, the rows added and the skipped counts."""
    ex_x, ex_y, ex_w, ex_rel, skipped = read_extra_labels(
        path, recipe.labels, data.feature_names, _predictor_input(recipe) == "window", data.channels,
        recipe.window.size if recipe.window else None, recipe.extra_labels, need_relative=train.rel is not None)
    added = len(ex_y)
    extremes = train.extremes
    if extremes is not None:
        ex_extremes = (window_extremes(ex_w) if ex_w is not None and len(ex_w) == added
                       else np.full((added, *extremes.shape[1:]), np.nan))
        extremes = np.concatenate([extremes, ex_extremes])
    joined = dataclasses.replace(
        train, raw=np.concatenate([train.raw, ex_x]), y=np.concatenate([train.y, ex_y]),
        window=np.concatenate([train.window, ex_w]) if train.window is not None and ex_w is not None else train.window,
        group=np.concatenate([train.group, np.full(added, "extra_labels")]) if train.group is not None else None,
        report={k: np.concatenate([v, np.full(added, "extra_labels")]) for k, v in train.report.items()},
        extremes=extremes,
        rel=np.concatenate([train.rel, ex_rel]) if train.rel is not None and ex_rel is not None else train.rel)
    log.info("extra_labels added=%d file=%s", added, path)
    return joined, added, skipped


def _normalise(splits: dict[str, Split]) -> tuple[dict[str, Split], Normalize]:
    """Step 4: features (relative to their baseline, with one) and windows (per channel) standardised with the
    train split's mean and std."""
    train = splits["train"]
    mean, std = fit_normalizer(train.feats)
    w_stats = fit_normalizer(train.window, axis=(0, 1)) if train.window is not None else None
    out = {}
    for name, s in splits.items():
        w = None
        if s.window is not None and w_stats is not None:
            w = np.ascontiguousarray(((s.window - w_stats[0]) / w_stats[1]).transpose(0, 2, 1)).astype(np.float32)
        out[name] = dataclasses.replace(s, x=((s.feats - mean) / std).astype(np.float32), w=w)
    window = Stats(mean=w_stats[0].tolist(), std=w_stats[1].tolist()) if w_stats is not None else None
    return out, Normalize(features=Stats(mean=mean.tolist(), std=std.tolist()), window=window)


def _fit_predictor(recipe: Recipe, data: TaskData, splits: dict[str, Split], device: torch.device,
                   progress: bool) -> Fitted:
    """Step 5: the predictor, early-stopped on the cal split's loss (fit_predictor)."""
    pcfg = recipe.predictor
    k = len(recipe.labels)
    kwargs: dict[str, Any]
    if _predictor_input(recipe) == "window":
        kwargs = {"n_channels": len(data.channels or []), "n_classes": k,
                  "window": int(recipe.window.size if recipe.window else 0),
                  "width": pcfg.hidden[0], "dropout": pcfg.dropout}
    else:
        kwargs = {"n_features": len(data.feature_names), "n_classes": k, "hidden": tuple(pcfg.hidden),
                  "dropout": pcfg.dropout}
    train, cal, kind = splits["train"], splits["cal"], _predictor_input(recipe)
    model = new_predictor(pcfg, kwargs, train.model_input("features"), recipe.seed)
    history, best = fit_predictor(model, train.model_input(kind), train.y, cal.model_input(kind), cal.y, k, pcfg,
                                  device, recipe.seed, progress)
    return Fitted(model, pcfg.arch, kwargs, history, best)


def _fit_autoencoder(recipe: Recipe, data: TaskData, splits: dict[str, Split], device: torch.device,
                     progress: bool) -> Fitted:
    """Step 6: the dense autoencoder on the train rows of normal_label (or all of them: fit_on = "all")."""
    acfg = recipe.autoencoder
    normal = recipe.labels.index(recipe.normal_label)
    rows = {s: (np.ones(len(splits[s].y), bool) if acfg.fit_on == "all" else splits[s].y == normal)
            for s in ("train", "cal")}
    if not rows["train"].any():
        raise DataError(f"no training rows of the normal label {recipe.normal_label!r} for the autoencoder",
                        where=data.source)
    kwargs = {"n_features": len(data.feature_names), "hidden": tuple(acfg.hidden)}
    torch.manual_seed(recipe.seed)
    model = build("dense_ae", **kwargs)
    history = fit_autoencoder(model, splits["train"].model_input("features")[rows["train"]],
                              splits["cal"].model_input("features")[rows["cal"]], acfg, device, recipe.seed,
                              progress)
    return Fitted(model, "dense_ae", kwargs, history)


def _score(recipe: Recipe, splits: dict[str, Split], predictor: Fitted, autoencoder: Fitted, second: Any,
           device: torch.device) -> dict[str, Scores]:
    """Step 8: every model's output on every split."""
    kind = _predictor_input(recipe)
    return {name: Scores(y=s.y, probs=_predict(predictor.model, s.model_input(kind), device),
                         ae_score=_predict(autoencoder.model, s.model_input("features"), device),
                         second=second.predict_proba(s.model_input("features")).astype(np.float64))
            for name, s in splits.items()}


def _write_models(out: Path, predictor: Fitted, autoencoder: Fitted, second: Any) -> None:
    """Step 9a: predictor.pt, autoencoder.pt (on the CPU) and second_opinion.pkl."""
    for fitted, name in ((predictor, "predictor.pt"), (autoencoder, "autoencoder.pt")):
        save_checkpoint(out / name, fitted.model.cpu(), fitted.arch, fitted.kwargs)
    with (out / "second_opinion.pkl").open("wb") as fh:
        pickle.dump(second, fh)


def _write_splits(out: Path, splits: dict[str, Split]) -> None:
    """Step 9b: splits.npz (layout in edgekit/contract/run.py)."""
    arrays: dict[str, np.ndarray] = {}
    for name, s in splits.items():
        arrays[f"{name}_features"] = s.model_input("features")
        arrays[f"{name}_features_raw"] = s.raw.astype(np.float32)
        arrays[f"{name}_y"] = s.y.astype(np.int64)
        if s.w is not None:
            arrays[f"{name}_window"] = s.w
        if s.extremes is not None:
            arrays[f"{name}_window_min"] = s.extremes[:, 0]
            arrays[f"{name}_window_max"] = s.extremes[:, 1]
        if s.group is not None:
            arrays[f"{name}_group"] = s.group.astype(str)
    np.savez_compressed(out / "splits.npz", **arrays)


def _model_files(recipe: Recipe) -> RunModels:
    """run.json's models: the files step 9a writes and what each model takes."""
    return RunModels(
        predictor=PredictorModel(file="predictor.pt", arch=recipe.predictor.arch, input=_predictor_input(recipe)),
        autoencoder=AutoencoderModel(file="autoencoder.pt", arch="dense_ae", input="features",
                                     fit_on=recipe.autoencoder.fit_on),
        second_opinion=SecondOpinionModel(file="second_opinion.pkl", kind=recipe.second_opinion.kind,
                                          input="features"))


def _metrics(recipe: Recipe, splits: dict[str, Split], scores: dict[str, Scores]
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    """run.json's metrics per split and the test split's metrics per report group."""
    labels, normal = recipe.labels, recipe.labels.index(recipe.normal_label)
    metrics = {name: split_metrics(s.y, s.probs, s.second, s.ae_score, labels, normal)
               for name, s in scores.items()}
    test = scores["test"]
    return metrics, group_metrics(splits["test"].report, test.y, test.probs, labels, normal)


def train(recipe_path: Path, out: Path, *, extra_labels: Path | None = None, epochs: int | None = None,
          progress: bool = True, overrides: dict[str, Any] | None = None) -> Path:
    """Train everything a recipe asks for and write the run directory `out` (edgekit/contract/run.py).

    `extra_labels`: a labels CSV from the hub, appended to the train split only. `epochs` overrides both
    predictor.epochs and autoencoder.epochs; `overrides` other recipe keys by dotted name (an evaluation's
    fold: {"data.files": [...]}); both validated like the recipe. `progress`: tqdm bars per model.
    Raises ConfigError (recipe), DataError (files, columns, classes, splits). Returns `out`.

    On CPU torch runs one intra-op thread while training: these models are small enough that a second
    thread only spins (measured: a 7,000-row MLP epoch took 27x longer with 2 threads on a busy 2-core VM).
    """
    threads = torch.get_num_threads()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    try:
        return _train(recipe_path, out, extra_labels=extra_labels, epochs=epochs, progress=progress,
                      overrides=overrides)
    finally:
        torch.set_num_threads(threads)


def _train(recipe_path: Path, out: Path, *, extra_labels: Path | None, epochs: int | None,
           progress: bool, overrides: dict[str, Any] | None = None) -> Path:
    """The steps in order; the seeds and the order of random draws are part of the result."""
    started = time.perf_counter()
    recipe_path, out = Path(recipe_path), Path(out)
    recipe, device = _load_recipe(recipe_path, epochs, overrides)
    data = load_task(recipe, recipe_path.parent)
    rows = _split(recipe, data)
    baseline, rel = _commission(recipe, data, rows)
    imputation, splits = _impute(recipe, data, rows, rel)
    added, skipped, extra = 0, {}, Path(extra_labels) if extra_labels is not None else None
    if extra is not None:
        splits["train"], added, skipped = _join_extra_labels(splits["train"], extra, recipe, data)
    splits, normalize = _normalise(splits)
    predictor = _fit_predictor(recipe, data, splits, device, progress)
    autoencoder = _fit_autoencoder(recipe, data, splits, device, progress)
    second = fit_second_opinion(recipe, splits["train"].model_input("features"), splits["train"].y, str(recipe_path))
    scores = _score(recipe, splits, predictor, autoencoder, second, device)
    metrics, groups_metrics = _metrics(recipe, splits, scores)

    out.mkdir(parents=True, exist_ok=True)
    _write_models(out, predictor, autoencoder, second)
    _write_splits(out, splits)
    meta = RunMeta(
        task=recipe.task, recipe=recipe.model_dump(mode="json"), seed=recipe.seed, device=device.type,
        labels=recipe.labels, normal_label=recipe.normal_label, positive_label=recipe.positive_label,
        input=_describe_input(recipe, data, rows["train"], baseline), normalize=normalize, imputation=imputation,
        data_fingerprint=fingerprint(data.files, extra),
        models=_model_files(recipe), gate=GateTarget(target_error=recipe.gate.target_error, delta=recipe.gate.delta),
        metrics=metrics, groups_metrics=groups_metrics,
        split_sizes={name: int(len(s.y)) for name, s in splits.items()},
        extra_labels_added=added, extra_labels_skipped=skipped,
        history={"predictor": predictor.history, "autoencoder": autoencoder.history},
        predictor_best_epoch=predictor.best_epoch, train_seconds=round(time.perf_counter() - started, 2),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), code_version=edgekit.__version__)
    written = write_run(out, meta)

    from edgekit.exporters.training.report import write_report  # matplotlib only when a report is written

    test = scores["test"]
    write_report(out, written, test.y, test.probs, test.ae_score)
    t = metrics["test"]
    log.info("train_done task=%s out=%s seconds=%.1f test_accuracy=%.3f test_balanced_accuracy=%s test_auc=%s",
             recipe.task, out, time.perf_counter() - started, t["accuracy"], t["balanced_accuracy"], t["auc"])
    return out
