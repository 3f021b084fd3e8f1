"""Manifest schema, sha256 checks and Ed25519 signing on a hand-made bundle (no torch, no onnx)."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edgekit.errors import ModelError
from edgekit.manifest import (
    Manifest,
    bundle_files,
    keygen,
    load_bundle,
    read_manifest,
    sign_bundle,
    verify_bundle,
    write_manifest,
)


def _manifest_dict(files: dict[str, str]) -> dict:
    spec = {"input": "features", "input_name": "x", "input_shape": [None, 3], "dtype": "float32"}
    return {
        "schema": "edgekit.manifest/1", "task": "demo", "created_at": "2026-01-01T00:00:00+00:00",
        "code_version": "test", "edgekit_version": "0.1.0", "data_fingerprint": "ab" * 32,
        "labels": ["normal", "fault"], "normal_label": "normal", "positive_label": "fault",
        "input": {"kind": "table", "extractor": "table", "channels": None, "rate_hz": None,
                  "window_size": None, "window_hop": None, "feature_names": ["a", "b", "c"],
                  "imputation": {"kind": "median", "values": [0.0, 1.0, 2.0]}},
        "normalize": {"features": {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}, "window": None},
        "models": {
            "predictor": {**spec, "file": "predictor.int8.onnx", "fp32_file": "predictor.fp32.onnx",
                          "outputs": ["probs"], "quantization": "int8-qdq", "quantization_reason": "faster"},
            "gate": {**spec, "file": "autoencoder.fp32.onnx", "fp32_file": "autoencoder.fp32.onnx",
                     "outputs": ["score"], "quantization": "fp32", "quantization_reason": "int8 slower"},
        },
        "thresholds": {"ood_max_score": 0.5, "min_confidence": 0.7, "max_disagreement": 0.3},
        "gate_calibration": {"method": "ltt-fixed-sequence-binomial", "target_error": 0.05, "delta": 0.1,
                             "ood_quantile": 0.99, "n_cal": 100, "cal_accepted": 80, "cal_error": 0.01,
                             "cal_coverage": 0.8, "p_value": 0.01, "valid": True, "n_test": 100,
                             "test_accepted": 75, "test_error": 0.02, "test_coverage": 0.75},
        "parity": {"passed": True},
        "files": files,
    }


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    (out / "sub").mkdir(parents=True)
    for name in ("predictor.int8.onnx", "predictor.fp32.onnx", "autoencoder.fp32.onnx", "parity.json"):
        (out / name).write_bytes(name.encode() * 50)
    (out / "sub" / "heldout.npz").write_bytes(b"\x00\x01" * 100)
    write_manifest(out, Manifest.model_validate(_manifest_dict(bundle_files(out))))
    return out


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return keygen(tmp_path / "keys", "test")


def test_manifest_round_trip(bundle: Path) -> None:
    m = load_bundle(bundle)
    assert m.schema_ == "edgekit.manifest/1"
    assert set(m.files) == {"predictor.int8.onnx", "predictor.fp32.onnx", "autoencoder.fp32.onnx",
                            "parity.json", "sub/heldout.npz"}
    assert m.models["predictor"].input_shape == [None, 3]
    assert m.model_path(bundle, "predictor") == bundle / "predictor.int8.onnx"
    assert m.thresholds.defer_all is False
    raw = json.loads((bundle / "manifest.json").read_text())
    assert raw["schema"] == "edgekit.manifest/1" and "schema_" not in raw


def test_unknown_key_and_wrong_schema_are_rejected(bundle: Path) -> None:
    raw = json.loads((bundle / "manifest.json").read_text())
    raw["thresholds"]["min_confidnce"] = 0.5
    (bundle / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="min_confidnce"):
        read_manifest(bundle)
    raw["schema"] = "edgekit.manifest/0"
    (bundle / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="schema must be"):
        read_manifest(bundle)


def test_keygen_modes_and_no_overwrite(keys: tuple[Path, Path]) -> None:
    private, public = keys
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in private.read_bytes() and b"BEGIN PUBLIC KEY" in public.read_bytes()
    with pytest.raises(ModelError, match="refusing to overwrite"):
        keygen(private.parent, "test")


def test_sign_and_verify(bundle: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    sig = sign_bundle(bundle, private)
    assert sig == bundle / "manifest.sig"
    assert verify_bundle(bundle, public).task == "demo"


def test_flipping_one_byte_of_any_file_fails(bundle: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    sign_bundle(bundle, private)
    names = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    assert "manifest.json" in names and "manifest.sig" in names and "sub/heldout.npz" in names
    for name in names:
        path = bundle / name
        original = path.read_bytes()
        data = bytearray(original)
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(ModelError) as info:
            verify_bundle(bundle, public)
        if name not in ("manifest.json", "manifest.sig"):
            assert name in str(info.value) and "sha256 mismatch" in str(info.value)
        path.write_bytes(original)
        verify_bundle(bundle, public)  # restored: passes again


def test_tampered_manifest_fails_signature(bundle: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    sign_bundle(bundle, private)
    raw = json.loads((bundle / "manifest.json").read_text())
    raw["thresholds"]["min_confidence"] = 0.0  # accept everything, hashes untouched
    (bundle / "manifest.json").write_text(json.dumps(raw, indent=2))
    load_bundle(bundle)  # without a key only hashes are checked, and they still match
    with pytest.raises(ModelError, match="signature does not match"):
        verify_bundle(bundle, public)


def test_wrong_key_fails(bundle: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    sign_bundle(bundle, keys[0])
    _, other_public = keygen(tmp_path / "other")
    with pytest.raises(ModelError, match="signature does not match"):
        verify_bundle(bundle, other_public)


def test_missing_signature_with_key_is_clear(bundle: Path, keys: tuple[Path, Path]) -> None:
    with pytest.raises(ModelError, match="manifest.sig is missing: the bundle is not signed") as info:
        load_bundle(bundle, public_key=keys[1])
    assert info.value.hint and "sign" in info.value.hint


def test_missing_and_unlisted_files(bundle: Path) -> None:
    (bundle / "extra.onnx").write_bytes(b"x")
    with pytest.raises(ModelError, match="extra.onnx"):
        load_bundle(bundle)
    (bundle / "extra.onnx").unlink()
    (bundle / "predictor.fp32.onnx").unlink()
    with pytest.raises(ModelError, match="listed file is missing") as info:
        load_bundle(bundle)
    assert info.value.where.endswith("predictor.fp32.onnx")


def test_model_file_must_be_listed(tmp_path: Path) -> None:
    out = tmp_path / "b"
    out.mkdir()
    (out / "predictor.fp32.onnx").write_bytes(b"p")
    (out / "autoencoder.fp32.onnx").write_bytes(b"a")
    write_manifest(out, Manifest.model_validate(_manifest_dict(bundle_files(out))))  # no predictor.int8.onnx
    with pytest.raises(ModelError, match="predictor.int8.onnx"):
        load_bundle(out)


def test_bad_key_files(bundle: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    with pytest.raises(ModelError, match="not an unencrypted PEM private key"):
        sign_bundle(bundle, junk)
    with pytest.raises(ModelError, match="not a PEM public key"):
        verify_bundle(bundle, junk)
    with pytest.raises(ModelError, match="public key file not found"):
        verify_bundle(bundle, tmp_path / "nope.pub")
    with pytest.raises(ModelError, match="bundle directory not found"):
        load_bundle(tmp_path / "nope")


def test_manifest_module_imports_no_torch_or_onnx() -> None:
    code = ("import sys; import edgekit.manifest; "
            "bad = [m for m in ('torch', 'onnx', 'onnxruntime', 'sklearn') if m in sys.modules]; "
            "assert not bad, bad; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_every_byte_of_the_signature_file_matters(bundle: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    sig = sign_bundle(bundle, private)
    original = sig.read_bytes()
    for i in range(len(original)):
        for bit in (0x01, 0x20):
            data = bytearray(original)
            data[i] ^= bit
            sig.write_bytes(bytes(data))
            with pytest.raises(ModelError):
                verify_bundle(bundle, public)
    sig.write_bytes(original)
    verify_bundle(bundle, public)


SPECTRAL_INPUT = {"kind": "window", "extractor": "spectral", "channels": ["Accel_X", "Accel_Y"], "rate_hz": 1000.0,
                  "window_size": 500, "window_hop": 250,
                  "feature_params": {"time": ["rms"], "bands_hz": [[10, 100], [100, 500]], "spectral": [],
                                     "envelope": {"carrier_hz": [200, 400], "bands_hz": [[5, 15]]}},
                  "feature_names": [f"{ch}.{f}" for ch in ("Accel_X", "Accel_Y")
                                    for f in ("rms", "band_10_100Hz", "band_100_500Hz", "env_band_5_15Hz")]}


def _with_input(tmp_path: Path, inp: dict) -> Path:
    out = tmp_path / "spectral"
    out.mkdir()
    data = _manifest_dict({})
    data["input"] = inp
    data["normalize"]["features"] = {"mean": [0.0] * len(inp["feature_names"]),
                                     "std": [1.0] * len(inp["feature_names"])}
    (out / "manifest.json").write_text(json.dumps(data))
    return out


def test_feature_params_round_trip_and_stay_out_of_bundles_without_them(bundle: Path, tmp_path: Path) -> None:
    """An extractor's parameters travel in input.feature_params; a bundle without them (every bundle written
    before they existed) has no such key and reads as before."""
    assert "feature_params" not in json.loads((bundle / "manifest.json").read_text())["input"]
    assert read_manifest(bundle).input.feature_params is None
    m = read_manifest(_with_input(tmp_path, SPECTRAL_INPUT))
    params = m.input.feature_params
    assert params is not None and params.bands_hz == ((10.0, 100.0), (100.0, 500.0))
    assert params.envelope is not None and params.envelope.carrier_hz == (200.0, 400.0)
    again = tmp_path / "again"
    again.mkdir()
    write_manifest(again, m)
    assert read_manifest(again) == m
    assert json.loads((again / "manifest.json").read_text())["input"]["feature_params"]["bands_hz"][1] == [100.0, 500.0]


@pytest.mark.parametrize("change,message", [
    ({"extractor": "machine"}, "feature_params: extractor 'machine' takes none"),
    ({"rate_hz": 800.0}, r"bands_hz\[1\]: band \[100, 500\] Hz reaches above Nyquist \(400 Hz at rate_hz 800\)"),
    ({"window_size": 50}, r"envelope.bands_hz\[0\]: band \[5, 15\] Hz holds no FFT bin"),
    ({"channels": ["Accel_X"]}, "feature_names do not follow feature_params"),
])
def test_feature_params_that_do_not_fit_the_input_are_refused(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        read_manifest(_with_input(tmp_path, {**SPECTRAL_INPUT, **change}))


WINDOW_INPUT = {"kind": "window", "extractor": "machine", "channels": ["p", "q"], "rate_hz": 1.0, "window_size": 8,
                "window_hop": 4, "feature_names": ["p.mean", "q.mean"],
                "envelope": {"channels": {"low": [0.0, 1.0], "high": [1.0, 2.0], "stuck_below": [0.01, 0.0]},
                             "features": {"low": [0.0, 1.0], "high": [1.0, 2.0]}, "basis": "test"}}


def test_envelope_round_trips_and_stays_out_of_bundles_without_it(bundle: Path, tmp_path: Path) -> None:
    assert "envelope" not in json.loads((bundle / "manifest.json").read_text())["input"]
    assert read_manifest(bundle).input.envelope is None
    m = read_manifest(_with_input(tmp_path, WINDOW_INPUT))
    env = m.input.envelope
    assert env is not None and env.channels is not None and env.channels.stuck_below == [0.01, 0.0]
    again = tmp_path / "again"
    again.mkdir()
    write_manifest(again, m)
    assert read_manifest(again) == m


@pytest.mark.parametrize("part,change,message", [
    ("channels", {"low": [0.0]}, r"envelope.channels needs one value per entry \(2\), got 1"),
    ("features", {"high": [1.0, 2.0, 3.0]}, r"envelope.features needs one value per entry \(2\), got 3"),
    ("channels", {"low": [0.0, 3.0]}, "envelope.channels: every bound must be finite with low <= high"),
    ("channels", {"stuck_below": [0.0, -1.0]}, "stuck_below must be finite and >= 0"),
])
def test_an_envelope_that_does_not_fit_the_input_is_refused(tmp_path: Path, part: str, change: dict,
                                                            message: str) -> None:
    env = WINDOW_INPUT["envelope"]
    inp = {**WINDOW_INPUT, "envelope": {**env, part: {**env[part], **change}}}
    with pytest.raises(ModelError, match=message):
        read_manifest(_with_input(tmp_path, inp))
