"""Watching the hub (issue 16): `/healthz` (503 with the reason while the broker or the database is away),
`/metrics` (Prometheus text format) and one log line while either is away, again every REMIND_S saying for
how long, and one when it is back. HubWatch holds the state; `router` serves it. Needs prometheus_client (the
hub extra); must not import paho or torch.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import sqlalchemy as sa
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from edgekit.hub.db import Batch, HubDB

if TYPE_CHECKING:
    from edgekit.hub.ingest import IngestStats

log = logging.getLogger(__name__)

PROBE_EVERY_S = 1.0  # the database is asked, and the broker connection looked at, this often
GRACE_S = 3.0  # away for less is not logged as unreachable: a broker restart the hub rides out in 0.25-2 s
REMIND_S = 30.0  # while it lasts, the unreachable line again this often (with for_s)
STALE_S = 5.0  # a database probe unanswered this long counts as the database being away
TCP_PROBE_S = 2.0  # the broker's port, tried for the log line's error when the intake is not connected
STORE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
KINDS = ("result", "review", "trial", "status", "metrics", "other")
OUTCOMES = ("ok", "bad", "rejected")


class Intake(Protocol):
    """What HubWatch reads of an intake (ingest.Ingest, jetstream.JetStreamIngest)."""

    connected: threading.Event
    failed: threading.Event
    stats: IngestStats


@dataclass
class Outage:
    """One dependency's state as the watch last saw it."""

    name: str  # broker | database: its part of /healthz's body
    key: str  # broker | db: its log lines, hub.broker_unreachable broker=URL ..., hub.db_back db=URL ...
    where: str  # the broker URL, the database URL (passwords redacted)
    ok: bool = True
    since: float | None = None  # monotonic time it went away
    error: str = ""
    logged_at: float | None = None  # monotonic time of the last unreachable line

    def view(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.ok, "url": self.where}
        if not self.ok:
            out["error"] = self.error
            out["for_s"] = round(now - self.since, 1) if self.since is not None else 0.0
        return out


