"""The hub on a three-node NATS cluster (issue 17): devices publish MQTT 3.1.1 QoS 1 to any node, hubs are
competing consumers of one durable JetStream consumer and acknowledge after their transaction commits.
Each test starts its own cluster (edgekit/cluster.py: three nats-server processes on free loopback ports, own
store directories) and stops it. Also: the hub pointed at a broker without MQTT 5 says so in one line and
exits non-zero (issue 17 acceptance 3), and the node-loss/hub-loss run with real agents on PostgreSQL
(acceptance 1)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from messagefactory import result, review
from test_hub_ingest import ROOT, wait_for
from test_hub_postgres import pg_url  # noqa: F401 - the fixture

from edgekit import topics
from edgekit.cluster import NatsCluster, installed
from edgekit.contract import messages as m
from edgekit.errors import ConfigError
from edgekit.hub.db import Batch, HubDB, Stored, results

pytestmark = pytest.mark.nats


@pytest.fixture
def nats_cluster(tmp_path: Path):
    """Three nats-server nodes (JetStream, MQTT gateway) routed to each other on free loopback ports."""
    if installed() is None:
        pytest.skip("nats-server is not installed (apt-get install nats-server)")
    pytest.importorskip("nats", reason="the JetStream intake needs nats-py (pip install 'edgekit[cluster]')")
    with NatsCluster(tmp_path / "nats") as cluster:
        yield cluster


def mqtt311(port: int, client_id: str) -> mqtt.Client:
    """A device's client: MQTT 3.1.1, as the agent's transport speaks it."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    c.max_inflight_messages_set(200)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def publish(port: int, msgs: list[tuple[str, bytes]], client_id: str = "dev-pub") -> None:
    c = mqtt311(port, client_id)
    try:
        infos = [c.publish(t, p, qos=1) for t, p in msgs]
        for info in infos:
            info.wait_for_publish(timeout=30)
            assert info.is_published()  # PUBACKed: stored in the replicated stream
    finally:
        c.disconnect()
        c.loop_stop()


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def ids_by_device(db: HubDB) -> dict[str, list[str]]:
    with db.engine.connect() as conn:
        rows = conn.execute(sa.select(results.c.id, results.c.device)).all()
    out: dict[str, list[str]] = {}
    for rid, dev in rows:
        out.setdefault(dev, []).append(rid)
    return out


class HeldDB(HubDB):
    """A hub's database whose transactions wait until `release()` is true (at most `hold_s`): the hub is busy
    with what it pulled first, as behind a slow database. It pulls no further ahead than about two batches
    meanwhile (JetStreamIngest._pull stops while a transaction's worth is queued), so the rest of the backlog
    can only go to the other hub on the same durable consumer."""

    def __init__(self, url: str, release: Callable[[], bool], hold_s: float = 20.0) -> None:
        super().__init__(url)
        self.release = release
        self.hold_s = hold_s

    def store(self, batch: Batch, now: float | None = None) -> Stored:
        deadline = time.monotonic() + self.hold_s
        while not self.release() and time.monotonic() < deadline:
            time.sleep(0.01)
        return super().store(batch, now)


def test_servers_url_and_subjects():
    from edgekit.hub.jetstream import parse_servers, subject_filter, topic_of

    s = parse_servers("nats://hub:pw@10.0.0.1,10.0.0.2:4223,nats://[::1]:4224")
    assert s.urls == ["nats://10.0.0.1:4222", "nats://10.0.0.2:4223", "nats://[::1]:4224"]
    assert (s.username, s.password, s.tls) == ("hub", "pw", False)
    assert parse_servers("tls://a:4443").tls
    for bad in ("mqtt://a:1883", "nats://a:4222,tls://b:4222", "nats://a:99999", "nats://a/path"):
        with pytest.raises(ConfigError, match="--broker"):
            parse_servers(bad)
    assert subject_filter() == "$MQTT.msgs.edgekit.v1.*.*.*"
    assert topic_of("$MQTT.msgs.edgekit.v1.lab.edge-1.result") == topics.topic("lab", "edge-1", "result")


