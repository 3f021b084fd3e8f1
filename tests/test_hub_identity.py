"""The hub binds identity to the topic (issue 10): a device cannot take or shadow another device's result ids,
malformed ids are rejected, and the shipped ACL (deploy/mosquitto/acl.example + acl-device) pins each device to
its own site and device while letting it publish every kind the agent sends, trial summaries included."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from messagefactory import result, review, trial
from test_hub_ingest import hub_listening, publish_all, publisher, wait_for

from edgekit import topics
from edgekit.broker import Mosquitto, installed
from edgekit.contract import messages as m
from edgekit.errors import DataError
from edgekit.hub.db import HubDB
from edgekit.hub.ingest import Ingest, IngestStats, to_batch
from edgekit.mqtt import MqttSecurity
from edgekit.transport import Transport

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "mosquitto"
GOODFZ = MqttSecurity(username="goodfz", password="goodpw")


def rejections(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("hub.rejected")]


# --- the contract: topics.parse_result_id --------------------------------------------------------------


@pytest.mark.parametrize("device", ["goodfz", "a:b", "edge-1"])
@pytest.mark.parametrize("seq", [0, 7, 999_999_999_999, 10**13 + 5])
def test_parse_result_id_inverts_result_id(device: str, seq: int) -> None:
    assert topics.parse_result_id(topics.result_id(device, seq), device) == seq


@pytest.mark.parametrize("rid", ["no-colon", "dev:-1", "dev:", "dev:7", "dev:+00000000007", "dev:00000000000x",
                                 "dev: 00000000007", "dev:０００００００００００７", "other:000000000007",
                                 "de:000000000007", "dev:dev:000000000007", "", 7, None, ["dev:000000000007"]])
def test_parse_result_id_refuses_what_result_id_never_writes(rid: object) -> None:
    with pytest.raises(DataError, match="id must be"):
        topics.parse_result_id(rid, "dev")


# --- to_batch: what is rejected, counted and logged once ------------------------------------------------

TOPIC = topics.topic("lab", "dev", "result")


def _without(obj: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k != key}


BASE = {"result": result("dev", 7).to_obj(), "review": review(result("dev", 7, defer=True)).to_obj(),
        "trial": trial("dev", 7).to_obj()}
MALFORMED = {  # each applied to a result, a review and a trial of device "dev", sequence 7, site "lab"
    "no colon": lambda o: {**o, "id": "no-colon"},
    "negative sequence": lambda o: {**o, "id": "dev:-1", "seq": -1},
    "another device's id": lambda o: {**o, "id": topics.result_id("other", 7)},
    "seq not the id's": lambda o: {**o, "seq": 8},
    "seq missing": lambda o: _without(o, "seq"),
    "seq a bool": lambda o: {**o, "id": topics.result_id("dev", 1), "seq": True},
    "seq a float": lambda o: {**o, "seq": 7.0},
    "id a number": lambda o: {**o, "id": 7},
    "id missing": lambda o: _without(o, "id"),
    "second spelling": lambda o: {**o, "id": "dev:7"},
    "another site": lambda o: {**o, "site": "elsewhere"},
    "another device": lambda o: {**o, "device": "other"},
    "device missing": lambda o: _without(o, "device"),
}


@pytest.mark.parametrize("kind", sorted(BASE))
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_result_review_or_trial_not_of_the_topics_device_is_rejected_counted_and_logged_once(
        kind: str, case: str, caplog: pytest.LogCaptureFixture) -> None:
    name = topics.topic("lab", "dev", kind)  # type: ignore[arg-type]
    good = to_batch([(name, topics.encode(BASE[kind]))], 1.0, IngestStats())
    assert len(good) == 1  # the base is fine: only the malformation below makes the difference
    stats = IngestStats()
    caplog.set_level(logging.WARNING, logger="edgekit.hub")
    batch = to_batch([(name, topics.encode(MALFORMED[case](BASE[kind])))], 1.0, stats)
    assert len(batch) == 0 and not batch.seen
    assert (stats.rejected, stats.bad, stats.results, stats.trials) == (1, 0, 0, 0)
    [line] = rejections(caplog)
    assert line.startswith(f"hub.rejected topic={name} reason=")


def test_one_foreign_result_rejects_its_whole_batch_message(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edgekit.hub")
    own = [result("dev", s) for s in (1, 2, 3)]
    foreign = topics.encode({**result("dev", 4).to_obj(), "id": "other:4"})
    stats = IngestStats()
    msgs = [(TOPIC, m.ResultBatch.encoded("lab", "dev", [r.encode() for r in own] + [foreign])),
            (TOPIC, m.ResultBatch("lab", "other", own).encode()),  # the envelope names another device
            (TOPIC, m.ResultBatch("elsewhere", "dev", own).encode()),  # ... or another site
            (TOPIC, m.ResultBatch("lab", "dev", own).encode())]  # all its own: stored
    batch = to_batch(msgs, 1.0, stats)
    assert [r["id"] for r in batch.results] == [topics.result_id("dev", s) for s in (1, 2, 3)]
    assert (stats.rejected, stats.bad, stats.results) == (3, 0, 3)
    lines = rejections(caplog)
    assert len(lines) == 3 and "results[3] id must be dev:SEQUENCE" in lines[0]


def test_status_and_metrics_naming_another_site_or_device_are_rejected(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edgekit.hub")
    st, mt = topics.topic("lab", "dev", "status"), topics.topic("lab", "dev", "metrics")
    metrics = m.Metrics("lab", "dev", 5.0, counters={"windows": 3}).to_obj()
    stats = IngestStats()
    batch = to_batch([(st, m.Status("lab", "other", "offline", 1.0).encode()),
                      (st, m.Status("elsewhere", "dev", "offline", 1.0).encode()),
                      (mt, topics.encode({**metrics, "device": "other"})),
                      (st, m.Status("lab", "dev", "online", 2.0).encode()),
                      (mt, topics.encode(_without(_without(metrics, "site"), "device")))], 3.0, stats)
    assert (stats.rejected, stats.bad) == (3, 0)
    assert batch.status[("lab", "dev")]["state"] == "online" and batch.metrics[("lab", "dev")]["windows"] == 3
    assert set(batch.status) == set(batch.metrics) == {("lab", "dev")}
    assert len(rejections(caplog)) == 3


# --- over a real broker: the spoof of issue 10 -----------------------------------------------------------


@pytest.mark.broker
def test_a_device_carrying_anothers_next_id_is_rejected_and_the_real_result_kept(
        mosquitto: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Device "evil", on its own topics, sends goodfz's next id in every shape the hub takes; goodfz's real
    result and review then arrive and are stored whole, evil's never."""
    caplog.set_level(logging.WARNING, logger="edgekit.hub")
    db_url = f"sqlite:///{tmp_path / 'hub.db'}"
    SPOOF_TS = 4_000_000_000.0  # noqa: N806 - a marker: the spoofed status's ts
    real = result("goodfz", 2, defer=True)
    evil_features = {"acc_rms": 99.0, "gyro_rms": 99.0, "cadence_hz": 99.0}
    as_evil = dataclasses.replace(real, device="evil", label="sit", ts=real.ts + 1000)
    spoofs: list[tuple[str, bytes]] = [
        (topics.topic("lab", "evil", "result"), real.encode()),  # goodfz's payload, evil's topic
        (topics.topic("lab", "evil", "result"), as_evil.encode()),  # evil's, with goodfz's id
        (topics.topic("lab", "evil", "result"),
         m.ResultBatch("lab", "evil", [result("evil", 1), as_evil]).encode()),
        (topics.topic("lab", "evil", "review"), review(as_evil, features=evil_features).encode()),
        (topics.topic("lab", "evil", "trial"), dataclasses.replace(trial("goodfz", 2), device="evil").encode()),
        (topics.topic("lab", "evil", "status"), m.Status("lab", "goodfz", "offline", SPOOF_TS).encode()),
    ]
    with HubDB(db_url) as db, Ingest(mosquitto.url, db, share_group=None) as hub:
        hub_listening(db_url, mosquitto.port)
        with Transport(mosquitto.url, site="lab", device="goodfz", outbox=tmp_path / "goodfz.db") as good:
            good.send("result", result("goodfz", 1).encode())
            assert good.flush(15), good.stats()
            wait_for(lambda: db.case(topics.result_id("goodfz", 1)) is not None, what="goodfz's first result")

            evil = publisher(mosquitto.port, "evil")
            try:
                publish_all(evil, spoofs)
                publish_all(evil, [(topics.topic("lab", "evil", "result"), result("evil", 2).encode())])
            finally:
                evil.disconnect()
                evil.loop_stop()
            wait_for(lambda: db.case(topics.result_id("evil", 2)) is not None, what="evil's own result")
            assert hub.stats.rejected == len(spoofs)

            # goodfz's real next result and its review come after the spoofs: stored, not dropped as duplicates.
            good.send_many([("result", real.encode()), ("review", review(real).encode())])
            assert good.flush(15), good.stats()
            wait_for(lambda: (db.case(real.id) or {}).get("features") is not None, what="goodfz's review")

        case = db.case(real.id)
        assert case is not None
        assert (case["site"], case["device"], case["label"], case["ts"]) == ("lab", "goodfz", "walk", real.ts)
        assert case["features"] == review(real).features and case["features"] != evil_features
        assert db.count() == 3  # goodfz:1, goodfz:2 and evil's one result of its own (evil:2)
        assert db.count_trials() == 0
        assert hub.stats.bad == 0 and hub.stats.rejected == len(spoofs)
        assert SPOOF_TS not in {d["status_ts"] for d in db.fleet()}  # goodfz's status is its own
    lines = rejections(caplog)
    assert len(lines) == len(spoofs)
    assert all(line.startswith("hub.rejected topic=edgekit/v1/lab/evil/") for line in lines)
    assert any("goodfz" in line for line in lines)


