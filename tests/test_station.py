"""The screening station end to end (issue 13): the operator starts and stops trials from the station's
button (serial line), the command topic and the station screen, and each trial gets its answer; a day of
trials walked with no broker is answered on the station and reaches the hub once when the broker is back
(acceptance 4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import tty
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from subscriber import Subscriber
from test_agent_trial import outbox_trials
from test_hub_ingest import hub_listening, publish_all, publisher, wait_for

from edgekit import topics
from edgekit.agent import Agent
from edgekit.broker import free_port
from edgekit.config import AgentConfig, validate
from edgekit.contract.messages import TrialCommand
from edgekit.datasets import ipol_files, read_ipol
from edgekit.hub.db import HubDB
from edgekit.privacy import device_salt, pseudonym

pytestmark = [pytest.mark.broker, pytest.mark.data, pytest.mark.torch]
IMU = ["Acc_X", "Acc_Y", "Acc_Z", "Gyr_X", "Gyr_Y", "Gyr_Z"]
RATE = 100.0


def station_config(bundle: Path, source: dict[str, Any], outbox: Path, broker: str, **trial: Any) -> AgentConfig:
    return validate(AgentConfig, {
        "device_id": "station-1", "site": "clinic", "allow_unsigned": True, "bundle": str(bundle), "source": source,
        "mqtt": {"url": broker, "reconnect_max_s": 1.0}, "outbox": {"path": str(outbox)},
        "runtime": {"intra_op_threads": 1}, "trial": {"channels": IMU, "rate_hz": RATE, **trial},
    }, "tests/test_station.py")


def trial_lines(path: Path) -> bytes:
    """An IPOL trial as the station's sensor sends it: one untimed line of six values per sample."""
    values = read_ipol(path).values
    return "".join(",".join(f"{v:.5f}" for v in row) + "\n" for row in values).encode()


class Sensor:
    """The IMU on a pseudo-terminal: still lines at ~100 Hz until told to send a trial or a button line."""

    def __init__(self, master: int, still: np.ndarray, slave: int) -> None:
        self.master, self.still, self.slave = master, still, slave
        self.queue: list[bytes] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)
        os.close(self.master)
        os.close(self.slave)

    def send(self, data: bytes) -> None:
        with self.lock:
            self.queue.append(data)

    def _run(self) -> None:
        line = (",".join(f"{v:.5f}" for v in self.still) + "\n").encode()
        while not self.done.is_set():
            with self.lock:
                data = self.queue.pop(0) if self.queue else line * 5
            for a in range(0, len(data), 4096):
                os.write(self.master, data[a:a + 4096])
            time.sleep(0.05)


def serial_station(bundle: Path, outbox: Path, broker: str, stand: Path) -> tuple[AgentConfig, Sensor, str]:
    """A station whose IMU (and button) is on a pseudo-terminal, with its screen on a free port: the agent's
    config, the sensor streaming stillness (the mean of `stand`'s first half second), the screen's URL.
    `sensor.close()` stops it and closes the terminal."""
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    screen = f"127.0.0.1:{free_port()}"
    cfg = station_config(bundle, {"kind": "serial", "port": os.ttyname(slave), "channels": IMU, "rate_hz": RATE},
                         outbox, broker, screen=screen)
    return cfg, Sensor(master, read_ipol(stand).values[:50].mean(axis=0), slave), f"http://{screen}/"


def screen_state(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "state", timeout=5) as r:
        return json.loads(r.read())


