"""The clinician's view of screening trials (issue 13) on a real database: a scored trial's answer stored as a
result under the trial's id (SQLite and PostgreSQL), and which trials need review. Messages are built with
the contract (tests/messagefactory.py)."""

from __future__ import annotations

import time

import pytest
from messagefactory import participant, screened, trial, trial_answer
from test_hub_postgres import pg_url  # noqa: F401 - the fixture, for the PostgreSQL runs

from edgekit import topics
from edgekit.hub.db import HubDB
from edgekit.hub.ingest import to_batch

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
