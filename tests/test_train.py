"""train(): every example recipe trains (tiny epochs) into a run directory that keeps the contract in
edgekit/contract/run.py; the saved models reproduce the recorded metrics; same seed, same metrics;
tug_seed's median imputation is recorded; hub labels join the training split only; split errors are clear."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgekit.contract.run import RunMeta, encode, read_run  # noqa: E402
from edgekit.errors import ConfigError, DataError  # noqa: E402
from edgekit.exporters.training.models import load_checkpoint  # noqa: E402
from edgekit.exporters.training.train import train  # noqa: E402

pytestmark = pytest.mark.torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "edgekit" / "recipes"
RUN_KEYS = [field.alias or name for name, field in RunMeta.model_fields.items()]


def check_contract(run_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Everything the exporter relies on, checked against the files actually written."""
    run = json.loads((run_dir / "run.json").read_text())
    assert list(run) == RUN_KEYS  # every field of the contract, in its order, and nothing else
    assert json.loads(encode(read_run(run_dir))) == run  # export reads it all back, nothing lost
    assert run["schema"] == "edgekit.run/1"
    assert len(run["data_fingerprint"]) == 64
    names = run["input"]["feature_names"]
    f = len(names)
    assert len(run["normalize"]["features"]["mean"]) == f == len(run["normalize"]["features"]["std"])
    assert min(run["normalize"]["features"]["std"]) >= 1e-6
    arrays = dict(np.load(run_dir / "splits.npz"))
    cnn = run["models"]["predictor"]["arch"] == "cnn1d"
    for split in ("train", "cal", "test"):
        x, raw, y = arrays[f"{split}_features"], arrays[f"{split}_features_raw"], arrays[f"{split}_y"]
        assert x.dtype == np.float32 and x.shape == (len(y), f) and y.dtype == np.int64
        assert np.isfinite(x).all() and set(np.unique(y)) == set(range(len(run["labels"])))
        mean, std = (np.asarray(run["normalize"]["features"][k]) for k in ("mean", "std"))
        if "baseline" not in run["input"]:  # with one, x is of features relative to it (tests/test_baseline.py)
            np.testing.assert_allclose((raw - mean) / std, x, rtol=1e-4, atol=1e-4)
        assert (f"{split}_window" in arrays) == cnn
        if cnn:
            w = arrays[f"{split}_window"]
            assert w.shape == (len(y), len(run["input"]["channels"]), run["input"]["window_size"])
            assert w.dtype == np.float32
        assert run["metrics"][split]["n"] == len(y)
    assert abs(float(arrays["train_features"].mean())) < 0.05  # train split normalised to mean 0
    for name, entry in run["models"].items():
        assert (run_dir / entry["file"]).is_file(), name
    for png in ("loss.png", "confusion.png", "roc.png", "ae_hist.png"):
        assert (run_dir / "report" / png).stat().st_size > 1000
    assert run["task"] in (run_dir / "report" / "index.html").read_text()

    # The saved models give back the recorded test metrics.
    predictor, ckpt = load_checkpoint(run_dir / "predictor.pt")
    x_in = arrays["test_window"] if cnn else arrays["test_features"]
    with torch.no_grad():
        probs = predictor(torch.from_numpy(x_in)).numpy()
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert float((probs.argmax(1) == arrays["test_y"]).mean()) == pytest.approx(run["metrics"]["test"]["accuracy"])
    ae, _ = load_checkpoint(run_dir / "autoencoder.pt")
    with torch.no_grad():
        score = ae(torch.from_numpy(arrays["test_features"])).numpy()
    assert score.shape == (len(arrays["test_y"]),) and (score >= 0).all()
    second = pickle.loads((run_dir / "second_opinion.pkl").read_bytes())
    sec_probs = second.predict_proba(arrays["test_features"])  # metrics use argmax of the probabilities
    sec_acc = float((sec_probs.argmax(1) == arrays["test_y"]).mean())
    assert sec_acc == pytest.approx(run["metrics"]["test"]["second_opinion"]["accuracy"])
    return run, arrays


