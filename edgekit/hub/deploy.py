"""Model rollout from the hub (issue 16): `edgekit deploy BUNDLE --site S [--devices ...] [--canary N]`.

The deployment lives in the hub's database (edgekit_deployments: the bundle's archive, its version, the band and
watch time, the state; edgekit_deployment_devices: each device's phase, the sha256 of its token, its state). The
command sends each device a retained bundle command (messages.BundleCommand on edgekit/v1/SITE/DEVICE/command/
bundle, which the broker's ACL lets only that device read) with a fresh random token; the hub's web app serves
the archive at /bundles/DEPLOYMENT to the bearer of one of that deployment's tokens (`archive_for`). The devices
say how it went in their retained status (Status.rollout), which the hub ingests into edgekit_devices.rollout;
the command reads it from there: canary devices first, the rest once every canary runs the new version healthy
through its watch; the first device that does not (rolled back, refused, failed, or silent past the timeout)
stops the rollout. Progress goes to `on_progress` (the CLI prints it).

Why HTTP(S) and not chunks over MQTT: the hub's web server already exists and streams a file of any size; the
broker stays out of it (no bundle chunks in its queues and persistence, no max_packet_size or
max_queued_bytes to size for them, nothing competing with the device's results on its one connection, no
reassembly on the device); and the credential is one token per device and deployment that only that device
can read, checked in one place. The cost: devices must reach the hub's HTTP(S) port too.

Library code: never prints, never exits; paho only when a command is sent. Never torch.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa

from edgekit import topics
from edgekit.contract import archive
from edgekit.contract.messages import ROLLOUT_DONE, BundleCommand, Rollout
from edgekit.errors import ConfigError, EdgekitError, TransportError
from edgekit.hub.db import HubDB, deployment_devices, deployments, devices

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often the command reads the devices' rollout states from the database
PUBLISH_TIMEOUT_S = 10.0
CANARY, REST = "canary", "rest"
# A device's row before its status says anything about this deployment: waiting (not sent: a later phase, or
# the rollout stopped first) or sent.
WAITING, SENT = "waiting", "sent"


class RolloutStopped(EdgekitError):
    """The rollout stopped: a device did not run the new bundle healthy (or did not answer in time)."""


@dataclass(frozen=True)
class DeploySpec:
    """What `edgekit deploy` was asked for. `url` is the hub's address as the devices reach it."""

    bundle: Path
    site: str
    url: str
    devices: tuple[str, ...] = ()
    canary: int = 1
    watch_s: float = 120.0
    min_windows: int = 20
    deferral_band: tuple[float, float] = (0.0, 0.5)
    quarantine_band: tuple[float, float] = (0.0, 0.05)
    timeout_s: float | None = None  # per phase; default watch_s + 300
    public_key: Path | None = None


@dataclass
class Target:
    device: str
    phase: str
    token: str
    state: str = WAITING
    reason: str | None = None


@dataclass
class Deployment:
    id: str
    site: str
    version: str
    model_version: str
    sha256: str
    size: int
    url: str
    spec: DeploySpec
    targets: list[Target] = field(default_factory=list)

    def command(self, target: Target) -> BundleCommand:
        s = self.spec
        return BundleCommand(deployment=self.id, version=self.version, url=self.url, token=target.token,
                             sha256=self.sha256, size=self.size, model_version=self.model_version,
                             watch_s=s.watch_s, min_windows=s.min_windows, deferral_band=s.deferral_band,
                             quarantine_band=s.quarantine_band, ts=time.time())


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_band(text: str, where: str) -> tuple[float, float]:
    """"LOW,HIGH" as a rate band (0 <= LOW <= HIGH <= 1); ConfigError naming the option otherwise."""
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"must be LOW,HIGH rates, e.g. 0,0.3 (got {text!r})", where=where) from None
    if not 0.0 <= low <= high <= 1.0:
        raise ConfigError(f"must be 0 <= LOW <= HIGH <= 1 (got {text!r})", where=where)
    return low, high


def _bundle_facts(spec: DeploySpec) -> tuple[str, str]:
    """(version, model_version) of a bundle that reads and whose files match its manifest (and its signature,
    when `public_key` is given): the hub never sends out a bundle that cannot load anywhere."""
    from edgekit.manifest import load_bundle

    m = load_bundle(spec.bundle, public_key=spec.public_key)
    return archive.bundle_version(spec.bundle), f"{m.task}@{m.data_fingerprint[:12]}"


