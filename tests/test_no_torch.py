"""The agent never imports torch: the base install does not depend on it, and an agent process never loads it."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import requires

AGENT_MODULES = [
    "edgekit.cli", "edgekit.agent", "edgekit.runtime", "edgekit.gate", "edgekit.topics", "edgekit.config",
    "edgekit.values", "edgekit.datasets", "edgekit.inspection", "edgekit.pipeline", "edgekit.source",
]


def test_base_install_requires_no_torch():
    reqs = requires("edgekit") or []
    base = [r for r in reqs if "extra ==" not in r]
    assert base, "edgekit has no base requirements?"
    assert not [r for r in base if r.lower().startswith("torch")], base
    assert any(r.lower().startswith("torch") and 'extra == "train"' in r for r in reqs), reqs


def test_agent_modules_import_without_torch():
    code = (
        "import sys, importlib\n"
        f"for m in {AGENT_MODULES!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print('TORCH' if bad else 'CLEAN', bad[:3])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("CLEAN"), out.stdout
