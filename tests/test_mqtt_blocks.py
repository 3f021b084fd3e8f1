"""Block payloads on the MQTT source (issue 12): JSON and binary blocks through a real mosquitto into the
agent give the results the same samples give replayed from a file; bad blocks are quarantined naming the
topic while the good ones go on; the layouts round-trip (edgekit/contract/samples.py)."""

from __future__ import annotations

import logging
import math
import struct
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from streamfactory import Gateway, recording, write_csv

from edgekit.agent import Agent
from edgekit.config import AgentConfig, validate
from edgekit.contract import samples as payloads
from edgekit.errors import DataError
from edgekit.outbox import Outbox

TOPIC = "sensors/vib-1"
RATE = 1000.0


# --- the layouts, without a broker -----------------------------------------------------------------------


def test_binary_layout_is_the_documented_one() -> None:
    values = np.array([[1.5, -2.0, 3.25], [4.0, 5.0, 6.0]])
    data = payloads.encode_binary(12.5, 1000.0, values)
    assert len(data) == 32 + 2 * 3 * 4
    assert data[:4] == b"EKSB" and data[4] == 1 and data[5] == 1
    assert struct.unpack_from("<HI", data, 6) == (3, 2)
    assert struct.unpack_from("<ddf", data, 12) == (12.5, 1000.0, 1.0)
    np.testing.assert_array_equal(np.frombuffer(data, "<f4", offset=32).reshape(2, 3), values)
    block = payloads.decode_binary(data, ("a", "b", "c"))
    assert (block.t0_s, block.rate_hz, block.channels) == (12.5, 1000.0, None)
    np.testing.assert_array_equal(block.values, values)


def test_int16_blocks_carry_values_times_scale() -> None:
    values = np.array([[0.5, -0.25], [16.0, -16.0]])
    data = payloads.encode_binary(0.0, 25600.0, values, dtype="int16", scale=2 ** -10)
    assert data[5] == 2 and len(data) == 32 + 2 * 2 * 2
    np.testing.assert_array_equal(payloads.decode_binary(data, ("x", "y")).values, values)
    with pytest.raises(ValueError, match="do not fit int16"):
        payloads.encode_binary(0.0, 1.0, np.array([[40.0]]), dtype="int16", scale=2 ** -10)


def test_json_block_round_trips_and_names_the_bad_cell() -> None:
    values = np.array([[1.0, 2.0], [3.0, 4.0]])
    data = payloads.encode_json_block(2.0, values, rate_hz=50.0, channels=["y", "x"])
    assert orjson.loads(data) == {"t0": 2.0, "rate_hz": 50.0, "channels": ["y", "x"], "values": [[1.0, 2.0], [3.0, 4.0]]}
    block = payloads.decode_json_block(orjson.loads(data), data, ("x", "y"))
    assert (block.t0_s, block.rate_hz, block.channels) == (2.0, 50.0, ("y", "x"))
    np.testing.assert_array_equal(block.values, values)
    for obj, reason in [({"t0": 0, "values": [[1, 2], [3]]}, "wrong width: row 1 has 1 values, expected 2"),
                        ({"t0": 0, "values": [[1, True]]}, "not a number: column 'y' at row 0 (got True)"),
                        ({"t0": 0, "values": [[1, "x"]]}, "not a number: column 'y' at row 0 (got 'x')"),
                        ({"t0": 0, "values": [[1, "nan"]]}, "not finite: column 'y' at row 0 (got nan)"),
                        ({"t0": "0", "values": [[1, 2]]}, "bad block: 't0' must be a number"),
                        ({"t0": 0, "rate_hz": 0, "values": [[1, 2]]}, "bad block: rate_hz must be"),
                        ({"t0": 0, "values": []}, "bad block: 'values' must be a non-empty list")]:
        raw = orjson.dumps(obj)
        with pytest.raises(DataError) as err:
            payloads.decode_json_block(orjson.loads(raw), raw, ("x", "y"))
        assert err.value.message.startswith(reason), err.value.message