def _pick(db: HubDB, spec: DeploySpec) -> list[str]:
    """The devices to update: --devices as given, else every device of the site the hub has heard from."""
    if spec.devices:
        return list(dict.fromkeys(spec.devices))
    with db.engine.connect() as conn:
        found = conn.execute(sa.select(devices.c.device).where(devices.c.site == spec.site)
                             .order_by(devices.c.device)).scalars().all()
    if not found:
        raise ConfigError(f"no device of site {spec.site!r} has reported to this hub", where="deploy --site",
                          hint="name them with --devices, or start their agents first")
    return list(found)


def create(db: HubDB, spec: DeploySpec, now: float | None = None) -> Deployment:
    """Store a new deployment (the bundle's archive, each device's token hash) and return it with its tokens,
    which exist nowhere else: they go out in the devices' commands only."""
    for name in (spec.site, *spec.devices):
        try:
            topics.command(spec.site, name, topics.BUNDLE_COMMAND)
        except ValueError as exc:
            raise ConfigError(str(exc), where="deploy --site/--devices") from None
    if not spec.url.startswith(("http://", "https://")):
        raise ConfigError(f"must be the hub's http:// or https:// address as the devices reach it (got "
                          f"{spec.url!r})", where="deploy --url")
    if spec.canary < 0:
        raise ConfigError(f"must be >= 0 (got {spec.canary})", where="deploy --canary")
    version, model_version = _bundle_facts(spec)
    blob = archive.pack(spec.bundle)
    sha = hashlib.sha256(blob).hexdigest()
    now = time.time() if now is None else now
    dep_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + "-" + secrets.token_hex(3)
    names = _pick(db, spec)
    targets = [Target(d, CANARY if i < spec.canary else REST, secrets.token_urlsafe(32)) for i, d in enumerate(names)]
    dep = Deployment(dep_id, spec.site, version, model_version, sha, len(blob),
                     f"{spec.url.rstrip('/')}/bundles/{dep_id}", spec, targets)
    with db.engine.begin() as conn:
        conn.execute(sa.insert(deployments).values(
            id=dep_id, site=spec.site, version=version, model_version=model_version, sha256=sha, size=len(blob),
            archive=blob, canary=spec.canary, watch_s=spec.watch_s, min_windows=spec.min_windows,
            band=orjson.dumps({"deferral": spec.deferral_band, "quarantine": spec.quarantine_band}).decode(),
            state=CANARY if any(t.phase == CANARY for t in targets) else "rolling", reason=None, created_at=now,
            updated_at=now))
        conn.execute(sa.insert(deployment_devices), [
            {"deployment": dep_id, "device": t.device, "phase": t.phase, "token_sha256": token_hash(t.token),
             "state": WAITING, "reason": None, "updated_at": now} for t in targets])
    log.info("deploy.created id=%s site=%s version=%s devices=%d canary=%d bytes=%d", dep_id, spec.site, version,
             len(targets), spec.canary, len(blob))
    return dep


def archive_for(db: HubDB, deployment: str, token: str) -> tuple[bytes, str] | None:
    """The deployment's archive and the device whose token this is, or None (no such deployment, or not one
    of its tokens: the web app answers both with the same 403)."""
    with db.engine.connect() as conn:
        row = conn.execute(
            sa.select(deployments.c.archive, deployment_devices.c.device)
            .select_from(deployments.join(deployment_devices, deployment_devices.c.deployment == deployments.c.id))
            .where(deployments.c.id == deployment, deployment_devices.c.token_sha256 == token_hash(token))).first()
    return None if row is None else (bytes(row.archive), row.device)


# --- sending commands ---------------------------------------------------------------------------------


