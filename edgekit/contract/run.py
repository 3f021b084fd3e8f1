"""run.json as one typed model: what training writes into a run directory (exporters/training/train.py
`write_run`) and export reads back (exporters/export/export.py `read_run`); tests build fake runs with it.

A run directory holds:

    run.json            RunMeta (below); additive keys are kept, nothing is renamed
    splits.npz          for split in SPLITS (train, cal, test):
                          {split}_features      float32 (n, F) NORMALISED ((raw - mean) / std; with an
                                                input.baseline, of the features relative to their recording's
                                                baseline, whose own windows are in no split)
                          {split}_features_raw  float32 (n, F) before normalisation (after imputation)
                          {split}_window        float32 (n, C, W) NORMALISED per channel (cnn1d tasks only)
                          {split}_window_min    float64 (n, C) each raw window's per-channel min (window
                          {split}_window_max    tasks; NaN for extra-label rows), max: export's envelope
                          {split}_y             int64 (n,) index into labels
                          {split}_group         str (n,) the split group (file/subject), when group_by is set
    predictor.pt, autoencoder.pt   training/models.save_checkpoint (load with load_checkpoint)
    second_opinion.pkl  pickled scikit-learn estimator, fitted on NORMALISED features; its class is the argmax
                        of predict_proba (for SVC that can differ from predict())
    report/index.html   plots and tables (training/report.py)

Imports nothing from the programs that use it (.importlinter): pydantic, numpy and the other contracts only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from edgekit.errors import ExportError
from edgekit.manifest import (
    OPTIONAL_INPUT_KEYS,
    BaselineSpec,
    Extractor,
    FeatureParams,
    InputKind,
    Normalize,
    Recording,
    omit_absent,
)

SCHEMA = "edgekit.run/1"
RUN_FILE = "run.json"
SPLITS = ("train", "cal", "test")


class _Part(BaseModel):
    # extra="allow": a newer trainer may add keys (the contract is additive); they survive a read and a write.
    model_config = ConfigDict(extra="allow", frozen=True)


class ChannelRange(_Part):
    min: list[float] = Field(description="Per channel: the lowest raw sample of the train split's windows.")
    max: list[float] = Field(description="Per channel: the highest raw sample of the train split's windows.")


class RunInput(_Part):
    kind: InputKind = Field(description="'window': sliding windows over a sample stream; 'table': one row per "
                            "case.")
    extractor: Extractor = Field(description="Feature extractor of the windows ('table' for table rows).")
    channels: list[str] | None = Field(None, description="Raw channels in window order; null for a table.")
    rate_hz: float | None = Field(None, description="Sample rate of the recordings; null for a table.")
    window_size: int | None = Field(None, description="Samples per window; null for a table.")
    window_hop: int | None = Field(None, description="Samples between window starts; null for a table.")
    feature_names: list[str] = Field(description="The feature vector's names, in model input order.")
    feature_params: FeatureParams | None = Field(
        None, description="The recipe's [features] params (bands in Hz, statistics); absent when the extractor "
        "takes none. Export copies it into the manifest's input.")
    channel_range: ChannelRange | None = Field(
        None, description="Raw samples of the train split's windows; export widens it into the manifest's "
        "plausible range. Null for a table.")
    recording: Recording | None = Field(
        None, description="The recordings' file layout, which the agent's replay reads by default.")
    units: dict[str, str] | None = Field(None, description="Unit of each channel, from the recipe's data.units.")
    max_gap_s: float | None = Field(None, description="The longest step in time inside one segment of the "
                                    "recordings (longer ones split them); null for a table.")
    baseline: BaselineSpec | None = Field(
        None, description="The recipe's [baseline] as training applied it (each recording relative to its own "
        "first windows); absent without one. Export copies it into the manifest's input.")

    @model_validator(mode="after")
    def _names_follow_params(self) -> RunInput:
        # A loader that computed features without the recipe's params must not write a run that says it used
        # them: the agent would compute other features than the models were trained on.
        if self.feature_params is not None and self.feature_names != self.feature_params.names(self.channels or []):
            raise ValueError(f"feature_names ({len(self.feature_names)}, starting {self.feature_names[:2]}) are not "
                             f"the ones feature_params give over channels {self.channels}")
        return self

    @model_serializer(mode="wrap")
    def _omit_no_params(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        # Left out rather than null: run.json of an extractor without parameters (a table) stays what it was.
        return omit_absent(handler(self), self, OPTIONAL_INPUT_KEYS)


class Imputation(_Part):
    method: Literal["median"] = Field(description="How an empty cell is filled.")
    values: dict[str, float] = Field(description="Column -> its train-split median.")
    missing: dict[str, int] = Field(description="Column -> empty cells over all rows (columns with none left out).")


class PredictorModel(_Part):
    file: str = Field(description="Checkpoint file in the run directory.")
    arch: Literal["mlp", "cnn1d"] = Field(description="Architecture (training/models.py).")
    input: Literal["features", "window"] = Field(description="Normalised features or normalised windows.")


class AutoencoderModel(_Part):
    file: str = Field(description="Checkpoint file in the run directory.")
    arch: Literal["dense_ae"] = Field(description="Architecture (training/models.py).")
    input: Literal["features"] = Field(description="Normalised features.")
    fit_on: Literal["normal", "all"] = Field(
        "normal", description="Training rows it was fitted on: those of normal_label, or all (multi-class tasks); "
        "the cal rows that set its OOD threshold are the same kind.")


class SecondOpinionModel(_Part):
    file: str = Field(description="Pickled scikit-learn estimator in the run directory.")
    kind: str = Field(description="Estimator kind of the recipe, e.g. 'random_forest' or 'svm'.")
    input: Literal["features"] = Field(description="Normalised features.")


class RunModels(_Part):
    predictor: PredictorModel = Field(description="The classifier (torch).")
    autoencoder: AutoencoderModel = Field(description="The gate's out-of-distribution score (torch).")
    second_opinion: SecondOpinionModel = Field(description="The independent classifier (scikit-learn).")


class GateTarget(_Part):
    target_error: float = Field(description="Error rate allowed among accepted cases (export calibrates to it).")
    delta: float = Field(description="Allowed probability that the calibration guarantee fails.")


class RunMeta(_Part):
    """run.json. Normalisation: mean/std of the TRAIN split (std floored at 1e-6); test is never used for
    fitting or calibration. Extra labels join the train split only, after the split."""

    schema_: Literal["edgekit.run/1"] = Field(SCHEMA, alias="schema", description="Schema version.")
    task: str = Field(description="Task name from the recipe.")
    recipe: dict[str, Any] = Field(description="The validated recipe, as trained (overrides applied).")
    seed: int = Field(description="Seed of splits, weights and batch order.")
    device: Literal["cpu", "cuda"] = Field(description="Where the torch models were trained.")
    labels: list[str] = Field(min_length=1, description="Class names in output order.")
    normal_label: str = Field(description="The label meaning 'nothing wrong'.")
    positive_label: str | None = Field(None, description="Binary tasks: the label that is not normal.")
    input: RunInput = Field(description="What the models' inputs are built from.")
    normalize: Normalize = Field(description="Train-split statistics of the features (and windows, cnn1d).")
    imputation: Imputation | None = Field(None, description="How empty table cells were filled, or null.")
    data_fingerprint: str = Field("", description="sha256 hex over the raw data files' bytes (sorted by path), "
                                  "then the extra-labels file's bytes.")
    models: RunModels = Field(description="The three models and their files.")
    gate: GateTarget = Field(description="The recipe's gate target.")
    metrics: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Split -> metrics of the torch models and the second opinion.")
    groups_metrics: dict[str, dict[str, dict[str, Any]]] = Field(
        default_factory=dict, description="Report group -> value -> test-split metrics.")
    split_sizes: dict[str, int] = Field(default_factory=dict, description="Split -> rows.")
    extra_labels_added: int = Field(0, description="Rows of extra labels joined to the train split.")
    extra_labels_skipped: dict[str, Any] = Field(
        default_factory=dict, description="{'unknown_label': {label: rows}, 'unreadable_features': rows, 'without_baseline': rows (a "
        "[baseline] recipe's rows without features relative to a device baseline)}; {} without extra labels.")
    history: dict[str, dict[str, list[float | None]]] = Field(
        default_factory=dict, description="Model -> split -> loss per epoch (null where not finite).")
    predictor_best_epoch: int | None = Field(
        None, description="0-based epoch whose weights predictor.pt holds: the lowest cal loss, or the last "
        "epoch when cal has fewer than 200 rows.")
    train_seconds: float | None = Field(None, description="Wall time of the training run.")
    created_at: str = Field(description="UTC time of training, ISO 8601.")
    code_version: str = Field("", description="edgekit version that trained it.")

    @field_validator("normal_label", "positive_label")
    @classmethod
    def _one_of_labels(cls, value: str | None, info: Any) -> str | None:
        labels = info.data.get("labels")
        if value is not None and labels is not None and value not in labels:
            raise ValueError(f"{info.field_name} {value!r} is not one of labels {labels}")
        return value

    @property
    def normal_index(self) -> int:
        return self.labels.index(self.normal_label)

    @property
    def positive_index(self) -> int | None:
        return None if self.positive_label is None else self.labels.index(self.positive_label)


def _json_safe(o: Any) -> Any:
    """JSON-safe copy: numpy scalars become Python numbers, NaN/inf become null."""
    if isinstance(o, dict):
        return {k: _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, (float, np.floating)):
        return float(o) if math.isfinite(o) else None
    return o


def encode(meta: RunMeta) -> str:
    """run.json's text: indented, key order as declared, NaN and inf as null."""
    return json.dumps(_json_safe(meta.model_dump(by_alias=True)), indent=2, allow_nan=False)


