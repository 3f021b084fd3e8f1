"""The clinician's view of screening trials (issue 13) on a real database: a scored trial's answer stored as a
result under the trial's id (SQLite and PostgreSQL), the trials list with its review marker and filter, the
trial page (signal with phases, reasons in plain words, features against the training population, the label
form), the JSON API, and the loop: label on the page -> `edgekit labels export` -> `edgekit train
--extra-labels`. Messages are built with the contract (tests/messagefactory.py)."""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from markupsafe import escape
from messagefactory import participant, screened, trial, trial_answer
from test_hub_postgres import pg_url  # noqa: F401 - the fixture, for the PostgreSQL runs
from test_hub_web import csrf_of, login

import edgekit
from edgekit import topics
from edgekit.hub import add_user, export_labels
from edgekit.hub.db import HubDB
from edgekit.hub.ingest import to_batch
from edgekit.hub.web import create_app, reason_text, short_doc, signal_svg, trial_outcome, trial_phases
from edgekit.trial_features import REGISTRY

SITE, DEV = "clinic", "st-1"
TOPIC = topics.topic(SITE, DEV, "trial")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hub.db'}"
    return request.getfixturevalue("pg_url")


def station_day() -> dict[str, object]:
    """One station's trials, by what happened to each (seq = order of arrival, newest last)."""
    return {
        "answered": screened(DEV, 1, trial_answer("no_risk", 0.9), site=SITE, code="AA-1"),
        "referred": screened(DEV, 2, trial_answer("balance_risk", 0.8), site=SITE, code="BB-2", referred=True),
        "deferred": screened(DEV, 3, trial_answer("no_risk", 0.55, reasons=("low_confidence", "ood")), site=SITE,
                             code="CC-3"),
        "not_scored": screened(DEV, 4, None, site=SITE, code="DD-4",
                               not_scored="no_turn: no U-turn found in the walk (the yaw turned less than 90 deg)",
                               turn_start_s=None, turn_end_s=None),
        "summary": trial(DEV, 5, site=SITE),  # a gait bundle's summary: no screening answer
    }


def store(db: HubDB, msgs) -> object:
    return db.store(to_batch([(TOPIC, t.encode()) for t in msgs], time.time()))


@pytest.fixture
def station(tmp_path):
    """A hub on SQLite holding station_day(), a logged-in reviewer `ana`, and the TestClient."""
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    add_user(url, "ana", "correct horse")
    day = station_day()
    with HubDB(url) as db:
        store(db, day.values())
        client = TestClient(create_app(db), base_url="http://127.0.0.1")
        login(client)
        yield url, db, client, day


def test_a_scored_trial_is_also_a_result_under_its_id_once(db_url):
    day = station_day()
    with HubDB(db_url) as db:
        db.create()
        stored = store(db, [*day.values(), day["deferred"]])  # a redelivery in the same batch
        assert (stored.new_trials, stored.new_results) == (5, 3)  # answered, referred, deferred
        replay = to_batch([(TOPIC, topics.mark_replayed(t.encode())) for t in day.values()], time.time())
        again = db.store(replay)
        assert (again.new_trials, again.new_results) == (0, 0)
        assert db.count_trials() == 5 and db.count() == 3 and db.count("defer") == 1

        deferred = db.case(day["deferred"].id)
        assert (deferred["decision"], deferred["label"], deferred["confidence"]) == ("defer", "no_risk", 0.55)
        assert deferred["reasons"] == ["low_confidence", "ood"]
        assert deferred["features"] == {"age": 78.0, "TUG": 12.0, "steps": 18.0}
        assert deferred["probs"] == {"no_risk": 0.55, "balance_risk": 0.45}
        assert len(deferred["signal"]["points"]) == 6 and deferred["signal"]["channels"][0] == "acc_x"
        assert (deferred["window_start_s"], deferred["window_end_s"]) == (0.0, 24.0)  # the trial's span
        assert (deferred["site"], deferred["device"], deferred["seq"]) == (SITE, DEV, 3)
        assert db.case(day["answered"].id)["signal"] is None  # an accepted normal answer comes without
        assert db.case(day["not_scored"].id) is None and db.case(day["summary"].id) is None
        # The deferred trial is a case of the review queue like any deferred result.
        assert [c["id"] for c in db.cases()] == [day["deferred"].id]

        # Labels, and deletion by pseudonym, reach the answer's row and its labels unchanged.
        db.add_label(day["referred"].id, "balance_risk", "ana", "fell in March")
        counts = db.participant_delete(participant("BB-2"))
        assert counts == {"edgekit_labels": 1, "edgekit_results": 1, "edgekit_trials": 1}
        assert db.count() == 2 and db.count_trials() == 4


