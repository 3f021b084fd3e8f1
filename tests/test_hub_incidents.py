"""The hub's incidents (issue 15): the queue lists incidents, highest priority first, with the totals waiting;
one label reaches every window of an incident (each with who and when) and a single window can still be
relabelled; the same rows give the same incidents whichever hub process stored them and in what order; sensor
times on the pages; the deferral budget on /fleet. Messages are built with the contract
(tests/messagefactory.py); SQLite here, PostgreSQL in tests/test_hub_postgres.py."""

from __future__ import annotations

import dataclasses
import random
import re
import threading
import time

import sqlalchemy.exc
from fastapi.testclient import TestClient
from messagefactory import result, review
from test_hub_web import csrf_of, login

from edgekit import topics
from edgekit.hub import add_user
from edgekit.hub.db import HubDB
from edgekit.hub.ingest import to_batch
from edgekit.hub.web import create_app, fmt_sensor_span, fmt_sensor_time
from edgekit.incidents import Deferred, group

T0 = 1583750073.0  # 2020-03-09 10:34:33, SKAB valve1/1.csv's first stamp: a replayed recording's own time
SITE = "plant"


def incident_messages(seed: int = 0) -> tuple[list[tuple[str, bytes]], list[Deferred]]:
    """Two pumps, 32 s windows every 4 s (SKAB's), sensor time from T0: pump-1 deferred in two runs (windows
    10-29 with two accepted ones inside, 60-69) and once alone (100); pump-2 in one run (5-14) of `stuck`.
    Results and reviews as the agent sends them, shuffled; and the deferred windows as incidents.Deferred."""
    msgs, deferred = [], []
    runs = {"pump-1": set(range(10, 30)) - {15, 22} | set(range(60, 70)) | {100}, "pump-2": set(range(5, 15))}
    for device, defer in runs.items():
        for seq in range(1, 120):
            start = T0 + 4.0 * seq
            r = result(device, seq, site=SITE, defer=seq in defer, start_s=start, end_s=start + 31.0)
            if device == "pump-2" and r.decision == "defer":
                r = dataclasses.replace(r, reasons=["stuck:Current"], scores={**r.scores, "ood": 4.0})
            msgs.append((topics.topic(SITE, device, "result"), r.encode()))
            if r.decision == "defer":
                msgs.append((topics.topic(SITE, device, "review"), review(r).encode()))
                deferred.append(Deferred(r.id, SITE, device, r.start_s, r.end_s, tuple(r.reasons), r.scores,
                                         r.thresholds))
    random.Random(seed).shuffle(msgs)
    return msgs, deferred


def stored_by_two_hubs(url: str, msgs: list[tuple[str, bytes]]) -> None:
    """Two hub processes' databases (two engines on one URL) storing interleaved batches at once, then a
    redelivery of the first half. A batch the database rolls back (PostgreSQL detects a deadlock when both
    write the same rows in another order) is stored again, as the hub's BatchWriter does."""
    with HubDB(url) as db:
        db.create()
    halves = [msgs[0::2], msgs[1::2]]

    def store(part: list[tuple[str, bytes]]) -> None:
        with HubDB(url) as db:
            for a in range(0, len(part), 25):
                for attempt in range(20):
                    try:
                        db.store(to_batch(part[a:a + 25], time.time()))
                        break
                    except sqlalchemy.exc.OperationalError:
                        if attempt == 19:
                            raise
                        time.sleep(0.05 * (attempt + 1))

    threads = [threading.Thread(target=store, args=(h,)) for h in halves]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    store(halves[0])


def _hub(tmp_path):
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    add_user(url, "ana", "correct horse")
    msgs, deferred = incident_messages()
    stored_by_two_hubs(url, msgs)
    db = HubDB(url)
    client = TestClient(create_app(db), base_url="http://127.0.0.1")
    login(client)
    return url, db, client, deferred


