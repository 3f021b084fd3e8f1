"""The fleet's facts per device (issue 16): the backlog is the device's latest report, its status or its
metrics, whatever order the broker delivers them in (a retained birth delivered again on every subscribe, metrics
replayed from the outbox), on SQLite and PostgreSQL and through a real broker across a hub restart; the status's
signature (verified or unchecked) is kept."""

from __future__ import annotations

import time
from typing import Any

import pytest
from test_hub_ingest import HubThread, hub_listening, publish_all, publisher, wait_for
from test_hub_postgres import pg_url  # noqa: F401  (the fixture)

from edgekit import topics
from edgekit.contract import messages as m
from edgekit.hub.db import HubDB
from edgekit.hub.ingest import to_batch

SITE, DEVICE = "lab", "edge-9"


def test_the_fleet_backlog_is_the_latest_report_whichever_kind(tmp_path):
    with HubDB(f"sqlite:///{tmp_path / 'hub.db'}") as db:
        db.create()
        check_backlog(db)


@pytest.mark.postgres
def test_the_fleet_backlog_is_the_latest_report_on_postgres(pg_url):  # noqa: F811
    with HubDB(pg_url) as db:
        db.create()
        check_backlog(db)


def check_backlog(db: HubDB) -> None:
    st, mt = topics.topic(SITE, DEVICE, "status"), topics.topic(SITE, DEVICE, "metrics")

    def status(ts: float, queued: int | None, **kw: Any) -> bytes:
        return m.Status(SITE, DEVICE, "online", ts, "m@1", queued=queued, dropped=0, **kw).encode()

    def metrics(ts: float, queued: int) -> bytes:
        return m.Metrics(SITE, DEVICE, ts, queued=queued, dropped=1, counters={"windows": 5}).encode()

    def backlog() -> tuple[Any, Any]:
        [dev] = db.fleet()
        return dev["queued"], dev["dropped"]

    # The birth after an outage: 500 waiting; the metrics after the drain: none.
    db.store(to_batch([(st, status(100.0, 500, signature="unchecked"))], 1.0))
    db.store(to_batch([(mt, metrics(200.0, 0))], 2.0))
    assert backlog() == (0, 1)
    # The broker's retained copy of that birth, delivered again on the hub's next subscribe (a hub restart,
    # any reconnect): older than the metrics, so the backlog stays 0.
    db.store(to_batch([(st, status(100.0, 500), True)], 3.0))
    assert backlog() == (0, 1)
    assert db.fleet()[0]["state"] == "online" and db.fleet()[0]["signature"] == "unchecked"
    # A newer birth wins; metrics replayed from the outbox (older than it) change the metrics, not the backlog.
    db.store(to_batch([(st, status(300.0, 40))], 4.0))
    assert backlog() == (40, 0)
    db.store(to_batch([(mt, metrics(250.0, 900))], 5.0))
    assert backlog() == (40, 0) and db.fleet()[0]["metrics_ts"] == 250.0
    db.store(to_batch([(mt, metrics(400.0, 0))], 6.0))
    assert backlog() == (0, 1)
    # The last will carries no backlog nor signature: both stay.
    db.store(to_batch([(st, m.Status(SITE, DEVICE, "offline", 500.0, reason="lost").encode())], 7.0))
    assert backlog() == (0, 1) and db.fleet()[0]["signature"] == "unchecked"


@pytest.mark.broker
def test_a_hub_restart_does_not_bring_back_the_backlog_of_a_retained_birth(mosquitto, tmp_path):
    """What the fleet page showed before: hundreds queued for a device whose last metrics said 0, because every
    subscribe delivers the broker's retained birth (shared subscriptions included) and its queued won."""
    db_url = f"sqlite:///{tmp_path / 'hub.db'}"
    now = time.time()
    pub = publisher(mosquitto.port)
    try:
        birth = m.Status(SITE, DEVICE, "online", now - 60, "m@1", queued=700, dropped=0).encode()
        pub.publish(topics.topic(SITE, DEVICE, "status"), birth, qos=1, retain=True).wait_for_publish(10)
        with HubThread(mosquitto.url, db_url):  # gets the retained birth, then the metrics after the drain
            hub_listening(db_url, mosquitto.port)
            publish_all(pub, [(topics.topic(SITE, DEVICE, "metrics"),
                               m.Metrics(SITE, DEVICE, now, queued=0, dropped=0).encode())])
            with HubDB(db_url) as db:
                wait_for(lambda: [d["metrics_ts"] for d in db.fleet() if d["device"] == DEVICE] == [now])
                assert [d["queued"] for d in db.fleet() if d["device"] == DEVICE] == [0]
        with HubThread(mosquitto.url, db_url):  # restarted: the retained birth again, stored before the probe
            hub_listening(db_url, mosquitto.port)
            with HubDB(db_url) as db:
                assert [d["queued"] for d in db.fleet() if d["device"] == DEVICE] == [0]
    finally:
        pub.disconnect()
        pub.loop_stop()
