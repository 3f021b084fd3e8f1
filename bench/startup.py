"""Benchmark 2: agent cold start to first result and peak RSS vs a torch-based equivalent, fresh processes.

    python bench/startup.py [--tasks skab ipol_gait] [--repeats 5] [--json out/startup.json]

agent:  bench/agent_once.py builds the real Agent (manifest, device profile, onnxruntime sessions, outbox),
        processes one recorded window and stops once the result is in its durable outbox (no broker).
torch:  bench/torch_path.py once loads the run's torch checkpoints and the scikit-learn second opinion,
        runs the same window through features, models and gate.
Wall time is from spawning the process to its JSON line (interpreter start included); peak RSS is
/usr/bin/time's maximum resident set size of the process. Repeats alternate agent and torch; medians.
Both run as installed: Python bytecode is written and used (a PYTHONDONTWRITEBYTECODE in the caller's
environment is dropped for the spawned processes; --no-bytecode keeps it, and every import of edgekit is
then compiled from source on each start), after one untimed warm-up run of each.
Targets: agent RSS <= 80 MiB and >= 3x below torch; first result <= 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

HERE = Path(__file__).resolve().parent
TIME = shutil.which("time") or "/usr/bin/time"


def spawn_env(bytecode: bool) -> dict[str, str]:
    """The spawned processes' environment: as installed (bytecode on) unless `bytecode` is False."""
    env = dict(os.environ)
    if bytecode:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def spawn(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run cmd under /usr/bin/time; wall seconds to its last stdout line, max RSS (MiB), its JSON."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        t0 = time.perf_counter()
        out = subprocess.run([TIME, "-f", "%M", "-o", tf.name, *cmd], capture_output=True, text=True,
                             cwd=common.ROOT, env=env)
        wall = time.perf_counter() - t0
        if out.returncode != 0:
            raise RuntimeError(f"{cmd[1]} failed ({out.returncode}): {out.stderr[-2000:]}")
        rss_kib = int(tf.read().strip().splitlines()[-1])
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "rss_mib": rss_kib / 1024, **res}


def measure(task: str, repeats: int, bytecode: bool = True) -> dict[str, Any]:
    bundle = common.ensure_bundle(task)
    windows = common.real_windows(bundle, n=1)
    runs: dict[str, list[dict[str, Any]]] = {"agent": [], "torch": []}
    env = spawn_env(bytecode)
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        npz = Path(tmp) / "windows.npz"
        np.savez(npz, windows=windows)
        for i in range(-1, repeats):  # run -1: the untimed warm-up (bytecode written, files cached)
            box = Path(tmp) / f"outbox{i}"
            box.mkdir()
            agent = spawn([common.PYTHON, str(HERE / "agent_once.py"), str(bundle), str(npz), str(box)], env)
            torch = spawn([common.PYTHON, str(HERE / "torch_path.py"), "once", str(common.run_dir(task)),
                           str(bundle), str(npz)], env)
            if i >= 0:
                runs["agent"].append(agent)
                runs["torch"].append(torch)
    med = {k: {f: float(np.median([r[f] for r in v])) for f in ("wall_s", "rss_mib",
                                                                 "first_result_s_in_process")}
           for k, v in runs.items()}
    return {"task": task, "repeats": repeats, "bytecode": bytecode, "median": med, "runs": runs,
            "agent_imported_torch": any(r["torch_imported"] for r in runs["agent"]),
            "ratios": {"rss_torch_over_agent": med["torch"]["rss_mib"] / med["agent"]["rss_mib"],
                       "first_result_torch_over_agent": med["torch"]["wall_s"] / med["agent"]["wall_s"]}}


def table(res: dict[str, Any]) -> str:
    med = res["median"]
    lines = [f"== {res['task']}: fresh process to first result, median of {res['repeats']} (alternating, after a "
             f"warm-up; bytecode {'used, as installed' if res.get('bytecode', True) else 'off: compiled at each start'})",
             f"{'':<8}{'first result s (spawn->result)':>32}{'in-process s':>14}{'peak RSS MiB':>14}"]
    for k in ("agent", "torch"):
        m = med[k]
        lines.append(f"{k:<8}{m['wall_s']:>32.3f}{m['first_result_s_in_process']:>14.3f}{m['rss_mib']:>14.1f}")
    r = res["ratios"]
    a = med["agent"]
    lines += [f"agent RSS {a['rss_mib']:.1f} MiB, target <= 80: {common.verdict(a['rss_mib'] <= 80)}; "
              f"torch/agent RSS {r['rss_torch_over_agent']:.2f}x, target >= 3x: "
              f"{common.verdict(r['rss_torch_over_agent'] >= 3)}",
              f"agent first result {a['wall_s']:.3f} s, target <= 0.5 s: {common.verdict(a['wall_s'] <= 0.5)}; "
              f"torch/agent {r['first_result_torch_over_agent']:.2f}x; agent imported torch: "
              f"{res['agent_imported_torch']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=list(common.TASKS), choices=list(common.TASKS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--no-bytecode", dest="bytecode", action="store_false",
                    help="keep PYTHONDONTWRITEBYTECODE from the environment (edgekit compiled at every start)")
    args = ap.parse_args(argv)
    common.setup_logging()
    result: dict[str, Any] = {"benchmark": "startup", "machine": common.machine(),
                              "torch": common.torch_version(), "tasks": []}
    for task in args.tasks:
        res = measure(task, args.repeats, args.bytecode)
        print(table(res), "\n", flush=True)
        result["tasks"].append(res)
    common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
