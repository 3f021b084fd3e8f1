"""onnxruntime sessions for a bundle's models, and the preprocessing the manifest prescribes.

Session options come from the device profile (providers in preference order, intra-op threads: 1 for
single-window inference, see FIELD-NOTES). Imports onnxruntime and numpy only; never torch.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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
        out = raw - self.feature_mean
        out /= self.feature_std
        return out.astype(np.float32, copy=False)

    def window(self, data: np.ndarray) -> np.ndarray:
        """(size, C) window -> (1, C, size) normalised float32 (C-contiguous), the CNN's layout."""
        if self.window_mean is None or self.window_std is None:
            raise ModelError("bundle has no window normalisation but a model takes windows",
                             where="manifest.json: normalize.window")
        # (x - mean) / std elementwise in the window's own layout (the same numbers as on the transposed
        # view), rounded to float32 once while being written in the model's (C, size) layout.
        norm = data - self.window_mean.T
        norm /= self.window_std.T
        out = np.empty((1, data.shape[1], data.shape[0]), dtype=np.float32)
        np.copyto(out[0], norm.T, casting="same_kind")
        return out


@dataclass
class Outputs:
    probs: np.ndarray  # (n, K)
    second_probs: np.ndarray | None  # (n, K)
    ood_score: np.ndarray | None  # (n,)


class _Bound:
    """One session's single-window run through IO binding: input and output stay in buffers bound once,
    so a run skips building an input tensor and allocating the output: a tiny model's run took ~10-13 us
    instead of 13-35 us through `session.run` here (bench/latency.py's 8-channel MLP bundle). Batches, whose shapes vary, use
    `session.run`."""

    def __init__(self, sess: Any, input_name: str, output_name: str, inp: np.ndarray) -> None:
        meta = {o.name: o for o in sess.get_outputs()}[output_name]
        dims = list(meta.shape)
        if meta.type != "tensor(float)" or not dims or not all(isinstance(d, int) for d in dims[1:]):
            raise ValueError(f"output {output_name!r} is {meta.type} {dims}, not float32 (batch, fixed...)")
        self.out = np.empty([1, *dims[1:]], dtype=np.float32)
        self.inp = inp  # the binding points into this array's memory: keep it alive
        self.binding = sess.io_binding()
        self.binding.bind_cpu_input(input_name, inp)
        self.binding.bind_output(output_name, "cpu", 0, np.float32, list(self.out.shape), self.out.ctypes.data)
        self.run = functools.partial(sess.run_with_iobinding, self.binding)
        # The bound run must give what session.run gives (shape metadata can lie): checked once, here.
        self.run()
        want = sess.run([output_name], {input_name: inp})[0]
        if want.shape != self.out.shape or not np.array_equal(want, self.out, equal_nan=True):
            raise ValueError(f"bound run of {output_name!r} gave {self.out.shape}, session.run {want.shape}")


class ModelSet:
    """The bundle's sessions by role. `infer` runs what the manifest lists, nothing else.

    One inference thread per ModelSet: single-window calls share preallocated input and output buffers.
    """

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
        # Single-window buffers, one per input kind, shaped by the manifest (None: batch axis).
        self._single_in: dict[str, np.ndarray] = {}
        self._bound: dict[str, _Bound] = {}
        for role, spec in manifest.models.items():
            shape = [1, *spec.input_shape[1:]]
            kind = self.input_kind[role]
            if not all(isinstance(d, int) and d > 0 for d in shape):
                continue
            buf = self._single_in.setdefault(kind, np.zeros(shape, dtype=np.float32))
            if list(buf.shape) != shape:
                continue
            try:
                self._bound[role] = _Bound(self.sessions[role], self.inputs[role], self._out[role][0], buf)
            except Exception as exc:  # an output we cannot preallocate: that role uses session.run
                log.warning("runtime.no_io_binding role=%s reason=%s", role, exc)
        log.info("runtime.loaded roles=%s providers=%s threads=%d io_binding=%s", ",".join(self.sessions),
                 ",".join(providers), intra_op_threads, ",".join(self._bound) or "none")

    def floor_runs(self, features: np.ndarray, window: np.ndarray | None) -> Callable[[], None]:
        """The bare session runs `infer` makes for one window, on these inputs bound once: the onnxruntime
        floor `edgekit bench` compares the edge path with (no input copy, no output copy, no Python around)."""
        if not self._single(features, window):
            runs = [functools.partial(sess.run, self._out[role],
                                      {self.inputs[role]: window if self.input_kind[role] == "window" else features})
                    for role, sess in self.sessions.items()]
        else:
            inputs = {"features": features, "window": window}
            runs = [_Bound(self.sessions[role], self.inputs[role], self._out[role][0],
                           inputs[self.input_kind[role]]).run for role in self._bound]

        def floor() -> None:
            for run in runs:
                run()

        return floor

    def _run(self, role: str, features: np.ndarray, window: np.ndarray | None) -> np.ndarray | None:
        sess = self.sessions.get(role)
        if sess is None:
            return None
        x = window if self.input_kind[role] == "window" else features
        return sess.run(self._out[role], {self.inputs[role]: x})[0]

    def _single(self, features: np.ndarray, window: np.ndarray | None) -> bool:
        """Whether this call can take the bound single-window path (one window, float32, every role bound)."""
        if len(self._bound) != len(self.sessions):
            return False
        for kind, buf in self._single_in.items():
            x = features if kind == "features" else window
            if x is None or x.shape != buf.shape or x.dtype != np.float32:
                return False
        return True

    @property
    def has_errors(self) -> bool:
        """Whether the gate model also gives its per-feature squared errors (output `errors`, bundles
        exported since issue 14): what an `ood` deferral's attribution is computed from."""
        gate = self.manifest.models.get("gate")
        return gate is not None and "errors" in gate.outputs

    def errors(self, features: np.ndarray) -> np.ndarray | None:
        """The gate model's (n, F) squared reconstruction errors of normalised `features`, or None when the
        bundle's gate model has no such output. Run only for the rows the gate deferred as `ood`."""
        if not self.has_errors or not len(features):
            return None
        return self.sessions["gate"].run(["errors"], {self.inputs["gate"]: features})[0]

    def infer(self, features: np.ndarray, window: np.ndarray | None) -> Outputs:
        """features: normalised (n, F) float32; window: normalised (n, C, W) float32 or None."""
        if self._single(features, window):
            for kind, buf in self._single_in.items():
                np.copyto(buf, features if kind == "features" else window)
            got: dict[str, np.ndarray] = {}
            for role, bound in self._bound.items():
                bound.run()
                got[role] = bound.out.copy()
            return Outputs(probs=got["predictor"], second_probs=got.get("second_opinion"),
                           ood_score=got.get("gate"))
        probs = self._run("predictor", features, window)
        assert probs is not None  # predictor presence is checked in __init__
        return Outputs(probs=probs, second_probs=self._run("second_opinion", features, window),
                       ood_score=self._run("gate", features, window))
