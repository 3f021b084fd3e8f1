"""Review web app through FastAPI's TestClient on a real SQLite file: every page and API route refuses
anonymous requests, login and CSRF, labelling with history, the queue's filters, the label export, and the
gait trials page."""

from __future__ import annotations

import csv
import json
import re
import time

import pytest
from fastapi.testclient import TestClient
from messagefactory import result, review, trial
from starlette.routing import Route

from edgekit import topics
from edgekit.contract import messages as m
from edgekit.hub import add_user, export_labels
from edgekit.hub.auth import hash_password, verify_password
from edgekit.hub.db import HubDB
from edgekit.hub.ingest import to_batch
from edgekit.hub.web import create_app, gate_rows, signal_svg

OPEN = {"/login", "/healthz", "/metrics", "/static"}  # /healthz and /metrics: edgekit/hub/observe.py
OPEN |= {"/bundles"}  # a device's token instead of a login: tests/test_hub_deploy.py


@pytest.fixture
def hub(tmp_path):
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    add_user(url, "ana", "correct horse")
    with HubDB(url) as db:
        msgs = []
        for dev, site in (("edge-1", "lab"), ("edge-2", "ward")):
            for s in range(1, 21):
                r = result(dev, s, site=site)
                msgs.append((topics.topic(site, dev, "result"), r.encode()))
                if r.decision == "defer":
                    msgs.append((topics.topic(site, dev, "review"), review(r).encode()))
        msgs.append((topics.topic("lab", "edge-1", "status"),
                     m.Status("lab", "edge-1", "online", time.time(), model_version="gait-cnn@3", queued=12,
                              dropped=1).encode()))
        msgs.append((topics.topic("ward", "edge-2", "status"),
                     m.Status("ward", "edge-2", "offline", time.time() - 600, model_version="gait-cnn@2").encode()))
        msgs.append((topics.topic("lab", "edge-1", "trial"), trial("edge-1", 21).encode()))
        msgs.append((topics.topic("ward", "edge-2", "trial"), trial("edge-2", 22, site="ward", walk=False).encode()))
        db.store(to_batch(msgs, time.time()))
        yield url, db, TestClient(create_app(db), base_url="http://127.0.0.1")


