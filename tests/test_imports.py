"""Import rules (issue 11), as import-linter contracts in .importlinter: the agent's modules never import the
training side, torch, scikit-learn or the hub; the contract modules import nothing from the programs that
use them; no import cycles between sibling modules. Checked on the package as it installs (devices/ and
exporters/ mapped into edgekit/ as pyproject.toml says: scripts/lint_imports.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import lint_imports  # noqa: E402


def test_import_contracts_hold() -> None:
    assert shutil.which("lint-imports"), "import-linter is not installed: pip install -e '.[dev]' (scripts/setup does)"
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "lint_imports.py")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in out.stdout, out.stdout[-2000:]


def test_the_checked_tree_holds_the_mapped_packages(tmp_path: Path) -> None:
    """A contract over modules grimp never saw would pass vacuously: the view must hold devices/ and
    exporters/ at their installed names."""
    code = ("import grimp\n"
            "g = grimp.build_graph('edgekit', cache_dir=None)\n"
            "print('\\n'.join(sorted(g.modules)))\n")
    where = lint_imports.view(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], cwd=where, env={**os.environ, "PYTHONPATH": str(where)},
                         capture_output=True, text=True, timeout=120, check=True)
    modules = set(out.stdout.split())
    for name in ("edgekit.agent", "edgekit.devices.detect", "edgekit.exporters.training.train",
                 "edgekit.exporters.export.export", "edgekit.exporters.evaluation.evaluate"):
        assert name in modules, name
