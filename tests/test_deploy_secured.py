"""A model rollout under the shipped security setup, end to end (issue 16): deploy/mosquitto/production.conf as
shipped (paths and ports moved, a CA made here), the hub's and two devices' accounts and the ACL from
`edgekit hub add-device`'s functions, two signed agents and the hub on its TLS listener, the hub's web pages
behind a TLS proxy as in deploy/README.md, and `edgekit deploy` of a new signed bundle fetched over https.
The canary, then the rest, run the new version; results flow and are stored once. Meanwhile a device account
cannot read the other device's bundle command (its token), cannot forge the other's rollout status, cannot
withdraw the other's command, and no account, a wrong password or another device's password is refused."""

from __future__ import annotations

import os
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import sqlalchemy as sa
from rolloutfactory import variant
from streamfactory import signal, write_csv
from test_credentials import Client
from test_rollout_fleet import _rollouts, _wait, wait_all_stored
from test_transport import _tls_files, production_broker, wait_for

from edgekit import topics
from edgekit.agent import Agent, Summary
from edgekit.broker import Mosquitto, free_port, installed
from edgekit.config import AgentConfig, validate
from edgekit.contract import archive
from edgekit.contract.messages import BundleCommand, Rollout, Status
from edgekit.hub import add_user, run_hub
from edgekit.hub.credential import add_device, mosquitto_hash
from edgekit.hub.db import HubDB, results
from edgekit.manifest import keygen
from edgekit.mqtt import MqttSecurity

pytestmark = [pytest.mark.broker, pytest.mark.torch, pytest.mark.slow]

SITE = "plant"
DEVICES = ("edge-1", "edge-2")
RATE_HZ = 1000.0  # the stream bundle's (tests/conftest.py stream_bundle)
HUB_PASSWORD = "hub-secret-0123456789"


def _shipped_broker(workdir: Path, tls: dict[str, Path]) -> tuple[Mosquitto, int]:
    """deploy/mosquitto/production.conf as shipped, its paths and ports moved into `workdir` (passwd and acl
    there): the devices' TLS listener (returned) and the hub's loopback listener (the broker's .port)."""
    if installed() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    return production_broker(workdir, tls)


