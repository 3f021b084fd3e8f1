"""The MQTT transport against a real mosquitto: exactly-once online delivery, outages, restarts, last will,
refused CONNACK. A real paho subscriber collects what the broker delivers; every wait is bounded."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import messagefactory
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgekit import topics
from edgekit.broker import Mosquitto, free_port
from edgekit.errors import ConfigError
from edgekit.mqtt import MqttSecurity
from edgekit.outbox import Outbox
from edgekit.transport import Transport

SITE, DEVICE = "plant1", "pump7"
STATUS = topics.topic(SITE, DEVICE, "status")


def wait_for(pred: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


def result(i: int) -> bytes:
    """This device's result with sequence number `i`, encoded by the contract."""
    return messagefactory.result(DEVICE, i, site=SITE).encode()


class Subscriber:
    """A real paho client with a persistent session (it survives broker restarts, as a hub would)."""

    def __init__(self, port: int, client_id: str = "test-hub", username: str | None = None,
                 password: str | None = None) -> None:
        self.results: list[dict[str, Any]] = []
        self.messages: Counter[str] = Counter()
        self.status: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self.client.reconnect_delay_set(0.1, 0.5)
        if username:
            self.client.username_pw_set(username, password)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topics.subscription(), qos=1)
        self.client.on_message = self._on_message
        self.subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        assert self.subscribed.wait(10), "subscriber never got SUBACK"

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        obj = topics.decode(msg.payload, msg.topic)
        kind = topics.parse_topic(msg.topic).kind
        with self.lock:
            self.messages[kind] += 1
            if kind == "result":
                self.results.extend(topics.results_of(obj))
            elif kind == "status":
                self.status.append(obj)

    def ids(self) -> Counter[int]:
        with self.lock:
            return Counter(r["seq"] for r in self.results)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained_status(port: int, timeout_s: float = 10.0, username: str | None = None,
                    password: str | None = None) -> dict[str, Any]:
    """What a device's status topic holds for a newcomer (the retained message)."""
    got: list[dict[str, Any]] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"peek-{time.monotonic_ns()}")
    if username:
        client.username_pw_set(username, password)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(STATUS, qos=1)
    client.on_message = lambda c, u, m: got.append({**topics.decode(m.payload, m.topic), "_retain": m.retain})
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        wait_for(lambda: bool(got), timeout_s, "a retained status")
    finally:
        client.disconnect()
        client.loop_stop()
    return got[-1]


@pytest.mark.broker
@pytest.mark.parametrize("batch_interval_s", [0.0, 0.05], ids=["per-result", "batched"])
def test_online_results_arrive_exactly_once(mosquitto: Mosquitto, tmp_path: Path,
                                            batch_interval_s: float) -> None:
    n = 400 if batch_interval_s == 0 else 3000
    sub = Subscriber(mosquitto.port)
    try:
        with Outbox(tmp_path / "o.db") as ob, Transport(
                mosquitto.url, site=SITE, device=DEVICE, outbox=ob, batch_interval_s=batch_interval_s,
                max_batch=250, status_extra=lambda: {"model_version": "m@1", "queued": ob.backlog()}) as tr:
            wait_for(lambda: tr.connected, 10, "CONNACK")
            sock = tr._client.socket()  # FIELD-NOTES: without TCP_NODELAY latency tails reach 35-41 ms
            assert sock is not None and sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            for i in range(n):
                tr.send("result", result(i))
            deferred = messagefactory.result(DEVICE, n, site=SITE, defer=True)
            tr.send("review", messagefactory.review(deferred).encode())
            assert tr.flush(30), tr.stats()
            wait_for(lambda: sum(sub.ids().values()) >= n, 30, f"{n} results at the subscriber")
            time.sleep(0.2)  # a duplicate would arrive right behind
            ids = sub.ids()
            assert set(ids) == set(range(n)) and max(ids.values()) == 1
            assert not any(r.get("replayed") for r in sub.results)
            stats = tr.stats()
            assert stats["acked"] == n + 1 and stats["queued"] == 0 and ob.backlog() == 0
            if batch_interval_s > 0:
                assert sub.messages["result"] < n / 10  # batched, at most 250 per message
                assert stats["messages"] == sub.messages["result"] + 1
            else:
                assert sub.messages["result"] == n
            assert sub.messages["review"] == 1
            online = retained_status(mosquitto.port)
            assert online["state"] == "online" and online["_retain"]
            assert online["model_version"] == "m@1" and "dropped" in online
        offline = retained_status(mosquitto.port)
        assert offline["state"] == "offline" and offline["reason"] == "closed" and offline["_retain"]
    finally:
        sub.close()


