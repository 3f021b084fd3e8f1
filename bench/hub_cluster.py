"""Benchmark 7: hub ingest on a three-node NATS JetStream cluster beside the single-mosquitto path, in one run.

    python bench/hub_cluster.py [--results 20000] [--batch-results 100000] [--db postgres] [--json out.json]

For each intake (mosquitto: one MQTT v5 shared subscription; NATS: three nats-server nodes on loopback,
edgekit/cluster.py, the hub a JetStream durable consumer of the MQTT gateway's R3 stream), each message shape
(1 result per message; 100 per batch message, as the agent's batched transport sends) and 1 then 2 hub
processes (bench/hub_consumer.py, the intake `edgekit hub` builds):
  1. the hubs connect (mosquitto: named sessions; NATS: the durable consumer), then stop;
  2. three devices' connections publish every message at QoS 1, all PUBACKed (mosquitto: MQTT 5; NATS: MQTT
     3.1.1, one connection per node, where a PUBACK means stored on a majority of the stream's replicas);
  3. the hubs start together on "go"; rate = results / ("go" -> all rows in the database).
CPU seconds per process (utime + stime from /proc, or the hub's own rusage) for each phase: the hubs, each
broker process. The publish rate and the brokers' CPU in step 2 are the intake's cost; step 3 is the hub's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
from hub_ingest import Consumers, drop_pg, messages, pg_url, proc_cpu_s  # noqa: E402

from edgekit.broker import Mosquitto  # noqa: E402
from edgekit.cluster import NatsCluster  # noqa: E402

INFLIGHT = 200  # per publishing connection, as the agent's transport (mqtt.max_inflight)


def publish(ports: list[int], msgs: list[tuple[str, bytes]], version: str) -> float:
    """Every message at QoS 1, split round-robin over one connection per port; seconds until all PUBACKed."""
    import paho.mqtt.client as mqtt

    def one(port: int, part: list[tuple[str, bytes]]) -> None:
        window = threading.Semaphore(INFLIGHT)
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{uuid.uuid4().hex[:6]}",
                        protocol=mqtt.MQTTv5 if version == "5" else mqtt.MQTTv311)
        c.max_inflight_messages_set(INFLIGHT)
        c.on_publish = lambda *_a: window.release()
        c.connect("127.0.0.1", port)
        c.loop_start()
        try:
            for t, p in part:
                window.acquire()
                c.publish(t, p, qos=1)
            for _ in range(INFLIGHT):
                window.acquire()
        finally:
            c.disconnect()
            c.loop_stop()

    parts = [msgs[i::len(ports)] for i in range(len(ports))]
    threads = [threading.Thread(target=one, args=(port, part)) for port, part in zip(ports, parts)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


class Brokers:
    """The broker processes of one intake, for CPU accounting: name -> pid."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def cpu(self) -> dict[str, float]:
        return {name: proc_cpu_s(pid) for name, pid in self.pids.items()}


def run_case(intake: str, url: str, ports: list[int], version: str, brokers: Brokers, db_url: str,
             n_hubs: int, per_message: int, n_results: int) -> dict[str, Any]:
    from edgekit.hub.db import HubDB

    with HubDB(db_url) as db:
        db.create()
    group = f"bench-{uuid.uuid4().hex[:6]}"
    cons = Consumers(db_url, url, [f"{group}-h{i}" for i in range(n_hubs)], group)
    cons.start()  # sessions / the durable consumer exist from here on
    cons.stop()
    msgs = messages(n_results, per_message)
    cpu0 = brokers.cpu()
    pub_s = publish(ports, msgs, version)
    cpu1 = brokers.cpu()
    poll = HubDB(db_url)
    before = poll.count()
    t_go, _ready = cons.start()
    deadline = time.monotonic() + 600
    got = 0
    while time.monotonic() < deadline:
        got = poll.count() - before
        if got >= n_results:
            break
        time.sleep(0.05)
    t_done = time.time()
    poll.close()
    cpu2 = brokers.cpu()
    stats = cons.stop(end_session=True)
    secs = t_done - t_go
    return {"intake": intake, "hubs": n_hubs, "results_per_message": per_message, "results": n_results,
            "messages": len(msgs), "stored": got, "publish_s": pub_s, "publish_msgs_per_s": len(msgs) / pub_s,
            "broker_cpu_publish_s": {k: cpu1[k] - cpu0[k] for k in cpu0},
            "ingest_s": secs, "results_per_s": got / secs,
            "broker_cpu_ingest_s": {k: cpu2[k] - cpu1[k] for k in cpu1},
            "hub_cpu_s": [c["cpu_s"] for c in stats], "per_hub": stats}