def test_two_hubs_on_three_nodes_store_each_result_once(nats_cluster, tmp_path):
    """Devices on different nodes; batches, singles, duplicates and reviews; both hubs take part.

    Which hub pulls what is a race: on a loaded machine one hub once pulled every message before the other's
    first pull request reached the server. So each hub's writes wait until both hubs have pulled something
    (HeldDB): a hub holding its first messages pulls at most ~150 of the 477, the rest must go to the other
    hub, and from then on both pull and store side by side."""
    from edgekit.hub.jetstream import JetStreamIngest

    db_url = f"sqlite:///{tmp_path / 'hub.db'}"
    with HubDB(db_url) as db:
        db.create()

    def both_pulled() -> bool:
        return all(h.stats.messages > 0 for h in hubs)

    dbs = [HeldDB(db_url, both_pulled) for _ in range(2)]
    # ack_wait_s well past the test's length: no redelivery, so each message reaches exactly one hub once.
    hubs = [JetStreamIngest(nats_cluster.url, dbs[i], max_batch=50, ack_wait_s=120) for i in range(2)]
    sent = 0
    try:
        for h in hubs:
            h.start()
        for h in hubs:
            assert h.connected.wait(20)
        threads = []
        for d, node in enumerate(nats_cluster.nodes):
            dev = f"edge-{d}"
            res = [result(dev, s) for s in range(1, 401)]
            msgs = [(topics.topic("lab", dev, "result"), m.ResultBatch("lab", dev, res[i:i + 20]).encode())
                    for i in range(0, 300, 20)]
            msgs += [(topics.topic("lab", dev, "result"), r.encode()) for r in res[300:]]
            msgs += [(topics.topic("lab", dev, "result"), r.encode()) for r in res[:40]]  # re-sent: duplicates
            msgs += [(topics.topic("lab", dev, "review"), review(r).encode()) for r in res[:20] if r.decision == "defer"]
            sent += len(msgs)
            threads.append(threading.Thread(target=publish, args=(node.mqtt_port, msgs, f"pub-{d}")))
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        with HubDB(db_url) as db:
            def reviewed() -> int:
                return sum(c["has_review"] for c in db.cases(limit=10_000))

            # Reviews are messages of their own: another hub may still hold one when the results are in.
            wait_for(lambda: db.count() >= 1200 and reviewed() >= 12, 30, "1200 results and 12 reviews")
            time.sleep(0.5)
            assert db.count() == 1200 and db.count("defer") == 240 and reviewed() == 12
            assert {d: len(ids) for d, ids in ids_by_device(db).items()} == {f"edge-{d}": 400 for d in range(3)}
    finally:
        for h in hubs:
            h.stop(end_session=h is hubs[-1])
        for d in dbs:
            d.close()
    assert sum(h.stats.new_results for h in hubs) == 1200
    assert all(h.stats.messages > 0 for h in hubs), [h.stats for h in hubs]  # both took a share ...
    assert sum(h.stats.messages for h in hubs) == sent, [h.stats for h in hubs]  # ... of one consumer's messages


def test_the_durable_consumer_keeps_results_while_no_hub_runs_and_end_session_drops_it(nats_cluster, tmp_path):
    from edgekit.hub.jetstream import JetStreamIngest

    db = HubDB(f"sqlite:///{tmp_path / 'hub.db'}")
    first = JetStreamIngest(nats_cluster.url, db, share_group="g1")
    first.start()  # creates the durable consumer (and $MQTT_msgs: no device has connected yet)
    assert first.connected.wait(20)
    first.stop()
    sent = [(topics.topic("lab", "edge-6", "result"), result("edge-6", s).encode()) for s in range(1, 101)]
    publish(nats_cluster.nodes[2].mqtt_port, sent)
    with JetStreamIngest(nats_cluster.url, db, share_group="g1") as hub:
        wait_for(lambda: db.count() == 100, 20, "the results kept while no hub ran")
        hub.stop(end_session=True)
    publish(nats_cluster.nodes[0].mqtt_port, [(t, p) for t, p in sent[:10]])  # nobody's interest now: dropped
    with JetStreamIngest(nats_cluster.url, db, share_group="g1") as hub:
        assert hub.connected.wait(20)
        time.sleep(1.0)
        assert hub.stats.messages == 0
        hub.stop(end_session=True)
    db.close()


# --- acceptance 3: a broker without MQTT 5 ----------------------------------------------------------------

def hub_cli(broker: str, db_url: str, *extra: str, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgekit", "hub", "--broker", broker, "--db", db_url, "--http",
                           "", *extra], capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)


def test_the_hub_on_an_mqtt311_only_listener_says_so_in_one_line_and_exits_non_zero(nats_cluster, tmp_path):
    """NATS's MQTT gateway answers an MQTT 5 CONNECT with 'unacceptable protocol version' (3.1.1's code 1)."""
    t0 = time.monotonic()
    done = hub_cli(nats_cluster.nodes[0].mqtt_url, f"sqlite:///{tmp_path / 'hub.db'}")
    assert done.returncode != 0
    assert time.monotonic() - t0 < 20  # said at the first CONNACK, no retry loop
    errors = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1, done.stderr
    line = errors[0]
    assert line.startswith("error: edgekit hub --broker 127.0.0.1:")
    for words in ("MQTT 3.1.1 only", "needs MQTT 5 shared subscriptions", "edgekit hub --broker nats://",
                  "deploy/cluster/README.md"):
        assert words in line, line
    assert "Unspecified error" not in done.stderr