class TlsProxy:
    """https://127.0.0.1:PORT in front of the hub's plain web server, as the TLS proxy deploy/README.md puts in
    front of the compose project's hub: TLS with the test CA's server certificate, bytes passed both ways."""

    def __init__(self, target_port: int, cert: Path, key: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.target_port = target_port
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        """One connection, both directions on this one thread, closed here only: a socket closed while another
        thread still sends on it frees its descriptor for the next file opened in this process (an agent's
        download), which that send would then write into."""
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
        except (OSError, ssl.SSLError):
            conn.close()
            return
        with tls, socket.create_connection(("127.0.0.1", self.target_port)) as upstream:
            try:
                while True:
                    ready = [tls] if tls.pending() else select.select([tls, upstream], [], [], 30)[0]
                    if not ready:
                        return
                    for src in ready:
                        data = src.recv(1 << 16)
                        if not data:
                            return
                        (upstream if src is tls else tls).sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


def _agent_config(device: str, bundle: Path, public_key: Path, recording: Path, url: str, tls: dict[str, Path],
                  tmp: Path) -> AgentConfig:
    """What deploy/README.md gives a device: its account and password file from add-device, the CA, a key; no
    [rollout] ca_file (it defaults to mqtt.ca_file, which also signed the hub proxy's certificate)."""
    return validate(AgentConfig, {
        "device_id": device, "site": SITE, "bundle": str(bundle), "public_key": str(public_key),
        "source": {"kind": "replay", "path": str(recording), "speed": 1},
        "mqtt": {"url": url, "username": device, "password_file": str(tmp / "devices" / f"{device}.pw"),
                 "ca_file": str(tls["ca"])},
        "outbox": {"path": str(tmp / f"{device}.db")}, "runtime": {"intra_op_threads": 1}, "metrics_interval_s": 2.0,
    }, "tests/test_deploy_secured.py")


def _password(tmp: Path, device: str) -> str:
    return (tmp / "devices" / f"{device}.pw").read_text().strip()


def test_a_signed_rollout_over_tls_under_the_shipped_acl(stream_bundle: Path, tmp_path: Path) -> None:
    private, public = keygen(tmp_path / "keys")
    v1 = variant(stream_bundle, tmp_path / "v1", private)
    v2 = variant(v1, tmp_path / "v2", private, changes={("data_fingerprint",): "2" * 64})
    versions = {"v1": archive.bundle_version(v1), "v2": archive.bundle_version(v2)}
    recording = write_csv(tmp_path / "stream.csv", signal(np.random.default_rng(7), int(60 * RATE_HZ), RATE_HZ))

    # Accounts as deploy/README.md makes them: the hub's password entry (what `mosquitto_passwd -b` writes) and
    # each device's password and ACL block from add-device (the first one starts the ACL with the hub's block).
    for device in DEVICES:
        add_device(device, SITE, passwd=tmp_path / "passwd", acl=tmp_path / "acl", out_dir=tmp_path / "devices")
    with (tmp_path / "passwd").open("a") as fh:
        fh.write(f"hub:{mosquitto_hash(HUB_PASSWORD)}\n")
    (tmp_path / "hub.pw").write_text(HUB_PASSWORD + "\n")
    os.chmod(tmp_path / "hub.pw", 0o600)
    tls = _tls_files(tmp_path)
    db_url = f"sqlite:///{tmp_path / 'hub.db'}"
    add_user(db_url, "alice", "correct horse")

    broker, tls_port = _shipped_broker(tmp_path, tls)
    url = f"mqtts://127.0.0.1:{tls_port}"
    hub_security = MqttSecurity(username="hub", password_file=tmp_path / "hub.pw", ca_file=tls["ca"])
    http_port = free_port()
    hub_stop, agents_stop = threading.Event(), threading.Event()
    summaries: dict[str, Summary] = {}

    def run_agent(device: str) -> None:
        with Agent(_agent_config(device, v1, public, recording, url, tls, tmp_path), agents_stop) as agent:
            summaries[device] = agent.run(drain_timeout_s=30)

    with broker:
        proxy = TlsProxy(http_port, tls["cert"], tls["key"])
        # The hub as deployed: its account over TLS, its shared subscription, secure cookies behind the proxy.
        hub = threading.Thread(target=run_hub, args=(url, db_url, f"127.0.0.1:{http_port}"),
                               kwargs={"client_id": "hub-1", "stop": hub_stop, "security": hub_security,
                                       "secure_cookies": True}, daemon=True)
        watcher = Client(tls_port, "hub", HUB_PASSWORD, ca=tls["ca"])  # the hub's account sees all the fleet says
        watcher.c.subscribe(f"{topics.PREFIX}/#", qos=1)
        agents = [threading.Thread(target=run_agent, args=(d,), daemon=True) for d in DEVICES]
        spy = None
        try:
            hub.start()
            time.sleep(1.0)  # the hub subscribes first
            for t in agents:
                t.start()
            with HubDB(db_url) as db:
                _wait(lambda: set(_rollouts(db)) == set(DEVICES) and all(
                    r["running"] == versions["v1"] for r in _rollouts(db).values()), 60)

                deploy = subprocess.Popen(
                    [sys.executable, "-m", "edgekit", "deploy", str(v2), "--site", SITE, "--url", proxy.url,
                     "--devices", ",".join(DEVICES), "--canary", "1", "--watch-s", "2", "--min-windows", "8",
                     "--deferral-band", "0,0.9", "--timeout-s", "60", "--public-key", str(public), "--db", db_url,
                     "--broker", url, "--username", "hub", "--password-file", str(tmp_path / "hub.pw"),
                     "--ca-file", str(tls["ca"])], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

                # While the canary runs: edge-2's own account tries to read edge-1's bundle command (the token
                # to its bundle), to forge edge-1's rollout status and to withdraw its command.
                canary_topic = topics.command(SITE, "edge-1", topics.BUNDLE_COMMAND)
                wait_for(lambda: any(t == canary_topic and p for t, p in watcher.got), 30, "the canary's command")
                cmd = BundleCommand.decode(next(p for t, p in watcher.got if t == canary_topic and p), canary_topic)
                assert cmd.url == f"{proxy.url}/bundles/{cmd.deployment}"  # fetched over https, the test CA's
                spy = Client(tls_port, "edge-2", _password(tmp_path, "edge-2"), ca=tls["ca"])
                subacks: list[list[int]] = []
                spy.c.on_subscribe = lambda _c, _u, _mid, codes, _p: subacks.append([c.value for c in codes])
                spy.c.subscribe([(canary_topic, 1), (topics.command(SITE, "edge-1", "+"), 1),
                                 (f"{topics.PREFIX}/{SITE}/edge-1/#", 1), (f"{topics.PREFIX}/#", 1)])
                wait_for(lambda: bool(subacks), 10, "the spy's SUBACK")
                forged = Status(SITE, "edge-1", "online", time.time(), model_version="stream@000000000000",
                                rollout=Rollout("rolled_back", running=versions["v1"], target=cmd.version,
                                                deployment=cmd.deployment, reason="forged by edge-2")).encode()
                spy.c.publish(topics.topic(SITE, "edge-1", "status"), forged, qos=1, retain=True).wait_for_publish(10)
                spy.c.publish(canary_topic, b"", qos=1, retain=True).wait_for_publish(10)  # withdraw it
                # the same status on its own topic: the broker passes it, the hub refuses another device's name
                spy.c.publish(topics.topic(SITE, "edge-2", "status"), forged, qos=1).wait_for_publish(10)
                # Had the broker passed the forged status, the hub would store edge-1 rolled back and the rollout
                # would stop (exit 5); had it passed the withdrawal, edge-1 would drop its command.
                assert deploy.poll() is None, "the forgeries came after the rollout ended"

                # No account, a wrong password, another device's password, the hub's name with a device's
                # password: refused on the devices' TLS listener; no account on the hub's loopback listener too.
                for port, user, secret, on_tls in (
                        (tls_port, None, None, True), (tls_port, "edge-1", "wrong", True),
                        (tls_port, "edge-1", _password(tmp_path, "edge-2"), True),
                        (tls_port, "hub", _password(tmp_path, "edge-1"), True), (broker.port, None, None, False)):
                    other = Client(port, user, secret, **({"ca": tls["ca"]} if on_tls else {}))
                    assert not other.accepted, (port, user, other.connack)
                    other.close()

                out, err = deploy.communicate(timeout=120)
                assert deploy.returncode == 0, out + err
                lines = out.splitlines()
                assert lines.index("canary: sent to edge-1") < lines.index("  edge-1: healthy") < \
                    lines.index("rest: sent to edge-2") < lines.index("  edge-2: healthy") < \
                    lines.index(f"done: 2 device(s) run {versions['v2']}"), out
                assert HUB_PASSWORD not in out + err

                # Both run v2: their statuses as the hub's account reads them, and the hub's database.
                def status(device: str) -> dict:
                    mine = [p for t, p in watcher.got if t == topics.topic(SITE, device, "status")]
                    return orjson.loads(mine[-1]) if mine else {}

                wait_for(lambda: all(status(d).get("rollout", {}).get("state") == "healthy" for d in DEVICES), 10,
                         "both statuses healthy")
                for d in DEVICES:
                    said = status(d)
                    assert (said["device"], said["model_version"], said["signature"]) == (
                        d, "stream@222222222222", "verified"), said
                    rollout = Rollout.from_obj(said["rollout"])
                    assert (rollout.running, rollout.previous, rollout.deployment) == (
                        versions["v2"], versions["v1"], cmd.deployment), said
                assert {d: (r["running"], r["state"]) for d, r in _rollouts(db).items()} == dict.fromkeys(
                    DEVICES, (versions["v2"], "healthy"))

                # What the spy got: nothing of edge-1's (the ACL refused or filtered each subscription), its own
                # bundle command once the rest were sent (so its subscriptions did work).
                assert all(t.startswith(f"{topics.PREFIX}/{SITE}/edge-2/command/") for t, _ in spy.got), spy.got
                own = [p for t, p in spy.got if t == topics.command(SITE, "edge-2", topics.BUNDLE_COMMAND) and p]
                assert own and BundleCommand.decode(own[-1], "spy").token != cmd.token
                # The broker dropped the forged status and the withdrawal: the hub's account never saw either.
                assert not [t for t, p in watcher.got if t == topics.topic(SITE, "edge-1", "status")
                            and b"forged by edge-2" in p]
                assert [p for t, p in watcher.got if t == canary_topic] == [p for t, p in watcher.got
                                                                              if t == canary_topic and p]

                # The hub's pages over https (the proxy, the test CA): /metrics counts the status the hub refused
                # for its name, the fleet page shows both devices on v2 and the deployment done.
                with httpx.Client(base_url=proxy.url, verify=ssl.create_default_context(cafile=str(tls["ca"])),
                                  timeout=10) as web:
                    assert _rejected_statuses(web.get("/metrics").text) == 1.0
                    login = web.get("/login").text
                    csrf = login.split('name="csrf" value="')[1].split('"')[0]
                    web.post("/login", data={"name": "alice", "password": "correct horse", "csrf": csrf})
                    page = web.get("/fleet")
                    assert page.status_code == 200, page.text[:500]
                    assert f"<code>{versions['v2']}</code>" in page.text and "2</b> of 2 healthy" in page.text

                agents_stop.set()
                for t in agents:
                    t.join(60)
                assert set(summaries) == set(DEVICES)
                _check_results(db, summaries)
        finally:
            agents_stop.set()
            for t in agents:
                t.join(30)
            hub_stop.set()
            hub.join(30)
            for c in (watcher, spy):
                if c is not None:
                    c.close()
            proxy.close()


def _rejected_statuses(text: str) -> float:
    """edgekit_hub_messages_total{kind="status", outcome="rejected"}, read by Prometheus' own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "edgekit_hub_messages_total" and s.labels == {"kind": "status", "outcome": "rejected"})


def _check_results(db: HubDB, summaries: dict[str, Summary]) -> None:
    """Every window each agent made is stored once: as many rows as windows, contiguous sequence numbers,
    received without a pause, v1's results then v2's."""
    wait_all_stored(db, summaries)
    with db.engine.connect() as conn:
        rows = conn.execute(sa.select(results.c.device, results.c.seq, results.c.received_at, results.c.model_version)
                            .order_by(results.c.device, results.c.seq)).all()
    for device, summary in summaries.items():
        mine = [r for r in rows if r.device == device]
        assert summary.queued == 0 and summary.windows == len(mine), (device, summary)
        seqs = [r.seq for r in mine]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), device  # none lost, none doubled
        assert max(np.diff([r.received_at for r in mine])) < 3.0, device  # delivered all along, swaps included
        runs = [mine[0].model_version]
        for r in mine[1:]:
            if r.model_version != runs[-1]:
                runs.append(r.model_version)
        assert runs == ["stream@000000000000", "stream@222222222222"], (device, runs)
