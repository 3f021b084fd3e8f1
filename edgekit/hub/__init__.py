"""The hub: ingest results from the fleet over MQTT into a database, and a review web page for deferred cases.

run_hub (ingest + web), add_user and export_labels are what the CLI calls. Importing this package imports
only SQLAlchemy; paho, FastAPI and uvicorn are imported when used.
"""

from __future__ import annotations

import csv
import logging
import socket
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from edgekit.errors import ConfigError, TransportError
from edgekit.hub.auth import hash_password
from edgekit.hub.db import HubDB

if TYPE_CHECKING:
    from edgekit.mqtt import MqttSecurity

log = logging.getLogger(__name__)

EXPORT_COLUMNS = ("result_id", "device", "site", "label", "reviewer", "labelled_at", "note", "model_label",
                  "reasons")


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


def run_hub(broker_url: str, db_url: str, http: str | None = "127.0.0.1:8080",
            share_group: str = "edgekit-hub", client_id: str | None = None,
            stop: threading.Event | None = None, security: MqttSecurity | None = None,
            secure_cookies: bool = False) -> None:
    """Ingest (and, unless `http` is None, serve the review pages) until `stop` is set. `security`: the broker
    account and TLS files (edgekit/mqtt.py)."""
    from edgekit.hub.ingest import Ingest

    stop = stop or threading.Event()
    listen = parse_http(http) if http else None
    with HubDB(db_url) as db:
        db.create()
        server = thread = None
        with Ingest(broker_url, db, share_group=share_group, client_id=client_id, security=security):
            if listen:
                import uvicorn

                from edgekit.hub.web import create_app

                sock = listen_socket(*listen)
                config = uvicorn.Config(create_app(db, secure_cookies=secure_cookies), host=listen[0], port=listen[1], log_level="warning",
                                        access_log=False, lifespan="off")
                server = uvicorn.Server(config)
                thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="hub-web",
                                          daemon=True)
                thread.start()
                log.info("hub.web_started url=http://%s:%d/", listen[0], listen[1])
            try:
                stop.wait()
            finally:
                if server and thread:
                    server.should_exit = True
                    thread.join(timeout=10)


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
                             r["label"] or "", ";".join(r["reasons"]),
                             *(r["features"].get(n, "") for n in names)])
    log.info("hub.labels_exported rows=%d path=%s", len(rows), out)
    return len(rows)


__all__ = ["run_hub", "add_user", "export_labels"]
