"""Export of small real runs: ONNX + INT8 QDQ + parity.json + calibrated gate + signed bundle, reproduced
in a fresh process that cannot import torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from edgekit.errors import ExportError, ModelError  # noqa: E402
from edgekit.manifest import keygen, load_bundle, sha256_file, verify_bundle  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runfactory import make_run, raw_windows  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return keygen(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def mlp_bundle(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> tuple[Path, Path, dict]:
    from edgekit.exporters.export.export import export

    root = tmp_path_factory.mktemp("mlp")
    run = make_run(root, arch="mlp", n_classes=2, second="random_forest", n=900, epochs=50)
    out = root / "bundle"
    report = export(run, out, int8=True, sign_key=keys[0], progress=False)
    return run, out, report


@pytest.fixture(scope="module")
def cnn_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    from edgekit.exporters.export.export import export

    root = tmp_path_factory.mktemp("cnn")
    run = make_run(root, arch="cnn1d", n_classes=3, second="random_forest", n=900, epochs=30)
    out = root / "bundle"
    report = export(run, out, int8=True, progress=False)
    return run, out, report


# The 'spectral' extractor's parameters for the factory's signals (32 Hz, 2-8 cycles a window): bands in Hz,
# an envelope over 4-16 Hz (issue 12).
SPECTRAL = {"time": ["mean", "std", "rms", "kurtosis"], "bands_hz": [[0, 2], [2, 4], [4, 8], [8, 16]],
            "envelope": {"carrier_hz": [4, 16], "bands_hz": [[0.9, 3]]}}


@pytest.fixture(scope="module", params=[(3, 37), (8, 64)], ids=["3ch-37", "8ch-64"])
def spectral_cnn_bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                        ) -> tuple[Path, Path, dict]:
    """A cnn1d on raw windows of 3 or 8 channels (an odd and an even width), its autoencoder and second
    opinion on 'spectral' features; INT8."""
    from edgekit.exporters.export.export import export
    from edgekit.manifest import FeatureParams

    channels, width = request.param
    root = tmp_path_factory.mktemp(f"spectral{channels}")
    run = make_run(root, arch="cnn1d", n_classes=3, n=600, epochs=25, channels=channels, width=width,
                   params=FeatureParams.model_validate(SPECTRAL))
    out = root / "bundle"
    return run, out, export(run, out, int8=True, progress=False)


def _files(bundle: Path) -> list[str]:
    return sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())


@pytest.mark.parametrize("which", ["mlp_bundle", "cnn_bundle"])
def test_every_file_listed_with_sha256(which: str, request: pytest.FixtureRequest) -> None:
    _, out, _ = request.getfixturevalue(which)
    m = load_bundle(out)
    listed = set(m.files)
    on_disk = set(_files(out)) - {"manifest.json", "manifest.sig"}
    assert listed == on_disk
    assert {"predictor.fp32.onnx", "predictor.int8.onnx", "autoencoder.fp32.onnx", "autoencoder.int8.onnx",
            "second_opinion.onnx", "heldout.npz", "parity.json", "run.json"} <= listed
    for rel, digest in m.files.items():
        assert sha256_file(out / rel) == digest
    for role, spec in m.models.items():
        assert spec.file in listed and spec.fp32_file in listed
        assert spec.quantization_reason
        assert (spec.quantization == "int8-qdq") == spec.file.endswith(".int8.onnx"), role


@pytest.mark.parametrize("which", ["mlp_bundle", "cnn_bundle"])
def test_int8_files_hold_qdq_nodes_and_metadata(which: str, request: pytest.FixtureRequest) -> None:
    _, out, report = request.getfixturevalue(which)
    for stem, role in (("predictor", "predictor"), ("autoencoder", "gate")):
        model = onnx.load(str(out / f"{stem}.int8.onnx"))
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
        assert report["models"][role]["int8"]["qdq_nodes"]["QuantizeLinear"] == ops.count("QuantizeLinear")
        props = {p.key: p.value for p in model.metadata_props}
        assert props["edgekit.role"] == role and props["edgekit.quantization"] == "int8-qdq"
        fp32 = onnx.load(str(out / f"{stem}.fp32.onnx"))
        assert "QuantizeLinear" not in [n.op_type for n in fp32.graph.node]
        props = {p.key: p.value for p in fp32.metadata_props}
        assert json.loads(props["edgekit.labels"]) == load_bundle(out).labels
        assert len(json.loads(props["edgekit.feature_names"])) == 9
        assert fp32.graph.input[0].name == "x"
        assert fp32.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis


@pytest.mark.parametrize("which", ["mlp_bundle", "cnn_bundle"])
def test_parity_report_side_by_side(which: str, request: pytest.FixtureRequest) -> None:
    _, out, report = request.getfixturevalue(which)
    on_disk = json.loads((out / "parity.json").read_text())
    assert on_disk["passed"] is True and on_disk["schema"] == "edgekit.parity/1"
    for role in ("predictor", "gate"):
        m = on_disk["models"][role]
        assert m["fp32"]["torch_vs_onnx"]["pass"] and m["fp32"]["torch_vs_onnx"]["max_abs"] < 1e-4
        i8 = m["int8"]
        assert {"heldout_fp32", "heldout_int8", "decision_agreement", "metric", "metric_drop"} <= set(i8)
        assert 0.0 <= i8["heldout_int8"] <= 1.0 and 0.0 <= i8["decision_agreement"] <= 1.0
        assert m["latency_us"]["fp32"] > 0 and m["latency_us"]["int8"] > 0
        assert m["use"]["file"] in (m["fp32"]["file"], i8["file"])
        if m["use"]["quantization"] == "int8-qdq":
            assert i8["pass"] and m["latency_us"]["int8"] < m["latency_us"]["fp32"]
    so = on_disk["models"]["second_opinion"]["fp32"]
    assert so["label_agreement_vs_sklearn"] >= 0.99
    gc = on_disk["gate_calibration"]
    assert gc["n_cal"] > 0 and gc["n_test"] > 0 and 0.0 <= gc["test_coverage"] <= 1.0
    assert report["passed"] is True
    # predictor on these synthetic signals is good: held-out metric well above chance
    assert on_disk["models"]["predictor"]["int8"]["heldout_fp32"] > 0.8


def test_manifest_input_shapes_and_gate(cnn_bundle: tuple[Path, Path, dict]) -> None:
    _, out, _ = cnn_bundle
    m = load_bundle(out)
    assert m.models["predictor"].input == "window"
    assert m.models["predictor"].input_shape == [None, 3, 32]
    assert m.models["gate"].input_shape == [None, 9]
    assert m.models["second_opinion"].outputs == ["label", "probabilities"]
    assert m.normalize.window is not None and len(m.normalize.window.mean) == 3
    assert m.gate_calibration.models["predictor"] == m.models["predictor"].file
    with np.load(out / "heldout.npz") as held:
        assert held["x_window"].shape[1:] == (3, 32)
        # realised test coverage in the manifest is what the thresholds do to the stored outputs
        th = m.thresholds
        conf = held["probs"].max(-1)
        tv = 0.5 * np.abs(held["probs"] - held["second_probs"]).sum(-1)
        accepted = (held["score"] <= th.ood_max_score) & (conf >= th.min_confidence) & (tv <= th.max_disagreement)
        assert m.gate_calibration.test_coverage == pytest.approx(accepted.mean())
        if accepted.any():
            err = (held["probs"].argmax(-1) != held["y"])[accepted].mean()
            assert m.gate_calibration.test_error == pytest.approx(err)


NO_TORCH_SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None  # any `import torch` now raises ImportError
    sys.modules["sklearn"] = None
    import json
    from pathlib import Path
    import numpy as np
    import onnxruntime as ort
    from edgekit.manifest import load_bundle

    bundle, pub = Path(sys.argv[1]), (Path(sys.argv[2]) if len(sys.argv) > 2 else None)
    m = load_bundle(bundle, public_key=pub)
    held = np.load(bundle / "heldout.npz")
    norm = m.normalize.features
    x = ((held["x_raw"] - np.asarray(norm.mean, np.float32)) / np.asarray(norm.std, np.float32)).astype(np.float32)
    assert np.allclose(x, held["x_features"], atol=1e-5), "normalisation differs"
    inputs = {"features": held["x_features"], "window": held["x_window"] if "x_window" in held else None}
    expected = {"predictor": ("probs", "probs"), "gate": ("score", "score"),
                "second_opinion": ("probabilities", "second_probs")}
    out = {}
    for role, spec in m.models.items():
        opts = ort.SessionOptions(); opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(bundle / spec.file), opts, providers=["CPUExecutionProvider"])
        name, key = expected[role]
        got = sess.run([name], {spec.input_name: inputs[spec.input]})[0]
        out[role] = float(np.abs(got - held[key]).max())
        assert np.allclose(got, held[key], rtol=1e-5, atol=1e-6), (role, out[role])
    assert sys.modules.get("torch") is None and sys.modules.get("sklearn") is None
    print(json.dumps(out))
""")


