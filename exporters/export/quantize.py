"""INT8 static QDQ quantization of an fp32 ONNX model, calibrated on the run's training split.

Static QDQ only: dynamic INT8 never helped on our CPUs and skips Gemm (see shared FIELD-NOTES). Quantizes
the heavy ops (Conv, Gemm, MatMul) and leaves Softmax and the reconstruction-error tail in fp32, so
probabilities and scores stay continuous for the gate thresholds.
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from edgekit.errors import ExportError

log = logging.getLogger(__name__)

QUANTIZED_OPS = ["Conv", "Gemm", "MatMul"]
CALIBRATION_SAMPLES = 512
CALIBRATION_BATCH = 64


class ArrayReader(CalibrationDataReader):
    """Feeds batches of one array as input 'x'."""

    def __init__(self, data: np.ndarray, batch: int = CALIBRATION_BATCH) -> None:
        self._batches = [np.ascontiguousarray(data[i:i + batch], dtype=np.float32)
                         for i in range(0, len(data), batch)]
        self._i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= len(self._batches):
            return None
        self._i += 1
        return {"x": self._batches[self._i - 1]}

    def rewind(self) -> None:
        self._i = 0


def calibration_sample(data: np.ndarray, n: int = CALIBRATION_SAMPLES, seed: int = 0) -> np.ndarray:
    """Up to n rows of the training split, drawn without replacement by a fixed seed."""
    if len(data) <= n:
        return data
    idx = np.sort(np.random.default_rng(seed).choice(len(data), size=n, replace=False))
    return data[idx]


def count_ops(path: Path) -> dict[str, int]:
    """Op-type histogram of an ONNX graph (top level)."""
    return dict(Counter(node.op_type for node in onnx.load(str(path)).graph.node))


def quantize_model(fp32_path: Path, int8_path: Path, calibration: np.ndarray) -> dict[str, int]:
    """Write a static QDQ INT8 model; returns the Q/DQ node counts. Raises ExportError if none were added."""
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    if len(calibration) == 0:
        raise ExportError("no calibration data for INT8", where=str(fp32_path), hint="check the train split")
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=False)
        except Exception as exc:  # onnxruntime raises plain exceptions from shape inference
            log.warning("quant_pre_process_failed model=%s error=%s; quantizing the raw model", fp32_path, exc)
            pre = fp32_path
        try:
            quantize_static(
                str(pre), str(int8_path), ArrayReader(calibration),
                quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                op_types_to_quantize=QUANTIZED_OPS, per_channel=False,
                calibrate_method=CalibrationMethod.MinMax,
            )
        except Exception as exc:
            raise ExportError(f"quantize_static failed: {exc}", where=str(fp32_path),
                              hint="export with --no-int8 to ship fp32 only") from exc
    ops = count_ops(int8_path)
    counts = {"QuantizeLinear": ops.get("QuantizeLinear", 0), "DequantizeLinear": ops.get("DequantizeLinear", 0)}
    if counts["QuantizeLinear"] == 0 or counts["DequantizeLinear"] == 0:
        raise ExportError(f"quantized model has no Q/DQ nodes ({counts})", where=str(int8_path),
                          hint="the graph has none of " + ", ".join(QUANTIZED_OPS))
    log.info("quantized model=%s quantize_linear=%d dequantize_linear=%d", int8_path.name,
             counts["QuantizeLinear"], counts["DequantizeLinear"])
    return counts
