"""Benchmark 3: end-to-end windows/s through a real mosquitto at QoS 1 with the outbox on, per-result and
batched, with p50/p99 outbox-insert-to-PUBACK latency.

    python bench/e2e.py [--task skab] [--windows 10000] [--results 100000] [--json out/e2e.json]

Cases (one broker, started here from edgekit/data/mosquitto-local.conf; one run, same payloads):
  paho bare       the baseline without us: paho publishes the same result payloads at QoS 1, no outbox
                  (waits for every PUBACK at the end); at most max_inflight messages in flight.
  transport       edgekit.transport.Transport.send of ready payloads: outbox write, publisher thread, PUBACK
                  deletes; per-result (batch_interval_s=0) and batched (batch_interval_s=0.05, max_batch=500);
                  batched also with Transport.send_many of 500 payloads per call (one transaction each).
  agent           the agent's real path: Agent.run over a replay file at speed 0 (the recorded windows' rows
                  written in the task's file format): ReplayReader blocks -> Windower.push_many ->
                  Agent.process_many (features, models, gate, JSON, one outbox transaction per call) ->
                  Transport -> mosquitto -> PUBACK; per-result, batched, and per-result with the gate off.
  agent per-window the loop before blocks, for comparison in the same run: Sample list -> Windower.push ->
                  Agent.process per window.
Rates count from the first send (Agent.run called) to the last PUBACK (flush returned, outbox empty); the
agent's "loop" rate ends at its last outbox write. Latency: each outbox row's insert time to the PUBACK that
deleted it (the sample->insert part is Agent.process, bench 1).
Targets: >= 5,000 windows/s per-result; >= 50,000 results/s batched.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

from edgekit.broker import Mosquitto  # noqa: E402

BATCH_INTERVAL_S = 0.05
MAX_BATCH = 500
MAX_INFLIGHT = 200


class Clock:
    """Per-row insert and ack times, recorded by wrapping one Outbox's put_many and ack (both threads)."""

    def __init__(self, outbox: Any) -> None:
        self.inserted: dict[int, float] = {}
        self.acked: dict[int, float] = {}
        self._lock = threading.Lock()
        put_many, ack = outbox.put_many, outbox.ack

        def timed_put_many(items: list, **kw: Any) -> list[int]:
            ids = put_many(items, **kw)
            now = time.perf_counter()
            for i in ids:
                self.inserted[i] = now
            return ids

        def timed_ack(ids: Any) -> None:
            ack(ids)
            now = time.perf_counter()
            with self._lock:
                for i in ids:
                    self.acked[i] = now

        outbox.put_many = timed_put_many
        outbox.ack = timed_ack

    def latencies_ms(self) -> list[float]:
        return [(self.acked[i] - t) * 1000 for i, t in self.inserted.items() if i in self.acked]


def sample_payloads(bundle: Path, windows: np.ndarray, n: int) -> list[bytes]:
    """Real result payloads: the agent processes recorded windows offline, we read them from its outbox."""
    from edgekit.bench import offline_agent
    from edgekit.values import Window

    with tempfile.TemporaryDirectory(prefix="bench-e2e-payloads-") as tmp:
        agent, process = offline_agent(bundle, 1, Path(tmp))
        try:
            for i, w in enumerate(windows[:n]):
                process(Window(seq=i, start_s=float(i), end_s=float(i + len(w) - 1), data=w))
            rows = agent.outbox.pending(10 * n)
        finally:
            agent.__exit__(None, None, None)
    return [r.payload for r in rows if r.topic.endswith("/result")]


