"""A real agent takes bundle commands from a real mosquitto (issue 16) for a bundle with a per-machine baseline
(issue 14): the machine's baseline, learned once from its first windows, stays through a swap to a bundle of
the same features and through a rollback; only the first windows are ever deferred as `commissioning`."""

from __future__ import annotations

import threading

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from rolloutfactory import BundleServer, command, variant
from streamfactory import signal, write_csv
from subscriber import Subscriber

from edgekit import topics
from edgekit.agent import Agent
from edgekit.config import AgentConfig, validate
from edgekit.manifest import keygen, read_manifest

pytestmark = [pytest.mark.broker, pytest.mark.torch, pytest.mark.slow]

SITE, DEVICE, LEARN = "plant", "edge-b", 8


def test_a_machines_baseline_survives_a_swap_and_a_rollback(stream_bundle, mosquitto, tmp_path):
    private, public = keygen(tmp_path / "keys")
    names = read_manifest(stream_bundle).input.feature_names
    # The stream bundle's models were not trained on baseline-relative features: a gate that accepts whatever
    # they say (and no envelope) keeps the deferral rate about the swaps, not about the models.
    baseline = {("input", "baseline"): {"windows": LEARN, "std_floor": 0.1, "spread": [1.0] * len(names),
                                        "basis": "test: the machine's first windows"},
                ("input", "envelope"): None, ("thresholds", "ood_max_score"): 1e9,
                ("thresholds", "min_confidence"): 0.0, ("thresholds", "max_disagreement"): 1.0}
    v1 = variant(stream_bundle, tmp_path / "v1", private, changes=baseline)
    v2 = variant(v1, tmp_path / "v2", private, changes={("data_fingerprint",): "2" * 64})
    worse = variant(v1, tmp_path / "worse", private, changes={("data_fingerprint",): "5" * 64,
                                                              ("thresholds", "defer_all"): True})
    recording = write_csv(tmp_path / "s.csv", signal(np.random.default_rng(3), 40_000, 1000.0))
    cfg = validate(AgentConfig, {
        "device_id": DEVICE, "site": SITE, "bundle": str(v1), "public_key": str(public),
        "source": {"kind": "replay", "path": str(recording), "speed": 2}, "mqtt": {"url": mosquitto.url},
        "outbox": {"path": str(tmp_path / "o.db")}, "runtime": {"intra_op_threads": 1}}, "test")
    stop = threading.Event()
    sub = Subscriber(mosquitto.port)
    hub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-hub")
    hub.connect("127.0.0.1", mosquitto.port)
    hub.loop_start()

    def rollout() -> dict:
        found = [s.get("rollout") for s in sub.of("status") if s.get("state") == "online"]
        return found[-1] if found and found[-1] else {}

    def send(bundle, deployment: str, server: BundleServer) -> str:
        cmd, server.archives[deployment] = command(bundle, f"{server.url}/bundles/{deployment}",
                                                   deployment=deployment, watch_s=1.0, deferral_band=(0.0, 0.5))
        hub.publish(topics.command(SITE, DEVICE, topics.BUNDLE_COMMAND), cmd.encode(), qos=1,
                    retain=True).wait_for_publish(5)
        assert sub.wait_for(lambda: rollout().get("deployment") == deployment and rollout()["state"] in (
            "healthy", "rolled_back", "refused", "failed"), 30), rollout()
        return rollout()["state"]

    with BundleServer() as server, Agent(cfg, stop) as agent:
        runner = threading.Thread(target=agent.run, daemon=True)
        runner.start()
        try:
            assert sub.wait_for(lambda: len(sub.results()) > LEARN + 4, 30)
            assert send(v2, "d-2", server) == "healthy"
            assert send(worse, "d-3", server) == "rolled_back"
            assert "deferral rate 1.000 outside the band [0, 0.5]" in rollout()["reason"]
            seen = len(sub.results())
            assert sub.wait_for(lambda: len(sub.results()) > seen + 4, 20)  # v2 answers again after the rollback
        finally:
            stop.set()
            runner.join(30)
            hub.disconnect()
            hub.loop_stop()
    results = sorted(sub.results(), key=lambda r: r["seq"])
    learning = [r for r in results if "commissioning" in r["reasons"]]
    assert [r["seq"] for r in learning] == [r["seq"] for r in results[:LEARN]]  # the first windows only
    versions = [r["model_version"] for r in results]
    assert versions[LEARN] == "stream@000000000000" and "stream@555555555555" in versions
    assert versions[-1] == "stream@222222222222"
    assert agent.baseline_state()["state"] == "ready" and agent.baseline_state()["windows"] == LEARN
    sub.client.disconnect()
    sub.client.loop_stop()
