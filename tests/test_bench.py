"""`edgekit bench BUNDLE`, the on-device benchmark: runs with numpy + onnxruntime alone (a device has no
torch) and reports every model variant, the onnxruntime floor and the edge path built on it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.data, pytest.mark.torch]  # the bundle is trained from SKAB; the bench itself is not

NO_TORCH_BENCH = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None  # any `import torch` now raises ImportError
    from edgekit.cli import main
    main(sys.argv[1:])
""")


def test_bench_cli_runs_without_torch_and_reports_floor_and_edge_path(skab_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-c", NO_TORCH_BENCH, "bench", str(skab_bundle), "--rounds", "50",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    manifest = json.loads((skab_bundle / "manifest.json").read_text())

    # every model the bundle holds is timed, the one the agent uses marked
    roles = {r["role"] for r in result["models"]}
    assert roles == set(manifest["models"])
    used = {r["role"]: r["file"] for r in result["models"] if r["used"]}
    assert used == {role: spec["file"] for role, spec in manifest["models"].items()}
    assert all(r["median_us"] > 0 and r["p99_us"] >= r["median_us"] for r in result["models"])

    stages = {s["stage"]: s for s in result["stages"]}
    assert set(stages) == {"features", "normalise", "floor", "gate_decide", "edge_path", "agent_process"}
    assert all("error" not in s for s in stages.values()), stages
    # the edge path runs the floor's session runs plus features, so it cannot be cheaper than the floor
    assert stages["edge_path"]["median_us"] > stages["floor"]["median_us"]
    assert result["ratios"]["edge_path_over_floor"] == pytest.approx(
        stages["edge_path"]["median_us"] / stages["floor"]["median_us"])
    # the printed table is the JSON's, row for row
    for s in stages.values():
        assert s["label"] in proc.stdout
    assert f"{result['ratios']['edge_path_over_floor']:.2f}x" in proc.stdout
