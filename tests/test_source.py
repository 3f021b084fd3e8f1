"""Sources against real recordings, a real pseudo-terminal and a real broker: every bad line is quarantined
with its file:line and reason, the good samples still come through, and `stop` ends the stream."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path

import numpy as np
import orjson
import paho.mqtt.client as mqtt
import pytest

from edgekit.config import MqttSource, ReplaySource, SerialSource, SimulatedSource
from edgekit.datasets import (
    IPOL_CHANNELS,
    IPOL_RECORDING,
    NAB_RECORDING,
    SKAB_CHANNELS,
    SKAB_RECORDING,
    read_ipol,
    read_nab,
    read_skab,
)
from edgekit.errors import ConfigError, DataError
from edgekit.manifest import Recording
from edgekit.simulate import SimulatedReader, gait_trial
from edgekit.source import SOURCES, open_source, resolve
from edgekit.values import Quarantined, Sample

SKAB_FAULT = "skab/data/valve1/1.csv"
IPOL_TRIAL = "ipol_gait/GaitData/1-1_lb.txt"
NAB_FILE = "nab/data/realKnownCause/machine_temperature_system_failure.csv"


# Replay reads a file by its layout; these are the training side's (one place per dataset).
LAYOUTS = {"skab": (SKAB_RECORDING, SKAB_CHANNELS), "ipol": (IPOL_RECORDING, IPOL_CHANNELS),
           "nab": (NAB_RECORDING, ("value",))}


def replay(path: Path, kind: str, **kw) -> tuple[ReplaySource, dict]:
    """A replay config for a file in `kind`'s layout, and the channels to read (what the bundle gives)."""
    layout, channels = LAYOUTS[kind]
    return ReplaySource(path=path, layout=layout, **kw), {"channel_names": channels}


def drain(cfg, kw: dict | None = None, **more) -> tuple[list[Sample], list[Quarantined], object]:
    src = open_source(cfg, **(kw or {}), **more)
    with src:
        items = list(src)
    return ([i for i in items if isinstance(i, Sample)], [i for i in items if isinstance(i, Quarantined)], src)


# --- replay of real recordings ---------------------------------------------------------------------


@pytest.mark.data
def test_replay_skab_fault_file_matches_the_training_reader(data_dir: Path) -> None:
    path = data_dir / SKAB_FAULT
    samples, bad, src = drain(*replay(path, "skab"))
    table = read_skab(path)
    assert src.channels == SKAB_CHANNELS and src.rate_hz == 1.0 and src.finite
    assert bad == []
    assert len(samples) == len(table.values) == 1145
    np.testing.assert_array_equal(np.stack([s.values for s in samples]), table.values)
    # ISO stamps are the recording's own dates (issue 15): seconds since 1970, as the training reader's t0 + t
    np.testing.assert_allclose([s.t_s for s in samples], table.t_s + table.meta["t0"], rtol=0, atol=1e-6)
    assert samples[0].t_s == 1583750073.0  # 2020-03-09 10:34:33, valve1/1.csv's first line


@pytest.mark.data
def test_replay_ipol_trial_matches_the_training_reader(data_dir: Path) -> None:
    path = data_dir / IPOL_TRIAL
    samples, bad, src = drain(*replay(path, "ipol"))
    table = read_ipol(path)
    assert src.channels == IPOL_CHANNELS and src.rate_hz == 100.0
    assert bad == []
    assert len(samples) == len(table.values) == 2913
    assert all(s.values.shape == (6,) for s in samples)
    np.testing.assert_array_equal(np.stack([s.values for s in samples]), table.values)
    np.testing.assert_allclose([s.t_s for s in samples], table.t_s)


