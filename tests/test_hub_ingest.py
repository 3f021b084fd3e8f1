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

from edgekit import topics
from edgekit.hub import run_hub
from edgekit.hub.db import HubDB, results
from edgekit.hub.ingest import to_batch

ROOT = Path(__file__).resolve().parent.parent
LABELS = ("walk", "turn", "sit")
FEATURES = ("acc_rms", "gyro_rms", "cadence_hz")


def result(device: str, seq: int, *, site: str = "lab", defer: bool | None = None) -> dict[str, Any]:
    """A result payload as the agent publishes it; every 5th one deferred unless `defer` says."""
    defer = seq % 5 == 0 if defer is None else defer
    p = 0.45 if defer else 0.9
    return {
        "schema": topics.SCHEMA_RESULT, "id": topics.result_id(device, seq), "seq": seq, "site": site,
        "device": device, "ts": 1_700_000_000.0 + seq, "window": {"start_s": seq * 2.0, "end_s": seq * 2.0 + 2},
        "model_version": "gait-cnn@3", "task": "classify", "label": "walk", "confidence": p,
        "probs": {"walk": p, "turn": (1 - p) * 0.7, "sit": (1 - p) * 0.3},
        "second_opinion": {"label": "turn" if defer else "walk",
                           "probs": {"walk": 0.3, "turn": 0.6, "sit": 0.1} if defer else
                           {"walk": 0.85, "turn": 0.1, "sit": 0.05}},
        "decision": "defer" if defer else "accept",
        "reasons": ["low_confidence", "disagreement"] if defer else [],
        "scores": {"ood": 0.8, "confidence": p, "disagreement": 0.5 if defer else 0.05},
        "thresholds": {"ood_max_score": 1.5, "min_confidence": 0.6, "max_disagreement": 0.3},
    }


def review(res: dict[str, Any], n: int = 128) -> dict[str, Any]:
    """The review message the agent sends for a deferred result: same id, plus features and signal."""
    import math

    seq = res["seq"]
    return {**res, "schema": topics.SCHEMA_REVIEW,
            "features": {"acc_rms": 1.0 + seq / 100, "gyro_rms": 0.5, "cadence_hz": 1.8},
            "signal": {"channels": ["acc_x", "acc_y", "gyro_z"], "rate_hz": 64.0, "start_s": res["window"]["start_s"],
                       "points": [[round(math.sin(i / 8 + c) * (c + 1), 4) for i in range(n)] for c in range(3)]}}


def trial(device: str, seq: int, *, site: str = "lab", walk: bool = True) -> dict[str, Any]:
    """A trial summary as the agent sends it (agent.trial_payload): a segmented TUG, or one with no walk."""
    payload: dict[str, Any] = {
        "schema": topics.SCHEMA_TRIAL, "id": topics.result_id(device, seq), "seq": seq, "site": site,
        "device": device, "ts": 1_700_000_000.0 + seq, "model_version": "gait-cnn@3", "task": "classify",
        "trial": {"start_s": 0.0, "end_s": 24.0, "samples": 2401, "rate_hz": 100.0, "closed_by": "end"},
        "walk_start_s": 2.5, "walk_end_s": 19.25, "turn_start_s": 9.0, "turn_end_s": 11.5, "steps": 18,
        "cadence_spm": 96.4,
        "phase_s": {"still_before": 2.5, "walk_out": 6.5, "turn": 2.5, "walk_back": 7.75, "still_after": 4.75},
        "step_times_s": [3.1, 3.7, 4.3],
    }
    if not walk:
        payload.update({"walk_start_s": None, "walk_end_s": None, "turn_start_s": None, "turn_end_s": None,
                        "steps": 0, "cadence_spm": None, "phase_s": {}, "step_times_s": [],
                        "reason": "no walk: activity never rose above still standing"})
    return payload


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
                publish_all(pub, [(topics.topic("probe", "probe", "status"), topics.status("probe", "probe", "online", ts))])
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
    deferred = [r for r in res if r["decision"] == "defer"]
    singles = [(topics.topic("lab", "edge-1", "result"), topics.encode(r)) for r in res[:30]]
    batched = [(topics.topic("lab", "edge-1", "result"),
                topics.batch("lab", "edge-1", [topics.encode(r) for r in res[30 + i:40 + i]])) for i in (0, 10, 20)]
    reviews = [(topics.topic("lab", "edge-1", "review"), topics.encode(review(r))) for r in deferred]
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
                       topics.mark_replayed(topics.batch("lab", "edge-1", [topics.encode(r) for r in new]))))
        resend += [(topics.topic("lab", "edge-1", "review"), topics.mark_replayed(topics.encode(review(r))))
                   for r in new if r["decision"] == "defer"]
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
    no_id = {k: v for k, v in result("edge-2", 2).items() if k != "id"}
    bad_batch = {"schema": topics.SCHEMA_RESULT_BATCH, "site": "lab", "device": "edge-2", "results": "nope"}
    t = topics.topic("lab", "edge-2", "result")
    msgs = [(t, b"not json"), (t, b'{"schema": "edgekit.nothing/9"}'), (t, topics.encode(no_id)),
            (t, topics.encode(bad_batch)), (t, topics.encode({**good, "ts": "yesterday"})),
            (topics.topic("lab", "edge-2", "review"), topics.encode(good)),  # a review without features
            ("edgekit/v1/lab/edge-2/result/extra", topics.encode(good)), (t, topics.encode(good))]
    caplog.set_level(logging.WARNING, logger="edgekit.hub")
    with HubThread(mosquitto.url, db_url), HubDB(db_url) as db:
        hub_listening(db_url, mosquitto.port)
        pub = publisher(mosquitto.port)
        publish_all(pub, msgs)
        settled(db, 1)
        pub.disconnect()
        pub.loop_stop()
        assert list(rows_by_id(db)) == [good["id"]]
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
    refused = {**trial("edge-1", 90), "error": "a trial needs at least 4 s of samples (got 1.2 s)"}
    for key in ("walk_start_s", "walk_end_s", "turn_start_s", "turn_end_s", "steps", "cadence_spm", "phase_s",
                "step_times_s"):
        refused.pop(key)
    msgs = [(t, topics.encode(p)) for p in (walked, still, refused)]
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
        assert [r["id"] for r in rows] == [refused["id"], still["id"], walked["id"]]  # newest first
        by_id = {r["id"]: r for r in rows}
        assert {(r["site"], r["device"]) for r in rows} == {("lab", "edge-1")}
        assert by_id[walked["id"]]["ts"] == walked["ts"]
        assert by_id[walked["id"]]["summary"]["phase_s"] == walked["phase_s"]
        assert by_id[walked["id"]]["summary"]["steps"] == 18
        assert by_id[still["id"]]["summary"]["reason"].startswith("no walk")
        assert by_id[refused["id"]]["summary"]["error"].startswith("a trial needs")
        assert "edge-1" in {d["device"] for d in db.fleet()}  # a trial counts as hearing from the device


