"""Where edgekit's files are: what the package ships (recipes, the local broker's config; read through
importlib.resources, so an installed wheel needs no checkout) and the state directory it writes to when a
command is given no path (the agent's outbox, `edgekit eval` plots, `edgekit demo`'s files).

Standard library only: the agent's config imports it. Nothing is created here; the writers make their folders.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

STATE_ENV = "EDGEKIT_STATE_DIR"


def state_dir() -> Path:
    """$EDGEKIT_STATE_DIR, else $XDG_STATE_HOME/edgekit, else ~/.local/state/edgekit.

    The XDG Base Directory spec's place for state that outlives a restart but is not a document of the
    user's (an outbox of unsent results is exactly that). A relative XDG_STATE_HOME is ignored, as the spec
    says; EDGEKIT_STATE_DIR is taken as given.
    """
    own = os.environ.get(STATE_ENV)
    if own:
        return Path(own).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "state"
    return base / "edgekit"


def shipped(*parts: str) -> Path:
    """A file that ships inside the package, e.g. shipped("recipes", "skab.toml")."""
    found = files("edgekit")
    for part in parts:
        found = found.joinpath(part)
    return Path(str(found))  # edgekit installs as plain files (wheel or editable), never zipped


def shipped_recipes() -> list[str]:
    """Names of the recipes that ship with edgekit (edgekit/recipes/*.toml), without the suffix."""
    return sorted(p.stem for p in shipped("recipes").glob("*.toml"))


def recipe_file(arg: str | Path) -> Path:
    """A RECIPE argument: an existing file as given, else the shipped recipe of that name ('skab' or
    'skab.toml'), else the path as given (so that reading it names the missing file)."""
    path = Path(arg)
    if path.exists() or path.parent != Path("."):
        return path
    name = path.name if path.suffix == ".toml" else f"{path.name}.toml"
    candidate = shipped("recipes", name)
    return candidate if candidate.is_file() else path


def shown(path: Path) -> str:
    """`path` for reports: edgekit/... when it is a shipped file (the same wherever edgekit is installed),
    else as given."""
    root = shipped().parent
    path = Path(path)
    return str(path.relative_to(root)) if path.is_absolute() and path.is_relative_to(root) else str(path)
