"""The generic recordings loader (recipe `data.loader = "recordings"`): files of sample streams -> windows.

A user's CSV/TSV recordings, described by the recipe alone: which files ([[data.files]] globs), how a file
holds samples (data.layout, a manifest.Recording: the layout the agent's replay reads, resolved against each
file's header by the same code, edgekit/source.py ReplayReader), which columns are channels, where labels
come from ([data.label]: a column, the folder, a name pattern, an intervals CSV or a JSON sidecar) and which
file fields group the splits and the report (data.name_pattern, data.sidecar).

A step in time longer than data.max_gap_s (dropped lines make steps too) splits a recording into segments,
as the agent's Windower splits a stream; windows never span two. A line whose time does not advance is
dropped, as the agent's replay quarantines it. Bad input is one warning line naming file, line and column,
and the rest is read where that is safe: a line that is not a sample is dropped (and splits), a file
without a channel, with no samples or at another rate is skipped. A label outside `labels` is an error
listing them. numpy and edgekit only (no torch).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.config import ReplaySource
from edgekit.errors import DataError
from edgekit.recipe import FileSet, Recipe
from edgekit.source import LineRejected, ReplayReader, rate_differs
from edgekit.window import sample_rate

log = logging.getLogger(__name__)

GAP_PERIODS = 3.0  # default data.max_gap_s: this many sample periods


@dataclass
class Context:
    """What reading every file of one recipe shares: the folder, the first file's rate, the intervals table
    (read once) and the problem lines collected on the way."""

    recipe: Recipe
    root: Path
    rate_hz: float | None = None
    max_gap_s: float | None = None  # data.max_gap_s, or GAP_PERIODS periods of the first file's rate
    problems: list[str] = field(default_factory=list)
    intervals: dict[str, list[tuple[str, float, float]]] | None = None


@dataclass
class Part:
    """One recording (or one chunk of it) as read: samples, per-sample label indices, segment starts."""

    path: Path
    rel: str  # path relative to data.path (the 'file' split group), '#k' appended for chunks
    values: np.ndarray  # (n, C) float64
    labels: np.ndarray  # (n,) int64 class index
    starts: list[int]  # segment boundaries [0, ..., n]: windows stay inside one segment
    fields: dict[str, str] = field(default_factory=dict)  # file fields: file, folder, name_pattern, sidecar


def natural_key(path: Path) -> list[Any]:
    """'2.csv' before '10.csv', '1-2_lb.txt' before '10-1_lb.txt'."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", path.as_posix())]


def list_files(root: Path, fs: FileSet, max_files: int | None) -> list[Path]:
    """The files of one set: each glob's matches in natural order, first `max_files` of the set."""
    out: list[Path] = []
    for pattern in [fs.glob] if isinstance(fs.glob, str) else fs.glob:
        found = sorted((p for p in root.glob(pattern) if p.is_file()), key=lambda p: natural_key(p.relative_to(root)))
        out.extend(p for p in found if p not in out)
    return out[:max_files] if max_files else out


def file_fields(path: Path, root: Path, recipe: Recipe) -> dict[str, str]:
    """A file's fields: 'file', 'folder', the named groups of data.name_pattern, the sidecar's scalars."""
    d = recipe.data
    rel = path.relative_to(root).as_posix()
    fields = {"file": rel, "folder": path.parent.relative_to(root).as_posix() or "."}
    if d.name_pattern:
        m = re.search(d.name_pattern, rel)
        if m is None:
            raise DataError(f"does not match data.name_pattern {d.name_pattern!r}", where=str(path))
        fields.update({k: v for k, v in m.groupdict().items() if v is not None})
    return fields