def csrf_of(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def login(client: TestClient, name: str = "ana", password: str = "correct horse") -> None:
    page = client.get("/login").text
    r = client.post("/login", data={"name": name, "password": password, "csrf": csrf_of(page), "next": "/queue"},
                    follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/queue", r.text


def test_every_page_and_api_route_refuses_anonymous_requests(hub):
    _url, _db, client = hub
    case_id = topics.result_id("edge-1", 5)
    routes = [r for r in client.app.routes if isinstance(r, Route) and not any(r.path.startswith(o) for o in OPEN)]
    assert {r.path for r in routes} >= {"/", "/queue", "/fleet", "/cases/{result_id}", "/cases/{result_id}/label",
                                        "/api/cases", "/api/cases/{result_id}", "/api/cases/{result_id}/labels",
                                        "/api/fleet", "/api/me", "/logout", "/trials", "/api/trials",
                                        "/trials/{trial_id}", "/trials/{trial_id}/label", "/api/trials/{trial_id}",
                                        "/incidents/{window_id}", "/incidents/{window_id}/label", "/api/incidents",
                                        "/api/incidents/{window_id}", "/api/incidents/{window_id}/labels",
                                        "/fleet/settings"}
    checked = 0
    for route in routes:
        path = (route.path.replace("{result_id}", case_id).replace("{window_id}", case_id)
                .replace("{trial_id}", topics.result_id("edge-1", 21)))
        for method in route.methods - {"HEAD"}:
            r = client.request(method, path, follow_redirects=False,
                               data={"label": "walk", "csrf": "x"} if method == "POST" and "/api/" not in path else None,
                               json={"label": "walk"} if method == "POST" and "/api/" in path else None)
            if path.startswith("/api/"):
                assert r.status_code == 401, (method, path, r.status_code)
                assert "walk" not in r.text and "edge-1" not in r.text
            elif path == "/logout":
                assert r.status_code == 403, (method, path, r.status_code)  # no session, no token
            else:
                assert r.status_code == 303, (method, path, r.status_code)
                assert r.headers["location"].startswith("/login?next=")
            checked += 1
    assert checked >= 16
    with HubDB(_url) as db:
        assert db.case(case_id)["labels"] == []  # the anonymous POSTs stored nothing
    # A forged or stale cookie is no better than none.
    client.cookies.set("edgekit_hub", "eyJ1c2VyIjogImFuYSJ9.forged.sig")
    assert client.get("/api/cases").status_code == 401


def test_login_needs_the_right_password_and_a_csrf_token(hub):
    _url, _db, client = hub
    page = client.get("/login").text
    token = csrf_of(page)
    r = client.post("/login", data={"name": "ana", "password": "wrong", "csrf": token})
    assert r.status_code == 401 and "Wrong name or password" in r.text
    r = client.post("/login", data={"name": "nobody", "password": "correct horse", "csrf": token})
    assert r.status_code == 401
    r = client.post("/login", data={"name": "ana", "password": "correct horse", "csrf": "forged"})
    assert r.status_code == 403
    assert client.get("/api/me").status_code == 401
    r = client.post("/login", data={"name": "ana", "password": "correct horse", "csrf": token,
                                    "next": "https://evil.example/"}, follow_redirects=False)
    assert r.headers["location"] == "/queue"  # no open redirect
    assert client.get("/api/me").json()["name"] == "ana"
    # Logging out needs the token too, and ends the session.
    page = client.get("/queue").text
    assert client.post("/logout", data={"csrf": "forged"}).status_code == 403
    r = client.post("/logout", data={"csrf": csrf_of(page)}, follow_redirects=False)
    assert r.status_code == 303
    assert client.get("/api/me").status_code == 401


def test_queue_case_label_relabel_and_export(hub, tmp_path):
    url, db, client = hub
    login(client)
    page = client.get("/queue").text
    ids = re.findall(r'class="incident-link" href="/incidents/([^"]+)"', page)
    # Deferred windows only (every 5th of 20 per device, 8 s apart in sensor time): one incident per device,
    # named by its first window.
    assert sorted(ids) == [topics.result_id("edge-1", 5), topics.result_id("edge-2", 5)]
    assert "<b>2</b> incidents waiting" in page and "(8 deferred windows without a label)" in page
    lab = client.get("/queue", params={"site": "lab"}).text
    assert re.findall(r'href="/incidents/([^"]+)"', lab) == [topics.result_id("edge-1", 5)]
    assert client.get("/queue", params={"reason": "ood"}).text.count('class="incident-link"') == 0
    assert client.get("/queue", params={"reason": "disagreement"}).text.count('class="incident-link"') == 2

    case_id = topics.result_id("edge-1", 10)
    page = client.get(f"/cases/{case_id}").text
    # the wide plot and the phone's, three channels each
    assert "<svg" in page and page.count("<polyline") == 6 and "acc_x" in page and "gyro_z" in page
    assert "low_confidence" in page and "disagreement" in page and "cadence_hz" in page
    assert re.search(r"min_confidence|≥ 0\.600", page) and "fail" in page
    # Forged CSRF: refused and nothing stored.
    assert client.post(f"/cases/{case_id}/label", data={"label": "turn", "csrf": "forged"}).status_code == 403
    assert db.case(case_id)["labels"] == []
    r = client.post(f"/cases/{case_id}/label", data={"label": "turn", "note": "clear turn", "csrf": csrf_of(page)},
                    follow_redirects=False)
    assert r.status_code == 303
    assert "Saved" in client.get(r.headers["location"]).text
    # Relabel through the JSON API (CSRF header), keeping history; the latest wins.
    me = client.get("/api/me").json()
    assert client.post(f"/api/cases/{case_id}/labels", json={"label": "sit"}).status_code == 403
    r = client.post(f"/api/cases/{case_id}/labels", json={"label": "sit", "note": "second look"},
                    headers={"X-CSRF-Token": me["csrf"]})
    assert r.status_code == 201
    history = client.get(f"/api/cases/{case_id}").json()["labels"]
    assert [(h["label"], h["reviewer"]) for h in history] == [("sit", "ana"), ("turn", "ana")]
    assert client.post("/api/cases/nope:1/labels", json={"label": "sit"},
                       headers={"X-CSRF-Token": me["csrf"]}).status_code == 404
    # "other" with free text on a second case.
    other_id = topics.result_id("edge-2", 5)
    page = client.get(f"/cases/{other_id}").text
    client.post(f"/cases/{other_id}/label", data={"label": "__other__", "other": "stumble", "csrf": csrf_of(page)})
    unl = client.get("/api/cases", params={"status": "unlabelled"}).json()["cases"]
    assert len(unl) == 6 and case_id not in {c["id"] for c in unl}

    out = tmp_path / "labels.csv"
    assert export_labels(url, out) == 2
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0])[:15] == ["result_id", "device", "site", "label", "reviewer", "labelled_at", "note",
                                  "model_label", "reasons", "attribution", "incident_id", "window_start_s",
                                  "window_end_s", "window", "relative"]
    assert list(rows[0])[15:] == ["acc_rms", "gyro_rms", "cadence_hz"]
    assert {r["relative"] for r in rows} == {""}  # a bundle without a baseline sends none
    by_id = {r["result_id"]: r for r in rows}
    assert by_id[case_id]["label"] == "sit" and by_id[case_id]["note"] == "second look"
    assert by_id[case_id]["reviewer"] == "ana" and by_id[case_id]["model_label"] == "walk"
    assert by_id[case_id]["reasons"] == "low_confidence;disagreement"
    assert float(by_id[case_id]["acc_rms"]) == pytest.approx(1.10)
    # issue 15: its incident (edge-1's deferred windows 8 s apart: one, named by its first window), its sensor
    # times, and its signal as rows of channel values (the raw window: 128 points, three channels)
    assert by_id[case_id]["incident_id"] == topics.result_id("edge-1", 5)
    assert (float(by_id[case_id]["window_start_s"]), float(by_id[case_id]["window_end_s"])) == (20.0, 22.0)
    window = json.loads(by_id[case_id]["window"])
    assert len(window) == 128 and all(len(row) == 3 for row in window)
    assert by_id[other_id]["label"] == "stumble" and by_id[other_id]["site"] == "ward"


