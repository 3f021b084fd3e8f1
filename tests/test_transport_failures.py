"""Connections that fail say why, once per cause, and a run that cannot deliver says what waits where (issue 10).

Real parts only: mosquitto (plain, TLS with a certificate made here, with a password), free ports nobody
listens on, a listener that never answers, and `edgekit run` as a subprocess through the CLI.
"""

from __future__ import annotations

import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_transport import _auth_broker, _tls_files, result, wait_for

from edgekit.broker import Mosquitto, free_port
from edgekit.mqtt import MqttSecurity
from edgekit.transport import Transport

SITE, DEVICE = "plant1", "pump7"
SKAB_FAULT = "skab/data/valve1/1.csv"


def _tls_broker(workdir: Path, tls: dict[str, Path]) -> Mosquitto:
    """The test broker with one TLS listener serving `tls`'s server certificate."""
    broker = Mosquitto(workdir)
    broker.conf.write_text(f"listener {broker.port} 127.0.0.1\ncertfile {tls['cert']}\nkeyfile {tls['key']}\n"
                           "allow_anonymous true\nuser root\nlog_dest stderr\nlog_type error\n")
    return broker


def _failure_lines(caplog: pytest.LogCaptureFixture, event: str = "transport.connect_failed"
                   ) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "edgekit.transport" and r.getMessage().startswith(event)]


def _warnings(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.levelno >= logging.WARNING]


def _fail_repeatedly(url: str, outbox: Path, attempts: int = 3, **kw) -> Transport:
    """A transport retrying every 0.2 s, closed after `attempts` failed connections."""
    with Transport(url, site=SITE, device=DEVICE, outbox=outbox, reconnect_max_s=0.2, **kw) as tr:
        wait_for(lambda: tr.stats()["failed_connects"] >= attempts, 30, f"{attempts} failed connections")
        assert not tr.connected
    return tr


@pytest.mark.broker
def test_tls_verify_failure_names_its_cause_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "certs").mkdir()
    served = _tls_files(tmp_path / "certs")
    with _tls_broker(tmp_path / "tls", served) as broker:
        url = f"mqtts://127.0.0.1:{broker.port}"
        # No CA file: the system's CAs, which never signed the test CA (an operator who forgot the CA file).
        with caplog.at_level(logging.DEBUG, logger="edgekit.transport"):
            tr = _fail_repeatedly(url, tmp_path / "o.db")
        assert tr.last_failure is not None and tr.last_failure.startswith(
            "tls_verify_failed: certificate verify failed: unable to get local issuer certificate"), tr.last_failure
        records = _failure_lines(caplog)
        assert len(records) >= 3  # every retry is logged, at DEBUG
        [line] = _warnings(records)  # but said once
        assert f"endpoint=127.0.0.1:{broker.port} tls=True cause=tls_verify_failed" in line
        assert "certificate verify failed" in line and "attempts=1" in line and "hint=" in line

        # The right CA but another host name than the certificate's: verify fails for that reason instead.
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="edgekit.transport"):
            tr = _fail_repeatedly(f"mqtts://localhost:{broker.port}", tmp_path / "o.db", security=MqttSecurity(ca_file=served["ca"]))
        [line] = _warnings(_failure_lines(caplog))
        assert "cause=tls_verify_failed" in line and "Hostname mismatch" in line, line

        # The right CA and the certificate's address: it connects, so the failures above were the certificate.
        with Transport(url, site=SITE, device=DEVICE, outbox=tmp_path / "o.db", security=MqttSecurity(ca_file=served["ca"])) as tr:
            wait_for(lambda: tr.connected, 10, "the TLS CONNACK")
            assert tr.last_failure is None