class CommandPublisher:
    """Retained bundle commands to devices, as the hub's broker account (which may write command topics).
    A context manager: connects on enter, disconnects on exit."""

    def __init__(self, broker_url: str, security: Any = None, client_id: str | None = None) -> None:
        from edgekit.mqtt import make_client, parse_url

        self.endpoint = parse_url(broker_url, where="deploy --broker")
        self.client = make_client(self.endpoint, security, client_id=client_id or f"edgekit-deploy-"
                                  f"{secrets.token_hex(4)}", key="edgekit deploy")
        self._connected: Any = None

    def __enter__(self) -> CommandPublisher:
        import threading

        self._connected = threading.Event()
        refused: list[str] = []

        def on_connect(client: Any, _ud: Any, _flags: Any, reason: Any, _props: Any) -> None:
            if reason.is_failure:
                refused.append(str(reason))
            self._connected.set()

        self.client.on_connect = on_connect
        try:
            self.client.connect(self.endpoint.host, self.endpoint.port, keepalive=30)
        except OSError as exc:
            raise TransportError(f"cannot connect: {exc.strerror or exc}", where=f"deploy --broker {self.endpoint}",
                                 hint="is the broker running, and is this the hub's account?") from None
        self.client.loop_start()
        if not self._connected.wait(PUBLISH_TIMEOUT_S) or refused:
            self.client.loop_stop()
            why = refused[0] if refused else f"no CONNACK within {PUBLISH_TIMEOUT_S:g} s"
            raise TransportError(f"the broker did not accept the connection ({why})",
                                 where=f"deploy --broker {self.endpoint}",
                                 hint="the hub's account (--username, --password-file) may write command topics")
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def send(self, site: str, device: str, payload: bytes) -> None:
        """Publish retained at QoS 1 and wait for the broker's PUBACK."""
        info = self.client.publish(topics.command(site, device, topics.BUNDLE_COMMAND), payload, qos=topics.QOS,
                                   retain=True)
        try:
            info.wait_for_publish(PUBLISH_TIMEOUT_S)
        except (RuntimeError, ValueError) as exc:
            raise TransportError(f"the bundle command for {device} was not published: {exc}",
                                 where=f"deploy --broker {self.endpoint}") from None
        if not info.is_published():
            raise TransportError(f"the broker did not acknowledge the bundle command for {device} within "
                                 f"{PUBLISH_TIMEOUT_S:g} s", where=f"deploy --broker {self.endpoint}")

    def clear(self, site: str, device: str) -> None:
        """Remove the device's retained bundle command (an empty retained message): a device that has not taken
        it yet never will, one that is fetching or checking drops it."""
        self.send(site, device, b"")


# --- driving the rollout ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    deployment: str
    state: str  # done | stopped
    reason: str | None
    devices: dict[str, str]  # device -> its final state here


def _set_deployment(db: HubDB, dep_id: str, state: str, reason: str | None = None) -> None:
    with db.engine.begin() as conn:
        conn.execute(sa.update(deployments).where(deployments.c.id == dep_id)
                     .values(state=state, reason=reason, updated_at=time.time()))


def _set_target(db: HubDB, dep_id: str, target: Target) -> None:
    with db.engine.begin() as conn:
        conn.execute(sa.update(deployment_devices)
                     .where(deployment_devices.c.deployment == dep_id, deployment_devices.c.device == target.device)
                     .values(state=target.state, reason=target.reason, updated_at=time.time()))


def _reported(db: HubDB, site: str, names: Sequence[str]) -> dict[str, Rollout]:
    """The rollout each device's newest status says (the hub's ingest keeps it in edgekit_devices.rollout)."""
    with db.engine.connect() as conn:
        rows = conn.execute(sa.select(devices.c.device, devices.c.rollout)
                            .where(devices.c.site == site, devices.c.device.in_(list(names)))).all()
    out = {}
    for row in rows:
        found = Rollout.lenient(orjson.loads(row.rollout)) if row.rollout else None
        if found is not None:
            out[row.device] = found
    return out


def run(db: HubDB, dep: Deployment, publisher: CommandPublisher, on_progress: Callable[[str], None],
        poll_s: float = POLL_S, stop: Any = None) -> Outcome:
    """Drive a created deployment: send the canaries' commands, wait for each to run the version healthy, then
    the rest's, and wait for them. Returns the outcome (state done or stopped); the database says the same."""
    spec = dep.spec
    timeout_s = spec.timeout_s if spec.timeout_s is not None else spec.watch_s + 300.0
    phases = [(name, [t for t in dep.targets if t.phase == name]) for name in (CANARY, REST)]
    on_progress(f"deployment {dep.id}: version {dep.version} ({dep.model_version}) to {len(dep.targets)} "
                f"device(s) of site {dep.site}, canary {sum(t.phase == CANARY for t in dep.targets)}, watch "
                f"{spec.watch_s:g} s and >= {spec.min_windows} windows, deferral band {list(spec.deferral_band)}, "
                f"quarantine band {list(spec.quarantine_band)}")
    for name, targets in phases:
        if not targets:
            continue
        _set_deployment(db, dep.id, "canary" if name == CANARY else "rolling")
        for t in targets:
            publisher.send(dep.site, t.device, dep.command(t).encode())
            t.state = SENT
            _set_target(db, dep.id, t)
        on_progress(f"{name}: sent to {', '.join(t.device for t in targets)}")
        failed = _follow(db, dep, targets, timeout_s, poll_s, on_progress, stop)
        if failed is not None:
            reason = f"{failed.device} {failed.state}: {failed.reason or 'no reason given'}"
            # The commands of devices that did not get as far as healthy are withdrawn: an offline or slow one
            # must not take the bundle later, after the rollout stopped.
            withdrawn = [t.device for t in dep.targets if t.state not in (WAITING, "healthy")]
            for device in withdrawn:
                publisher.clear(dep.site, device)
            if withdrawn:
                on_progress(f"withdrew the bundle command of {', '.join(withdrawn)}")
            _set_deployment(db, dep.id, "stopped", reason)
            on_progress(f"stopped: {reason}")
            log.info("deploy.stopped id=%s reason=%r", dep.id, reason)
            return Outcome(dep.id, "stopped", reason, {t.device: t.state for t in dep.targets})
    _set_deployment(db, dep.id, "done")
    on_progress(f"done: {len(dep.targets)} device(s) run {dep.version}")
    log.info("deploy.done id=%s version=%s devices=%d", dep.id, dep.version, len(dep.targets))
    return Outcome(dep.id, "done", None, {t.device: t.state for t in dep.targets})


