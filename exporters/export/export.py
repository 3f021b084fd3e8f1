"""Run directory -> signed bundle, in small steps: export -> quantize -> check parity -> recalibrate -> bundle.

    export_onnx      torch/scikit-learn -> ONNX fp32 (input "x", dynamic batch; outputs probs / score+errors /
                     label+probabilities), key facts in each file's metadata_props
    quantize_models  static QDQ INT8 of the torch models, calibrated on the train split
    check_parity     torch vs fp32, fp32 vs INT8 side by side; chooses the file each role uses
    input_envelope   per channel and feature the training data's range and stuck floor (issue 14)
    recalibrate      gate thresholds on the cal split from the outputs of the files the bundle uses (and
                     the envelope's deferrals)
    write_bundle     heldout.npz, parity.json, run.json, manifest.json (sha256 of every file), manifest.sig
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import pickle
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import edgekit
from edgekit import population as population_mod
from edgekit.contract.run import SPLITS, RunMeta, read_run
from edgekit.errors import ExportError
from edgekit.exporters.metrics import decision_metric
from edgekit.manifest import Manifest, bundle_files, sign_bundle, write_manifest

from . import calibrate as calibrate_mod
from . import parity as parity_mod
from . import quantize as quantize_mod
from . import tradeoff
from .quantize import calibration_sample, quantize_model

log = logging.getLogger(__name__)

OPSET = 17
# role in the bundle -> (key in run.json "models", ONNX output names, file stem)
ROLES: dict[str, dict[str, Any]] = {
    "predictor": {"run_key": "predictor", "outputs": ["probs"], "stem": "predictor"},
    # score first: parity and calibration read outputs[0]; errors (n, F) feed an ood deferral's attribution
    "gate": {"run_key": "autoencoder", "outputs": ["score", "errors"], "stem": "autoencoder"},
    "second_opinion": {"run_key": "second_opinion", "outputs": ["label", "probabilities"],
                       "stem": "second_opinion"},
}
TORCH_ROLES = ("predictor", "gate")
OOD_QUANTILE = 0.99
# The plausible range is the training range widened by this many spans on each side. It has to stop values
# no working sensor of the kind gives (4e300 in a recording, a stuck reading far off scale); a fault that
# moves a channel further than the whole training spread is deferred too (a person looks) rather than
# answered by models that never saw anything like it. The ood check judges everything in between.
PLAUSIBLE_MARGIN = 1.0
# The input envelope (issue 14), set from the run's data, never from a test split:
#  - its base is the train split's range per channel (window minima and maxima) and per feature, at these
#    quantiles: robust to a few odd training windows (a 0.001 quantile of SKAB's 6,942 is its 7th lowest);
ENVELOPE_QUANTILE = 0.001
#  - each side is widened by the furthest a calibration-split window of the autoencoder's kind (held-out
#    files or subjects, which the models never saw) went beyond the base, and by at least this share of the
#    base's width: a recording the models never saw differs from the training ones (IPOL's held-out subjects
#    walk with other peaks; SKAB's files run at other temperatures), and that difference is not a fault;
ENVELOPE_MIN_MARGIN = 0.1
#  - a channel is stuck when its window spread (max - min) falls below this share of both the train split's
#    ENVELOPE_QUANTILE spread and the least spread of those calibration windows: a live sensor's window never
#    moves less than its noise floor, which the quietest training windows show; ten times less is a sensor
#    that stopped reporting (dead or frozen), not a quieter machine. A channel flat in more than that share
#    of the training windows (a quantised pressure reading that repeats for a few seconds) is still in a
#    window moving less than that share of its quietest moving windows, and stuck only after more still
#    windows in a row than STUCK_RUNS times its longest still run in the train and calibration recordings:
#    a live sensor repeats itself no longer than it ever did, a dead or frozen one forever.
STUCK_FRACTION = 0.1
STUCK_RUNS = 2
#  - relations between channels (edgekit/plausible.py ChannelRelations): ridge least squares on the train
#    split's standardised statistics (RELATION_RIDGE x rows on the diagonal: two channels that read alike,
#    like SKAB's two accelerometers, are collinear), residual ranges by the bounds above; a log level for a
#    channel whose train windows never reach 0, floored at RELATION_LEVEL_FLOOR x its lowest level there.
RELATION_RIDGE = 1e-3
RELATION_LEVEL_FLOOR = 0.1


@dataclass
class Run:
    """A loaded run directory: run.json, the splits, and what each role's model takes as input."""

    path: Path
    meta: RunMeta
    splits: dict[str, np.ndarray]

    @property
    def labels(self) -> list[str]:
        return self.meta.labels

    @property
    def normal_index(self) -> int:
        return self.meta.normal_index

    @property
    def positive_index(self) -> int | None:
        return self.meta.positive_index

    def spec(self, role: str) -> Any:
        """run.json's entry in "models" for a bundle role (its file and input)."""
        return getattr(self.meta.models, ROLES[role]["run_key"])

    def x(self, role: str, split: str) -> np.ndarray:
        return self.splits[f"{split}_{self.spec(role).input}"]

    def y(self, split: str) -> np.ndarray:
        return self.splits[f"{split}_y"]


