"""Readers for the recorded datasets in EDGEKIT_DATA_DIR (see ../shared/datasets/README.md), and each one's
file layout (a manifest.Recording) that training writes into the bundle.

The training side's: the agent never imports this (.importlinter); it replays files by their layout, with
the same UTC reading of timestamps. numpy and the standard library only. Never copies dataset files into the
project."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import DataError
from edgekit.manifest import Recording

SKAB_CHANNELS = (
    "Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure", "Temperature", "Thermocouple",
    "Voltage", "Volume Flow RateRMS",
)
IPOL_CHANNELS = ("Acc_X", "Acc_Y", "Acc_Z", "Gyr_X", "Gyr_Y", "Gyr_Z")
# The recordings' file layouts, which training writes into the bundle so the agent replays such files
# without knowing their dataset (edgekit/source.py reads any Recording).
SKAB_RECORDING = Recording(delimiter=";", header_line=1, time_column="datetime", time_format="iso", rate_hz=1.0)
IPOL_RECORDING = Recording(delimiter="\t", header_line=2, rate_pattern=r"Acquisition frequency:\s*([0-9.]+)",
                           counter_column="PacketCounter", counter_wrap=65536)  # XSens: 16-bit counter
NAB_RECORDING = Recording(delimiter=",", header_line=1, time_column="timestamp", time_format="iso")
FALL_FEATURES = ("pse", "psp1", "psp2", "psp3", "pspf1", "pspf2", "pspf3", "wpsp", "cpt")
SEED_TUG_FILE = Path(__file__).parent / "data" / "tug_gait_23.tsv"


_EPOCH = datetime(1970, 1, 1)


def _utc(stamp: str) -> float:
    """A naive ISO timestamp as seconds since 1970, read as UTC, as the agent's replay reads it (local time
    would move at daylight-saving changes)."""
    return (datetime.fromisoformat(stamp) - _EPOCH).total_seconds()


def data_dir() -> Path:
    """EDGEKIT_DATA_DIR, default ../shared/datasets relative to the working directory."""
    return Path(os.environ.get("EDGEKIT_DATA_DIR", "../shared/datasets"))


def require(relative: str) -> Path:
    """A path inside the data directory, or DataError saying where it was looked for."""
    path = data_dir() / relative
    if not path.exists():
        raise DataError("not found", where=str(path),
                        hint="set EDGEKIT_DATA_DIR to the folder holding skab/, ipol_gait/, ...")
    return path


@dataclass(frozen=True)
class Table:
    """A recording: `values` (rows, channels) float64, time in seconds, optional per-row labels."""

    path: Path
    channels: tuple[str, ...]
    t_s: np.ndarray
    values: np.ndarray
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def rate_hz(self) -> float:
        return float(self.meta.get("rate_hz", 1.0))


def _floats(rows: list[list[str]], path: Path, first_line: int, columns: list[str]) -> np.ndarray:
    try:
        return np.asarray(rows, dtype=np.float64)
    except ValueError:
        for i, row in enumerate(rows):
            for col, cell in zip(columns, row):
                try:
                    float(cell)
                except ValueError:
                    raise DataError(f"column {col!r}: expected a number (got {cell!r})",
                                    where=f"{path}:{first_line + i}") from None
        raise DataError("ragged rows", where=str(path)) from None


def read_skab(path: Path | str) -> Table:
    """SKAB CSV: ';'-separated, `datetime` index at 1 Hz, 8 channels, optional anomaly/changepoint."""
    path = Path(path)
    with path.open(newline="") as fh:
        reader = csv.reader(fh, delimiter=";")
        header = next(reader, None)
        rows = list(reader)
    if not header or header[0] != "datetime":
        raise DataError(f"expected a SKAB header starting with 'datetime' (got {header!r})", where=str(path))
    missing = [c for c in SKAB_CHANNELS if c not in header]
    if missing:
        raise DataError(f"missing columns {missing}", where=str(path))
    if not rows:
        raise DataError("no data rows", where=str(path))
    stamps = np.array([_utc(r[0]) for r in rows])
    idx = [header.index(c) for c in SKAB_CHANNELS]
    values = _floats([[r[i] for i in idx] for r in rows], path, 2, list(SKAB_CHANNELS))
    labels = {}
    for name in ("anomaly", "changepoint"):
        if name in header:
            j = header.index(name)
            labels[name] = np.array([float(r[j]) for r in rows]).astype(np.int8)
    return Table(path, SKAB_CHANNELS, stamps - stamps[0], values, labels, {"rate_hz": 1.0, "t0": stamps[0]})


def skab_files(group: str | None = None) -> list[Path]:
    """Fault files (valve1, valve2, other) in a stable order; `group` picks one folder."""
    root = require("skab/data")
    groups = [group] if group else ["valve1", "valve2", "other"]
    out: list[Path] = []
    for g in groups:
        out.extend(sorted((root / g).glob("*.csv"), key=lambda p: int(p.stem)))
    return out


def read_ipol(path: Path | str, channels: tuple[str, ...] = IPOL_CHANNELS) -> Table:
    """IPOL `*_lb.txt` trial (100 Hz, tab-separated) plus its JSON annotations when present.

    labels["phase"]: 0 still, 1 walk, 2 turn per sample (from TrialBoundaries / UTurnBoundaries).
    """
    path = Path(path)
    with path.open() as fh:
        first = fh.readline()
        if not first.startswith("Acquisition frequency"):
            raise DataError(f"expected 'Acquisition frequency: N Hz' on line 1 (got {first.strip()!r})",
                            where=str(path))
        rate = float(first.split(":")[1].split()[0])
        header = fh.readline().strip().split("\t")
        rows = [line.rstrip("\n").split("\t") for line in fh if line.strip()]
    missing = [c for c in channels if c not in header]
    if missing:
        raise DataError(f"missing columns {missing}", where=str(path))
    idx = [header.index(c) for c in channels]
    values = _floats([[r[i] for i in idx] for r in rows], path, 3, list(channels))
    t = np.arange(len(values)) / rate
    meta: dict[str, Any] = {"rate_hz": rate}
    labels: dict[str, np.ndarray] = {}
    ann = path.with_name(path.name.replace("_lb.txt", ".json"))
    if ann.exists():
        meta.update(json.loads(ann.read_text()))
        phase = np.zeros(len(values), dtype=np.int8)
        a, b = meta["TrialBoundaries"]
        phase[a:b] = 1
        c, d = meta["UTurnBoundaries"]
        phase[c:d] = 2
        labels["phase"] = phase
    return Table(path, tuple(channels), t, values, labels, meta)


def ipol_files() -> list[Path]:
    root = require("ipol_gait/GaitData")

    def key(p: Path) -> tuple[int, int]:
        subject, trial = p.name.replace("_lb.txt", "").split("-")
        return int(subject), int(trial)

    return sorted(root.glob("*_lb.txt"), key=key)


def read_nab(path: Path | str) -> Table:
    """NAB CSV `timestamp,value`; labels['anomaly'] from nab/labels/combined_windows.json when found."""
    path = Path(path)
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        rows = list(reader)
    if header != ["timestamp", "value"]:
        raise DataError(f"expected header timestamp,value (got {header!r})", where=str(path))
    stamps = np.array([_utc(r[0]) for r in rows])
    values = _floats([[r[1]] for r in rows], path, 2, ["value"])
    labels = {}
    windows_file = path.parents[2] / "labels" / "combined_windows.json"
    if windows_file.exists():
        windows = json.loads(windows_file.read_text()).get(f"{path.parent.name}/{path.name}", [])
        lab = np.zeros(len(rows), dtype=np.int8)
        for a, b in windows:
            lo, hi = _utc(a), _utc(b)
            lab[(stamps >= lo) & (stamps <= hi)] = 1
        labels["anomaly"] = lab
    rate = 1.0 / float(np.median(np.diff(stamps))) if len(stamps) > 1 else 1.0
    return Table(path, ("value",), stamps - stamps[0], values, labels, {"rate_hz": rate, "t0": stamps[0]})


def read_table(path: Path | str, delimiter: str | None = None) -> tuple[list[str], list[list[str]]]:
    """A small CSV/TSV as header and string rows (delimiter from the suffix when not given)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("not found", where=str(path))
    delim = delimiter or ("\t" if path.suffix in (".tsv", ".txt") else ",")
    with path.open(newline="") as fh:
        reader = csv.reader(fh, delimiter=delim)
        header = next(reader, None)
        rows = [r for r in reader if r]
    if not header:
        raise DataError("empty file", where=str(path))
    return header, rows


def column_matrix(path: Path, header: list[str], rows: list[list[str]], columns: list[str]) -> np.ndarray:
    """Columns as float64; empty cells become NaN (imputation is the caller's documented choice)."""
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"missing columns {missing}; the file has {header}", where=str(path))
    idx = [header.index(c) for c in columns]
    out = np.empty((len(rows), len(columns)))
    for i, row in enumerate(rows):
        for j, k in enumerate(idx):
            cell = row[k].strip() if k < len(row) else ""
            if cell == "":
                out[i, j] = np.nan
                continue
            try:
                out[i, j] = float(cell)
            except ValueError:
                raise DataError(f"column {columns[j]!r}: expected a number (got {cell!r})",
                                where=f"{path}:{i + 2}") from None
    return out