def read_sidecar(path: Path, fields: dict[str, str], pattern: str) -> dict[str, Any]:
    try:
        name = pattern.format(stem=path.stem, name=path.name, **fields)
    except KeyError as exc:
        raise DataError(f"data.sidecar {pattern!r} names {exc}, which is not a field of this file "
                        f"(fields: {sorted(fields)})", where=str(path)) from None
    side = path.with_name(name)
    if not side.is_file():
        raise DataError("sidecar not found", where=str(side), hint=f"data.sidecar = {pattern!r}")
    try:
        obj = json.loads(side.read_text())
    except (ValueError, UnicodeError) as exc:
        raise DataError(f"not JSON ({exc})", where=str(side)) from None
    if not isinstance(obj, dict):
        raise DataError("expected a JSON object", where=str(side))
    return obj


def _header(path: Path, recipe: Recipe) -> list[str]:
    layout = recipe.data.layout
    assert layout is not None
    with path.open(newline="", errors="replace") as fh:
        for _ in range(layout.header_line - 1):
            fh.readline()
        return fh.readline().rstrip("\r\n").split(layout.delimiter)


def _cells(path: Path, first_line: int, delimiter: str) -> tuple[list[list[str]], list[int]]:
    """The data lines' cells and 1-based line numbers (blank lines left out)."""
    rows, linenos = [], []
    with path.open(newline="", errors="replace") as fh:
        for n, row in enumerate(csv.reader(fh, delimiter=delimiter), 1):
            if n >= first_line and row and any(c.strip() for c in row):
                rows.append(row)
                linenos.append(n)
    return rows, linenos


