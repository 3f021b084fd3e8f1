"""Shared by the benchmark scripts: bundles built on demand, real input windows, machine facts, JSON output.

Never imports torch (the torch baselines run in their own subprocess, bench/torch_path.py).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TASKS = {"skab": "edgekit/recipes/skab.toml", "ipol_gait": "edgekit/recipes/ipol_gait.toml"}

log = logging.getLogger("bench")


def setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")


def run_dir(task: str) -> Path:
    return ROOT / "runs" / f"bench-{task}"


def bundle_dir(task: str) -> Path:
    return ROOT / "bundles" / f"bench-{task}"


def ensure_bundle(task: str) -> Path:
    """bundles/bench-TASK, trained as the recipe says and exported (INT8) first if it is not there yet: the
    benchmark measures the models a user gets (their deferral rate decides how many reviews are sent)."""
    bundle, run = bundle_dir(task), run_dir(task)
    if (bundle / "manifest.json").is_file() and (run / "run.json").is_file():
        return bundle
    recipe = ROOT / TASKS[task]
    print(f"building {bundle.relative_to(ROOT)} (train {TASKS[task]} + export --int8) ...", flush=True)
    for cmd in ([PYTHON, "-m", "edgekit", "train", str(recipe), "--out", str(run), "--no-progress"],
                [PYTHON, "-m", "edgekit", "export", str(run), "--int8", "--out", str(bundle)]):
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return bundle


def real_windows(bundle: Path, n: int = 64) -> np.ndarray:
    """(n, size, C) float64 windows from the bundle's own dataset (first recording, hop as trained).

    Falls back to the manifest-based synthetic windows when the dataset is not there.
    """
    from edgekit import datasets
    from edgekit.bench import synthetic_windows
    from edgekit.errors import DataError
    from edgekit.manifest import load_bundle
    from edgekit.window import sliding_windows

    m = load_bundle(bundle)
    inp = m.input
    try:
        if m.task.startswith("skab"):
            files, read = datasets.skab_files(), datasets.read_skab
        else:
            files, read = datasets.ipol_files(), datasets.read_ipol
        chunks = []
        for path in files:
            table = read(path)
            idx = [table.channels.index(c) for c in inp.channels]
            chunks.append(sliding_windows(table.values[:, idx], int(inp.window_size), int(inp.window_hop)))
            if sum(len(c) for c in chunks) >= n:
                break
        wins = np.concatenate(chunks)[:n]
        if len(wins) == n:
            return wins
    except DataError as exc:
        log.warning("bench.no_dataset error=%s: synthetic windows instead", exc)
    return synthetic_windows(m, n)


def machine() -> dict[str, Any]:
    """lscpu's head, versions of python, onnxruntime, numpy, paho, mosquitto (torch from the subprocess)."""
    import onnxruntime
    import paho.mqtt

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()[:14]
    except (OSError, subprocess.SubprocessError):
        lscpu = []
    try:
        mosq = subprocess.run(["/usr/sbin/mosquitto", "-h"], capture_output=True, text=True,
                              timeout=10).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        mosq = "unknown"
    return {"platform": platform.platform(), "cores": os.cpu_count(), "lscpu": lscpu,
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__, "paho_mqtt": paho.mqtt.__version__, "mosquitto": mosq,
            "when_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]}


def torch_version() -> str:
    out = subprocess.run([PYTHON, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
    return out.stdout.strip() or "not installed"


def write_json(path: str | Path | None, result: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2, default=float))
        print(f"wrote {path}")


def pct(values: list[float] | np.ndarray, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"