def paho_bare(url_port: int, payloads: list[bytes], n: int) -> dict[str, Any]:
    import paho.mqtt.client as mqtt

    done = threading.Semaphore(MAX_INFLIGHT)
    sent: dict[int, float] = {}
    lat: list[float] = []

    def on_publish(_c: Any, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
        t = sent.pop(mid, None)
        if t is not None:
            lat.append((time.perf_counter() - t) * 1000)
        done.release()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-paho", protocol=mqtt.MQTTv311)
    c.max_inflight_messages_set(MAX_INFLIGHT)
    c.on_publish = on_publish
    c.connect("127.0.0.1", url_port)
    c.loop_start()
    try:
        t0 = time.perf_counter()
        for i in range(n):
            done.acquire()
            info = c.publish("edgekit/v1/bench/paho/result", payloads[i % len(payloads)], qos=1)
            sent[info.mid] = time.perf_counter()
        for _ in range(MAX_INFLIGHT):
            done.acquire()
        elapsed = time.perf_counter() - t0
    finally:
        c.disconnect()
        c.loop_stop()
    return {"case": "paho bare, QoS 1, 1 result/message", "results": n, "messages": n, "seconds": elapsed,
            "results_per_s": n / elapsed, "send_per_s": n / elapsed, "p50_ms": common.pct(lat, 50),
            "p99_ms": common.pct(lat, 99), "latency": "publish() to PUBACK"}


def transport_only(url: str, payloads: list[bytes], n: int, batched: bool, tmp: Path,
                   rate_per_s: float | None = None, per_call: int = 1) -> dict[str, Any]:
    """As fast as send() goes, or paced at `rate_per_s` (latency below saturation, not queueing delay);
    per_call > 1: send_many of that many payloads per call."""
    from edgekit.outbox import Outbox
    from edgekit.transport import Transport

    box = Outbox(tmp / f"transport-{int(batched)}-{rate_per_s or 0}-{per_call}.db")
    clock = Clock(box)
    t = Transport(url, site="bench", device=f"tr{int(batched)}{'p' if rate_per_s else ''}{per_call}", outbox=box,
                  max_inflight=MAX_INFLIGHT, batch_interval_s=BATCH_INTERVAL_S if batched else 0.0,
                  max_batch=MAX_BATCH)
    try:
        deadline = time.monotonic() + 10
        while not t.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.perf_counter()
        if per_call > 1:
            for a in range(0, n, per_call):
                t.send_many([("result", payloads[i % len(payloads)]) for i in range(a, min(n, a + per_call))])
        else:
            for i in range(n):
                if rate_per_s:
                    wait = t0 + i / rate_per_s - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                t.send("result", payloads[i % len(payloads)])
        sent_s = time.perf_counter() - t0
        ok = t.flush(300)
        elapsed = time.perf_counter() - t0
        stats = t.stats()
    finally:
        t.close()
        box.close()
    lat = clock.latencies_ms()
    mode = f"batched ({BATCH_INTERVAL_S}s, <= {MAX_BATCH}/msg)" if batched else "per-result"
    if rate_per_s:
        mode += f" paced at {rate_per_s:.0f}/s"
    if per_call > 1:
        mode += f", send_many x{per_call}"
    return {"case": f"transport {mode}", "results": n, "messages": stats["messages"], "seconds": elapsed,
            "send_seconds": sent_s, "send_per_s": n / sent_s, "results_per_s": n / elapsed, "drained": ok, "acked": stats["acked"],
            "p50_ms": common.pct(lat, 50), "p99_ms": common.pct(lat, 99), "latency": "outbox insert to PUBACK"}


def agent_config(url: str, bundle: Path, source: Path, batched: bool, tmp: Path, gate: bool, tag: str) -> Any:
    from edgekit.config import AgentConfig, validate

    return validate(AgentConfig, {
        "device_id": f"ag{int(batched)}{int(gate)}{tag}", "site": "bench", "allow_unsigned": True, "bundle": str(bundle),
        "gate": {"enabled": gate},
        "source": {"kind": "replay", "path": str(source), "speed": 0},
        "mqtt": {"url": url, "batch_interval_s": BATCH_INTERVAL_S if batched else 0.0, "max_batch": MAX_BATCH,
                 "max_inflight": MAX_INFLIGHT},
        "outbox": {"path": str(tmp / f"agent-{int(batched)}{int(gate)}{tag}.db")},
        "runtime": {"intra_op_threads": 1},
    }, "bench/e2e.py")


def agent_case(url: str, bundle: Path, source: Path, batched: bool, tmp: Path, gate: bool = True,
               samples: list[Any] | None = None) -> dict[str, Any]:
    """Agent.run over the replay file; with `samples`, the per-window loop over them instead."""
    from edgekit.agent import Agent
    from edgekit.window import Windower

    tag = "w" if samples is not None else ""
    with Agent(agent_config(url, bundle, source, batched, tmp, gate, tag)) as agent:
        clock = Clock(agent.outbox)
        deadline = time.monotonic() + 10
        while not agent.transport.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.perf_counter()
        if samples is None:
            summary = agent.run(drain_timeout_s=300)
            ok = summary.queued == 0
        else:
            inp = agent.manifest.input
            windower = Windower(int(inp.window_size), int(inp.window_hop), len(inp.channels), inp.max_gap_s)
            for s in samples:
                w = windower.push(s)
                if w is not None:
                    agent.process(w)
            ok = agent.transport.flush(300)
        elapsed = time.perf_counter() - t0
        loop_s = max(clock.inserted.values()) - t0
        stats = agent.transport.stats()
        windows = agent.counters.windows
        deferred = agent.counters.deferred
    lat = clock.latencies_ms()
    mode = f"batched ({BATCH_INTERVAL_S}s, <= {MAX_BATCH}/msg)" if batched else "per-result"
    if not gate:
        mode += ", gate off (no reviews)"
    name = "agent per-window" if samples is not None else "agent"
    return {"case": f"{name} {mode}", "results": windows, "windows": windows, "deferred_reviews": deferred,
            "messages": stats["messages"], "seconds": elapsed, "loop_seconds": loop_s,
            "results_per_s": windows / elapsed, "send_per_s": windows / loop_s,
            "loop_windows_per_s": windows / loop_s, "drained": ok, "acked": stats["acked"],
            "p50_ms": common.pct(lat, 50), "p99_ms": common.pct(lat, 99), "latency": "outbox insert to PUBACK",
            "path": ("Sample list -> Windower.push -> Agent.process" if samples is not None
                     else "Agent.run: replay speed 0 -> push_many -> process_many")}


def stream_rows(bundle: Path, windows_wanted: int) -> np.ndarray:
    """Recorded rows (T, C), enough for `windows_wanted` windows (recordings concatenated and repeated)."""
    from edgekit.manifest import load_bundle

    inp = load_bundle(bundle).input
    base = common.real_windows(bundle, n=64)  # (64, size, C) recorded windows; their rows are the stream
    rows = base.reshape(-1, base.shape[2])
    need = int(inp.window_size) + (windows_wanted - 1) * int(inp.window_hop)
    reps = int(np.ceil(need / len(rows)))
    return np.tile(rows, (reps, 1))[:need]


def stream_samples(bundle: Path, rows: np.ndarray) -> list[Any]:
    """The rows as Samples on the replay file's clock (row / rate_hz)."""
    from edgekit.manifest import load_bundle
    from edgekit.values import Sample

    rate = float(load_bundle(bundle).input.rate_hz or 1.0)
    return [Sample(i / rate, rows[i]) for i in range(len(rows))]


def write_replay_file(bundle: Path, rows: np.ndarray, path: Path) -> Path:
    """The rows as a recording the replay source reads (SKAB csv or IPOL txt); floats round-trip exactly."""
    from datetime import datetime, timedelta

    from edgekit.manifest import load_bundle

    m = load_bundle(bundle)
    channels = list(m.input.channels)
    cells = [";".join(repr(float(v)) for v in row) for row in rows]
    if m.task.startswith("skab"):
        t0 = datetime(2020, 1, 1)
        step = timedelta(seconds=1.0 / float(m.input.rate_hz or 1.0))
        lines = ["datetime;" + ";".join(channels)]
        lines += [f"{(t0 + i * step).isoformat(sep=' ')};{c}" for i, c in enumerate(cells)]
    else:
        lines = [f"Acquisition frequency: {float(m.input.rate_hz):g} Hz", "PacketCounter\t" + "\t".join(channels)]
        lines += [f"{i % 65536}\t" + c.replace(";", "\t") for i, c in enumerate(cells)]
    path.write_text("\n".join(lines) + "\n")
    return path


def table(result: dict[str, Any]) -> str:
    lines = [f"== e2e through mosquitto (QoS 1, TCP_NODELAY, max_inflight {MAX_INFLIGHT}), task "
             f"{result['task']}",
             f"{'case':<56}{'results':>8}{'msgs':>7}{'send/s':>8}{'results/s':>10}{'p50_ms':>8}{'p99_ms':>8}"
             "  latency",
             "(send/s: how fast results went into the outbox; results/s: first send to last PUBACK)"]
    for c in result["cases"]:
        lines.append(f"{c['case']:<56}{c['results']:>8}{c['messages']:>7}{c['send_per_s']:>8.0f}"
                     f"{c['results_per_s']:>10.0f}{c['p50_ms']:>8.2f}{c['p99_ms']:>8.2f}  {c['latency']}")
    for c in result["cases"]:
        if "loop_windows_per_s" in c:
            lines.append(f"  {c['case']}: {c['results_per_s']:.0f} windows/s end to end, loop alone "
                         f"{c['loop_windows_per_s']:.0f} windows/s ({c['path']}), {c['deferred_reviews']} "
                         "deferred reviews sent too")
    by = {c["case"]: c for c in result["cases"]}
    batch = f"batched ({BATCH_INTERVAL_S}s, <= {MAX_BATCH}/msg)"
    a1, ab = by.get("agent per-result"), by.get(f"agent {batch}")
    t1, tb, tm = (by.get("transport per-result"), by.get(f"transport {batch}"),
                  by.get(f"transport {batch}, send_many x{MAX_BATCH}"))
    if a1 and t1:
        lines.append(f"per-result: agent {a1['results_per_s']:.0f} windows/s, transport alone "
                     f"{t1['results_per_s']:.0f} results/s; target >= 5,000 windows/s: "
                     f"{common.verdict(a1['results_per_s'] >= 5000)}")
    if ab and tb and tm:
        lines.append(f"batched: transport {tb['results_per_s']:.0f} results/s (send), {tm['results_per_s']:.0f} "
                     f"(send_many), agent {ab['results_per_s']:.0f} windows/s; target >= 50,000 results/s: "
                     f"{common.verdict(tb['results_per_s'] >= 50000)} (send), "
                     f"{common.verdict(tm['results_per_s'] >= 50000)} (send_many), "
                     f"{common.verdict(ab['results_per_s'] >= 50000)} (agent)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="skab", choices=list(common.TASKS))
    ap.add_argument("--windows", type=int, default=10000, help="windows through the agent per case")
    ap.add_argument("--results", type=int, default=100000, help="results through the batched transport")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    common.setup_logging()
    bundle = common.ensure_bundle(args.task)
    payloads = sample_payloads(bundle, common.real_windows(bundle, n=64), 64)
    rows = stream_rows(bundle, args.windows)
    cases = []
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp_s:
        tmp = Path(tmp_s)
        replay = write_replay_file(bundle, rows, tmp / ("stream.csv" if args.task == "skab" else "stream_lb.txt"))
        with Mosquitto(tmp / "broker") as broker:
            per_result_n = min(args.results, 20000)
            cases.append(paho_bare(broker.port, payloads, per_result_n))
            cases.append(transport_only(broker.url, payloads, per_result_n, False, tmp))
            cases.append(transport_only(broker.url, payloads, 3000, False, tmp, rate_per_s=1000))
            cases.append(transport_only(broker.url, payloads, args.results, True, tmp))
            cases.append(transport_only(broker.url, payloads, args.results, True, tmp, per_call=MAX_BATCH))
            cases.append(agent_case(broker.url, bundle, replay, False, tmp))
            cases.append(agent_case(broker.url, bundle, replay, True, tmp))
            cases.append(agent_case(broker.url, bundle, replay, False, tmp, gate=False))
            cases.append(agent_case(broker.url, bundle, replay, False, tmp, samples=stream_samples(bundle, rows)))
            for c in cases:
                print(f"  {c['case']}: {c['results_per_s']:.0f} results/s", flush=True)
    result = {"benchmark": "e2e", "task": args.task, "machine": common.machine(),
              "payload_bytes_median": float(np.median([len(p) for p in payloads])), "cases": cases}
    print(table(result), "\n", flush=True)
    common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
