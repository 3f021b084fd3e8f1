"""The generic recordings loader on a user's own files (generated: tests/recordingfactory.py): windows never
span a gap, labels come from where the recipe says, and bad input is one line naming file, line and column
while the rest is read. No torch here."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from recordingfactory import CHANNELS, vibration_recordings, write_recipe

from edgekit.errors import DataError
from edgekit.exporters.training.tasks import load_task
from edgekit.recipe import load_recipe
from edgekit.window import sliding_windows

SIZE, HOP = 200, 100


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    vibration_recordings(tmp_path / "recordings")
    write_recipe(tmp_path)
    return tmp_path


def load(folder: Path, edit: tuple[str, str] | None = None):
    path = folder / "recipe.toml"
    if edit is not None:
        path.write_text(path.read_text().replace(*edit))
    return load_task(load_recipe(path), folder)


def read_csv(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rows = [line.split(",") for line in path.read_text().splitlines()[1:]]
    t = np.array([float(r[0]) for r in rows])
    return t, np.array([[float(c) for c in r[1:4]] for r in rows]), [r[4] for r in rows]


def test_windows_labels_and_groups_follow_the_files(folder: Path) -> None:
    data = load(folder)
    files = sorted((folder / "recordings").glob("*/*.csv"))
    assert data.channels == list(CHANNELS) and data.rate_hz == pytest.approx(1000.0, rel=1e-3)
    assert data.recording is not None and data.recording["time_column"] == "time"
    for path in files:
        rel = path.relative_to(folder / "recordings").as_posix()
        t, values, states = read_csv(path)
        rows = data.split_groups == rel
        cut = int(np.flatnonzero(np.diff(t) > 0.5)[0]) + 1 if rel == "machine-1/run-1.csv" else len(t)
        segments = [(0, cut), (cut, len(t))] if cut < len(t) else [(0, len(t))]
        expected = np.concatenate([sliding_windows(values[a:b], SIZE, HOP) for a, b in segments])
        assert np.array_equal(data.windows[rows], expected), rel
        last = np.concatenate([a + np.arange(len(sliding_windows(values[a:b], SIZE, HOP))) * HOP + SIZE - 1
                               for a, b in segments])
        assert data.y[rows].tolist() == [["normal", "fault"].index(states[i]) for i in last]
        assert set(data.report_groups["machine"][rows]) == {rel.split("/")[0]}


def test_the_gap_file_loses_the_windows_across_its_gap(folder: Path) -> None:
    data = load(folder)
    per_file = {g: int((data.split_groups == g).sum()) for g in set(data.split_groups)}
    assert per_file["machine-0/run-0.csv"] == (4000 - SIZE) // HOP + 1
    # 1 s then 3 s after the jump: (1000-200)//100+1 + (3000-200)//100+1 windows, none across it
    assert per_file["machine-1/run-1.csv"] == 9 + 29


@pytest.mark.parametrize("source", ["folder", "pattern"])
def test_labels_from_folder_or_name_pattern(folder: Path, tmp_path: Path, source: str) -> None:
    root = tmp_path / "by_folder"
    for label in ("normal", "fault"):
        (root / label).mkdir(parents=True)
        (root / label / "a.csv").write_text((folder / "recordings" / "machine-0" / "run-0.csv").read_text())
    pattern = "(?P<label>normal|fault)/" if source == "pattern" else "(?P<machine>.*)/"
    text = (folder / "recipe.toml").read_text().replace('path = "recordings"', 'path = "by_folder"').replace(
        'source = "column"\ncolumn = "state"', f'source = "{source}"').replace(
        "(?P<machine>machine-\\d+)/", pattern).replace('group_columns = ["machine"]', "")
    (tmp_path / "folder.toml").write_text(text)
    data = load_task(load_recipe(tmp_path / "folder.toml"), tmp_path)
    assert data.y[data.split_groups == "fault/a.csv"].tolist() == [1] * 39
    assert data.y[data.split_groups == "normal/a.csv"].tolist() == [0] * 39


def test_labels_from_an_intervals_file(folder: Path) -> None:
    (folder / "recordings" / "labels.csv").write_text(
        "file,start,end,label\nmachine-0/run-0.csv,1.0,2.0,fault\nmachine-0/run-1.csv,0,4,fault\n")
    data = load(folder, ('source = "column"\ncolumn = "state"',
                         'source = "intervals"\nintervals = "labels.csv"\ndefault = "normal"'))
    rows = data.split_groups == "machine-0/run-0.csv"
    last_s = (np.arange(rows.sum()) * HOP + SIZE - 1) / 1000.0
    assert data.y[rows].tolist() == ((last_s >= 1.0) & (last_s < 2.0)).astype(int).tolist()
    assert set(data.y[data.split_groups == "machine-0/run-1.csv"]) == {1}
    assert set(data.y[data.split_groups == "machine-2/run-0.csv"]) == {0}


def test_labels_and_fields_from_a_sidecar_in_samples(folder: Path) -> None:
    for path in (folder / "recordings").glob("*/*.csv"):
        path.with_suffix(".json").write_text(json.dumps({"Fault": [2500, 4000], "Operator": "ana"}))
    text = (folder / "recipe.toml").read_text().replace('group_columns = ["machine"]',
                                                        'group_columns = ["Operator"]\nsidecar = "{stem}.json"')
    (folder / "recipe.toml").write_text(text)
    data = load(folder, ('source = "column"\ncolumn = "state"\nat = "last"',
                         'source = "sidecar"\nkeys = { fault = "Fault" }\nunit = "samples"\ndefault = "normal"\n'
                         'at = "centre"'))
    rows = data.split_groups == "machine-0/run-0.csv"
    centre = np.arange(rows.sum()) * HOP + SIZE // 2
    assert data.y[rows].tolist() == (centre >= 2500).astype(int).tolist()
    assert set(data.report_groups["Operator"]) == {"ana"}


def test_bad_files_and_lines_are_named_and_the_rest_is_read(folder: Path, caplog) -> None:
    rec = folder / "recordings"
    (rec / "machine-0" / "run-0.csv").write_text("")  # empty
    lines = (rec / "machine-0" / "run-1.csv").read_text().splitlines()
    (rec / "machine-0" / "run-1.csv").write_text("\n".join([lines[0].replace("vib_z", "vib_q"), *lines[1:]]))
    lines = (rec / "machine-2" / "run-0.csv").read_text().splitlines()
    lines[1000] = "yesterday" + lines[1000][lines[1000].index(","):]
    lines[2000] = lines[2000].replace(",", ",x", 1)
    (rec / "machine-2" / "run-0.csv").write_text("\n".join(lines))
    t, values, states = read_csv(rec / "machine-3" / "run-0.csv")  # half the rate
    with (rec / "machine-3" / "run-0.csv").open("w") as fh:
        fh.write("time,vib_x,vib_y,vib_z,state\n")
        for i in range(0, len(t), 2):
            fh.write(f"{t[i]:.6f},{values[i, 0]},{values[i, 1]},{values[i, 2]},{states[i]}\n")
    with caplog.at_level(logging.WARNING):
        data = load(folder)
    problems = "\n".join(data.problems)
    assert f"{rec / 'machine-0' / 'run-0.csv'}" in problems and "file skipped" in problems
    assert "missing columns ['vib_z']" in problems
    assert f"{rec / 'machine-2' / 'run-0.csv'}:1001: not a number: column 'time' (got 'yesterday')" in problems
    assert f"{rec / 'machine-2' / 'run-0.csv'}:2001: column 'vib_x': expected a number (got 'x" in problems
    assert f"{rec / 'machine-3' / 'run-0.csv'}: rate 500 Hz, the first file's is 1000 Hz" in problems
    assert all(p in caplog.text for p in data.problems)
    groups = set(data.split_groups)
    assert {"machine-0/run-0.csv", "machine-0/run-1.csv", "machine-3/run-0.csv"}.isdisjoint(groups)
    # the file with two bad lines is read around them: one step of 2 ms each, under max_gap_s (3 ms)
    assert (data.split_groups == "machine-2/run-0.csv").sum() == (3998 - 200) // 100 + 1


def test_a_label_outside_labels_names_file_line_and_column(folder: Path) -> None:
    path = folder / "recordings" / "machine-1" / "run-0.csv"
    lines = path.read_text().splitlines()
    lines[7] = lines[7].rsplit(",", 1)[0] + ",broken"
    path.write_text("\n".join(lines))
    with pytest.raises(DataError) as exc:
        load(folder)
    assert f"{path}:8: column 'state': 'broken' is not one of labels ['normal', 'fault']" in str(exc.value)
    mapped = load(folder, ('at = "last"', 'at = "last"\nmap = { broken = "fault" }'))
    assert len(mapped.y) == 311


def test_nothing_readable_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "recordings").mkdir()
    write_recipe(tmp_path)
    with pytest.raises(DataError, match="no full windows of 200 samples with a label"):
        load(tmp_path)