@pytest.mark.broker
@pytest.mark.slow
def test_ten_second_outage_loses_nothing(mosquitto: Mosquitto, tmp_path: Path) -> None:
    sub = Subscriber(mosquitto.port)
    sent_during: list[int] = []
    try:
        with Transport(mosquitto.url, site=SITE, device=DEVICE, outbox=tmp_path / "o.db",
                       batch_interval_s=0.02, reconnect_max_s=1.0) as tr:
            wait_for(lambda: tr.connected, 10, "CONNACK")
            i = 0
            for _ in range(200):  # before: a steady trickle, some of it in flight when the broker dies
                tr.send("result", result(i))
                i += 1
                time.sleep(0.001)
            mosquitto.stop()
            wait_for(lambda: not tr.connected, 5, "the transport to notice the outage")
            outage_end = time.monotonic() + 10.0
            while time.monotonic() < outage_end:
                tr.send("result", result(i))
                sent_during.append(i)
                i += 1
                assert not tr.connected
                time.sleep(0.02)
            assert tr.stats()["queued"] >= len(sent_during)
            mosquitto.start()
            wait_for(lambda: tr.connected, 15, "reconnect after the outage")
            for _ in range(100):
                tr.send("result", result(i))
                i += 1
            assert tr.flush(30), tr.stats()
            wait_for(lambda: set(sub.ids()) >= set(range(i)), 30, "every result at the subscriber")
            by_id: dict[int, bool] = {}
            for r in sub.results:
                by_id[r["seq"]] = by_id.get(r["seq"], False) or bool(r.get("replayed"))
            assert set(by_id) == set(range(i)), "missing results"
            assert all(by_id[k] for k in sent_during), "results queued during the outage must say replayed"
            assert tr.stats()["reconnects"] == 1
            assert len(sent_during) > 100
    finally:
        sub.close()


@pytest.mark.broker
def test_restart_replays_what_a_dead_process_left(mosquitto: Mosquitto, tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    mosquitto.stop()
    with Transport(mosquitto.url, site=SITE, device=DEVICE, outbox=path, reconnect_max_s=0.5) as tr:
        for i in range(50):
            tr.send("result", result(i))
        assert not tr.connected and tr.stats()["queued"] == 50
    # The process "died" without flushing: nothing left the outbox.
    mosquitto.start()
    sub = Subscriber(mosquitto.port)
    try:
        with Transport(mosquitto.url, site=SITE, device=DEVICE, outbox=path, batch_interval_s=0.05) as tr:
            assert tr.flush(15), tr.stats()
            wait_for(lambda: len(sub.ids()) >= 50, 15, "the replayed results")
            assert set(sub.ids()) == set(range(50))
            assert all(r["replayed"] is True for r in sub.results)
            assert tr.stats()["replayed"] == 50
    finally:
        sub.close()


def test_broker_urls_and_files_are_checked(tmp_path: Path) -> None:
    """The url's own checks are tests/test_mqtt.py's; here: the transport raises them, before any outbox."""
    for bad in ("http://broker:1883", "mqtt://", "mqtt://broker:notaport", "broker:1883"):
        with pytest.raises(ConfigError, match="mqtt.url"):
            Transport(bad, site=SITE, device=DEVICE, outbox=tmp_path / "bad.db")
    with pytest.raises(ConfigError, match="site/device_id"):
        Transport(None, site="a/b", device=DEVICE, outbox=Path("unused.db"))
    with pytest.raises(ConfigError, match="no-such-ca.pem"):
        Transport("mqtts://127.0.0.1:1", site=SITE, device=DEVICE, outbox=tmp_path / "o.db",
                  security=MqttSecurity(ca_file=tmp_path / "no-such-ca.pem"))
    assert not list(tmp_path.iterdir())  # no outbox was opened for a transport that could not be built


def test_offline_mode_queues_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="edgekit.transport"):
        with Transport(None, site=SITE, device=DEVICE, outbox=tmp_path / "o.db") as tr:
            for i in range(5):
                tr.send("result", result(i))
            assert not tr.connected
            assert tr.flush(0.1) is False
            assert tr.stats()["queued"] == 5
    assert [m for m in caplog.messages if m.startswith("transport.offline reason=no-broker queued=0")]
    with Outbox(tmp_path / "o.db") as ob:
        assert all(r.replayed for r in ob.pending(10)) and ob.backlog() == 5


