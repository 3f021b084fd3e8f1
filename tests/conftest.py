"""Shared fixtures: a real mosquitto per test (restartable), the data directory, and skips with reasons."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgekit.broker import Mosquitto, installed

ROOT = Path(__file__).resolve().parent.parent


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
