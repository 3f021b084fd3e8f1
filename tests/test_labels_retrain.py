"""Labels that retrain every recipe (issue 15, acceptance 5): the gait recipe's predictor is a 1D-CNN on raw
windows, so the labels export must carry each window, not only its features. One IPOL trial is replayed through
a real agent (its outbox read back: the messages a broker would carry), stored by the hub, an incident is
labelled as a whole, `edgekit labels export` writes it, and `edgekit train ipol_gait.toml --extra-labels`
adds every labelled window, with its raw window, to the training split."""

from __future__ import annotations

import csv
import json
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from edgekit.hub import export_labels
from edgekit.hub.db import HubDB
from edgekit.hub.ingest import to_batch

ROOT = Path(__file__).resolve().parents[1]
IPOL_TRIAL = "ipol_gait/GaitData/3-2_lb.txt"


@pytest.mark.data
@pytest.mark.torch
@pytest.mark.slow
def test_the_gait_recipe_retrains_from_a_labels_export(ipol_bundle: Path, data_dir: Path, tmp_path: Path) -> None:
    from edgekit.agent import Agent
    from edgekit.config import AgentConfig, validate
    from edgekit.exporters.training.train import train

    outbox = tmp_path / "outbox.db"
    cfg = validate(AgentConfig, {"device_id": "gait-1", "site": "clinic", "allow_unsigned": True,
                                 "bundle": str(ipol_bundle), "mqtt": {"url": None}, "outbox": {"path": str(outbox)},
                                 "source": {"kind": "replay", "path": str(data_dir / IPOL_TRIAL), "speed": 0}},
                   "tests/test_labels_retrain.py")
    with Agent(cfg) as agent:
        agent.run(drain_timeout_s=0)
    con = sqlite3.connect(outbox)
    msgs = con.execute("select topic, payload from outbox order by id").fetchall()
    con.close()
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    with HubDB(url) as db:
        db.create()
        db.store(to_batch(msgs, time.time()))
        incidents = db.incidents()["incidents"]
        assert incidents, "the replay deferred nothing"
        top = incidents[0]
        assert db.add_labels(top["window_ids"], "turn", "ana") == top["windows"]
    out = tmp_path / "labels.csv"
    assert export_labels(url, out) == top["windows"]
    rows = list(csv.DictReader(out.open()))
    assert {r["incident_id"] for r in rows} == {top["id"]} and {r["label"] for r in rows} == {"turn"}
    window = np.asarray(json.loads(rows[0]["window"]))
    assert window.shape == (128, 6)  # the raw window (the agent's 128 points per channel are every sample)

    run = train(ROOT / "edgekit" / "recipes" / "ipol_gait.toml", tmp_path / "run", extra_labels=out, epochs=1,
                progress=False)
    meta = json.loads((run / "run.json").read_text())
    assert meta["extra_labels_added"] == top["windows"]
    assert meta["extra_labels_skipped"]["unreadable_features"] == 0
    with np.load(run / "splits.npz") as s:
        added = s["train_window"][-top["windows"]:]
    assert added.shape[1:] == (6, 128)  # (n, C, W) as the CNN reads them, normalised per channel


def test_a_recipe_maps_reviewers_labels_only_to_its_own(tmp_path: Path) -> None:
    from edgekit.errors import ConfigError
    from edgekit.recipe import load_recipe

    text = (ROOT / "edgekit" / "recipes" / "ipol_gait.toml").read_text()
    ok = tmp_path / "ok.toml"
    ok.write_text(text + '\n[extra_labels]\nmap = { "shuffle" = "walk" }\nskip = ["sensor fault"]\n')
    assert load_recipe(ok).extra_labels.map == {"shuffle": "walk"}
    bad = tmp_path / "bad.toml"
    bad.write_text(text + '\n[extra_labels]\nmap = { "shuffle" = "run" }\n')
    with pytest.raises(ConfigError, match=r"extra_labels.*'shuffle': 'run'.*labels the recipe does not have"):
        load_recipe(bad)