def test_the_queue_lists_incidents_by_priority_with_the_totals_waiting(tmp_path):
    _url, db, client, deferred = _hub(tmp_path)
    expected = group(deferred)
    got = db.incidents(status="all")
    assert sorted(i["window_ids"] for i in got["incidents"]) == sorted(list(i.window_ids) for i in expected)
    assert len(expected) == 4  # pump-1: 10-29 (two accepted inside the run), 60-69, 100 alone; pump-2: 5-14
    assert got["totals"] == {"incidents": 4, "windows": len(deferred), "waiting": 4, "waiting_windows": len(deferred),
                             "learning": 0}
    assert got["incidents"][0]["device"] == "pump-2"  # a stuck channel and a high ood score come first
    assert [i["priority"] for i in got["incidents"]] == sorted((i["priority"] for i in got["incidents"]), reverse=True)
    page = client.get("/queue").text
    links = re.findall(r'class="incident-link" href="/incidents/([^"]+)"', page)
    assert links == [i["id"] for i in got["incidents"]]
    assert "<b>4</b> incidents waiting" in page and f"({len(deferred)} deferred windows without a label)" in page
    # sensor time: the recording's own date, not the hub's clock
    assert "2020-03-09 10:35:13 – 10:37:00 (107 s)" in page  # pump-1 windows 10-29: T0 + 40 .. T0 + 147
    assert client.get("/queue", params={"reason": "stuck"}).text.count('class="incident-link"') == 1


def test_a_device_learning_its_baseline_is_not_waiting_in_the_queue(tmp_path):
    """pump-3's first 5 windows were deferred while it learned its baseline, the 3 after it by the gate: two
    incidents, and only the judged one waits; the learning one is listed on its own (status learning)."""
    url, db, client, _ = _hub(tmp_path)
    msgs = []
    for seq in range(1, 9):
        r = result("pump-3", seq, site=SITE, defer=True, start_s=T0 + 4.0 * seq, end_s=T0 + 4.0 * seq + 31.0)
        if seq <= 5:
            r = dataclasses.replace(r, reasons=["commissioning"], scores={}, thresholds={})
        msgs += [(topics.topic(SITE, "pump-3", "result"), r.encode()),
                 (topics.topic(SITE, "pump-3", "review"), review(r).encode())]
    db.store(to_batch(msgs, time.time()))
    mine = [i for i in db.incidents(status="all")["incidents"] if i["device"] == "pump-3"]
    assert [(len(i["window_ids"]), i["learning"]) for i in mine] == [(3, False), (5, True)]
    waiting = db.incidents()
    assert [i["id"] for i in waiting["incidents"] if i["device"] == "pump-3"] == [mine[0]["id"]]
    assert waiting["totals"]["waiting"] == 5 and waiting["totals"]["learning"] == 1  # 4 of pumps 1-2, and 1
    assert [i["id"] for i in db.incidents(status="learning")["incidents"]] == [mine[1]["id"]]
    page = client.get("/queue").text
    assert "<b>5</b> incidents waiting" in page and "1 incident while a device learned its baseline" in page
    assert mine[1]["id"] not in page
    assert mine[1]["id"] in client.get("/queue", params={"status": "learning"}).text
    assert client.get("/api/incidents", params={"status": "learning"}).json()["incidents"][0]["id"] == mine[1]["id"]
    assert client.get("/api/incidents", params={"status": "nope"}).status_code == 422


