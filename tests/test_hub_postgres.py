"""The same hub code on a real PostgreSQL (127.0.0.1:5432, trust auth, database `test`): idempotent ingest
through a real broker, review merging, labels with history, export, the web app. Each run uses its own
schema (search_path in the URL) and drops it afterwards; skips with the reason when no server answers."""

from __future__ import annotations

import csv
import threading
import time
import uuid

import pytest
from messagefactory import result, review, trial
from test_hub_ingest import hub_listening, publish_all, publisher, settled

from edgekit import topics
from edgekit.contract import messages as m
from edgekit.hub import add_user, export_labels, run_hub
from edgekit.hub.db import HubDB
from edgekit.hub.ingest import to_batch

pytestmark = pytest.mark.postgres


def _reachable() -> tuple[str | None, str]:
    try:
        import psycopg
    except ImportError:
        return None, "psycopg is not installed (pip install 'edgekit[hub]')"
    errors = []
    for user in ("postgres", "root"):
        try:
            with psycopg.connect(host="127.0.0.1", port=5432, dbname="test", user=user, connect_timeout=3):
                return user, ""
        except psycopg.Error as exc:
            errors.append(f"{user}: {str(exc).strip().splitlines()[0]}")
    return None, "no PostgreSQL at 127.0.0.1:5432 database test (" + "; ".join(errors) + ")"


