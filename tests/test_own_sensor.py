"""A user's own sensor, end to end, with only a recipe and an agent config (issue 12, acceptance 1).

Generated recordings (tests/recordingfactory.py: 3 vibration channels at 1 kHz, normal/fault in a text label
column, 8 files, one with a 2 s jump in its clock) are trained on with `edgekit train`, exported INT8 with
`edgekit export`, replayed through `edgekit run`, and streamed through a real mosquitto in binary block
payloads into `edgekit run` with an MQTT source: the same windows (none across the gap) and the same
answers arrive at the broker both ways. Every step is the CLI a user types.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from recordingfactory import vibration_recordings, write_recipe
from streamfactory import Gateway
from subscriber import Subscriber

from edgekit.contract import samples as payloads

pytestmark = [pytest.mark.broker, pytest.mark.torch, pytest.mark.slow]
GAP_FILE = "machine-1/run-1.csv"
TOPIC = "plant/line-1/vib"


def edgekit(*args: str, timeout: float = 600) -> str:
    done = subprocess.run([sys.executable, "-m", "edgekit.cli", *args], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-2000:])
    return done.stdout


def agent_config(path: Path, bundle: Path, broker: str, device: str, source: str) -> Path:
    path.write_text(f'device_id = "{device}"\nsite = "plant"\nbundle = "{bundle}"\nallow_unsigned = true\n\n[mqtt]\nurl = "{broker}"\n\n'
                    f'[outbox]\npath = "{path.with_suffix(".db")}"\n\n[source]\n{source}')
    return path


def read_recording(path: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = [line.split(",") for line in path.read_text().splitlines()[1:]]
    return np.array([float(r[0]) for r in rows]), np.array([[float(c) for c in r[1:4]] for r in rows])


def binary_blocks(t: np.ndarray, values: np.ndarray, size: int = 100) -> list[bytes]:
    """0.1 s blocks; a block never spans the clock's jump (a gateway starts a new block after a gap)."""
    cuts = [0, *(np.flatnonzero(np.diff(t) > 0.5) + 1).tolist(), len(t)]
    out = []
    for a, b in zip(cuts, cuts[1:]):
        for s in range(a, b, size):
            part = values[s:min(s + size, b)]
            out.append(payloads.encode_binary(float(t[s]), 1000.0, part))
    return out


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("own")
    vibration_recordings(root / "recordings")
    recipe = write_recipe(root, epochs=15)
    edgekit("train", str(recipe), "--out", str(root / "run"), "--no-progress")
    edgekit("export", str(root / "run"), "--int8", "--out", str(root / "bundle"), "--no-progress")
    return root / "bundle"


def test_replay_and_mqtt_blocks_give_the_same_answers(bundle: Path, mosquitto, tmp_path: Path) -> None:
    recording = bundle.parent / "recordings" / GAP_FILE
    sub = Subscriber(mosquitto.port)
    try:
        cfg = agent_config(tmp_path / "replay.toml", bundle, mosquitto.url, "vib-replay",
                           f'kind = "replay"\npath = "{recording}"\nspeed = 0\n')
        edgekit("run", "--config", str(cfg))
        expected = 9 + 29  # windows of 200 every 100 in the 1 s before the jump and the 3 s after it
        assert sub.wait_for(lambda: len([r for r in sub.results() if r["device"] == "vib-replay"]) == expected)

        cfg = agent_config(tmp_path / "mqtt.toml", bundle, mosquitto.url, "vib-mqtt",
                           f'kind = "mqtt"\ntopic = "{TOPIC}"\nchannels = ["vib_x", "vib_y", "vib_z"]\n')
        agent = subprocess.Popen([sys.executable, "-m", "edgekit.cli", "run", "--config", str(cfg)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert sub.wait_for(lambda: any(t.endswith("/vib-mqtt/status") for t, _ in sub.messages), 30)
            time.sleep(0.5)  # the status is sent on connect; the source subscribes right after
            t, values = read_recording(recording)
            gateway = Gateway(mosquitto.port, TOPIC)
            gateway.publish(*binary_blocks(t, values))
            gateway.close()
            assert sub.wait_for(lambda: len([r for r in sub.results() if r["device"] == "vib-mqtt"]) >= expected, 60)
        finally:
            agent.send_signal(signal.SIGTERM)
            out, err = agent.communicate(timeout=60)
        assert agent.returncode == 0, err[-2000:]
    finally:
        sub.client.loop_stop()
    by = {d: sorted((r for r in sub.results() if r["device"] == d), key=lambda r: r["window"]["start_s"])
          for d in ("vib-replay", "vib-mqtt")}
    assert len(by["vib-mqtt"]) == len(by["vib-replay"]) == expected
    for a, b in zip(by["vib-replay"], by["vib-mqtt"]):
        assert b["window"]["end_s"] - b["window"]["start_s"] < 0.2  # no window spans the 2 s jump
        assert (a["label"], a["decision"]) == (b["label"], b["decision"])
    labels = {r["label"] for r in by["vib-replay"]}
    assert labels == {"normal", "fault"}, labels
