"""A hub you can watch (issue 16, acceptance 3): Prometheus' own text-format parser reads the hub's /metrics;
/healthz answers 503 with the reason within seconds of the broker stopping (a real mosquitto), of a SQLite file
going away or of a PostgreSQL server going away (a TCP relay in front of it, closed and reopened), and 200
again once it is back; the unreachable line repeats while it lasts and a line says when it is back."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from messagefactory import result, review
from prometheus_client.parser import text_string_to_metric_families
from test_hub_ingest import HubThread, hub_listening, publish_all, publisher, wait_for
from test_hub_postgres import pg_url  # noqa: F401  (the fixture)

from edgekit import topics
from edgekit.contract import messages as m
from edgekit.hub import observe
from edgekit.hub.db import HubDB

SITE, DEVICE = "lab", "edge-9"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample the Prometheus text-format parser reads, by name and labels."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def wait_health(url: str, code: int, timeout_s: float) -> tuple[float, dict[str, Any]]:
    """Seconds until GET url answers `code`, and its JSON body."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        status, body = get(url)
        if status == code:
            return time.monotonic() - t0, json.loads(body)
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer {code} within {timeout_s} s (last: {status} {body[:200]!r})")


@pytest.mark.broker
def test_metrics_parse_and_healthz_follows_the_broker(mosquitto, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(observe, "GRACE_S", 0.5)
    monkeypatch.setattr(observe, "REMIND_S", 1.0)
    caplog.set_level(logging.INFO, logger="edgekit.hub")
    db_url, port = f"sqlite:///{tmp_path / 'hub.db'}", free_port()
    base = f"http://127.0.0.1:{port}"
    with HubThread(mosquitto.url, db_url, http=f"127.0.0.1:{port}"):
        hub_listening(db_url, mosquitto.port)
        res = [result(DEVICE, s, site=SITE) for s in range(1, 11)]  # seq 5 and 10 deferred
        t = topics.topic(SITE, DEVICE, "result")
        pub = publisher(mosquitto.port)
        try:
            publish_all(pub, [(t, r.encode()) for r in res] + [
                (topics.topic(SITE, DEVICE, "review"), review(res[4]).encode()),
                (topics.topic(SITE, DEVICE, "status"), m.Status(SITE, DEVICE, "online", time.time(), queued=3,
                                                                signature="verified").encode()),
                (t, b"not json"), (topics.topic(SITE, "edge-other", "result"), res[0].encode())])
        finally:
            pub.disconnect()
            pub.loop_stop()
        def seen() -> dict[Any, float]:
            return samples(get(f"{base}/metrics")[1].decode())

        wait_for(lambda: seen().get(("edgekit_hub_results_stored_total", ()), 0) >= 10, what="10 results stored")
        wait_for(lambda: seen().get(("edgekit_hub_messages_total", (("kind", "result"), ("outcome", "rejected"))))
                 == 1, what="the foreign result counted")
        got = seen()
        assert got[("edgekit_hub_messages_total", (("kind", "result"), ("outcome", "ok")))] == 10
        assert got[("edgekit_hub_messages_total", (("kind", "result"), ("outcome", "bad")))] == 1
        assert got[("edgekit_hub_messages_total", (("kind", "review"), ("outcome", "ok")))] == 1
        assert got[("edgekit_hub_messages_total", (("kind", "status"), ("outcome", "ok")))] >= 2  # and the probes
        assert got[("edgekit_hub_devices", (("state", "online"),))] == 2  # edge-9 and hub_listening's probe
        assert got[("edgekit_hub_review_queue", ())] == 2
        assert got[("edgekit_hub_fleet_queued", ())] == 3
        assert got[("edgekit_hub_up", (("dependency", "broker"),))] == 1
        assert got[("edgekit_hub_up", (("dependency", "database"),))] == 1
        assert got[("edgekit_hub_store_seconds_count", ())] >= 1 and got[("edgekit_hub_batch_rows_sum", ())] >= 12
        assert ("process_resident_memory_bytes", ()) in got
        assert get(f"{base}/healthz") == (200, b'{"ok":true,"database":{"ok":true,"url":"' + db_url.encode()
                                          + b'"},"broker":{"ok":true,"url":"' + mosquitto.url.encode() + b'"}}')
        [fleet] = [d for d in HubDB(db_url).fleet() if d["device"] == DEVICE]
        assert fleet["signature"] == "verified"

        mosquitto.stop()
        down_s, body = wait_health(f"{base}/healthz", 503, timeout_s=5)
        assert body["ok"] is False and body["broker"]["ok"] is False and body["database"]["ok"] is True
        assert body["reason"].startswith(f"broker {mosquitto.url} unreachable")
        time.sleep(2.0)  # the unreachable line, then again after REMIND_S
        assert samples(get(f"{base}/metrics")[1].decode())[("edgekit_hub_up", (("dependency", "broker"),))] == 0
        mosquitto.start()
        up_s, body = wait_health(f"{base}/healthz", 200, timeout_s=10)
        assert body["ok"] is True
        wait_for(lambda: any("hub.broker_back" in r.getMessage() for r in caplog.records), 5, "the back line")
    lines = [r.getMessage() for r in caplog.records if r.name == "edgekit.hub.observe"]
    unreachable = [x for x in lines if x.startswith("hub.broker_unreachable")]
    assert len(unreachable) >= 2, lines
    assert unreachable[0].startswith(f"hub.broker_unreachable broker={mosquitto.url} for_s=")
    assert f"127.0.0.1:{mosquitto.port}: Connection refused" in unreachable[0]
    assert any(x.startswith(f"hub.broker_back broker={mosquitto.url} after_s=") for x in lines)
    print(f"healthz: 503 {down_s:.2f} s after the broker stopped, 200 {up_s:.2f} s after it started")
    assert down_s < 3 and up_s < 5


def test_healthz_fails_while_the_sqlite_file_is_away(tmp_path, caplog):
    from fastapi.testclient import TestClient

    from edgekit.hub.web import create_app

    path = tmp_path / "hub.db"
    with HubDB(f"sqlite:///{path}") as db:
        db.create()
        with observe.HubWatch(db, probe_every_s=0.1, grace_s=0.2, remind_s=60) as watch:
            client = TestClient(create_app(db, watch=watch))
            wait_for(lambda: client.get("/healthz").status_code == 200, 5, "healthy")
            path.rename(tmp_path / "moved.db")  # as a lost mount or a deleted file: the pool's handles still read
            wait_for(lambda: client.get("/healthz").status_code == 503, 5, "unhealthy")
            body = client.get("/healthz").json()
            assert body["database"]["ok"] is False and "broker" not in body
            assert body["reason"].startswith(f"database sqlite:///{path} unreachable")
            assert "unable to open database file" in body["reason"]
            assert ("edgekit_hub_up", (("dependency", "database"),)) in samples(client.get("/metrics").text)
            wait_for(lambda: any(r.getMessage().startswith("hub.db_unreachable") for r in caplog.records), 5,
                     "the unreachable line")
            (tmp_path / "moved.db").rename(path)
            wait_for(lambda: client.get("/healthz").status_code == 200, 5, "healthy again")
    assert any(r.getMessage().startswith(f"hub.db_back db=sqlite:///{path} after_s=") for r in caplog.records)


class Relay:
    """A TCP relay on a fixed loopback port to `target`: close() drops the listener and every connection (the
    server, as the hub sees it, went away); open() listens again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.socks: list[socket.socket] = []
        self.listener: socket.socket | None = None

    def open(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the same port again
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
                server = socket.create_connection(self.target)
            except OSError:
                return
            self.socks += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        if self.listener is not None:
            try:
                self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it (close alone does not)
            except OSError:
                pass
            self.listener.close()
            self.listener = None
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self.socks = []


@pytest.mark.postgres
def test_healthz_fails_while_postgres_is_away(pg_url):  # noqa: F811
    relay = Relay(("127.0.0.1", 5432))
    relay.open()
    try:
        with HubDB(pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}")) as db:
            db.create()
            with observe.HubWatch(db, probe_every_s=0.2, grace_s=0.5) as watch:
                wait_for(lambda: watch.health()[0], 5, "healthy")
                relay.close()
                wait_for(lambda: not watch.health()[0], 5, "unhealthy")
                ok, body = watch.health()
                assert body["reason"].startswith("database postgresql://") and "unreachable" in body["reason"]
                relay.open()
                wait_for(lambda: watch.health()[0], 10, "healthy again")
    finally:
        relay.close()
