"""The bundle's held-out predictions, recomputed on this machine: heldout.npz holds the test split's model
inputs and what export's onnxruntime answered; running the bundle's own models on those inputs here proves
that this device's onnxruntime, CPU and numpy give the bundle's answers (an arm64 board, another onnxruntime
build). Used by `edgekit verify --heldout` and scripts/arm64-check. Agent side: never torch, onnx or the hub.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import ModelError
from edgekit.manifest import Manifest

log = logging.getLogger(__name__)

HELDOUT_FILE = "heldout.npz"
# Largest |difference| from export's own outputs taken as the same answer. export's parity test holds the same
# models on the same machine to rtol 1e-5 (tests/test_export.py); another CPU's kernels may round float
# accumulations differently, never by this much on probabilities and min-max scaled scores.
ATOL = 1e-4
# (held-out key, model output, manifest role)
OUTPUTS = (("probs", "probs", "predictor"), ("score", "ood_score", "gate"),
           ("second_probs", "second_probs", "second_opinion"))


def check_heldout(bundle: Path, manifest: Manifest, providers: tuple[str, ...] = ("CPUExecutionProvider",),
                  atol: float = ATOL) -> dict[str, Any]:
    """Run every model of the (already loaded and checked) bundle on heldout.npz's inputs; return rows, the
    largest difference per output, and how many predicted labels agree. ModelError naming heldout.npz when a
    difference exceeds `atol` or a label differs."""
    from edgekit.runtime import ModelSet

    bundle = Path(bundle)
    where = str(bundle / HELDOUT_FILE)
    try:
        with np.load(bundle / HELDOUT_FILE) as npz:
            held = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the held-out set: {exc}", where=where, hint="re-export the bundle") from None
    models = ModelSet(bundle, manifest, list(providers), intra_op_threads=1)
    window = held.get("x_window")
    got = models.infer(held["x_features"].astype(np.float32, copy=False),
                       None if window is None else window.astype(np.float32, copy=False))
    report: dict[str, Any] = {"rows": int(len(held["x_features"])), "atol": atol, "max_abs": {}}
    for key, attr, role in OUTPUTS:
        mine = getattr(got, attr)
        if role not in manifest.models or mine is None or key not in held:
            continue
        want = held[key].reshape(mine.shape)
        report["max_abs"][role] = float(np.max(np.abs(mine - want))) if mine.size else 0.0
    labels = got.probs.argmax(-1)
    report["labels_agree"] = int((labels == held["probs"].argmax(-1)).sum())
    log.info("heldout.checked bundle=%s rows=%d labels_agree=%d max_abs=%s", bundle, report["rows"],
             report["labels_agree"], report["max_abs"])
    worst = max(report["max_abs"].items(), key=lambda kv: kv[1], default=("none", 0.0))
    if worst[1] > atol or report["labels_agree"] != report["rows"]:
        raise ModelError(f"this machine's predictions differ from the bundle's: labels agree on "
                         f"{report['labels_agree']}/{report['rows']} rows, largest difference {worst[1]:.3g} "
                         f"({worst[0]}; allowed {atol:g})", where=where,
                         hint="this onnxruntime or CPU does not reproduce the export; do not deploy it here")
    return report
