"""The hub: ingest results from the fleet over MQTT into a database, and a review web page for deferred cases.

run_hub (ingest + web, and retention), add_user, export_labels, export_participant and delete_participant
are what the CLI calls. Importing this package imports only SQLAlchemy; paho, FastAPI and uvicorn are
imported when used.
"""

from __future__ import annotations

import csv
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
import sqlalchemy as sa

from edgekit.errors import ConfigError, TransportError
from edgekit.hub.auth import hash_password
from edgekit.hub.db import HubDB, signal_window

if TYPE_CHECKING:
    from edgekit.hub.ingest import Ingest
    from edgekit.hub.jetstream import JetStreamIngest
    from edgekit.mqtt import MqttSecurity

log = logging.getLogger(__name__)

DAY_S = 86400.0
RETENTION_EVERY_S = 3600.0  # a running hub applies --retention-days at start and then this often
EXPORT_COLUMNS = ("result_id", "device", "site", "label", "reviewer", "labelled_at", "note", "model_label",
                  "reasons", "attribution", "incident_id", "window_start_s", "window_end_s", "window", "relative")


def parse_http(http: str) -> tuple[str, int]:
    """"HOST:PORT" (or ":PORT", all interfaces) for the web server."""
    host, _, port = http.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise ConfigError(f"must look like HOST:PORT (got {http!r})", where="hub.http")
    return host.strip("[]") or "0.0.0.0", number


def listen_socket(host: str, port: int) -> socket.socket:
    """Bind here, not in uvicorn's thread, so that a taken port is an error the caller sees."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise TransportError(f"the review web server could not listen ({exc.strerror})",
                             where=f"hub.http {host}:{port}",
                             hint="is the port in use? choose another HOST:PORT") from None
    return sock


def apply_retention(db: HubDB, days: float, now: float | None = None) -> dict[str, int]:
    """Delete what the hub received more than `days` days before `now` (HubDB.delete_received_before:
    trials, results, their labels), logging the counts in one line."""
    now = time.time() if now is None else now
    counts = db.delete_received_before(now - days * DAY_S)
    log.info("hub.retention older_than_days=%g %s", days, " ".join(f"{k}={v}" for k, v in counts.items()))
    return counts


def make_ingest(broker_url: str, db: HubDB, share_group: str | None = "edgekit-hub",
                client_id: str | None = None, security: MqttSecurity | None = None,
                ack_wait_s: float | None = None, on_fatal: Callable[[TransportError], None] | None = None,
                ) -> Ingest | JetStreamIngest:
    """The intake the url's scheme names: mqtt:// or mqtts:// an MQTT v5 shared subscription (ingest.py:
    mosquitto, EMQX, HiveMQ); nats:// or tls:// a JetStream durable consumer on a NATS cluster's MQTT gateway
    (jetstream.py, the `cluster` extra). Both write through the same BatchWriter."""
    if broker_url.split("://", 1)[0] in ("nats", "tls"):
        from edgekit.hub.jetstream import ACK_WAIT_S, JetStreamIngest

        return JetStreamIngest(broker_url, db, share_group=share_group, client_id=client_id, security=security,
                               ack_wait_s=ACK_WAIT_S if ack_wait_s is None else ack_wait_s, on_fatal=on_fatal)
    from edgekit.hub.ingest import Ingest

    if ack_wait_s is not None:
        raise ConfigError("is for a nats:// broker (JetStream); an MQTT broker redelivers on reconnect",
                          where="hub --ack-wait-s")
    return Ingest(broker_url, db, share_group=share_group, client_id=client_id, security=security,
                  on_fatal=on_fatal)


def run_hub(broker_url: str, db_url: str, http: str | None = "127.0.0.1:8080",
            share_group: str = "edgekit-hub", client_id: str | None = None,
            stop: threading.Event | None = None, security: MqttSecurity | None = None,
            secure_cookies: bool = False, retention_days: float | None = None,
            ack_wait_s: float | None = None) -> None:
    """Ingest (and, unless `http` is None, serve the review pages) until `stop` is set. `broker_url` picks the
    intake (make_ingest). `security`: the broker account and TLS files (edgekit/mqtt.py). `retention_days`:
    apply_retention at start and every RETENTION_EVERY_S; None keeps everything. A broker the hub cannot use
    (MQTT 3.1.1 only, no shared subscriptions, no JetStream) sets `stop` and raises its TransportError."""
    from edgekit.hub.observe import HubWatch

    if retention_days is not None and not retention_days > 0:
        raise ConfigError(f"must be a number of days > 0 (got {retention_days!r})", where="hub --retention-days")
    stop = stop or threading.Event()
    listen = parse_http(http) if http else None
    with HubDB(db_url) as db:
        db.create()
        if retention_days is not None:
            apply_retention(db, retention_days)
        server = thread = None
        ingest = make_ingest(broker_url, db, share_group=share_group, client_id=client_id, security=security,
                             ack_wait_s=ack_wait_s, on_fatal=lambda _exc: stop.set())
        with ingest, HubWatch(db, ingest, broker_url) as watch:  # /healthz, /metrics, hub.broker_unreachable
            if listen:
                import uvicorn

                from edgekit.hub.web import create_app

                sock = listen_socket(*listen)
                app = create_app(db, secure_cookies=secure_cookies, watch=watch)
                config = uvicorn.Config(app, host=listen[0], port=listen[1], log_level="warning",
                                        access_log=False, lifespan="off")
                server = uvicorn.Server(config)
                thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="hub-web",
                                          daemon=True)
                thread.start()
                log.info("hub.web_started url=http://%s:%d/", listen[0], listen[1])
            try:
                while not stop.wait(RETENTION_EVERY_S if retention_days is not None else None):
                    try:
                        apply_retention(db, retention_days)  # type: ignore[arg-type]
                    except sa.exc.SQLAlchemyError as exc:  # the database away for a while: next period
                        log.warning("hub.retention_failed error=%s", str(exc).splitlines()[0])
            finally:
                if server and thread:
                    server.should_exit = True
                    thread.join(timeout=10)
        if ingest.error is not None:
            raise ingest.error


def add_user(db_url: str, name: str, password: str) -> None:
    """Create a reviewer, or set a new password for an existing one."""
    name = name.strip()
    if not name or len(name) > 128:
        raise ConfigError(f"reviewer name must be 1-128 characters (got {name!r})", where="adduser NAME")
    if len(password) < 8:
        raise ConfigError("password must be at least 8 characters", where="adduser")
    with HubDB(db_url) as db:
        db.create()
        db.set_user(name, hash_password(password))
    log.info("hub.user_set name=%s", name)


def export_labels(db_url: str, out: Path) -> int:
    """Write each labelled case's latest label with its features as CSV; returns the number of rows."""
    with HubDB(db_url) as db:
        db.create()
        rows = list(db.labelled())
        incident_of = db.incident_ids()  # issue 15: the incident each window was labelled in, and its raw window
    names: dict[str, None] = {}
    for r in rows:
        names.update(dict.fromkeys(r["features"]))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*EXPORT_COLUMNS, *names])
        for r in rows:
            at = datetime.fromtimestamp(r["labelled_at"], timezone.utc).isoformat(timespec="seconds")
            writer.writerow([r["id"], r["device"], r["site"], r["review_label"], r["reviewer"], at, r["note"],
                             r["label"] or "", ";".join(r["reasons"]), _attribution_cell(r["attribution"]),
                             incident_of.get(r["id"], ""), _cell(r["window_start_s"]), _cell(r["window_end_s"]),
                             signal_window(r["signal"]), _relative_cell(r["relative"]),
                             *(r["features"].get(n, "") for n in names)])
    log.info("hub.labels_exported rows=%d path=%s", len(rows), out)
    return len(rows)