def _follow(db: HubDB, dep: Deployment, targets: list[Target], timeout_s: float, poll_s: float,
            on_progress: Callable[[str], None], stop: Any) -> Target | None:
    """Poll until every target is healthy (None) or one is not (that target)."""
    deadline = time.monotonic() + timeout_s
    while True:
        reported = _reported(db, dep.site, [t.device for t in targets])
        for t in targets:
            r = reported.get(t.device)
            if r is None or r.deployment != dep.id or (r.state, r.reason) == (t.state, t.reason):
                continue
            t.state, t.reason = r.state, r.reason
            _set_target(db, dep.id, t)
            on_progress(f"  {t.device}: {r.state}" + (f" ({r.reason})" if r.reason else ""))
            if r.state in ROLLOUT_DONE and r.state != "healthy":
                return t
        if all(t.state == "healthy" for t in targets):
            return None
        if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
            late = next(t for t in targets if t.state != "healthy")
            late.reason = (f"not healthy within {timeout_s:g} s (last said: {late.state})"
                           if stop is None or not stop.is_set() else "the deploy command was stopped")
            late.state = "timed_out" if stop is None or not stop.is_set() else "interrupted"
            _set_target(db, dep.id, late)
            return late
        time.sleep(poll_s)


def deploy(db_url: str, broker_url: str, spec: DeploySpec, on_progress: Callable[[str], None], *,
           security: Any = None, stop: Any = None, poll_s: float = POLL_S) -> Outcome:
    """`edgekit deploy`: create the deployment in the hub's database and drive it to done or stopped."""
    with HubDB(db_url) as db:
        db.create()
        with CommandPublisher(broker_url, security) as publisher:
            dep = create(db, spec)
            return run(db, dep, publisher, on_progress, poll_s=poll_s, stop=stop)


def summaries(db: HubDB, limit: int = 5) -> list[dict[str, Any]]:
    """The newest deployments for the fleet page: each with its devices' states counted and listed."""
    with db.engine.connect() as conn:
        deps = conn.execute(sa.select(deployments.c.id, deployments.c.site, deployments.c.version,
                                      deployments.c.model_version, deployments.c.state, deployments.c.reason,
                                      deployments.c.created_at, deployments.c.updated_at, deployments.c.canary)
                            .order_by(deployments.c.created_at.desc()).limit(limit)).all()
        ids = [d.id for d in deps]
        rows = conn.execute(sa.select(deployment_devices.c.deployment, deployment_devices.c.device,
                                      deployment_devices.c.phase, deployment_devices.c.state,
                                      deployment_devices.c.reason)
                            .where(deployment_devices.c.deployment.in_(ids))
                            .order_by(deployment_devices.c.phase, deployment_devices.c.device)).all() if ids else []
    out = []
    for d in deps:
        mine = [dict(r._mapping) for r in rows if r.deployment == d.id]
        out.append({**dict(d._mapping), "devices": mine, "total": len(mine),
                    "healthy": sum(r["state"] == "healthy" for r in mine)})
    return out


def rollout_counts(db: HubDB) -> dict[str, dict[str, int]]:
    """For the hub's /metrics: devices by the state of their rollout ('none': no rollout reported) and
    deployments by theirs (canary, rolling, done, stopped)."""
    with db.engine.connect() as conn:
        reported = conn.execute(sa.select(devices.c.rollout)).scalars().all()
        by_deployment = conn.execute(sa.select(deployments.c.state, sa.func.count())
                                     .group_by(deployments.c.state)).all()
    states: dict[str, int] = {}
    for text in reported:
        found = Rollout.lenient(orjson.loads(text)) if text else None
        key = found.state if found is not None else "none"
        states[key] = states.get(key, 0) + 1
    return {"devices": states, "deployments": {state: int(n) for state, n in by_deployment}}
