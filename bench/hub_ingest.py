"""Benchmark 5: hub ingest rate with one and two consumer processes on one MQTT v5 shared subscription.

    python bench/hub_ingest.py [--results 20000] [--db sqlite postgres] [--json out/hub_ingest.json]

Per database and per message shape (1 result per message; 100 results per batch message, as the agent's
batched transport sends), for 1 and then 2 consumers (bench/hub_consumer.py, each its own process, named
sessions on the shared subscription "$share/bench-K/edgekit/v1/+/+/+"):
  1. the consumers connect and subscribe, then disconnect (their sessions stay at the broker);
  2. a publisher sends every message at QoS 1 (all PUBACKed): the broker queues them for the sessions;
  3. the consumers start again (imports done, then connect together on "go");
     rate = results / ("go" -> all rows in the DB).
So the publisher and the consumers never compete for the 2 cores, and the clock measures ingest alone
(broker -> paho -> decode -> one transaction per batch -> manual PUBACK). Target: 2 consumers >= 1.6x one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

from edgekit import topics  # noqa: E402
from edgekit.broker import Mosquitto  # noqa: E402
from edgekit.contract import messages as m  # noqa: E402

HERE = Path(__file__).resolve().parent
PG_DSN = {"host": "127.0.0.1", "port": 5432, "dbname": "test"}


def result_payload(device: str, seq: int) -> bytes:
    """A SKAB agent's result, encoded by the contract the agent uses; every 5th one deferred."""
    defer = seq % 5 == 0
    p = 0.45 if defer else 0.92
    return m.Result(
        id=topics.result_id(device, seq), seq=seq, site="bench", device=device, ts=1_700_000_000.0 + seq,
        start_s=seq * 4.0, end_s=seq * 4.0 + 31, model_version="skab@bench", task="skab", label="normal",
        confidence=p, probs={"normal": p, "anomaly": 1 - p}, decision="defer" if defer else "accept",
        reasons=["low_confidence"] if defer else [], scores={"confidence": p, "ood": 0.3, "disagreement": 0.05},
        thresholds={"ood_max_score": 0.73, "min_confidence": 0.76, "max_disagreement": 0.24},
        second_opinion=m.SecondOpinion("normal", {"normal": 0.9, "anomaly": 0.1})).encode()


def messages(n_results: int, per_message: int, devices: int = 4) -> list[tuple[str, bytes]]:
    out = []
    seq = 0
    while seq < n_results:
        dev = f"dev{(seq // per_message) % devices}"
        k = min(per_message, n_results - seq)
        body = [result_payload(dev, s) for s in range(seq, seq + k)]
        payload = body[0] if per_message == 1 else m.ResultBatch.encoded("bench", dev, body)
        out.append((topics.topic("bench", dev, "result"), payload))
        seq += k
    return out


def publish(port: int, msgs: list[tuple[str, bytes]]) -> float:
    import threading

    import paho.mqtt.client as mqtt

    window = threading.Semaphore(200)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{uuid.uuid4().hex[:6]}",
                    protocol=mqtt.MQTTv5)
    c.on_publish = lambda *_a: window.release()
    c.connect("127.0.0.1", port)
    c.loop_start()
    t0 = time.perf_counter()
    try:
        for t, p in msgs:
            window.acquire()
            c.publish(t, p, qos=1)
        for _ in range(200):
            window.acquire()
    finally:
        c.disconnect()
        c.loop_stop()
    return time.perf_counter() - t0


class Consumers:
    def __init__(self, db_url: str, broker_url: str, ids: list[str], group: str) -> None:
        self.args = (db_url, broker_url, group)
        self.ids = ids
        self.procs: list[subprocess.Popen[str]] = []

    def start(self) -> tuple[float, list[float]]:
        """Spawn, wait until every consumer has imported everything, then let them connect at once.
        Returns the time of "go" and each consumer's connected time."""
        db_url, broker_url, group = self.args
        self.procs = [subprocess.Popen([common.PYTHON, str(HERE / "hub_consumer.py"), db_url, broker_url, cid,
                                        group], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                       cwd=common.ROOT) for cid in self.ids]
        for p in self.procs:
            self._line(p)  # "loaded"
        t_go = time.time()
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        return t_go, [self._line(p)["connected_at"] for p in self.procs]

    @staticmethod
    def _line(p: subprocess.Popen[str]) -> dict[str, Any]:
        line = p.stdout.readline() if p.stdout else ""
        if not line:
            raise RuntimeError(f"hub consumer exited early ({p.wait()})")
        return json.loads(line)

    def stop(self, end_session: bool = False) -> list[dict[str, Any]]:
        """Stop the consumers; `end_session` also drops their broker sessions (the case is over)."""
        stats = []
        for p in self.procs:
            assert p.stdin is not None and p.stdout is not None
            p.stdin.write("end\n" if end_session else "stop\n")
            p.stdin.flush()
        for p in self.procs:
            assert p.stdout is not None
            out, _ = p.communicate(timeout=60)
            stats.append(json.loads(out.strip().splitlines()[-1]))
        self.procs = []
        return stats


