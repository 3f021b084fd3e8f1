"""The agent segments a gait trial (edgekit.gait.segment) and sends one trial summary (issue 3)."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from messagefactory import trial
from subscriber import Subscriber
from test_agent import IPOL_TRIAL, agent, outbox_ids

from edgekit import gait, topics
from edgekit.datasets import read_ipol
from edgekit.hub.ingest import IngestStats, to_batch
from edgekit.trials import TrialControl


def expected_segmentation(path: Path) -> gait.Segmentation:
    table = read_ipol(path)
    return gait.segment(table.values, float(table.meta["rate_hz"]))


def outbox_trials(path: Path) -> list[dict]:
    """Trial payloads waiting in an agent's outbox, read with plain sqlite3 (the file is the contract)."""
    con = sqlite3.connect(path)
    try:
        out = []
        for (table,) in con.execute("select name from sqlite_master where type='table'").fetchall():
            cols = [r[1] for r in con.execute(f"pragma table_info({table})")]
            if "payload" in cols and "topic" in cols:
                out += [json.loads(p) for t, p in con.execute(f"select topic, payload from {table}")
                        if t.endswith("/trial")]
        return out
    finally:
        con.close()


def assert_matches(trial: dict, seg: gait.Segmentation, n_samples: int) -> None:
    assert trial["schema"] == topics.SCHEMA_TRIAL and trial["id"].startswith("dev-1:")
    assert trial["site"] == "test" and trial["device"] == "dev-1" and trial["model_version"]
    assert trial["trial"]["samples"] == n_samples and trial["trial"]["closed_by"] == "end"
    assert trial["steps"] == seg.steps > 0
    for key in ("walk_start_s", "walk_end_s", "turn_start_s", "turn_end_s", "cadence_spm"):
        assert trial[key] == pytest.approx(getattr(seg, key), abs=1e-9), key
    assert trial["phase_s"] == pytest.approx(seg.phase_s, abs=1e-9)
    assert "error" not in trial and "reason" not in trial


@pytest.mark.broker
@pytest.mark.data
@pytest.mark.torch
@pytest.mark.slow
def test_one_trial_summary_equal_to_gait_segment(ipol_bundle, mosquitto, data_dir, tmp_path):
    path = data_dir / IPOL_TRIAL
    seg = expected_segmentation(path)
    sub = Subscriber(mosquitto.port, client_id="sub-trial")
    try:
        out = subprocess.run(agent(ipol_bundle, path, mosquitto.url, tmp_path / "o.db"), capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "agent.trial " in out.stderr and f"steps={seg.steps}" in out.stderr
        assert sub.wait_for(lambda: sub.of("trial"), 20)
        assert sub.wait_for(lambda: sub.of("status") and sub.of("status")[-1]["state"] == "offline", 10)
        trials = sub.of("trial")
        assert len(trials) == 1, trials
        assert_matches(trials[0], seg, len(read_ipol(path).values))
        assert "queued=0" in out.stdout
    finally:
        sub.close()


@pytest.mark.data
@pytest.mark.torch
@pytest.mark.slow
def test_offline_run_leaves_the_trial_in_the_outbox(ipol_bundle, data_dir, tmp_path):
    path = data_dir / IPOL_TRIAL
    outbox = tmp_path / "o.db"
    out = subprocess.run(agent(ipol_bundle, path, "", outbox), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    trials = outbox_trials(outbox)
    assert len(trials) == 1, trials
    assert_matches(trials[0], expected_segmentation(path), len(read_ipol(path).values))


def test_a_source_trial_is_cut_at_max_s_and_goes_on():
    """A gait bundle's trial is the whole source run, cut every max_s so memory stays bounded and no sample
    goes unsegmented; the rest comes out at the end."""
    control = TrialControl(rate_hz=1.0, channels=6, max_s=5.0, detect="source")
    t = np.arange(12, dtype=float)
    v = np.stack([t, -t, t, t, t, t], axis=1)
    full = control.push_many(t[:3], v[:3]) + control.push_many(t[3:], v[3:])
    assert [f.t_s.tolist() for f in full] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert [f.closed_by for f in full] == ["max_duration"] * 2 and full[0].started_by == "source"
    assert full[1].values[:, 1].tolist() == [-5, -6, -7, -8, -9]
    rest = control.finish("end")
    assert rest is not None and rest.t_s.tolist() == [10, 11] and rest.closed_by == "end"
    assert control.finish("end") is None


def test_hub_acknowledges_a_trial_without_counting_it_bad():
    payload = trial("edge-1", 7).encode()
    stats = IngestStats()
    batch = to_batch([(topics.topic("lab", "edge-1", "trial"), payload)], 5.0, stats)
    assert stats.bad == 0 and stats.trials == 1
    assert not batch.results and not batch.reviews and ("lab", "edge-1") in batch.seen
    # the trial schema on another kind's topic is still a bad payload
    to_batch([(topics.topic("lab", "edge-1", "result"), payload)], 5.0, stats)
    assert stats.bad == 1


@pytest.mark.data
@pytest.mark.torch
@pytest.mark.slow
def test_sigterm_sends_the_trial_so_far(ipol_bundle, data_dir, tmp_path):
    """A clean stop segments what was read (the paced, one-sample-at-a-time path) and says so."""
    path = data_dir / IPOL_TRIAL
    outbox = tmp_path / "o.db"
    proc = subprocess.Popen(agent(ipol_bundle, path, "", outbox, speed=4), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not outbox.exists() or len(outbox_ids(outbox)) < 3):
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr[-3000:]
        trials = outbox_trials(outbox)
        assert len(trials) == 1, trials
        t = trials[0]
        assert t["trial"]["closed_by"] == "stop"
        assert 128 < t["trial"]["samples"] < len(read_ipol(path).values)
        assert "steps" in t or "error" in t
    finally:
        if proc.poll() is None:
            proc.kill()
