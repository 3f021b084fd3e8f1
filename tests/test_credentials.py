"""A broker account per device (issue 16): `edgekit hub add-device` writes the device's password file, its
entry in mosquitto's password file and its ACL block. Under them, a device cannot write another device's topics
nor read the fleet's results (acceptance 2: a real mosquitto with that password file and ACL), and a signed
agent and the hub reach the broker over TLS with a CA made here (acceptance 4)."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from test_transport import _tls_files, wait_for

from edgekit import topics
from edgekit.broker import Mosquitto, installed
from edgekit.hub.credential import ACL_DEVICE, acl_lines, add_device, mosquitto_hash

pytest.importorskip("sqlalchemy", reason="the hub extra")
DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto"


def cli_add(tmp: Path, name: str, site: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgekit", "hub", "add-device", name, "--site", site,
                           "--passwd", str(tmp / "passwd"), "--acl", str(tmp / "acl"), "--out", str(tmp / "devices")],
                          capture_output=True, text=True, timeout=60)


def password(tmp: Path, name: str) -> str:
    return (tmp / "devices" / f"{name}.pw").read_text().strip()


def test_add_device_writes_a_private_password_the_broker_entry_and_the_acl_block(tmp_path: Path) -> None:
    out = cli_add(tmp_path, "pump7", "plant1")
    assert out.returncode == 0, out.stderr
    own = tmp_path / "devices" / "pump7.pw"
    assert (own.stat().st_mode & 0o777, (tmp_path / "passwd").stat().st_mode & 0o777) == (0o600, 0o640)
    assert len(password(tmp_path, "pump7")) >= 32 and password(tmp_path, "pump7") not in out.stdout + out.stderr
    entry = (tmp_path / "passwd").read_text()
    assert entry.startswith("pump7:$7$") and entry.count("\n") == 1
    # a new ACL: the hub's block, then the device's, both exactly what the one acl-device script prints
    assert (tmp_path / "acl").read_text() == acl_lines("--hub") + acl_lines("plant1", "pump7")
    assert str(tmp_path / "devices" / "pump7.pw") in out.stdout and 'username = "pump7"' in out.stdout
    # a second device appends its block only; a device again, or a bad name, is one line, exit 2, nothing written
    assert cli_add(tmp_path, "pump8", "plant1").returncode == 0
    before = {p: p.read_bytes() for p in (tmp_path / "passwd", tmp_path / "acl")}
    for name, site, words in (("pump7", "plant2", "'pump7' already has an account"),
                              ("a/b", "plant1", "bad site or device name 'a/b'"),
                              ("pump9", "plant 1", "bad site or device name 'plant 1'")):
        again = cli_add(tmp_path, name, site)
        lines = again.stderr.strip().splitlines()
        assert again.returncode == 2 and len(lines) == 1 and words in lines[0], again.stderr
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in (tmp_path / "devices").iterdir()) == ["pump7.pw", "pump8.pw"]


def test_the_shipped_acl_example_is_the_scripts_output_and_deploy_runs_the_one_copy() -> None:
    example = (DEPLOY / "acl.example").read_text()
    hub_block = [line for line in acl_lines("--hub").splitlines() if not line.startswith("#")]
    assert "\n".join(hub_block) in example
    shim = subprocess.run(["sh", str(DEPLOY / "acl-device"), "plant1", "pump7"], capture_output=True, text=True,
                          timeout=10, check=True).stdout
    assert shim == acl_lines("plant1", "pump7")
    assert "topic write" in ACL_DEVICE.read_text() and "topic" not in (DEPLOY / "acl-device").read_text()


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd is not installed")
def test_the_fallback_hash_is_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    (tmp_path / "passwd").touch()
    subprocess.run(["mosquitto_passwd", str(tmp_path / "passwd"), "dev"], input="pw-1\npw-1\n", text=True,
                   capture_output=True, check=True)
    _, scheme, rounds, salt, _ = (tmp_path / "passwd").read_text().strip().split(":", 1)[1].split("$")
    assert (scheme, rounds) == ("7", "101")
    assert f"dev:{mosquitto_hash('pw-1', base64.b64decode(salt))}\n" == (tmp_path / "passwd").read_text()


class Client:
    """A plain paho client with one account; records the CONNACK and every message it receives."""

    def __init__(self, port: int, user: str | None, secret: str | None, **tls: Any) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.connack: Any = None
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{user}-{time.monotonic_ns()}",
                             protocol=mqtt.MQTTv311)
        if user:
            self.c.username_pw_set(user, secret)
        if tls:
            self.c.tls_set(ca_certs=str(tls["ca"]))
        self.c.on_connect = lambda _c, _u, _f, rc, _p: setattr(self, "connack", rc)
        self.c.on_message = lambda _c, _u, msg: self.got.append((msg.topic, msg.payload))
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        wait_for(lambda: self.connack is not None, 10, f"{user}'s CONNACK")

    @property
    def accepted(self) -> bool:
        return not self.connack.is_failure

    def publish(self, topic: str, payload: bytes = b"{}") -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _broker(workdir: Path, tls: dict[str, Path] | None = None) -> Mosquitto:
    """A mosquitto with accounts only: the password file and ACL in `workdir` (from add-device)."""
    if installed() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    broker = Mosquitto(workdir / "broker")
    conf = f"listener {broker.port} 127.0.0.1\n"
    if tls:
        conf += f"cafile {tls['ca']}\ncertfile {tls['cert']}\nkeyfile {tls['key']}\n"
    broker.conf.write_text(conf + f"allow_anonymous false\npassword_file {workdir / 'passwd'}\n"
                           f"acl_file {workdir / 'acl'}\nuser root\nlog_dest stderr\nlog_type error\n")
    return broker


def _add_hub(workdir: Path, secret: str) -> None:
    with (workdir / "passwd").open("a") as fh:
        fh.write(f"hub:{mosquitto_hash(secret)}\n")


@pytest.mark.broker
def test_a_device_cannot_write_another_devices_topics_nor_read_the_fleets_results(tmp_path: Path) -> None:
    for name, site in (("pump7", "plant1"), ("press1", "plant2")):
        assert cli_add(tmp_path, name, site).returncode == 0
    # pump8 through the fallback hash (no mosquitto_passwd), so both kinds of entry are tried at the broker
    add_device("pump8", "plant1", passwd=tmp_path / "passwd", acl=tmp_path / "acl", out_dir=tmp_path / "devices",
               use_mosquitto_passwd=False)
    _add_hub(tmp_path, "hubpw")
    with _broker(tmp_path) as broker:
        port = broker.port
        clients = {name: Client(port, name, password(tmp_path, name)) for name in ("pump7", "pump8", "press1")}
        hub = Client(port, "hub", "hubpw")
        try:
            assert all(c.accepted for c in [*clients.values(), hub])
            for c in (hub, clients["pump7"]):  # pump7 asks for everything: the ACL decides what arrives
                c.c.subscribe(f"{topics.PREFIX}/#", qos=1)
            time.sleep(0.5)
            pump7 = clients["pump7"]
            own = topics.topic("plant1", "pump7", "result")
            forged = [topics.topic("plant1", "pump8", "result"), topics.topic("plant1", "pump8", "status"),
                      topics.topic("plant2", "press1", "result"), topics.topic("plant2", "pump7", "result"),
                      topics.command("plant1", "pump8", "trial-stop"), topics.command("plant1", "pump7", "x")]
            for topic in [own, *forged]:
                pump7.publish(topic, b'{"from": "pump7"}')
            fleet = [("pump8", topics.topic("plant1", "pump8", "result")),
                     ("press1", topics.topic("plant2", "press1", "result"))]
            for name, topic in fleet:
                clients[name].publish(topic, f'{{"from": "{name}"}}'.encode())
            order = topics.command("plant1", "pump7", "trial-stop")
            hub.publish(order)  # what pump7 may read: its own commands, from the hub
            wait_for(lambda: len(hub.got) >= 4 and pump7.got, 10, "the devices' results and pump7's command")
            time.sleep(0.5)  # anything forged or leaked would have arrived by now
            assert sorted(hub.got) == sorted([(own, b'{"from": "pump7"}'), (order, b"{}")]
                                             + [(t, f'{{"from": "{n}"}}'.encode()) for n, t in fleet])
            assert pump7.got == [(order, b"{}")]  # none of the fleet's results, nor its own
            # another device's password, the hub's, none: refused
            for user, secret in (("pump7", password(tmp_path, "pump8")), ("pump7", "hubpw"), (None, None)):
                other = Client(port, user, secret)
                assert not other.accepted, (user, other.connack)
                other.close()
        finally:
            for c in [*clients.values(), hub]:
                c.close()


@pytest.mark.broker
@pytest.mark.torch
def test_a_signed_agent_and_the_hub_talk_over_tls_with_a_private_ca_and_device_accounts(
        tmp_path: Path, stream_bundle: Path) -> None:
    from streamfactory import recording, write_csv
    from test_hub_ingest import HubCli

    from edgekit.hub.db import HubDB
    from edgekit.manifest import keygen, sign_bundle

    tls = _tls_files(tmp_path)
    bundle = tmp_path / "bundle"
    shutil.copytree(stream_bundle, bundle)
    private, public = keygen(tmp_path / "keys")
    sign_bundle(bundle, private)
    write_csv(tmp_path / "rec.csv", recording(1000.0, 2.0))
    assert cli_add(tmp_path, "pump7", "plant1").returncode == 0
    _add_hub(tmp_path, "hubpw")
    (tmp_path / "hub.pw").write_text("hubpw\n")
    os.chmod(tmp_path / "hub.pw", 0o600)
    db_url = f"sqlite:///{tmp_path / 'hub.db'}"
    with _broker(tmp_path, tls) as broker:
        url = f"mqtts://127.0.0.1:{broker.port}"
        (tmp_path / "agent.toml").write_text(
            f'device_id = "pump7"\nsite = "plant1"\nbundle = "{bundle}"\npublic_key = "{public}"\n'
            f'[source]\nkind = "replay"\npath = "{tmp_path / "rec.csv"}"\nspeed = 0\n'
            f'[mqtt]\nurl = "{url}"\nusername = "pump7"\npassword_file = "devices/pump7.pw"\nca_file = "{tls["ca"]}"\n'
            f'[outbox]\npath = "{tmp_path / "outbox.db"}"\n')
        hub = HubCli(tmp_path / "hub.log", url, db_url, "--username", "hub", "--password-file",
                     str(tmp_path / "hub.pw"), "--ca-file", str(tls["ca"]), "--client-id", "hub-tls")
        try:
            wait_for(lambda: "hub.connected" in hub.text(), 20, "the hub's TLS connection")
            time.sleep(0.5)  # its SUBACK
            agent = subprocess.run([sys.executable, "-m", "edgekit", "run", "--config", str(tmp_path / "agent.toml"),
                                    "--drain-timeout", "20"], capture_output=True, text=True, timeout=120)
            assert agent.returncode == 0, agent.stderr[-3000:]
            summary = dict(kv.split("=", 1) for kv in agent.stdout.split() if "=" in kv)
            windows = int(summary["windows"])
            assert windows > 5 and summary["queued"] == "0", agent.stdout
            with HubDB(db_url) as db:
                wait_for(lambda: db.count() == windows, 20, "every result at the hub")
        finally:
            log = hub.stop()
    assert "hubpw" not in log and password(tmp_path, "pump7") not in log + agent.stderr