# --- the shipped ACL ----------------------------------------------------------------------------------


def acl_device(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(DEPLOY / "acl-device"), *args], input=stdin, capture_output=True,
                          text=True, timeout=10)


def test_acl_device_writes_every_kind_of_one_site_and_device_and_the_example_is_its_output() -> None:
    out = acl_device("plant1", "pump7")
    assert out.returncode == 0, out.stderr
    rules = [line for line in out.stdout.splitlines() if line and not line.startswith("#")]
    assert rules == (["user pump7"] + [f"topic write {topics.topic('plant1', 'pump7', k)}" for k in topics.KINDS]
                     + [f"topic read {topics.command('plant1', 'pump7', '+')}"])
    assert out.stdout.strip() in (DEPLOY / "acl.example").read_text()  # the example device is the script's
    example = (DEPLOY / "acl.example").read_text().splitlines()
    assert not [line for line in example if line.startswith("pattern")]  # %u would let a device pick its site
    assert acl_device(stdin="# fleet\nplant1 pump7\n\nplant2 fan1\n").stdout.count("user ") == 2
    for bad in (("a/b", "c"), ("a", "c+"), ("a", "#"), ("a", "$x"), ("a",), ("", "c")):
        assert acl_device(*bad).returncode == 2, bad
    assert acl_device("p1", "d", "p2", "d").returncode == 2  # one device, two sites: mosquitto merges blocks
    assert acl_device(stdin="p1 d extra\n").returncode == 2


