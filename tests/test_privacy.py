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
import time
from pathlib import Path

import pytest

from edgekit import privacy, topics
from edgekit.errors import ConfigError, DataError

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