@pytest.mark.data
def test_replay_nab_quarantines_its_repeated_hour(data_dir: Path) -> None:
    """The real NAB machine-temperature file repeats 02:00-02:55 on 2014-01-07 (lines 10151-10162)."""
    path = data_dir / NAB_FILE
    samples, bad, src = drain(*replay(path, "nab"))
    assert src.channels == ("value",) and src.rate_hz == pytest.approx(1 / 300)
    assert [q.where for q in bad] == [f"{path}:{n}" for n in range(10151, 10163)]
    assert all(q.reason.startswith(("time went backwards", "time did not advance")) for q in bad)
    assert len(samples) + len(bad) == len(read_nab(path).values)
    assert np.all(np.diff([s.t_s for s in samples]) > 0)


@pytest.mark.data
def test_replay_bad_lines_are_quarantined_and_good_ones_pass(data_dir: Path, tmp_path: Path) -> None:
    lines = (data_dir / IPOL_TRIAL).read_text().splitlines()[:40]  # 2 header lines + 38 samples
    bad = {
        10: lines[10].replace(lines[10].split("\t")[2], "abc", 1),   # text in Acc_Y
        15: lines[15].replace(lines[15].split("\t")[4], "NaN", 1),   # NaN in Gyr_X
        20: "\t".join(lines[20].split("\t")[:7]),                    # wrong width
        25: "\t".join(["3.0", *lines[25].split("\t")[1:]]),          # PacketCounter goes back
        30: lines[30].replace(lines[30].split("\t")[1], "inf", 1),   # inf in Acc_X
    }
    edited = [bad.get(i, line) for i, line in enumerate(lines)]
    path = tmp_path / "9-9_lb.txt"
    path.write_text("\n".join(edited) + "\n\n")
    samples, quarantined, _ = drain(*replay(path, "ipol"))
    assert [q.where for q in quarantined] == [f"{path}:{i + 1}" for i in sorted(bad)]
    reasons = [q.reason for q in quarantined]
    assert reasons[0] == "not a number: column 'Acc_Y' (got 'abc')"
    assert reasons[1] == "not finite: column 'Gyr_X' (got 'NaN')"
    assert reasons[2] == "wrong width: expected 10 cells, got 7"
    assert reasons[3].startswith("time went backwards: PacketCounter 3 after")
    assert reasons[4] == "not finite: column 'Acc_X' (got 'inf')"
    assert [q.raw for q in quarantined] == [bad[i] for i in sorted(bad)]
    good_rows = [i for i in range(2, 40) if i not in bad]
    assert len(samples) == len(good_rows)
    expected = np.array([[float(c) for c in lines[i].split("\t")[1:7]] for i in good_rows])
    np.testing.assert_array_equal(np.stack([s.values for s in samples]), expected)
    # time is the row's place in the file, so a quarantined row leaves a gap of one sample period
    np.testing.assert_allclose([s.t_s for s in samples], [(i - 2) / 100 for i in good_rows])


@pytest.mark.data
def test_replay_skab_time_backwards_and_bad_stamp(data_dir: Path, tmp_path: Path) -> None:
    lines = (data_dir / SKAB_FAULT).read_text().splitlines()[:12]
    edited = list(lines)
    edited[5] = lines[2]                                   # a timestamp from the past
    edited[7] = "yesterday" + lines[7][len("2020-03-09 10:34:39"):]
    edited[9] = lines[9] + ";1.0"                          # one cell too many
    path = tmp_path / "pump.csv"
    path.write_text("\n".join(edited) + "\n")
    samples, quarantined, _ = drain(*replay(path, "skab"))
    assert [(q.where, q.reason.split(":")[0]) for q in quarantined] == [
        (f"{path}:6", "time went backwards"), (f"{path}:8", "bad timestamp"), (f"{path}:10", "wrong width")]
    assert len(samples) == 11 - 3
    assert np.all(np.diff([s.t_s for s in samples]) > 0)