def test_one_label_reaches_every_window_of_the_incident_and_one_window_can_be_relabelled(tmp_path):
    _url, db, client, _ = _hub(tmp_path)
    first = topics.result_id("pump-1", 10)
    page = client.get(f"/incidents/{topics.result_id('pump-1', 20)}", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == f"/incidents/{first}"  # any window finds it
    page = client.get(f"/incidents/{first}").text
    windows = re.search(r'name="windows" value="([^"]+)"', page).group(1).split(",")
    assert len(windows) == 18 and windows[0] == first
    assert 'id="incident-when">2020-03-09 10:35:13 – 10:37:00 (107 s)' in page
    # a window of another incident, or none, is refused; nothing stored
    other = topics.result_id("pump-1", 60)
    for bad in ([*windows, other], []):
        r = client.post(f"/incidents/{first}/label", data={"label": "anomaly", "windows": ",".join(bad),
                                                           "csrf": csrf_of(page)})
        assert r.status_code == 400
    assert db.case(first)["labels"] == []
    r = client.post(f"/incidents/{first}/label", data={"label": "anomaly", "note": "valve closed",
                                                       "windows": ",".join(windows), "csrf": csrf_of(page)},
                    follow_redirects=False)
    assert r.status_code == 303
    after = client.get(r.headers["location"]).text
    assert "Saved: <b>anomaly</b> on 18 windows" in after and after.count("by ana") >= 18
    stamps = set()
    for wid in windows:
        [label] = db.case(wid)["labels"]
        assert (label["label"], label["reviewer"], label["note"]) == ("anomaly", "ana", "valve closed")
        stamps.add(label["labelled_at"])
    assert len(stamps) == 1
    # one window relabelled on its own page: history kept, the incident counts both labels
    case = client.get(f"/cases/{windows[3]}").text
    assert f'href="/incidents/{first}"' in case
    client.post(f"/cases/{windows[3]}/label", data={"label": "normal", "csrf": csrf_of(case)})
    assert [h["label"] for h in db.case(windows[3])["labels"]] == ["normal", "anomaly"]
    inc = db.incident(first)
    assert inc["labels"] == {"anomaly": 17, "normal": 1} and inc["unlabelled"] == 0
    waiting = db.incidents()
    assert first not in [i["id"] for i in waiting["incidents"]] and waiting["totals"]["waiting"] == 3
    # the JSON API labels an incident too (CSRF header), and refuses without it
    me = client.get("/api/me").json()
    target = topics.result_id("pump-2", 5)
    ids = client.get(f"/api/incidents/{target}").json()["window_ids"]
    assert client.post(f"/api/incidents/{target}/labels", json={"label": "sensor fault", "windows": ids}
                       ).status_code == 403
    r = client.post(f"/api/incidents/{target}/labels", json={"label": "sensor fault", "windows": ids},
                    headers={"X-CSRF-Token": me["csrf"]})
    assert r.status_code == 201 and r.json()["labelled"] == 10


def test_a_late_window_that_bridges_two_incidents_merges_them(tmp_path):
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    msgs, _ = incident_messages()
    with HubDB(url) as db:
        db.create()
        db.store(to_batch(msgs, time.time()))
        before = {i["id"]: i["windows"] for i in db.incidents(device="pump-1", status="all")["incidents"]}
        assert sorted(before.values()) == [1, 10, 18]
        # late deferred windows (sequence numbers of their own) filling the sensor-time gap between 29 and 60
        bridge = [result("pump-1", 1000 + k, site=SITE, defer=True, start_s=T0 + 4.0 * k, end_s=T0 + 4.0 * k + 31)
                  for k in range(38, 52, 4)]
        db.store(to_batch([(topics.topic(SITE, "pump-1", "result"), r.encode()) for r in bridge], time.time()))
        after = db.incidents(device="pump-1", status="all")["incidents"]
        assert sorted(i["windows"] for i in after) == [1, 18 + 10 + 4]


def test_times_are_the_sensors(tmp_path):
    assert fmt_sensor_time(T0) == "2020-03-09 10:34:33"
    assert fmt_sensor_time(12.5) == "12.5 s (device clock)"
    assert fmt_sensor_span(T0, T0 + 3600 * 2 + 5) == "2020-03-09 10:34:33 – 12:34:38 (2.0 h)"
    assert fmt_sensor_span(10.0, 42.0) == "10.0 – 42.0 s (device clock) (32 s)"


def test_the_fleet_page_flags_a_device_over_the_operators_deferral_budget(tmp_path):
    _url, db, client, deferred = _hub(tmp_path)
    rates = {r["device"]: r["hours"] for r in db.deferral_rates()}
    assert sum(h["deferred"] for h in rates["pump-1"]) == sum(d.device == "pump-1" for d in deferred)
    assert sum(h["windows"] for h in rates["pump-2"]) == 119
    page = client.get("/fleet").text
    assert "over budget" not in page
    r = client.post("/fleet/settings", data={"budget": "12", "gap_s": "30", "csrf": csrf_of(page)},
                    follow_redirects=False)
    assert r.status_code == 303
    assert (db.deferral_budget_per_h(), db.incident_gap_s()) == (12.0, 30.0)
    devices = {d["device"]: d for d in client.get("/api/fleet").json()["devices"]}
    assert devices["pump-1"]["over_budget"] and not devices["pump-2"]["over_budget"]  # 29 vs 10 in one hour
    assert '<tr class="over-budget" data-device="pump-1">' in client.get("/fleet").text
    assert client.post("/fleet/settings", data={"budget": "lots", "csrf": csrf_of(page)}).status_code == 400
    assert client.post("/fleet/settings", data={"budget": "", "gap_s": "60", "csrf": csrf_of(page)},
                       follow_redirects=False).status_code == 303
    assert db.deferral_budget_per_h() is None
