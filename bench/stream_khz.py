"""Benchmark: a 3-channel accelerometer at 25.6 kHz over MQTT binary block payloads, through a real mosquitto
into the real agent (issue 12), against the bare MQTT receive loop in the same run.

    python bench/stream_khz.py [--seconds 20] [--burst-seconds 200] [--block-s 0.1] [--json out/bench/stream_khz.json]

One broker (edgekit/data/mosquitto-local.conf), three processes besides it:
  agent       `edgekit run` (Agent.run) with an mqtt source on the gateway topic: binary blocks
              (edgekit/contract/samples.py) -> SampleBlock -> Windower.push_many -> Agent.process_many ->
              outbox -> results published QoS 1 to the same broker; bundle: 3 channels at 25.6 kHz, windows of
              2,560 samples (0.1 s) every 1,280, machine features, MLP + dense AE + random forest, INT8.
  bare paho   the baseline: a paho subscriber on the same topic at QoS 1 that only counts the payloads.
  gateway     this process: publishes the blocks QoS 1 (encode_binary, float32), and subscribes to the agent's
              results to count them and time them.
Phases: "real time" publishes one block every block_s for --seconds; "as fast as possible" publishes
--burst-seconds of stream, pre-encoded, without pacing, and waits until the agent's last result and the bare
loop's last payload arrived. CPU is each process's utime + stime (/proc/PID/stat) over the phase; core share =
CPU seconds / wall seconds. Lag: a block's publish to the broker's delivery of the result of the window the
block completed. Capacity: samples per agent CPU second (what one core would sustain). The gateway, the
broker and both subscribers share the machine's cores, so the burst's wall rate is bounded by them too.
The bundle is what a user gets: generated 25.6 kHz recordings (tests/recordingfactory.py: 3 vibration channels,
normal/fault, 32 files of 2 s) trained with their recipe by `edgekit train`'s code and exported INT8 by
`edgekit export`'s, into bundles/bench-stream_khz the first time (torch needed then).
Target: real time at <= 20 % of one core.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import common  # noqa: E402

from edgekit.broker import Mosquitto  # noqa: E402

RATE_HZ = 25600.0
WINDOW, HOP = 2560, 1280
TOPIC = "sensors/accel-1"
TARGET_SHARE = 0.20
CLK_TCK = os.sysconf("SC_CLK_TCK")


def ensure_stream_bundle() -> Path:
    """bundles/bench-stream_khz: generated recordings trained with their recipe and exported INT8, the
    first time (the recordings loader, train and export, as `edgekit train` and `edgekit export` run them)."""
    bundle = common.ROOT / "bundles" / "bench-stream_khz"
    if (bundle / "manifest.json").is_file():
        return bundle
    print(f"building {bundle.relative_to(common.ROOT)} (tests/recordingfactory.py at 25.6 kHz, its recipe, "
          f"window {WINDOW}) ...", flush=True)
    sys.path.insert(0, str(common.ROOT / "tests"))
    from recordingfactory import vibration_recordings, write_recipe

    from edgekit.exporters.export.export import export
    from edgekit.exporters.training.train import train

    work = common.ROOT / "runs" / "bench-stream_khz"
    # 32 files of 2 s: ~1,250 windows, enough for the gate's calibration to certify a threshold
    vibration_recordings(work / "recordings", machines=8, runs=4, seconds=2.0, rate_hz=RATE_HZ,
                         gap=("none", 0.0, 0.0))
    recipe = write_recipe(work, task="stream_khz", epochs=20, size=WINDOW, hop=HOP)
    export(train(recipe, work / "run", progress=False), bundle, int8=True, progress=False)
    return bundle


def cpu_s(pid: int) -> float:
    """utime + stime of a process, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# --- the bare receive loop (its own process) -------------------------------------------------------------