def test_tug_seed_contract_imputation_and_reproducibility(tmp_path: Path) -> None:
    a = train(EXAMPLES / "tug_seed.toml", tmp_path / "a", epochs=5, progress=False)
    run, arrays = check_contract(a)
    assert run["input"] == {"kind": "table", "extractor": "table", "channels": None, "rate_hz": None,
                            "window_size": None, "window_hop": None, "feature_names": run["input"]["feature_names"],
                            "channel_range": None, "recording": None}  # a table: no raw channels, no files to replay
    assert run["positive_label"] == "balance_risk" and run["normal_label"] == "no_risk"
    assert run["recipe"]["predictor"]["epochs"] == 5  # the override is what was trained
    assert set(run["groups_metrics"]) == {"gender", "age_band"}

    # Median imputation of px, fitted on the training split only, recorded and applied.
    imp = run["imputation"]
    assert imp["method"] == "median" and imp["missing"] == {"px": 3}
    px = run["input"]["feature_names"].index("px")
    table = np.genfromtxt(ROOT / "edgekit" / "data" / "tug_gait_23.tsv", delimiter="\t", names=True)
    holes = np.isnan(table["px"])
    assert holes.sum() == 3
    # Which training rows had no px: match them to the table by (age, TUG, steps).
    cols = [run["input"]["feature_names"].index(c) for c in ("age", "TUG", "steps")]
    hole_keys = {tuple(float(table[c][i]) for c in ("age", "TUG", "steps")) for i in np.flatnonzero(holes)}
    raw = arrays["train_features_raw"].astype(np.float64)
    was_hole = np.array([tuple(np.round(r[cols], 3)) in hole_keys for r in raw])
    assert np.median(raw[~was_hole, px]) == pytest.approx(imp["values"]["px"], abs=1e-4)
    np.testing.assert_allclose(raw[was_hole, px], imp["values"]["px"], rtol=1e-6)
    for split in ("cal", "test"):  # holes in cal/test got the TRAIN median too
        assert np.isfinite(arrays[f"{split}_features_raw"][:, px]).all()

    b = train(EXAMPLES / "tug_seed.toml", tmp_path / "b", epochs=5, progress=False)
    run_b = json.loads((b / "run.json").read_text())
    assert run_b["metrics"] == run["metrics"]
    assert run_b["data_fingerprint"] == run["data_fingerprint"]
    np.testing.assert_array_equal(np.load(b / "splits.npz")["test_y"], arrays["test_y"])


def test_extra_labels_join_the_train_split_only(tmp_path: Path) -> None:
    base = train(EXAMPLES / "tug_seed.toml", tmp_path / "base", epochs=2, progress=False)
    run = json.loads((base / "run.json").read_text())
    names = run["input"]["feature_names"]
    extra = tmp_path / "labels.csv"
    rows = ["result_id,label," + ",".join(names)]
    rows += [f"r{i},{lab}," + ",".join(str(10.0 + i + j) for j in range(len(names)))
             for i, lab in enumerate(["no_risk", "balance_risk", "balance_risk"])]
    rows.append("r7,sensor fault," + ",".join("1" for _ in names))  # a reviewer's free-text label
    rows.append("r8,no_risk," + ",".join(["1"] * (len(names) - 1) + [""]))  # another model's case
    rows.append("r9,fell twice," + ",".join("2" for _ in names))  # the clinic's word for balance_risk
    extra.write_text("\n".join(rows) + "\n")
    # Labels the recipe does not know stop training, listed, until the recipe maps or skips them (issue 15).
    with pytest.raises(DataError, match=r"labels the recipe does not know: 'sensor fault' \(1 rows\); "
                                        r"'fell twice' \(1 rows\).*\[extra_labels\] map"):
        train(EXAMPLES / "tug_seed.toml", tmp_path / "unmapped", extra_labels=extra, epochs=1, progress=False)
    recipe = tmp_path / "tug_seed.toml"
    recipe.write_text((EXAMPLES / "tug_seed.toml").read_text().replace("path = \"", f"path = \"{EXAMPLES}/", 1)
                      + '\n[extra_labels]\nmap = { "fell twice" = "balance_risk" }\nskip = ["sensor fault"]\n')
    out = train(recipe, tmp_path / "extra", extra_labels=extra, epochs=2, progress=False)
    run_x, arrays = check_contract(out)
    assert run_x["extra_labels_added"] == 4
    assert run_x["extra_labels_skipped"] == {"unknown_label": {}, "mapped_label": {"fell twice": 1},
                                             "skipped_label": {"sensor fault": 1}, "unreadable_features": 1}
    assert "skipped 2" in (out / "report" / "index.html").read_text()
    assert run_x["split_sizes"]["train"] == run["split_sizes"]["train"] + 4
    assert run_x["split_sizes"]["test"] == run["split_sizes"]["test"]
    assert arrays["train_y"][-4:].tolist() == [0, 1, 1, 1]
    assert arrays["train_features_raw"][-2, 0] == pytest.approx(12.0)
    assert run_x["data_fingerprint"] != run["data_fingerprint"]

    extra.write_text("label," + ",".join(names) + "\nno_risk," + ",".join("" for _ in names) + "\n")
    with pytest.raises(DataError, match=r"labels\.csv: none of 1 rows is usable .*unreadable features or windows: 1"):
        train(EXAMPLES / "tug_seed.toml", tmp_path / "bad", extra_labels=extra, epochs=1, progress=False)


