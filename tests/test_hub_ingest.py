"""Hub ingest against a real mosquitto: idempotent by result id across duplicates, batches, replayed
resends after a broker outage, review/result merging, gait trial summaries stored once, bad payloads, and two
hubs on one shared subscription."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from messagefactory import result, review, trial

from edgekit import topics
from edgekit.contract import messages as m
from edgekit.hub import run_hub
from edgekit.hub.db import HubDB, results
from edgekit.hub.ingest import to_batch

ROOT = Path(__file__).resolve().parent.parent
def publisher(url_port: int, client_id: str = "test-pub") -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", url_port)
    c.loop_start()
    return c


def publish_all(client: mqtt.Client, msgs: list[tuple[str, bytes]]) -> None:
    infos = [client.publish(t, p, qos=1) for t, p in msgs]
    for info in infos:
        info.wait_for_publish(timeout=20)
        assert info.is_published()


def wait_for(check: Callable[[], bool], timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def settled(db: HubDB, expected: int, timeout_s: float = 20.0) -> None:
    """Wait until `expected` rows exist and nothing more arrives for a moment."""
    wait_for(lambda: db.count() >= expected, timeout_s, f"{expected} results")
    time.sleep(0.5)


class HubThread:
    """run_hub in a thread (ingest only), stopped by its event."""

    def __init__(self, broker_url: str, db_url: str, **kw: Any) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=run_hub, args=(broker_url, db_url),
                                       kwargs={"http": None, "stop": self.stop, **kw}, daemon=True)

    def __enter__(self) -> HubThread:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


def hub_listening(db_url: str, port: int, timeout_s: float = 20.0) -> None:
    """Publish probe status messages until the hub stores one: it is connected and subscribed."""
    pub = publisher(port, f"probe-{time.monotonic_ns()}")
    try:
        with HubDB(db_url) as db:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                ts = time.time()
                probe = m.Status("probe", "probe", "online", ts).encode()
                publish_all(pub, [(topics.topic("probe", "probe", "status"), probe)])
                t_end = time.monotonic() + 0.5
                while time.monotonic() < t_end:
                    try:
                        if any(d["device"] == "probe" and d["status_ts"] == ts for d in db.fleet()):
                            return
                    except sa.exc.OperationalError:  # tables not created yet
                        pass
                    time.sleep(0.05)
        raise AssertionError("hub did not store a probe message")
    finally:
        pub.disconnect()
        pub.loop_stop()


def rows_by_id(db: HubDB) -> dict[str, dict[str, Any]]:
    with db.engine.connect() as conn:
        return {r.id: dict(r._mapping) for r in conn.execute(sa.select(results))}


@pytest.mark.broker
def test_each_result_stored_once_across_duplicates_batches_and_replayed_resends(mosquitto, tmp_path):
    db_url = f"sqlite:///{tmp_path / 'hub.db'}"
    res = [result("edge-1", s) for s in range(1, 61)]
    deferred = [r for r in res if r.decision == "defer"]
    singles = [(topics.topic("lab", "edge-1", "result"), r.encode()) for r in res[:30]]
    batched = [(topics.topic("lab", "edge-1", "result"),
                m.ResultBatch("lab", "edge-1", res[30 + i:40 + i]).encode()) for i in (0, 10, 20)]
    reviews = [(topics.topic("lab", "edge-1", "review"), review(r).encode()) for r in deferred]
    with HubThread(mosquitto.url, db_url, client_id="hub-a"), HubDB(db_url) as db:
        hub_listening(db_url, mosquitto.port)
        pub = publisher(mosquitto.port)
        # Reviews of the first half arrive before their results, the rest after: both orders merge.
        publish_all(pub, reviews[:6] + singles + batched + reviews[6:])
        publish_all(pub, singles[:5] + batched[:1] + reviews[:2])  # plain duplicates
        settled(db, 60)
        pub.disconnect()
        pub.loop_stop()

        # Outage: the broker goes away; the agent then re-sends what it had not seen acknowledged.
        mosquitto.stop()
        time.sleep(0.5)
        mosquitto.start()
        # mosquitto 2.0.11 keeps a persistent session over a restart but not its *shared* subscription:
        # results published before the hub re-subscribes are not queued for it. Wait for it here.
        hub_listening(db_url, mosquitto.port)
        pub = publisher(mosquitto.port, "test-pub-2")
        resend = [(t, topics.mark_replayed(p)) for t, p in singles[20:] + batched + reviews]
        new = [result("edge-1", s) for s in range(61, 71)]
        resend.append((topics.topic("lab", "edge-1", "result"),
                       m.ResultBatch("lab", "edge-1", new, replayed=True).encode()))
        resend += [(topics.topic("lab", "edge-1", "review"), topics.mark_replayed(review(r).encode()))
                   for r in new if r.decision == "defer"]
        publish_all(pub, resend)
        settled(db, 70, timeout_s=40)
        pub.disconnect()
        pub.loop_stop()

        rows = rows_by_id(db)
        assert sorted(rows) == sorted(topics.result_id("edge-1", s) for s in range(1, 71))
        with db.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(results)).scalar_one() == 70
        defer_ids = {r["id"] for r in rows.values() if r["decision"] == "defer"}
        assert defer_ids == {topics.result_id("edge-1", s) for s in range(5, 71, 5)}
        # Every deferred case has its review merged into the result row, whichever came first.
        assert all(rows[i]["features"] and rows[i]["signal"] for i in defer_ids)
        assert all(rows[i]["features"] is None for i in rows if i not in defer_ids)
        # The results first stored from a replayed resend say so; the others do not.
        assert all(rows[topics.result_id("edge-1", s)]["replayed"] for s in range(61, 71))
        assert not rows[topics.result_id("edge-1", 1)]["replayed"]
        case = db.case(topics.result_id("edge-1", 5))
        assert case["reasons"] == ["low_confidence", "disagreement"]
        assert case["second_opinion"]["label"] == "turn"
        assert case["signal"]["channels"] == ["acc_x", "acc_y", "gyro_z"]
        assert len(case["signal"]["points"][0]) == 128


@pytest.mark.broker
def test_bad_payloads_are_logged_and_ingest_goes_on(mosquitto, tmp_path, caplog):
    db_url = f"sqlite:///{tmp_path / 'hub.db'}"
    good = result("edge-2", 1, defer=False)
    no_id = {k: v for k, v in result("edge-2", 2).to_obj().items() if k != "id"}
    bad_batch = {**topics.decode(m.ResultBatch("lab", "edge-2", [good]).encode(), "test"), "results": "nope"}
    t = topics.topic("lab", "edge-2", "result")
    msgs = [(t, b"not json"), (t, topics.encode({**good.to_obj(), "schema": "edgekit.nothing/9"})),
            (t, topics.encode(no_id)), (t, topics.encode(bad_batch)),
            (t, topics.encode({**good.to_obj(), "ts": "yesterday"})),
            (topics.topic("lab", "edge-2", "review"), good.encode()),  # a result (no features) as a review
            ("edgekit/v1/lab/edge-2/result/extra", good.encode()), (t, good.encode())]
    caplog.set_level(logging.WARNING, logger="edgekit.hub")
    with HubThread(mosquitto.url, db_url), HubDB(db_url) as db:
        hub_listening(db_url, mosquitto.port)
        pub = publisher(mosquitto.port)
        publish_all(pub, msgs)
        settled(db, 1)
        pub.disconnect()
        pub.loop_stop()
        assert list(rows_by_id(db)) == [good.id]
    bad = [r.getMessage() for r in caplog.records if r.getMessage().startswith("hub.bad_payload")]
    assert len(bad) == 5, bad
    assert all("topic=edgekit/v1/lab/edge-2/re" in b and "reason=" in b for b in bad)
    assert any("not JSON" in b for b in bad)
    # A result without an id has no identity: rejected (tests/test_hub_identity.py), not a bad payload.
    [rejected] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("hub.rejected")]
    assert rejected.startswith(f"hub.rejected topic={t} reason=id must be")


@pytest.mark.broker
def test_each_trial_stored_once_across_duplicates_and_replayed_resends(mosquitto, tmp_path):
    db_url = f"sqlite:///{tmp_path / 'hub.db'}"
    t = topics.topic("lab", "edge-1", "trial")
    walked, still = trial("edge-1", 41), trial("edge-1", 83, walk=False)
    refused = trial("edge-1", 90, error="a trial needs at least 4 s of samples (got 1.2 s)")
    msgs = [(t, p.encode()) for p in (walked, still, refused)]
    with HubThread(mosquitto.url, db_url, client_id="hub-t"), HubDB(db_url) as db:
        hub_listening(db_url, mosquitto.port)
        pub = publisher(mosquitto.port)
        # Duplicates in one batch, then plain and replayed redeliveries: three trials, each stored once.
        publish_all(pub, msgs + msgs[:1])
        publish_all(pub, msgs + [(tp, topics.mark_replayed(p)) for tp, p in msgs])
        wait_for(lambda: db.count_trials() >= 3, what="3 trials")
        time.sleep(0.5)
        pub.disconnect()
        pub.loop_stop()
        assert db.count_trials() == 3 and db.count() == 0  # trials are not results
        rows = db.trials()
        assert [r["id"] for r in rows] == [refused.id, still.id, walked.id]  # newest first
        by_id = {r["id"]: r for r in rows}
        assert {(r["site"], r["device"]) for r in rows} == {("lab", "edge-1")}
        assert by_id[walked.id]["ts"] == walked.ts
        assert by_id[walked.id]["summary"]["phase_s"] == walked.phase_s
        assert by_id[walked.id]["summary"]["steps"] == 18
        assert by_id[still.id]["summary"]["reason"].startswith("no walk")
        assert by_id[refused.id]["summary"]["error"].startswith("a trial needs")
        assert "edge-1" in {d["device"] for d in db.fleet()}  # a trial counts as hearing from the device


def test_a_redelivered_trial_stores_nothing_new_and_a_bad_one_is_refused(tmp_path, caplog):
    from edgekit.hub.ingest import IngestStats

    t = topics.topic("lab", "edge-5", "trial")
    payload = trial("edge-5", 7).encode()
    with HubDB(f"sqlite:///{tmp_path / 'hub.db'}") as db:
        db.create()
        assert db.store(to_batch([(t, payload), (t, payload)], 1.0)).new_trials == 1
        assert db.store(to_batch([(t, topics.mark_replayed(payload))], 2.0)).new_trials == 0
        [row] = db.trials()
        assert row["received_at"] == 1.0 and not row["summary"].get("replayed")  # the first copy is kept
        stats = IngestStats()
        caplog.set_level(logging.WARNING, logger="edgekit.hub")
        bad = [{**trial("edge-5", 8).to_obj(), "steps": "many"}, {**trial("edge-5", 9).to_obj(), "ts": None},
               {k: v for k, v in trial("edge-5", 10).to_obj().items() if k != "id"}]
        batch = to_batch([(t, topics.encode(p)) for p in bad], 3.0, stats)
        assert not batch.trials and stats.bad == 2 and stats.rejected == 1 and stats.trials == 0
        assert db.count_trials() == 1


def test_status_in_arrival_order_and_metrics_update_the_fleet(tmp_path):
    with HubDB(f"sqlite:///{tmp_path / 'hub.db'}") as db:
        db.create()
        st = topics.topic("lab", "edge-3", "status")
        online = m.Status("lab", "edge-3", "online", 100.0, model_version="m@1", queued=4, dropped=0).encode()
        # The last will was registered at connect (ts 90), before "online" (ts 100), and arrives later.
        will = m.Status("lab", "edge-3", "offline", 90.0, model_version="m@1").encode()
        metrics = m.Metrics("lab", "edge-3", 120.0, queued=7, dropped=3, counters={
            "windows": 10, "accepted": 8, "deferred": 2, "quarantined": 0, "quarantine_reasons": {},
            "published": 10, "replayed_results": 0}).encode()
        db.store(to_batch([(st, will), (st, online)], 1.0))
        assert db.fleet()[0]["state"] == "online"
        db.store(to_batch([(st, online), (st, will)], 2.0))
        assert db.fleet()[0]["state"] == "offline"
        db.store(to_batch([(st, online)], 2.5))
        db.store(to_batch([(topics.topic("lab", "edge-3", "metrics"), metrics)], 3.0))
        [dev] = db.fleet()
        # Last seen: when the hub last heard from it (3.0), not the device's clock.
        assert (dev["state"], dev["model_version"], dev["last_seen"]) == ("online", "m@1", 3.0)
        assert (dev["queued"], dev["dropped"], dev["metrics"]["windows"]) == (7, 3, 10)
        db.store(to_batch([(st, m.Status("lab", "edge-3", "offline", 130.0).encode())], 4.0))
        assert db.fleet()[0]["state"] == "offline"
        # A retained status (the broker's old copy, delivered on subscribe) counts from its own ts.
        retained = m.Status("lab", "edge-4", "offline", 50.0).encode()
        db.store(to_batch([(topics.topic("lab", "edge-4", "status"), retained, True)], 5.0))
        assert {d["device"]: d["last_seen"] for d in db.fleet()} == {"edge-3": 4.0, "edge-4": 50.0}


HUB_PROCESS = """
import logging, signal, sys, threading
from edgekit.hub import run_hub
logging.basicConfig(level=logging.INFO)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
run_hub(sys.argv[1], sys.argv[2], http=None, share_group="pair", client_id=sys.argv[3], stop=stop)
"""


@pytest.mark.broker
@pytest.mark.slow
def test_two_hub_processes_on_one_shared_subscription_store_every_result_once(mosquitto, tmp_path):
    db_url = f"sqlite:///{tmp_path / 'hub.db'}"
    with HubDB(db_url) as db:
        db.create()  # before both processes race to create the tables
    procs = [subprocess.Popen([sys.executable, "-c", HUB_PROCESS, mosquitto.url, db_url, f"hub-{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT) for i in (1, 2)]
    logs = []
    try:
        hub_listening(db_url, mosquitto.port)
        time.sleep(1.0)  # the second one too
        pub = publisher(mosquitto.port)
        msgs = []
        for d in range(4):
            dev = f"edge-{d}"
            res = [result(dev, s) for s in range(1, 501)]
            for i in range(0, 500, 25):
                msgs.append((topics.topic("lab", dev, "result"),
                             m.ResultBatch("lab", dev, res[i:i + 25]).encode()))
            msgs += [(topics.topic("lab", dev, "result"), r.encode()) for r in res[:50]]  # duplicates
        publish_all(pub, msgs)
        pub.disconnect()
        pub.loop_stop()
        with HubDB(db_url) as db:
            settled(db, 2000, timeout_s=60)
            assert db.count() == 2000
            assert db.count("defer") == 400
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            out, _ = p.communicate(timeout=30)
            logs.append(out.decode())
    # Both consumers took part; each logged what it stored when it stopped.
    stored = []
    for text in logs:
        line = [ln for ln in text.splitlines() if "hub.ingest_stopped" in ln]
        assert line, text[-2000:]
        stored.append(int(line[-1].split(" new=")[1].split()[0]))
    assert sum(stored) == 2000
    assert all(n > 0 for n in stored), stored


@pytest.mark.broker
def test_a_single_hub_without_share_group_keeps_its_subscription_over_a_broker_restart(mosquitto, tmp_path):
    """share_group="" subscribes plainly; mosquitto restores that (unlike a shared one) from persistence,
    so results re-sent before the hub is back are queued for it."""
    db_url = f"sqlite:///{tmp_path / 'hub.db'}"
    with HubThread(mosquitto.url, db_url, client_id="solo-hub", share_group=""), HubDB(db_url) as db:
        hub_listening(db_url, mosquitto.port)
        mosquitto.stop()
        mosquitto.start()
        pub = publisher(mosquitto.port)  # at once, before the hub reconnects
        publish_all(pub, [(topics.topic("lab", "edge-5", "result"), result("edge-5", s, replayed=True).encode())
                          for s in range(1, 21)])
        pub.disconnect()
        pub.loop_stop()
        settled(db, 20)
        assert db.count() == 20


@pytest.mark.broker
def test_a_named_session_queues_results_while_away_and_end_session_drops_it(mosquitto, tmp_path):
    from edgekit.hub.ingest import Ingest

    dbs = {end: HubDB(f"sqlite:///{tmp_path / f'hub-{end}.db'}") for end in (False, True)}
    for end, db in dbs.items():
        with Ingest(mosquitto.url, db, share_group=f"g{end}", client_id=f"named-{end}") as ing:
            assert ing.connected.wait(10)
            time.sleep(0.3)  # SUBACK
            ing.stop(end_session=end)
    pub = publisher(mosquitto.port)
    publish_all(pub, [(topics.topic("lab", "edge-6", "result"), result("edge-6", s).encode()) for s in range(1, 101)])
    pub.disconnect()
    pub.loop_stop()
    for end, db in dbs.items():
        with Ingest(mosquitto.url, db, share_group=f"g{end}", client_id=f"named-{end}") as ing:
            assert ing.connected.wait(10)
            if not end:
                settled(db, 100)
            else:
                time.sleep(1.0)
            ing.stop(end_session=True)
    assert dbs[False].count() == 100  # the broker kept the session and queued for it
    assert dbs[True].count() == 0  # the session was dropped at disconnect: nothing queued for nobody
    for db in dbs.values():
        db.close()



class HubCli:
    """`edgekit -v hub` in its own process, its log in a file so a test can wait for a line."""

    def __init__(self, log: Path, broker_url: str, db_url: str, *extra: str, env: dict[str, str] | None = None):
        import os

        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "edgekit", "-v", "hub", "--broker", broker_url,
                                          "--db", db_url, "--http", "", *extra], stdout=out,
                                         stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})})

    def text(self) -> str:
        return self.log.read_text()

    def stop(self) -> str:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        assert self.proc.returncode == 0, self.text()[-2000:]
        return self.text()


@pytest.mark.broker
def test_hub_cli_authenticates_and_its_named_session_keeps_results_while_it_is_down(tmp_path):
    from test_transport import _auth_broker  # the test broker with anonymous access off

    broker = _auth_broker(tmp_path / "broker", "hub", "s3cret")
    pw = tmp_path / "hub.pw"
    pw.write_text("s3cret\n")
    db_url = f"sqlite:///{tmp_path / 'hub.db'}"
    sent = [(topics.topic("lab", "edge-1", "result"), result("edge-1", s).encode()) for s in range(1, 31)]
    with broker:
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pub", protocol=mqtt.MQTTv5)
        pub.username_pw_set("hub", "s3cret")
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        try:
            # A wrong password is refused and said so.
            bad = HubCli(tmp_path / "bad.log", broker.url, db_url, "--username", "hub",
                         env={"EDGEKIT_MQTT_PASSWORD": "wrong"})
            wait_for(lambda: "hub.connect_refused" in bad.text(), 20, "the refusal in the hub's log")
            bad.stop()

            args = ("--username", "hub", "--password-file", str(pw), "--client-id", "hub-a")
            hub = HubCli(tmp_path / "hub1.log", broker.url, db_url, *args)
            wait_for(lambda: "hub.connected" in hub.text(), 20, "the hub's connection")
            time.sleep(0.3)  # its SUBACK
            publish_all(pub, sent[:10])
            with HubDB(db_url) as db:
                settled(db, 10)
            hub.stop()
            # While the hub is down the broker queues for its session; the same --client-id picks them up.
            publish_all(pub, sent[10:])
            hub = HubCli(tmp_path / "hub2.log", broker.url, db_url, *args)
            with HubDB(db_url) as db:
                settled(db, 30)
                assert db.count() == 30
            hub.stop()
        finally:
            pub.disconnect()
            pub.loop_stop()
