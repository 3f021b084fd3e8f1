"""Import rules (issue 11), as import-linter contracts in .importlinter: the agent's modules never import the
training side, torch, scikit-learn or the hub; the contract modules import nothing from the programs that
use them; no import cycles between sibling modules."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold() -> None:
    exe = shutil.which("lint-imports")
    assert exe is not None, "import-linter is not installed: pip install -e '.[dev]' (scripts/setup does)"
    out = subprocess.run([exe, "--config", str(ROOT / ".importlinter"), "--no-cache"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in out.stdout, out.stdout[-2000:]
