"""The hub's side of a model rollout (issue 16, edgekit/hub/deploy.py), without agents: the deployment and its
tokens in the database, /bundles/DEPLOYMENT for the bearer of one of its tokens only, the devices' rollout
states taken from their statuses through the ingest path, the canary first and the rest after it, the first
failure stopping the rollout, and the fleet page showing versions and progress."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from rolloutfactory import variant

from edgekit import topics
from edgekit.contract import archive
from edgekit.contract.messages import BundleCommand, Rollout, Status
from edgekit.errors import ConfigError
from edgekit.hub import deploy
from edgekit.hub.auth import hash_password
from edgekit.hub.db import HubDB, deployment_devices, deployments
from edgekit.hub.ingest import to_batch
from edgekit.hub.web import create_app
from edgekit.manifest import keygen

pytestmark = [pytest.mark.torch]

SITE = "plant"


@pytest.fixture(scope="module")
def bundle(stream_bundle, tmp_path_factory) -> Path:
    private, _ = keygen(tmp_path_factory.mktemp("keys"))
    return variant(stream_bundle, tmp_path_factory.mktemp("b") / "v2", private,
                   changes={("data_fingerprint",): "2" * 64})


@pytest.fixture
def db(tmp_path):
    with HubDB(f"sqlite:///{tmp_path / 'hub.db'}") as db:
        db.create()
        yield db


def report(db: HubDB, device: str, rollout: Rollout) -> None:
    """A device's retained status with its rollout, through the hub's own parse and store."""
    payload = Status(SITE, device, "online", time.time(), model_version="stream@x", rollout=rollout).encode()
    db.store(to_batch([(topics.topic(SITE, device, "status"), payload)], time.time()))


class Fleet:
    """Stands in for the broker and the devices: each command sent is answered, a moment later, with the
    statuses the device would publish (`script[device]`: the states it goes through)."""

    def __init__(self, db: HubDB, script: dict[str, list[tuple[str, str | None]]]) -> None:
        self.db, self.script, self.sent = db, script, []
        self.threads: list[threading.Thread] = []
        self.cleared: list[str] = []

    def clear(self, site: str, device: str) -> None:
        self.cleared.append(device)

    def send(self, site: str, device: str, payload: bytes) -> None:
        cmd = BundleCommand.decode(payload, device)
        self.sent.append((device, cmd))

        def play() -> None:
            for state, reason in self.script[device]:
                time.sleep(0.05)
                report(self.db, device, Rollout(state, running=cmd.version if state == "healthy" else "old",
                                                target=cmd.version, deployment=cmd.deployment, reason=reason))

        self.threads.append(threading.Thread(target=play, daemon=True))
        self.threads[-1].start()


def spec(bundle: Path, **kw) -> deploy.DeploySpec:
    return deploy.DeploySpec(bundle=bundle, site=SITE, url="http://hub.example:8080",
                             **{"devices": ("d1", "d2", "d3"), "watch_s": 1.0, "timeout_s": 10.0, **kw})


def test_a_deployment_serves_its_archive_to_its_devices_tokens_only(db, bundle):
    dep = deploy.create(db, spec(bundle))
    client = TestClient(create_app(db), base_url="http://127.0.0.1")
    ok = client.get(f"/bundles/{dep.id}", headers={"Authorization": f"Bearer {dep.targets[1].token}"})
    assert ok.status_code == 200 and ok.content == archive.pack(bundle)
    assert ok.headers["content-type"] == "application/x-tar"
    other = deploy.create(db, spec(bundle))
    for headers, where in (({}, dep.id), ({"Authorization": "Bearer " + "x" * 43}, dep.id),
                           ({"Authorization": f"Basic {dep.targets[0].token}"}, dep.id),
                           ({"Authorization": f"Bearer {other.targets[0].token}"}, dep.id),  # another deployment's
                           ({"Authorization": f"Bearer {dep.targets[0].token}"}, "no-such-deployment")):
        assert client.get(f"/bundles/{where}", headers=headers).status_code == 403
    with db.engine.connect() as conn:  # tokens are kept as their sha256 only
        stored = conn.execute(sa.select(deployment_devices.c.token_sha256)).scalars().all()
    assert not {t.token for t in dep.targets} & set(stored) and len(stored) == 6


def test_the_canary_goes_first_and_the_rest_after_it_is_healthy(db, bundle):
    fleet = Fleet(db, dict.fromkeys(("d1", "d2", "d3"), [("fetching", None), ("watching", None), ("healthy", None)]))
    lines: list[str] = []
    dep = deploy.create(db, spec(bundle, canary=1))
    outcome = deploy.run(db, dep, fleet, lines.append, poll_s=0.02)
    assert outcome.state == "done" and outcome.devices == dict.fromkeys(("d1", "d2", "d3"), "healthy")
    assert [d for d, _ in fleet.sent] == ["d1", "d2", "d3"] and fleet.cleared == []
    assert lines.index("canary: sent to d1") < lines.index("  d1: healthy") < lines.index("rest: sent to d2, d3")
    cmd = fleet.sent[0][1]
    assert (cmd.version, cmd.url, cmd.watch_s, cmd.deferral_band) == (
        archive.bundle_version(bundle), f"http://hub.example:8080/bundles/{dep.id}", 1.0, (0.0, 0.5))
    assert len({c.token for _, c in fleet.sent}) == 3
    with db.engine.connect() as conn:
        assert conn.execute(sa.select(deployments.c.state)).scalar_one() == "done"
    page = _fleet_page(db)
    assert f"<code>{cmd.version}</code>" in page and "3</b> of 3 healthy" in page
    assert _metrics(db) == {("edgekit_hub_rollout_devices", "healthy"): 3.0, ("edgekit_hub_deployments", "done"): 1.0}


@pytest.mark.parametrize(("state", "reason"), [("rolled_back", "failed on-device parity: labels agree on 0/150"),
                                                ("refused", "signature does not match manifest.json")])
def test_a_canary_that_fails_stops_the_rollout_and_the_rest_get_nothing(db, bundle, state, reason):
    fleet = Fleet(db, {"d1": [("fetching", None), (state, reason)]})
    lines: list[str] = []
    outcome = deploy.run(db, deploy.create(db, spec(bundle)), fleet, lines.append, poll_s=0.02)
    assert outcome.state == "stopped" and outcome.reason == f"d1 {state}: {reason}"
    assert [d for d, _ in fleet.sent] == ["d1"] and outcome.devices == {"d1": state, "d2": "waiting", "d3": "waiting"}
    assert lines[-2:] == ["withdrew the bundle command of d1", f"stopped: d1 {state}: {reason}"]
    assert fleet.cleared == ["d1"]
    page = _fleet_page(db)
    assert "0</b> of 3 healthy" in page and reason in page


def test_a_silent_device_stops_the_rollout_at_the_timeout(db, bundle):
    fleet = Fleet(db, {"d1": [("fetching", None)]})
    outcome = deploy.run(db, deploy.create(db, spec(bundle, timeout_s=0.5)), fleet, lambda _l: None, poll_s=0.02)
    assert outcome.state == "stopped" and "d1 timed_out: not healthy within 0.5 s (last said: fetching)" == \
        outcome.reason
    assert fleet.cleared == ["d1"]  # a device that comes back later does not take the stopped rollout's bundle


def test_bad_requests_are_one_line_each(db, bundle, tmp_path):
    with pytest.raises(ConfigError, match="deploy --url"):
        deploy.create(db, deploy.DeploySpec(bundle=bundle, site=SITE, url="hub:8080", devices=("d1",)))
    with pytest.raises(ConfigError, match="no device of site 'plant' has reported to this hub"):
        deploy.create(db, deploy.DeploySpec(bundle=bundle, site=SITE, url="http://h"))
    with pytest.raises(ConfigError, match="topic device must be non-empty without"):
        deploy.create(db, spec(bundle, devices=("a/b",)))
    with pytest.raises(ConfigError, match=r"deploy --deferral-band: must be 0 <= LOW <= HIGH <= 1"):
        deploy.parse_band("0.5,0.2", "deploy --deferral-band")
    report(db, "d9", Rollout("idle", running="a" * 16))  # a device the hub has heard from is picked by default
    assert [t.device for t in deploy.create(db, deploy.DeploySpec(bundle=bundle, site=SITE, url="http://h")).targets] \
        == ["d9"]


def _metrics(db: HubDB) -> dict[tuple[str, str], float]:
    """The rollout gauges of the hub's /metrics, read back by Prometheus' own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    from edgekit.hub.observe import HubWatch

    text = HubWatch(db).metrics_text().decode()
    return {(s.name, s.labels["state"]): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name in ("edgekit_hub_rollout_devices", "edgekit_hub_deployments")}


def _fleet_page(db: HubDB) -> str:
    db.set_user("alice", hash_password("correct horse"))
    client = TestClient(create_app(db), base_url="http://127.0.0.1")
    login = client.get("/login").text
    csrf = login.split('name="csrf" value="')[1].split('"')[0]
    client.post("/login", data={"name": "alice", "password": "correct horse", "csrf": csrf})
    page = client.get("/fleet")
    assert page.status_code == 200
    return page.text
