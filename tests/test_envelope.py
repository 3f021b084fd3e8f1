"""The input envelope on a real bundle (issue 14): a user's own recordings (tests/recordingfactory.py: 3
vibration channels at 1 kHz) trained and exported INT8 in-process, then a held-out recording with one channel
dead or stuck replayed through a real Agent: every window is deferred with a reason naming that channel, in
the result messages the outbox holds. The same bundle without its envelope gives no such reasons, and the
sensor-fault evaluation's table on this small run names the gross faults' channels."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recordingfactory import CHANNELS, vibration_recordings, write_recipe, write_recording  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(bundle, run, recipe) of the factory's recordings, trained and exported as the CLI does."""
    from edgekit.exporters.export.export import export
    from edgekit.exporters.training.train import train

    root = tmp_path_factory.mktemp("envelope")
    vibration_recordings(root / "recordings")
    recipe = write_recipe(root, epochs=15)
    run = train(recipe, root / "run", progress=False)
    export(run, root / "bundle", int8=True, progress=False)
    return root / "bundle", run, recipe


def held_out(run: Path, root: Path) -> Path:
    """A recording of the run's test split (files the envelope never saw)."""
    with np.load(run / "splits.npz") as s:
        group = sorted(set(s["test_group"].tolist()))[0]
    return root / "recordings" / group