@pytest.fixture
def pg_url():
    user, why = _reachable()
    if user is None:
        pytest.skip(why)
    import psycopg

    schema = f"edgekit_test_{uuid.uuid4().hex[:12]}"
    dsn = dict(host="127.0.0.1", port=5432, dbname="test", user=user)
    with psycopg.connect(**dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"postgresql://{user}@127.0.0.1:5432/test?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(**dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def test_store_is_idempotent_and_merges_reviews_on_postgres(pg_url):
    with HubDB(pg_url) as db:
        assert db.dialect == "postgresql"
        db.create()
        t, rv = topics.topic("lab", "edge-1", "result"), topics.topic("lab", "edge-1", "review")
        res = [result("edge-1", s) for s in range(1, 11)]
        first = to_batch([(rv, review(res[4]).encode())]
                         + [(t, r.encode()) for r in res] + [(t, res[0].encode())], time.time())
        stored = db.store(first)
        assert stored.new_results == 10
        again = to_batch([(t, m.ResultBatch("lab", "edge-1", res, replayed=True).encode())]
                         + [(rv, review(res[9]).encode()), (rv, review(res[4]).encode())], time.time())
        assert db.store(again).new_results == 0
        assert db.count() == 10 and db.count("defer") == 2
        assert db.case(topics.result_id("edge-1", 10))["features"]["cadence_hz"] == 1.8
        assert not db.case(topics.result_id("edge-1", 1))["replayed"]
        # Trial summaries: the same idempotent path (a redelivery in the batch and a replayed one later).
        tt = topics.topic("lab", "edge-1", "trial")
        summary = trial("edge-1", 11).encode()
        assert db.store(to_batch([(tt, summary), (tt, summary)], time.time())).new_trials == 1
        assert db.store(to_batch([(tt, topics.mark_replayed(summary))], time.time())).new_trials == 0
        [row] = db.trials()
        assert row["id"] == topics.result_id("edge-1", 11) and row["summary"]["cadence_spm"] == 96.4


@pytest.mark.broker
def test_ingest_web_and_export_on_postgres(pg_url, mosquitto, tmp_path):
    from fastapi.testclient import TestClient
    from test_hub_web import csrf_of, login

    from edgekit.hub.web import create_app

    add_user(pg_url, "bo", "long enough")
    stop = threading.Event()
    hub = threading.Thread(target=run_hub, args=(mosquitto.url, pg_url),
                           kwargs={"http": None, "stop": stop, "client_id": "pg-hub"}, daemon=True)
    hub.start()
    try:
        hub_listening(pg_url, mosquitto.port)
        pub = publisher(mosquitto.port)
        res = [result("edge-9", s, site="ward") for s in range(1, 101)]
        t, rv = topics.topic("ward", "edge-9", "result"), topics.topic("ward", "edge-9", "review")
        msgs = [(t, m.ResultBatch("ward", "edge-9", res[i:i + 20]).encode()) for i in range(0, 100, 20)]
        msgs += [(rv, review(r).encode()) for r in res if r.decision == "defer"]
        msgs += [(t, topics.mark_replayed(p)) for _, p in msgs[:3]]  # a resend
        publish_all(pub, msgs)
        pub.disconnect()
        pub.loop_stop()
        with HubDB(pg_url) as db:
            settled(db, 100)
            assert db.count() == 100 and db.count("defer") == 20

            client = TestClient(create_app(db), base_url="http://127.0.0.1")
            assert client.get("/api/cases").status_code == 401
            login(client, "bo", "long enough")
            case_id = topics.result_id("edge-9", 50)
            page = client.get(f"/cases/{case_id}").text
            assert page.count("<polyline") == 6  # the wide plot and the phone's
            client.post(f"/cases/{case_id}/label", data={"label": "sit", "csrf": csrf_of(page)})
            page = client.get(f"/cases/{case_id}").text
            client.post(f"/cases/{case_id}/label", data={"label": "turn", "note": "on second look",
                                                         "csrf": csrf_of(page)})
            assert [h["label"] for h in db.case(case_id)["labels"]] == ["turn", "sit"]
            assert len(client.get("/api/cases", params={"status": "unlabelled"}).json()["cases"]) == 19
            # The 20 deferred windows (8 s apart) are one incident; one label reaches every window.
            [inc] = client.get("/api/incidents").json()["incidents"]
            assert inc["windows"] == 20 and inc["unlabelled"] == 19
            page = client.get(f"/incidents/{inc['id']}").text
            r = client.post(f"/incidents/{inc['id']}/label", data={
                "label": "walk", "windows": ",".join(inc["window_ids"]), "csrf": csrf_of(page)}, follow_redirects=False)
            assert r.status_code == 303
            assert client.get("/api/incidents").json()["incidents"] == []
            assert [h["label"] for h in db.case(case_id)["labels"]] == ["walk", "turn", "sit"]
        out = tmp_path / "labels.csv"
        assert export_labels(pg_url, out) == 20
        rows = {r["result_id"]: r for r in csv.DictReader(out.open())}
        assert (rows[case_id]["label"], rows[case_id]["reviewer"], rows[case_id]["site"]) == ("walk", "bo", "ward")
        assert {r["label"] for r in rows.values()} == {"walk"} and len({r["labelled_at"] for r in rows.values()}) == 1
    finally:
        stop.set()
        hub.join(timeout=30)


def test_incidents_are_the_same_on_postgres_and_sqlite_when_two_hubs_store_at_once(pg_url, tmp_path):
    """Incidents are grouped when asked, from the stored rows: two hub processes storing one device's windows in
    interleaved batches, in any order, on either database, give the same incidents as the rule on the windows."""
    from test_hub_incidents import incident_messages, stored_by_two_hubs

    from edgekit.incidents import group

    msgs, deferred = incident_messages()
    found = {}
    for name, url in (("postgres", pg_url), ("sqlite", f"sqlite:///{tmp_path / 'hub.db'}")):
        stored_by_two_hubs(url, msgs)
        with HubDB(url) as db:
            got = db.incidents(status="all", now=0.0)
            found[name] = [(i["id"], i["window_ids"], i["priority"]) for i in got["incidents"]]
    expected = sorted((i.id, list(i.window_ids)) for i in group(deferred))
    assert sorted((i, w) for i, w, _ in found["postgres"]) == expected
    assert found["postgres"] == found["sqlite"]