class HubWatch:
    """The hub's health and metrics for one database and, in a running hub, its intake. A context manager:
    inside it a thread probes the database (HubDB.ping) every PROBE_EVERY_S and another looks at the intake's
    connection and writes the unreachable and back lines. Outside it (an app made without a running hub)
    `health` asks the database itself."""

    def __init__(self, db: HubDB, intake: Intake | None = None, broker: str = "", *,
                 probe_every_s: float | None = None, grace_s: float | None = None, remind_s: float | None = None,
                 stale_s: float | None = None) -> None:
        """Timings default to the module's PROBE_EVERY_S, GRACE_S, REMIND_S and STALE_S."""
        from edgekit.mqtt import redact_url

        self.db = db
        self.intake = intake
        self.probe_every_s = PROBE_EVERY_S if probe_every_s is None else probe_every_s
        self.grace_s = GRACE_S if grace_s is None else grace_s
        self.remind_s = REMIND_S if remind_s is None else remind_s
        self.stale_s = STALE_S if stale_s is None else stale_s
        self.broker = Outage("broker", "broker", redact_url(broker) if broker else "")
        self.database = Outage("database", "db", redact_url(db.url))
        self._probe_started: float | None = None  # monotonic start of the database probe now running
        self._probed_at: float | None = None  # monotonic end of the last one
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.store_seconds = Histogram("edgekit_hub_store_seconds", "Seconds to write one batch in one transaction",
                                       buckets=STORE_BUCKETS_S, registry=self.registry)
        self.batch_rows = Histogram("edgekit_hub_batch_rows", "Rows written per batch (results, reviews, "
                                    "trials, device statuses and metrics)", buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.registry.register(_HubCollector(self))
        ProcessCollector(registry=self.registry)
        db.on_store = self._stored

    # --- lifecycle ----------------------------------------------------------------------------------

    def __enter__(self) -> HubWatch:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        for target, name in ((self._probe_loop, "hub-watch-db"), (self._watch_loop, "hub-watch")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)  # a probe hung on a dead server is a daemon: it does not keep the hub up

    @property
    def running(self) -> bool:
        return bool(self._threads) and not self._stop.is_set()

    # --- what /healthz says -------------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, body): body has ok, reason (when not ok: each dependency that is away, in one line), and
        database and broker (a hub without an intake has no broker part) with ok, url, error and for_s."""
        now = time.monotonic()
        if not self.running:
            self._probe_database()
        else:
            self._check_stale(now)
        parts = [self.database]
        if self.intake is not None:
            self._check_broker(now)
            parts.append(self.broker)
        ok = all(p.ok for p in parts)
        body: dict[str, Any] = {"ok": ok}
        if not ok:
            body["reason"] = "; ".join(_line(p, now) for p in parts if not p.ok)
        body.update({p.name: p.view(now) for p in parts})
        return ok, body

    def metrics_text(self) -> bytes:
        return generate_latest(self.registry)

    # --- the watch ----------------------------------------------------------------------------------

    def _stored(self, batch: Batch, seconds: float) -> None:
        self.store_seconds.observe(seconds)
        self.batch_rows.observe(len(batch))

    def _probe_loop(self) -> None:
        while not self._stop.is_set():
            self._probe_database()
            self._stop.wait(self.probe_every_s)

    def _probe_database(self) -> None:
        self._probe_started = time.monotonic()
        try:
            self.db.ping()
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            self._set(self.database, False, _first_line(exc))
        else:
            self._set(self.database, True)
        finally:
            self._probed_at = time.monotonic()
            self._probe_started = None

    def _check_stale(self, now: float) -> None:
        """A probe that has run STALE_S without an answer (a server that went silent): the database is away."""
        started = self._probe_started
        if started is not None and now - started >= self.stale_s:
            self._set(self.database, False, f"no answer for {now - started:.0f} s")

    def _check_broker(self, now: float) -> None:
        intake = self.intake
        if intake is None:
            return
        if intake.connected.is_set():
            self._set(self.broker, True)
        elif self.broker.ok:
            self._set(self.broker, False, "the broker cannot serve the hub" if intake.failed.is_set()
                      else "not connected")

    def _watch_loop(self) -> None:
        while not self._stop.wait(min(self.probe_every_s, 1.0)):
            now = time.monotonic()
            self._check_stale(now)
            self._check_broker(now)
            for part in (self.database, self.broker):
                if part.name == "broker" and self.intake is None:
                    continue
                self._log(part, now)

    def _log(self, part: Outage, now: float) -> None:
        if part.ok or part.since is None or now - part.since < self.grace_s:
            return
        if part.logged_at is not None and now - part.logged_at < self.remind_s:
            return
        if part.name == "broker":
            part.error = self._broker_error() or part.error
        part.logged_at = now
        log.warning("hub.%s_unreachable %s=%s for_s=%.0f error=%s", part.key, part.key, part.where,
                    now - part.since, part.error)

    def _set(self, part: Outage, ok: bool, error: str = "") -> None:
        now = time.monotonic()
        if ok:
            if not part.ok and part.logged_at is not None:
                log.warning("hub.%s_back %s=%s after_s=%.0f", part.key, part.key, part.where,
                            now - (part.since or now))
            part.ok, part.since, part.error, part.logged_at = True, None, "", None
            return
        if part.ok:
            part.since = now
        part.ok = False
        part.error = error or part.error

    def _broker_error(self) -> str:
        """Why the intake is not connected, as far as a TCP connect to the broker's port can tell."""
        endpoint = getattr(self.intake, "endpoint", None)
        host, port = getattr(endpoint, "host", None), getattr(endpoint, "port", None)
        if self.intake is not None and self.intake.failed.is_set():
            return "the broker cannot serve the hub (see the hub's error line)"
        if not host or not port:
            return "not connected"
        try:
            with socket.create_connection((host, port), timeout=TCP_PROBE_S):
                return "the broker's port answers but the hub's MQTT session is not up (see hub.connect_refused " \
                       "or hub.disconnected)"
        except OSError as exc:
            return f"{host}:{port}: {exc.strerror or type(exc).__name__}"


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0]


def _line(part: Outage, now: float) -> str:
    since = f" for {now - part.since:.0f} s" if part.since is not None else ""
    return f"{part.name} {part.where} unreachable{since}: {part.error}"


