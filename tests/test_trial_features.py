"""Trial features (issue 13): the registry's documentation, its errors, the seed table's evidence, the recipe
check, a hand-computed `tug_frequency_features` case, and agreement with the IPOL annotations on the
held-out subjects 6-15 within the tolerances below (acceptance 2)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from test_gait import synthetic_trial

from edgekit import trial_features
from edgekit.errors import ConfigError, DataError, NotScored
from edgekit.features import TUG_FEATURES, tug_frequency_features
from edgekit.gait import segment
from edgekit.recipe import load_recipe
from edgekit.trial_features import REGISTRY, compute_trial_features

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "edgekit" / "data" / "tug_gait_23.tsv"
RATE = 100.0
PHASES = ("walk_start_s", "turn_start_s", "turn_end_s", "walk_end_s", "walk_out_s", "turn_s", "walk_back_s",
          "TUG", "steps", "cadence_spm")

# Agreement with the IPOL annotations on held-out subjects 6-15 (58 trials; references: walk = TrialBoundaries,
# first heel strike to last toe-off; turn = UTurnBoundaries; steps = annotated foot events; durations and
# cadence from those). Per feature: (bound on the median |error|, bound that at least 90 % of the trials'
# |error| meet). Derived, not fitted: each is the error measured at this commit (gait.segment's constants
# unchanged, chosen on subjects 1-5), rounded up to the grid (0.1 s, 1 step, 1 step/min) plus one grid step,
# so the test guards the documented accuracy. Measured (median |e|, 90th percentile |e|):
# walk_start_s 0.12, 0.27 | turn_start_s 0.04, 0.09 | turn_end_s 0.04, 0.14 | walk_end_s 0.30, 0.97 |
# walk_out_s 0.12, 0.28 | turn_s 0.08, 0.20 | walk_back_s 0.29, 0.89 | TUG 0.34, 0.90 | steps 2, 4 |
# cadence_spm 4.1, 12.9. The walk's end (and so walk_back_s and TUG) has the long tail README's "IPOL gait"
# section describes (fidgeting after the last step): one trial in ten is off by about a second.
TOLERANCE = {
    "walk_start_s": (0.3, 0.4), "turn_start_s": (0.2, 0.2), "turn_end_s": (0.2, 0.3), "walk_end_s": (0.5, 1.1),
    "walk_out_s": (0.3, 0.4), "turn_s": (0.2, 0.3), "walk_back_s": (0.4, 1.0), "TUG": (0.5, 1.1),
    "steps": (3, 5), "cadence_spm": (6, 14),
}


def still_trial(seconds: float = 10.0) -> np.ndarray:
    rng = np.random.default_rng(1)
    n = int(seconds * RATE)
    values = np.zeros((n, 6))
    values[:, 2] = 9.81
    return values + rng.normal(0, 0.01, size=(n, 6))


def test_registry_documents_every_feature() -> None:
    assert set(PHASES) | set(TUG_FEATURES) | {"age", "sex"} == set(REGISTRY)
    for name, f in REGISTRY.items():
        assert f.name == name
        assert f.unit.strip(), name
        assert len(f.description) > 40, name
        assert f.source in ("signal", "operator"), name
    assert {n for n, f in REGISTRY.items() if f.source == "operator"} == {"age", "sex"}
    assert REGISTRY["TUG"].unit == "s" and REGISTRY["cadence_spm"].unit == "steps/min"
    assert REGISTRY["age"].unit == "years"


def test_readme_table_lists_every_feature_with_its_unit() -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Trial features"):]
    section = section[: section.index("\n### ", 5)]
    rows = {}
    for cells in re.findall(r"^\| (`[^|]+`) \| ([^|]+) \|.*\| (signal|operator) \|$", section, re.M):
        for name in re.findall(r"`([^`]+)`", cells[0]):
            rows[name] = (cells[1].strip(), cells[2])
    assert rows == {name: (f.unit, f.source) for name, f in REGISTRY.items()}


def test_unknown_names_are_refused_with_the_registry_names() -> None:
    values, _ = synthetic_trial()
    with pytest.raises(ConfigError, match=r"not trial features: \['px', 't1'\].*walk_start_s, turn_start_s"):
        compute_trial_features(["TUG", "px", "t1"], values, RATE)


def test_features_follow_the_segmentation_and_the_study() -> None:
    values, _ = synthetic_trial()
    seg = segment(values, RATE)
    f = dict(zip(PHASES, compute_trial_features(PHASES, values, RATE)))
    assert f["walk_start_s"] == seg.walk_start_s and f["walk_end_s"] == seg.walk_end_s
    assert (f["turn_start_s"], f["turn_end_s"]) == (seg.turn_start_s, seg.turn_end_s)
    assert f["walk_out_s"] == pytest.approx(seg.phase_s["walk_out"])
    assert f["turn_s"] == pytest.approx(seg.phase_s["turn"])
    assert f["walk_back_s"] == pytest.approx(seg.phase_s["walk_back"])
    assert f["TUG"] == pytest.approx(seg.walk_end_s - seg.walk_start_s)
    assert (f["steps"], f["cadence_spm"]) == (seg.steps, seg.cadence_spm)
    spectral = compute_trial_features(TUG_FEATURES, values, RATE)
    assert spectral.tolist() == list(tug_frequency_features(values[:, :3], RATE).values())


def test_segment_runs_once_per_trial(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counted(values: np.ndarray, rate_hz: float):
        calls.append(len(values))
        return segment(values, rate_hz)

    monkeypatch.setattr(trial_features, "segment", counted)
    values, _ = synthetic_trial()
    compute_trial_features([*PHASES, *TUG_FEATURES], values, RATE)
    assert calls == [len(values)]
    calls.clear()
    compute_trial_features(["age"], values, RATE, {"age": 70})
    assert calls == []  # operator fields alone need no segmentation


def test_operator_fields_are_required_only_when_named() -> None:
    values, _ = synthetic_trial()
    assert np.isfinite(compute_trial_features(["TUG", "steps"], values, RATE)).all()
    with pytest.raises(DataError, match=r"operator\.age: the operator did not enter 'age'"):
        compute_trial_features(["TUG", "age"], values, RATE)
    out = compute_trial_features(["age", "sex", "TUG"], values, RATE, {"age": "81", "sex": "F"})
    assert out[:2].tolist() == [81.0, 0.0]
    assert compute_trial_features(["sex"], values, RATE, {"sex": "m"}).tolist() == [1.0]
    for entry, message in [({"age": "eighty"}, "age must be a number"), ({"age": -3}, r"age must be in"),
                           ({"age": float("nan")}, r"age must be in"), ({"sex": "x"}, "sex must be F or M")]:
        with pytest.raises(DataError, match=message):
            compute_trial_features([next(iter(entry))], values, RATE, entry)


def test_a_trial_without_a_walk_or_a_turn_is_not_scored() -> None:
    with pytest.raises(NotScored, match=r"trial feature 'steps': no walk in the signal") as caught:
        compute_trial_features(["age", "steps"], still_trial(), RATE, {"age": 70})
    assert caught.value.reason == "no_walk" and isinstance(caught.value, DataError)
    with pytest.raises(NotScored, match="no walk") as caught:  # the spectral features too: nothing was walked
        compute_trial_features(["pse"], still_trial(), RATE)
    with pytest.raises(NotScored, match="lasts 2.00 s") as caught:
        compute_trial_features(["TUG"], still_trial(2.0), RATE)
    assert caught.value.reason == "too_short"
    nan = still_trial()
    nan[5, 0] = np.nan
    with pytest.raises(NotScored) as caught:
        compute_trial_features(["TUG"], nan, RATE)
    assert caught.value.reason == "non_finite"
    with pytest.raises(NotScored, match="no gravity") as caught:
        compute_trial_features(["TUG"], np.zeros((1000, 6)), RATE)
    assert caught.value.reason == "unsegmentable"
    values, _ = synthetic_trial()
    up = np.array([0.9, 0.0, np.sqrt(1 - 0.81)])
    straight = values.copy()
    straight[:, 3:] -= np.outer(straight[:, 3:] @ up, up)  # no yaw: a walk without the U-turn
    assert np.isfinite(compute_trial_features(["TUG", "steps"], straight, RATE)).all()
    with pytest.raises(NotScored, match=r"trial feature 'turn_s': no U-turn") as caught:
        compute_trial_features(["TUG", "turn_s"], straight, RATE)
    assert caught.value.reason == "no_turn"
    with pytest.raises(ValueError, match=r"shape \(T, 6\)"):
        compute_trial_features(["TUG"], values[:, :3], RATE)


def hand_tug_features(acc: np.ndarray, rate_hz: float) -> dict[str, float]:
    """The nine features written out from the study's definitions, with scipy's filter (the study's tools)."""
    signal = pytest.importorskip("scipy.signal")
    b, a = signal.butter(3, 3.667 / (rate_hz / 2.0))  # order 3, low-pass, cut-off 3.667 Hz
    mag = signal.lfilter(b, a, np.sqrt(acc[:, 0] ** 2 + acc[:, 1] ** 2 + acc[:, 2] ** 2))
    power = np.abs(np.fft.fft(mag)) ** 2  # bins 0..T-1
    s = power[1:50]  # bins 1..49
    p = (s - s.min()) / (s.max() - s.min())
    pse = -np.sum(p * np.log(1e-4 + p))
    z = (s - np.mean(s)) / np.sqrt(np.mean((s - np.mean(s)) ** 2))  # population std
    first = int(np.argmax(z))  # z[j] is FFT bin j + 1
    z_without_first = z.copy()
    for j in range(first - 3, first + 4):  # the peak and 3 bins each side
        if 0 <= j < len(z):
            z_without_first[j] = 0.0
    second = int(np.argmax(z_without_first))
    z_without_both = z_without_first.copy()
    for j in range(second - 2, second + 3):  # the second peak and 2 bins each side
        if 0 <= j < len(z):
            z_without_both[j] = 0.0
    third = int(np.argmax(z_without_both))
    weighted = np.array([(1.0 - k / 100.0) * power[k] for k in range(50)])  # bins 0..49, DC included
    cpt = (np.sum(weighted / weighted.max()) - 1.0) * 100.0
    return {"pse": pse, "psp1": z[first], "psp2": z_without_first[second], "psp3": z_without_both[third],
            "pspf1": first + 1.0, "pspf2": second + 1.0, "pspf3": third + 1.0,
            "wpsp": (first + 1.0 - 1.0) * z[first], "cpt": cpt}


def test_tug_frequency_features_reproduce_a_hand_computed_case() -> None:
    # 4 s at 100 Hz: FFT bin k is k / 4 s = 0.25 k Hz. The magnitude is gravity plus tones of whole cycles at
    # 1 Hz (bin 4, amplitude 3), 3 Hz (bin 12, amplitude 1.5) and 6 Hz (bin 24, amplitude 2, which the
    # 3.667 Hz low-pass cuts to ~0.45), on a tilted sensor; the peaks must be bins 4, 12, 24 in that order.
    t = np.arange(400) / RATE
    tone = [amp * np.sin(2 * np.pi * hz * t) for hz, amp in [(1.0, 3.0), (3.0, 1.5), (6.0, 2.0)]]
    mag = 9.81 + tone[0] + tone[1] + tone[2]
    axis = np.array([0.3, -0.2, 0.9])
    acc = np.outer(mag, axis / np.linalg.norm(axis))
    ours = tug_frequency_features(acc, RATE)
    hand = hand_tug_features(acc, RATE)
    assert (ours["pspf1"], ours["pspf2"], ours["pspf3"]) == (4.0, 12.0, 24.0) == (hand["pspf1"], hand["pspf2"],
                                                                                   hand["pspf3"])
    assert ours["wpsp"] == pytest.approx(3.0 * ours["psp1"], rel=1e-12)  # (pspf1 - 1) x psp1
    assert ours["psp1"] > ours["psp2"] > ours["psp3"] > 0
    for name in TUG_FEATURES:
        assert ours[name] == pytest.approx(hand[name], rel=1e-8, abs=1e-9), name
    in_g = tug_frequency_features(acc / 9.80665, RATE)  # scale-free: the sensor's unit does not matter
    for name in TUG_FEATURES:
        assert in_g[name] == pytest.approx(ours[name], rel=1e-8, abs=1e-9), name


def seed_columns() -> dict[str, np.ndarray]:
    lines = SEED.read_text().splitlines()
    header = lines[0].split("\t")
    rows = [line.split("\t") for line in lines[1:]]
    return {h: np.array([r[j] for r in rows]) for j, h in enumerate(header)}


def test_seed_table_evidence_behind_the_registered_columns() -> None:
    """What trial_features.py's docstring says of the seed table, measured on its 23 rows."""
    c = seed_columns()
    t = np.stack([c[f"t{i}"].astype(float) for i in range(1, 7)], axis=1)
    n = np.stack([c[f"n{i}"].astype(float) for i in range(1, 7)], axis=1)
    assert np.abs(n / 45.0 - t).max() < 0.07  # frame indices of a 45 frame/s record
    assert np.all(np.diff(t, axis=1) > 0)  # increasing event times
    test_time = t[:, 5] - t[:, 0]
    assert np.array_equal(c["time"].astype(float), np.round(test_time))  # time = round(t6 - t1)
    tug = c["TUG"].astype(float)
    off = np.flatnonzero(np.abs(tug - test_time) > 0.05)
    assert off.tolist() == [15] and tug[15] == 14 and round(test_time[15], 2) == 13.02  # row 16
    freq = c["step_frequency"].astype(float)
    assert np.allclose(freq / (45 / 512), np.round(freq / (45 / 512)), atol=0.02)  # FFT bins at 45 Hz
    cadence = c["steps"].astype(float) / test_time
    assert abs(np.corrcoef(freq, cadence)[0, 1]) < 0.2  # not steps per second
    registered = [h for h in c if h in REGISTRY]
    assert registered == ["age", "steps", "TUG"]


def test_trial_recipes_name_only_registry_features(tmp_path: Path) -> None:
    from edgekit.exporters.training.tasks import load_task

    for name in ("tug_seed_trial", "fall_screening"):
        recipe = load_recipe(ROOT / "edgekit" / "recipes" / f"{name}.toml")
        assert recipe.features.extractor == "trial"
        assert all(c in REGISTRY for c in recipe.data.features or [])
    seed = load_recipe(ROOT / "edgekit" / "recipes" / "tug_seed_trial.toml")
    data = load_task(seed, ROOT / "edgekit" / "recipes")
    assert data.extractor == "trial" and data.feature_names == ["age", "TUG", "steps"]
    assert data.features.shape == (23, 3) and np.isfinite(data.features).all()
    text = (ROOT / "edgekit" / "recipes" / "tug_seed.toml").read_text()
    path = tmp_path / "r.toml"
    path.write_text(text.replace('extractor = "table"', 'extractor = "trial"').replace(
        'path = "../data/tug_gait_23.tsv"', f'path = "{SEED}"'))
    with pytest.raises(ConfigError, match=r"features: .*not in the registry: \['t1', 't2', 't3', 't4', 't5', "
                                          r"'step_frequency', 'px', 'py', 'pz'\] \(its names: walk_start_s, "):
        load_recipe(path)


@pytest.mark.data
def test_held_out_subjects_agree_with_the_annotations(data_dir: Path) -> None:
    from edgekit.datasets import ipol_files, read_ipol

    errors = []
    for path in ipol_files():
        trial = read_ipol(path)
        meta = trial.meta
        if meta["Subject"] <= 5:  # gait.segment's constants were chosen on these
            continue
        r = trial.rate_hz
        (a, b), (c, d) = meta["TrialBoundaries"], meta["UTurnBoundaries"]
        steps = len(meta["LeftFootEvents"]) + len(meta["RightFootEvents"])
        reference = [a / r, c / r, d / r, b / r, (c - a) / r, (d - c) / r, (b - d) / r, (b - a) / r, steps,
                     60.0 * steps / ((b - a) / r)]
        errors.append(compute_trial_features(PHASES, trial.values, r) - np.array(reference))
    err = np.abs(np.array(errors))
    assert err.shape == (58, len(PHASES)) and np.isfinite(err).all()  # every held-out trial is scored
    for j, name in enumerate(PHASES):
        median_bound, trial_bound = TOLERANCE[name]
        assert np.median(err[:, j]) <= median_bound, (name, np.median(err[:, j]))
        within = float(np.mean(err[:, j] <= trial_bound))
        assert within >= 0.9, (name, within)


@pytest.mark.torch
def test_seed_trial_recipe_trains_to_a_trial_bundle(tmp_path: Path) -> None:
    """The bundle records extractor 'trial' and the registry names; a walked trial gives its input vector."""
    pytest.importorskip("torch", reason="training needs the train extra (torch)")
    from edgekit.exporters.export.export import export
    from edgekit.exporters.training.train import train
    from edgekit.manifest import load_bundle

    run = train(ROOT / "edgekit" / "recipes" / "tug_seed_trial.toml", tmp_path / "run", epochs=5, progress=False)
    report = export(run, tmp_path / "bundle", progress=False)
    m = load_bundle(tmp_path / "bundle")
    assert report["passed"] is True
    assert (m.input.kind, m.input.extractor, m.input.feature_names) == ("table", "trial", ["age", "TUG", "steps"])
    values, _ = synthetic_trial()
    row = compute_trial_features(m.input.feature_names, values, RATE, {"age": 74})
    assert row.shape == (m.models["predictor"].input_shape[1],) and row[0] == 74.0