def _password_file(path: Path, users: dict[str, str]) -> Path:
    if shutil.which("mosquitto_passwd"):
        path.write_text("")
        for user, password in users.items():
            subprocess.run(["mosquitto_passwd", "-b", str(path), user, password], check=True, timeout=10)
        return path
    from test_transport import _password_file as salted_sha512  # no mosquitto_passwd: the older format

    return salted_sha512(path, users)


@pytest.mark.broker
def test_under_the_shipped_acl_a_device_publishes_trials_and_cannot_publish_under_another_site(
        tmp_path: Path) -> None:
    if installed() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    workdir = tmp_path / "broker"
    broker = Mosquitto(workdir)
    acl = workdir / "acl"
    devices = acl_device(stdin="lab goodfz\n")
    assert devices.returncode == 0, devices.stderr
    acl.write_text((DEPLOY / "acl.example").read_text() + devices.stdout)
    passwd = _password_file(workdir / "passwd", {"hub": "hubpw", "goodfz": "goodpw", "pump7": "pump7pw"})
    broker.conf.write_text(f"listener {broker.port} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\n"
                           f"acl_file {acl}\nuser root\nlog_dest stderr\nlog_type error\nlog_type warning\n")
    db_url = f"sqlite:///{tmp_path / 'hub.db'}"
    own = [("trial", trial("goodfz", 1).encode()), ("result", result("goodfz", 2).encode()),
           ("metrics", m.Metrics("lab", "goodfz", time.time(), counters={"windows": 2}).encode())]
    with broker, HubDB(db_url) as db, Ingest(broker.url, db, security=MqttSecurity(username="hub", password="hubpw")) as hub:
        assert hub.connected.wait(10)
        with Transport(broker.url, site="lab", device="goodfz", outbox=tmp_path / "goodfz.db",
                       security=GOODFZ) as tr:
            # Its retained "online" status reaches the hub whenever it subscribed: then the hub listens.
            wait_for(lambda: any(d["device"] == "goodfz" and d["state"] == "online" for d in db.fleet()),
                     what="goodfz online at the hub")
            tr.send_many(own)  # type: ignore[arg-type]
            assert tr.flush(15), tr.stats()
            wait_for(lambda: db.count_trials() == 1 and db.count() == 1, what="goodfz's trial and result")
        [row] = db.trials()
        assert (row["id"], row["site"], row["device"]) == (topics.result_id("goodfz", 1), "lab", "goodfz")
        wait_for(lambda: [(d["state"], (d["metrics"] or {}).get("windows")) for d in db.fleet()] == [("offline", 2)],
                 what="goodfz's metrics and its clean 'offline'")

        # The same account under another site, and under another device's topics (pump7's, whose own
        # account exists): MQTT 3.1.1 acknowledges every publish, the broker delivers none of them.
        for site, device in (("elsewhere", "goodfz"), ("plant1", "pump7")):
            with Transport(broker.url, site=site, device=device, outbox=tmp_path / f"{site}.db",
                           security=GOODFZ, client_id=f"goodfz-as-{site}") as tr:
                wait_for(lambda: tr.connected, what="the CONNACK")  # noqa: B023 - used at once
                tr.send_many([("trial", trial(device, 10, site=site).encode()),
                              ("result", result(device, 11, site=site).encode())])
                assert tr.flush(15), tr.stats()
        # A marker on goodfz's own topic, acknowledged after those: once the hub has it, it has had whatever
        # the broker let through before it (one broker thread, one ordered session to the hub).
        with Transport(broker.url, site="lab", device="goodfz", outbox=tmp_path / "goodfz.db",
                       security=GOODFZ) as tr:
            tr.send("result", result("goodfz", 3).encode())
            assert tr.flush(15), tr.stats()
            wait_for(lambda: db.case(topics.result_id("goodfz", 3)) is not None, what="goodfz's marker result")
        assert db.count() == 2
        assert {(d["site"], d["device"]) for d in db.fleet()} == {("lab", "goodfz")}
        assert {(r["site"], r["device"]) for r in db.trials()} == {("lab", "goodfz")} and db.count_trials() == 1
        assert db.case(topics.result_id("goodfz", 11)) is None and db.case(topics.result_id("pump7", 11)) is None
        assert hub.stats.rejected == 0 and hub.stats.bad == 0  # the broker stopped them, not the hub

        # The last will is a status publish too: the shipped ACL lets it through on the device's own topic.
        if shutil.which("mosquitto_pub") is None:
            return
        will = m.Status("lab", "goodfz", "offline", time.time(), reason="lost").encode()
        pub = subprocess.Popen(["mosquitto_pub", "-p", str(broker.port), "-u", "goodfz", "-P", "goodpw",
                                "-i", "goodfz-will", "-q", "1", "-l", "-t", topics.topic("lab", "goodfz", "result"),
                                "--will-topic", topics.topic("lab", "goodfz", "status"), "--will-qos", "1",
                                "--will-retain", "--will-payload", will.decode()], stdin=subprocess.PIPE)
        try:
            assert pub.stdin is not None
            pub.stdin.write(result("goodfz", 4).encode() + b"\n")  # one line, one publish
            pub.stdin.flush()
            wait_for(lambda: db.case(topics.result_id("goodfz", 4)) is not None,
                     what="the will client's result")  # it is connected, its will registered
        finally:
            pub.kill()  # no DISCONNECT: the broker publishes the will
            pub.wait(10)
        ts = topics.decode(will, "will")["ts"]
        wait_for(lambda: [(d["state"], d["status_ts"]) for d in db.fleet()] == [("offline", ts)],
                 what="goodfz's last will at the hub")
