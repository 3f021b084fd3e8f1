"""Shared fixtures: a real mosquitto per test (restartable), the data directory, a state directory of the
session's own, and skips with reasons."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgekit.broker import Mosquitto, installed

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def state_dir(tmp_path_factory) -> Path:
    """EDGEKIT_STATE_DIR under the session's tmp dir (subprocesses inherit it): what defaults to the state
    directory (the agent's outbox, eval plots, the demo's files) never lands in the home directory."""
    path = tmp_path_factory.mktemp("state")
    os.environ["EDGEKIT_STATE_DIR"] = str(path)
    return path


@pytest.fixture
def mosquitto(tmp_path: Path):
    """A fresh broker on a free loopback port; `.stop()` / `.start()` for outages on the same port."""
    if installed() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    with Mosquitto(tmp_path / "broker") as broker:
        yield broker


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """EDGEKIT_DATA_DIR (default ../shared/datasets from the project root); skips when absent."""
    path = Path(os.environ.get("EDGEKIT_DATA_DIR", ROOT.parent / "shared" / "datasets")).resolve()
    if not (path / "skab").is_dir():
        pytest.skip(f"datasets not found at {path} (set EDGEKIT_DATA_DIR)")
    os.environ["EDGEKIT_DATA_DIR"] = str(path)
    return path


def _build_bundle(tmp_root: Path, recipe: str, epochs: int = 3) -> Path:
    pytest.importorskip("torch", reason="training needs the train extra (torch)")
    from edgekit.exporters.export.export import export
    from edgekit.exporters.training.train import train

    run_dir = tmp_root / f"run-{Path(recipe).stem}"
    bundle = tmp_root / f"bundle-{Path(recipe).stem}"
    train(ROOT / "edgekit" / "recipes" / recipe, run_dir, epochs=epochs, progress=False)
    export(run_dir, bundle, int8=True, progress=False)
    return bundle


@pytest.fixture(scope="session")
def skab_bundle(tmp_path_factory, data_dir) -> Path:
    """A bundle trained (few epochs) on edgekit/recipes/skab.toml and exported with INT8, shared by the session."""
    return _build_bundle(tmp_path_factory.mktemp("skab"), "skab.toml")


@pytest.fixture(scope="session")
def ipol_bundle(tmp_path_factory, data_dir) -> Path:
    """A bundle trained (few epochs) on edgekit/recipes/ipol_gait.toml (1D-CNN on IMU windows), INT8."""
    return _build_bundle(tmp_path_factory.mktemp("ipol"), "ipol_gait.toml")


@pytest.fixture(scope="session")
def trial_bundles(tmp_path_factory, data_dir) -> dict[str, Path]:
    """The two shipped trial bundles (issue 13), by recipe name: fall_screening (nine spectral TUG features) and
    tug_seed_trial (age, TUG, steps), trained for 5 epochs and exported INT8; shared by the session."""
    root = tmp_path_factory.mktemp("trial")
    return {name: _build_bundle(root, f"{name}.toml", epochs=5) for name in ("fall_screening", "tug_seed_trial")}


@pytest.fixture(scope="session")
def stream_bundle(tmp_path_factory) -> Path:
    """A bundle for 3 vibration channels (ax, ay, az) at 1 kHz, windows of 256 samples every 128 (machine
    features, MLP + dense AE + random forest, INT8), trained in seconds on generated signals
    (tests/streamfactory.py); shared by the session."""
    pytest.importorskip("torch", reason="training needs the train extra (torch)")
    from streamfactory import make_stream_bundle

    return make_stream_bundle(tmp_path_factory.mktemp("stream"), rate_hz=1000.0, window=256, hop=128)