def test_the_needs_review_filter_on_the_database(db_url):
    day = station_day()
    with HubDB(db_url) as db:
        db.create()
        store(db, day.values())
        ids = [t["id"] for t in db.trials(review="needed")]
        assert ids == [day[k].id for k in ("not_scored", "deferred", "referred")]  # newest first
        db.add_label(day["deferred"].id, "no_risk", "ana")
        assert [t["id"] for t in db.trials(review="needed")] == [day[k].id for k in ("not_scored", "referred")]
        rows = {t["id"]: t for t in db.trials()}
        assert len(rows) == 5
        assert (rows[day["deferred"].id]["review_label"], rows[day["deferred"].id]["reviewer"]) == ("no_risk", "ana")
        assert rows[day["referred"].id]["needs_review"] and not rows[day["answered"].id]["needs_review"]
        assert rows[day["deferred"].id]["reasons"] == ["low_confidence", "ood"]
        assert rows[day["not_scored"].id]["decision"] is None


def test_trials_list_shows_answers_decisions_and_what_to_review(station):
    _url, _db, client, day = station
    page = client.get("/trials").text
    rows = re.findall(r'<tr class="trial( needs-review)?" data-trial="([^"]+)" data-outcome="([^"]+)"', page)
    assert [(r[1], r[2], bool(r[0])) for r in rows] == [
        (day["summary"].id, "summary", False), (day["not_scored"].id, "not_scored", True),
        (day["deferred"].id, "deferred", True), (day["referred"].id, "referred", True),
        (day["answered"].id, "answered", False)]
    assert page.count('<span class="to-review">to review</span>') == 3
    assert f'href="/trials/{day["deferred"].id}"' in page
    short = participant("CC-3")[:8] + "…"
    assert short in page and participant("CC-3") in page  # short form shown, the whole one in its title
    assert "balance_risk</b> <span class=\"muted\">80 %" in page
    assert reason_text("low_confidence") in page and escape(reason_text("ood")) in page
    assert "not scored: no U-turn found in the walk (the yaw turned less than 90 deg)" in page

    needed = client.get("/trials", params={"review": "needed"}).text
    assert re.findall(r'data-trial="([^"]+)"', needed) == [day[k].id for k in ("not_scored", "deferred", "referred")]
    assert '<option value="needed" selected>' in needed


