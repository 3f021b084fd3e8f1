"""Every source is held to the bundle's input contract (issue 12): replay, serial (a real pty) and MQTT (a real
mosquitto) map channels by name or declared order and stop at start with one line when a channel the bundle
needs is missing or the rate is off by more than source.RATE_TOLERANCE; a live stream drifting while running
is a warning and the metric rate_drift."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from streamfactory import CHANNELS, Gateway, recording, write_csv

from edgekit.agent import Agent
from edgekit.config import AgentConfig, MqttSource, ReplaySource, SerialSource, validate
from edgekit.contract import samples as payloads
from edgekit.errors import ConfigError, DataError
from edgekit.manifest import Recording
from edgekit.outbox import Outbox
from edgekit.source import RATE_TOLERANCE, ChannelMap, open_source
from edgekit.values import Sample, SampleBlock

RATE = 1000.0  # the stream bundle's (tests/conftest.py stream_bundle)
TOPIC = "sensors/vib-1"


def toml(data: dict[str, Any], prefix: str = "") -> str:
    """A small TOML writer for agent configs: scalars, lists of scalars and nested tables."""
    lines = [f"{k} = {orjson.dumps(v).decode()}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            lines.append(f"\n[{prefix}{k}]\n" + toml(v, f"{prefix}{k}."))
    return "\n".join(lines)


def config(bundle: Path, tmp_path: Path, source: dict[str, Any]) -> dict[str, Any]:
    return {"device_id": "dev-contract", "site": "test", "allow_unsigned": True, "bundle": str(bundle), "source": source,
            "mqtt": {"url": ""}, "outbox": {"path": str(tmp_path / "o.db")}, "runtime": {"intra_op_threads": 1}}


def cli_run(cfg: dict[str, Any], tmp_path: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "agent.toml"
    path.write_text(toml(cfg) + "\n")
    return subprocess.run([sys.executable, "-m", "edgekit", "run", "--config", str(path)], capture_output=True,
                          text=True, timeout=timeout)


def error_line(out: subprocess.CompletedProcess[str]) -> str:
    """The one line the CLI prints for the refusal (log lines aside), and no traceback."""
    assert out.returncode != 0, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    return errors[0]


def pty_port() -> tuple[int, int, str]:
    """(master, slave, the slave's name): the master is the device's end, non-blocking (see feed)."""
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    os.set_blocking(master, False)
    return master, slave, os.ttyname(slave)


def feed(master: int, data: bytes, stop: threading.Event | None = None, timeout_s: float = 30) -> None:
    """Write `data` to the device's end as the reader drains the pty's small buffer; give up on stop or timeout
    (a reader that stopped reading must not hang the test)."""
    deadline = time.monotonic() + timeout_s
    while data and not (stop is not None and stop.is_set()) and time.monotonic() < deadline:
        try:
            data = data[os.write(master, data):]
        except BlockingIOError:
            time.sleep(0.005)


def lines(values: np.ndarray, t_s: np.ndarray | None = None) -> bytes:
    rows = values.tolist() if t_s is None else np.column_stack([t_s, values]).tolist()
    return b"".join(",".join(repr(v) for v in row).encode() + b"\n" for row in rows)


# --- channel maps --------------------------------------------------------------------------------------


def test_channel_map_by_count_by_name_and_what_it_refuses(caplog: pytest.LogCaptureFixture) -> None:
    assert ChannelMap.of(None, CHANNELS).pick is None and ChannelMap.of(3, CHANNELS).channels == CHANNELS
    caplog.set_level(logging.INFO, logger="edgekit.source")
    m = ChannelMap.of(["temp", "az", "ax", "ay"], CHANNELS)
    assert m.channels == CHANNELS and m.ignored == ("temp",)
    np.testing.assert_array_equal(m.apply(np.array([[9.0, 3.0, 1.0, 2.0]])), [[1.0, 2.0, 3.0]])
    m.log_ignored("topic t")
    assert "source.channels_ignored where=topic t ignored=['temp']" in caplog.text
    with pytest.raises(ConfigError) as err:
        ChannelMap.of(4, CHANNELS)
    assert str(err.value).startswith("source.channels: bundle expects 3 channels ['ax', 'ay', 'az']; "
                                     "source.channels is 4 (a count means the bundle's channels in its order")
    with pytest.raises(ConfigError) as err:
        ChannelMap.of(["ax", "ay", "temp"], CHANNELS)
    assert str(err.value).startswith("source.channels: bundle expects channels ['ax', 'ay', 'az']; "
                                     "source.channels has ['ax', 'ay', 'temp']: missing ['az'] (")


# --- replay ------------------------------------------------------------------------------------------------


@pytest.mark.torch
@pytest.mark.slow
def test_replay_of_a_file_without_a_bundle_channel_stops_with_one_line(stream_bundle: Path, tmp_path: Path) -> None:
    path = write_csv(tmp_path / "rec.csv", recording(RATE, 1.0), columns=("ax", "ay", "temp"))
    line = error_line(cli_run(config(stream_bundle, tmp_path, {"kind": "replay", "path": str(path)}), tmp_path))
    assert line.startswith(f"error: {path}:1: missing columns ['az'] that the bundle reads; "
                           "the file has ['ax', 'ay', 'temp'] (check source.layout"), line


@pytest.mark.torch
@pytest.mark.slow
def test_replay_of_a_file_at_another_rate_stops_with_one_line(stream_bundle: Path, tmp_path: Path) -> None:
    values = recording(800.0, 1.0)
    path = write_csv(tmp_path / "rec.csv", values, t_s=np.arange(len(values)) / 800.0)
    layout = {"delimiter": ",", "header_line": 1, "time_column": "t", "time_format": "seconds"}
    line = error_line(cli_run(config(stream_bundle, tmp_path, {"kind": "replay", "path": str(path),
                                                               "layout": layout}), tmp_path))
    assert line.startswith(f"error: {path}: bundle expects 1000 Hz, the file's rate (the steps of its "
                           "column 't') is 800 Hz (20 % off, more than the 2% tolerance) (replay a recording"), line


def test_replay_within_the_tolerance_is_read(tmp_path: Path) -> None:
    rate = RATE * (1 + RATE_TOLERANCE / 2)
    path = write_csv(tmp_path / "rec.csv", recording(rate, 0.1))
    layout = Recording(delimiter=",", header_line=1, rate_hz=rate)
    with open_source(ReplaySource(path=path, layout=layout), channel_names=CHANNELS, rate_hint=RATE) as src:
        assert src.rate_hz == rate and len(list(src)) == 101  # 0.1 s at 1010 Hz
    with pytest.raises(DataError, match="bundle expects 1000 Hz, the file's rate .the layout's rate_hz. is 1030 Hz"):
        open_source(ReplaySource(path=path, layout=layout.model_copy(update={"rate_hz": 1030.0})),
                    channel_names=CHANNELS, rate_hint=RATE)


# --- serial over a real pty ------------------------------------------------------------------------------------


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize(("source", "expected"), [
    ({"channels": ["ax", "ay", "temp"]}, "error: source.channels: bundle expects channels ['ax', 'ay', 'az']; "
                                         "source.channels has ['ax', 'ay', 'temp']: missing ['az'] (name the"),
    ({"rate_hz": 800.0}, "error: source.rate_hz: bundle expects 1000 Hz, source.rate_hz is 800 Hz (20 % off, "
                         "more than the 2% tolerance) (leave source.rate_hz out"),
], ids=["missing-channel", "rate"])
def test_serial_config_off_the_contract_stops_with_one_line(source: dict[str, Any], expected: str,
                                                            stream_bundle: Path, tmp_path: Path) -> None:
    master, slave, port = pty_port()
    try:
        out = cli_run(config(stream_bundle, tmp_path, {"kind": "serial", "port": port, **source}), tmp_path)
    finally:
        os.close(master)
        os.close(slave)
    assert error_line(out).startswith(expected), out.stderr


@pytest.mark.torch
@pytest.mark.slow
def test_serial_lines_timed_at_another_rate_stop_the_agent(stream_bundle: Path, tmp_path: Path) -> None:
    master, slave, port = pty_port()
    cfg = validate(AgentConfig, config(stream_bundle, tmp_path, {"kind": "serial", "port": port}), "test")
    values = recording(800.0, 2.0)
    stop = threading.Event()

    feeder = threading.Thread(target=feed, args=(master, lines(values, np.arange(len(values)) / 800.0), stop))
    try:
        with Agent(cfg) as agent:
            feeder.start()
            with pytest.raises(DataError) as err:
                agent.run(drain_timeout_s=0)
    finally:
        stop.set()
        feeder.join()
        os.close(master)
        os.close(slave)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"{port}: bundle expects 1000 Hz, the lines' rate (their times over 1 s) is "
                                     "800 Hz (20 % off, more than the 2% tolerance)"), str(err.value)
    assert agent.counters.samples <= 801  # stopped at the first measurement


@pytest.mark.torch
@pytest.mark.slow
def test_serial_shorthand_takes_the_bundle_channels_and_rate(stream_bundle: Path, tmp_path: Path) -> None:
    """`edgekit run --source serial:PORT` (no @CHANNELS, no rate): lines of the bundle's 3 channels at its 1 kHz."""
    from edgekit.cli import agent_config

    master, slave, port = pty_port()
    cfg = agent_config(None, bundle=stream_bundle, source=f"serial:{port}", broker="", outbox=tmp_path / "o.db",
                       allow_unsigned=True)
    assert cfg.source.rate_hz is None and cfg.source.channels is None
    values = recording(RATE, 0.6)
    stop = threading.Event()
    try:
        with Agent(cfg, stop) as agent:
            thread = threading.Thread(target=agent.run, kwargs={"drain_timeout_s": 0})
            thread.start()
            deadline = time.monotonic() + 10
            while agent.source is None and time.monotonic() < deadline:  # the port is open once it is set
                time.sleep(0.01)
            feed(master, lines(values))
            while agent.counters.samples < len(values) and time.monotonic() < deadline + 10:
                time.sleep(0.01)
            stop.set()
            thread.join(10)
    finally:
        stop.set()
        os.close(master)
        os.close(slave)
    assert agent.source.rate_hz == RATE and agent.counters.samples == len(values)
    with Outbox(tmp_path / "o.db") as box:
        results = [orjson.loads(r.payload) for r in box.pending(1000) if r.topic.endswith("/result")]
    np.testing.assert_allclose([(r["window"]["start_s"], r["window"]["end_s"]) for r in results],
                               [(k * 0.128, k * 0.128 + 0.255) for k in range(len(values[256:]) // 128 + 1)])


def test_serial_maps_named_channels_and_defaults_its_rate_to_the_bundle(caplog: pytest.LogCaptureFixture) -> None:
    master, slave, port = pty_port()
    caplog.set_level(logging.INFO, logger="edgekit.source")
    stop = threading.Event()
    received: list[Any] = []
    try:
        src = open_source(SerialSource(port=port, channels=["temp", "az", "ay", "ax"]), stop=stop,
                          channel_names=CHANNELS, rate_hint=RATE)
        assert src.channels == CHANNELS and src.rate_hz == RATE
        with src:
            feed(master, b"20.5,3,2,1\n20.5,6,5,4\n")
            for item in src:
                received.append(item)
                if len(received) == 2:
                    stop.set()
    finally:
        os.close(master)
        os.close(slave)
    assert [(s.t_s, s.values.tolist()) for s in received] == [(0.0, [1, 2, 3]), (0.001, [4, 5, 6])]
    assert f"source.channels_ignored where={port} ignored=['temp']" in caplog.text


# --- mqtt through a real mosquitto --------------------------------------------------------------------------


def run_mqtt_agent(bundle: Path, url: str, tmp_path: Path, publish: list[bytes], *, until_samples: int,
                   **source: Any) -> tuple[Agent, BaseException | None]:
    """Agent.run on the mqtt source in a thread; `publish` once it subscribed; stop at `until_samples`."""
    cfg = validate(AgentConfig, {**config(bundle, tmp_path, {"kind": "mqtt", "topic": TOPIC, "url": url, **source}),
                                 "mqtt": {"url": None}, "metrics_interval_s": 0.2}, "test")
    stop = threading.Event()
    failed: list[BaseException] = []
    with Agent(cfg, stop) as agent:
        def run() -> None:
            try:
                agent.run(drain_timeout_s=0)
            except BaseException as exc:  # handed to the test
                failed.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 10
        while agent.source is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert agent.source is not None and agent.source.subscribed.wait(10)
        gateway = Gateway(int(url.rsplit(":", 1)[1]), TOPIC)
        try:
            gateway.publish(*publish)
        finally:
            gateway.close()
        deadline = time.monotonic() + 30
        while agent.counters.samples < until_samples and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        stop.set()
        thread.join(10)
    return agent, failed[0] if failed else None


@pytest.mark.broker
@pytest.mark.torch
@pytest.mark.slow
def test_mqtt_config_without_a_bundle_channel_stops_with_one_line(stream_bundle: Path, mosquitto,
                                                                  tmp_path: Path) -> None:
    cfg = config(stream_bundle, tmp_path, {"kind": "mqtt", "topic": TOPIC, "url": mosquitto.url,
                                           "channels": ["ax", "ay"]})
    assert error_line(cli_run(cfg, tmp_path)).startswith(
        "error: source.channels: bundle expects channels ['ax', 'ay', 'az']; source.channels has ['ax', 'ay']: "
        "missing ['az'] (name the channels the device sends")


def blocks_at(rate_hz: float, seconds: float, size: int, *, declare: bool = True, start_s: float = 0.0,
              seed: int = 1) -> list[bytes]:
    values = recording(rate_hz, seconds, seed)
    return [payloads.encode_binary(start_s + a / rate_hz, rate_hz, values[a:a + size]) if declare
            else payloads.encode_json_block(start_s + a / rate_hz, values[a:a + size])
            for a in range(0, len(values), size)]


@pytest.mark.broker
@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize(("publish", "expected"), [
    ([payloads.encode_json_block(0.0, np.ones((100, 2)), channels=["ax", "ay"])],
     f"topic {TOPIC}: bundle expects channels ['ax', 'ay', 'az']; the block has ['ax', 'ay']: missing ['az'] ("),
    (blocks_at(800.0, 0.5, 80),
     f"topic {TOPIC}: bundle expects 1000 Hz, the first block's rate_hz is 800 Hz (20 % off, more than the 2% "
     "tolerance) (publish at the bundle's rate"),
    (blocks_at(800.0, 2.0, 80, declare=False),  # JSON blocks without rate_hz, t0 stepping at 800 Hz
     f"topic {TOPIC}: bundle expects 1000 Hz, the stream's rate (its sample times over 1 s) is 800 Hz (20 % off"),
    ([payloads.encode_sample(k / 800.0, row) for k, row in enumerate(recording(800.0, 1.5))],
     f"topic {TOPIC}: bundle expects 1000 Hz, the stream's rate (its sample times over 1 s) is 800 Hz (20 % off"),
], ids=["json-block-missing-channel", "binary-block-rate", "json-blocks-measured", "samples-measured"])
def test_mqtt_stream_off_the_contract_stops_with_one_line(publish: list[bytes], expected: str, stream_bundle: Path,
                                                          mosquitto, tmp_path: Path) -> None:
    agent, error = run_mqtt_agent(stream_bundle, mosquitto.url, tmp_path, publish, until_samples=10**9)
    assert isinstance(error, DataError) and "\n" not in str(error)
    assert str(error).startswith(expected), str(error)
    assert agent.counters.samples <= 900  # stopped at the first block, or at the first measurement (1 s)


@pytest.mark.broker
@pytest.mark.torch
@pytest.mark.slow
def test_mqtt_drift_while_running_is_a_warning_and_a_metric(stream_bundle: Path, mosquitto, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """1.5 s at 1 kHz (the start check passes), then 3 s at 900 Hz: the agent goes on, warns once (rate-limited)
    and counts each off measurement in metrics rate_drift."""
    ok = blocks_at(RATE, 1.5, 100)
    slow = blocks_at(900.0, 3.0, 90, start_s=1.5, seed=2)
    caplog.set_level(logging.WARNING, logger="edgekit.source")
    agent, error = run_mqtt_agent(stream_bundle, mosquitto.url, tmp_path, ok + slow, until_samples=1500 + 2700)
    assert error is None
    c = agent.counters
    assert c.samples == 1500 + 2700 and c.quarantined == 0 and c.windows == (4200 - 256) // 128 + 1
    assert c.rate_drift >= 2 and c.source_rate_hz == pytest.approx(900.0)
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("source.rate_drift")]
    assert len(warnings) == 1, warnings
    assert f"where=topic {TOPIC} expected_hz=1000 measured_hz=950 " in warnings[0]  # 1.0-2.0 s: half at 900 Hz
    with Outbox(tmp_path / "o.db") as box:
        metrics = [orjson.loads(r.payload) for r in box.pending(10**6) if r.topic.endswith("/metrics")]
    assert metrics[-1]["rate_drift"] == c.rate_drift and metrics[-1]["source_rate_hz"] == pytest.approx(900.0)


@pytest.mark.broker
def test_mqtt_maps_named_channels_of_blocks(mosquitto) -> None:
    stop = threading.Event()
    src = open_source(MqttSource(topic=TOPIC, channels=["temp", "az", "ay", "ax"]), stop=stop,
                      mqtt_url=mosquitto.url, channel_names=CHANNELS, rate_hint=RATE)
    assert src.channels == CHANNELS
    sent = np.array([[20.0, 3.0, 2.0, 1.0], [20.0, 6.0, 5.0, 4.0]])
    received: list[Any] = []
    with src:
        assert src.subscribed.wait(10)
        gateway = Gateway(mosquitto.port, TOPIC)
        try:
            gateway.publish(payloads.encode_binary(5.0, RATE, sent),  # the declared order
                            payloads.encode_json_block(5.002, sent[:, [3, 2, 1]], channels=["ax", "ay", "az"]),
                            payloads.encode_sample(5.004, sent[0]))
        finally:
            gateway.close()
        deadline = time.monotonic() + 10
        for item in src.iter_blocks():
            received.append(item)
            if len(received) == 3 or time.monotonic() > deadline:
                stop.set()
    assert [type(i) for i in received] == [SampleBlock, SampleBlock, Sample]
    assert received[0].t_s.tolist() == [5.0, 5.001] and received[0].values.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert received[1].values.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert received[2].values.tolist() == [1, 2, 3]
