"""edgekit/paths.py: the state directory's precedence, the files the package ships, and RECIPE arguments."""

from __future__ import annotations

from pathlib import Path

from edgekit.config import OutboxConfig
from edgekit.paths import recipe_file, shipped, shipped_recipes, shown, state_dir


def test_state_dir_precedence(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("EDGEKIT_STATE_DIR", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    assert state_dir() == tmp_path / "home" / ".local" / "state" / "edgekit"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/state")  # the XDG spec: relative paths are ignored
    assert state_dir() == tmp_path / "home" / ".local" / "state" / "edgekit"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert state_dir() == tmp_path / "xdg" / "edgekit"
    monkeypatch.setenv("EDGEKIT_STATE_DIR", str(tmp_path / "own"))
    assert state_dir() == tmp_path / "own"
    assert OutboxConfig().path == tmp_path / "own" / "outbox.db"
    assert not (tmp_path / "own").exists()  # nothing is created until something is written


def test_shipped_files_are_in_the_package() -> None:
    assert shipped_recipes() == ["fall_screening", "ipol_gait", "skab", "tug_seed", "tug_seed_trial"]
    assert "listener {port} 127.0.0.1" in shipped("data", "mosquitto-local.conf").read_text()
    assert shown(shipped("recipes", "skab.toml")) == "edgekit/recipes/skab.toml"
    assert shown(Path("/elsewhere/skab.toml")) == "/elsewhere/skab.toml"


def test_recipe_argument(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert recipe_file("skab") == recipe_file("skab.toml") == shipped("recipes", "skab.toml")
    (tmp_path / "skab.toml").write_text("")
    assert recipe_file("skab.toml") == Path("skab.toml")  # a file of that name here wins
    assert recipe_file("nothere") == Path("nothere")  # left as given: loading it names the missing file
    assert recipe_file("sub/skab.toml") == Path("sub/skab.toml")