class Mqtt311Listener:
    """A broker's MQTT listener as RabbitMQ 3.x's plugin behaves: it closes an MQTT 5 CONNECT without a word
    and accepts MQTT 3.1.1 (CONNACK 0). A real socket server in a thread."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.levels: list[int] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = conn.recv(4096)
                # fixed header (1 byte + 1-byte remaining length: our CONNECTs are short), then
                # protocol name (2-byte length + "MQTT"), then the protocol level
                level = data[2 + 2 + 4] if len(data) > 8 else 0
                self.levels.append(level)
                if level == 4:
                    conn.sendall(b"\x20\x02\x00\x00")
                    conn.settimeout(2)
                    try:
                        conn.recv(64)  # until the probe disconnects
                    except OSError:
                        pass

    def close(self) -> None:
        self.sock.close()


def test_a_broker_that_drops_mqtt5_connects_is_asked_in_mqtt311_and_named(tmp_path):
    listener = Mqtt311Listener()
    try:
        done = hub_cli(f"mqtt://127.0.0.1:{listener.port}", f"sqlite:///{tmp_path / 'hub.db'}")
    finally:
        listener.close()
    assert done.returncode != 0
    errors = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and "MQTT 3.1.1 only" in errors[0] and "closed the MQTT 5 connection" in errors[0], \
        done.stderr
    assert 5 in listener.levels and 4 in listener.levels


# --- acceptance 1: node loss and hub loss, real agents, PostgreSQL -------------------------------------

class HubProcess:
    """`edgekit -v hub --broker nats://...` in its own process (ingest only), its log in a file."""

    def __init__(self, log: Path, broker: str, db_url: str) -> None:
        self.log = log
        with log.open("a") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "edgekit", "-v", "hub", "--broker", broker, "--db",
                                          db_url, "--http", "", "--ack-wait-s", "3"], stdout=out,
                                         stderr=subprocess.STDOUT, cwd=ROOT)

    def text(self) -> str:
        return self.log.read_text()


def stream_leader(cluster: NatsCluster) -> int:
    """Index of the node that leads $MQTT_msgs (the one whose loss forces an election)."""
    import nats

    async def ask() -> str:
        nc = await nats.connect(cluster.url.split(","))
        try:
            return (await nc.jetstream().stream_info("$MQTT_msgs")).cluster.leader
        finally:
            await nc.close()

    name = asyncio.run(ask())
    return [n.name for n in cluster.nodes].index(name)


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.postgres
def test_every_result_stored_once_when_a_node_and_a_hub_are_killed_mid_ingest(nats_cluster, stream_bundle,
                                                                                pg_url, tmp_path):  # noqa: F811
    """Issue 17 acceptance 1: three nodes, two hubs, three agents each on its own node, PostgreSQL. Mid-ingest
    the stream's leader node is SIGKILLed and started again, then a hub is SIGKILLed and started again: every
    result each agent made is stored exactly once."""
    from streamfactory import recording, write_csv

    rec = write_csv(tmp_path / "rec.csv", recording(1000.0, 100.0))
    with HubDB(pg_url) as db:
        db.create()
    hubs = [HubProcess(tmp_path / f"hub{i}.log", nats_cluster.url, pg_url) for i in range(2)]
    agents: list[subprocess.Popen[str]] = []
    try:
        for h in hubs:
            wait_for(lambda h=h: "hub.connected" in h.text(), 30, "a hub's durable consumer")
        for i, node in enumerate(nats_cluster.nodes):
            agents.append(subprocess.Popen(
                [sys.executable, "-m", "edgekit", "run", "--bundle", str(stream_bundle), "--source", f"replay:{rec}",
                 "--speed", "8", "--broker", node.mqtt_url, "--outbox", str(tmp_path / f"o{i}.db"),
                 "--device-id", f"pump-{i}", "--site", "plant", "--drain-timeout", "60", "--allow-unsigned"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT))
        with HubDB(pg_url) as db:
            wait_for(lambda: len(ids_by_device(db)) == 3 and db.count() > 150, 30, "every agent's results coming")
            leader = stream_leader(nats_cluster)
            nats_cluster.kill(leader)
            time.sleep(3)
            nats_cluster.start_node(leader)
            at_kill = db.count()
            wait_for(lambda: db.count() > at_kill + 150, 40, "ingest going on after the node came back")
            os.kill(hubs[0].proc.pid, signal.SIGKILL)
            hubs[0].proc.wait(10)
            at_hub_kill = db.count()
        time.sleep(1)
        hubs[0] = HubProcess(tmp_path / "hub0-again.log", nats_cluster.url, pg_url)
        made = {}
        for i, a in enumerate(agents):
            out, err = a.communicate(timeout=180)
            assert a.returncode == 0, err[-3000:]
            summary = dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
            assert summary["queued"] == "0", out  # everything PUBACKed
            made[f"pump-{i}"] = (int(summary["windows"]), int(summary["deferred"]))
            if i == leader:  # its node died under it: it reconnected and re-sent what had no PUBACK
                assert "transport.disconnected" in err, err[-3000:]
        total = sum(w for w, _ in made.values())
        assert at_kill < at_hub_kill < total  # both losses happened mid-ingest
        with HubDB(pg_url) as db:
            wait_for(lambda: db.count() >= total, 60, f"{total} results")
            time.sleep(4)  # ack_wait_s (3) past: a redelivery would have arrived by now
            ids = ids_by_device(db)
            assert db.count() == total
            for dev, (windows, deferred) in made.items():
                assert Counter(ids[dev]) == Counter(topics.result_id(dev, s) for s in range(1, windows + 1))
                assert len(db.cases(limit=100_000, device=dev)) == deferred
            assert sum(deferred for _, deferred in made.values()) > 0
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
        for h in hubs:
            if h.proc.poll() is None:
                h.proc.terminate()
                h.proc.wait(30)
    assert all(h.proc.returncode == 0 for h in hubs), [h.text()[-2000:] for h in hubs]


def test_accounts_as_the_deploy_note_sets_them_on_a_lone_server(tmp_path):
    """deploy/cluster/README.md's permissions on one nats-server (the hub creates an R1 stream there): the hub's
    account consumes, a device's own results are stored, its writes to another device's topic are not, and its
    command subscription is granted."""
    from edgekit.broker import free_port
    from edgekit.hub.jetstream import JetStreamIngest
    from edgekit.mqtt import MqttSecurity

    if installed() is None:
        pytest.skip("nats-server is not installed (apt-get install nats-server)")
    pytest.importorskip("nats", reason="the JetStream intake needs nats-py (pip install 'edgekit[cluster]')")
    client_port, mqtt_port = free_port(), free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(f"""server_name: lone
