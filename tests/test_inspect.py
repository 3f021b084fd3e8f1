"""`edgekit inspect BUNDLE` (issue 12): the facts a person deploying a bundle needs, checked against the
manifest of real exported bundles, in a process that cannot import torch, onnx, scikit-learn or the hub (the
agent-only install). A tampered file, a bad signature or a missing bundle is one line naming the file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgekit.inspection import FEATURES_IN_FULL, WIDTH, feature_summary, input_contract, inspect_bundle, text
from edgekit.manifest import InputSpec, keygen, read_manifest, sign_bundle

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runfactory import make_run  # noqa: E402

pytestmark = pytest.mark.torch  # the bundles are trained here; inspecting them needs no torch

BLOCKED = ("torch", "onnx", "sklearn", "skl2onnx", "fastapi", "sqlalchemy")
AGENT_ONLY = textwrap.dedent(f"""
    import sys
    for name in {BLOCKED!r}:
        sys.modules[name] = None  # importing any of them now raises ImportError, as on the agent-only install
    from edgekit.cli import main
    try:
        main(sys.argv[1:])
    finally:
        leaked = sorted(m for m in sys.modules if m.startswith(("edgekit.exporters", "edgekit.hub",
                                                                "edgekit.datasets")))
        if leaked:
            print("LEAKED", leaked, file=sys.stderr)