def _cell(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _relative_cell(relative: dict[str, float | None] | None) -> str:
    """A baseline bundle's features relative to the device's baseline as a JSON object, '' without them."""
    return "" if relative is None else orjson.dumps(relative).decode()


def _attribution_cell(stored: str | None) -> str:
    """An ood deferral's attribution as 'Flow=0.612;Pressure=0.201' (largest first), '' without one."""
    shares = orjson.loads(stored) if stored else None
    return ";".join(f"{name}={share:.3f}" for name, share in (shares or {}).items())


def export_participant(db_url: str, pseudonym: str, out: Path) -> dict[str, int]:
    """Write every row the hub holds for `pseudonym` (HubDB.participant_export) to `out` as JSON, readable
    by its owner only (it is personal data); rows per table."""
    with HubDB(db_url) as db:
        db.create()
        found = db.participant_export(pseudonym)
    found = {"exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **found}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an older file of that name may have been readable by others
    with os.fdopen(fd, "wb") as f:
        f.write(orjson.dumps(found, option=orjson.OPT_INDENT_2) + b"\n")
    counts = {name: len(rows) for name, rows in found["tables"].items()}
    log.info("hub.participant_exported path=%s %s", out, " ".join(f"{k}={v}" for k, v in counts.items()))
    return counts


def count_participant(db_url: str, pseudonym: str) -> dict[str, int]:
    """Rows per table the hub holds for `pseudonym` (what delete_participant would delete)."""
    with HubDB(db_url) as db:
        db.create()
        return {name: len(rows) for name, rows in db.participant_export(pseudonym)["tables"].items()}


def delete_participant(db_url: str, pseudonym: str) -> dict[str, int]:
    """Delete every row of `pseudonym` in one transaction (HubDB.participant_delete); rows per table."""
    with HubDB(db_url) as db:
        db.create()
        return db.participant_delete(pseudonym)


__all__ = ["run_hub", "make_ingest", "add_user", "export_labels", "apply_retention", "export_participant",
           "count_participant",
           "delete_participant"]
