"""onnxruntime sessions for a bundle's models, and the preprocessing the manifest prescribes.

Session options come from the device profile (providers in preference order, intra-op threads: 1 for
single-window inference, see FIELD-NOTES). Imports onnxruntime and numpy only; never torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import ModelError

log = logging.getLogger(__name__)

ROLES = ("predictor", "gate", "second_opinion")


def session_options(intra_op_threads: int = 1, inter_op_threads: int = 1) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = inter_op_threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning threads burn the second core for nothing on single-window inference (FIELD-NOTES).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def open_session(path: Path, providers: list[str], intra_op_threads: int = 1) -> Any:
    import onnxruntime as ort

    if not path.is_file():
        raise ModelError("model file not found", where=str(path), hint="re-run `edgekit export`")
    try:
        return ort.InferenceSession(str(path), sess_options=session_options(intra_op_threads),
                                    providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ModelError(f"onnxruntime cannot load it: {exc}", where=str(path)) from None


@dataclass(frozen=True)
class Preprocess:
    """Normalisation statistics from the manifest, as float32 arrays."""

    feature_mean: np.ndarray
    feature_std: np.ndarray
    window_mean: np.ndarray | None
    window_std: np.ndarray | None

    @classmethod
    def from_manifest(cls, manifest: Any) -> "Preprocess":
        norm = manifest.normalize
        win = norm.window
        return cls(
            np.asarray(norm.features.mean, dtype=np.float32),
            np.asarray(norm.features.std, dtype=np.float32),
            None if win is None else np.asarray(win.mean, dtype=np.float32)[:, None],
            None if win is None else np.asarray(win.std, dtype=np.float32)[:, None],
        )

    def features(self, raw: np.ndarray) -> np.ndarray:
        """(n, F) raw features -> normalised float32."""
        return ((raw - self.feature_mean) / self.feature_std).astype(np.float32, copy=False)

    def window(self, data: np.ndarray) -> np.ndarray:
        """(size, C) window -> (1, C, size) normalised float32, the CNN's layout."""
        if self.window_mean is None or self.window_std is None:
            raise ModelError("bundle has no window normalisation but a model takes windows",
                             where="manifest.json: normalize.window")
        return ((data.T[None] - self.window_mean) / self.window_std).astype(np.float32)


@dataclass
class Outputs:
    probs: np.ndarray  # (n, K)
    second_probs: np.ndarray | None  # (n, K)
    ood_score: np.ndarray | None  # (n,)


class ModelSet:
    """The bundle's sessions by role. `infer` runs what the manifest lists, nothing else."""

    def __init__(self, bundle_dir: Path, manifest: Any, providers: list[str], intra_op_threads: int = 1) -> None:
        self.manifest = manifest
        self.sessions: dict[str, Any] = {}
        self.inputs: dict[str, str] = {}
        self.input_kind: dict[str, str] = {}
        for role, spec in manifest.models.items():
            if role not in ROLES:
                raise ModelError(f"unknown model role {role!r}; expected one of {ROLES}",
                                 where=f"{bundle_dir / 'manifest.json'}: models")
            self.sessions[role] = open_session(bundle_dir / spec.file, providers, intra_op_threads)
            self.inputs[role] = spec.input_name
            self.input_kind[role] = spec.input
        if "predictor" not in self.sessions:
            raise ModelError("bundle has no predictor", where=f"{bundle_dir / 'manifest.json'}: models")
        self._out = {
            "predictor": ["probs"],
            "gate": ["score"],
            "second_opinion": ["probabilities"],
        }
        log.info("runtime.loaded roles=%s providers=%s threads=%d", ",".join(self.sessions),
                 ",".join(providers), intra_op_threads)

    def infer(self, features: np.ndarray, window: np.ndarray | None) -> Outputs:
        """features: normalised (n, F) float32; window: normalised (n, C, W) float32 or None."""

        def run(role: str) -> np.ndarray | None:
            sess = self.sessions.get(role)
            if sess is None:
                return None
            x = window if self.input_kind[role] == "window" else features
            return sess.run(self._out[role], {self.inputs[role]: x})[0]

        probs = run("predictor")
        assert probs is not None  # predictor presence is checked in __init__
        return Outputs(probs=probs, second_probs=run("second_opinion"), ood_score=run("gate"))