def bare_main(port: int) -> None:
    """Subscribe QoS 1, count payloads; answer each line on stdin with 'COUNT LAST_ARRIVAL_MONOTONIC'."""
    import paho.mqtt.client as mqtt

    state = {"n": 0, "last": 0.0}
    subscribed = threading.Event()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        state["n"] += 1
        state["last"] = time.monotonic()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-bare")
    client.on_connect = lambda c, *a: c.subscribe(TOPIC, qos=1)
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    subscribed.wait(10)
    print("subscribed", flush=True)
    for _ in sys.stdin:
        print(f"{state['n']} {state['last']}", flush=True)
    client.disconnect()
    client.loop_stop()


class Bare:
    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen([common.PYTHON, __file__, "--bare", str(port)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "subscribed"

    def state(self) -> tuple[int, float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("?\n")
        self.proc.stdin.flush()
        n, last = self.proc.stdout.readline().split()
        return int(n), float(last)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


# --- the agent (its own process) and what it publishes ------------------------------------------------------


class AgentProc:
    def __init__(self, bundle: Path, url: str, tmp: Path) -> None:
        cfg = (f'device_id = "accel-1"\nsite = "bench"\nbundle = "{bundle}"\nallow_unsigned = true\n'
               f'metrics_interval_s = 5.0\n'
               f'[source]\nkind = "mqtt"\ntopic = "{TOPIC}"\n[mqtt]\nurl = "{url}"\n'
               f'[outbox]\npath = "{tmp / "outbox.db"}"\n[runtime]\nintra_op_threads = 1\n')
        (tmp / "agent.toml").write_text(cfg)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.proc = subprocess.Popen([common.PYTHON, "-m", "edgekit", "-v", "run", "--config", str(tmp / "agent.toml"),
                                      "--drain-timeout", "10"], cwd=common.ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(60):
            raise RuntimeError("agent did not start: " + "\n".join(self.lines[-20:]))
        time.sleep(0.5)  # connect -> subscribe

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip())
            if "source_mqtt_connect" in line:
                self.ready.set()

    def stop(self) -> str:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=60)
        return out.strip()


class Results:
    """The agent's results and metrics as the broker delivers them: window end_s and arrival time."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.arrivals: list[tuple[float, float]] = []
        self.metrics: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-results")
        self.client.on_connect = lambda c, *a: c.subscribe([("edgekit/v1/bench/+/result", 1),
                                                            ("edgekit/v1/bench/+/metrics", 1)])
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        subscribed.wait(10)

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        now = time.monotonic()
        obj = orjson.loads(msg.payload)
        with self.lock:
            if msg.topic.endswith("/metrics"):
                self.metrics.append(obj)
                return
            for r in obj.get("results", [obj]):
                self.arrivals.append((r["window"]["end_s"], now))

    def count(self) -> int:
        with self.lock:
            return len(self.arrivals)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- phases --------------------------------------------------------------------------------------------------


def windows_until(n_samples: int) -> int:
    return 0 if n_samples < WINDOW else (n_samples - WINDOW) // HOP + 1


def wait_for(done: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def phase(name: str, gateway: Any, bare: Bare, agent: AgentProc, results: Results, payloads: list[bytes],
          block_n: int, first_block: int, block_s: float, paced: bool) -> dict[str, Any]:
    """Publish `payloads` (blocks first_block.. of the stream), wait for both receivers; CPU and rates."""
    n_before, _ = bare.state()
    windows_before = results.count()
    expect_windows = windows_until((first_block + len(payloads)) * block_n)
    a0, b0, w0 = cpu_s(agent.proc.pid), cpu_s(bare.proc.pid), time.monotonic()
    published: list[float] = []
    infos = []
    for k, payload in enumerate(payloads):
        if paced:
            delay = w0 + k * block_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        infos.append(gateway.publish(TOPIC, payload, qos=1))
        published.append(time.monotonic())
    for info in infos:
        info.wait_for_publish(60)
    pub_done = time.monotonic()  # every block acknowledged by the broker
    agent_ok = wait_for(lambda: results.count() >= expect_windows, 120)
    bare_ok = wait_for(lambda: bare.state()[0] >= n_before + len(payloads), 120)
    w1 = time.monotonic()
    a1, b1 = cpu_s(agent.proc.pid), cpu_s(bare.proc.pid)
    with results.lock:
        arrivals = results.arrivals[windows_before:]
    agent_done = max((t for _, t in arrivals), default=w1)
    _, bare_done = bare.state()
    samples = len(payloads) * block_n
    lags = [(t - published[int(end_s / block_s + 1e-9) - first_block]) * 1000 for end_s, t in arrivals
            if 0 <= int(end_s / block_s + 1e-9) - first_block < len(published)]
    wall = w1 - w0
    case = {"phase": name, "blocks": len(payloads), "samples": samples, "stream_s": samples / RATE_HZ,
            "windows_expected": expect_windows - windows_before, "windows_received": len(arrivals),
            "bare_received": bare.state()[0] - n_before, "wall_s": wall, "publish_s": pub_done - w0,
            "agent_cpu_s": a1 - a0, "bare_cpu_s": b1 - b0,
            "agent_core_share": (a1 - a0) / wall, "bare_core_share": (b1 - b0) / wall,
            "agent_cpu_us_per_block": (a1 - a0) / len(payloads) * 1e6,
            "bare_cpu_us_per_block": (b1 - b0) / len(payloads) * 1e6,
            "agent_samples_per_s": samples / max(agent_done - w0, 1e-9),
            "bare_samples_per_s": samples / max(bare_done - w0, 1e-9),
            "publisher_samples_per_s": samples / max(pub_done - w0, 1e-9),
            "agent_capacity_samples_per_cpu_s": samples / max(a1 - a0, 1e-9),
            "bare_capacity_samples_per_cpu_s": samples / max(b1 - b0, 1e-9),
            "lag_ms_p50": common.pct(lags, 50), "lag_ms_p99": common.pct(lags, 99),
            "complete": agent_ok and bare_ok}
    return case


def table(result: dict[str, Any]) -> str:
    p = result["params"]
    out = [f"== {p['rate_hz'] / 1000:g} kHz x {p['channels']} channels, binary float32 blocks of {p['block_samples']} "
           f"samples ({p['block_s']:g} s, {p['block_bytes']} bytes), window {WINDOW} hop {HOP}, QoS 1",
           f"{'phase':<20} {'receiver':<10} {'samples/s':>11} {'core share':>11} {'cpu us/block':>13} "
           f"{'samples/cpu-s':>14} {'lag p50/p99 ms':>15}  delivered"]
    for c in result["cases"]:
        for who in ("agent", "bare"):
            lag = f"{c['lag_ms_p50']:.1f} / {c['lag_ms_p99']:.1f}" if who == "agent" else "-"
            got = (f"{c['windows_received']}/{c['windows_expected']} windows" if who == "agent"
                   else f"{c['bare_received']}/{c['blocks']} blocks")
            out.append(f"{c['phase']:<20} {who if who == 'agent' else 'bare paho':<10} "
                       f"{c[f'{who}_samples_per_s']:>11,.0f} {c[f'{who}_core_share']:>10.1%} "
                       f"{c[f'{who}_cpu_us_per_block']:>13,.0f} {c[f'{who}_capacity_samples_per_cpu_s']:>14,.0f} "
                       f"{lag:>15}  {got}")
        out.append(f"{c['phase']:<20} {'gateway':<10} {c['publisher_samples_per_s']:>11,.0f}   (published and "
                   f"acknowledged in {c['publish_s']:.2f} s of the phase's {c['wall_s']:.2f} s)")
    m = result["agent_metrics"]
    out.append(f"agent metrics: source_rate_hz={m.get('source_rate_hz')} rate_drift={m.get('rate_drift')} "
               f"quarantined={m.get('quarantined')}; summary: {result['agent_summary']}")
    rt = result["cases"][0]
    out.append(f"target real time at <= {TARGET_SHARE:.0%} of one core: {common.verdict(result['target_met'])} "
               f"(agent {rt['agent_core_share']:.1%}, bare loop {rt['bare_core_share']:.1%}, lag p99 "
               f"{rt['lag_ms_p99']:.0f} ms)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="real-time phase length")
    ap.add_argument("--burst-seconds", type=float, default=200.0, help="stream seconds sent as fast as possible")
    ap.add_argument("--block-s", type=float, default=0.1, help="seconds of samples per payload")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--bare", type=int, default=None, help=argparse.SUPPRESS)  # the bare loop's own process
    args = ap.parse_args(argv)
    if args.bare is not None:
        bare_main(args.bare)
        return {}
    common.setup_logging()
    import paho.mqtt.client as mqtt

    from edgekit.contract.samples import encode_binary

    sys.path.insert(0, str(common.ROOT / "tests"))
    import numpy as np
    from recordingfactory import signal as vibration

    bundle = ensure_stream_bundle()
    block_n = int(round(args.block_s * RATE_HZ))
    n = int(10 * RATE_HZ)  # 10 s, normal then fault, cycled
    signal = vibration(n, RATE_HZ, np.arange(n) >= n // 2, np.random.default_rng(0))

    def blocks(first: int, count: int) -> list[bytes]:
        out = []
        for k in range(first, first + count):
            a = (k * block_n) % (len(signal) - block_n + 1)
            out.append(encode_binary(k * block_n / RATE_HZ, RATE_HZ, signal[a:a + block_n]))
        return out

    n_rt = int(round(args.seconds / args.block_s))
    n_burst = int(round(args.burst_seconds / args.block_s))
    cases = []
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp_s:
        tmp = Path(tmp_s)
        with Mosquitto(tmp / "broker") as broker:
            results = Results(broker.port)
            bare = Bare(broker.port)
            agent = AgentProc(bundle, broker.url, tmp)
            gateway = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-gateway")
            gateway.max_inflight_messages_set(1000)
            gateway.max_queued_messages_set(0)
            gateway.connect("127.0.0.1", broker.port)
            gateway.loop_start()
            try:
                cases.append(phase("real time", gateway, bare, agent, results, blocks(0, n_rt), block_n, 0,
                                   args.block_s, paced=True))
                print(f"  real time: agent {cases[-1]['agent_core_share']:.1%} of a core", flush=True)
                cases.append(phase("as fast as possible", gateway, bare, agent, results, blocks(n_rt, n_burst),
                                   block_n, n_rt, args.block_s, paced=False))
                print(f"  burst: agent {cases[-1]['agent_samples_per_s']:,.0f} samples/s", flush=True)
            finally:
                gateway.disconnect()
                gateway.loop_stop()
                summary = agent.stop()
                time.sleep(0.5)  # the final metrics message
                bare.close()
                results.close()
            drift = [line for line in agent.lines if "rate_drift" in line or "quarantine" in line]
    metrics = results.metrics[-1] if results.metrics else {}
    rt = cases[0]
    result = {"benchmark": "stream_khz", "machine": common.machine(),
              "params": {"rate_hz": RATE_HZ, "channels": 3, "block_s": args.block_s, "block_samples": block_n,
                         "block_bytes": len(blocks(0, 1)[0]), "window": WINDOW, "hop": HOP,
                         "seconds": args.seconds, "burst_seconds": args.burst_seconds, "bundle": str(bundle)},
              "cases": cases, "agent_summary": summary, "agent_warnings": drift[:20],
              "agent_metrics": {k: metrics.get(k) for k in ("source_rate_hz", "rate_drift", "quarantined", "samples",
                                                             "windows")},
              "target_met": bool(rt["complete"] and rt["agent_core_share"] <= TARGET_SHARE
                                 and math.isfinite(rt["lag_ms_p99"]) and rt["lag_ms_p99"] < 1000 * args.block_s * 10)}
    print(table(result), "\n", flush=True)
    common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