def load_run(run_dir: Path) -> Run:
    """Read and check run.json (edgekit/contract/run.py) and splits.npz."""
    run_dir = Path(run_dir)
    meta = read_run(run_dir)
    npz = run_dir / "splits.npz"
    if not npz.is_file():
        raise ExportError("splits.npz not found", where=str(npz), hint="re-run `edgekit train`")
    with np.load(npz) as data:
        splits = {k: data[k] for k in data.files}
    needed = {f"{s}_{k}" for s in SPLITS for k in ("features", "y")}
    if meta.models.predictor.input == "window":
        needed |= {f"{s}_window" for s in SPLITS}
    missing = sorted(needed - set(splits))
    if missing:
        raise ExportError(f"arrays missing: {missing}", where=str(npz), hint="re-run `edgekit train`")
    return Run(run_dir, meta, splits)


def _metadata(run: Run, role: str, quantization: str) -> dict[str, str]:
    meta = run.meta
    return {
        "edgekit.schema": "edgekit.model/1",
        "edgekit.version": edgekit.__version__,
        "edgekit.task": meta.task,
        "edgekit.role": role,
        "edgekit.labels": json.dumps(run.labels),
        "edgekit.normal_label": meta.normal_label,
        "edgekit.feature_names": json.dumps(meta.input.feature_names),
        "edgekit.input_kind": meta.input.kind,
        "edgekit.model_input": run.spec(role).input,
        "edgekit.quantization": quantization,
        "edgekit.data_fingerprint": meta.data_fingerprint,
    }


def set_metadata(path: Path, props: dict[str, str]) -> None:
    """Replace the edgekit.* metadata_props of an ONNX file, keeping others."""
    model = onnx.load(str(path))
    kept = {p.key: p.value for p in model.metadata_props if not p.key.startswith("edgekit.")}
    onnx.helper.set_model_props(model, {**kept, **props})
    onnx.save(model, str(path))


# --- step 1: export -------------------------------------------------------------------------------


def torch_to_onnx(model: Any, example: np.ndarray, path: Path, output: str | list[str]) -> None:
    """A torch module -> fp32 ONNX file: input "x" with a dynamic batch, outputs named `output` (one name, or
    one per tensor the module returns), opset OPSET. The export step of every torch model, the evaluations'
    (evaluation/skab.py) included."""
    import torch

    names = [output] if isinstance(output, str) else list(output)
    x = torch.from_numpy(np.ascontiguousarray(example[:2], np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy exporter's DeprecationWarning; dynamo needs no graph breaks
        torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=names,
                          dynamic_axes={"x": {0: "batch"}, **{n: {0: "batch"} for n in names}},
                          opset_version=OPSET, dynamo=False)


def _torch_outputs(model: Any, x: np.ndarray, batch: int = 1024) -> np.ndarray:
    import torch

    outs = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            outs.append(model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch], np.float32))).numpy())
    return np.concatenate(outs, axis=0)


def export_onnx(run: Run, out: Path) -> dict[str, Any]:
    """fp32 ONNX for every role. Returns per role: fp32 file name and reference outputs on cal/test."""
    import torch
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    from edgekit.exporters.training.models import ScoreAndErrors, load_checkpoint

    result: dict[str, Any] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # never a multi-threaded torch beside onnxruntime (FIELD-NOTES)
    try:
        for role in TORCH_ROLES:
            ckpt_path = run.path / run.spec(role).file
            if not ckpt_path.is_file():
                raise ExportError("model checkpoint not found", where=str(ckpt_path), hint="re-run `edgekit train`")
            model, _ = load_checkpoint(ckpt_path)
            fname = f"{ROLES[role]['stem']}.fp32.onnx"
            outputs = ROLES[role]["outputs"]
            graph = ScoreAndErrors(model) if role == "gate" else model  # score as before, plus its errors
            try:
                torch_to_onnx(graph, run.x(role, "train"), out / fname, outputs)
            except Exception as exc:
                raise ExportError(f"torch.onnx.export failed: {exc}", where=str(ckpt_path)) from exc
            set_metadata(out / fname, _metadata(run, role, "fp32"))
            result[role] = {"fp32_file": fname,
                            "reference": {s: _torch_outputs(model, run.x(role, s)) for s in ("cal", "test")}}
    finally:
        torch.set_num_threads(threads)

    pkl = run.path / run.spec("second_opinion").file
    try:
        with open(pkl, "rb") as fh:
            clf = pickle.load(fh)  # noqa: S301 - our own training output
    except FileNotFoundError:
        raise ExportError("second-opinion model not found", where=str(pkl), hint="re-run `edgekit train`") from None
    classes = np.asarray(getattr(clf, "classes_", []))
    if classes.tolist() != list(range(len(run.labels))):
        raise ExportError(f"second opinion classes {classes.tolist()} != label indices 0..{len(run.labels) - 1}",
                          where=str(pkl), hint="every label needs training rows for the second opinion")
    n_features = run.x("second_opinion", "train").shape[1]
    try:
        onx = convert_sklearn(clf, initial_types=[("x", FloatTensorType([None, n_features]))],
                              options={id(clf): {"zipmap": False}},
                              target_opset={"": OPSET, "ai.onnx.ml": 3})
    except Exception as exc:
        raise ExportError(f"skl2onnx failed: {exc}", where=str(pkl)) from exc
    fname = "second_opinion.onnx"
    onnx.save(onx, str(out / fname))
    set_metadata(out / fname, _metadata(run, "second_opinion", "fp32"))
    result["second_opinion"] = {
        "fp32_file": fname,
        "reference": {s: clf.predict_proba(run.x("second_opinion", s).astype(np.float32)) for s in ("cal", "test")},
        "reference_label": {s: clf.predict(run.x("second_opinion", s).astype(np.float32)) for s in ("cal", "test")},
    }
    log.info("exported_onnx roles=%s", ",".join(result))
    return result