def proc_cpu_s(pid: int) -> float:
    """user + system CPU seconds of a process, from /proc (the broker's)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_case(db_url: str, broker: Mosquitto, n_consumers: int, per_message: int, n_results: int) -> dict[str, Any]:
    from edgekit.hub.db import HubDB

    with HubDB(db_url) as db:
        db.create()
    group = f"bench-{uuid.uuid4().hex[:6]}"
    ids = [f"{group}-c{i}" for i in range(n_consumers)]
    cons = Consumers(db_url, broker.url, ids, group)
    cons.start()  # sessions and subscriptions exist from here on
    cons.stop()
    msgs = messages(n_results, per_message)
    pub_s = publish(broker.port, msgs)
    poll = HubDB(db_url)  # one connection for polling: opening one per poll cost a core's worth of CPU
    before = poll.count()
    assert broker.proc is not None
    broker_cpu0 = proc_cpu_s(broker.proc.pid)
    t_go, ready = cons.start()
    deadline = time.monotonic() + 600
    while True:
        got = poll.count() - before
        if got >= n_results:
            t_done = time.time()
            break
        if time.monotonic() > deadline:
            t_done = time.time()
            break
        time.sleep(0.05)
    poll.close()
    broker_cpu = proc_cpu_s(broker.proc.pid) - broker_cpu0
    stats = cons.stop(end_session=True)
    secs = t_done - t_go
    return {"consumers": n_consumers, "results_per_message": per_message, "results": n_results,
            "messages": len(msgs), "stored": got, "publish_s": pub_s, "go_to_connected_s": [t - t_go for t in ready],
            "ingest_s": secs, "results_per_s": got / secs, "broker_cpu_s": broker_cpu,
            "consumers_cpu_s": sum(c["cpu_s"] for c in stats), "per_consumer": stats}


def pg_url() -> tuple[str, str] | None:
    try:
        import psycopg
    except ImportError:
        return None
    for user in ("postgres", "root"):
        try:
            schema = f"edgekit_bench_{uuid.uuid4().hex[:10]}"
            with psycopg.connect(**PG_DSN, user=user, connect_timeout=3, autocommit=True) as conn:
                conn.execute(f'CREATE SCHEMA "{schema}"')
            return f"postgresql://{user}@127.0.0.1:5432/test?options=-csearch_path%3D{schema}", schema
        except psycopg.Error:
            continue
    return None


def drop_pg(url: str, schema: str) -> None:
    import psycopg

    user = url.split("//", 1)[1].split("@", 1)[0]
    with psycopg.connect(**PG_DSN, user=user, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def table(result: dict[str, Any]) -> str:
    lines = ["== hub ingest: consumers in their own processes, messages queued at the broker first",
             f"{'db':<10}{'results/msg':>12}{'consumers':>10}{'msgs':>7}{'results':>8}{'ingest_s':>10}"
             f"{'results/s':>11}{'scaling':>9}{'cpu_s hubs':>11}{'cpu_s broker':>13}",
             "(cpu_s: CPU seconds used while ingesting, by the hub processes together and by mosquitto; the "
             "machine has 2 cores)"]
    for c in result["cases"]:
        sc = f"{c['scaling']:.2f}x" if "scaling" in c else ""
        lines.append(f"{c['db']:<10}{c['results_per_message']:>12}{c['consumers']:>10}{c['messages']:>7}"
                     f"{c['results']:>8}{c['ingest_s']:>10.2f}{c['results_per_s']:>11.0f}{sc:>9}"
                     f"{c['consumers_cpu_s']:>11.2f}{c['broker_cpu_s']:>13.2f}")
    for c in result["cases"]:
        if "scaling" in c:
            lines.append(f"{c['db']}, {c['results_per_message']} result(s)/message: 2 consumers / 1 = "
                         f"{c['scaling']:.2f}x, target >= 1.6x: {common.verdict(c['scaling'] >= 1.6)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=int, default=20000, help="results per case, 1 result per message")
    ap.add_argument("--batch-results", type=int, default=100000, help="results per case in batch messages")
    ap.add_argument("--db", nargs="+", default=["sqlite", "postgres"], choices=["sqlite", "postgres"])
    ap.add_argument("--per-message", nargs="+", type=int, default=[1, 100])
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    common.setup_logging()
    cases = []
    with tempfile.TemporaryDirectory(prefix="bench-hub-") as tmp_s:
        tmp = Path(tmp_s)
        with Mosquitto(tmp / "broker") as broker:
            for db in args.db:
                for per in args.per_message:
                    one = None
                    for n in (1, 2):
                        schema = None
                        if db == "sqlite":
                            url = f"sqlite:///{tmp}/hub-{per}-{n}.db"
                        else:
                            got = pg_url()
                            if got is None:
                                print("  postgres: no server at 127.0.0.1:5432 database test; skipped")
                                break
                            url, schema = got
                        try:
                            c = run_case(url, broker, n, per, args.results if per == 1 else args.batch_results)
                        finally:
                            if schema:
                                drop_pg(url, schema)
                        c["db"] = db
                        if n == 1:
                            one = c
                        elif one:
                            c["scaling"] = c["results_per_s"] / one["results_per_s"]
                        cases.append(c)
                        print(f"  {db} {per}/msg {n} consumer(s): {c['results_per_s']:.0f} results/s "
                              f"({c['stored']}/{c['results']} stored)", flush=True)
    result = {"benchmark": "hub_ingest", "machine": common.machine(), "cases": cases}
    print(table(result), "\n", flush=True)
    common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