@pytest.mark.parametrize("which", ["mlp_bundle", "cnn_bundle"])
def test_fresh_process_without_torch_reproduces_heldout(which: str, request: pytest.FixtureRequest,
                                                        keys: tuple[Path, Path]) -> None:
    _, out, _ = request.getfixturevalue(which)
    args = [sys.executable, "-c", NO_TORCH_SCRIPT, str(out)]
    if which == "mlp_bundle":
        args.append(str(keys[1]))  # signed: verify the signature too
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    diffs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(diffs) == {"predictor", "gate", "second_opinion"}


def test_signed_bundle_fails_after_any_byte_flip(mlp_bundle: tuple[Path, Path, dict], keys: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    _, out, _ = mlp_bundle
    copy = tmp_path / "bundle"
    shutil.copytree(out, copy)
    assert verify_bundle(copy, keys[1]).task == "synthetic-mlp"
    names = _files(copy)
    assert "manifest.sig" in names and len(names) >= 10
    for name in names:
        path = copy / name
        original = path.read_bytes()
        data = bytearray(original)
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(ModelError):
            verify_bundle(copy, keys[1])
        path.write_bytes(original)
    verify_bundle(copy, keys[1])


def test_unsigned_bundle_with_key_fails_clearly(cnn_bundle: tuple[Path, Path, dict], keys: tuple[Path, Path]) -> None:
    _, out, _ = cnn_bundle
    assert not (out / "manifest.sig").exists()
    with pytest.raises(ModelError, match="not signed"):
        load_bundle(out, public_key=keys[1])


def test_parity_failures_are_results(mlp_bundle: tuple[Path, Path, dict], tmp_path: Path) -> None:
    """A failing INT8 keeps fp32 with the reason; a failing fp32 fails the report."""
    from edgekit.exporters.export.export import check_parity, export_onnx, load_run, quantize_models

    run_dir, _, _ = mlp_bundle
    run = load_run(run_dir)
    out = tmp_path / "b"
    out.mkdir()
    exported = export_onnx(run, out)
    quantized = quantize_models(run, out, exported)
    strict_int8 = check_parity(run, out, exported, quantized, criteria={"min_agreement": 1.01})
    for role in ("predictor", "gate"):
        m = strict_int8["models"][role]
        assert m["int8"]["pass"] is False and m["use"]["quantization"] == "fp32"
        assert "fails parity" in m["use"]["reason"] and m["pass"] is True
    assert (out / "predictor.int8.onnx").is_file()  # kept for inspection
    preferred = check_parity(run, out, exported, quantized, criteria={"min_agreement": 1.01}, prefer_int8=True)
    assert {preferred["models"][r]["use"]["quantization"] for r in ("predictor", "gate")} == {"fp32"}  # never unfit
    no_int8 = check_parity(run, out, exported, {})
    assert no_int8["models"]["predictor"]["use"] == {"file": "predictor.fp32.onnx", "quantization": "fp32",
                                                     "reason": "int8 not requested"}
    assert no_int8["models"]["predictor"]["heldout"]["fp32"] > 0.8 and no_int8["passed"] is True
    broken = check_parity(run, out, exported, quantized, criteria={"fp32_atol": -1.0})
    assert broken["passed"] is False and broken["models"]["predictor"]["pass"] is False


def test_bad_inputs_raise_export_error(mlp_bundle: tuple[Path, Path, dict], tmp_path: Path) -> None:
    from edgekit.exporters.export.export import export

    run_dir, out, _ = mlp_bundle
    with pytest.raises(ExportError, match="run.json not found"):
        export(tmp_path / "nope", tmp_path / "o1", progress=False)
    with pytest.raises(ExportError, match="not empty"):
        export(run_dir, out, progress=False)
    with pytest.raises(ExportError, match="signing key not found"):
        export(run_dir, tmp_path / "o2", sign_key=tmp_path / "missing.key", progress=False)
    bad = tmp_path / "badrun"
    shutil.copytree(run_dir, bad)
    meta = json.loads((bad / "run.json").read_text())
    meta["normal_label"] = "ok"
    (bad / "run.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="normal_label"):
        export(bad, tmp_path / "o3", progress=False)
    meta["normal_label"] = "normal"
    del meta["models"]["predictor"]["file"]
    (bad / "run.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="missing key 'models.predictor.file'"):
        export(bad, tmp_path / "o4", progress=False)
    del meta["models"]
    (bad / "run.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match=r"run.json:models: missing key 'models'"):
        export(bad, tmp_path / "o5", progress=False)


ROOT = Path(__file__).resolve().parent.parent


def _train_and_export(recipe: Path, tmp_path: Path) -> tuple[Path, dict]:
    from edgekit.exporters.export.export import export
    from edgekit.exporters.training.train import train

    run = train(recipe, tmp_path / "run", epochs=5, progress=False)
    out = tmp_path / "bundle"
    return out, export(run, out, int8=True, progress=False)


def test_train_then_export_tug_seed(tmp_path: Path) -> None:
    """The real training contract end to end: 23 rows with holes, imputation carried into the manifest."""
    out, report = _train_and_export(ROOT / "edgekit" / "recipes" / "tug_seed.toml", tmp_path)
    m = load_bundle(out)
    assert m.task == "tug_seed" and m.input.kind == "table" and m.input.imputation is not None
    assert report["passed"] is True
    # 6 calibration cases cannot certify any error rate: the gate defers everything, and says so
    assert m.thresholds.defer_all is True and m.gate_calibration.valid is False
    assert m.thresholds.min_confidence > 1.0 and m.gate_calibration.test_coverage == 0.0


@pytest.mark.data
def test_train_then_export_fall_screening(tmp_path: Path, data_dir: Path) -> None:
    out, report = _train_and_export(ROOT / "edgekit" / "recipes" / "fall_screening.toml", tmp_path)
    m = load_bundle(out)
    assert m.task == "fall_screening" and report["models"]["second_opinion"]["pass"]
    assert m.models["predictor"].input_shape == [None, 9]
    with np.load(out / "heldout.npz") as held:
        assert held["x_features"].shape == (m.gate_calibration.n_test, 9)


@pytest.mark.data
@pytest.mark.slow
def test_skab_mlp_with_steep_hinges_quantizes_within_parity(tmp_path: Path, data_dir: Path) -> None:
    """The shipped SKAB recipe's MLP keeps first-layer hinges of slope ~300 per normalised unit (train.py
    init_hinges). Quantized as before (every layer INT8, one grid per tensor) it agreed with fp32 on 65 % of
    held-out decisions; now its hidden ranges are equalized (the same fp32 function), full INT8 still fails
    parity on the calibration split, and the plan that keeps the input layer float passes on the test split
    within the unchanged criteria."""
    from onnx import numpy_helper

    from edgekit.exporters.export import parity as parity_mod
    from edgekit.exporters.export.export import check_parity, export_onnx, load_run, quantize_models
    from edgekit.exporters.export.quantize import calibration_sample, equalize_ranges
    from edgekit.exporters.training.train import train

    run = load_run(train(ROOT / "edgekit" / "recipes" / "skab.toml", tmp_path / "run", progress=False))
    out = tmp_path / "bundle"
    out.mkdir()
    exported = export_onnx(run, out)
    fp32 = onnx.load(str(out / "predictor.fp32.onnx"))
    first = numpy_helper.to_array(next(i for i in fp32.graph.initializer if i.name == "body.0.weight"))
    assert np.abs(first).max() > 100  # the steep hinges this test is about are there

    equalized = onnx.load(str(out / "predictor.fp32.onnx"))
    assert equalize_ranges(equalized, calibration_sample(run.x("predictor", "train"))) > 0
    onnx.save(equalized, str(tmp_path / "equalized.onnx"))
    x = run.x("predictor", "test")
    same = parity_mod.run_model(tmp_path / "equalized.onnx", x)["probs"]
    assert np.abs(same - parity_mod.run_model(out / "predictor.fp32.onnx", x)["probs"]).max() < 1e-4

    quantized = quantize_models(run, out, exported)
    plans = quantized["predictor"]["plans"]
    assert [p["plan"] for p in plans] == ["all_int8", "input_float"] and plans[0]["cal_pass"] is False
    assert quantized["predictor"]["plan"] == "input_float" and quantized["predictor"]["float_nodes"]
    report = check_parity(run, out, exported, quantized)
    int8 = report["models"]["predictor"]["int8"]
    assert report["criteria"]["min_agreement"] == 0.98 and report["criteria"]["max_metric_drop"] == 0.01
    assert int8["pass"] is True, int8["fail_reasons"]
    assert int8["decision_agreement"] >= 0.98 and int8["metric_drop"] <= 0.01
    assert report["models"]["gate"]["int8"]["pass"] is True
    # --prefer-int8: every role whose INT8 passes runs it, faster on this machine or not (the device is not it)
    preferred = check_parity(run, out, exported, quantized, prefer_int8=True)["models"]
    for role in ("predictor", "gate"):
        assert preferred[role]["use"]["file"] == f"{'predictor' if role == 'predictor' else 'autoencoder'}.int8.onnx"
        assert preferred[role]["use"]["reason"].startswith("int8 passes parity; preferred (--prefer-int8)")


def test_spectral_cnn_bundle_runs_in_the_agent_pipeline(spectral_cnn_bundle: tuple[Path, Path, dict]) -> None:
    """issue 12: the raw-window CNN for any channel count, and the agent computes exactly the features training
    did: the bundle carries the extractor's params, the agent's EdgePipeline (onnxruntime, the used INT8/fp32
    files) turns the raw test windows into the run's very features (bit for bit) and the held-out outputs."""
    from edgekit.gate import Gate
    from edgekit.pipeline import EdgePipeline
    from edgekit.runtime import ModelSet, Preprocess
    from edgekit.values import Window

    run, out, report = spectral_cnn_bundle
    assert report["passed"] is True
    m = load_bundle(out)
    channels, width = len(m.input.channels or []), m.input.window_size
    assert m.input.extractor == "spectral" and m.input.feature_params is not None
    assert m.input.feature_params.model_dump(mode="json", exclude_defaults=True) == SPECTRAL
    assert m.input.feature_names[:4] == [f"{m.input.channels[0]}.{s}" for s in ("mean", "std", "rms", "kurtosis")]
    # per channel: 4 time statistics, 4 bands, 4 spectral statistics (the default), 1 envelope band
    assert m.input.feature_names[5] == ("c0.band_2_4Hz" if channels == 8 else "ax.band_2_4Hz")
    assert m.input.feature_names[12].endswith(".env_band_0.9_3Hz")
    assert m.models["predictor"].input_shape == [None, channels, width]
    assert m.models["gate"].input_shape == [None, channels * 13]
    windows, rows = raw_windows(run)
    test = windows[rows["test"]]
    models = ModelSet(out, m, ["CPUExecutionProvider"], 1)
    pipeline = EdgePipeline(m, models, Preprocess.from_manifest(m), Gate.from_thresholds(m.thresholds.model_dump()))
    batch = pipeline.run([Window(seq=i, start_s=float(i), end_s=float(i + 1), data=w) for i, w in enumerate(test)])
    one = [pipeline.run([Window(seq=i, start_s=0.0, end_s=1.0, data=w)])[0] for i, w in enumerate(test[:20])]
    with np.load(run / "splits.npz") as splits, np.load(out / "heldout.npz") as held:
        trained = splits["test_features_raw"]
        assert np.array_equal(np.stack([j.features for j in batch]), trained)  # the same bits as training
        assert np.array_equal(np.stack([j.features for j in one]), trained[:20])
        probs = np.stack([j.probs for j in batch])
        # The pipeline normalises in float32, training in float64: an INT8 step may differ on a few rows.
        if m.models["predictor"].quantization == "fp32":
            assert np.allclose(probs, held["probs"], atol=1e-5)
        else:
            assert (probs.argmax(1) == held["probs"].argmax(1)).mean() > 0.97
    assert [j.decision.action for j in one] == [j.decision.action for j in batch[:20]]


SPECTRAL_RECIPE = """\
[features]
extractor = "spectral"

[features.params]
time = ["std", "rms", "kurtosis", "crest"]
bands_hz = [[0, 100], [100, 200], [200, 500]]

[features.params.envelope]
carrier_hz = [100, 500]
bands_hz = [[25, 37], [37, 60]]
"""


def test_a_spectral_recipe_trains_exports_and_the_agent_computes_its_features(tmp_path: Path) -> None:
    """issue 12: a recipe with the spectral extractor's params (bands at 1 kHz, an envelope around the
    generated fault's 31 Hz impacts) on generated recordings trains, exports, and the agent's pipeline turns
    the recordings' windows into exactly the features training computed."""
    from recordingfactory import CHANNELS, vibration_recordings, write_recipe

    from edgekit.exporters.training.tasks import load_task
    from edgekit.features import feature_names
    from edgekit.gate import Gate
    from edgekit.pipeline import EdgePipeline
    from edgekit.recipe import load_recipe
    from edgekit.runtime import ModelSet, Preprocess
    from edgekit.values import Window

    vibration_recordings(tmp_path / "recordings", machines=4, runs=2, seconds=4.0)
    path = write_recipe(tmp_path, epochs=3)
    text = path.read_text()
    assert '[features]\nextractor = "machine"\n' in text
    path.write_text(text.replace('[features]\nextractor = "machine"\n', SPECTRAL_RECIPE))
    recipe = load_recipe(path)
    out, report = _train_and_export(path, tmp_path)
    assert report["passed"] is True
    m = load_bundle(out)
    assert m.input.extractor == "spectral" and m.input.feature_params == recipe.features.params
    assert m.input.feature_names == feature_names("spectral", list(CHANNELS), recipe.features.params)
    assert "vib_x.env_band_25_37Hz" in m.input.feature_names
    data = load_task(recipe, path.parent)
    assert data.windows is not None
    pipeline = EdgePipeline(m, ModelSet(out, m, ["CPUExecutionProvider"], 1), Preprocess.from_manifest(m),
                            Gate.from_thresholds(m.thresholds.model_dump()))
    judged = pipeline.run([Window(seq=i, start_s=0.0, end_s=1.0, data=w) for i, w in enumerate(data.windows)])
    assert all(j.implausible is None for j in judged)
    assert np.array_equal(np.stack([j.features for j in judged]).astype(np.float64), data.features)


def test_gate_model_gives_its_errors_and_the_bundle_an_envelope(mlp_bundle: tuple[Path, Path, dict]) -> None:
    """The autoencoder's file also outputs its per-feature squared errors (an ood deferral's attribution),
    whose mean is the score bit for bit what it was; the bundle's envelope has the feature ranges (and no
    channel checks: this run, like one trained before issue 14, has no window extremes)."""
    import onnxruntime as ort

    _, out, report = mlp_bundle
    m = load_bundle(out)
    assert m.models["gate"].outputs == ["score", "errors"] and report["models"]["gate"]["pass"]
    with np.load(out / "heldout.npz") as held:
        x, score = held["x_features"], held["score"]
    for file in {m.models["gate"].file, m.models["gate"].fp32_file}:
        got_score, errors = ort.InferenceSession(str(out / file)).run(["score", "errors"], {"x": x})
        assert errors.shape == x.shape and np.allclose(errors.mean(axis=-1), got_score, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(ort.InferenceSession(str(out / m.models["gate"].file)).run(["score"], {"x": x})[0],
                                  score)
    env = m.input.envelope
    assert env is not None and env.channels is None and env.features is not None
    assert len(env.features.low) == len(m.input.feature_names)