WILL_CHILD = """
import sys, time
from pathlib import Path
from edgekit.errors import ConfigError
from edgekit.transport import Transport
tr = Transport(sys.argv[1], site=sys.argv[2], device=sys.argv[3], outbox=Path(sys.argv[4]), keepalive_s=2)
deadline = time.monotonic() + 20
while not tr.connected and time.monotonic() < deadline:
    time.sleep(0.02)
print("connected" if tr.connected else "never-connected", flush=True)
time.sleep(60)
"""


@pytest.mark.broker
@pytest.mark.parametrize("how", [
    pytest.param("kill", id="sigkill"),
    pytest.param("freeze", id="sigstop-keepalive", marks=pytest.mark.slow),
])
def test_vanished_device_leaves_retained_offline_will(mosquitto: Mosquitto, tmp_path: Path, how: str) -> None:
    """SIGKILL: the kernel closes the socket and the broker sends the will at once. SIGSTOP: the socket stays
    open and silent, as in a network partition; the broker sends the will after 1.5 x keepalive (3 s)."""
    child = subprocess.Popen([sys.executable, "-c", WILL_CHILD, mosquitto.url, SITE, DEVICE,
                              str(tmp_path / "o.db")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"connected"
        wait_for(lambda: retained_status(mosquitto.port)["state"] == "online", 10, "the birth message")
        vanished = time.monotonic()
        os.kill(child.pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        wait_for(lambda: retained_status(mosquitto.port)["state"] == "offline", 15, "the last will")
        waited_s = time.monotonic() - vanished
        will = retained_status(mosquitto.port)
        assert will["reason"] == "lost" and will["_retain"] and will["device"] == DEVICE
        assert will["ts"] <= time.time() - waited_s + 1  # stamped when the device connected, not when it died
        if how == "freeze":
            assert waited_s >= 2.5, f"will came after {waited_s:.1f}s, before keepalive expiry"
    finally:
        child.kill()
        child.wait(10)


def _password_file(path: Path, users: dict[str, str]) -> Path:
    """A mosquitto password file ($6$: salted SHA-512, what mosquitto_passwd wrote before 2.0)."""
    lines = []
    for user, password in users.items():
        salt = os.urandom(12)
        digest = hashlib.sha512(password.encode() + salt).digest()
        lines.append(f"{user}:$6${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}\n")
    path.write_text("".join(lines))
    return path


def _auth_broker(workdir: Path, user: str, password: str) -> Mosquitto:
    """The test broker, but with anonymous access off and one user."""
    broker = Mosquitto(workdir)
    passwd = _password_file(workdir / "passwd", {user: password})
    broker.conf.write_text(f"listener {broker.port} 127.0.0.1\nallow_anonymous false\n"
                           f"password_file {passwd}\nuser root\nlog_dest stderr\nlog_type error\n")
    return broker


@pytest.mark.broker
def test_refused_connack_never_reports_connected(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with _auth_broker(tmp_path / "auth", "edge", "s3cret") as broker:
        seen_connected = []
        with caplog.at_level(logging.WARNING, logger="edgekit.transport"):
            with Transport(broker.url, site=SITE, device=DEVICE, outbox=tmp_path / "bad.db",
                           security=MqttSecurity(username="edge", password="wrong"), reconnect_max_s=0.5) as tr:
                deadline = time.monotonic() + 10
                while tr.last_refusal is None and time.monotonic() < deadline:
                    seen_connected.append(tr.connected)
                    time.sleep(0.005)
                time.sleep(0.3)
                seen_connected.append(tr.connected)
                tr.send("result", result(1))
                assert tr.stats()["queued"] == 1
        assert tr.last_refusal in ("Not authorized", "Bad user name or password")
        assert not any(seen_connected)
        refusals = [m for m in caplog.messages if m.startswith("transport.refused")]
        assert refusals and tr.last_refusal in refusals[0] and re.search(r"code=13[45]\b", refusals[0])
        # The same broker with the right password: the refusal above was about the credentials.
        with Transport(broker.url, site=SITE, device=DEVICE, outbox=tmp_path / "good.db",
                       security=MqttSecurity(username="edge", password="s3cret")) as tr:
            wait_for(lambda: tr.connected, 10, "CONNACK with the right password")


def _tls_files(workdir: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate (what an operator gets from
    their PKI): ca, cert, key (the server's), client_cert, client_key."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))

    def cert(subject: str, key: Any, issuer: str, signer: Any, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(valid[0]).not_valid_after(valid[1])
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            import ipaddress
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("edgekit test CA", ca_key, "edgekit test CA", ca_key, True)
    server = cert("127.0.0.1", server_key, "edgekit test CA", ca_key, False)
    client = cert(DEVICE, client_key, "edgekit test CA", ca_key, False)
    files = {"ca": workdir / "ca.crt", "cert": workdir / "server.crt", "key": workdir / "server.key",
             "client_cert": workdir / "client.crt", "client_key": workdir / "client.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, crt, key in (("cert", server, server_key), ("client_cert", client, client_key)):
        files[name].write_bytes(crt.public_bytes(serialization.Encoding.PEM))
        files[name.replace("cert", "key")].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()))
    return files


DEPLOY_MOSQUITTO = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto"


def production_broker(workdir: Path, tls: dict[str, Path]) -> tuple[Mosquitto, int]:
    """deploy/mosquitto/production.conf as shipped, its paths and ports moved into `workdir` (its passwd and acl
    files there, its data in workdir/broker/data): the devices' TLS listener (its port returned) and the hub's
    loopback listener (the broker's .port)."""
    conf = (DEPLOY_MOSQUITTO / "production.conf").read_text()
    broker = Mosquitto(workdir / "broker")
    tls_port = free_port()
    (workdir / "broker" / "data").mkdir(parents=True)
    for old, new in (("/var/lib/mosquitto/", f"{workdir}/broker/data/"),
                     ("/etc/mosquitto/passwd", str(workdir / "passwd")), ("/etc/mosquitto/acl", str(workdir / "acl")),
                     ("listener 1883 127.0.0.1", f"listener {broker.port} 127.0.0.1"),
                     ("listener 8883\n", f"listener {tls_port} 127.0.0.1\n"),
                     ("/etc/mosquitto/certs/ca.crt", str(tls["ca"])),
                     ("/etc/mosquitto/certs/server.crt", str(tls["cert"])),
                     ("/etc/mosquitto/certs/server.key", str(tls["key"]))):
        assert old in conf, old
        conf = conf.replace(old, new)
    broker.conf.write_text(conf + "user root\n")  # root in CI: keep it, so the tmp dir stays writable
    return broker, tls_port


@pytest.mark.broker
def test_production_config_authenticates_and_enforces_acl(tmp_path: Path) -> None:
    """deploy/mosquitto/production.conf as shipped, paths and ports moved: devices over TLS, hub on loopback."""
    (tmp_path / "prod").mkdir()
    (tmp_path / "prod" / "acl").write_text((DEPLOY_MOSQUITTO / "acl.example").read_text())
    _password_file(tmp_path / "prod" / "passwd", {"hub": "hubpw", DEVICE: "devpw", "pump8": "pw8"})
    tls = _tls_files(tmp_path / "prod")
    broker, tls_port = production_broker(tmp_path / "prod", tls)
    device_url = f"mqtts://127.0.0.1:{tls_port}"
    with broker:
        hub = Subscriber(broker.port, client_id="prod-hub", username="hub", password="hubpw")
        try:
            with Transport(device_url, site=SITE, device=DEVICE, outbox=tmp_path / "dev.db",
                           security=MqttSecurity(username=DEVICE, password="devpw", ca_file=tls["ca"]),
                           batch_interval_s=0.02) as tr:
                for i in range(20):
                    tr.send("result", result(i))
                assert tr.flush(15), tr.stats()
                wait_for(lambda: len(hub.ids()) >= 20, 10, "the device's results at the hub")
                online = retained_status(broker.port, username="hub", password="hubpw")
                assert online["state"] == "online"
            closed = retained_status(broker.port, username="hub", password="hubpw")
            assert closed["state"] == "offline" and closed["reason"] == "closed"
            # Another device's valid account may not write pump7's topics: mosquitto acks and drops it.
            with Transport(device_url, site=SITE, device=DEVICE, outbox=tmp_path / "impostor.db",
                           security=MqttSecurity(username="pump8", password="pw8", ca_file=tls["ca"]),
                           client_id="impostor") as tr:
                wait_for(lambda: tr.connected, 10, "the impostor's CONNACK")
                for i in range(1000, 1010):
                    tr.send("result", result(i))
                assert tr.flush(15), tr.stats()
            time.sleep(0.3)
            assert set(hub.ids()) == set(range(20))
            assert retained_status(broker.port, username="hub", password="hubpw") == closed  # not the impostor's
            # No account, or plain TCP on the hub's loopback listener without one: refused.
            for url in (device_url, broker.url):
                with Transport(url, site=SITE, device=DEVICE, outbox=tmp_path / "anon.db", reconnect_max_s=0.5,
                               security=MqttSecurity(ca_file=tls["ca"]) if url == device_url else None) as tr:
                    wait_for(lambda: tr.last_refusal is not None, 10, "the anonymous refusal")  # noqa: B023
                    assert not tr.connected
        finally:
            hub.close()