# --- step 2: quantize -----------------------------------------------------------------------------


def quantize_models(run: Run, out: Path, exported: dict[str, Any],
                    criteria: dict[str, float] | None = None) -> dict[str, Any]:
    """INT8 QDQ for the torch roles; a failure is recorded per role, not raised. Each role tries the plans of
    quantize.PLANS in order and keeps the first whose decisions pass parity's criteria against fp32 on the
    calibration split (the test split only judges the one kept, in check_parity); when none passes, the
    last. Why not one plan for all: keeping the input layer in float was what SKAB's MLP needed (README,
    SKAB: INT8), while a conv classifier gets its INT8 speed partly from its first layer."""
    crit = {**parity_mod.CRITERIA, **(criteria or {})}
    result: dict[str, Any] = {}
    for role in TORCH_ROLES:
        fname = f"{ROLES[role]['stem']}.int8.onnx"
        fp32 = out / exported[role]["fp32_file"]
        calibration = calibration_sample(run.x(role, "train"))
        tried: list[dict[str, Any]] = []
        kept: dict[str, Any] | None = None
        for plan in quantize_mod.PLANS:
            trial = out / f"{ROLES[role]['stem']}.int8.{plan}.onnx"
            try:
                made = quantize_model(fp32, trial, calibration, plan=plan)
            except ExportError as exc:
                log.warning("quantize_failed role=%s plan=%s error=%s", role, plan, exc)
                trial.unlink(missing_ok=True)
                tried.append({"plan": plan, "error": str(exc)})
                continue
            check = _int8_check(run, role, fp32, trial, "cal", crit)
            tried.append({"plan": plan, "cal_decision_agreement": check["decision_agreement"],
                          "cal_metric_drop": check["metric_drop"], "cal_pass": check["pass"]})
            log.info("quantize_plan role=%s plan=%s cal_agreement=%.4f cal_pass=%s", role, plan,
                     check["decision_agreement"], check["pass"])
            if kept is not None:
                (out / kept["trial"]).unlink(missing_ok=True)
            kept = {**made, "trial": trial.name}
            if check["pass"]:
                break
        if kept is None:
            (out / fname).unlink(missing_ok=True)
            result[role] = {"int8_file": None, "error": tried[-1]["error"], "plans": tried}
            continue
        (out / kept.pop("trial")).replace(out / fname)
        set_metadata(out / fname, _metadata(run, role, "int8-qdq"))
        result[role] = {"int8_file": fname, **kept, "plans": tried}
    return result


def _int8_check(run: Run, role: str, fp32: Path, int8: Path, split: str, crit: dict[str, float]) -> dict[str, Any]:
    """fp32 vs INT8 decisions on one split (parity.compare_int8, the criteria check_parity applies)."""
    out_name = ROLES[role]["outputs"][0]
    x = run.x(role, split)
    return parity_mod.compare_int8(
        "probs" if role == "predictor" else "score", parity_mod.run_model(fp32, x)[out_name],
        parity_mod.run_model(int8, x)[out_name], run.y(split), n_classes=len(run.labels),
        positive_index=run.positive_index, normal_index=run.normal_index,
        ae_threshold=_ood_threshold(run, fp32) if role == "gate" else None, criteria=crit)


# --- step 3: parity -------------------------------------------------------------------------------


def check_parity(run: Run, out: Path, exported: dict[str, Any], quantized: dict[str, Any],
                 criteria: dict[str, float] | None = None, prefer_int8: bool = False) -> dict[str, Any]:
    """The parity report; `models[role]['use']` names the file each role will run (parity.choose; with
    `prefer_int8` INT8 wherever it passes parity, faster on this machine or not)."""
    crit = {**parity_mod.CRITERIA, **(criteria or {})}
    models = {role: _torch_parity(run, out, role, exported[role], quantized.get(role), crit, prefer_int8)
              for role in TORCH_ROLES}
    models["second_opinion"] = _second_opinion_parity(run, out, exported["second_opinion"], crit)
    passed = all(m["pass"] for m in models.values())
    report = {"schema": "edgekit.parity/1", "passed": passed, "criteria": crit,
              "n_test": int(len(run.y("test"))), "models": models}
    for role, m in models.items():
        log.info("parity role=%s pass=%s use=%s reason=%r", role, m["pass"], m["use"]["file"], m["use"]["reason"])
    return report


