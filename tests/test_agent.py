"""The edge agent end to end, as a separate process, against a real mosquitto and real recordings (issue 3)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from subscriber import Subscriber

from edgekit.datasets import read_ipol, read_skab
from edgekit.plausible import ENVELOPE_REASONS

pytestmark = [pytest.mark.broker, pytest.mark.data, pytest.mark.torch, pytest.mark.slow]

SKAB_FAULT = "skab/data/valve1/1.csv"
IPOL_TRIAL = "ipol_gait/GaitData/3-2_lb.txt"


def agent(bundle: Path, source: Path, broker: str, outbox: Path, *, speed: float = 0, device: str = "dev-1",
          extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "edgekit", "-v", "run", "--bundle", str(bundle), "--source", f"replay:{source}",
            "--speed", str(speed), "--broker", broker, "--outbox", str(outbox), "--device-id", device,
            "--site", "test", "--drain-timeout", "20", "--allow-unsigned", *extra]


def n_windows(bundle: Path, n_samples: int) -> int:
    inp = json.loads((bundle / "manifest.json").read_text())["input"]
    return (n_samples - inp["window_size"]) // inp["window_hop"] + 1


def outbox_ids(path: Path) -> set[str]:
    """Result ids waiting in an agent's outbox, read with plain sqlite3 (the file is the contract)."""
    con = sqlite3.connect(path)
    try:
        tables = [r[0] for r in con.execute("select name from sqlite_master where type='table'")]
        ids: set[str] = set()
        for table in tables:
            cols = [r[1] for r in con.execute(f"pragma table_info({table})")]
            if "payload" in cols and "topic" in cols:
                for topic, payload in con.execute(f"select topic, payload from {table}"):
                    if topic.endswith("/result"):
                        obj = json.loads(payload)
                        ids.update(r["id"] for r in obj.get("results", [obj]))
        return ids
    finally:
        con.close()


