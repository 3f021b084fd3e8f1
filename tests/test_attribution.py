"""An `ood` deferral's attribution (issue 14): the result carries which channels and features make up the
autoencoder's error; the contract refuses a malformed one naming what is wrong; the hub stores it (an older
database gets the column), shows it with the case and writes it into the labels export beside the reasons."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import orjson
import pytest
from messagefactory import result, review
from test_hub_postgres import pg_url  # noqa: F401 - the fixture db_url asks for
from test_privacy import _store

from edgekit import topics
from edgekit.contract import messages as m
from edgekit.errors import DataError
from edgekit.hub import export_labels
from edgekit.hub.db import HubDB

NOW = 1_700_000_000.0
SHARES = {"Volume Flow RateRMS": 0.625, "Pressure": 0.25, "Current": 0.125}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hub.db'}"
    return request.getfixturevalue("pg_url")


def ood(seq: int) -> m.Result:
    r = result("pump-7", seq, site="plant")
    return dataclasses.replace(r, decision="defer", reasons=["ood", "out_of_range:Pressure"], attribution=SHARES)


@pytest.mark.parametrize("attribution, says", [
    ({"a": 0.5, "b": 0.2, "c": 0.2, "d": 0.1}, "at most 3"),
    ({"Pressure": 1.5}, "share from 0 to 1"),
    ({"Pressure": "most"}, "Pressure"),
    ({"x" * 200: 0.5}, "at most 3 channels or features"),
    ([0.5], "attribution must be an object"),
])
def test_a_malformed_attribution_is_refused_naming_it(attribution: object, says: str) -> None:
    obj = ood(1).to_obj() | {"attribution": attribution}
    with pytest.raises(DataError, match=says):
        m.parse(topics.topic("plant", "pump-7", "result"), orjson.dumps(obj))


def test_a_result_without_one_keeps_its_bytes() -> None:
    assert b"attribution" not in dataclasses.replace(ood(1), attribution=None).encode()


def test_the_hub_keeps_it_with_the_case_and_exports_it_with_the_label(db_url: str, tmp_path: Path) -> None:
    r = ood(3)
    with HubDB(db_url) as db:
        db.create()
        _store(db, [("result", r), ("review", review(r))], NOW)
        case = db.case(r.id)
        assert case is not None and case["attribution"] == SHARES
        assert case["reasons"] == ["ood", "out_of_range:Pressure"]
        db.add_label(r.id, "anomaly", "ana", at=NOW + 60)
    out = tmp_path / "labels.csv"
    assert export_labels(db_url, out) == 1
    with out.open(newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["reasons"] == "ood;out_of_range:Pressure"
    assert row["attribution"] == "Volume Flow RateRMS=0.625;Pressure=0.250;Current=0.125"


def test_an_older_results_table_gets_the_column(db_url: str) -> None:
    import sqlalchemy as sa

    from edgekit.hub import db as hubdb

    before = sa.MetaData()  # edgekit_results as hubs before issue 14 made it
    old = sa.Table(hubdb.results.name, before, *[sa.Column(c.name, c.type, primary_key=c.primary_key,
                                                           nullable=c.nullable)
                                                 for c in hubdb.results.columns if c.name != "attribution"])
    with HubDB(db_url) as db:
        before.create_all(db.engine)
        with db.begin() as conn:
            conn.execute(old.insert().values({k: v for k, v in hubdb.result_row(result("pump-7", 1), NOW).items()
                                              if k != "attribution"}))
    with HubDB(db_url) as db:
        db.create()
        db.create()  # a second start changes nothing
        assert "attribution" in {c["name"] for c in sa.inspect(db.engine).get_columns(hubdb.results.name)}
        _store(db, [("result", ood(2))], NOW)
        assert db.case(topics.result_id("pump-7", 1))["attribution"] is None  # type: ignore[index]
        assert db.case(topics.result_id("pump-7", 2))["attribution"] == SHARES  # type: ignore[index]
