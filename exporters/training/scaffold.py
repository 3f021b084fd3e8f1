"""`edgekit init DATA_DIR`: a recipe written from a folder of recordings, every guess marked in a comment.

Looks at the files as a person would: the most common data file suffix, the first file's head for the
delimiter, the header line (and a sample rate written above it), then at each column of a few files for a
time column, a label column and the channels; the labels from the label column's values (or the folders,
when there is no label column and the files sit in two or more folders). Files without the label column
become a set of their own whose label is the 'normal' guess (a folder of normal recordings). The recipe is
the recordings loader's (exporters/training/recordings.py) and trains as written; the comments say what to
check. numpy and the standard library only.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from edgekit.errors import DataError
from edgekit.window import sample_rate

SUFFIXES = (".csv", ".tsv", ".txt", ".dat")
DELIMITERS = (",", ";", "\t", "|")
TIME_NAMES = ("time", "timestamp", "datetime", "date", "t", "ts", "time_s", "seconds")
LABEL_NAMES = ("label", "class", "state", "status", "anomaly", "fault", "target", "y", "condition")
COUNTER_NAMES = ("counter", "packetcounter", "index", "idx", "sample", "seq")
NORMAL_NAMES = ("normal", "ok", "healthy", "good", "0", "none", "no", "false")
RATE_RE = r"([0-9]+(?:\.[0-9]+)?)\s*Hz"
HEAD_LINES = 400
MAX_LABEL_VALUES = 20


@dataclass
class Column:
    name: str
    cells: list[str] = field(default_factory=list)

    def numbers(self) -> np.ndarray | None:
        try:
            return np.array([float(c) for c in self.cells if c.strip()])
        except ValueError:
            return None

    def is_iso(self) -> bool:
        try:
            return all(datetime.fromisoformat(c.strip()) is not None for c in self.cells[:20] if c.strip())
        except ValueError:
            return False


@dataclass
class Sniffed:
    """What the head of one file says."""

    path: Path
    delimiter: str
    header_line: int  # 1-based
    above: list[str]  # the lines above the header
    columns: dict[str, Column]


def data_files(root: Path) -> tuple[list[Path], str]:
    """The files with the most common data suffix below root (README and other text aside)."""
    found = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
             and not p.name.lower().startswith(("readme", "license"))]
    if not found:
        raise DataError(f"no {', '.join(SUFFIXES)} files", where=str(root),
                        hint="point edgekit init at the folder holding the recordings")
    suffix = Counter(p.suffix for p in found).most_common(1)[0][0]
    return sorted(p for p in found if p.suffix == suffix), suffix


def sniff(path: Path) -> Sniffed:
    """Delimiter, header line and columns from the first HEAD_LINES lines of `path`."""
    with path.open(errors="replace") as fh:
        lines = [line.rstrip("\r\n") for _, line in zip(range(HEAD_LINES), fh)]
    lines = [ln for ln in lines if ln.strip()] or [""]
    best: tuple[int, int, str] | None = None  # (-score, header index, delimiter)
    for d in DELIMITERS:
        widths = [ln.count(d) for ln in lines]
        for i in range(min(10, len(lines))):
            body = widths[i + 1:]
            if widths[i] == 0 or not body:
                continue
            same = sum(w == widths[i] for w in body)
            if same >= 0.9 * len(body) and not _numeric_row(lines[i].split(d)):
                score = same * (widths[i] + 1)
                if best is None or -score < best[0]:
                    best = (-score, i, d)
                break
    if best is None:
        raise DataError("cannot find a header line followed by delimited rows (tried , ; tab |)",
                        where=f"{path}:1", hint="write the recipe by hand: data.layout.delimiter, header_line")
    _, i, d = best
    header = [h.strip() for h in lines[i].split(d)]
    cols = {h: Column(h) for h in header}
    for ln in lines[i + 1:]:
        cells = ln.split(d)
        if len(cells) == len(header):
            for h, c in zip(header, cells):
                cols[h].cells.append(c)
    return Sniffed(path, d, i + 1, lines[:i], cols)


def _numeric_row(cells: list[str]) -> bool:
    n = 0
    for c in cells:
        try:
            float(c)
            n += 1
        except ValueError:
            pass
    return n > len(cells) / 2


def _time_column(s: Sniffed) -> tuple[str | None, str, float | None]:
    """(name, 'iso' or 'seconds', rate from its steps) of the first column that reads as time."""
    for name, col in sorted(s.columns.items(), key=lambda kv: kv[0].lower() not in TIME_NAMES):
        if col.is_iso() and col.cells:
            stamps = np.array([datetime.fromisoformat(c.strip()).timestamp() for c in col.cells if c.strip()])
            return name, "iso", sample_rate(stamps)
        nums = col.numbers()
        if name.lower() in TIME_NAMES and nums is not None and len(nums) > 2 and np.all(np.diff(nums) > 0):
            return name, "seconds", sample_rate(nums)
    return None, "iso", None


def _label_column(s: Sniffed, skip: set[str]) -> str | None:
    """A column named like a label, or holding a few distinct words."""
    named = [n for n in s.columns if n.lower() in LABEL_NAMES and n not in skip]
    if named:
        return sorted(named, key=lambda n: LABEL_NAMES.index(n.lower()))[0]
    for name, col in s.columns.items():
        if name not in skip and col.numbers() is None and 1 < len(set(col.cells)) <= MAX_LABEL_VALUES:
            return name
    return None


def _label_values(files: list[Path], column: str, s: Sniffed) -> list[str]:
    """The distinct values of the label column in (up to 50 of) the files, whole files read; normal first."""
    import csv

    values: set[str] = set()
    for path in files[:50]:
        with path.open(errors="replace", newline="") as fh:
            for _ in range(s.header_line - 1):
                fh.readline()
            reader = csv.reader(fh, delimiter=s.delimiter)
            header = [h.strip() for h in next(reader, [])]
            if column in header:
                j = header.index(column)
                values.update(r[j].strip() for r in reader if len(r) > j and r[j].strip())
        if len(values) > MAX_LABEL_VALUES:
            break
    return sorted(values, key=lambda v: (v.lower() not in NORMAL_NAMES, _as_number(v), v))


def _as_number(v: str) -> float:
    try:
        return float(v)
    except ValueError:
        return float("inf")


def _fmt(v: float) -> str:
    return f"{v:g}"


@dataclass
class Guess:
    """The recipe's facts as found, and the comment lines that say how each was found."""

    files: list[Path]
    sniffed: Sniffed
    time: tuple[str | None, str, float | None]
    rate_hz: float | None
    rate_note: str
    label_column: str | None
    flags: list[str]
    channels: list[str]
    labelled: list[Path]  # files holding the label column


