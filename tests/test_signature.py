"""Signatures enforced (issue 16): `edgekit run` starts only on a bundle whose manifest.sig verifies under the
configured public key, or, without a key, when allow_unsigned says so by name, and the status reports which.
Each refusal is one line naming the file (or the key) and exit 2. Real bundles, real `edgekit run`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from streamfactory import recording, write_csv
from test_transport import Subscriber, wait_for

from edgekit.manifest import MANIFEST_FILE, SIGNATURE_FILE, keygen, read_manifest, sign_bundle

pytestmark = pytest.mark.torch  # the stream bundle is trained in the session (seconds)


@pytest.fixture(scope="module")
def signed(stream_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A signed copy of the session's stream bundle, its public key, another key pair's public key and a
    recording to replay."""
    root = tmp_path_factory.mktemp("signed")
    bundle = root / "bundle"
    shutil.copytree(stream_bundle, bundle)
    private, public = keygen(root / "keys")
    sign_bundle(bundle, private)
    _, other = keygen(root / "other")
    write_csv(root / "rec.csv", recording(1000.0, 1.0))
    return {"bundle": bundle, "pub": public, "other": other, "recording": root / "rec.csv"}


def run(bundle: Path, rec: Path, outbox: Path, *flags: str, broker: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgekit", "run", "--bundle", str(bundle), "--source",
                           f"replay:{rec}", "--speed", "0", "--broker", broker, "--outbox", str(outbox),
                           "--device-id", "dev-sig", "--site", "test", "--drain-timeout", "10", *flags],
                          capture_output=True, text=True, timeout=120, env={**os.environ})


def one_error_line(out: subprocess.CompletedProcess[str]) -> str:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (out.returncode, out.stderr)
    return lines[0]


def copy(bundle: Path, to: Path) -> Path:
    shutil.copytree(bundle, to)
    return to


def test_a_signed_bundle_runs_under_its_key(signed: dict[str, Path], tmp_path: Path) -> None:
    out = run(signed["bundle"], signed["recording"], tmp_path / "o.db", "--public-key", str(signed["pub"]))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "windows=" in out.stdout


def test_without_a_key_the_agent_refuses_unless_allow_unsigned_is_given(signed: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    line = one_error_line(run(signed["bundle"], signed["recording"], tmp_path / "o.db"))
    assert "command line: public_key: " in line and "--allow-unsigned" in line and "--public-key" in line
    # the same in a config file, and check-config says so before anything runs
    cfg = tmp_path / "agent.toml"
    source = f'[source]\nkind = "replay"\npath = "{signed["recording"]}"\n'
    cfg.write_text(f'bundle = "{signed["bundle"]}"\n{source}')
    check = subprocess.run([sys.executable, "-m", "edgekit", "check-config", str(cfg)], capture_output=True,
                           text=True)
    assert f"{cfg}: public_key: " in one_error_line(check)
    cfg.write_text(f'bundle = "{signed["bundle"]}"\npublic_key = "{signed["pub"]}"\nallow_unsigned = true\n{source}')
    check = subprocess.run([sys.executable, "-m", "edgekit", "check-config", str(cfg)], capture_output=True,
                           text=True)
    assert "contradicts" in one_error_line(check)


def _tamper_model(bundle: Path) -> Path:
    path = bundle / read_manifest(bundle).models["predictor"].file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return path


def _tamper_manifest(bundle: Path) -> Path:
    path = bundle / MANIFEST_FILE
    obj = json.loads(path.read_text())
    obj["thresholds"]["min_confidence"] = 0.0  # accept everything: what an attacker would want
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return bundle / SIGNATURE_FILE


def _unsign(bundle: Path) -> Path:
    (bundle / SIGNATURE_FILE).unlink()
    return bundle / SIGNATURE_FILE


@pytest.mark.parametrize("case, tamper, words", [
    ("unsigned", _unsign, "manifest.sig is missing"),
    ("model byte", _tamper_model, "sha256 mismatch"),
    ("manifest field", _tamper_manifest, "signature does not match manifest.json"),
])
def test_a_key_refuses_an_unsigned_or_tampered_bundle_in_one_line_naming_the_file(
        signed: dict[str, Path], tmp_path: Path, case: str, tamper, words: str) -> None:
    bundle = copy(signed["bundle"], tmp_path / "bundle")
    named = tamper(bundle)
    line = one_error_line(run(bundle, signed["recording"], tmp_path / "o.db", "--public-key", str(signed["pub"])))
    assert str(named) in line and words in line, line


def test_another_key_refuses_the_bundle(signed: dict[str, Path], tmp_path: Path) -> None:
    line = one_error_line(run(signed["bundle"], signed["recording"], tmp_path / "o.db",
                              "--public-key", str(signed["other"])))
    assert str(signed["bundle"] / SIGNATURE_FILE) in line and f"under {signed['other']}" in line, line


def test_allow_unsigned_still_refuses_a_changed_model_file(signed: dict[str, Path], tmp_path: Path) -> None:
    """Without a key the sha256 of every file is still checked: only a manifest rewritten with it goes unseen."""
    bundle = copy(signed["bundle"], tmp_path / "bundle")
    named = _tamper_model(bundle)
    line = one_error_line(run(bundle, signed["recording"], tmp_path / "o.db", "--allow-unsigned"))
    assert str(named) in line and "sha256 mismatch" in line


@pytest.mark.broker
def test_the_status_says_whether_the_signature_was_checked(signed: dict[str, Path], tmp_path: Path,
                                                          mosquitto) -> None:
    unsigned = copy(signed["bundle"], tmp_path / "unsigned")
    _unsign(unsigned)
    hub = Subscriber(mosquitto.port)
    try:
        for n, (bundle, flags, want) in enumerate(((unsigned, ("--allow-unsigned",), "unchecked"),
                                                   (signed["bundle"], ("--public-key", str(signed["pub"])),
                                                    "verified"))):
            out = run(bundle, signed["recording"], tmp_path / f"o{n}.db", *flags, broker=mosquitto.url)
            assert out.returncode == 0, out.stderr[-2000:]
            assert ("agent.unsigned" in out.stderr) == (want == "unchecked"), out.stderr[-2000:]
            wait_for(lambda: sum(s["state"] == "online" for s in hub.status) == n + 1, 10,  # noqa: B023
                     "the agent's online status")
            online = [s for s in hub.status if s["state"] == "online"][-1]
            assert online["signature"] == want
    finally:
        hub.close()