def _torch_parity(run: Run, out: Path, role: str, exported: dict[str, Any], quantized: dict[str, Any] | None,
                  crit: dict[str, float], prefer_int8: bool = False) -> dict[str, Any]:
    """One torch role: torch vs fp32 ONNX, fp32 vs INT8 on the test split (when quantized), latency, and the
    file the role will use. It passes by its fp32 closeness; INT8 is used only when its own report passes."""
    fp32_file = exported["fp32_file"]
    x_test, y_test = run.x(role, "test"), run.y("test")
    out_name = ROLES[role]["outputs"][0]
    fp32_test = parity_mod.run_model(out / fp32_file, x_test)[out_name]
    closeness = parity_mod.closeness(exported["reference"]["test"], fp32_test, crit["fp32_atol"], crit["fp32_rtol"])
    report: dict[str, Any] = {"fp32": {"file": fp32_file, "torch_vs_onnx": closeness, "pass": closeness["pass"]}}
    latency: dict[str, float | None] = {"fp32": parity_mod.latency_us(out / fp32_file, x_test[0]), "int8": None}
    int8_report = None
    if quantized is not None and quantized.get("int8_file"):
        int8_file = quantized["int8_file"]
        int8_test = parity_mod.run_model(out / int8_file, x_test)[out_name]
        int8_report = parity_mod.compare_int8(
            "probs" if role == "predictor" else "score", fp32_test, int8_test, y_test,
            n_classes=len(run.labels), positive_index=run.positive_index, normal_index=run.normal_index,
            ae_threshold=_ood_threshold(run, out / fp32_file) if role == "gate" else None, criteria=crit)
        int8_report = {"file": int8_file, "qdq_nodes": quantized["qdq_nodes"], "plan": quantized["plan"],
                       "float_nodes": quantized["float_nodes"], "plans": quantized["plans"], **int8_report}
        latency["int8"] = parity_mod.latency_us(out / int8_file, x_test[0])
    elif quantized is not None:
        error = quantized.get("error")
        int8_report = {"file": None, "pass": False, "error": error, "fail_reasons": [error]}
    if role == "predictor" and int8_report is None:
        metric, value = decision_metric(y_test, fp32_test.argmax(-1), len(run.labels), run.positive_index)
        report["heldout"] = {"metric": metric, "fp32": value}
    report["int8"] = int8_report
    report["latency_us"] = latency
    report["use"] = _choose_file(role, fp32_file, quantized, int8_report, latency, prefer_int8)
    report["pass"] = report["fp32"]["pass"]  # the used file passes: fp32 by closeness, int8 by its report
    return report


def _ood_threshold(run: Run, fp32_gate: Path) -> float:
    """The OOD threshold the fp32 autoencoder gives on the cal split (its reference cases, OOD_QUANTILE):
    the decisions INT8 must agree with."""
    cal = parity_mod.run_model(fp32_gate, run.x("gate", "cal"))[ROLES["gate"]["outputs"][0]]
    ref = cal[run.y("cal") == run.normal_index] if ood_reference(run) == "normal" else cal
    return float(np.quantile(ref if ref.size else cal, OOD_QUANTILE))


def _choose_file(role: str, fp32_file: str, quantized: dict[str, Any] | None, int8_report: dict[str, Any] | None,
                 latency: dict[str, float | None], prefer_int8: bool = False) -> dict[str, Any]:
    if quantized is None:
        return {"file": fp32_file, "quantization": "fp32", "reason": "int8 not requested"}
    if not quantized.get("int8_file"):
        return {"file": fp32_file, "quantization": "fp32",
                "reason": f"int8 quantization failed ({quantized.get('error')}); fp32 kept"}
    return parity_mod.choose(role, fp32_file, quantized["int8_file"], int8_report, latency, prefer_int8)


def _second_opinion_parity(run: Run, out: Path, exported: dict[str, Any], crit: dict[str, float]) -> dict[str, Any]:
    """The second opinion's ONNX file vs scikit-learn on the test split (never quantized)."""
    fp32_file = exported["fp32_file"]
    x_test, y_test = run.x("second_opinion", "test"), run.y("test")
    onnx_out = parity_mod.run_model(out / fp32_file, x_test)
    agreement = float(np.mean(onnx_out["label"] == exported["reference_label"]["test"]))
    max_abs = float(np.abs(onnx_out["probabilities"] - exported["reference"]["test"]).max(initial=0.0))
    so_pass = agreement >= crit["sklearn_min_agreement"] and max_abs <= crit["sklearn_max_abs"]
    metric, value = decision_metric(y_test, onnx_out["probabilities"].argmax(-1), len(run.labels),
                                    run.positive_index)
    return {
        "fp32": {"file": fp32_file, "label_agreement_vs_sklearn": agreement, "max_abs_vs_sklearn": max_abs,
                 "pass": so_pass},
        "heldout": {"metric": metric, "onnx": value},
        "latency_us": {"fp32": parity_mod.latency_us(out / fp32_file, x_test[0])},
        "use": {"file": fp32_file, "quantization": "fp32", "reason": "scikit-learn model: not quantized"},
        "pass": so_pass,
    }


# --- step 4: recalibrate --------------------------------------------------------------------------