def read_recording(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = [line.split(",") for line in path.read_text().splitlines()[1:]]
    return (np.array([float(r[0]) for r in rows]), np.array([[float(c) for c in r[1:4]] for r in rows]),
            np.array([r[4] == "fault" for r in rows]))


def replay(bundle: Path, path: Path, tmp_path: Path) -> list:
    """The recording through a real Agent (replay at speed 0, no broker): the result messages it wrote."""
    from edgekit.agent import Agent
    from edgekit.config import AgentConfig, validate
    from edgekit.contract import messages
    from edgekit.outbox import Outbox

    outbox = tmp_path / f"{path.stem}.db"
    cfg = validate(AgentConfig, {
        "device_id": "dev", "site": "lab", "bundle": str(bundle), "mqtt": {"url": None}, "allow_unsigned": True,
        "source": {"kind": "replay", "path": str(path), "speed": 0}, "outbox": {"path": str(outbox)}}, "test")
    with Agent(cfg) as agent:
        agent.run(drain_timeout_s=0)
    with Outbox(outbox) as box:
        found = [messages.parse(r.topic, r.payload) for r in box.pending(10**6) if r.topic.endswith("/result")]
    return [r for m in found for r in getattr(m, "results", [m])]


@pytest.mark.parametrize("fault,channel,named", [
    ("dead", 1, "stuck:vib_y"),  # reads 0: inside vib_y's range (it swings around 0), but it stopped moving
    ("stuck", 0, "stuck:vib_x"),  # holds its first value
    ("dead", 2, "out_of_range:vib_z"),  # 0 where gravity reads 9.81: past the plausible range too
])
def test_a_dead_or_stuck_channel_is_deferred_by_name_through_the_agent(built, tmp_path: Path, fault: str,
                                                                      channel: int, named: str) -> None:
    bundle, run, recipe = built
    t, values, state = read_recording(held_out(run, recipe.parent))
    values[:, channel] = 0.0 if fault == "dead" else values[0, channel]
    results = replay(bundle, write_recording(tmp_path / f"{fault}.csv", t, values, state), tmp_path)
    assert results
    for r in results:
        assert r.decision == "defer" and named in r.reasons, r.reasons
        assert all("," not in reason for reason in r.reasons)


def test_clean_recording_and_a_bundle_without_envelope(built, tmp_path: Path) -> None:
    """Clean held-out windows rarely leave the envelope; the same windows through the same bundle without one
    get the gate's reasons only, as before issue 14."""
    from edgekit.exporters.evaluation.sensor_faults import _agent, _judge, _windows
    from edgekit.pipeline import EdgePipeline

    bundle, run, recipe = built
    t, values, state = read_recording(held_out(run, recipe.parent))
    results = replay(bundle, write_recording(tmp_path / "clean.csv", t, values, state), tmp_path)
    named = [r for r in results if any(":" in reason for reason in r.reasons)]
    assert len(named) <= 0.1 * len(results), [r.reasons for r in named]
    with _agent(bundle, tmp_path) as agent:
        m = agent.manifest
        bare = m.model_copy(update={"input": m.input.model_copy(update={"envelope": None})})
        windows = _windows([values], int(m.input.window_size or 0), int(m.input.window_hop or 0))
        values[:, 1] = 0.0
        dead = _windows([values], int(m.input.window_size or 0), int(m.input.window_hop or 0))
        judged = _judge(EdgePipeline(bare, agent.models, agent.pre, agent.gate), windows + dead)
    assert len(judged) == 2 * len(results)
    assert not any(":" in reason for j in judged for reason in j.decision.reasons)


def test_ood_attribution_names_channels_and_shares(built, tmp_path: Path) -> None:
    from edgekit.exporters.evaluation.sensor_faults import _agent, _judge, _windows

    bundle, run, recipe = built
    t, values, state = read_recording(held_out(run, recipe.parent))
    values[:, 2] += 3.0  # vib_z offset: inside its range, unlike the training data
    with _agent(bundle, tmp_path) as agent:
        m = agent.manifest
        judged = _judge(agent.pipeline, _windows([values], int(m.input.window_size or 0), int(m.input.window_hop or 0)))
    ood = [j for j in judged if "ood" in j.decision.reasons]
    assert ood and all(j.attribution for j in ood)
    assert all(j.attribution is None for j in judged if "ood" not in j.decision.reasons)
    for j in ood:
        shares = list(j.attribution.values())
        assert set(j.attribution) <= set(CHANNELS) and shares == sorted(shares, reverse=True) and sum(shares) <= 1 + 1e-9
    assert sum(next(iter(j.attribution)) == "vib_z" for j in ood) >= 0.9 * len(ood)
    # the agent sends it in the result (and so in its review) of each ood deferral, and only there
    results = replay(bundle, write_recording(tmp_path / "offset.csv", t, values, state), tmp_path)
    sent = [r for r in results if "ood" in r.reasons]
    assert len(sent) == len(ood) and all(r.attribution for r in sent)
    assert all(r.attribution is None for r in results if "ood" not in r.reasons)
    assert sum(next(iter(r.attribution or {})) == "vib_z" for r in sent) >= 0.9 * len(sent)


def test_sensor_fault_table_on_a_small_run(built, tmp_path: Path) -> None:
    from edgekit.exporters.evaluation import evaluate
    from edgekit.exporters.evaluation.sensor_faults import FAULTS, GROSS, evaluate_bundle

    bundle, run, recipe = built
    faults = [f for f in FAULTS if f.name in GROSS]
    result = evaluate_bundle(bundle, run, recipe, tmp_path, faults=faults)
    r = result["faults"]
    windows = result["clean"]["envelope"]["windows"]
    for name in ("dead", "stuck"):
        assert r[name]["envelope"] == {**r[name]["envelope"], "windows": 3 * windows, "deferred": 3 * windows,
                                       "named": 3 * windows}
    assert r["gain x10"]["envelope"]["named"] == 3 * windows  # past the plausible range, named by channel
    text = evaluate.TABLES["sensor-faults"]({"recipes": {"factory": result}, "gross": list(GROSS)})
    lines = text.splitlines()
    assert lines[0] == "factory: 2 held-out recordings, 3 channels, one channel broken at a time"
    assert lines[3].split()[:4] == ["dead", "*", str(3 * windows), "100.0"]
    assert lines[-3].startswith("gross faults (*): ") and lines[-1].startswith("clean: deferred ")
    # the gross faults' windows by their recipe label (the factory's: normal, fault), each counted once
    assert lines[-2].startswith("  named by the window's label: normal ") and ", fault " in lines[-2]
    by_label = [result["faults"][g]["envelope"]["by_label"] for g in GROSS]
    assert sum(b["windows"] for x in by_label for b in x.values()) == 4 * 3 * windows


def test_bundle_relations_and_calibration_use_the_agents_rule(built) -> None:
    """Export writes the relations between channels into the envelope, and what calibration leaves out of
    acceptance on each split is what the agent's EnvelopeCheck defers there (without still runs)."""
    from edgekit.exporters.export.export import envelope_outside, load_run
    from edgekit.manifest import read_manifest
    from edgekit.plausible import EnvelopeCheck

    bundle, run, _ = built
    m = read_manifest(bundle)
    env = m.input.envelope
    assert env is not None and env.relations is not None and len(env.relations.log_level) == len(CHANNELS)
    assert "relations: each channel's window level and log spread" in env.basis
    check = EnvelopeCheck.from_manifest(m)
    assert check is not None and check.relations is not None
    r = load_run(run)
    envelope = m.input.envelope.model_dump(mode="json")
    with np.load(run / "splits.npz") as s:
        for split in ("cal", "test"):
            want = check.outside(s[f"{split}_window_min"], s[f"{split}_window_max"], s[f"{split}_features_raw"])
            np.testing.assert_array_equal(envelope_outside(r, envelope, split), want)
        # the relations hold on every calibration window (their ranges were widened to them)
        assert not check.relations.outside(s["cal_window_min"], s["cal_window_max"]).any()


def test_still_runs_in_the_pipeline_are_alike_in_any_batch(built) -> None:
    """A channel given stuck_after = 5 (as export gives one that is flat now and then) is named stuck from its
    fifth still window in a row, whatever the batch sizes; restart_stream forgets the run."""
    from edgekit.exporters.evaluation.sensor_faults import _agent, _windows
    from edgekit.pipeline import EdgePipeline

    bundle, run, recipe = built
    t, values, state = read_recording(held_out(run, recipe.parent))
    values[:, 1] = values[0, 1]
    with _agent(bundle, Path(recipe.parent)) as agent:
        m = agent.manifest
        ch = m.input.envelope.channels
        env = m.input.envelope.model_copy(update={"channels": ch.model_copy(update={"stuck_after": [1, 5, 1]})})
        five = m.model_copy(update={"input": m.input.model_copy(update={"envelope": env})})
        windows = _windows([values], int(m.input.window_size or 0), int(m.input.window_hop or 0))[0]
        got = {}
        for batch in (1, 3, 256):
            pipe = EdgePipeline(five, agent.models, agent.pre, agent.gate)
            got[batch] = [j.decision.reasons for a in range(0, len(windows), batch)
                          for j in pipe.run(windows[a:a + batch])]
            pipe.restart_stream()
            assert "stuck:vib_y" not in pipe.run(windows[:1])[0].decision.reasons
    assert got[1] == got[3] == got[256]
    assert [("stuck:vib_y" in r) for r in got[1]] == [False] * 4 + [True] * (len(windows) - 4)