def test_a_redelivered_trial_stores_nothing_new_and_a_bad_one_is_refused(tmp_path, caplog):
    from edgekit.hub.ingest import IngestStats

    t = topics.topic("lab", "edge-5", "trial")
    payload = topics.encode(trial("edge-5", 7))
    with HubDB(f"sqlite:///{tmp_path / 'hub.db'}") as db:
        db.create()
        assert db.store(to_batch([(t, payload), (t, payload)], 1.0)).new_trials == 1
        assert db.store(to_batch([(t, topics.mark_replayed(payload))], 2.0)).new_trials == 0
        [row] = db.trials()
        assert row["received_at"] == 1.0 and not row["summary"].get("replayed")  # the first copy is kept
        stats = IngestStats()
        caplog.set_level(logging.WARNING, logger="edgekit.hub")
        bad = [{**trial("edge-5", 8), "steps": "many"}, {**trial("edge-5", 9), "ts": None},
               {k: v for k, v in trial("edge-5", 10).items() if k != "id"}]
        batch = to_batch([(t, topics.encode(p)) for p in bad], 3.0, stats)
        assert not batch.trials and stats.bad == 2 and stats.rejected == 1 and stats.trials == 0
        assert db.count_trials() == 1


def test_status_in_arrival_order_and_metrics_update_the_fleet(tmp_path):
    with HubDB(f"sqlite:///{tmp_path / 'hub.db'}") as db:
        db.create()
        st = topics.topic("lab", "edge-3", "status")
        online = topics.status("lab", "edge-3", "online", 100.0, model_version="m@1", queued=4, dropped=0)
        # The last will was registered at connect (ts 90), before "online" (ts 100), and arrives later.
        will = topics.status("lab", "edge-3", "offline", 90.0, model_version="m@1")
        metrics = topics.encode({"schema": topics.SCHEMA_METRICS, "site": "lab", "device": "edge-3", "ts": 120.0,
                                 "windows": 10, "accepted": 8, "deferred": 2, "quarantined": 0,
                                 "quarantine_reasons": {}, "published": 10, "queued": 7, "dropped": 3,
                                 "replayed": 0})
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
        db.store(to_batch([(st, topics.status("lab", "edge-3", "offline", 130.0))], 4.0))
        assert db.fleet()[0]["state"] == "offline"
        # A retained status (the broker's old copy, delivered on subscribe) counts from its own ts.
        db.store(to_batch([(topics.topic("lab", "edge-4", "status"), topics.status("lab", "edge-4", "offline", 50.0),
                            True)], 5.0))
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
                             topics.batch("lab", dev, [topics.encode(r) for r in res[i:i + 25]])))
            msgs += [(topics.topic("lab", dev, "result"), topics.encode(r)) for r in res[:50]]  # duplicates
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
        publish_all(pub, [(topics.topic("lab", "edge-5", "result"), topics.mark_replayed(topics.encode(result("edge-5", s))))
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
    publish_all(pub, [(topics.topic("lab", "edge-6", "result"), topics.encode(result("edge-6", s))) for s in range(1, 101)])
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
    sent = [(topics.topic("lab", "edge-1", "result"), topics.encode(result("edge-1", s))) for s in range(1, 31)]
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