def used_outputs(run: Run, out: Path, parity: dict[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """Outputs of the files the bundle uses on cal and test: probs, second, second_label, score, y."""
    res: dict[str, dict[str, np.ndarray]] = {}
    for split in ("cal", "test"):
        pred = parity_mod.run_model(out / parity["models"]["predictor"]["use"]["file"], run.x("predictor", split))
        gate = parity_mod.run_model(out / parity["models"]["gate"]["use"]["file"], run.x("gate", split))
        so = parity_mod.run_model(out / parity["models"]["second_opinion"]["use"]["file"],
                                  run.x("second_opinion", split))
        res[split] = {"probs": pred["probs"], "score": gate["score"], "second": so["probabilities"],
                      "second_label": so["label"], "y": run.y(split)}
    return res


def recalibrate(run: Run, outputs: dict[str, dict[str, np.ndarray]], target_error: float,
                delta: float, envelope: dict[str, Any] | None = None) -> dict[str, Any]:
    """Gate thresholds on the cal split; the rows the envelope defers (the agent never accepts them) are
    left out of what the thresholds accept, on cal and in the test report."""
    return calibrate_mod.calibrate_gate(outputs["cal"], outputs["test"], normal_index=run.normal_index,
                                        target_error=target_error, delta=delta, ood_quantile=OOD_QUANTILE,
                                        ood_reference=ood_reference(run),
                                        outside={s: envelope_outside(run, envelope, s) for s in ("cal", "test")})


def ood_reference(run: Run) -> str:
    """Which cal cases set the OOD threshold: those the autoencoder was fitted on (run.json fit_on)."""
    return run.meta.models.autoencoder.fit_on


# --- step 5: bundle -------------------------------------------------------------------------------


def _parity_summary(parity: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {"passed": parity["passed"], "report": "parity.json", "models": {}}
    for role, m in parity["models"].items():
        entry = {"pass": m["pass"], "file": m["use"]["file"], "quantization": m["use"]["quantization"]}
        if m.get("int8") and m["int8"].get("file"):
            entry.update({"metric": m["int8"]["metric"], "heldout_fp32": m["int8"]["heldout_fp32"],
                          "heldout_int8": m["int8"]["heldout_int8"],
                          "decision_agreement": m["int8"]["decision_agreement"], "int8_pass": m["int8"]["pass"]})
        summary["models"][role] = entry
    return summary


def plausible_range(observed: dict[str, list[float]] | None) -> dict[str, Any] | None:
    """The manifest's plausible sample range from the training range: widened by PLAUSIBLE_MARGIN spans on
    each side (a channel that never moved in training gets 1.0 or its magnitude, whichever is larger)."""
    if not observed:
        return None
    lo, hi = np.asarray(observed["min"], np.float64), np.asarray(observed["max"], np.float64)
    span = np.maximum(hi - lo, np.maximum(1.0, np.maximum(np.abs(lo), np.abs(hi))) * (hi == lo))
    return {"low": (lo - PLAUSIBLE_MARGIN * span).tolist(), "high": (hi + PLAUSIBLE_MARGIN * span).tolist(),
            "basis": f"training range widened by {PLAUSIBLE_MARGIN:g} span(s) on each side"}


def _bounds(train: tuple[np.ndarray, np.ndarray], cal: tuple[np.ndarray, np.ndarray] | None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Envelope bounds per column from (lows, highs) of the train rows and of the calibration reference rows
    (each (n, k); NaN rows ignored): the train split's ENVELOPE_QUANTILE range, widened on each side by the
    larger of ENVELOPE_MIN_MARGIN widths and the calibration rows' furthest excursion beyond it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column (no window rows) stays NaN
        low = np.nanquantile(train[0], ENVELOPE_QUANTILE, axis=0)
        high = np.nanquantile(train[1], 1.0 - ENVELOPE_QUANTILE, axis=0)
    width = high - low
    width = np.where(width > 0, width, np.maximum(1.0, np.maximum(np.abs(low), np.abs(high))))
    below = above = ENVELOPE_MIN_MARGIN * width
    if cal is not None and len(cal[0]):
        below = np.maximum(below, np.nan_to_num(low - np.nanmin(cal[0], axis=0), nan=0.0))
        above = np.maximum(above, np.nan_to_num(np.nanmax(cal[1], axis=0) - high, nan=0.0))
    return low - below, high + above


def input_envelope(run: Run) -> dict[str, Any] | None:
    """The manifest's input.envelope from the run's train split and its calibration reference rows (those
    the autoencoder's threshold comes from: normal ones, or all); None for a table task. Channels are left
    out for a run without window extremes (trained before they were recorded)."""
    meta, s = run.meta, run.splits
    if meta.input.kind != "window":
        return None
    cal_rows = run.y("cal") == run.normal_index if ood_reference(run) == "normal" else slice(None)
    raw_train, raw_cal = s.get("train_features_raw"), s.get("cal_features_raw")
    out: dict[str, Any] = {"channels": None, "features": None}
    parts = []
    if raw_train is not None and len(raw_train):
        tr = raw_train.astype(np.float64)
        cal = raw_cal.astype(np.float64)[cal_rows] if raw_cal is not None else None
        low, high = _bounds((tr, tr), None if cal is None else (cal, cal))
        if np.isfinite(low).all() and np.isfinite(high).all():
            out["features"] = {"low": low.tolist(), "high": high.tolist()}
            parts.append("features")
    if "train_window_min" in s and "train_window_max" in s and len(s["train_window_min"]):
        tr_lo, tr_hi = s["train_window_min"], s["train_window_max"]
        cal_lo = s["cal_window_min"][cal_rows] if "cal_window_min" in s else tr_lo[:0]
        cal_hi = s["cal_window_max"][cal_rows] if "cal_window_max" in s else tr_hi[:0]
        low, high = _bounds((tr_lo, tr_hi), (cal_lo, cal_hi))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            floor = np.nanquantile(tr_hi - tr_lo, ENVELOPE_QUANTILE, axis=0)
            if len(cal_lo):
                floor = np.fmin(floor, np.nanmin(cal_hi - cal_lo, axis=0))
        stuck = np.where(floor > 0, STUCK_FRACTION * floor, 0.0)
        groups = {k: s[f"{k}_group"] if f"{k}_group" in s else None for k in ("train", "cal")}
        stuck, after = _stuck_runs(stuck, (tr_lo, tr_hi, groups["train"]),
                                   (s["cal_window_min"], s["cal_window_max"], groups["cal"])
                                   if "cal_window_min" in s else None)
        if np.isfinite(low).all() and np.isfinite(high).all() and np.isfinite(stuck).all():
            out["channels"] = {"low": low.tolist(), "high": high.tolist(), "stuck_below": stuck.tolist()}
            if (after > 1).any():
                out["channels"]["stuck_after"] = after.tolist()
            parts.append("channels")
        # every calibration window, not only the reference rows: a relation is the sensors', and a working
        # sensor keeps it in any state of the process the training data holds (its train part is all rows too)
        relations = input_relations((tr_lo, tr_hi), (s["cal_window_min"], s["cal_window_max"])
                                    if "cal_window_min" in s else None)
        if relations is not None:
            out["relations"] = relations
            parts.append("relations")
    if not parts:
        return None
    ref = "normal" if ood_reference(run) == "normal" else "all"
    out["basis"] = (f"{' and '.join(parts)}: the train split's {ENVELOPE_QUANTILE:g}-{1 - ENVELOPE_QUANTILE:g} "
                    f"quantile range (channels: of window minima and maxima), each side widened by the larger of "
                    f"{ENVELOPE_MIN_MARGIN:g} width and the furthest a calibration window ({ref}) went beyond it"
                    + (f"; stuck: window spread below {STUCK_FRACTION:g} x the least of the train split's "
                       f"{ENVELOPE_QUANTILE:g} quantile and the calibration windows' spread"
                       + (f" (of their moving windows, for a channel still in more of them, then stuck after "
                          f"{STUCK_RUNS:g} x its longest still run there)" if "stuck_after" in out["channels"]
                          else "")
                       if out["channels"] else "")
                    + ("; relations: each channel's window level and log spread from the other channels', "
                       "ridge least squares on the train split, residual ranges by the same quantiles and margin, "
                       "widened to every calibration window" if "relations" in out else ""))
    return out


def _longest_runs(still: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """(C,) the most windows in a row each channel is still, within a group (one recording's windows, in
    order: splits.npz keeps them so); without groups the split is one stream."""
    from edgekit.plausible import StillRuns

    best = np.zeros(still.shape[1], dtype=np.int64)
    starts = [0] if groups is None or not len(groups) else \
        [0, *(np.flatnonzero(groups[1:] != groups[:-1]) + 1).tolist()]
    for a, b in zip(starts, [*starts[1:], len(still)]):
        if b > a:
            best = np.maximum(best, StillRuns(still.shape[1]).update(still[a:b]).max(axis=0))
    return best


def _stuck_runs(stuck: np.ndarray, train: tuple[np.ndarray, np.ndarray, np.ndarray | None],
                cal: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None) -> tuple[np.ndarray, np.ndarray]:
    """(stuck_below, stuck_after) per channel. A channel with a stuck floor (always moving in training) is
    stuck in one window below it; one without (flat in more than ENVELOPE_QUANTILE of the train windows) is
    still below STUCK_FRACTION x the least spread of its moving train and cal windows, and stuck after more
    than STUCK_RUNS x its longest still run in either split (contiguous windows of one group)."""
    after = np.ones(len(stuck), dtype=np.int64)
    runs_of = [part for part in (train, cal) if part is not None and len(part[0])]
    spreads = [hi - lo for lo, hi, _ in runs_of]
    below = stuck.copy()
    for c in np.flatnonzero(stuck <= 0).tolist():
        moving = np.concatenate([sp[:, c][sp[:, c] > 0] for sp in spreads])
        if not len(moving):
            continue  # never moved in training: never stuck
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            least = np.nanquantile(spreads[0][:, c][spreads[0][:, c] > 0], ENVELOPE_QUANTILE) \
                if (spreads[0][:, c] > 0).any() else np.inf
        for sp in spreads[1:]:
            if (sp[:, c] > 0).any():
                least = min(least, float(np.nanmin(sp[:, c][sp[:, c] > 0])))
        if not np.isfinite(least):
            continue
        below[c] = STUCK_FRACTION * least
    if (below > stuck).any():
        longest = np.zeros(len(stuck), dtype=np.int64)
        for (_, _, groups), sp in zip(runs_of, spreads):
            longest = np.maximum(longest, _longest_runs(sp < below, groups))
        after = np.where(below > stuck, STUCK_RUNS * longest + 1, 1)
    return below, after


def input_relations(train: tuple[np.ndarray, np.ndarray], cal: tuple[np.ndarray, np.ndarray] | None
                    ) -> dict[str, Any] | None:
    """The manifest's input.envelope.relations (edgekit/plausible.py ChannelRelations) from the train split's
    window extremes (lows, highs), each (n, C), residual ranges widened by the calibration windows' (`cal`);
    None with fewer than 2 channels or too few windows to fit (10 per coefficient)."""
    from edgekit.plausible import ChannelRelations, relation_stats

    lo, hi = (np.asarray(a, np.float64) for a in train)
    keep = np.isfinite(lo).all(axis=1) & np.isfinite(hi).all(axis=1)
    lo, hi = lo[keep], hi[keep]
    n, c = lo.shape
    if c < 2 or n < 10 * (2 * c + 1):
        return None
    log_level = lo.min(axis=0) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        level = 0.5 * lo + 0.5 * hi
        level_floor = np.where(log_level, RELATION_LEVEL_FLOOR * np.quantile(level, ENVELOPE_QUANTILE, axis=0), 0.0)
        spread = hi - lo
        spread_floor = np.array([np.quantile(spread[:, k][spread[:, k] > 0], ENVELOPE_QUANTILE)
                                 if (spread[:, k] > 0).any() else 1.0 for k in range(c)])
    stats = relation_stats(lo, hi, log_level, level_floor, spread_floor)
    mean, std = stats.mean(axis=0), stats.std(axis=0)
    std = np.where(std > 0, std, 1.0)  # a statistic that never moved: its residual range is what it read
    z = (stats - mean) / std
    weights = np.zeros((c + 1, c, 2, 2 * c + 1))
    for m in range(c + 1):  # set 0: every other channel; set e + 1: channel e left out too
        for k in range(c):
            if m == k + 1:
                continue
            cols = [j for j in range(2 * c) if j % c != k and (m == 0 or j % c != m - 1)]
            x = np.concatenate([z[:, cols], np.ones((n, 1))], axis=1)
            gram = x.T @ x + RELATION_RIDGE * n * np.diag([1.0] * len(cols) + [0.0])  # the intercept unpenalised
            coef = np.linalg.solve(gram, x.T @ z[:, [k, c + k]])  # (len(cols) + 1, 2)
            weights[m, k][:, [*cols, 2 * c]] = coef.T
    # the residual ranges from the agent's own arithmetic (ChannelRelations.residuals), so a calibration
    # window on a range's edge is inside it on the device too
    zeros = np.zeros((c + 1, c, 2))
    rel = ChannelRelations(tuple(map(str, range(c))), log_level, level_floor, spread_floor, mean, std, weights,
                           zeros, zeros)
    r = rel.residuals(lo, hi).reshape(n, -1)
    rc = None
    if cal is not None and len(cal[0]):
        cl, ch = (np.asarray(a, np.float64) for a in cal)
        ok = np.isfinite(cl).all(axis=1) & np.isfinite(ch).all(axis=1)
        rc = rel.residuals(cl[ok], ch[ok]).reshape(int(ok.sum()), -1)
    low, high = (b.reshape(c + 1, c, 2) for b in _bounds((r, r), None if rc is None else (rc, rc)))
    for e in range(c):  # set e + 1 has no model of channel e
        low[e + 1, e] = high[e + 1, e] = 0.0
    if not (np.isfinite(weights).all() and np.isfinite(low).all() and np.isfinite(high).all()):
        return None
    return {"log_level": log_level.tolist(), "level_floor": level_floor.tolist(),
            "spread_floor": spread_floor.tolist(), "mean": mean.tolist(), "std": std.tolist(),
            "weights": weights.tolist(), "low": low.tolist(), "high": high.tolist()}


def envelope_outside(run: Run, envelope: dict[str, Any] | None, split: str) -> np.ndarray | None:
    """(n,) True for the rows of `split` the agent's envelope rule (edgekit/plausible.py EnvelopeCheck)
    defers, from the split's window extremes and raw features; None without an envelope."""
    if envelope is None:
        return None
    from edgekit.manifest import InputEnvelope
    from edgekit.plausible import EnvelopeCheck

    check = EnvelopeCheck.from_envelope(run.meta.input.channels or (), run.meta.input.feature_names,
                                        InputEnvelope.model_validate(envelope))
    s = run.splits
    lo, hi = s.get(f"{split}_window_min"), s.get(f"{split}_window_max")
    windows = check.checks_channels
    # no still runs: a split's windows are not one stream (a channel that takes a run is never stuck here)
    return check.outside(lo if windows else None, hi if windows else None,
                         s.get(f"{split}_features_raw") if envelope["features"] else None)


def _population(run: Run, names: list[str]) -> dict[str, Any] | None:
    """The training split's raw-feature quantiles (edgekit/population.py), or None for a run without them."""
    x = run.splits["train_features_raw"] if "train_features_raw" in run.splits else None
    if x is None or x.ndim != 2 or x.shape[1] != len(names):
        return None
    return population_mod.quantiles(x, names)


def write_bundle(run: Run, out: Path, parity: dict[str, Any], calibration: dict[str, Any],
                 outputs: dict[str, dict[str, np.ndarray]], sign_key: Path | None,
                 envelope: dict[str, Any] | None = None) -> Manifest:
    meta = run.meta
    test = outputs["test"]
    held: dict[str, np.ndarray] = {
        "x_raw": run.splits["test_features_raw"] if "test_features_raw" in run.splits else run.x("gate", "test"),
        "x_features": run.splits["test_features"], "y": test["y"], "probs": test["probs"],
        "score": test["score"], "second_probs": test["second"], "second_label": test["second_label"],
    }
    if "test_window" in run.splits:
        held["x_window"] = run.splits["test_window"]
    np.savez_compressed(out / "heldout.npz", **held)
    (out / "parity.json").write_text(json.dumps(parity, indent=2) + "\n", encoding="utf-8")
    shutil.copyfile(run.path / "run.json", out / "run.json")

    models = {}
    for role in ROLES:
        use = parity["models"][role]["use"]
        fp32_file = parity["models"][role]["fp32"]["file"]
        x = run.x(role, "test")
        models[role] = {"file": use["file"], "fp32_file": fp32_file,
                        "input": run.spec(role).input, "input_name": "x",
                        "input_shape": [None, *x.shape[1:]], "dtype": "float32",
                        "outputs": ROLES[role]["outputs"], "quantization": use["quantization"],
                        "quantization_reason": use["reason"]}
    inp = meta.input
    cal_report = {**calibration["calibration"], "models": {r: models[r]["file"] for r in models}}
    manifest = Manifest.model_validate({
        "schema": "edgekit.manifest/1",
        "task": meta.task,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "code_version": meta.code_version,
        "edgekit_version": edgekit.__version__,
        "data_fingerprint": meta.data_fingerprint,
        "labels": run.labels, "normal_label": meta.normal_label, "positive_label": meta.positive_label,
        "input": {"kind": inp.kind, "extractor": inp.extractor, "channels": inp.channels,
                  "rate_hz": inp.rate_hz, "window_size": inp.window_size, "window_hop": inp.window_hop,
                  "feature_names": inp.feature_names, "feature_params": inp.feature_params,
                  "imputation": meta.imputation.model_dump() if meta.imputation is not None else None,
                  "plausible": plausible_range(inp.channel_range.model_dump() if inp.channel_range else None),
                  "envelope": envelope, "baseline": inp.baseline,
                  "recording": inp.recording, "units": inp.units, "max_gap_s": inp.max_gap_s},
        "normalize": meta.normalize,
        "models": models,
        "thresholds": calibration["thresholds"],
        "gate_calibration": cal_report,
        "parity": _parity_summary(parity),
        "files": bundle_files(out),
        "population": _population(run, inp.feature_names),
    })
    write_manifest(out, manifest)
    if sign_key is not None:
        sign_bundle(out, sign_key)
    return manifest


def export(run_dir: Path, out: Path, *, int8: bool = True, sign_key: Path | None = None,
           target_error: float | None = None, progress: bool = True, prefer_int8: bool = False) -> dict:
    """Export a run directory to a bundle at `out`; returns the parity report (also out/parity.json).
    `prefer_int8` (implies `int8`): each role runs its INT8 model whenever it passes parity, even where it is
    not faster on this machine (parity.choose).

    Raises ExportError when a file the bundle uses fails parity (torch vs ONNX fp32 always counts).
    """
    from tqdm import tqdm

    run_dir, out = Path(run_dir), Path(out)
    run = load_run(run_dir)
    if out.exists() and any(out.iterdir()):
        raise ExportError("output directory is not empty", where=str(out),
                          hint="choose a new --out or remove the old bundle")
    if sign_key is not None and not Path(sign_key).is_file():
        raise ExportError("signing key not found", where=str(sign_key), hint="create one with `edgekit keygen`")
    target = float(target_error if target_error is not None else run.meta.gate.target_error)
    delta = float(run.meta.gate.delta)
    if not 0 < target < 1 or not 0 < delta < 1:
        raise ExportError(f"target_error and delta must be in (0, 1) (got {target}, {delta})",
                          where=f"{run_dir / 'run.json'}:gate")
    out.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=5, desc="export", disable=not progress)
    steps.set_postfix_str("onnx")
    exported = export_onnx(run, out)
    steps.update()
    steps.set_postfix_str("int8")
    quantized = quantize_models(run, out, exported) if int8 or prefer_int8 else {}
    steps.update()
    steps.set_postfix_str("parity")
    parity = check_parity(run, out, exported, quantized, prefer_int8=prefer_int8)
    steps.update()
    failed = [r for r, m in parity["models"].items() if not m["pass"]]
    if failed:
        (out / "parity.json").write_text(json.dumps(parity, indent=2) + "\n", encoding="utf-8")
        details = {r: parity["models"][r]["fp32"] for r in failed}
        steps.close()
        raise ExportError(f"parity failed for {failed}: {details}", where=str(out / "parity.json"),
                          hint="the ONNX graph does not reproduce the trained model; see parity.json")
    steps.set_postfix_str("calibrate")
    outputs = used_outputs(run, out, parity)
    envelope = input_envelope(run)
    calibration = recalibrate(run, outputs, target, delta, envelope)
    parity["gate_calibration"] = {**calibration["calibration"], "thresholds": calibration["thresholds"]}
    tradeoff.write(out, outputs, calibration, {s: envelope_outside(run, envelope, s) for s in ("cal", "test")},
                   run.meta.input)  # issue 15: error on accepted against share deferred, in the bundle's report
    steps.update()
    steps.set_postfix_str("bundle")
    manifest = write_bundle(run, out, parity, calibration, outputs, sign_key, envelope)
    steps.update()
    steps.close()
    log.info("export_done out=%s task=%s files=%d signed=%s", out, manifest.task, len(manifest.files),
             sign_key is not None)
    return parity
