"""Privacy (issue 13): participants are pseudonyms made on the station (edgekit/privacy.py), a name cannot
travel in a trial (tests/test_contract.py has the parser's side), the shipped ACL covers every topic the
station uses and no other device's, and the hub exports and deletes everything of one pseudonym and keeps
nothing past its retention, on SQLite and PostgreSQL, with no column that holds a name."""

from __future__ import annotations

import logging
import multiprocessing
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from messagefactory import participant, result, review, trial
from test_hub_postgres import pg_url  # noqa: F401 - the PostgreSQL fixture, used by db_url

from edgekit import privacy, topics
from edgekit.errors import ConfigError, DataError
from edgekit.hub import DAY_S, apply_retention, run_hub
from edgekit.hub.db import HubDB
from edgekit.hub.ingest import IngestStats, to_batch

SALT = bytes(range(32))

# --- pseudonyms and the station's salt ---------------------------------------------------------------


def test_a_pseudonym_is_the_contracts_format_and_depends_on_the_code_and_the_salt_only() -> None:
    p = privacy.pseudonym("AB-123", SALT)
    assert topics.parse_pseudonym(p) == p and len(p) == topics.PSEUDONYM_LEN
    assert privacy.pseudonym("AB-123", SALT) == p
    assert privacy.pseudonym("AB-124", SALT) != p
    assert privacy.pseudonym("AB-123", bytes(32)) != p  # another station's salt: another pseudonym


@pytest.mark.parametrize("typed", ["AB-123", "ab123", " ab 12-3 ", "ＡＢ１２３", "Ab\t123\n"])
def test_the_code_is_normalised_so_the_way_it_was_typed_does_not_matter(typed: str) -> None:
    assert privacy.pseudonym(typed, SALT) == privacy.pseudonym("AB123", SALT)


@pytest.mark.parametrize("code", ["", "   ", "-", " - \t"])
def test_an_empty_code_is_a_clear_error(code: str) -> None:
    with pytest.raises(DataError, match="participant code is empty"):
        privacy.pseudonym(code, SALT)


def test_a_long_text_is_not_a_code_and_the_error_does_not_repeat_it() -> None:
    text = "Jane Doe, born 1941, lives at the corner of the market street"
    with pytest.raises(DataError, match="more than 32") as err:
        privacy.pseudonym(text, SALT)
    assert "Jane" not in str(err.value)
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        privacy.pseudonym("AB-123", b"short")


def test_the_salt_is_made_once_per_station_private_and_the_code_is_never_logged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("EDGEKIT_STATE_DIR", str(tmp_path / "state"))
    caplog.set_level(logging.DEBUG)
    salt = privacy.device_salt()
    path = tmp_path / "state" / privacy.SALT_FILE
    assert len(salt) == privacy.SALT_BYTES and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert privacy.device_salt() == salt  # loaded, not made again
    assert [p.name for p in path.parent.iterdir()] == [privacy.SALT_FILE]  # no temporary file left
    privacy.pseudonym("ZX-987", privacy.device_salt())
    assert "privacy.salt_created" in caplog.text and "ZX" not in caplog.text and "987" not in caplog.text
    other = privacy.device_salt(tmp_path / "other-station")
    assert other != salt  # a salt per station unless the operator copies one on purpose


def test_a_salt_file_others_may_read_is_narrowed_and_a_broken_one_is_a_clear_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "salt"
    salt = privacy.device_salt(path)
    path.chmod(0o644)  # e.g. copied from another station with cp
    assert privacy.device_salt(path) == salt and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "privacy.salt_mode_narrowed" in caplog.text
    for text in ("not hex\n", "00ff\n"):
        path.write_text(text)
        with pytest.raises(ConfigError, match="participant salt") as err:
            privacy.device_salt(path)
        assert str(path) in str(err.value)


def test_edgekit_pseudonym_prints_the_stations_pseudonym_and_never_makes_a_salt(tmp_path: Path) -> None:
    env = {**os.environ, "EDGEKIT_STATE_DIR": str(tmp_path / "station")}

    def edgekit(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "edgekit", "pseudonym", *args], input=stdin, env=env,
                              capture_output=True, text=True, timeout=60)

    missing = edgekit("--code", "AB-123")
    assert missing.returncode == 2 and "no participant salt here" in missing.stderr
    assert not (tmp_path / "station").exists()  # a new salt would give another pseudonym: not made here
    salt = privacy.device_salt(tmp_path / "station" / privacy.SALT_FILE)
    asked = edgekit(stdin="ab 123\n")  # asked for, not echoed
    assert asked.returncode == 0, asked.stderr
    assert asked.stdout.splitlines()[-1].split()[-1] == privacy.pseudonym("AB-123", salt)
    assert "ab 123" not in asked.stdout and "ab 123" not in asked.stderr
    other = privacy.device_salt(tmp_path / "other")
    given = edgekit("--code", "AB-123", "--salt-file", str(tmp_path / "other"))
    assert given.stdout.strip() == privacy.pseudonym("AB-123", other)