def test_replay_file_level_problems_raise(tmp_path: Path) -> None:
    cfg, kw = replay(tmp_path / "missing.csv", "skab")
    with pytest.raises(ConfigError, match="replay file not found"):
        open_source(cfg, **kw)
    odd = tmp_path / "odd.csv"
    odd.write_text("a|b|c\n1|2|3\n")
    with pytest.raises(ConfigError, match="layout is unknown") as err:
        open_source(ReplaySource(path=odd), channel_names=("a",))
    assert "source.layout" in (err.value.hint or "")
    cfg, kw = replay(odd, "skab")
    with pytest.raises(DataError, match=r"odd.csv:1: missing columns \['Accelerometer1RMS'"):
        open_source(cfg, **kw)
    generic = ReplaySource(path=odd, layout=Recording(delimiter="|", rate_hz=10.0))
    samples, bad, src = drain(generic, channel_names=("c", "a"))  # any layout, any columns, by name
    assert src.channels == ("c", "a") and src.rate_hz == 10.0 and not bad
    assert samples[0].values.tolist() == [3.0, 1.0]


def write_ipol_like(path: Path, rows: int, rate_hz: float = 100.0) -> None:
    rng = np.random.default_rng(0)
    data = np.column_stack([np.arange(rows), rng.normal(size=(rows, 9))])
    header = "PacketCounter\tAcc_X\tAcc_Y\tAcc_Z\tGyr_X\tGyr_Y\tGyr_Z\tMag_X\tMag_Y\tMag_Z"
    body = "\n".join("\t".join(f"{v:.6f}" for v in row) for row in data)
    path.write_text(f"Acquisition frequency: {rate_hz:g} Hz\n{header}\n{body}\n")


def test_replay_large_file_with_few_bad_lines(tmp_path: Path) -> None:
    """Clean pieces of a chunk stay on the vectorised path; the bad lines still come out one by one."""
    path = tmp_path / "big_lb.txt"
    write_ipol_like(path, 5000)
    lines = path.read_text().splitlines()
    for i in (100, 2100, 2101, 4999):  # file lines 101, 2101, 2102, 5000
        lines[i] = lines[i].replace("\t", "\tx", 1)
    path.write_text("\n".join(lines) + "\n")
    samples, bad, _ = drain(*replay(path, "ipol"))
    assert [q.where for q in bad] == [f"{path}:{n}" for n in (101, 2101, 2102, 5000)]
    assert all(q.reason.startswith("not a number: column 'Acc_X' (got 'x") for q in bad)
    assert len(samples) == 5000 - 4
    kept = [i for i in range(2, 5002) if i not in (100, 2100, 2101, 4999)]
    np.testing.assert_allclose([s.t_s for s in samples], [(i - 2) / 100 for i in kept])
    np.testing.assert_array_equal(samples[-1].values, [float(c) for c in lines[-1].split("\t")[1:7]])


def test_replay_speed_paces_to_the_sensor_clock(tmp_path: Path) -> None:
    path = tmp_path / "1-1_lb.txt"
    write_ipol_like(path, 51)  # 0.5 s of sensor time
    t0 = time.monotonic()
    fast, _, _ = drain(*replay(path, "ipol", speed=0))
    t_fast = time.monotonic() - t0
    t0 = time.monotonic()
    paced, _, _ = drain(*replay(path, "ipol", speed=2))  # 0.25 s of wall time
    t_paced = time.monotonic() - t0
    assert len(fast) == len(paced) == 51
    assert t_fast < 0.2
    assert 0.2 <= t_paced < 2.0


def test_replay_at_speed_0_reads_a_large_file_whole(tmp_path: Path) -> None:
    """50,000 lines through the chunked parser (its speed is bench/e2e.py's business, not a test's)."""
    path = tmp_path / "big_lb.txt"
    write_ipol_like(path, 50_000)
    samples, bad, _ = drain(*replay(path, "ipol"))
    assert len(samples) == 50_000 and not bad
    np.testing.assert_allclose([samples[0].t_s, samples[-1].t_s], [0.0, 49_999 / 100])