@pytest.mark.broker
def test_refused_once_then_recovered_then_refused_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    with caplog.at_level(logging.DEBUG, logger="edgekit.transport"):
        with Transport(f"mqtt://127.0.0.1:{port}", site=SITE, device=DEVICE, outbox=tmp_path / "o.db",
                       reconnect_max_s=0.2) as tr:
            wait_for(lambda: tr.stats()["failed_connects"] >= 3, 30, "3 refused connections")
            assert tr.last_failure == "refused: connection refused"
            broker = Mosquitto(tmp_path / "broker", port=port)
            broker.start()
            try:
                wait_for(lambda: tr.connected, 15, "the connection once the broker listens")
            finally:
                broker.stop()
            wait_for(lambda: tr.stats()["failed_connects"] >= 3, 30, "3 refusals after the broker went away")
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    events = [m.split()[0] for m in messages if m.split()[0] in
              ("transport.connect_failed", "transport.recovered", "transport.disconnected")]
    assert events == ["transport.connect_failed", "transport.recovered", "transport.disconnected",
                      "transport.connect_failed"], messages
    refused = [m for m in messages if m.startswith("transport.connect_failed")]
    assert all(f"endpoint=127.0.0.1:{port} tls=False cause=refused" in m for m in refused), refused
    assert "last_cause='refused: connection refused'" in next(m for m in messages if "recovered" in m)


