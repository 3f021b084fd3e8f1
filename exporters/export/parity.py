"""Parity as a result: torch vs ONNX fp32, fp32 vs INT8 (decisions, held-out metric, Q/DQ nodes, latency).

Criteria (CRITERIA, overridable by key):
  fp32_atol/fp32_rtol   torch vs ORT fp32 must satisfy |ort - torch| <= atol + rtol * |torch| elementwise
                        (1e-4 each: float32 kernels differ by ~1e-6; 1e-4 catches a wrong graph, not rounding).
  min_agreement         INT8 decisions (argmax, or AE score above the reference threshold) must agree with
                        fp32 on >= 98 % of held-out cases.
  max_metric_drop       held-out F1 (binary) / macro-F1 of INT8 may be at most 0.01 below fp32.
  sklearn_min_agreement ONNX second-opinion labels must agree with scikit-learn on >= 99 % (trees compare
                        float32 thresholds, so a few borderline cases may flip).
  sklearn_max_abs       ... and probabilities within 0.05.
A failure of torch vs fp32 is always fatal; an INT8 failure only means fp32 is kept.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgekit.exporters.metrics import decision_metric, f1

log = logging.getLogger(__name__)

CRITERIA: dict[str, float] = {
    "fp32_atol": 1e-4,
    "fp32_rtol": 1e-4,
    "min_agreement": 0.98,
    "max_metric_drop": 0.01,
    "sklearn_min_agreement": 0.99,
    "sklearn_max_abs": 0.05,
}
LATENCY_RUNS = 300
LATENCY_WARMUP = 30


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    """A CPU session with `threads` intra-op threads, sequential execution, no spinning."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_model(path: Path, x: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
    """All outputs of an ONNX model over `x`, in batches, concatenated along axis 0."""
    sess = session(path)
    names = [o.name for o in sess.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i in range(0, len(x), batch):
        for name, value in zip(names, sess.run(names, {"x": np.ascontiguousarray(x[i:i + batch], np.float32)})):
            parts[name].append(np.asarray(value))
    return {n: np.concatenate(v, axis=0) for n, v in parts.items()}


def latency_us(path: Path, sample: np.ndarray, runs: int = LATENCY_RUNS) -> float:
    """Median single-sample latency in µs, 1 intra-op thread."""
    sess = session(path)
    feed = {"x": np.ascontiguousarray(sample[None], np.float32)}
    for _ in range(LATENCY_WARMUP):
        sess.run(None, feed)
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter_ns()
        sess.run(None, feed)
        times[i] = time.perf_counter_ns() - t0
    return float(np.median(times) / 1e3)


def closeness(reference: np.ndarray, got: np.ndarray, atol: float, rtol: float) -> dict[str, Any]:
    reference = np.asarray(reference, np.float64)
    got = np.asarray(got, np.float64)
    if reference.shape != got.shape:
        return {"max_abs": None, "max_rel": None, "pass": False,
                "error": f"shape {got.shape} != expected {reference.shape}"}
    diff = np.abs(got - reference)
    rel = diff / np.maximum(np.abs(reference), 1e-12)
    ok = bool(np.all(diff <= atol + rtol * np.abs(reference)) and np.all(np.isfinite(got)))
    return {"max_abs": float(diff.max(initial=0.0)), "max_rel": float(rel.max(initial=0.0)), "pass": ok}


def compare_int8(kind: str, fp32_out: np.ndarray, int8_out: np.ndarray, y: np.ndarray, *, n_classes: int,
                 positive_index: int | None, normal_index: int, ae_threshold: float | None,
                 criteria: dict[str, float]) -> dict[str, Any]:
    """Decision agreement and held-out metric, fp32 and INT8 side by side. kind: 'probs' or 'score'."""
    if kind == "probs":
        d32, d8 = fp32_out.argmax(axis=-1), int8_out.argmax(axis=-1)
        metric, m32 = decision_metric(y, d32, n_classes, positive_index)
        _, m8 = decision_metric(y, d8, n_classes, positive_index)
    else:
        d32, d8 = fp32_out > ae_threshold, int8_out > ae_threshold
        truth = y != normal_index
        metric = "anomaly_f1"
        m32 = f1(truth, d32)
        m8 = f1(truth, d8)
    agreement = float(np.mean(d32 == d8)) if len(d32) else 1.0
    drop = m32 - m8
    out = {"decision_agreement": agreement, "metric": metric, "heldout_fp32": m32, "heldout_int8": m8,
           "metric_drop": drop, "max_abs_vs_fp32": float(np.abs(fp32_out - int8_out).max(initial=0.0))}
    if ae_threshold is not None:
        out["decision_threshold"] = float(ae_threshold)
    reasons = []
    if agreement < criteria["min_agreement"]:
        reasons.append(f"decision agreement {agreement:.4f} < {criteria['min_agreement']}")
    if drop > criteria["max_metric_drop"]:
        reasons.append(f"held-out {metric} drop {drop:.4f} > {criteria['max_metric_drop']}")
    out["pass"] = not reasons
    out["fail_reasons"] = reasons
    return out


def choose(role: str, fp32_file: str, int8_file: str | None, int8_report: dict[str, Any] | None,
           latency: dict[str, float | None], prefer_int8: bool = False) -> dict[str, str]:
    """INT8 only when it exists, passes parity and is faster single-sample; otherwise fp32, with the reason.
    `prefer_int8`: INT8 whenever it passes parity, faster here or not (the device's CPU is not the export
    host's: an ARM core with dot-product instructions may run INT8 faster where this one does not)."""
    if int8_file is None or int8_report is None:
        return {"file": fp32_file, "quantization": "fp32", "reason": "int8 not requested or not produced"}
    if not int8_report.get("pass", False):
        why = "; ".join(int8_report.get("fail_reasons") or [str(int8_report.get("error", "failed"))])
        return {"file": fp32_file, "quantization": "fp32", "reason": f"int8 fails parity ({why}); fp32 kept"}
    t32, t8 = latency.get("fp32"), latency.get("int8")
    if prefer_int8:
        timed = f" ({t8:.1f} us vs {t32:.1f} us fp32 here)" if t32 is not None and t8 is not None else ""
        return {"file": int8_file, "quantization": "int8-qdq",
                "reason": f"int8 passes parity; preferred (--prefer-int8){timed}"}
    if t32 is not None and t8 is not None and t8 >= t32:
        return {"file": fp32_file, "quantization": "fp32",
                "reason": f"int8 passes parity but is not faster ({t8:.1f} us vs {t32:.1f} us fp32, "
                          "1 thread, single sample); fp32 kept"}
    return {"file": int8_file, "quantization": "int8-qdq",
            "reason": f"int8 passes parity and is faster ({t8:.1f} us vs {t32:.1f} us fp32, 1 thread, "
                      "single sample)"}
