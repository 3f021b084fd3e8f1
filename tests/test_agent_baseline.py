"""Commissioning end to end (issue 14, acceptance 3): with the shipped SKAB recipe's bundle, a fresh device
learns the pump's baseline from a replayed recording, keeps it across restarts (the outbox file), learns it
again on the command topic's `baseline` command through a real mosquitto, and reports its state in its
status and metrics; a baseline file in the agent's config is used instead, and loaded again when it changes."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from subscriber import Subscriber
from test_agent import agent as agent_cmd
from test_hub_ingest import publish_all, publisher, wait_for

from edgekit import baseline as bl
from edgekit import topics
from edgekit.agent import BASELINE_STATE, Agent
from edgekit.config import AgentConfig, validate
from edgekit.contract.messages import BaselineCommand
from edgekit.datasets import read_skab
from edgekit.errors import ConfigError
from edgekit.features import extractor
from edgekit.manifest import read_manifest
from edgekit.window import sliding_windows

pytestmark = [pytest.mark.broker, pytest.mark.data, pytest.mark.torch, pytest.mark.slow]

FIRST = "skab/data/valve1/1.csv"
SECOND = "skab/data/valve2/2.csv"
LONG = "skab/data/anomaly-free/anomaly-free.csv"


def kept(outbox: Path) -> dict:
    """The baseline state the outbox file keeps, read with plain sqlite3 (the file is the contract)."""
    con = sqlite3.connect(outbox)
    try:
        row = con.execute("select value from state where key = ?", (BASELINE_STATE,)).fetchone()
    finally:
        con.close()
    assert row is not None
    return json.loads(row[0])


def raw_features(bundle: Path, values: np.ndarray) -> np.ndarray:
    """The bundle's features of every window of `values` (rows in file order), as the agent computes them."""
    m = read_manifest(bundle)
    size, hop = int(m.input.window_size), int(m.input.window_hop)
    return extractor(m.input.extractor, m.input.feature_params)(sliding_windows(values, size, hop), 1.0)


