"""Run every benchmark, one after the other, each in its own process; tables to stdout and OUT/tables.txt,
JSON to OUT/<name>.json.

    python bench/run_all.py [--out out/bench] [--quick]

--quick: fewer rounds and results (a smoke run, minutes instead of ~15); the README's tables are full runs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

FULL = {
    "latency": ["--rounds", "2000"],
    "startup": ["--repeats", "5"],
    "e2e": ["--windows", "10000", "--results", "100000"],
    "drain": ["--rows", "100000"],
    "hub_ingest": ["--results", "20000"],
    "hub_cluster": ["--results", "20000"],
    "stream_khz": ["--seconds", "20", "--burst-seconds", "200"],
}
QUICK = {
    "latency": ["--rounds", "300"],
    "startup": ["--repeats", "2"],
    "e2e": ["--windows", "1000", "--results", "10000"],
    "drain": ["--rows", "10000"],
    "hub_ingest": ["--results", "2000", "--db", "sqlite"],
    "hub_cluster": ["--results", "2000", "--batch-results", "10000", "--db", "sqlite"],
    "stream_khz": ["--seconds", "5", "--burst-seconds", "30"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(common.ROOT / "out" / "bench"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="+", choices=list(FULL), default=list(FULL))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = QUICK if args.quick else FULL
    failed = []
    with (out / "tables.txt").open("w") as tables:
        m = common.machine()
        head = [f"machine: {m['platform']}, {m['cores']} cores, python {m['python']}, onnxruntime "
                f"{m['onnxruntime']}, numpy {m['numpy']}, paho-mqtt {m['paho_mqtt']}, torch {common.torch_version()}, "
                f"{m['mosquitto']}",
                f"started {m['when_utc']}, load average (1/5/15 min) {m['loadavg_1_5_15']}", *m["lscpu"], ""]
        print("\n".join(head), flush=True)
        tables.write("\n".join(head) + "\n")
        for name in args.only:
            cmd = [common.PYTHON, str(HERE / f"{name}.py"), *plan[name], "--json", str(out / f"{name}.json")]
            print(f"$ python bench/{name}.py {' '.join(plan[name])}", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=common.ROOT, capture_output=True, text=True)
            took = time.perf_counter() - t0
            text = proc.stdout.rstrip()
            print(text, flush=True)
            if proc.returncode != 0:
                failed.append(name)
                print(proc.stderr[-3000:], file=sys.stderr, flush=True)
            tables.write(f"$ python bench/{name}.py {' '.join(plan[name])}   ({took:.0f} s, rc {proc.returncode})\n"
                         f"{text}\n\n")
    print(f"tables: {out / 'tables.txt'}; JSON: {out}/*.json" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