def guess(root: Path) -> Guess:
    """Look at the files under root (see the module's docstring)."""
    files, _ = data_files(root)
    picks = files[:: max(1, len(files) // 20)][:20]
    sniffs = [sniff(p) for p in picks]
    s = sniffs[0]
    time = _time_column(s)
    rate, note = time[2], f"from the steps of column {time[0]!r}" if time[0] else ""
    found = next((m for m in (re.search(RATE_RE, ln) for ln in s.above) if m), None)
    if found:
        rate, note = float(found.group(1)), f"written above the header ({found.group(0)!r})"
    skip = {c for c in (time[0],) if c} | {n for n in s.columns if n.lower() in COUNTER_NAMES}
    votes = Counter(c for c in (_label_column(x, skip) for x in sniffs) if c)
    label = votes.most_common(1)[0][0] if votes else None
    flags, channels = [], []
    common = [n for n in s.columns if all(n in x.columns for x in sniffs if label is None or label in x.columns)]
    for name in common:
        if name in skip or name == label:
            continue
        nums = s.columns[name].numbers()
        if nums is None:
            continue
        if label is not None and len(nums) and set(np.unique(nums)) <= {0.0, 1.0}:
            flags.append(name)
        else:
            channels.append(name)
    if not channels:
        raise DataError("no numeric columns to use as channels", where=f"{s.path}:{s.header_line}")
    labelled = [p for p in files if label is not None and label in _header(p, s)]
    return Guess(files, s, time, rate, note, label, flags, channels, labelled)


def _header(path: Path, s: Sniffed) -> list[str]:
    with path.open(errors="replace") as fh:
        for _ in range(s.header_line - 1):
            fh.readline()
        return [h.strip() for h in fh.readline().rstrip("\r\n").split(s.delimiter)]


def _globs(root: Path, files: list[Path], suffix: str) -> list[str]:
    """One glob per folder holding files, in natural order of folder names."""
    from edgekit.exporters.training.recordings import natural_key

    folders = sorted({p.parent.relative_to(root) for p in files}, key=natural_key)
    return [(f"{f.as_posix()}/" if str(f) != "." else "") + f"*{suffix}" for f in folders]


def _toml_str(v: str) -> str:
    return "'" + v + "'" if "'" not in v and "\n" not in v else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_list(vs: list[str]) -> str:
    return "[" + ", ".join(_toml_str(v) for v in vs) + "]"


def recipe_text(root: Path, path_value: str, relative_to: str, task: str) -> str:
    """The recipe for the recordings under root, with `data.path = path_value` (see `write_recipe`)."""
    g = guess(root)
    s, (tcol, tfmt, _), suffix = g.sniffed, g.time, g.files[0].suffix
    delim = {"\t": "\\t"}.get(s.delimiter, s.delimiter)
    out = [f"# Written by `edgekit init {root}` from {len(g.files)} {suffix} files. Lines marked GUESS are what",
           "# the files suggested: check them, then `edgekit train` this file.", f'task = "{task}"', "seed = 0"]
    data = ["", "[data]", 'loader = "recordings"', f"path = {_toml_str(path_value)}",
            f'relative_to = "{relative_to}"', f"channels = {_toml_list(g.channels)}  # GUESS: the numeric columns"
            + (f" (left out as flags: {', '.join(g.flags)})" if g.flags else ""),
            "# Units are not in the files: [data.units] channel = 'unit' puts them in the bundle and on the review page."]
    layout = ["", "[data.layout]", f'delimiter = "{delim}"', f"header_line = {s.header_line}"]
    if tcol:
        layout += [f"time_column = {_toml_str(tcol)}  # GUESS", f'time_format = "{tfmt}"']
    if g.rate_hz:
        layout.append(f"rate_hz = {float(f'{g.rate_hz:.4g}'):g}  # GUESS: {g.rate_note}")
    else:
        raise DataError("cannot tell the sample rate: no time column and no 'N Hz' above the header",
                        where=f"{s.path}:1", hint="add data.layout.rate_hz to a recipe by hand")
    labels, label_lines, files = _labels(root, g, suffix)
    out.insert(4, f"labels = {_toml_list(labels)}  # GUESS: the first is the normal class")
    size = int(min(4096, max(32, 2 ** round(np.log2(max(g.rate_hz, 1.0))))))
    rest = ["", "# GUESS: about a second of samples (at least 32) per window, half a window apart.", "[window]",
            f"size = {size}", f"hop = {size // 2}", "", "[features]",
            'extractor = "machine"  # statistics per channel; "spectral" takes bands in Hz ([features.params])', "",
            "[splits]", 'group_by = "file"  # no recording is in two of train, cal and test'
            if len(g.files) >= 6 else "# group_by = \"file\" needs at least 6 files"]
    return "\n".join(out + data + layout + label_lines + files + rest) + "\n"


def _labels(root: Path, g: Guess, suffix: str) -> tuple[list[str], list[str], list[str]]:
    """(labels, the [data.label] lines, the [[data.files]] lines)."""
    if g.label_column is None:
        folders = sorted({p.parent.relative_to(root).parts[0] for p in g.files if p.parent != root})
        if len(folders) < 2:
            raise DataError("no label column and fewer than two folders to take labels from",
                            where=str(root), hint="add [data.label] to a recipe by hand (column, intervals, ...)")
        return (folders, ["", "[data.label]", 'source = "folder"  # GUESS: no label column; the folder names'],
                ["", "[[data.files]]", f'glob = "**/*{suffix}"'])
    values = _label_values(g.labelled, g.label_column, g.sniffed)
    if not values or len(values) > MAX_LABEL_VALUES:
        raise DataError(f"label column {g.label_column!r} holds {len(values)} distinct values",
                        where=str(g.labelled[0] if g.labelled else root), hint="write [data.label] by hand")
    numeric = all(_as_number(v) != float("inf") for v in values)
    if numeric:
        names = ["normal", g.label_column] if len(values) == 2 else [f"{g.label_column}_{_fmt(_as_number(v))}"
                                                                      for v in values]
        mapping = ", ".join(f'"{_fmt(_as_number(v))}" = "{n}"' for v, n in zip(values, names))
        lines = ["", "[data.label]", 'source = "column"', f"column = {_toml_str(g.label_column)}  # GUESS",
                 f"map = {{ {mapping} }}  # GUESS: names for the column's values", 'at = "last"']
    else:
        names = values
        lines = ["", "[data.label]", 'source = "column"', f"column = {_toml_str(g.label_column)}  # GUESS",
                 'at = "last"']
    files = ["", "[[data.files]]", f"glob = {_toml_list(_globs(root, g.labelled, suffix))}"]
    unlabelled = [p for p in g.files if p not in set(g.labelled)]
    if unlabelled:
        files += ["", f"# GUESS: {len(unlabelled)} file(s) without a {g.label_column!r} column: all {names[0]}.",
                  "[[data.files]]", f"glob = {_toml_list(_globs(root, unlabelled, suffix))}",
                  f'label = "{names[0]}"']
    return names, lines, files


def write_recipe(root: Path, out: Path, task: str | None = None) -> Path:
    """Write the recipe for the recordings under `root` to `out`; data.path relative to EDGEKIT_DATA_DIR
    when root lies inside it, else absolute."""
    from edgekit.datasets import data_dir

    root = root.resolve()
    if not root.is_dir():
        raise DataError("not a folder", where=str(root), hint="edgekit init takes the folder of recordings")
    base = data_dir().resolve()
    inside = root.is_relative_to(base)
    path_value, relative_to = (root.relative_to(base).as_posix(), "data_dir") if inside else (str(root), "recipe")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", task or (root.name if root.name != "data" else root.parent.name))
    text = recipe_text(root, path_value, relative_to, name)
    out.write_text(text)
    return out
