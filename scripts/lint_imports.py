#!/usr/bin/env python3
"""Run import-linter (.importlinter) on the package as it installs: edgekit/ with devices/ and exporters/ in
the places pyproject.toml's package-dir maps them to. grimp, under import-linter, walks the folder of the
root package only, so the mapped folders are linked into a temporary copy of that tree first.

    python3 scripts/lint_imports.py        exit status and report of lint-imports
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent


def view(into: Path) -> Path:
    """`into`/edgekit: links to every entry of edgekit/, plus each mapped package at its dotted place."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    pkg = into / "edgekit"
    pkg.mkdir(parents=True)
    for entry in (ROOT / "edgekit").iterdir():
        (pkg / entry.name).symlink_to(entry)
    for name, folder in mapping.items():
        parts = name.split(".")
        if parts[0] != "edgekit" or len(parts) != 2:
            raise SystemExit(f"lint_imports: cannot place {name!r} (only edgekit.X mappings are handled)")
        (pkg / parts[1]).symlink_to(ROOT / folder)
    return into


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="edgekit-imports-") as tmp:
        where = view(Path(tmp))
        env = {**os.environ, "PYTHONPATH": str(where)}
        cmd = ["lint-imports", "--config", str(ROOT / ".importlinter"), "--no-cache"]
        return subprocess.run(cmd, cwd=where, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