def test_stop_event_ends_a_real_time_replay(tmp_path: Path) -> None:
    path = tmp_path / "long_lb.txt"
    write_ipol_like(path, 6000)  # 60 s at real time
    stop = threading.Event()
    timer = threading.Timer(0.3, stop.set)
    cfg, kw = replay(path, "ipol", speed=1)
    src = open_source(cfg, stop=stop, **kw)
    t0 = time.monotonic()
    timer.start()
    with src:
        n = sum(1 for _ in src)
    assert time.monotonic() - t0 < 1.5
    assert 10 < n < 200  # about 30 samples in 0.3 s


# --- simulated -----------------------------------------------------------------------------------


def test_simulated_gait_is_deterministic_and_ipol_shaped() -> None:
    a, bad_a, src = drain(SimulatedSource(generator="gait", duration_s=30, seed=7))
    b, _, _ = drain(SimulatedSource(generator="gait", duration_s=30, seed=7))
    c, _, _ = drain(SimulatedSource(generator="gait", duration_s=30, seed=8))
    assert src.channels == IPOL_CHANNELS and src.rate_hz == 100.0 and not bad_a
    assert len(a) == len(b) == len(c) == 3000
    va, vb, vc = (np.stack([s.values for s in x]) for x in (a, b, c))
    np.testing.assert_array_equal(va, vb)
    assert not np.array_equal(va, vc)
    assert abs(np.linalg.norm(va[:100, :3], axis=1).mean() - 9.81) < 0.3  # standing still: gravity only


def test_simulated_gait_turns_half_a_circle_at_two_steps_per_second() -> None:
    values, phase = gait_trial(np.random.default_rng(3))
    up = np.array([8.30, 0.13, 5.77]) / np.linalg.norm([8.30, 0.13, 5.77])
    yaw = values[phase == 2, 3:] @ up
    assert abs(abs(yaw.sum() / 100.0) - np.pi) < 0.1
    walk = values[phase == 1, :3] @ up
    spectrum = np.abs(np.fft.rfft(walk - walk.mean()))
    peak_hz = np.fft.rfftfreq(len(walk), 1 / 100)[spectrum.argmax()]
    assert 1.7 <= peak_hz <= 2.3


def test_simulated_pump_is_deterministic_with_faults() -> None:
    cfg = SimulatedSource(generator="pump", duration_s=4000, seed=1)
    a, _, src = drain(cfg)
    b, _, _ = drain(cfg)
    assert src.channels == SKAB_CHANNELS and src.rate_hz == 1.0
    va = np.stack([s.values for s in a])
    np.testing.assert_array_equal(va, np.stack([s.values for s in b]))
    assert va.shape == (4000, 8)
    flow = va[:, SKAB_CHANNELS.index("Volume Flow RateRMS")]
    assert abs(np.median(flow) - 125.2) < 2.0
    assert (flow < 110).sum() > 30  # at least one valve closure in 4000 s with this seed
    assert [s.t_s for s in a[:3]] == [0.0, 1.0, 2.0]


def test_simulated_stop_event() -> None:
    stop = threading.Event()
    stop.set()
    samples, _, _ = drain(SimulatedSource(generator="pump", duration_s=1e6, speed=1), stop=stop)
    assert samples == []
    assert sum(1 for _ in SimulatedReader(SimulatedSource(generator="gait", duration_s=0.5),
                                          stop=threading.Event())) == 50


# --- registry ------------------------------------------------------------------------------------


def test_registry_resolves_every_kind() -> None:
    assert set(SOURCES) == {"replay", "simulated", "serial", "mqtt"}
    for kind in SOURCES:
        assert resolve(kind).__name__.endswith("Reader")
    with pytest.raises(ConfigError, match="unknown source kind"):
        resolve("carrier-pigeon")


