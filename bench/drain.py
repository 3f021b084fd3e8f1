"""Benchmark 4: outbox drain rate after an outage: 100k results queued while the broker is down, then the
broker comes back; time until the outbox is empty (every row PUBACKed and deleted).

    python bench/drain.py [--rows 100000] [--json out/drain.json]

Per mode (per-result messages; batched, <= 500 results per message), one Transport (the agent's defaults:
max_inflight 200, reconnect backoff up to 10 s) on a real mosquitto that is down at first:
  queue    10,000 results through Transport.send (one transaction each), 10,000 through
           Transport.send_many in calls of 500 (the agent's path: one transaction per call), the rest
           with Outbox.put_many in transactions of 1,000 (all timed: the outbox write rate);
  back     the broker starts on the same port; we time broker start -> connected -> outbox empty.
Drain rate = rows / (empty - connected). Target: >= 20,000 results/s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

from edgekit import topics  # noqa: E402
from edgekit.broker import Mosquitto  # noqa: E402

SEND_ROWS = 10_000
SEND_MANY_ROWS, SEND_MANY_CHUNK = 10_000, 500
PUT_MANY_CHUNK = 1_000


def drain(rows: int, payloads: list[bytes], batched: bool, tmp: Path) -> dict[str, Any]:
    from edgekit.outbox import Outbox
    from edgekit.transport import Transport

    name = "batched" if batched else "per-result"
    broker = Mosquitto(tmp / f"broker-{name}")  # not started: the outage
    box = Outbox(tmp / f"outbox-{name}.db")
    t = Transport(broker.url, site="bench", device=f"drain-{name}", outbox=box,
                  batch_interval_s=0.05 if batched else 0.0, max_batch=500, max_inflight=200)
    try:
        topic = topics.topic("bench", f"drain-{name}", "result")  # what Transport.send writes for a result
        n_send = min(SEND_ROWS, rows)
        t0 = time.perf_counter()
        for i in range(n_send):
            t.send("result", payloads[i % len(payloads)])
        send_s = time.perf_counter() - t0
        n_many = min(SEND_MANY_ROWS, rows - n_send)
        t0 = time.perf_counter()
        for a in range(0, n_many, SEND_MANY_CHUNK):
            t.send_many([("result", payloads[j % len(payloads)]) for j in range(a, min(n_many, a + SEND_MANY_CHUNK))])
        send_many_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        left = rows - n_send - n_many
        while left > 0:
            k = min(PUT_MANY_CHUNK, left)
            box.put_many([(topic, payloads[j % len(payloads)], True) for j in range(k)], replayed=True)
            left -= k
        put_many_s = time.perf_counter() - t0
        queued = box.backlog()
        t_back = time.perf_counter()
        broker.start()
        while not t.connected:
            if time.perf_counter() - t_back > 60:
                raise RuntimeError("transport did not reconnect within 60 s")
            time.sleep(0.002)
        t_conn = time.perf_counter()
        ok = t.flush(900)
        t_empty = time.perf_counter()
        stats = t.stats()
    finally:
        t.close()
        box.close()
        broker.stop()
    drain_s = t_empty - t_conn
    return {"mode": name, "rows": rows, "queued": queued, "drained": ok, "acked": stats["acked"],
            "messages": stats["messages"], "replayed": stats["replayed"],
            "send_per_s": n_send / send_s, "send_many_per_s": n_many / send_many_s if n_many else None,
            "put_many_per_s": (rows - n_send - n_many) / put_many_s if rows > n_send + n_many else None,
            "reconnect_s": t_conn - t_back, "drain_s": drain_s, "drain_per_s": rows / drain_s,
            "back_to_empty_s": t_empty - t_back}


def table(result: dict[str, Any]) -> str:
    lines = [f"== outbox drain after an outage ({result['rows']} results queued, mosquitto QoS 1)",
             f"{'mode':<12}{'queue: send/s':>14}{'send_many/s':>12}{'put_many/s':>12}{'reconnect_s':>12}{'drain_s':>9}"
             f"{'drain results/s':>17}{'messages':>10}  empty"]
    for c in result["cases"]:
        pm = f"{c['put_many_per_s']:.0f}" if c["put_many_per_s"] else "-"
        sm = f"{c['send_many_per_s']:.0f}" if c.get("send_many_per_s") else "-"
        lines.append(f"{c['mode']:<12}{c['send_per_s']:>14.0f}{sm:>12}{pm:>12}{c['reconnect_s']:>12.2f}"
                     f"{c['drain_s']:>9.2f}{c['drain_per_s']:>17.0f}{c['messages']:>10}  {c['drained']}")
    for c in result["cases"]:
        lines.append(f"{c['mode']}: drain {c['drain_per_s']:.0f} results/s, target >= 20,000: "
                     f"{common.verdict(c['drain_per_s'] >= 20000)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="skab", choices=list(common.TASKS))
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--modes", nargs="+", default=["per-result", "batched"], choices=["per-result", "batched"])
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    common.setup_logging()
    from e2e import sample_payloads

    bundle = common.ensure_bundle(args.task)
    payloads = sample_payloads(bundle, common.real_windows(bundle, n=64), 64)
    cases = []
    with tempfile.TemporaryDirectory(prefix="bench-drain-") as tmp:
        for mode in args.modes:
            cases.append(drain(args.rows, payloads, mode == "batched", Path(tmp)))
            print(f"  {mode}: {cases[-1]['drain_per_s']:.0f} results/s", flush=True)
    result = {"benchmark": "drain", "rows": args.rows, "machine": common.machine(), "cases": cases}
    print(table(result), "\n", flush=True)
    common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