def test_trial_page_shows_signal_phases_reasons_features_and_takes_a_label(station):
    _url, db, client, day = station
    tid = day["deferred"].id
    page = client.get(f"/trials/{tid}").text
    svg = re.search(r'<svg id="trial-signal".*?</svg>', page, re.S).group(0)
    assert svg.count("<polyline") == 6
    assert re.findall(r'class="phase-band phase-(\w+)"', svg) == ["walk_out", "turn", "walk_back"]
    assert svg.count('class="step-tick"') == 3
    assert "Deferred: the station did not answer on its own" in page and "to review" in page
    assert reason_text("low_confidence") in page and escape(reason_text("ood")) in page
    assert "probability 55 %" in page
    # Features: name, value, unit and short doc from the registry, the percentile as a bar.
    table = re.search(r'<table class="features" id="trial-features">.*?</table>', page, re.S).group(0)
    assert re.findall(r'<tr data-feature="(\w+)">', table) == ["age", "TUG", "steps"]
    tug = re.search(r'<tr data-feature="TUG">.*?</tr>', table, re.S).group(0)
    assert '<span class="unit">s</span>' in tug and short_doc(REGISTRY["TUG"].description) in tug
    assert 'data-percentile="55.0"' in tug and 'style="width: 55.0%"' in tug
    assert table.count('class="percentile"') == 3
    # The form: the bundle's labels, CSRF; a label it does not know and a forged token are refused.
    form = re.search(r'<form id="trial-label".*?</form>', page, re.S).group(0)
    assert re.findall(r'name="label" value="([^"]+)"', form) == ["no_risk", "balance_risk"]
    assert '<textarea name="note"' in form and 'id="save-label"' in form
    assert 'id="trial-labelled"' not in page
    token = csrf_of(page)
    assert client.post(f"/trials/{tid}/label", data={"label": "balance_risk", "csrf": "x"}).status_code == 403
    assert client.post(f"/trials/{tid}/label", data={"label": "fell", "csrf": token}).status_code == 400
    assert db.case(tid)["labels"] == []
    r = client.post(f"/trials/{tid}/label", data={"label": "balance_risk", "note": "fall at home, May",
                                                  "csrf": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/trials/{tid}?saved=1"
    page = client.get(r.headers["location"]).text
    labelled = re.search(r'<p id="trial-labelled">(.*?)</p>', page, re.S).group(1)
    assert "<b>balance_risk</b> by ana" in labelled and "UTC" in labelled and "fall at home, May" in labelled
    assert "to review" not in page


def test_trial_page_without_turn_answer_or_signal(station):
    _url, _db, client, day = station
    page = client.get(f"/trials/{day['not_scored'].id}").text
    assert "Not scored: no U-turn found in the walk" in page and 'id="trial-signal"' in page
    assert 'class="phase-band' not in page  # no turn: no walk out, turn or walk back band
    assert 'id="trial-label"' not in page and "Only a scored trial can be labelled" in page
    page = client.get(f"/trials/{day['answered'].id}").text
    assert "Answered by the station: not referred." in page and 'id="trial-signal"' not in page
    assert "No signal came with this trial" in page and 'id="trial-label"' in page
    assert client.get("/trials/st-1:000000000099").status_code == 404
    assert client.post(f"/trials/{day['summary'].id}/label",
                       data={"label": "no_risk", "csrf": csrf_of(page)}).status_code == 404


def test_a_deferred_trial_is_in_the_queue_and_its_case_opens_the_trial(station):
    _url, _db, client, day = station
    tid = day["deferred"].id
    # an incident of its own (one person's walk), opened on the trial's page
    assert re.findall(r'class="incident-link trial-link" href="([^"]+)"', client.get("/queue").text) == [f"/trials/{tid}"]
    for page in (f"/cases/{tid}", f"/incidents/{tid}"):
        r = client.get(page, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == f"/trials/{tid}"


def test_api_trial_returns_the_page_facts(station):
    _url, db, client, day = station
    tid = day["referred"].id
    db.add_label(tid, "balance_risk", "ana", "seen in clinic")
    got = client.get(f"/api/trials/{tid}").json()
    assert (got["id"], got["participant"], got["outcome"], got["needs_review"]) == (
        tid, participant("BB-2"), "referred", False)
    assert got["answer"]["label"] == "balance_risk" and got["answer"]["probability"] == 0.8
    assert [p["name"] for p in got["phases"]] == ["walk_out", "turn", "walk_back"]
    assert got["phases"][1] == {"name": "turn", "text": "turn", "start_s": 9.0, "end_s": 11.5}
    assert [(f["name"], f["unit"], f["percentile"]) for f in got["features"]] == [
        ("age", "years", 50.0), ("TUG", "s", 55.0), ("steps", "steps", 60.0)]
    assert got["choices"] == ["no_risk", "balance_risk"]
    assert (got["label"]["label"], got["label"]["reviewer"], got["label"]["note"]) == (
        "balance_risk", "ana", "seen in clinic")
    assert len(got["summary"]["signal"]["points"]) == 6
    deferred = client.get(f"/api/trials/{day['deferred'].id}").json()
    assert [(r["reason"], r["text"]) for r in deferred["answer"]["reasons"]] == [
        ("low_confidence", reason_text("low_confidence")), ("ood", reason_text("ood"))]
    assert client.get("/api/trials/st-1:000000000099").status_code == 404
    listed = client.get("/api/trials", params={"review": "needed"}).json()["trials"]
    assert [t["outcome"] for t in listed] == ["not_scored", "deferred"]
    anonymous = TestClient(client.app, base_url="http://127.0.0.1")
    assert anonymous.get(f"/api/trials/{tid}").status_code == 401


@pytest.mark.torch
@pytest.mark.slow
def test_labels_from_the_trial_page_retrain_the_table_recipe(tmp_path):
    """The loop of issue 13's acceptance 3, without the browser: trials scored on the tug_seed_trial recipe's
    features, labelled through the page, exported, and added to training."""
    pytest.importorskip("torch", reason="training needs the train extra (torch)")
    from edgekit.exporters.training.train import train

    url = f"sqlite:///{tmp_path / 'hub.db'}"
    add_user(url, "ana", "correct horse")
    people = [(70.0, 9.0, 14.0, "no_risk"), (88.0, 21.0, 27.0, "balance_risk"), (81.0, 13.0, 18.0, "no_risk"),
              (92.0, 25.0, 30.0, "balance_risk"), (76.0, 11.0, 16.0, "no_risk"), (85.0, 17.0, 24.0, "balance_risk")]
    msgs = [screened(DEV, i + 1, trial_answer("no_risk", 0.52, reasons=("low_confidence",),
                                               features={"age": age, "TUG": tug, "steps": steps}),
                     site=SITE, code=f"P-{i}")
            for i, (age, tug, steps, _) in enumerate(people)]
    with HubDB(url) as db:
        store(db, msgs)
        client = TestClient(create_app(db), base_url="http://127.0.0.1")
        login(client)
        for msg, (*_, call) in zip(msgs, people):
            page = client.get(f"/trials/{msg.id}").text
            r = client.post(f"/trials/{msg.id}/label", data={"label": call, "note": "outcome at 6 months: ok",
                                                             "csrf": csrf_of(page)})
            assert r.status_code == 200 and 'id="trial-labelled"' in r.text
    out = tmp_path / "labels.csv"
    assert export_labels(url, out) == len(people)
    rows = list(csv.DictReader(out.open()))
    assert [c for c in rows[0] if c in REGISTRY] == ["age", "TUG", "steps"]
    assert {(float(r["age"]), r["label"], r["note"]) for r in rows} == {
        (age, call, "outcome at 6 months: ok") for age, _, _, call in people}
    assert all(r["site"] == SITE and r["model_label"] == "no_risk" for r in rows)
    assert not any(participant(f"P-{i}") in out.read_text() for i in range(len(people)))  # no pseudonyms

    recipe = Path(edgekit.__file__).parent / "recipes" / "tug_seed_trial.toml"
    run = train(recipe, tmp_path / "run", extra_labels=out, epochs=5, progress=False)
    meta = json.loads((run / "run.json").read_text())
    assert meta["extra_labels_added"] == len(people)
    assert meta["extra_labels_skipped"] == {"unknown_label": {}, "mapped_label": {}, "skipped_label": {},
                                            "unreadable_features": 0}


def test_presentation_helpers():
    assert reason_text("low_confidence") == "The model was not confident enough."  # gate.REASON_TEXT's words
    assert reason_text("ood:acc_x") == reason_text("ood")[:-1] + ": acc_x."  # a reason may name a channel after ":"
    assert reason_text("a_newer_reason") == "a_newer_reason"
    svg = signal_svg({"channels": ["a"], "rate_hz": 100, "start_s": 50.0, "points": [[0, 1, 0, 1, 0]]},
                     (0.0, 10.0), svg_id="s", ticks_s=[5.0, 12.0],
                     bands=[{"name": "turn", "text": "turn", "start_s": 4.0, "end_s": 6.0}])
    assert svg.startswith('<svg id="s"') and svg.count('class="phase-band') == 1
    assert svg.count('class="step-tick"') == 1  # the tick after the trial's end is left out
    walked = trial(DEV, 1).to_obj()
    assert [p["name"] for p in trial_phases(walked)] == ["walk_out", "turn", "walk_back"]
    assert trial_phases({**walked, "turn_start_s": None}) == [
        {"name": "walk_back", "text": "walk back", "start_s": 11.5, "end_s": 19.25}]
    assert trial_outcome(walked) == "summary"
    assert short_doc(REGISTRY["age"].description) == (
        "The participant's age in whole or fractional years, as the operator enters it (0-130)")
    assert short_doc(REGISTRY["walk_start_s"].description).endswith("rises for the first steps")