class _HubCollector(Collector):
    """Read when Prometheus scrapes: the intake's counters, the watch's view of broker and database, and the
    tables' device states, review queue and fleet backlog (skipped while the database is away)."""

    def __init__(self, watch: HubWatch) -> None:
        self.watch = watch

    def collect(self) -> Iterator[Any]:
        w = self.watch
        up = GaugeMetricFamily("edgekit_hub_up", "1 when the dependency answers (the hub's /healthz view)",
                               labels=["dependency"])
        up.add_metric(["database"], float(w.database.ok))
        if w.intake is not None:
            up.add_metric(["broker"], float(w.intake.connected.is_set()))
        yield up
        if w.intake is not None:
            yield from _intake_families(w.intake.stats)
        try:
            counts = w.db.watch_counts()
        except sa.exc.SQLAlchemyError as exc:
            log.debug("hub.metrics_db_failed error=%s", _first_line(exc))
            return
        devices = GaugeMetricFamily("edgekit_hub_devices", "Devices by their last status (online, offline, "
                                    "unknown: none received)", labels=["state"])
        for state, n in counts["devices"].items():
            devices.add_metric([state], n)
        yield devices
        yield GaugeMetricFamily("edgekit_hub_review_queue", "Deferred results no reviewer has labelled yet",
                                value=counts["review_queue"])
        yield GaugeMetricFamily("edgekit_hub_fleet_queued", "Results waiting in the devices' outboxes (each "
                                "device's latest report, summed)", value=counts["queued"])
        yield GaugeMetricFamily("edgekit_hub_fleet_dropped", "Results the devices' outboxes dropped when full "
                                "(each device's latest report, summed)", value=counts["dropped"])
        yield from _rollout_families(w.db)


def _rollout_families(db: HubDB) -> Iterator[Any]:
    """Model rollouts (issue 16, edgekit/hub/deploy.py): devices by their rollout state, deployments by theirs."""
    from edgekit.hub.deploy import rollout_counts

    try:
        counts = rollout_counts(db)
    except sa.exc.SQLAlchemyError as exc:
        log.debug("hub.metrics_db_failed error=%s", _first_line(exc))
        return
    for name, doc, key in (("edgekit_hub_rollout_devices", "Devices by the state of their model rollout (their "
                            "status's rollout; none: not reported)", "devices"),
                           ("edgekit_hub_deployments", "Deployments (edgekit deploy) by state: canary, rolling, "
                            "done, stopped", "deployments")):
        family = GaugeMetricFamily(name, doc, labels=["state"])
        for state, n in sorted(counts[key].items()):
            family.add_metric([state], n)
        yield family


def _intake_families(stats: IngestStats) -> Iterator[Any]:
    messages = CounterMetricFamily("edgekit_hub_messages", "Messages taken from the broker by topic kind and "
                                   "outcome (ok: parsed and stored; bad: malformed; rejected: another "
                                   "device's identity)", labels=["kind", "outcome"])
    seen = dict(stats.by_kind)  # a copy: the writer thread adds to it
    for kind in KINDS:
        for outcome in OUTCOMES:
            messages.add_metric([kind, outcome], seen.get((kind, outcome), 0))
    yield messages
    yield CounterMetricFamily("edgekit_hub_results_received", "Results received (each of a batch message; "
                              "redeliveries too)", value=stats.results)
    yield CounterMetricFamily("edgekit_hub_results_stored", "Result rows created (a redelivered result creates "
                              "none)", value=stats.new_results)
    yield CounterMetricFamily("edgekit_hub_batches", "Transactions the intake wrote", value=stats.batches)


router = APIRouter()


def _watch(request: Request) -> HubWatch:
    return request.app.state.watch


@router.get("/healthz", include_in_schema=False)
def healthz(request: Request) -> JSONResponse:
    """200 {"ok": true, ...} or 503 {"ok": false, "reason": "...", ...}; no login (a load balancer asks)."""
    ok, body = _watch(request).health()
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus text format; no login (counts only: no result, label or person)."""
    return Response(_watch(request).metrics_text(), media_type=CONTENT_TYPE_LATEST)