""")


def inspect(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", AGENT_ONLY, "inspect", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def ok(*args: object) -> str:
    proc = inspect(*args)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr[-2000:]
    return proc.stdout


def refused(*args: object) -> str:
    """The one line a refused bundle gets (exit 2, nothing on stdout)."""
    proc = inspect(*args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and not proc.stdout and len(lines) == 1, (proc.returncode, proc.stdout, proc.stderr)
    return lines[0]


def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def section(out: str, name: str) -> str:
    """The lines of one section of the text: its first line starts with `name`, the rest are indented."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split(" ", 1)[0] == name)
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith(" ")), len(lines))
    return "\n".join(lines[start:end])


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return keygen(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def signed_bundle(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Path:
    """A small synthetic run (tests/runfactory.py) exported with INT8 and signed by export."""
    pytest.importorskip("torch", reason="training needs the train extra (torch)")
    from edgekit.exporters.export.export import export

    root = tmp_path_factory.mktemp("synthetic")
    run = make_run(root, arch="mlp", n_classes=2, second="random_forest", n=900, epochs=50)
    export(run, root / "bundle", int8=True, sign_key=keys[0], progress=False)
    return root / "bundle"


@pytest.fixture(scope="module")
def table_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """edgekit/recipes/tug_seed.toml (a table of 23 rows that ships with edgekit, with empty cells)."""
    pytest.importorskip("torch", reason="training needs the train extra (torch)")
    from edgekit.exporters.export.export import export
    from edgekit.exporters.training.train import train
    from edgekit.paths import recipe_file

    root = tmp_path_factory.mktemp("tug")
    train(recipe_file("tug_seed"), root / "run", progress=False)
    export(root / "run", root / "bundle", int8=True, progress=False)
    return root / "bundle"


def copy_of(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / bundle.name))


# --- what it says -------------------------------------------------------------------------------


@pytest.mark.data
def test_text_states_the_manifests_facts(skab_bundle: Path) -> None:
    m = manifest_of(skab_bundle)
    out = ok(skab_bundle)
    lines = out.splitlines()
    assert len(lines) <= 50 and max(map(len, lines)) <= WIDTH, out  # one screen

    inp = m["input"]
    rate, size, hop = inp["rate_hz"], inp["window_size"], inp["window_hop"]
    head = section(out, "input")
    assert (f"{len(inp['channels'])} channels at {rate:g} Hz; window {size} samples ({size / rate:g} s), "
            f"hop {hop} samples ({hop / rate:g} s)") in head
    for name, low, high in zip(inp["channels"], inp["plausible"]["low"], inp["plausible"]["high"]):
        row = next(line for line in head.splitlines() if line.strip().startswith(name + "  "))
        assert f"{low:g} .. {high:g}" in row, row
    assert inp["plausible"]["basis"] in head
    for name, unit in inp["units"].items():  # the SKAB recipe's data.units
        row = next(line for line in head.splitlines() if line.strip().startswith(name + "  "))
        assert f" {unit} " in row, row

    features = section(out, "features")
    names = inp["feature_names"]
    assert f"{inp['extractor']} extractor, {len(names)} features" in features
    if len(names) > FEATURES_IN_FULL:
        assert "--features lists them" in features
        assert len(features.splitlines()) <= 4 and names[1] not in features  # summarised, not listed
    else:  # the SKAB recipe's 8 channel means: 'mean of each channel'
        assert "--features lists them" not in features
        assert feature_summary(names, inp["channels"]) in " ".join(features.split())
    if inp.get("baseline"):  # the SKAB recipe's commissioning
        baseline = " ".join(section(out, "baseline").split())
        assert f"from its first {inp['baseline']['windows']} windows" in baseline and "'commissioning'" in baseline

    rec, replay = inp["recording"], section(out, "replay")
    assert f"column names on line {rec['header_line']}, the {len(inp['channels'])} channels by name" in replay
    if rec["time_column"]:
        assert f"time from column '{rec['time_column']}'" in replay

    labels = section(out, "labels")
    assert all(label in labels for label in m["labels"]) and f"{m['normal_label']} (normal)" in labels

    gate, th, cal = section(out, "gate"), m["thresholds"], m["gate_calibration"]
    assert f"target error {100 * cal['target_error']:.1f}% at delta {cal['delta']:g}" in gate
    if th["defer_all"] or not cal["valid"]:
        assert "defers every case" in gate
    else:
        flat = " ".join(gate.split())
        assert f"score > {th['ood_max_score']:g}" in flat and f"confidence < {th['min_confidence']:g}" in flat
        assert f"second opinion > {th['max_disagreement']:g}" in flat
        assert f"expected deferral {100 * (1 - cal['test_coverage']):.1f}%" in gate
        assert f"held-out split, {cal['n_test']} cases" in gate and f"({cal['n_cal']} cases)" in gate
        assert f"{100 * (1 - cal['cal_coverage']):.1f}% deferred" in gate

    models, parity = section(out, "models"), section(out, "parity")
    for role, spec in m["models"].items():
        row = next(line for line in models.splitlines() if role in line.split()[:2])
        assert spec["file"] in row and spec["quantization"] in row, row
        summary = m["parity"]["models"][role]
        if "decision_agreement" in summary:
            assert f"{role}: INT8 agrees with fp32 on {100 * summary['decision_agreement']:.1f}%" in parity
    int8 = sorted(spec["file"] for spec in m["models"].values() if spec["quantization"] == "int8-qdq")
    assert f"INT8 in use: {', '.join(int8) or 'none'}" in parity
    assert f"files      {len(m['files'])} listed, every sha256 matches" in out
    assert lines[-1] == "signature  unsigned"


@pytest.mark.data
def test_features_flag_lists_every_name_in_order(skab_bundle: Path) -> None:
    names = manifest_of(skab_bundle)["input"]["feature_names"]
    listed = [" ".join(line.split()) for line in section(ok(skab_bundle, "--features"), "features").splitlines()[1:]]
    assert listed == [f"{i} {name}" for i, name in enumerate(names)]


@pytest.mark.data
def test_json_is_the_full_report(skab_bundle: Path) -> None:
    m = manifest_of(skab_bundle)
    report = json.loads(ok(skab_bundle, "--json"))
    assert report["schema"] == "edgekit.inspect/1" and report["task"] == m["task"]
    inp = report["input"]
    assert [c["name"] for c in inp["channels"]] == m["input"]["channels"]
    assert [c["plausible_low"] for c in inp["channels"]] == m["input"]["plausible"]["low"]
    assert [c["plausible_high"] for c in inp["channels"]] == m["input"]["plausible"]["high"]
    assert inp["features"]["names"] == m["input"]["feature_names"]
    assert inp["window"]["size_s"] == m["input"]["window_size"] / m["input"]["rate_hz"]
    assert inp["recording"] == m["input"]["recording"]
    assert report["gate"]["thresholds"] == m["thresholds"]
    assert report["gate"]["expected_deferral"] == 1 - m["gate_calibration"]["test_coverage"]
    assert report["gate"]["expected_error"] == m["gate_calibration"]["test_error"]
    assert {r: x["file"] for r, x in report["models"].items()} == {r: x["file"] for r, x in m["models"].items()}
    assert report["files"]["sha256"] == m["files"]
    assert report["signature"] == {"state": "unsigned", "public_key": None}


def test_a_bundle_without_range_or_layout_says_so(signed_bundle: Path) -> None:
    """runfactory's run records no channel range and no recording layout: inspect says what that means."""
    m = manifest_of(signed_bundle)
    out = ok(signed_bundle)
    assert "channels: " + ", ".join(m["input"]["channels"]) in out
    assert "no plausible range in the bundle" in out and "no recording layout in the bundle" in out
    assert all(name in section(out, "features") for name in m["input"]["feature_names"])  # few: all shown


def test_a_table_bundle_has_no_stream_to_describe(table_bundle: Path) -> None:
    m = manifest_of(table_bundle)
    out = ok(table_bundle)
    inp = section(out, "input")
    assert f"table rows: {len(m['input']['feature_names'])} values per case" in inp
    assert all(f"{col} ({n})" in inp for col, n in m["input"]["imputation"]["missing"].items())
    assert "replay" not in [line.split(" ", 1)[0] for line in out.splitlines()]
    assert json.loads(ok(table_bundle, "--json"))["input"]["imputation"] == m["input"]["imputation"]


def test_units_are_shown_when_the_manifest_records_them(signed_bundle: Path) -> None:
    """input.units (issue 12) beside each channel; a bundle without them says so."""
    inp = read_manifest(signed_bundle).input
    channels = inp.channels or []
    assert inp.units is None and "units: not recorded in this bundle" in text(inspect_bundle(signed_bundle))
    units = [f"unit{i}" for i in range(len(channels))]
    report = inspect_bundle(signed_bundle)
    report["input"] = input_contract(InputSpec.model_validate({**inp.model_dump(), "units": dict(zip(channels, units))}))
    assert [c["unit"] for c in report["input"]["channels"]] == units
    out = text(report)
    for name, unit in zip(channels, units):
        assert next(line for line in out.splitlines() if line.split()[0:1] == [name]).split()[1] == unit
    assert "units: not recorded" not in out


def test_feature_summary_groups_channel_stats() -> None:
    channels = ["a", "b", "c"]
    stats = ["mean", "std"]
    names = [f"{c}.{s}" for c in channels for s in stats] + ["mag.mean", "mag.peak_hz"]
    assert feature_summary(names, channels) == "mean, std of each channel; mag: mean, peak_hz"
    assert feature_summary(names[2:], channels) == "mean, std of 2 channels; mag: mean, peak_hz"
    many = [f"f{i}" for i in range(FEATURES_IN_FULL + 3)]
    assert feature_summary(many, []).endswith(", ... (3 more)")


# --- what it refuses ------------------------------------------------------------------------------


@pytest.mark.data
@pytest.mark.parametrize("victim", ["model", "heldout.npz", "parity.json"])
def test_a_tampered_file_is_named(skab_bundle: Path, tmp_path: Path, victim: str) -> None:
    bundle = copy_of(skab_bundle, tmp_path)
    name = manifest_of(bundle)["models"]["predictor"]["file"] if victim == "model" else victim
    data = bytearray((bundle / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / name).write_bytes(bytes(data))
    line = refused(bundle)
    assert line.startswith(f"error: {bundle / name}: sha256 mismatch"), line


def test_a_missing_or_corrupt_bundle_is_one_line(signed_bundle: Path, tmp_path: Path) -> None:
    assert f"{tmp_path / 'nope'}: bundle directory not found" in refused(tmp_path / "nope")

    bundle = copy_of(signed_bundle, tmp_path)
    (bundle / "heldout.npz").unlink()
    assert f"{bundle / 'heldout.npz'}: listed file is missing" in refused(bundle)

    bundle = copy_of(signed_bundle, tmp_path / "2")
    (bundle / "extra.bin").write_bytes(b"x")
    assert "bundle holds files the manifest does not list: ['extra.bin']" in refused(bundle)

    bundle = copy_of(signed_bundle, tmp_path / "3")
    (bundle / "manifest.json").write_text("{ not json")
    assert f"{bundle / 'manifest.json'}: not valid JSON" in refused(bundle)


def test_signature_verified_with_the_right_key(signed_bundle: Path, keys: tuple[Path, Path]) -> None:
    assert ok(signed_bundle).splitlines()[-1] == "signature  signed (manifest.sig), not verified: give --public-key"
    out = ok(signed_bundle, "--public-key", keys[1])
    assert out.splitlines()[-1].startswith(f"signature  signed, verified with {keys[1]}")
    report = json.loads(ok(signed_bundle, "--public-key", keys[1], "--json"))
    assert report["signature"] == {"state": "verified", "public_key": str(keys[1])}


def test_signature_refused_with_a_wrong_key(signed_bundle: Path, tmp_path: Path) -> None:
    _, other = keygen(tmp_path / "other")
    line = refused(signed_bundle, "--public-key", other)
    assert f"{signed_bundle / 'manifest.sig'}: signature does not match manifest.json" in line, line


@pytest.mark.data
def test_a_signed_copy_of_a_real_bundle(skab_bundle: Path, keys: tuple[Path, Path], tmp_path: Path) -> None:
    bundle = copy_of(skab_bundle, tmp_path)
    line = refused(bundle, "--public-key", keys[1])  # unsigned, but a key was given
    assert f"{bundle / 'manifest.sig'}: manifest.sig is missing" in line, line
    sign_bundle(bundle, keys[0])
    assert "signed, verified with" in ok(bundle, "--public-key", keys[1]).splitlines()[-1]
    manifest = bundle / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"task": "', '"task": "x', 1))  # re-signing would be needed
    assert "signature does not match manifest.json" in refused(bundle, "--public-key", keys[1])