def table(result: dict[str, Any]) -> str:
    lines = ["== hub ingest: single mosquitto (MQTT 5 shared subscription) vs 3-node NATS JetStream cluster "
             "(durable consumer on the MQTT gateway's R3 stream); messages queued at the broker first",
             f"{'intake':<9}{'res/msg':>8}{'hubs':>5}{'msgs':>7}{'results':>8}{'pub msg/s':>10}"
             f"{'broker cpu pub':>22}{'ingest_s':>9}{'results/s':>10}{'scaling':>8}{'hub cpu_s':>13}"
             f"{'broker cpu ingest':>22}",
             f"(pub msg/s: devices' QoS 1 publishes until all PUBACKed, {INFLIGHT} in flight per connection; "
             "cpu: CPU seconds per process in that phase, brokers n1/n2/n3 for NATS; the machine has "
             f"{result['machine']['cores']} cores)"]
    for c in result["cases"]:
        sc = f"{c['scaling']:.2f}x" if "scaling" in c else ""
        pub = "/".join(f"{v:.2f}" for v in c["broker_cpu_publish_s"].values())
        ing = "/".join(f"{v:.2f}" for v in c["broker_cpu_ingest_s"].values())
        hubs = "+".join(f"{v:.2f}" for v in c["hub_cpu_s"])
        lines.append(f"{c['intake']:<9}{c['results_per_message']:>8}{c['hubs']:>5}{c['messages']:>7}"
                     f"{c['results']:>8}{c['publish_msgs_per_s']:>10.0f}{pub:>22}{c['ingest_s']:>9.2f}"
                     f"{c['results_per_s']:>10.0f}{sc:>8}{hubs:>13}{ing:>22}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=int, default=20000, help="results per case, 1 result per message")
    ap.add_argument("--batch-results", type=int, default=100000, help="results per case in batch messages")
    ap.add_argument("--db", default="postgres", choices=["sqlite", "postgres"],
                    help="the hub's store (postgres: 127.0.0.1:5432 database test; sqlite when absent)")
    ap.add_argument("--per-message", nargs="+", type=int, default=[1, 100])
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    common.setup_logging()
    cases = []
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp_s:
        tmp = Path(tmp_s)
        with Mosquitto(tmp / "mosquitto") as mosq, NatsCluster(tmp / "nats") as nats:
            assert mosq.proc is not None
            for n in nats.nodes:  # each node's first MQTT client sets up the gateway's session state: not timed
                publish([n.mqtt_port], [("bench/warmup", b"x")] * 10, "3.1.1")
            intakes = [("mosquitto", mosq.url, [mosq.port] * 3, "5", Brokers({"mosquitto": mosq.proc.pid})),
                       ("nats-js", nats.url, [n.mqtt_port for n in nats.nodes], "3.1.1",
                        Brokers({n.name: nats.pid(i) for i, n in enumerate(nats.nodes)}))]  # type: ignore[misc]
            for per in args.per_message:
                for intake, url, ports, version, brokers in intakes:
                    one = None
                    for n in (1, 2):
                        schema = None
                        got = pg_url() if args.db == "postgres" else None
                        if got is not None:
                            db_url, schema = got
                        else:
                            db_url = f"sqlite:///{tmp}/hub-{intake}-{per}-{n}.db"
                        try:
                            c = run_case(intake, url, ports, version, brokers, db_url, n, per,
                                         args.results if per == 1 else args.batch_results)
                        finally:
                            if schema:
                                drop_pg(db_url, schema)
                        c["db"] = "postgres" if schema else "sqlite"
                        if n == 1:
                            one = c
                        elif one:
                            c["scaling"] = c["results_per_s"] / one["results_per_s"]
                        cases.append(c)
                        print(f"  {intake} {per}/msg {n} hub(s): publish {c['publish_msgs_per_s']:.0f} msg/s, "
                              f"ingest {c['results_per_s']:.0f} results/s ({c['stored']}/{c['results']} stored, "
                              f"{c['db']})", flush=True)
    result = {"benchmark": "hub_cluster", "machine": common.machine(), "cases": cases}
    print(table(result), "\n", flush=True)
    common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
