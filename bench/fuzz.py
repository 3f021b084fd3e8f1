"""Fuzz run (issue 10): every target of tests/fuzzing.py for N fresh inputs each, and a table of crashes and hangs.

    python bench/fuzz.py [--inputs 10000] [--targets replay,hub] [--seed S] [--hang-s 10] [--json out/fuzz.json]

The same strategies and contract checks as tests/test_fuzz.py (imported from tests/fuzzing.py, not copied),
with random inputs (the seed is printed; --seed repeats a run). A crash: the check raised, because the code
let an exception out or broke its contract. A hang: one input still running after --hang-s seconds; it is
interrupted (SIGALRM), counted and the run goes on (a hang in C code that ignores the signal ends the run
with faulthandler's traceback after 3 x --hang-s). Each distinct crash (exception and the line it came from)
is printed once with its first input and traceback. Exit status 1 on any crash or hang.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import random
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import common  # noqa: E402
from fuzzing import TARGETS, Target  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import seed as hypothesis_seed  # noqa: E402

SLOW_S = 1.0  # inputs slower than this are listed (not failures)
SHOWN_INPUT_CHARS = 1500


class Hang(BaseException):
    """Raised in the main thread by SIGALRM; a BaseException so `except Exception` in the code cannot eat it."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise Hang()


def _signature(exc: BaseException) -> str:
    """`Type at file:line`: for a broken contract the check's assertion and its message; for an exception
    the innermost frame in the project's code (not the fuzz check's), else the innermost."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != __file__]
    root = str(common.ROOT)
    ours = [f for f in frames if f.filename.startswith(root)]
    if not isinstance(exc, AssertionError):
        ours = [f for f in ours if "/tests/" not in f.filename] or ours
    where = (ours or frames or [None])[-1]
    if where is None:
        return type(exc).__name__
    name = str(Path(where.filename).relative_to(root)) if where.filename.startswith(root) else where.filename
    text = f"{type(exc).__name__} at {name}:{where.lineno}"
    if isinstance(exc, AssertionError) and str(exc):
        text += ": " + str(exc).splitlines()[0][:120]
    return text


def run_target(target: Target, inputs: int, seed: int, hang_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {"target": target.name, "what": target.what, "inputs": 0, "crashes": 0, "hangs": 0,
                           "slowest_s": 0.0, "slow": 0, "distinct": {}, "hung": []}

    def one(case: Any) -> None:
        out["inputs"] += 1
        faulthandler.dump_traceback_later(3 * hang_s, exit=True)
        signal.setitimer(signal.ITIMER_REAL, hang_s)
        t0 = time.perf_counter()
        try:
            target.check(case)
        except Hang:
            out["hangs"] += 1
            out["hung"].append(repr(case)[:SHOWN_INPUT_CHARS])
        except Exception as exc:  # noqa: BLE001 - every escape is a crash to count, not to stop at
            out["crashes"] += 1
            sig = _signature(exc)
            seen = out["distinct"].setdefault(sig, {"count": 0})
            seen["count"] += 1
            if seen["count"] == 1:
                seen["input"] = repr(case)[:SHOWN_INPUT_CHARS]
                seen["traceback"] = "".join(traceback.format_exception(exc))[-4000:]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            faulthandler.cancel_dump_traceback_later()
        took = time.perf_counter() - t0
        out["slowest_s"] = max(out["slowest_s"], took)
        out["slow"] += took > SLOW_S

    test = settings(max_examples=inputs, database=None, deadline=None, derandomize=False,
                    suppress_health_check=list(HealthCheck), phases=[Phase.generate])(given(target.strategy)(one))
    t0 = time.perf_counter()
    hypothesis_seed(seed)(test)()
    out["seconds"] = time.perf_counter() - t0
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--inputs", type=int, default=10_000, help="inputs per target (default 10,000)")
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    ap.add_argument("--seed", type=int, default=None, help="Hypothesis seed (default: random, printed)")
    ap.add_argument("--hang-s", type=float, default=10.0, help="an input running longer is a hang (default 10)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        ap.error(f"unknown targets {unknown}; known: {', '.join(TARGETS)}")
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    logging.disable(logging.CRITICAL)  # every bad input logs a warning by design: millions of lines
    signal.signal(signal.SIGALRM, _on_alarm)
    machine = common.machine()
    print(f"fuzz: {args.inputs} inputs per target, seed {seed}, hang after {args.hang_s:g} s; "
          f"python {machine['python']}, {machine['cores']} cores, {machine['platform']}", flush=True)
    results = []
    for name in names:
        r = run_target(TARGETS[name], args.inputs, seed, args.hang_s)
        results.append(r)
        print(f"  {name:7s} {r['inputs']:7d} inputs  {r['crashes']} crashes  {r['hangs']} hangs  "
              f"{r['seconds']:.1f} s", flush=True)
    print()
    print("| target | what | inputs | crashes | hangs | slowest input (ms) | inputs > 1 s | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['target']} | {r['what']} | {r['inputs']:,} | {r['crashes']} | {r['hangs']} | "
              f"{1000 * r['slowest_s']:.0f} | {r['slow']} | {r['seconds']:.1f} |")
    total = sum(r["seconds"] for r in results)
    print(f"\ntotal {sum(r['inputs'] for r in results):,} inputs in {total:.1f} s (seed {seed})")
    for r in results:
        for sig, seen in r["distinct"].items():
            print(f"\nCRASH {r['target']}: {sig} ({seen['count']} inputs)\n  first input: {seen['input']}\n"
                  f"{seen['traceback']}")
        for case in r["hung"][:5]:
            print(f"\nHANG {r['target']}: {case}")
    common.write_json(args.json, {"seed": seed, "inputs_per_target": args.inputs, "hang_s": args.hang_s,
                                  "machine": machine, "results": results})
    return 1 if any(r["crashes"] or r["hangs"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