def screen_post(url: str, action: str, body: dict[str, Any]) -> int:
    req = urllib.request.Request(url + action, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status


@pytest.mark.slow
def test_the_operator_starts_and_stops_trials_from_the_button_the_topic_and_the_screen(
        trial_bundles, mosquitto, data_dir, tmp_path, caplog) -> None:
    pytest.importorskip("serial", reason="the serial extra (pyserial) is not installed")
    files = [data_dir / "ipol_gait" / "GaitData" / f"{t}_lb.txt" for t in ("6-1", "9-3", "14-2")]
    cfg, sensor, url = serial_station(trial_bundles["fall_screening"], tmp_path / "o.db", mosquitto.url, files[0])
    sub = Subscriber(mosquitto.port, client_id="station-sub")
    cmd_topic = topics.command("clinic", "station-1", topics.TRIAL_COMMAND)
    pub = publisher(mosquitto.port, "operator-console")
    try:
        with Agent(cfg) as agent:
            runner = threading.Thread(target=agent.run, kwargs={"drain_timeout_s": 20}, daemon=True)
            runner.start()
            wait_for(lambda: agent.transport.connected and agent.trials is not None, 20, "the agent to start")
            wait_for(lambda: _up(url), 20, "the station screen")

            def answered(n: int) -> bool:
                return len(sub.of("trial")) >= n and not screen_state(url)["recording"]

            # 1. the button on the serial line
            sensor.send(b"START AB-1\n" + trial_lines(files[0]) + b"STOP\n")
            wait_for(lambda: answered(1), 60, "the button's trial")
            # 2. the command topic (and a stale command, which is dropped)
            publish_all(pub, [(cmd_topic, TrialCommand("start", "ZZ-9", ts=time.time() - 3600).encode())])
            publish_all(pub, [(cmd_topic, TrialCommand("start", "CD-2", {"age": 80}, ts=time.time()).encode())])
            wait_for(lambda: screen_state(url)["recording"], 20, "the topic's start")
            sensor.send(trial_lines(files[1]))
            time.sleep(1.0)
            publish_all(pub, [(cmd_topic, TrialCommand("stop", ts=time.time()).encode())])
            wait_for(lambda: answered(2), 60, "the topic's trial")
            # 3. the station screen
            assert screen_post(url, "start", {"participant": "EF-3", "age": "77", "sex": "F"}) == 202
            wait_for(lambda: screen_state(url)["recording"], 20, "the screen's start")
            sensor.send(trial_lines(files[2]))
            time.sleep(1.0)
            assert screen_post(url, "stop", {}) == 202
            wait_for(lambda: answered(3), 60, "the screen's trial")
            last = screen_state(url)["last"]
            agent.stop.set()
            runner.join(60)
    finally:
        sensor.close()
        pub.disconnect()
        sub.close()
    trials = sub.of("trial")
    assert len(trials) == 3, [t["trial"] for t in trials]
    salt = device_salt()
    assert [t["participant"] for t in trials] == [pseudonym(c, salt) for c in ("AB-1", "CD-2", "EF-3")]
    for t, path in zip(trials, files):
        assert t["trial"]["started_by"] == "operator" and t["trial"]["closed_by"] == "operator"
        # the whole walk is in the trial: at least the recorded trial's samples, with still lines around it
        assert t["trial"]["samples"] >= len(read_ipol(path).values)
        assert "answer" in t and t["answer"]["decision"] in ("accept", "defer")
    assert last["id"] == trials[2]["id"] and last["participant"] == "EF-3"
    assert last["outcome"] in ("referred", "not_referred") and last["words"]
    assert "agent.command_refused" in caplog.text and "stale" in caplog.text
    raw = (tmp_path / "o.db").read_bytes()
    assert not any(code.encode() in raw for code in ("AB-1", "CD-2", "EF-3"))  # codes stay on the station


def _up(url: str) -> bool:
    try:
        screen_state(url)
        return True
    except OSError:
        return False


def day_recording(path: Path, trials: list[Path], gap_s: float = 8.0) -> int:
    """The day's trials back to back in one CSV (t, six IMU columns), with `gap_s` of standing still before
    each, as the station's sensor would have recorded them; returns the number of rows."""
    rng = np.random.default_rng(0)
    rows, t0 = [], 0.0
    for trial in trials:
        values = read_ipol(trial).values
        gap = values[:50].mean(axis=0) + rng.normal(0, 0.01, (int(gap_s * RATE), 6))
        block = np.concatenate([gap, values])
        rows.append(np.column_stack([t0 + np.arange(len(block)) / RATE, block]))
        t0 += len(block) / RATE
    table = np.concatenate(rows)
    np.savetxt(path, table, delimiter=",", fmt="%.5f", header="t," + ",".join(IMU), comments="")
    return len(table)


@pytest.mark.slow
def test_a_day_without_a_broker_is_answered_on_the_station_and_reaches_the_hub_once(
        trial_bundles, mosquitto, data_dir, tmp_path) -> None:
    """Acceptance 4. A day's 30 trials (IPOL subjects 1-15, two each, compressed in time: replayed at full
    speed) walked while the broker is down: the station answers every trial from movement detection alone;
    when the broker comes back, every trial is stored by the hub exactly once."""
    day = [p for p in ipol_files() if int(p.name.split("-")[1].split("_")[0]) <= 2]
    assert len(day) == 30
    recording = tmp_path / "day.csv"
    rows = day_recording(recording, day)
    db_url = f"sqlite:///{tmp_path / 'hub.db'}"
    # One hub on a plain persistent subscription, which mosquitto restores after its restart (README: it does
    # not restore shared ones, and what is published before the hubs re-subscribe would reach none).
    hub = subprocess.Popen([sys.executable, "-m", "edgekit", "hub", "--broker", mosquitto.url, "--db", db_url,
                            "--http", "", "--client-id", "clinic-hub", "--share-group", ""],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        hub_listening(db_url, mosquitto.port)  # subscribed, with a persistent session
        mosquitto.stop()
        layout = {"time_column": "t", "time_format": "seconds", "rate_hz": RATE}
        cfg = station_config(trial_bundles["fall_screening"],
                             {"kind": "replay", "path": str(recording), "speed": 0, "layout": layout},
                             tmp_path / "o.db", mosquitto.url)
        with Agent(cfg) as agent:
            result: list[Any] = []
            runner = threading.Thread(target=lambda: result.append(agent.run(drain_timeout_s=120)), daemon=True)
            runner.start()
            wait_for(lambda: agent.counters.samples == rows and len(outbox_trials(tmp_path / "o.db")) >= len(day),
                     120, "the day's trials")
            time.sleep(1.0)  # the last trial and the final metrics are written after the last sample
            offline = outbox_trials(tmp_path / "o.db")
            assert not agent.transport.connected
            mosquitto.start()
            runner.join(150)
        assert result and result[0].queued == 0
        with HubDB(db_url) as db:
            try:
                wait_for(lambda: db.count_trials() >= len(offline), 60, "every trial at the hub")
            except AssertionError:
                hub.terminate()
                raise AssertionError(hub.communicate(timeout=20)[1][-4000:]) from None
            time.sleep(1.0)  # and nothing more (a doubled trial would be a second row only if ids differed)
    finally:
        hub.terminate()
        _, hub_log = hub.communicate(timeout=20)
    # the station answered every trial without the network: each walked test one trial, each with an answer
    assert len(day) <= len(offline) <= len(day) + 2
    assert all(t["trial"]["started_by"] == "movement" for t in offline)
    assert all("answer" in t or "not_scored" in t for t in offline)
    assert sum("answer" in t for t in offline) >= len(day)
    ids = {t["id"] for t in offline}
    with HubDB(db_url) as db:
        stored = [t["id"] for t in db.trials(limit=1000)]
    assert "hub.bad" not in hub_log and "Traceback" not in hub_log, hub_log[-3000:]
    assert sorted(stored) == sorted(ids)  # every trial once, none lost, none doubled


@pytest.mark.parametrize("name", ["station.example.toml"])
def test_the_shipped_station_config_is_valid(name: str) -> None:
    from edgekit.config import load_config

    cfg = load_config(Path(__file__).resolve().parent.parent / "deploy" / "systemd" / name, AgentConfig)
    assert cfg.trial is not None and cfg.trial.screen and cfg.trial.detect == "movement"