def test_agent_process_never_imports_torch(skab_bundle, data_dir, tmp_path):
    code = (
        "import sys\n"
        "from edgekit.cli import main\n"
        f"args = {agent(skab_bundle, data_dir / SKAB_FAULT, '', tmp_path / 'o.db')[3:]!r}\n"
        "try:\n    main(args)\nexcept SystemExit as e:\n    code = e.code\n"
        "print('TORCH_LOADED' if any(m == 'torch' or m.startswith('torch.') for m in sys.modules) else 'NO_TORCH')\n"
        "sys.exit(code)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "NO_TORCH" in out.stdout, out.stdout
    # no broker: everything stays in the outbox, and the summary says so
    assert "queued=" in out.stdout and "no broker" in out.stderr


@pytest.mark.parametrize("which", ["skab", "ipol"])
def test_one_result_per_window_and_reviews_for_deferred(which, request, mosquitto, data_dir, tmp_path):
    bundle = request.getfixturevalue(f"{which}_bundle")
    path = data_dir / (SKAB_FAULT if which == "skab" else IPOL_TRIAL)
    n_samples = len((read_skab if which == "skab" else read_ipol)(path).values)
    expected = n_windows(bundle, n_samples)
    sub = Subscriber(mosquitto.port, client_id=f"sub-{which}")
    try:
        out = subprocess.run(agent(bundle, path, mosquitto.url, tmp_path / "o.db"), capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert sub.wait_for(lambda: len(sub.results()) >= expected, 30)
        results = sub.results()
        ids = [r["id"] for r in results]
        assert len(set(ids)) == expected, (len(set(ids)), expected)
        deferred = {r["id"]: r for r in results if r["decision"] == "defer"}
        assert sub.wait_for(lambda: {m["id"] for m in sub.of("review")} >= set(deferred), 20)
        for review in sub.of("review"):
            assert review["reasons"], review
            # the gate's reasons, and the input envelope's, each naming a channel or feature after the ':'
            # (a bundle with a baseline defers its first windows as commissioning: reviewed, never answered)
            assert {r.split(":")[0] for r in review["reasons"]} <= {"ood", "disagreement", "low_confidence",
                                                                   "commissioning", *ENVELOPE_REASONS}
            assert review["signal"]["points"] and review["features"]
            # issue 15: each channel's unit and training range, each feature's percentile among training windows
            sig = review["signal"]
            assert len(sig["units"]) == len(sig["ranges"]) == len(sig["channels"]) and all(sig["units"])
            assert all(lo <= hi for lo, hi in sig["ranges"])
            assert set(review["percentiles"]) == set(review["features"])
            assert all(0 <= p <= 100 for p in review["percentiles"].values())
        for r in results:
            assert r["schema"] == "edgekit.result/1" and r["model_version"] and "replayed" not in r
        assert f"windows={expected}" in out.stdout and "queued=0" in out.stdout
        # retained status ends "offline" after a graceful exit
        assert sub.wait_for(lambda: sub.of("status") and sub.of("status")[-1]["state"] == "offline", 10)
    finally:
        sub.close()


def test_broker_outage_loses_nothing_and_marks_replayed(skab_bundle, mosquitto, data_dir, tmp_path):
    path = data_dir / SKAB_FAULT
    expected = n_windows(skab_bundle, len(read_skab(path).values))
    sub = Subscriber(mosquitto.port, client_id="sub-outage")
    # ~1147 rows at 60x real time: about 19 s of replay, with a 10.5 s outage in the middle
    proc = subprocess.Popen(agent(skab_bundle, path, mosquitto.url, tmp_path / "o.db", speed=60),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert sub.wait_for(lambda: len(sub.results()) > 5, 30)
        mosquitto.stop()
        down_at = time.time()
        time.sleep(10.5)
        up_at = time.time()
        mosquitto.start()
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr[-3000:]
        assert sub.wait_for(lambda: len({r["id"] for r in sub.results()}) >= expected, 60)
        results = sub.results()
        unique = {r["id"] for r in results}
        assert len(unique) == expected, f"missing {expected - len(unique)} of {expected}"
        assert len(results) >= expected  # duplicates allowed (at least once), dropped by id above
        during = [r for r in results if down_at + 0.5 < r["ts"] < up_at - 0.5]
        assert during, "no result was created during the outage"
        assert all(r.get("replayed") is True for r in during)
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()


def test_sigkill_then_restart_delivers_the_outbox(skab_bundle, mosquitto, data_dir, tmp_path):
    path = data_dir / SKAB_FAULT
    outbox = tmp_path / "o.db"
    mosquitto.stop()  # the agent starts while the broker is down: everything waits in the outbox
    proc = subprocess.Popen(agent(skab_bundle, path, mosquitto.url, outbox, speed=100),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not outbox.exists() or len(outbox_ids(outbox)) < 20):
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        before = outbox_ids(outbox)
        assert len(before) >= 20
        mosquitto.start()
        sub = Subscriber(mosquitto.port, client_id="sub-restart")
        try:
            out = subprocess.run(agent(skab_bundle, path, mosquitto.url, outbox), capture_output=True,
                                 text=True, timeout=300)
            assert out.returncode == 0, out.stderr[-3000:]
            assert sub.wait_for(lambda: before <= {r["id"] for r in sub.results()}, 30)
            old = [r for r in sub.results() if r["id"] in before]
            assert all(r.get("replayed") is True for r in old)
        finally:
            sub.close()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bad_samples_are_quarantined_and_counted(skab_bundle, mosquitto, data_dir, tmp_path):
    lines = (data_dir / SKAB_FAULT).read_text().splitlines()
    bad = [
        "2020-03-09 10:30:00;abc;0.04;1.3;0.05;79.3;26.0;233.0;32.0;0.0;0.0",  # text in a number
        "2020-03-09 10:30:01;nan;0.04;1.3;0.05;79.3;26.0;233.0;32.0;0.0;0.0",  # NaN
        "2020-03-09 10:30:02;0.02;0.04;1.3",  # wrong width
        "2020-03-09 10:30:03;inf;0.04;1.3;0.05;79.3;26.0;233.0;32.0;0.0;0.0",  # inf
    ]
    mixed = lines[:300] + bad + lines[300:]
    path = tmp_path / "valve1-with-bad-lines.csv"
    path.write_text("\n".join(mixed) + "\n")
    sub = Subscriber(mosquitto.port, client_id="sub-bad")
    try:
        out = subprocess.run(agent(skab_bundle, path, mosquitto.url, tmp_path / "o.db"), capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "quarantined=" in out.stdout
        quarantined = int(out.stdout.split("quarantined=")[1].split()[0])
        assert quarantined >= len(bad)
        assert sub.wait_for(lambda: any(m["quarantined"] >= len(bad) for m in sub.of("metrics")), 20)
        expected = n_windows(skab_bundle, len(lines) - 1 - (quarantined - len(bad)))
        assert sub.wait_for(lambda: len({r["id"] for r in sub.results()}) == expected, 20)
        assert str(path.name) in out.stderr  # the log names the file (and line) of each bad sample
    finally:
        sub.close()


def test_sigterm_flushes_and_says_offline(skab_bundle, mosquitto, data_dir, tmp_path):
    sub = Subscriber(mosquitto.port, client_id="sub-term")
    proc = subprocess.Popen(agent(skab_bundle, data_dir / SKAB_FAULT, mosquitto.url, tmp_path / "o.db", speed=20),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert sub.wait_for(lambda: len(sub.results()) > 3, 60)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr[-3000:]
        assert "queued=0" in stdout
        n = int(stdout.split("windows=")[1].split()[0])
        assert sub.wait_for(lambda: len({r["id"] for r in sub.results()}) == n, 20)
        assert sub.wait_for(lambda: sub.of("status")[-1]["state"] == "offline", 10)
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()


def test_check_config_names_unknown_key_and_wrong_type(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('bundle = "b"\ndevce_id = "x"\n[source]\nkind = "replay"\npath = "f.csv"\nspeed = "fast"\n')
    out = subprocess.run([sys.executable, "-m", "edgekit", "check-config", str(cfg)], capture_output=True,
                         text=True, env={**os.environ})
    assert out.returncode == 2
    assert f"{cfg}: devce_id: unknown key, did you mean 'device_id'?" in out.stderr
    assert f"{cfg}: source.speed: Input should be a valid number" in out.stderr and "(got 'fast')" in out.stderr
    assert "Traceback" not in out.stderr