def test_too_few_rows_of_a_class_and_unknown_estimator_param(tmp_path: Path) -> None:
    (tmp_path / "toy.csv").write_text("a,b,y\n" + "\n".join(f"{i},{i % 3},{int(i < 2)}" for i in range(20)) + "\n")
    recipe = ('task = "toy"\nlabels = ["ok", "risk"]\n[data]\nloader = "table"\npath = "toy.csv"\n'
              'relative_to = "recipe"\nfeatures = ["a", "b"]\ntarget = "y"\n[features]\nextractor = "table"\n')
    (tmp_path / "r.toml").write_text(recipe)
    with pytest.raises(DataError, match=r"toy\.csv \(splits\): too few rows of class\(es\) risk \(2\)"):
        train(tmp_path / "r.toml", tmp_path / "out", epochs=1, progress=False)

    (tmp_path / "toy.csv").write_text("a,b,y\n" + "\n".join(f"{i},{i % 3},{int(i < 6)}" for i in range(20)) + "\n")
    (tmp_path / "r.toml").write_text(recipe + "[second_opinion]\nparams = { n_estimator = 10 }\n")
    with pytest.raises(ConfigError, match=r"r\.toml: second_opinion\.params\.n_estimator: .*did you mean 'n_estimators'"):
        train(tmp_path / "r.toml", tmp_path / "out", epochs=1, progress=False)


@pytest.mark.data
def test_fall_screening_trains(data_dir: Path, tmp_path: Path) -> None:
    run, arrays = check_contract(train(EXAMPLES / "fall_screening.toml", tmp_path / "fall", epochs=3, progress=False))
    assert sum(run["split_sizes"].values()) == 73  # excluded rows dropped
    assert int(sum((arrays[f"{s}_y"] == 1).sum() for s in ("train", "cal", "test"))) == 20
    assert run["imputation"] is None and run["groups_metrics"] == {}
    assert run["models"]["second_opinion"]["kind"] == "random_forest"


def test_svm_second_opinion(tmp_path: Path) -> None:
    text = (EXAMPLES / "tug_seed.toml").read_text()
    text = text.replace('path = "../data/tug_gait_23.tsv"', f'path = "{ROOT / "edgekit/data/tug_gait_23.tsv"}"')
    text = text.replace("params = { n_estimators = 200, max_depth = 3, min_samples_leaf = 2 }", "params = { C = 2.0 }")
    text = text.replace('kind = "random_forest"', 'kind = "svm"')
    (tmp_path / "svm.toml").write_text(text)
    run, _ = check_contract(train(tmp_path / "svm.toml", tmp_path / "svm", epochs=2, progress=False))
    assert run["models"]["second_opinion"]["kind"] == "svm"
    second = pickle.loads((tmp_path / "svm" / "second_opinion.pkl").read_bytes())
    assert type(second).__name__ == "SVC" and second.probability and second.C == 2.0


@pytest.mark.data
@pytest.mark.slow
def test_skab_trains_grouped_by_file(data_dir: Path, tmp_path: Path) -> None:
    run, arrays = check_contract(train(EXAMPLES / "skab.toml", tmp_path / "skab", epochs=1, progress=False))
    groups = {s: set(arrays[f"{s}_group"].tolist()) for s in ("train", "cal", "test")}
    assert not (groups["train"] & groups["test"]) and not (groups["train"] & groups["cal"])
    assert not (groups["cal"] & groups["test"])
    assert run["input"]["kind"] == "window" and run["input"]["window_size"] == 8
    assert run["input"]["feature_names"][:2] == ["Accelerometer1RMS.mean", "Accelerometer2RMS.mean"]
    assert len(run["input"]["feature_names"]) == 8  # each channel's mean, against the pump's own baseline
    assert run["input"]["baseline"]["windows"] == 197
    assert run["metrics"]["test"]["autoencoder"]["auc_other_vs_normal"] is not None


@pytest.mark.data
@pytest.mark.slow
def test_ipol_cnn_trains_grouped_by_subject_and_reproduces(data_dir: Path, tmp_path: Path) -> None:
    a = train(EXAMPLES / "ipol_gait.toml", tmp_path / "a", epochs=1, progress=False)
    run, arrays = check_contract(a)
    assert run["models"]["predictor"] == {"file": "predictor.pt", "arch": "cnn1d", "input": "window"}
    assert len(run["normalize"]["window"]["mean"]) == 6
    assert run["positive_label"] is None and run["labels"] == ["still", "walk", "turn"]
    subjects = {s: set(arrays[f"{s}_group"].tolist()) for s in ("train", "cal", "test")}
    assert not (subjects["train"] & subjects["test"]) and not (subjects["cal"] & subjects["test"])
    assert "Gender" in run["groups_metrics"]  # the sidecar field the recipe names in group_columns
    b = train(EXAMPLES / "ipol_gait.toml", tmp_path / "b", epochs=1, progress=False)
    assert json.loads((b / "run.json").read_text())["metrics"] == run["metrics"]
