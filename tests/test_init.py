"""`edgekit init DATA_DIR` writes a recipe from a folder of recordings that trains as it stands: on the shared
SKAB folder and on a generated one (tests/recordingfactory.py). Training here runs 2 epochs (--epochs), the
recipe itself is not edited."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from recordingfactory import CHANNELS, vibration_recordings

from edgekit.recipe import load_recipe


def init(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgekit.cli", "init", str(data), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=120)


def train(recipe: Path, run_dir: Path) -> dict:
    pytest.importorskip("torch", reason="training needs the train extra (torch)")
    from edgekit.exporters.training.train import train as train_fn

    train_fn(recipe, run_dir, epochs=2, progress=False)
    return json.loads((run_dir / "run.json").read_text())


def test_init_on_generated_recordings_trains(tmp_path: Path) -> None:
    vibration_recordings(tmp_path / "plant")
    done = init(tmp_path / "plant", tmp_path / "plant.toml")
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "plant.toml").read_text()
    raw = tomllib.loads(text)
    assert raw["data"]["channels"] == list(CHANNELS)
    assert raw["data"]["layout"] == {"delimiter": ",", "header_line": 1, "time_column": "time",
                                     "time_format": "seconds", "rate_hz": 1000}
    assert raw["labels"] == ["normal", "fault"] and raw["data"]["label"]["column"] == "state"
    assert "rate_hz = 1000  # GUESS" in text and "column = 'state'  # GUESS" in text
    recipe = load_recipe(tmp_path / "plant.toml")
    assert recipe.window is not None and recipe.window.size == 1024
    run = train(tmp_path / "plant.toml", tmp_path / "run")
    assert run["input"]["channels"] == list(CHANNELS) and run["input"]["rate_hz"] == 1000


@pytest.mark.data
def test_init_on_the_skab_folder_trains(data_dir: Path, tmp_path: Path) -> None:
    done = init(data_dir / "skab" / "data", tmp_path / "skab.toml")
    assert done.returncode == 0, done.stderr
    raw = tomllib.loads((tmp_path / "skab.toml").read_text())
    assert raw["data"]["path"] == "skab/data" and raw["data"]["relative_to"] == "data_dir"
    assert raw["data"]["channels"] == load_recipe(
        Path(__file__).parent.parent / "edgekit" / "recipes" / "skab.toml").data.channels
    assert raw["data"]["label"]["map"] == {"0": "normal", "1": "anomaly"}
    # anomaly-free.csv has no anomaly column: a set of its own, all normal
    assert raw["data"]["files"][1] == {"glob": ["anomaly-free/*.csv"], "label": "normal"}
    run = train(tmp_path / "skab.toml", tmp_path / "run")
    assert run["labels"] == ["normal", "anomaly"] and run["input"]["rate_hz"] == 1.0


def test_init_says_what_it_cannot_tell(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.csv").write_text("x,y\n" + "\n".join(f"{i},{i * 2}" for i in range(50)) + "\n")
    done = init(tmp_path / "one", tmp_path / "r.toml")
    assert done.returncode != 0 and not (tmp_path / "r.toml").exists()
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "sample rate" in done.stderr or "label" in done.stderr
    (tmp_path / "r.toml").write_text("keep")
    again = init(tmp_path / "one", tmp_path / "r.toml")
    assert again.returncode != 0 and "pass --force" in again.stderr and (tmp_path / "r.toml").read_text() == "keep"