# --- through mosquitto into the agent --------------------------------------------------------------------


def mqtt_config(bundle: Path, url: str, outbox: Path, **source: Any) -> AgentConfig:
    return validate(AgentConfig, {
        "device_id": "dev-blocks", "site": "test", "bundle": str(bundle), "allow_unsigned": True,
        "source": {"kind": "mqtt", "topic": TOPIC, "url": url, **source},
        "mqtt": {"url": None}, "outbox": {"path": str(outbox)}, "runtime": {"intra_op_threads": 1},
    }, "tests/test_mqtt_blocks.py")


def replay_config(bundle: Path, path: Path, outbox: Path) -> AgentConfig:
    return validate(AgentConfig, {
        "device_id": "dev-blocks", "site": "test", "bundle": str(bundle), "allow_unsigned": True,
        "source": {"kind": "replay", "path": str(path), "speed": 0},
        "mqtt": {"url": None}, "outbox": {"path": str(outbox)}, "runtime": {"intra_op_threads": 1},
    }, "tests/test_mqtt_blocks.py")


class Running:
    """Agent.run in a thread, stopped once it has taken `samples` samples (or on timeout)."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.stop = threading.Event()
        self.agent = Agent(cfg, self.stop).__enter__()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        deadline = time.monotonic() + 10
        while self.agent.source is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.agent.source is not None and self.agent.source.subscribed.wait(10)

    def _run(self) -> None:
        try:
            self.agent.run(drain_timeout_s=0)
        except BaseException as exc:  # handed to the test by finish()
            self.error = exc

    def finish(self, samples: int, timeout_s: float = 30) -> Agent:
        deadline = time.monotonic() + timeout_s
        while self.agent.counters.samples < samples and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        self.stop.set()
        self.thread.join(10)
        self.agent.__exit__(None, None, None)
        if self.error is not None:
            raise self.error
        return self.agent


def outbox_messages(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Outbox payloads by kind, without `ts`; window times rounded to 1e-9 s (a block's t0 + i / rate and a
    replayed file's line / rate may differ in the last bit)."""

    def rounded(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: round(v, 9) if k in ("start_s", "end_s") else rounded(v) for k, v in obj.items()}
        return [rounded(v) for v in obj] if isinstance(obj, list) else obj

    out: dict[str, list[dict[str, Any]]] = {}
    with Outbox(path) as box:
        for row in box.pending(10**7):
            obj = orjson.loads(row.payload)
            obj.pop("ts")
            out.setdefault(row.topic.rsplit("/", 1)[1], []).append(rounded(obj))
    return out


def same(x: Any, y: Any, approx: bool = False) -> bool:
    """Equal, but model outputs (probabilities, scores, confidence) to 1e-5: onnxruntime's fp32 gate gives
    the last bit of a score by batch size (one window from a 100-sample block; ~15 from a replayed chunk)."""
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(same(x[k], y[k], approx or k in ("probs", "scores", "confidence"))
                                            for k in x)
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(same(a, b, approx) for a, b in zip(x, y))
    if approx and isinstance(x, float) and isinstance(y, float):
        return x == pytest.approx(y, rel=1e-5, abs=1e-9)
    return type(x) is type(y) and x == y


def blocks(values: np.ndarray, size: int, how: str) -> list[bytes]:
    out = []
    for a in range(0, len(values), size):
        t0, part = a / RATE, values[a:a + size]
        if how == "binary":
            out.append(payloads.encode_binary(t0, RATE, part))
        elif how == "json":
            out.append(payloads.encode_json_block(t0, part, channels=["ax", "ay", "az"]))
        else:  # one sample per message, today's payload
            out.extend(payloads.encode_sample((a + i) / RATE, row) for i, row in enumerate(part))
    return out


