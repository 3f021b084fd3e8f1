"""Issue 16, acceptance 1: a real mosquitto, a hub (ingest and web) and three agents replaying a recording in
real time. `edgekit deploy` of v2 with a canary of one swaps that device, then the rest; a bundle that fails
on-device parity is rolled back and stops the rollout; a tampered bundle is refused; a bundle whose deferral
rate leaves its band is swapped in, watched and rolled back. Meanwhile results never stop: at the hub, every
device's results are its agent's windows, each once (by id), one per hop of sensor time with no window missing
or repeated across any swap, and never more than a moment apart."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
import sqlalchemy as sa
from rolloutfactory import variant
from streamfactory import signal, write_csv

from edgekit.agent import Agent, Summary
from edgekit.broker import free_port
from edgekit.config import AgentConfig, validate
from edgekit.contract import archive
from edgekit.hub import run_hub
from edgekit.hub.db import HubDB, deployment_devices, deployments, devices, results
from edgekit.manifest import keygen

pytestmark = [pytest.mark.broker, pytest.mark.torch, pytest.mark.slow]

SITE = "plant"
DEVICES = ("edge-1", "edge-2", "edge-3")
RATE_HZ, HOP = 1000.0, 128  # the stream bundle's (tests/conftest.py stream_bundle)
WATCH = ["--watch-s", "2", "--min-windows", "8"]


def _agent_config(device: str, bundle: Path, public_key: Path, recording: Path, broker: str, tmp: Path) -> AgentConfig:
    return validate(AgentConfig, {
        "device_id": device, "site": SITE, "bundle": str(bundle), "public_key": str(public_key),
        "source": {"kind": "replay", "path": str(recording), "speed": 1},
        "mqtt": {"url": broker}, "outbox": {"path": str(tmp / f"{device}.db")}, "runtime": {"intra_op_threads": 1},
        "metrics_interval_s": 2.0,
    }, "tests/test_rollout_fleet.py")


def _deploy(bundle: Path, db_url: str, broker: str, hub_url: str, devices_: tuple[str, ...], *extra: str
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgekit", "deploy", str(bundle), "--site", SITE, "--url", hub_url, "--devices",
         ",".join(devices_), "--canary", "1", *WATCH, "--deferral-band", "0,0.9", "--db", db_url, "--broker", broker,
         "--timeout-s", "60", *extra], capture_output=True, text=True, timeout=120)


def _rollouts(db: HubDB) -> dict[str, dict]:
    with db.engine.connect() as conn:
        rows = conn.execute(sa.select(devices.c.device, devices.c.rollout).where(devices.c.site == SITE)).all()
    return {r.device: orjson.loads(r.rollout) for r in rows if r.rollout}


def _wait(what, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what.__doc__ or what}")


def test_rollout_canary_then_rest_rollback_and_refusal_with_results_flowing(stream_bundle, mosquitto, tmp_path):
    private, public = keygen(tmp_path / "keys")
    v1 = variant(stream_bundle, tmp_path / "v1", private)
    v2 = variant(v1, tmp_path / "v2", private, changes={("data_fingerprint",): "2" * 64})
    bad = variant(v1, tmp_path / "bad", private, changes={("data_fingerprint",): "3" * 64}, heldout="wrong")
    tampered = variant(v1, tmp_path / "tampered", private, changes={("data_fingerprint",): "4" * 64},
                       tamper={("thresholds", "min_confidence"): 0.0})
    defer_all = variant(v1, tmp_path / "defer-all", private, changes={("data_fingerprint",): "5" * 64,
                                                                       ("thresholds", "defer_all"): True})
    versions = {name: archive.bundle_version(b) for name, b in (("v1", v1), ("v2", v2), ("defer_all", defer_all))}
    recording = write_csv(tmp_path / "stream.csv", signal(np.random.default_rng(7), int(90 * RATE_HZ), RATE_HZ))

    db_url, port = f"sqlite:///{tmp_path / 'hub.db'}", free_port()
    hub_url = f"http://127.0.0.1:{port}"
    hub_stop, agents_stop = threading.Event(), threading.Event()
    hub = threading.Thread(target=run_hub, args=(mosquitto.url, db_url, f"127.0.0.1:{port}"),
                           kwargs={"share_group": "", "client_id": "hub-rollout", "stop": hub_stop}, daemon=True)
    hub.start()
    summaries: dict[str, Summary] = {}

    def run_agent(device: str) -> None:
        with Agent(_agent_config(device, v1, public, recording, mosquitto.url, tmp_path), agents_stop) as agent:
            summaries[device] = agent.run(drain_timeout_s=30)

    threads = [threading.Thread(target=run_agent, args=(d,), daemon=True) for d in DEVICES]
    try:
        time.sleep(1.0)  # the hub subscribes first
        for t in threads:
            t.start()
        with HubDB(db_url) as db:
            _wait(lambda: len(_rollouts(db)) == 3 and all(r["running"] == versions["v1"]
                                                           for r in _rollouts(db).values()))

            # v2, canary of one: edge-1 first, the rest after it ran v2 healthy through its watch.
            out = _deploy(v2, db_url, mosquitto.url, hub_url, DEVICES)
            assert out.returncode == 0, out.stdout + out.stderr
            lines = out.stdout.splitlines()
            assert lines.index("canary: sent to edge-1") < lines.index("  edge-1: healthy") < \
                lines.index("rest: sent to edge-2, edge-3") < lines.index("done: 3 device(s) run " + versions["v2"])
            assert "  edge-1: watching" in lines and "  edge-3: healthy" in lines
            now = _rollouts(db)
            assert {d: (r["running"], r["previous"], r["state"]) for d, r in now.items()} == {
                d: (versions["v2"], versions["v1"], "healthy") for d in DEVICES}

            # A bundle signed and intact that this machine does not reproduce: rolled back, the rollout stops.
            out = _deploy(bad, db_url, mosquitto.url, hub_url, DEVICES)
            assert out.returncode == 5, out.stdout + out.stderr
            assert "stopped: edge-1 rolled_back: failed on-device parity" in out.stdout
            # A manifest changed after signing: refused.
            out = _deploy(tampered, db_url, mosquitto.url, hub_url, ("edge-2", "edge-1", "edge-3"))
            assert out.returncode == 5, out.stdout + out.stderr
            assert "stopped: edge-2 refused: signature does not match manifest.json" in out.stdout
            # Swapped in, but every window deferred: the watch rolls it back.
            out = _deploy(defer_all, db_url, mosquitto.url, hub_url, ("edge-3", "edge-1", "edge-2"))
            assert out.returncode == 5, out.stdout + out.stderr
            assert "stopped: edge-3 rolled_back: deferral rate 1.000 outside the band [0, 0.9]" in out.stdout
            assert "  edge-3: watching" in out.stdout
            now = _rollouts(db)
            assert {d: r["running"] for d, r in now.items()} == dict.fromkeys(DEVICES, versions["v2"])
            with db.engine.connect() as conn:  # what the hub's database keeps of the four deployments
                kept = conn.execute(sa.select(deployments.c.id, deployments.c.state, deployment_devices.c.phase,
                                              deployment_devices.c.state.label("device_state"))
                                    .select_from(deployments.join(deployment_devices))
                                    .order_by(deployments.c.created_at, deployment_devices.c.phase)).all()
            by_deployment: dict[str, list[tuple[str, str, str]]] = {}
            for row in kept:
                by_deployment.setdefault(row.id, []).append((row.state, row.phase, row.device_state))
            assert list(by_deployment.values()) == [
                [("done", "canary", "healthy")] + [("done", "rest", "healthy")] * 2,
                [("stopped", "canary", "rolled_back")] + [("stopped", "rest", "waiting")] * 2,  # never sent
                [("stopped", "canary", "refused")] + [("stopped", "rest", "waiting")] * 2,
                [("stopped", "canary", "rolled_back")] + [("stopped", "rest", "waiting")] * 2]

            agents_stop.set()
            for t in threads:
                t.join(60)
            assert set(summaries) == set(DEVICES)
            _check_results(db, summaries)
            # The store on each device: the running and the previous bundle, nothing that failed.
            for d in DEVICES:
                kept = {p.name for p in (tmp_path / f"{d}.bundles").iterdir()}
                assert kept == {versions["v1"], versions["v2"], "current", "previous", "rollout.json"}, (d, kept)
    finally:
        agents_stop.set()
        for t in threads:
            t.join(30)
        hub_stop.set()
        hub.join(30)


def wait_all_stored(db: HubDB, summaries: dict[str, Summary], timeout_s: float = 60) -> None:
    """Until the hub holds as many results as the agents made windows (each stored once: ids are unique)."""
    def stored() -> bool:
        with db.engine.connect() as conn:
            n = conn.execute(sa.select(sa.func.count()).select_from(results)).scalar_one()
        return n == sum(s.windows for s in summaries.values())

    _wait(stored, timeout_s)


def _check_results(db: HubDB, summaries: dict[str, Summary]) -> None:
    """Every window each agent made reached the hub once: ids, one hop of sensor time apart, in the order the
    bundles ran, never long apart in the agent's clock or the hub's."""
    hop_s = HOP / RATE_HZ
    wait_all_stored(db, summaries)
    with db.engine.connect() as conn:
        rows = conn.execute(sa.select(results.c.device, results.c.seq, results.c.window_start_s, results.c.ts,
                                      results.c.received_at, results.c.model_version)
                            .order_by(results.c.device, results.c.seq)).all()
    for device, summary in summaries.items():
        mine = [r for r in rows if r.device == device]
        assert summary.queued == 0 and summary.windows == len(mine), (device, summary)
        seqs = [r.seq for r in mine]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), device  # none lost, none doubled
        steps = np.diff([r.window_start_s for r in mine])
        assert np.allclose(steps, hop_s), (device, steps[np.abs(steps - hop_s) > 1e-6][:5])
        assert max(np.diff([r.ts for r in mine])) < 2.0, device  # made without a pause, swaps included
        assert max(np.diff([r.received_at for r in mine])) < 3.0, device  # and delivered so
        runs = [mine[0].model_version]
        for r in mine[1:]:
            if r.model_version != runs[-1]:
                runs.append(r.model_version)
        expected = ["stream@000000000000", "stream@222222222222"]
        if device == "edge-3":  # the defer-all bundle ran there during its watch, then v2 again
            expected += ["stream@555555555555", "stream@222222222222"]
        assert runs == expected, (device, runs)