def write_run(run_dir: Path, meta: RunMeta) -> RunMeta:
    """Write run_dir/run.json; returns what it holds now, as `read_run` will see it (non-finite values null)."""
    text = encode(meta)
    (Path(run_dir) / RUN_FILE).write_text(text)
    return RunMeta.model_validate_json(text)


def read_run(run_dir: Path) -> RunMeta:
    """Read and check run_dir/run.json. ExportError names the file and the key on failure."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise ExportError(f"{RUN_FILE} not found", where=str(path), hint="pass a directory written by `edgekit train`")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ExportError(f"not valid JSON: {exc}", where=str(path)) from None
    if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
        got = raw.get("schema") if isinstance(raw, dict) else type(raw).__name__
        raise ExportError(f"schema must be {SCHEMA!r} (got {got!r})", where=f"{path}:schema")
    try:
        return RunMeta.model_validate(raw)
    except ValidationError as exc:
        raise _export_error(exc, path) from None


def _export_error(exc: ValidationError, path: Path) -> ExportError:
    """The first problem pydantic found, as an ExportError naming run.json and the dotted key."""
    err = exc.errors(include_url=False)[0]
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "missing":
        return ExportError(f"missing key {key!r}", where=f"{path}:{key}",
                           hint="was this run written by `edgekit train` of this version?")
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] != "value_error":
        message = f"{key}: {message} (got {err['input']!r:.80})"
    return ExportError(message, where=f"{path}:{key}")
