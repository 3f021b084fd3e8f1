"""`edgekit verify --heldout`: the bundle's models rerun on heldout.npz's inputs give export's answers on this
machine (what scripts/arm64-check runs inside an arm64 root); a difference is one line naming heldout.npz."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgekit.errors import ModelError
from edgekit.heldout import check_heldout
from edgekit.manifest import keygen, read_manifest, sign_bundle

pytestmark = pytest.mark.torch  # the stream bundle is trained in the session (seconds)


def test_verify_heldout_reproduces_exports_answers(stream_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(stream_bundle, bundle)
    private, public = keygen(tmp_path / "keys")
    sign_bundle(bundle, private)
    out = subprocess.run([sys.executable, "-m", "edgekit", "verify", str(bundle), "--pub", str(public), "--heldout"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = len(np.load(bundle / "heldout.npz")["probs"])
    assert f"labels agree on {rows}/{rows} rows" in out.stdout and "predictor 0" in out.stdout


def test_answers_that_differ_are_one_error_naming_heldout(stream_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(stream_bundle, bundle)
    with np.load(bundle / "heldout.npz") as npz:
        held = {k: npz[k] for k in npz.files}
    held["score"] = held["score"] + 0.01  # as if this machine's gate model answered otherwise
    np.savez_compressed(bundle / "heldout.npz", **held)
    with pytest.raises(ModelError, match=r"largest difference 0.01 \(gate; allowed 0.0001\)") as info:
        check_heldout(bundle, read_manifest(bundle))
    assert info.value.where == str(bundle / "heldout.npz")