@pytest.mark.broker
@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize("how", ["binary", "json", "sample"])
def test_blocks_through_mosquitto_give_the_results_of_the_replayed_samples(
        how: str, stream_bundle: Path, mosquitto, tmp_path: Path) -> None:
    values = recording(RATE, 6.0)
    with Agent(replay_config(stream_bundle, write_csv(tmp_path / "rec.csv", values), tmp_path / "replay.db")) as agent:
        replayed = agent.run()
    running = Running(mqtt_config(stream_bundle, mosquitto.url, tmp_path / "mqtt.db"))
    gateway = Gateway(mosquitto.port, TOPIC)
    try:
        gateway.publish(*blocks(values, 100, how))
        agent = running.finish(len(values))
    finally:
        gateway.close()
    assert agent.counters.samples == len(values) and agent.counters.quarantined == 0
    assert agent.counters.windows == replayed.windows == (len(values) - 256) // 128 + 1
    a, b = outbox_messages(tmp_path / "replay.db"), outbox_messages(tmp_path / "mqtt.db")
    assert {r["label"] for r in a["result"]} == {"normal", "fault"}  # the stream holds both classes
    assert len(b["result"]) == len(a["result"]) and all(map(same, b["result"], a["result"]))
    assert len(b.get("review", [])) == len(a.get("review", [])) == agent.counters.deferred
    assert all(map(same, b.get("review", []), a.get("review", [])))  # features and signal: bit for bit
    last = b["metrics"][-1]  # the agent's final metrics message
    assert last["rate_drift"] == 0 and last["source_rate_hz"] == pytest.approx(RATE)


@pytest.mark.broker
@pytest.mark.torch
@pytest.mark.slow
def test_bad_blocks_are_quarantined_naming_the_topic_and_the_stream_goes_on(
        stream_bundle: Path, mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    values = recording(RATE, 3.0)
    good = blocks(values, 100, "binary")
    one = good[12]  # a block that would be fine at its place
    t0_12 = 12 * 100 / RATE
    nan = np.array([[math.nan, 0.0, 0.0]])
    bad = {
        "wrong size": [one[:-4]],
        "bad block": [one[:4] + b"\x02" + one[5:],  # version 2
                      one[:5] + b"\x07" + one[6:],  # dtype code 7
                      payloads.encode_binary(math.nan, RATE, values[1200:1300]),
                      payloads.encode_binary(t0_12, 0.0, values[1200:1300]),
                      orjson.dumps({"t0": "soon", "values": [[1, 2, 3]]})],
        "wrong width": [payloads.encode_binary(t0_12, RATE, values[1200:1300, :2]),
                        orjson.dumps({"t0": t0_12, "values": [[1.0, 2.0, 3.0], [1.0, 2.0]]})],
        "not finite": [payloads.encode_binary(t0_12, RATE, np.vstack([values[1200:1299], nan]))],
        "time went backwards": [good[3]],
        "not JSON": [b"\x00\x01 not a payload"],
    }
    caplog.set_level(logging.WARNING, logger="edgekit.agent")
    running = Running(mqtt_config(stream_bundle, mosquitto.url, tmp_path / "o.db"))
    gateway = Gateway(mosquitto.port, TOPIC)
    try:
        gateway.publish(*good[:12])
        gateway.publish(*(p for ps in bad.values() for p in ps))
        gateway.publish(*good[12:])
        agent = running.finish(len(values))
    finally:
        gateway.close()
    c = agent.counters
    assert c.samples == len(values) and c.windows == (len(values) - 256) // 128 + 1
    assert c.quarantined == sum(map(len, bad.values()))
    assert dict(c.quarantine_reasons) == {k: len(v) for k, v in bad.items()}
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("agent.quarantine")]
    assert len(lines) == c.quarantined and all(f"where=topic {TOPIC} " in line for line in lines)
    assert any("unknown version 2" in line for line in lines)
    assert any("wrong size: 1228 bytes, expected 1232 for 100 samples x 3 channels of float32" in line
               for line in lines)
    assert any("time went backwards: 0.3 s after 1.199 s" in line for line in lines)