def _clean(rows: list[list[str]], linenos: list[int], lay: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(values, time) of a file whose every line is a sample, converted in one go; None when any line is
    not (then `_samples` goes line by line and names it)."""
    if any(len(row) != lay.ncols for row in rows):
        return None
    try:
        values = np.array([[row[c] for c in lay.value_cols] for row in rows], dtype=np.float64)
        t = ((np.asarray(linenos, dtype=np.float64) - lay.first_line) / lay.rate_hz if lay.time_col is None
             else np.array([lay.stamp(row[lay.time_col]) for row in rows], dtype=np.float64))
    except (ValueError, LineRejected):
        return None
    return (values, t) if np.isfinite(values).all() and np.isfinite(t).all() else None


def _samples(path: Path, rows: list[list[str]], linenos: list[int], lay: Any, names: tuple[str, ...],
             problems: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values (n, C), time (n,), kept row indices): lines with a bad cell or stamp are dropped, one
    problem line each (the first 5 of a file, then a count)."""
    clean = _clean(rows, linenos, lay) if rows else None
    if clean is not None:
        return _advancing(path, clean[0], clean[1], np.arange(len(rows)), linenos, problems)
    values = np.full((len(rows), len(names)), np.nan)
    t = np.full(len(rows), np.nan)
    bad = 0
    for i, (row, n) in enumerate(zip(rows, linenos)):
        try:
            if len(row) != lay.ncols:
                raise LineRejected(f"expected {lay.ncols} cells, got {len(row)}")
            for j, (col, name) in enumerate(zip(lay.value_cols, names)):
                try:
                    values[i, j] = float(row[col])
                except ValueError:
                    raise LineRejected(f"column {name!r}: expected a number (got {row[col][:40]!r})") from None
            t[i] = (n - lay.first_line) / lay.rate_hz if lay.time_col is None else lay.stamp(row[lay.time_col])
            if not (np.isfinite(values[i]).all() and math.isfinite(t[i])):
                raise LineRejected("not a finite number")
        except LineRejected as exc:
            values[i] = np.nan
            bad += 1
            if bad <= 5:
                problems.append(f"{path}:{n}: {exc} (line dropped)")
    if bad > 5:
        problems.append(f"{path}: {bad - 5} more lines dropped")
    keep = np.flatnonzero(np.isfinite(values).all(axis=1) & np.isfinite(t))
    return _advancing(path, values[keep], t[keep], keep, linenos, problems)


def _advancing(path: Path, values: np.ndarray, t: np.ndarray, keep: np.ndarray, linenos: list[int],
               problems: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows whose stamp advances past every earlier one (the agent's replay quarantines the others)."""
    ahead = t > np.concatenate(([-np.inf], np.maximum.accumulate(t)[:-1]))
    if not ahead.all():
        first = int(keep[np.flatnonzero(~ahead)[0]])
        problems.append(f"{path}:{linenos[first]}: time does not advance ({int((~ahead).sum())} lines dropped)")
    return values[ahead], t[ahead], keep[ahead]


def _segments(t: np.ndarray, max_gap_s: float) -> list[int]:
    """Segment boundaries: a step over max_gap_s, as the agent's Windower cuts a stream (a dropped line is a
    step of two periods, in sample-clock files too: their time is the line's)."""
    cut = np.diff(t) > max_gap_s
    return [0, *(np.flatnonzero(cut) + 1).tolist(), len(t)]


def read_part(ctx: Context, path: Path, label: str | None = None) -> Part | None:
    """One recording -> Part, or None (skipped, with the reason in ctx.problems). `label`: every sample's
    (a file set's label), else [data.label] says. The first file read sets ctx.rate_hz."""
    recipe, problems, rate_hz = ctx.recipe, ctx.problems, ctx.rate_hz
    d = recipe.data
    assert d.layout is not None and d.channels is not None and d.label is not None
    names = tuple(d.channels)
    try:
        lay = ReplayReader(ReplaySource(path=path, layout=d.layout), stop=threading.Event(),
                           channel_names=names).layout
    except DataError as exc:
        problems.append(f"{exc} (file skipped)")
        return None
    header = _header(path, recipe)
    column = d.label.column if d.label.source == "column" and label is None else None
    if column is not None and column not in header:
        problems.append(f"{path}:{d.layout.header_line}: no label column {column!r} (file skipped)")
        return None
    rows, linenos = _cells(path, lay.first_line, d.layout.delimiter)
    values, t, keep = _samples(path, rows, linenos, lay, names, problems)
    if not len(values):
        problems.append(f"{path}: no samples (file skipped)")
        return None
    rate = lay.rate_hz
    if d.layout.time_column and d.layout.rate_hz is None:  # the whole file's steps, not the head's median
        rate = float(f"{sample_rate(t) or rate:.6g}")  # stamps resolve ~1e-6: more digits are noise
    if rate_hz is not None and rate_differs(rate, rate_hz):  # the tolerance the agent holds sources to
        problems.append(f"{path}: rate {rate:.6g} Hz, the first file's is {rate_hz:.6g} Hz (file skipped; "
                        "one bundle takes one rate)")
        return None
    fields = file_fields(path, ctx.root, recipe)
    side = read_sidecar(path, fields, d.sidecar) if d.sidecar else None
    if side is not None:
        fields.update({k: str(v) for k, v in side.items() if isinstance(v, (str, int, float, bool))})
    labels = (np.full(len(t), recipe.labels.index(label), dtype=np.int64) if label is not None else
              sample_labels(ctx, path, fields, side, [rows[i] for i in keep], [linenos[i] for i in keep], header, t))
    ctx.rate_hz = rate if rate_hz is None else rate_hz
    ctx.max_gap_s = max_gap = d.max_gap_s if d.max_gap_s is not None else GAP_PERIODS / ctx.rate_hz
    return Part(path, fields["file"], values, labels, _segments(t, max_gap), fields)


def sample_labels(ctx: Context, path: Path, fields: dict[str, str], side: dict[str, Any] | None, rows: list[list[str]],
                  linenos: list[int], header: list[str], t: np.ndarray) -> np.ndarray:
    """(n,) class index per sample from [data.label] (-1: from the file set); DataError naming file, line
    and column for a label outside `labels`."""
    spec, labels = ctx.recipe.data.label, ctx.recipe.labels
    assert spec is not None
    n = len(rows)
    if spec.source == "column":
        assert spec.column is not None
        j = header.index(spec.column)
        return _column_labels([r[j] for r in rows], linenos, spec.map, labels, f"{path}", spec.column)
    if spec.source in ("folder", "pattern"):
        name = fields["folder"].rsplit("/", 1)[-1] if spec.source == "folder" else fields.get("label", "")
        return np.full(n, _index(name, labels, f"{path} ({spec.source} label)"), dtype=np.int64)
    if spec.source == "files":
        return np.full(n, -1, dtype=np.int64)  # set by the file set's label
    default = _index(spec.default, labels, "data.label.default") if spec.default is not None else -1
    out = np.full(n, default, dtype=np.int64)
    pos = t - t[0] if spec.unit == "seconds" else np.arange(n, dtype=np.float64)
    for label, start, end in _intervals(ctx, fields, side):
        out[(pos >= start) & (pos < end)] = _index(label, labels, f"{path} (interval label)")
    return out


def _index(name: str | None, labels: list[str], where: str) -> int:
    if name not in labels:
        raise DataError(f"label {name!r} is not one of labels {labels}", where=where,
                        hint="add it to `labels`, or map it with data.label.map")
    return labels.index(name)


def _column_labels(cells: list[str], linenos: list[int], mapping: dict[str, str], labels: list[str],
                   path: str, column: str) -> np.ndarray:
    """A label column's cells as class indices: `mapping` first (numbers compare as numbers), then a label
    name, then an integer class index."""
    def number(s: str) -> float | None:
        try:
            return float(s)
        except ValueError:
            return None

    by_number = {number(k): v for k, v in mapping.items() if number(k) is not None}
    cache: dict[str, int] = {}
    out = np.empty(len(cells), dtype=np.int64)
    for i, raw in enumerate(cells):
        cell = raw.strip()
        if cell not in cache:
            x = number(cell)
            name = mapping.get(cell) or (by_number.get(x) if x is not None else None)
            if name is None and cell in labels:
                name = cell
            if name is None and x is not None and x.is_integer() and 0 <= x < len(labels):
                name = labels[int(x)]
            if name is None:
                raise DataError(f"column {column!r}: {cell!r} is not one of labels {labels} nor a class index",
                                where=f"{path}:{linenos[i]}", hint="map it with data.label.map")
            cache[cell] = labels.index(name)
        out[i] = cache[cell]
    return out


def _intervals(ctx: Context, fields: dict[str, str], side: dict[str, Any] | None) -> list[tuple[str, float, float]]:
    """(label, start, end) for one file, from the intervals CSV or the file's sidecar."""
    spec = ctx.recipe.data.label
    assert spec is not None
    if spec.source == "sidecar":
        assert side is not None
        out = []
        for label, key in spec.keys.items():
            if key not in side:
                raise DataError(f"no key {key!r} (label {label!r})", where=f"sidecar of {fields['file']}")
            spans = side[key]
            for a, b in ([spans] if spans and not isinstance(spans[0], list) else spans):
                out.append((label, float(a), float(b)))
        return out
    if ctx.intervals is None:
        assert spec.intervals is not None
        ctx.intervals = read_intervals(ctx.root / spec.intervals)
    return ctx.intervals.get(fields["file"], [])


def read_intervals(path: Path) -> dict[str, list[tuple[str, float, float]]]:
    """An intervals CSV (columns file, start, end, label) as {file: [(label, start, end), ...]}."""
    from edgekit import datasets

    header, rows = datasets.read_table(path)
    missing = [c for c in ("file", "start", "end", "label") if c not in header]
    if missing:
        raise DataError(f"missing columns {missing}; the file has {header}", where=str(path))
    at = {c: header.index(c) for c in ("file", "start", "end", "label")}
    table: dict[str, list[tuple[str, float, float]]] = {}
    for n, r in enumerate(rows, 2):
        try:
            span = (r[at["label"]].strip(), float(r[at["start"]]), float(r[at["end"]]))
        except (ValueError, IndexError):
            raise DataError("expected file, start (number), end (number), label", where=f"{path}:{n}") from None
        table.setdefault(r[at["file"]].strip(), []).append(span)
    return table