@pytest.mark.broker
def test_each_cause_in_its_own_words(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Timeout, DNS, plain MQTT on a TLS port, a refused CONNACK: each logged once with its cause."""
    (tmp_path / "certs").mkdir()
    tls = _tls_files(tmp_path / "certs")
    silent = socket.socket()  # accepts TCP (the kernel's backlog) and never says a word: TLS times out
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    cases: list[tuple[str, str, dict, str]] = [
        (f"mqtts://127.0.0.1:{silent.getsockname()[1]}", "timeout", {"connect_timeout_s": 0.3}, "timed out"),
        ("mqtt://edgekit-no-such-host.invalid:1883", "dns_failed", {}, "host name lookup failed"),
    ]
    try:
        with _tls_broker(tmp_path / "tls", tls) as tls_broker, \
                _auth_broker(tmp_path / "auth", "edge", "s3cret") as auth_broker:
            cases += [(f"mqtt://127.0.0.1:{tls_broker.port}", "closed_before_connack", {}, ""),
                      (auth_broker.url, "connack_refused", {"security": MqttSecurity(username="edge", password="wrong")},
                       "Not authorized")]
            for n, (url, cause, kw, words) in enumerate(cases):
                caplog.clear()
                with caplog.at_level(logging.DEBUG, logger="edgekit.transport"):
                    tr = _fail_repeatedly(url, tmp_path / f"o{n}.db", **kw)
                assert tr.last_failure is not None and tr.last_failure.startswith(f"{cause}: "), tr.last_failure
                event = "transport.refused" if cause == "connack_refused" else "transport.connect_failed"
                records = _failure_lines(caplog, event)
                assert len(records) >= 3, (cause, [r.getMessage() for r in caplog.records])
                [line] = _warnings(records)
                assert words in line and ("code=135" in line if cause == "connack_refused"
                                          else f"cause={cause}" in line), line
    finally:
        silent.close()


@pytest.mark.broker
def test_a_stop_ends_the_drain_at_once_while_the_broker_is_away(tmp_path: Path, mosquitto: Mosquitto) -> None:
    stop = threading.Event()
    with Transport(f"mqtt://127.0.0.1:{free_port()}", site=SITE, device=DEVICE, outbox=tmp_path / "o.db",
                   reconnect_max_s=0.2) as tr:
        for i in range(5):
            tr.send("result", result(i))
        threading.Timer(0.3, stop.set).start()
        t0 = time.monotonic()
        assert tr.flush(30, stop=stop) is False
        assert time.monotonic() - t0 < 2
        t0 = time.monotonic()
        assert tr.flush(30, stop=stop) is False  # already stopped: no wait at all
        assert time.monotonic() - t0 < 0.5
        assert tr.stats()["queued"] == 5 and tr.backlog_by_kind() == {"result": 5}
    # Connected, a stop does not cut the drain short: the broker is taking the rows.
    with Transport(mosquitto.url, site=SITE, device=DEVICE, outbox=tmp_path / "o.db") as tr:
        wait_for(lambda: tr.connected, 10, "the CONNACK")
        assert tr.flush(15, stop=stop) is True and tr.stats()["queued"] == 0


def _run_args(bundle: Path, source: Path, broker: str, outbox: Path, drain_s: float, speed: float) -> list[str]:
    return [sys.executable, "-m", "edgekit", "-v", "run", "--bundle", str(bundle), "--source", f"replay:{source}",
            "--speed", str(speed), "--broker", broker, "--outbox", str(outbox), "--device-id", "dev-q",
            "--site", "test", "--drain-timeout", str(drain_s), "--allow-unsigned"]


def _outbox_results(path: Path) -> int:
    """Results waiting in an agent's outbox, read with plain sqlite3 (0 before the agent made its table)."""
    import sqlite3

    if not path.exists():
        return 0
    con = sqlite3.connect(path)
    try:
        return con.execute("select count(*) from outbox where topic like '%/result'").fetchone()[0]
    except sqlite3.OperationalError:  # no such table yet (the file exists before its schema), or busy
        return 0
    finally:
        con.close()


def _queued_line(stderr: str, outbox: Path, port: int) -> int:
    """The one `agent.queued` line: it names the outbox file, the broker and the cause, and counts what the
    outbox holds. Returns the rows it counts (results, reviews and the rest)."""
    [line] = [ln for ln in stderr.splitlines() if "agent.queued " in ln]
    assert f"outbox={outbox.resolve()} broker=127.0.0.1:{port}" in line, line
    assert "reason='broker unreachable (refused: connection refused)'" in line, line
    assert stderr.count("transport.connect_failed") == 1  # once, not per retry
    counts = {k: int(v) for k, v in re.findall(r" (results|reviews|other)=(\d+)", line)}
    assert counts["results"] == _outbox_results(outbox) > 0, line
    return sum(counts.values())


@pytest.mark.broker
@pytest.mark.data
@pytest.mark.torch
@pytest.mark.slow
def test_run_against_an_unreachable_broker_ends_naming_what_waits(skab_bundle: Path, data_dir: Path,
                                                                  tmp_path: Path) -> None:
    port = free_port()
    outbox = tmp_path / "o.db"
    t0 = time.monotonic()
    out = subprocess.run(_run_args(skab_bundle, data_dir / SKAB_FAULT, f"mqtt://127.0.0.1:{port}", outbox, 2, 0),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 4, out.stderr[-3000:]  # the source ended, the broker never took its results
    assert "agent.draining" in out.stderr and "up_to_s=2 " in out.stderr
    rows = _queued_line(out.stderr, outbox, port)
    assert f"queued={rows} " in out.stdout
    assert time.monotonic() - t0 < 120


@pytest.mark.broker
@pytest.mark.data
@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize("when", ["draining", "reading"])
def test_sigterm_with_the_broker_away_ends_at_once(when: str, skab_bundle: Path, data_dir: Path,
                                                   tmp_path: Path) -> None:
    """SIGTERM while it waits for the broker (after the source), or while it reads a paced source: no 120 s
    wait, exit 0 (a stop is not a failure), and the same line naming what waits where."""
    port = free_port()
    outbox = tmp_path / "o.db"
    speed = 0 if when == "draining" else 50
    proc = subprocess.Popen(_run_args(skab_bundle, data_dir / SKAB_FAULT, f"mqtt://127.0.0.1:{port}", outbox,
                                      120, speed), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def read_stderr() -> None:
        assert proc.stderr is not None
        for ln in proc.stderr:
            lines.append(ln)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        if when == "draining":
            wait_for(lambda: any("agent.draining" in ln for ln in lines), 120, "the drain")
        else:
            wait_for(lambda: _outbox_results(outbox) >= 3, 120, "results in the outbox")
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        proc.wait(30)
        took_s = time.monotonic() - t0
        reader.join(5)
        assert proc.stdout is not None
        stdout = proc.stdout.read()
        assert proc.returncode == 0, "".join(lines)[-3000:]
        assert took_s < 10, f"took {took_s:.1f} s after SIGTERM"
        stderr = "".join(lines)
        assert "stopped=True" in stderr
        rows = _queued_line(stderr, outbox, port)
        assert f"queued={rows} " in stdout
        if when == "reading":
            assert "agent.draining" not in stderr  # stopped with the broker away: nothing to wait for
    finally:
        if proc.poll() is None:
            proc.kill()