def test_missing_pyserial_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['serial'] = None\n"  # makes `import serial` raise ImportError
        "from edgekit.source import resolve\n"
        "from edgekit.errors import ConfigError\n"
        "try:\n    resolve('serial')\nexcept ConfigError as e:\n"
        "    print(e.hint); print(type(e.__cause__).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["pip install 'edgekit[serial]'", "ModuleNotFoundError"]


# --- serial over a real pseudo-terminal -----------------------------------------------------------


def test_serial_over_a_pty() -> None:
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    stop = threading.Event()
    received: list = []
    try:
        src = open_source(SerialSource(port=os.ttyname(slave), channels=3, rate_hz=50), stop=stop,
                          channel_names=("x", "y", "z"))
        assert src.channels == ("x", "y", "z") and not src.finite

        def feed() -> None:
            os.write(master, b"1,2,3\n4,5")   # a line split across writes
            time.sleep(0.05)
            os.write(master, b",6\r\n7,8\n10.0,1,1,1\nx,1,2\n9.5,1,1,1\n\xff\xfe\n11.0,nan,1,1\n")
            os.write(master, b"2,2,2\n")
            deadline = time.monotonic() + 5
            while len(received) < 9 and time.monotonic() < deadline:
                time.sleep(0.01)
            stop.set()

        feeder = threading.Thread(target=feed)
        with src:
            feeder.start()
            for item in src:
                received.append(item)
        feeder.join()
    finally:
        os.close(master)
        os.close(slave)
    port = src.port
    samples = [i for i in received if isinstance(i, Sample)]
    bad = [i for i in received if isinstance(i, Quarantined)]
    assert [s.t_s for s in samples] == [0.0, 0.02, 10.0, 10.02]
    np.testing.assert_array_equal(np.stack([s.values for s in samples]),
                                  [[1, 2, 3], [4, 5, 6], [1, 1, 1], [2, 2, 2]])
    assert [(q.where, q.reason.split(":")[0]) for q in bad] == [
        (f"{port}:3", "wrong width"), (f"{port}:5", "not a number"), (f"{port}:6", "time went backwards"),
        (f"{port}:7", "not text"), (f"{port}:8", "not finite")]


def test_serial_reopens_a_replugged_device(tmp_path: Path) -> None:
    """The port is a stable symlink (like /dev/serial/by-id/...); the device behind it goes away and a new
    one appears under the same name, as when a USB sensor is unplugged and plugged in again."""
    link = tmp_path / "ttyUSB-sensor"
    first = os.openpty()
    second = os.openpty()
    for fd in (*first, *second):
        tty.setraw(fd)
    link.symlink_to(os.ttyname(first[1]))
    stop = threading.Event()
    received: list = []
    src = open_source(SerialSource(port=str(link), channels=2, rate_hz=10), stop=stop)

    def wait_for(n: int) -> None:
        deadline = time.monotonic() + 10
        while len(received) < n and time.monotonic() < deadline:
            time.sleep(0.01)

    def device() -> None:
        os.write(first[0], b"1.0,1,1\n")
        wait_for(1)
        os.close(first[0])  # unplugged: the reader's next read fails with EIO
        link.unlink()
        time.sleep(0.3)
        link.symlink_to(os.ttyname(second[1]))  # plugged in again
        deadline = time.monotonic() + 10
        while src.reconnects == 0 or not src.connected:
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        os.write(second[0], b"2.0,2,2\n")
        wait_for(2)
        stop.set()

    thread = threading.Thread(target=device)
    try:
        with src:
            thread.start()
            for item in src:
                received.append(item)
        thread.join()
    finally:
        for fd in (first[1], *second):
            os.close(fd)
    assert [(s.t_s, s.values.tolist()) for s in received] == [(1.0, [1.0, 1.0]), (2.0, [2.0, 2.0])]
    assert src.reconnects == 1


def test_serial_open_failure_is_a_device_error(tmp_path: Path) -> None:
    from edgekit.errors import DeviceError

    src = open_source(SerialSource(port=str(tmp_path / "ttyNOPE"), channels=2, rate_hz=10))
    with pytest.raises(DeviceError, match="cannot open serial port") as err:
        with src:
            pass
    assert "dialout" in (err.value.hint or "")