listen: 127.0.0.1:{client_port}
jetstream {{ store_dir: "{tmp_path / 'js'}" }}
mqtt {{ listen: 127.0.0.1:{mqtt_port} }}
authorization {{ users: [
  {{ user: hub, password: hubpw, permissions: {{ publish: ["$JS.API.>", "$JS.ACK.>"], subscribe: ["_INBOX.>"] }} }}
  {{ user: pump7, password: p7pw, permissions: {{ publish: ["edgekit.v1.plant1.pump7.*"],
     subscribe: ["edgekit.v1.plant1.pump7.command.*", "$MQTT.sub.>"] }} }}
] }}
""")
    (tmp_path / "hub.pw").write_text("hubpw\n")
    server = subprocess.Popen([installed(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = HubDB(f"sqlite:///{tmp_path / 'hub.db'}")
    try:
        wait_for(lambda: listening(mqtt_port), 10, "the server")
        security = MqttSecurity(username="hub", password_file=tmp_path / "hub.pw")
        with JetStreamIngest(f"nats://127.0.0.1:{client_port}", db, security=security) as hub:
            assert hub.connected.wait(20)  # before any device: the hub made $MQTT_msgs (R1 on a lone server)
            granted: list[str] = []
            dev = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pump7", protocol=mqtt.MQTTv311)
            dev.username_pw_set("pump7", "p7pw")
            dev.on_subscribe = lambda _c, _u, _mid, codes, _p: granted.extend(str(c) for c in codes)
            dev.connect("127.0.0.1", mqtt_port)
            dev.loop_start()
            try:
                dev.subscribe(topics.command("plant1", "pump7", "+"), qos=1)
                sent = [dev.publish(topics.topic("plant1", dev_id, "result"),
                                    result(dev_id, s, site="plant1").encode(), qos=1)
                        for dev_id in ("pump7", "pump8") for s in range(1, 6)]
                for info in sent:
                    info.wait_for_publish(timeout=10)
                wait_for(lambda: db.count() >= 5, 10, "pump7's results")
                time.sleep(0.5)
            finally:
                dev.disconnect()
                dev.loop_stop()
            assert set(ids_by_device(db)) == {"pump7"} and db.count() == 5
            assert granted == ["Granted QoS 1"]
            hub.stop(end_session=True)
    finally:
        db.close()
        server.terminate()
        server.wait(10)
