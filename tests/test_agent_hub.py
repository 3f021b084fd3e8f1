"""Agent -> real mosquitto -> hub (SQLite): every deferred case stored exactly once, also after an outage
during which the agent queued and then re-sent (issue 4, acceptance 1)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from edgekit.hub.db import HubDB

pytestmark = [pytest.mark.broker, pytest.mark.data, pytest.mark.torch, pytest.mark.slow]


def test_deferred_cases_stored_exactly_once_across_an_outage(skab_bundle, mosquitto, data_dir, tmp_path):
    db_url = f"sqlite:///{tmp_path / 'hub.db'}"
    hub = subprocess.Popen([sys.executable, "-m", "edgekit", "hub", "--broker", mosquitto.url, "--db", db_url,
                            "--http", ""], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    agent = None
    try:
        time.sleep(2)  # the hub subscribes (persistent session) before the agent starts publishing
        agent = subprocess.Popen(
            [sys.executable, "-m", "edgekit", "run", "--bundle", str(skab_bundle), "--source",
             f"replay:{data_dir / 'skab/data/valve2/1.csv'}", "--speed", "60", "--broker", mosquitto.url,
             "--outbox", str(tmp_path / "o.db"), "--device-id", "pump-7", "--site", "plant", "--allow-unsigned"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(4)
        mosquitto.stop()
        time.sleep(10.5)
        mosquitto.start()
        stdout, stderr = agent.communicate(timeout=300)
        assert agent.returncode == 0, stderr[-3000:]
        windows = int(stdout.split("windows=")[1].split()[0])
        deferred = int(stdout.split("deferred=")[1].split()[0])
        assert deferred > 0, "the replay produced no deferred case; the test would prove nothing"
        with HubDB(db_url) as db:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and db.count() < windows:
                time.sleep(0.5)
            assert db.count() == windows
            assert db.count("defer") == deferred
            cases = db.cases(limit=100_000)
            ids = [c["id"] for c in cases]
            assert len(ids) == len(set(ids)) == deferred
            assert all(c["reasons"] for c in cases)
            assert all(c["has_review"] for c in cases)  # the review payload (signal, features) arrived too
    finally:
        for proc in (agent, hub):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
