"""Benchmark 1: per-window latency of the agent's edge path vs torch eager vs the bare onnxruntime floor.

    python bench/latency.py [--tasks skab ipol_gait] [--rounds 2000] [--json out/latency.json]

Per task (the bundle is built first if missing: bundles/bench-TASK), on the same 64 recorded windows:
  - edge (this process, numpy + onnxruntime, 1 intra-op thread): edgekit.bench.run_bench, i.e. per model
    fp32 vs INT8, the floor (the agent's bare session runs), the edge path (features + normalise + models +
    gate with the agent's own objects) and Agent.process (+ result JSON + outbox write);
  - torch eager (a separate process, torch.set_num_threads(1)): the same path with the run's torch
    checkpoints under torch.inference_mode and the scikit-learn second opinion as trained.
Targets: edge path <= 2x its floor; torch eager path >= 5x the edge path.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

from edgekit.bench import run_bench  # noqa: E402


def measure(task: str, rounds: int) -> dict[str, Any]:
    bundle = common.ensure_bundle(task)
    windows = common.real_windows(bundle)
    edge = run_bench(bundle, rounds, windows=windows)
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        npz = Path(tmp) / "windows.npz"
        np.savez(npz, windows=windows)
        out = subprocess.run([common.PYTHON, str(Path(__file__).parent / "torch_path.py"), "latency",
                              str(common.run_dir(task)), str(bundle), str(npz), str(rounds)],
                             capture_output=True, text=True, check=True)
    torch_res = json.loads(out.stdout.strip().splitlines()[-1])
    med = {s["stage"]: s["median_us"] for s in edge["stages"] if "median_us" in s}
    tc = torch_res["cases"]
    ratios = {
        "edge_path_over_floor": med["edge_path"] / med["floor"],
        "torch_path_over_edge_path": tc["path"]["median_us"] / med["edge_path"],
        "torch_path_no_second_over_edge_path": tc["path_no_second"]["median_us"] / med["edge_path"],
    }
    if "agent_process" in med:
        ratios["torch_path_over_agent_process"] = tc["path"]["median_us"] / med["agent_process"]
    return {"task": task, "bundle": str(bundle), "edge": edge, "torch": torch_res, "ratios": ratios}


def table(res: dict[str, Any]) -> str:
    edge, tc = res["edge"], res["torch"]["cases"]
    lines = [f"== {res['task']}: {edge['inputs']['windows']} {edge['inputs']['source']} windows "
             f"{tuple(edge['inputs']['shape'])}, {edge['rounds']} rounds, 1 thread "
             f"(edge: this process; torch {res['torch']['torch']}: own process, "
             f"{res['torch']['threads']} thread)",
             f"{'model':<16}{'runtime':<22}{'median_us':>10}{'p99_us':>10}  agent uses"]
    for r in edge["models"]:
        lines.append(f"{r['role']:<16}{'onnxruntime ' + r['quantization']:<22}{r['median_us']:>10.1f}"
                     f"{r['p99_us']:>10.1f}  {'*' if r['used'] else ''}")
    for role in ("predictor", "gate", "second_opinion"):
        if role in tc:
            rt = "torch eager" if role != "second_opinion" else f"sklearn ({res['torch']['second_opinion']})"
            lines.append(f"{role:<16}{rt:<22}{tc[role]['median_us']:>10.1f}{tc[role]['p99_us']:>10.1f}")
    lines += ["", f"{'per window':<50}{'median_us':>10}{'p99_us':>10}"]
    for s in edge["stages"]:
        if "median_us" in s:
            lines.append(f"{s['label']:<50}{s['median_us']:>10.1f}{s['p99_us']:>10.1f}")
        else:
            lines.append(f"{s['label']:<50}  unavailable: {s.get('error', '')[:50]}")
    lines.append(f"{'torch eager path (features+torch+sklearn+gate)':<50}{tc['path']['median_us']:>10.1f}"
                 f"{tc['path']['p99_us']:>10.1f}")
    lines.append(f"{'torch eager path without second opinion':<50}{tc['path_no_second']['median_us']:>10.1f}"
                 f"{tc['path_no_second']['p99_us']:>10.1f}")
    r = res["ratios"]
    lines += ["",
              f"edge path / floor          {r['edge_path_over_floor']:6.2f}x   target <= 2x: "
              f"{common.verdict(r['edge_path_over_floor'] <= 2)}",
              f"torch eager / edge path    {r['torch_path_over_edge_path']:6.2f}x   target >= 5x: "
              f"{common.verdict(r['torch_path_over_edge_path'] >= 5)}",
              f"  (torch without the sklearn second opinion / edge path: "
              f"{r['torch_path_no_second_over_edge_path']:.2f}x)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=list(common.TASKS), choices=list(common.TASKS))
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    common.setup_logging()
    result: dict[str, Any] = {"benchmark": "latency", "machine": common.machine(),
                              "torch": common.torch_version(), "tasks": []}
    for task in args.tasks:
        res = measure(task, args.rounds)
        print(table(res), "\n", flush=True)
        result["tasks"].append(res)
    common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