def _salt_in_child(path: str, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    queue.put(privacy.device_salt(Path(path)).hex())


def test_two_processes_making_the_salt_at_once_end_with_the_same_one(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    path = tmp_path / "state" / privacy.SALT_FILE
    for _ in range(3):
        if path.exists():
            os.unlink(path)
        queue = ctx.Queue()
        procs = [ctx.Process(target=_salt_in_child, args=(str(path), queue)) for _ in range(4)]
        for proc in procs:
            proc.start()
        got = {queue.get(timeout=60) for _ in procs}
        for proc in procs:
            proc.join(60)
        assert len(got) == 1 and got == {path.read_text().strip()}


# --- the shipped ACL: every topic the station uses, and no other device's ----------------------------------

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto"
COMMANDS = ("trial-start", "trial-stop")  # names for the test; the agent's own are the lead's (issue 13)


def _acl_rules(text: str) -> dict[str, list[tuple[str, str]]]:
    """user -> [(access, topic filter)] of a mosquitto acl_file (`user`, `topic [read|write|readwrite|deny]`;
    comments and blank lines skipped). A `pattern` line fails: the shipped ACL has none on purpose."""
    rules: dict[str, list[tuple[str, str]]] = {}
    user = ""  # topic lines before any user line are the anonymous client's
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "user":
            user = words[1]
        elif words[0] == "topic":
            access, flt = (words[1], words[2]) if len(words) == 3 else ("readwrite", words[1])
            rules.setdefault(user, []).append((access, flt))
        else:
            raise AssertionError(f"unexpected ACL line {line!r}")
    return rules


def _matches(flt: str, topic: str) -> bool:
    """MQTT topic filter matching ('+' one level, '#' the rest), as mosquitto_topic_matches_sub."""
    f, t = flt.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


def _allowed(rules: dict[str, list[tuple[str, str]]], user: str, access: str, topic: str) -> bool:
    """mosquitto's default check: a matching deny wins, else any matching rule granting `access`."""
    own = rules.get(user, [])
    if any(a == "deny" and _matches(f, topic) for a, f in own):
        return False
    return any(a in (access, "readwrite") and _matches(f, topic) for a, f in own)


def station_topics(site: str, device: str) -> tuple[list[str], list[str]]:
    """(what a station publishes, what it receives): every kind of topics.KINDS, and its commands."""
    return ([topics.topic(site, device, kind) for kind in topics.KINDS],
            [topics.command(site, device, name) for name in COMMANDS])


def test_the_shipped_acl_lets_a_station_publish_every_kind_and_read_its_commands_and_no_other_devices() -> None:
    out = subprocess.run(["sh", str(DEPLOY / "acl-device"), "lab", "station1"], capture_output=True, text=True,
                         timeout=10, check=True).stdout
    rules = _acl_rules((DEPLOY / "acl.example").read_text() + out)
    mine_pub, mine_sub = station_topics("lab", "station1")
    other_pub, other_sub = station_topics("plant1", "pump7")  # the example's device, another account
    assert all(_matches(topics.command("lab", "station1", "+"), t) for t in mine_sub)  # its subscription
    for user, pub, sub, foreign_pub, foreign_sub in (("station1", mine_pub, mine_sub, other_pub, other_sub),
                                                      ("pump7", other_pub, other_sub, mine_pub, mine_sub)):
        for t in pub:
            assert _allowed(rules, user, "write", t), (user, t)
            assert not _allowed(rules, user, "read", t), (user, t)  # nobody's results but the hub's
        for t in sub:
            assert _allowed(rules, user, "read", t), (user, t)
            assert not _allowed(rules, user, "write", t), (user, t)  # a device cannot order itself
        for t in foreign_pub + foreign_sub:
            assert not _allowed(rules, user, "write", t) and not _allowed(rules, user, "read", t), (user, t)
        assert not _allowed(rules, user, "write", topics.topic("elsewhere", user, "result"))  # its site only
    for t in mine_pub + other_pub:
        assert _allowed(rules, "hub", "read", t) and not _allowed(rules, "hub", "write", t)
    for t in mine_sub + other_sub:
        assert _allowed(rules, "hub", "write", t)
    assert not any(_allowed(rules, "dashboard", "write", t) for t in mine_pub + mine_sub)
    assert "" not in rules  # nothing for anonymous clients


@pytest.mark.broker
def test_under_the_shipped_acl_a_station_receives_its_own_commands_only(tmp_path: Path) -> None:
    """The same through a real mosquitto: the hub's account orders two devices; each device's account,
    subscribed to all of edgekit/v1/#, receives its own commands only, and cannot send one."""
    import paho.mqtt.client as mqtt
    from test_hub_identity import _password_file

    from edgekit.broker import Mosquitto, installed

    if installed() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    broker = Mosquitto(tmp_path / "broker")
    acl = tmp_path / "broker" / "acl"
    devices = subprocess.run(["sh", str(DEPLOY / "acl-device"), "lab", "station1"], capture_output=True,
                             text=True, timeout=10, check=True).stdout
    acl.write_text((DEPLOY / "acl.example").read_text() + devices)
    passwd = _password_file(tmp_path / "broker" / "passwd", {"hub": "hubpw", "station1": "s1pw", "pump7": "p7pw"})
    broker.conf.write_text(f"listener {broker.port} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\n"
                           f"acl_file {acl}\nuser root\nlog_dest stderr\nlog_type error\nlog_type warning\n")

    def client(user: str, password: str) -> tuple[mqtt.Client, list[str]]:
        got: list[str] = []
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{user}", protocol=mqtt.MQTTv311)
        c.username_pw_set(user, password)
        c.on_message = lambda _c, _u, msg: got.append(msg.topic)
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        return c, got

    with broker:
        station, station_got = client("station1", "s1pw")
        pump, pump_got = client("pump7", "p7pw")
        hub, _ = client("hub", "hubpw")
        try:
            for c in (station, pump):  # everything: the ACL decides what arrives
                c.subscribe(f"{topics.PREFIX}/#", qos=1)
            time.sleep(0.5)
            # Each device tries to order the other and itself; the broker drops all of it.
            for c, site, device in ((station, "plant1", "pump7"), (pump, "lab", "station1"),
                                    (station, "lab", "station1")):
                c.publish(topics.command(site, device, "trial-stop"), b"{}", qos=1).wait_for_publish(10)
            for site, device in (("lab", "station1"), ("plant1", "pump7")):
                for name in COMMANDS:
                    hub.publish(topics.command(site, device, name), b"{}", qos=1).wait_for_publish(10)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and (len(station_got) < 2 or len(pump_got) < 2):
                time.sleep(0.05)
            time.sleep(0.3)
        finally:
            for c in (station, pump, hub):
                c.disconnect()
                c.loop_stop()
    assert station_got == [topics.command("lab", "station1", n) for n in COMMANDS]
    assert pump_got == [topics.command("plant1", "pump7", n) for n in COMMANDS]


# --- the hub: export and delete by pseudonym, retention, no names (SQLite and PostgreSQL) ----------------

NOW = 1_700_000_000.0


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh hub database of each kind; PostgreSQL's is test_hub_postgres.py's own schema (skipped, with
    the reason, when no server answers)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hub.db'}"
    return request.getfixturevalue("pg_url")


def _store(db: Any, messages: list[tuple[str, Any]], received_at: float) -> None:
    """Messages through the hub's own parser into the database, received at `received_at`."""
    stats = IngestStats()
    batch = to_batch([(topics.topic(msg.site, msg.device, kind), msg.encode()) for kind, msg in messages],
                     received_at, stats)
    assert stats.bad == 0 and stats.rejected == 0
    db.store(batch, now=received_at)


def _fill(db: Any) -> dict[str, list[str]]:
    """Two participants' trials at two stations, each trial with its answer and review filed under its id
    and labelled; a trial without a participant; ordinary results, one labelled. Returns ids per owner."""
    a, b = participant("AB-123"), participant("CD-456")
    owned = {a: [], b: [], "none": []}
    msgs: list[tuple[str, Any]] = []
    for device, seq, who in (("st1", 1, a), ("st2", 5, a), ("st1", 2, b), ("st1", 3, None)):
        t = trial(device, seq, participant=who)
        answer = result(device, seq, defer=True)  # the trial's answer, under the trial's id
        msgs += [("trial", t), ("result", answer), ("review", review(answer))]
        owned[who or "none"].append(t.id)
    msgs += [("result", result("st1", s)) for s in range(10, 15)]
    _store(db, msgs, NOW)
    for rid in [*owned[a], *owned[b], *owned["none"], topics.result_id("st1", 10)]:
        db.add_label(rid, "referred", reviewer="dr-k", at=NOW + 1)
    return owned


def test_export_holds_exactly_one_pseudonyms_rows_and_delete_removes_them_and_nothing_else(db_url: str) -> None:
    a, b = participant("AB-123"), participant("CD-456")
    with HubDB(db_url) as db:
        db.create()
        owned = _fill(db)
        got = db.participant_export(a)
        assert got["pseudonym"] == a and list(got["tables"]) == ["edgekit_trials", "edgekit_results",
                                                                  "edgekit_labels"]
        rows = got["tables"]
        assert sorted(r["id"] for r in rows["edgekit_trials"]) == sorted(owned[a])
        assert all(r["participant"] == a and orjson.loads(r["payload"])["participant"] == a
                   for r in rows["edgekit_trials"])
        assert sorted(r["id"] for r in rows["edgekit_results"]) == sorted(owned[a])
        assert rows["edgekit_results"][0]["features"] is not None  # the review is the result row's
        assert sorted(r["result_id"] for r in rows["edgekit_labels"]) == sorted(owned[a])
        text = orjson.dumps(got).decode()
        assert b not in text and not any(i in text for i in owned[b] + owned["none"])

        before = (db.count(), db.count_trials())
        b_before = db.participant_export(b)
        assert db.participant_delete(a) == {"edgekit_labels": 2, "edgekit_results": 2, "edgekit_trials": 2}
        assert all(rows == [] for rows in db.participant_export(a)["tables"].values())
        assert db.participant_export(b) == b_before
        assert (db.count(), db.count_trials()) == (before[0] - 2, before[1] - 2)
        assert db.case(topics.result_id("st1", 10))["labels"]  # others' labels stay
        assert db.participant_delete(a) == {"edgekit_labels": 0, "edgekit_results": 0, "edgekit_trials": 0}
        with pytest.raises(DataError, match="must be a pseudonym"):
            db.participant_export("AB-123")  # a code is not a pseudonym: nothing is looked up by it


def test_the_cli_exports_to_a_private_file_and_deletes_after_asking(db_url: str, tmp_path: Path) -> None:
    a = participant("AB-123")
    with HubDB(db_url) as db:
        db.create()
        owned = _fill(db)

    def edgekit(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "edgekit", "hub", "participant", *args, "--db", db_url],
                              input=stdin, capture_output=True, text=True, timeout=120)

    out = tmp_path / "export" / "a.json"
    done = edgekit("export", a, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{a}: 2 trials, 2 results, 2 labels written to {out}"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert sorted(r["id"] for r in orjson.loads(out.read_bytes())["tables"]["edgekit_trials"]) == sorted(owned[a])
    kept = edgekit("delete", a, stdin="n\n")
    assert kept.returncode == 1 and "delete 2 trials, 2 results, 2 labels of" in kept.stdout
    gone = edgekit("delete", a, stdin="y\n")
    assert gone.returncode == 0 and gone.stdout.strip().endswith(f"{a}: deleted 2 labels, 2 results, 2 trials")
    again = edgekit("delete", a)
    assert again.returncode == 0 and again.stdout.strip() == f"{a}: the hub holds nothing"
    bad = edgekit("export", "Jane Doe", "--out", str(tmp_path / "x.json"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: participant must be a pseudonym")
    assert "Jane" not in bad.stderr and not (tmp_path / "x.json").exists()


def test_retention_deletes_what_the_hub_received_before_the_cutoff_only(db_url: str) -> None:
    old, new = NOW - 40 * DAY_S, NOW - 10 * DAY_S
    with HubDB(db_url) as db:
        db.create()
        _store(db, [("trial", trial("st1", 1, participant=participant("AB-123"))),
                    ("result", result("st1", 2, defer=True)), ("review", review(result("st1", 2, defer=True)))],
               old)
        _store(db, [("trial", trial("st1", 3, participant=participant("AB-123"))),
                    ("result", result("st1", 4, defer=True)),
                    ("result", result("st1", 1, defer=True))],  # filed under the old trial's id: goes with it
               new)
        for seq in (1, 2, 4):
            db.add_label(topics.result_id("st1", seq), "referred", reviewer="dr-k", at=new)
        assert apply_retention(db, 30, now=NOW) == {"edgekit_labels": 2, "edgekit_results": 2,
                                                     "edgekit_trials": 1}
        assert [t["id"] for t in db.trials()] == [topics.result_id("st1", 3)]
        assert db.count() == 1 and db.case(topics.result_id("st1", 4))["labels"]
        assert apply_retention(db, 30, now=NOW) == {"edgekit_labels": 0, "edgekit_results": 0,
                                                     "edgekit_trials": 0}


@pytest.mark.broker
def test_a_hub_started_with_retention_deletes_what_is_old_at_start(mosquitto: Any, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    db_url = f"sqlite:///{tmp_path / 'hub.db'}"
    with HubDB(db_url) as db:
        db.create()
        now = time.time()
        _store(db, [("trial", trial("st1", 1)), ("result", result("st1", 2))], now - 3 * DAY_S)
        _store(db, [("trial", trial("st1", 3)), ("result", result("st1", 4))], now)
    caplog.set_level(logging.INFO, logger="edgekit.hub")
    stop = threading.Event()
    hub = threading.Thread(target=run_hub, args=(mosquitto.url, db_url),
                           kwargs={"http": None, "stop": stop, "retention_days": 2}, daemon=True)
    hub.start()
    try:
        with HubDB(db_url) as db:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and db.count_trials() != 1:
                time.sleep(0.05)
            assert [t["id"] for t in db.trials()] == [topics.result_id("st1", 3)] and db.count() == 1
    finally:
        stop.set()
        hub.join(20)
    assert "hub.retention older_than_days=2 edgekit_labels=0 edgekit_results=1 edgekit_trials=1" in caplog.text
    with pytest.raises(ConfigError, match="--retention-days"):
        run_hub(mosquitto.url, db_url, http=None, retention_days=0)


def test_an_older_hub_database_gets_the_participant_column_and_its_index(db_url: str) -> None:
    import sqlalchemy as sa

    from edgekit.hub import db as hubdb

    before = sa.MetaData()  # edgekit_trials as hubs before issue 13 made it, with one of their rows
    old = sa.Table(hubdb.trials.name, before, *[sa.Column(c.name, c.type, primary_key=c.primary_key,
                                                          nullable=c.nullable)
                                                for c in hubdb.trials.columns if c.name != "participant"])
    row = hubdb.trial_row(trial("st1", 1), NOW)
    with HubDB(db_url) as db:
        before.create_all(db.engine)
        with db.begin() as conn:
            conn.execute(old.insert().values({k: v for k, v in row.items() if k != "participant"}))
    with HubDB(db_url) as db:
        db.create()
        db.create()  # a second start changes nothing
        inspector = sa.inspect(db.engine)
        assert "participant" in {c["name"] for c in inspector.get_columns(hubdb.trials.name)}
        assert "ix_edgekit_trials_participant" in {i["name"] for i in inspector.get_indexes(hubdb.trials.name)}
        _store(db, [("trial", trial("st1", 2, participant=participant("AB-123")))], NOW)
        assert [r["id"] for r in db.participant_export(participant("AB-123"))["tables"]["edgekit_trials"]] == [
            topics.result_id("st1", 2)]
        assert [(t["id"], t["participant"]) for t in db.trials()] == [(topics.result_id("st1", 2),
                                                                       participant("AB-123")),
                                                                      (topics.result_id("st1", 1), None)]


NAME_WORDS = {"name", "names", "firstname", "lastname", "fullname", "surname", "forename", "patient",
              "person", "birth", "birthdate", "dob", "email", "phone", "address", "street"}


def test_nothing_on_the_hub_holds_a_name(db_url: str) -> None:
    """No column of the hub's tables, as declared (SQLAlchemy metadata) and as created in the database,
    is meant for a person's name or other identity: its name and its words (split at '_') are checked
    against name, first/last/full name, surname, patient, birth date, email, phone, address.

    The one exception is edgekit_users.name: reviewer accounts are staff who log in to the review page,
    not participants; no participant data refers to them but the labels' `reviewer`. A participant is a
    pseudonym only (edgekit_trials.participant, refused by the contract unless it is one), and a trial
    payload with a key the contract does not know, a "name" among them, is refused before it is stored
    (tests/test_contract.py). `last_seen` (devices) is the time of a device's last message."""
    import sqlalchemy as sa

    from edgekit.hub import db as hubdb

    def named(column: str) -> bool:
        words = column.lower().split("_")
        return column.lower().replace("_", "") in NAME_WORDS or bool(set(words) & NAME_WORDS)

    declared = {(t.name, c.name) for t in hubdb.metadata.sorted_tables for c in t.columns}
    with HubDB(db_url) as db:
        db.create()
        inspector = sa.inspect(db.engine)
        created = {(t, c["name"]) for t in inspector.get_table_names() for c in inspector.get_columns(t)}
    assert created == declared
    assert {col for col in declared if named(col[1])} == {("edgekit_users", "name")}
    assert ("edgekit_trials", "participant") in declared