# --- mqtt with a real broker ---------------------------------------------------------------------


@pytest.mark.broker
def test_mqtt_source_with_a_real_broker(mosquitto) -> None:
    stop = threading.Event()
    src = open_source(MqttSource(topic="sensors/pump-1", channels=2), stop=stop, mqtt_url=mosquitto.url,
                      rate_hint=1.0, channel_names=("a", "b"))
    assert src.channels == ("a", "b") and src.rate_hz == 1.0 and not src.finite
    payloads = [
        orjson.dumps({"t": 1.0, "values": [1.0, 2.0]}),
        b"not json",
        orjson.dumps({"t": 2.0, "values": [1.0]}),
        orjson.dumps({"t": 2.0, "values": [1.0, "x"]}),
        orjson.dumps({"t": 0.5, "values": [1.0, 2.0]}),
        orjson.dumps({"values": [1.0, 2.0]}),
        orjson.dumps({"t": 3.0, "values": [3.0, 4.0]}),
    ]
    received: list = []
    with src:
        assert src.subscribed.wait(10)
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-gateway")
        pub.connect("127.0.0.1", mosquitto.port)
        pub.loop_start()
        try:
            for p in payloads:
                pub.publish("sensors/pump-1", p, qos=1).wait_for_publish(5)
        finally:
            pub.disconnect()
            pub.loop_stop()
        deadline = time.monotonic() + 10
        for item in src:
            received.append(item)
            if len(received) == len(payloads) or time.monotonic() > deadline:
                stop.set()
    samples = [i for i in received if isinstance(i, Sample)]
    bad = [i for i in received if isinstance(i, Quarantined)]
    assert [(s.t_s, s.values.tolist()) for s in samples] == [(1.0, [1.0, 2.0]), (3.0, [3.0, 4.0])]
    assert [q.reason.split(":")[0] for q in bad] == [
        "not JSON", "wrong width", "not a number", "time went backwards", "bad payload"]
    assert {q.where for q in bad} == {"topic sensors/pump-1"}
    assert bad[0].raw == "not json"


@pytest.mark.broker
def test_mqtt_source_stops_promptly_when_idle(mosquitto) -> None:
    stop = threading.Event()
    src = open_source(MqttSource(topic="sensors/idle", channels=1), stop=stop, mqtt_url=mosquitto.url)
    threading.Timer(0.3, stop.set).start()
    t0 = time.monotonic()
    with src:
        assert list(src) == []
    assert time.monotonic() - t0 < 2.0


@pytest.mark.broker
def test_mqtt_source_resubscribes_after_a_broker_restart(mosquitto) -> None:
    stop = threading.Event()
    src = open_source(MqttSource(topic="sensors/t", channels=1), stop=stop, mqtt_url=mosquitto.url)
    got: list = []

    def publish_until_received(t: float) -> None:
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"gw-{t}")
        pub.connect("127.0.0.1", mosquitto.port)
        pub.loop_start()
        try:
            deadline = time.monotonic() + 15
            while not any(s.t_s == t for s in got) and time.monotonic() < deadline:
                pub.publish("sensors/t", orjson.dumps({"t": t, "values": [t]}), qos=1).wait_for_publish(5)
                time.sleep(0.2)
        finally:
            pub.disconnect()
            pub.loop_stop()

    def driver() -> None:
        src.subscribed.wait(10)
        publish_until_received(1.0)
        src.subscribed.clear()
        mosquitto.stop()
        mosquitto.start()
        src.subscribed.wait(15)
        publish_until_received(2.0)
        stop.set()

    thread = threading.Thread(target=driver)
    with src:
        thread.start()
        for item in src:
            if isinstance(item, Sample):
                got.append(item)
    thread.join()
    assert {s.t_s for s in got} == {1.0, 2.0}
