"""Each machine's own baseline (issue 14, commissioning): the one rule (edgekit/baseline.py), the recipe's
[baseline], training that makes each recording relative to its own first windows, the manifest field export
writes (absent without one), and the agent's pipeline learning a device's baseline from its first windows
in any batch size. The agent end to end (restart, command, baseline file) is tests/test_agent_baseline.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgekit import baseline as bl
from edgekit.errors import ConfigError
from edgekit.paths import shipped
from edgekit.recipe import load_recipe


def test_the_rule_by_hand() -> None:
    raw = np.array([[1.0, 10.0], [3.0, 10.0], [5.0, 10.0]])
    mean, std = bl.fit(raw)
    assert mean.tolist() == [3.0, 10.0]
    assert std[0] == pytest.approx(np.sqrt(8 / 3)) and std[1] == 0.0
    floor = bl.std_floor(np.array([4.0, 2.0]), 0.1)
    assert floor.tolist() == [0.4, 0.2]
    assert bl.std_floor(np.array([0.0]), 0.1).tolist() == [bl.MIN_STD]  # never a division by zero
    rel = bl.relative(np.array([[3.0 + np.sqrt(8 / 3), 10.5]]), mean, std, floor)
    assert rel[0, 0] == pytest.approx(1.0) and rel[0, 1] == pytest.approx(2.5)  # 0.5 / the floor 0.2
    with pytest.raises(ValueError, match="at least 2 windows"):
        bl.fit(raw[:1])


def test_commissioning_learns_across_calls_restarts_and_reports() -> None:
    comm = bl.Commissioning(needed=5, floor=np.full(2, 0.1), key="k")
    rows = np.arange(20, dtype=np.float64).reshape(10, 2)
    assert comm.state() == {"state": "learning", "windows": 0, "of": 5, "source": "learned"}
    assert comm.take(rows[:2]) == 2 and not comm.ready and comm.learned == 2
    assert comm.take(rows[2:]) == 3 and comm.ready and comm.completed
    assert comm.take(rows) == 0  # ready: learns nothing more
    b = comm.baseline
    assert b is not None and b.source == "learned" and b.windows == 5 and b.key == "k"
    mean, std = bl.fit(rows[:5])
    assert np.array_equal(b.mean, mean) and np.array_equal(b.std, std)
    assert np.array_equal(comm.relative(rows), bl.relative(rows, mean, std, comm.floor))
    state = comm.state()
    assert state["state"] == "ready" and state["source"] == "learned" and state["since"] == b.since
    comm.restart("command")
    assert not comm.ready and comm.state()["source"] == "command" and comm.learned == 0
    with pytest.raises(RuntimeError, match="still learning"):
        comm.relative(rows)
    comm.take(rows[5:])
    assert comm.baseline is not None and comm.baseline.source == "command"
    assert np.array_equal(comm.baseline.mean, rows[5:].mean(axis=0))


def test_baseline_file_round_trip_and_refusals(tmp_path: Path) -> None:
    b = bl.Baseline(np.array([1.0, 2.0]), np.array([0.5, 0.0]), 5, "learned", 123.0, "key1")
    path = bl.write_file(tmp_path / "b.json", b, ["a.mean", "b.mean"])
    got, sha = bl.read_file(path, "key1", ["a.mean", "b.mean"])
    assert got.source == "file" and got.since == 123.0 and np.array_equal(got.mean, b.mean) and len(sha) == 64
    with pytest.raises(ConfigError, match="other features or another window count") as exc:
        bl.read_file(path, "key2", ["a.mean", "b.mean"])
    assert exc.value.where == str(path)
    with pytest.raises(ConfigError, match="the bundle's are 3 starting"):
        bl.read_file(path, "key1", ["a.mean", "b.mean", "c.mean"])
    (tmp_path / "bad.json").write_text(json.dumps({**b.to_obj(), "std": [0.5, -1.0]}))
    with pytest.raises(ConfigError, match="std >= 0"):
        bl.read_file(tmp_path / "bad.json", "key1", ["a.mean", "b.mean"])
    with pytest.raises(ConfigError, match="cannot read"):
        bl.read_file(tmp_path / "missing.json", "key1", [])


def test_recipe_baseline_is_checked_where_it_is_read() -> None:
    skab = shipped("recipes", "skab.toml")
    recipe = load_recipe(skab)
    assert recipe.baseline is not None and recipe.window is not None
    # the shipped recipe's baseline is the windows inside SKAB's 400 fit rows
    assert (recipe.baseline.windows - 1) * recipe.window.hop + recipe.window.size == 400
    with pytest.raises(ConfigError, match="baseline.windows: Input should be greater than or equal to 2"):
        load_recipe(skab, {"baseline.windows": 1})
    with pytest.raises(ConfigError, match=r"windows = 600 leaves nothing to train on in data.files\[1\]'s chunks: "
                                          r"chunk_rows = 1000 gives 497 windows"):
        load_recipe(skab, {"baseline.windows": 600})
    with pytest.raises(ConfigError, match="loader 'table' gives one row per case"):
        load_recipe(shipped("recipes", "tug_seed.toml"), {"baseline": {"windows": 5}})


@pytest.fixture(scope="module")
def baseline_runs(tmp_path_factory) -> dict[str, Path]:
    """The factory recordings (4 machines x 2 runs, 4 s at 1 kHz: 39 windows of 200 every 100 per file) trained
    with [baseline] windows = 5 and without, 3 epochs each, and exported INT8."""
    pytest.importorskip("torch", reason="training needs the train extra (torch)")
    from recordingfactory import vibration_recordings, write_recipe

    from edgekit.exporters.export.export import export
    from edgekit.exporters.training.train import train

    root = tmp_path_factory.mktemp("baseline")
    vibration_recordings(root / "recordings")
    recipe = write_recipe(root, epochs=3)
    with_baseline = root / "baseline.toml"
    with_baseline.write_text(recipe.read_text() + "\n[baseline]\nwindows = 5\nstd_floor = 0.1\n")
    out = {"recipe": with_baseline}
    for name, path in (("plain", recipe), ("baseline", with_baseline)):
        run = train(path, root / f"run-{name}", progress=False)
        export(run, root / f"bundle-{name}", int8=True, progress=False)
        out[f"run-{name}"], out[f"bundle-{name}"] = run, root / f"bundle-{name}"
    return out


def test_training_makes_each_recording_relative_to_its_first_windows(baseline_runs) -> None:
    from edgekit.exporters.training.tasks import load_task

    recipe_path = baseline_runs["recipe"]
    recipe = load_recipe(recipe_path)
    data = load_task(recipe, recipe_path.parent)
    assert data.recording_id is not None and data.in_baseline is not None
    names = list(dict.fromkeys(data.recording_id.tolist()))
    assert len(names) == 8 and int(data.in_baseline.sum()) == 8 * 5  # each file's first 5 windows
    run = baseline_runs["run-baseline"]
    meta = json.loads((run / "run.json").read_text())
    spec = meta["input"]["baseline"]
    assert spec["windows"] == 5 and spec["std_floor"] == 0.1 and len(spec["spread"]) == len(data.feature_names)
    with np.load(run / "splits.npz") as s:
        arrays = {k: s[k] for k in s.files}
    assert sum(len(arrays[f"{k}_y"]) for k in ("train", "cal", "test")) == len(data.y) - 40  # no baseline rows
    floor = bl.std_floor(np.asarray(spec["spread"]), 0.1)
    mean, std = (np.asarray(meta["normalize"]["features"][k]) for k in ("mean", "std"))
    for split in ("train", "cal", "test"):
        for name in set(arrays[f"{split}_group"].tolist()):
            rows = data.recording_id == name
            first = np.flatnonzero(rows)[:5]
            rel = bl.relative(data.features[rows][5:], *bl.fit(data.features[first]), floor)
            want = ((rel - mean) / std).astype(np.float32)
            got = arrays[f"{split}_features"][arrays[f"{split}_group"] == name]
            assert np.array_equal(got, want), (split, name)
            # raw features stay raw (the envelope and the population are of raw values)
            assert np.array_equal(arrays[f"{split}_features_raw"][arrays[f"{split}_group"] == name],
                                  data.features[rows][5:].astype(np.float32))


def test_manifest_field_only_with_a_baseline(baseline_runs) -> None:
    plain = json.loads((baseline_runs["bundle-plain"] / "manifest.json").read_text())
    assert "baseline" not in plain["input"]  # bundles without one keep their bytes
    with_b = json.loads((baseline_runs["bundle-baseline"] / "manifest.json").read_text())["input"]["baseline"]
    assert with_b["windows"] == 5 and "relative to the mean and std of its own first 5" in with_b["basis"]


def test_a_baseline_recipe_retrains_from_the_hubs_labels(baseline_runs, tmp_path) -> None:
    """Labels flow back into a [baseline] recipe: a real agent replays a recording (its first 5 windows learn
    the baseline), each deferred window's review carries its features relative to that baseline, the hub stores
    them and `labels export` writes them, and training appends exactly those rows, relative as the models read
    them; a window deferred while the baseline was learned has none and is skipped, counted."""
    import csv
    import time

    from edgekit.agent import Agent
    from edgekit.config import AgentConfig, validate
    from edgekit.errors import DataError
    from edgekit.exporters.evaluation.review_load import outbox_messages
    from edgekit.exporters.training.train import train
    from edgekit.hub import export_labels
    from edgekit.hub.db import HubDB
    from edgekit.hub.ingest import to_batch

    recording = baseline_runs["recipe"].parent / "recordings" / "machine-2" / "run-1.csv"
    outbox = tmp_path / "outbox.db"
    cfg = validate(AgentConfig, {"device_id": "pump-9", "site": "plant", "allow_unsigned": True,
                                 "bundle": str(baseline_runs["bundle-baseline"]), "mqtt": {"url": None},
                                 "outbox": {"path": str(outbox)},
                                 "source": {"kind": "replay", "path": str(recording), "speed": 0}},
                   "tests/test_baseline.py")
    with Agent(cfg) as agent:
        agent.run(drain_timeout_s=0)
    msgs = outbox_messages(outbox)
    reviews = [json.loads(p) for t, p in msgs if t.endswith("/review")]
    learning = [r for r in reviews if r["reasons"] == ["commissioning"]]
    judged = [r for r in reviews if "commissioning" not in r["reasons"]]
    assert len(learning) == 5 and all("relative" not in r for r in learning)
    assert judged and all(set(r["relative"]) == set(r["features"]) for r in judged)
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    ids = [r["id"] for r in learning[:2] + judged]
    with HubDB(url) as db:
        db.create()
        db.store(to_batch(msgs, time.time()))
        assert db.add_labels(ids, "fault", "ana") == len(ids)
    out = tmp_path / "labels.csv"
    assert export_labels(url, out) == len(ids)
    rows = {r["result_id"]: r for r in csv.DictReader(out.open())}
    assert json.loads(rows[judged[0]["id"]]["relative"]) == judged[0]["relative"]
    assert rows[learning[0]["id"]]["relative"] == ""

    run = train(baseline_runs["recipe"], tmp_path / "run", extra_labels=out, epochs=1, progress=False)
    meta = json.loads((run / "run.json").read_text())
    assert meta["extra_labels_added"] == len(judged)
    assert meta["extra_labels_skipped"]["without_baseline"] == 2
    names = meta["input"]["feature_names"]
    mean, std = (np.asarray(meta["normalize"]["features"][k]) for k in ("mean", "std"))
    want = ((np.array([[r["relative"][n] for n in names] for r in judged]) - mean) / std).astype(np.float32)
    with np.load(run / "splits.npz") as s:
        added, added_raw = s["train_features"][-len(judged):], s["train_features_raw"][-len(judged):]
    assert np.allclose(added, want, rtol=1e-5, atol=1e-5)
    assert np.allclose(added_raw, [[r["features"][n] for n in names] for r in judged], rtol=1e-6)

    # a file without the column (an older hub's export) is refused, naming the column it needs
    old = tmp_path / "old.csv"
    old.write_text("label,features\nfault,[]\n")
    with pytest.raises(DataError, match="needs the 'relative' column") as exc:
        train(baseline_runs["recipe"], tmp_path / "run-old", extra_labels=old, epochs=1, progress=False)
    assert exc.value.where == str(old)


def _read(recording: Path) -> tuple[np.ndarray, np.ndarray]:
    data = np.loadtxt(recording, delimiter=",", skiprows=1, usecols=(0, 1, 2, 3))
    return data[:, 0], data[:, 1:]


@pytest.mark.parametrize("batch", [1, 3, 256])
def test_pipeline_learns_the_device_baseline_in_any_batch(baseline_runs, batch) -> None:
    from edgekit.features import extractor
    from edgekit.gate import Gate
    from edgekit.manifest import read_manifest
    from edgekit.pipeline import EdgePipeline
    from edgekit.runtime import ModelSet, Preprocess
    from edgekit.window import Windower

    bundle = baseline_runs["bundle-baseline"]
    m = read_manifest(bundle)
    models = ModelSet(bundle, m, ["CPUExecutionProvider"])
    pre = Preprocess.from_manifest(m)
    th = m.thresholds
    pipe = EdgePipeline(m, models, pre, Gate(th.ood_max_score, th.min_confidence, th.max_disagreement))
    t, v = _read(baseline_runs["recipe"].parent / "recordings" / "machine-2" / "run-0.csv")
    windows = Windower(int(m.input.window_size), int(m.input.window_hop), 3, m.input.max_gap_s).push_many(t, v)
    judged = [j for a in range(0, len(windows), batch) for j in pipe.run(windows[a:a + batch])]
    assert [j.decision.reasons[:1] for j in judged[:5]] == [("commissioning",)] * 5
    assert all(j.probs is None and j.features is not None for j in judged[:5])
    assert all("commissioning" not in j.decision.reasons and j.probs is not None for j in judged[5:])
    raw = extractor(m.input.extractor, m.input.feature_params)(np.stack([w.data for w in windows]), 1000.0)
    comm = pipe.commissioning
    assert comm is not None and comm.baseline is not None
    mean, std = bl.fit(raw[:5])
    assert np.array_equal(comm.baseline.mean, mean) and np.array_equal(comm.baseline.std, std)
    x = pre.features(bl.relative(raw[5:], mean, std, comm.floor))
    probs = models.infer(x, None).probs
    assert np.array_equal(np.stack([j.probs for j in judged[5:]]), probs)


def test_the_baseline_command_contract() -> None:
    from edgekit import topics
    from edgekit.contract.messages import BaselineCommand
    from edgekit.errors import DataError

    cmd = BaselineCommand(ts=12.5)
    assert cmd.encode() == b'{"schema":"edgekit.baseline-command/1","action":"learn","ts":12.5}'
    assert BaselineCommand.decode(cmd.encode(), "t") == BaselineCommand("learn", 12.5, origin="t")
    where = f"topic {topics.command('plant1', 'pump7', topics.BASELINE_COMMAND)!r}"
    assert where == "topic 'edgekit/v1/plant1/pump7/command/baseline'"
    for payload, message in ((b'{"schema":"edgekit.baseline-command/1","action":"forget"}', "action must be one of"),
                             (b'{"schema":"edgekit.baseline-command/1","action":"learn","by":"x"}',
                              "'by' is not a field of edgekit.baseline-command/1"),
                             (b'{"schema":"edgekit.trial-command/1","action":"start"}', "payload schema must be")):
        with pytest.raises(DataError, match=message) as exc:
            BaselineCommand.decode(payload, where)
        assert exc.value.where == where


def test_the_agent_takes_a_fresh_baseline_command_and_refuses_others(baseline_runs, stream_bundle, tmp_path,
                                                                      caplog) -> None:
    import time

    from edgekit import topics
    from edgekit.agent import Agent
    from edgekit.config import AgentConfig, validate
    from edgekit.contract.messages import BaselineCommand

    def agent(bundle: Path) -> Agent:
        rec = baseline_runs["recipe"].parent / "recordings" / "machine-0" / "run-0.csv"
        return Agent(validate(AgentConfig, {
            "bundle": str(bundle), "allow_unsigned": True, "source": {"kind": "replay", "path": str(rec)},
            "mqtt": {"url": None}, "outbox": {"path": str(tmp_path / f"{bundle.name}.db")}}, "test"))

    name = topics.BASELINE_COMMAND
    with agent(baseline_runs["bundle-baseline"]) as a:
        assert a.baseline_state() == {"state": "learning", "windows": 0, "of": 5, "source": "learned"}
        a._mqtt_command(name, BaselineCommand(ts=time.time() - 3600).encode())
        assert not a._relearn.is_set() and "stale" in caplog.text
        a._mqtt_command(name, b'{"schema":"edgekit.baseline-command/1","action":"forget"}')
        assert not a._relearn.is_set() and "action must be one of" in caplog.text
        a._mqtt_command(name, BaselineCommand(ts=time.time()).encode())
        assert a._relearn.is_set()
    caplog.clear()
    with agent(stream_bundle) as a:  # a bundle without a baseline has none to learn
        assert a.baseline_state() is None
        a._mqtt_command(name, BaselineCommand(ts=time.time()).encode())
        assert not a._relearn.is_set() and "has no baseline to learn" in caplog.text
        a._mqtt_command("reboot", b"{}")
        assert "unknown command (this agent takes 'trial' and 'baseline')" in caplog.text


def test_sensor_fault_eval_commissions_each_recording_on_its_own_first_windows(baseline_runs, tmp_path) -> None:
    """`edgekit eval sensor-faults` feeds several recordings through one pipeline: each is a fresh device that
    learns its baseline from its own first windows (not the first recording's), and those are not scored."""
    from edgekit.exporters.evaluation.sensor_faults import _agent, _judge, _windows
    from edgekit.features import extractor

    folder = baseline_runs["recipe"].parent / "recordings"
    values = [_read(folder / "machine-2" / "run-0.csv")[1], _read(folder / "machine-3" / "run-1.csv")[1]]
    with _agent(baseline_runs["bundle-baseline"], tmp_path) as agent:
        m = agent.manifest
        recordings = _windows(values, int(m.input.window_size), int(m.input.window_hop))
        judged = _judge(agent.pipeline, recordings)
        comm = agent.pipeline.commissioning
    assert len(judged) == sum(len(r) - 5 for r in recordings)
    assert not any("commissioning" in j.decision.reasons for j in judged)
    assert [j.window for j in judged] == recordings[0][5:] + recordings[1][5:]
    raw = extractor(m.input.extractor, m.input.feature_params)(np.stack([w.data for w in recordings[1][:5]]),
                                                              1000.0)
    assert comm is not None and comm.baseline is not None
    assert np.array_equal(comm.baseline.mean, bl.fit(raw)[0])  # the last recording's own first windows