def test_fleet_page_and_api(hub):
    _url, _db, client = hub
    login(client)
    devices = {d["device"]: d for d in client.get("/api/fleet").json()["devices"]}
    assert devices["edge-1"]["state"] == "online" and devices["edge-1"]["queued"] == 12
    assert devices["edge-2"]["state"] == "offline" and devices["edge-2"]["model_version"] == "gait-cnn@2"
    assert devices["edge-1"]["results"] == 20 and devices["edge-1"]["deferred"] == 4
    r = client.get("/fleet")
    assert r.headers["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in r.headers["content-security-policy"]
    page = r.text
    assert 'class="state online"' in page and 'class="state offline"' in page and "gait-cnn@3" in page


def test_trials_page_and_api_show_stored_trials_newest_first(hub):
    _url, _db, client = hub
    assert client.get("/api/trials").status_code == 401
    r = client.get("/trials", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?next=%2Ftrials"
    login(client)
    rows = client.get("/api/trials").json()["trials"]
    assert [t["id"] for t in rows] == [topics.result_id("edge-2", 22), topics.result_id("edge-1", 21)]
    walked = rows[1]
    assert (walked["site"], walked["device"], walked["summary"]["steps"]) == ("lab", "edge-1", 18)
    assert walked["summary"]["phase_s"]["walk_back"] == 7.75
    assert [t["id"] for t in client.get("/api/trials", params={"device": "edge-1"}).json()["trials"]] == [walked["id"]]
    page = client.get("/queue").text
    assert 'href="/trials"' in page  # in the nav
    page = client.get("/trials").text
    assert page.count('<tr class="trial"') == 2
    assert page.index("edge-2:000000000022") < page.index("edge-1:000000000021")
    assert "18 steps · 96.4/min" in page and "no walk: activity never rose above still standing" in page
    assert "2023-11-14 22:13:41 UTC" in page  # the trial's ts
    page = client.get(f"/trials/{walked['id']}").text  # the summary's details on the trial's page
    assert "2.50 – 19.25" in page and "9.00 – 11.50" in page  # walk, turn
    assert "walk_out 6.50" in page and "still_after 4.75" in page and "cadence 96.4" in page


def test_passwords_are_salted_scrypt_hashes():
    a, b = hash_password("secret-1"), hash_password("secret-1")
    assert a != b and a.startswith("scrypt$") and "secret-1" not in a
    assert verify_password("secret-1", a) and not verify_password("secret-2", a)
    assert not verify_password("secret-1", None) and not verify_password("x", "garbage")


def test_gate_rows_and_signal_svg_are_sane():
    rows = {g["name"]: g for g in gate_rows({"ood": 2.0, "confidence": 0.4, "disagreement": 0.1},
                                            {"ood_max_score": 1.5, "min_confidence": 0.6, "max_disagreement": 0.3})}
    assert (rows["ood"]["ok"], rows["confidence"]["ok"], rows["disagreement"]["ok"]) == (False, False, True)
    svg = signal_svg({"channels": ["a<b"], "rate_hz": 10, "start_s": 0, "points": [[1, 2, None, 3, float("nan")]]})
    assert "a&lt;b" in svg and svg.count("<polyline") == 2  # escaped name; gap splits the line
    assert "No signal" in signal_svg(None)


@pytest.mark.broker
def test_run_hub_says_when_its_web_port_is_taken(mosquitto, tmp_path):
    import socket

    from edgekit.errors import TransportError
    from edgekit.hub import run_hub

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(TransportError, match="could not listen"):
            run_hub(mosquitto.url, f"sqlite:///{tmp_path / 'hub.db'}", http=f"127.0.0.1:{port}")


def test_secure_cookies_are_sent_for_https_only(hub):
    _, db, _ = hub
    plain = TestClient(create_app(db), base_url="http://127.0.0.1").get("/login").headers["set-cookie"]
    https = TestClient(create_app(db, secure_cookies=True), base_url="https://127.0.0.1").get("/login")
    assert "secure" not in plain.lower()
    cookie = https.headers["set-cookie"].lower()
    assert "secure" in cookie and "httponly" in cookie and "samesite=strict" in cookie