def run_cli(bundle: Path, source: Path, url: str, outbox: Path) -> str:
    out = subprocess.run(agent_cmd(bundle, source, url, outbox, device="pump-1"), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def results_of(sub: Subscriber, since: int) -> list[dict]:
    return sorted(sub.results()[since:], key=lambda r: r["seq"])


def test_a_device_learns_keeps_and_relearns_its_baseline(skab_bundle, mosquitto, data_dir, tmp_path):
    n = read_manifest(skab_bundle).input.baseline.windows  # type: ignore[union-attr]
    outbox = tmp_path / "pump-1.db"
    sub = Subscriber(mosquitto.port, client_id="sub-baseline")
    pub = publisher(mosquitto.port, "maintenance")
    try:
        # 1. a fresh device: its first n windows are deferred as commissioning, never answered
        first = data_dir / FIRST
        log1 = run_cli(skab_bundle, first, mosquitto.url, outbox)
        table = read_skab(first)
        windows = len(raw_features(skab_bundle, table.values))
        assert sub.wait_for(lambda: len(sub.results()) >= windows, 30)
        run1 = results_of(sub, 0)
        assert len(run1) == windows
        assert all(r["reasons"][:1] == ["commissioning"] and r["decision"] == "defer" and r.get("label") is None
                   for r in run1[:n])
        assert not any("commissioning" in r["reasons"] for r in run1[n:])
        assert all(r["label"] in ("normal", "anomaly") for r in run1[n:])
        # each with its review (signal, features): a person can check the machine was healthy meanwhile
        assert sub.wait_for(lambda: {r["id"] for r in run1[:n]} <= {m["id"] for m in sub.of("review")}, 20)
        # what it learned is the mean and std of its first n windows' features, kept in the outbox file
        state = kept(outbox)
        learned = bl.Baseline.from_obj(state["baseline"], "outbox")
        mean, std = bl.fit(raw_features(skab_bundle, table.values)[:n])
        assert learned.source == "learned" and learned.windows == n
        assert np.array_equal(learned.mean, mean) and np.array_equal(learned.std, std)
        assert "agent.baseline state=ready source=learned" in log1
        assert sub.wait_for(lambda: any("commissioning" in m for m in sub.of("metrics")), 10)
        metrics = sub.of("metrics")[-1]
        assert metrics["commissioning"] == n and metrics["baseline_ready"] == 1
        assert metrics["baseline_since"] == learned.since and metrics["baseline_windows"] == n
        # the birth status says where it stood when the agent connected: learning (k of n) or, when the replay
        # was faster than the connection, ready
        status = [s for s in sub.of("status") if s["state"] == "online"][-1]["baseline"]
        assert status["of"] == n and status["source"] == "learned" and status["state"] in ("learning", "ready")
        assert status["windows"] == n if status["state"] == "ready" else 0 <= status["windows"] < n

        # 2. a restart keeps it: every window of another recording is answered, judged against the same baseline
        before, seen = len(sub.results()), len(sub.of("metrics"))
        log2 = run_cli(skab_bundle, data_dir / SECOND, mosquitto.url, outbox)
        expected = len(raw_features(skab_bundle, read_skab(data_dir / SECOND).values))
        assert sub.wait_for(lambda: len(sub.results()) >= before + expected, 30)
        assert not any("commissioning" in r["reasons"] for r in results_of(sub, before))
        assert f"source=learned since={learned.since:.3f}" in log2
        assert [s for s in sub.of("status") if s["state"] == "online"][-1]["baseline"] == {
            "state": "ready", "windows": n, "of": n, "source": "learned", "since": learned.since}
        assert sub.wait_for(lambda: len(sub.of("metrics")) > seen, 10)
        assert sub.of("metrics")[-1]["commissioning"] == 0

        # 3. on command (after maintenance) it learns again, from the windows that follow the command
        long = data_dir / LONG
        cfg = validate(AgentConfig, {
            "bundle": str(skab_bundle), "allow_unsigned": True, "device_id": "pump-1", "site": "test",
            "source": {"kind": "replay", "path": str(long), "speed": 2000}, "mqtt": {"url": mosquitto.url},
            "outbox": {"path": str(outbox)}}, "test")
        before = len(sub.results())
        cmd_topic = topics.command("test", "pump-1", topics.BASELINE_COMMAND)
        with Agent(cfg) as agent:
            runner = threading.Thread(target=agent.run, kwargs={"drain_timeout_s": 20}, daemon=True)
            runner.start()
            wait_for(lambda: agent.transport.connected and agent.counters.windows > 20, 20, "the agent's first answers")
            for _ in range(3):  # a command sent before the agent's subscription took effect is not delivered
                publish_all(pub, [(cmd_topic, BaselineCommand(ts=time.time()).encode())])
                try:
                    wait_for(lambda: (agent.baseline_state() or {}).get("source") == "command", 5, "the command")
                    break
                except AssertionError:
                    continue
            wait_for(lambda: (agent.baseline_state() or {}).get("state") == "ready", 30, "the new baseline")
            runner.join(60)
        assert not runner.is_alive()
        run3 = results_of(sub, before)
        learning = [i for i, r in enumerate(run3) if "commissioning" in r["reasons"]]
        assert len(learning) == n and learning == list(range(learning[0], learning[0] + n))  # n in a row
        assert learning[0] > 0  # answered with the old baseline until the command
        state = kept(outbox)
        relearned = bl.Baseline.from_obj(state["baseline"], "outbox")
        assert relearned.source == "command" and relearned.since > learned.since
        feats = raw_features(skab_bundle, read_skab(long).values)
        assert len(run3) == len(feats)  # one result per window of the file, in order
        mean, std = bl.fit(feats[learning[0]:learning[0] + n])
        assert np.allclose(relearned.mean, mean, rtol=1e-12, atol=0) and np.allclose(relearned.std, std)

        # 4. and a restart keeps the re-learned one
        before = len(sub.results())
        log4 = run_cli(skab_bundle, first, mosquitto.url, outbox)
        assert sub.wait_for(lambda: len(sub.results()) >= before + windows, 30)
        assert not any("commissioning" in r["reasons"] for r in results_of(sub, before))
        assert "source=command" in log4
    finally:
        pub.disconnect()
        sub.close()


def test_a_baseline_file_is_used_and_loaded_again_when_it_changes(skab_bundle, data_dir, tmp_path, caplog):
    m = read_manifest(skab_bundle)
    n = m.input.baseline.windows  # type: ignore[union-attr]
    names = list(m.input.feature_names)
    key = bl.bundle_key(m.input, n)
    feats = raw_features(skab_bundle, read_skab(data_dir / FIRST).values)
    path = tmp_path / "pump-1.baseline.json"
    bl.write_file(path, bl.Baseline(*bl.fit(feats[:n]), n, "learned", 100.0, key), names)

    def run(source: str) -> tuple[dict, list[str]]:
        cfg = validate(AgentConfig, {
            "bundle": str(skab_bundle), "allow_unsigned": True, "device_id": "pump-1",
            "source": {"kind": "replay", "path": str(data_dir / source)}, "mqtt": {"url": None},
            "outbox": {"path": str(tmp_path / "o.db")}, "baseline": {"file": str(path)}}, "test")
        with Agent(cfg) as agent:
            agent.run(drain_timeout_s=0)
            return agent.baseline_state() or {}, [agent.counters.commissioning]

    state, (learning,) = run(SECOND)
    assert state["source"] == "file" and state["since"] == 100.0 and learning == 0
    assert kept(tmp_path / "o.db")["baseline"]["source"] == "file"
    # a changed file is loaded again at the next start
    bl.write_file(path, bl.Baseline(*bl.fit(feats[n:2 * n]), n, "learned", 200.0, key), names)
    state, _ = run(SECOND)
    assert state["source"] == "file" and state["since"] == 200.0
    # a file of other features stops the agent at start, naming the file
    bl.write_file(path, bl.Baseline(*bl.fit(feats[:n]), n, "learned", 300.0, "another"), names)
    with pytest.raises(ConfigError, match="other features or another window count") as exc:
        run(SECOND)
    assert exc.value.where == str(path)
