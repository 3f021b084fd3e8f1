"""A training recipe: the TOML file `edgekit train` reads, as pydantic models loaded only by `load_recipe`.

Validators are pure (no files, no network); whether columns and files exist is checked when the data is
read (exporters/training/tasks.py raises DataError naming file and column). Must not import torch or sklearn.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from edgekit.config import Strict, load_config
from edgekit.manifest import PARAM_EXTRACTORS, FeatureParams, Recording
from edgekit.trial_features import REGISTRY as TRIAL_REGISTRY

WINDOW_LOADERS = ("recordings",)
TABLE_LOADERS = ("table",)
# Extractors of table rows: 'table' (any columns) and 'trial' (columns the agent computes per trial).
TABLE_EXTRACTORS = ("table", "trial")


class FileSet(Strict):
    """Some of the recordings under `data.path`, and what holds for all of them."""

    glob: str | list[str] = Field(description="Glob(s) relative to data.path, e.g. 'valve1/*.csv' or "
                                  "['a/*.csv', 'b/*.csv']; each glob's files in natural order (2 before 10).")
    label: str | None = Field(None, description="Every sample of these files has this label (overrides "
                              "[data.label]), e.g. a folder of normal recordings.")
    chunk_rows: int | None = Field(
        None, ge=2, description="Cut each of these files into chunks of this many rows, each its own split "
        "group, so one long recording reaches train, cal and test without a window straddling two splits.")


class LabelSpec(Strict):
    """Where a sample's label comes from, and which sample labels a window."""

    source: Literal["column", "folder", "pattern", "intervals", "sidecar", "files"] = Field(
        "column", description="'column': a column of the recording; 'folder': the file's folder name; "
        "'pattern': the group 'label' of data.name_pattern; 'intervals': a CSV (file, start, end, label); "
        "'sidecar': [start, end] pairs under keys of each recording's JSON sidecar (data.sidecar); 'files': "
        "only the labels of [[data.files]] sets.")
    column: str | None = Field(None, description="source 'column': the column holding the label.")
    map: dict[str, str] = Field(
        default_factory=dict, description="Cell value -> label name, e.g. {'0' = 'normal', '1' = 'anomaly'} "
        "(numbers compare as numbers: '1.0' matches '1'). Without it a cell is a label name or a class index.")
    intervals: str | None = Field(
        None, description="source 'intervals': CSV with columns file, start, end, label (file relative to "
        "data.path; start/end in `unit` from the recording's first sample; end exclusive).")
    keys: dict[str, str] = Field(
        default_factory=dict, description="source 'sidecar': label -> the sidecar's key holding [start, end] "
        "(or a list of them), applied in this order (a later label wins where two overlap).")
    unit: Literal["seconds", "samples"] = Field("seconds", description="Unit of interval starts and ends.")
    default: str | None = Field(None, description="intervals/sidecar: the label outside every interval.")
    at: Literal["last", "centre"] = Field(
        "last", description="The sample whose label the window gets: 'last' (the agent answers when a window "
        "completes: 'is it faulty now') or 'centre'.")


class DataSection(Strict):
    """Where the rows come from: recordings (windows over sample streams) or one table of feature rows."""

    loader: Literal["recordings", "table"] = Field(
        description="recordings: CSV/TSV sample streams in files (windows); table: any CSV/TSV with one row "
        "per example (features computed already)."
    )
    path: str | None = Field(
        None,
        description="File or folder. Relative to EDGEKIT_DATA_DIR (relative_to='data_dir') or to the recipe "
        "file (relative_to='recipe'). recordings and table need it.",
    )
    relative_to: Literal["data_dir", "recipe"] = Field(
        "data_dir", description="What a relative `path` is relative to: EDGEKIT_DATA_DIR or the recipe's folder."
    )
    files: list[FileSet] = Field(
        default_factory=lambda: [FileSet(glob="**/*.csv")],
        description="recordings: which files, in sets read in this order (default: every *.csv below path).")
    channels: list[str] | None = Field(None, description="recordings: the columns that are sensor channels, in "
                                       "the order the model gets them.")
    units: dict[str, str] = Field(default_factory=dict, description="recordings: channel -> unit, e.g. "
                                  "{Accel_X = 'm/s^2'}; recorded in the bundle.")
    layout: Recording | None = Field(
        None, description="recordings: how a file holds samples (delimiter, header_line, time_column + "
        "time_format or rate_hz / rate_pattern); becomes the bundle's input.recording, what replay reads.")
    label: LabelSpec | None = Field(None, description="recordings: where labels come from.")
    name_pattern: str | None = Field(
        None, description="recordings: regular expression searched in each file's path relative to data.path; "
        "its named groups (e.g. (?P<subject>\\d+)) are the file's fields for splits.group_by, "
        "group_columns and data.sidecar.")
    sidecar: str | None = Field(
        None, description="recordings: a JSON file beside each recording, named with {stem}, {name} or "
        "name_pattern fields, e.g. '{subject}-{trial}.json'; its scalar values are the file's fields too.")
    max_gap_s: float | None = Field(
        None, gt=0, description="recordings: a step in time longer than this (dropped lines make steps "
        "too) splits the recording; no window spans it, in training or on the agent. Default: 3 sample periods.")
    max_files: int | None = Field(
        None, ge=1, description="Use only the first N recordings (in the readers' stable order); for quick runs."
    )
    features: list[str] | None = Field(
        None, description="table: feature columns, in order."
    )
    target: str | None = Field(
        None, description="table: target column holding class indices 0..K-1 in the order of `labels`."
    )
    exclude_column: str | None = Field(
        None, description="table: rows where this column is 1 are dropped."
    )
    group_columns: list[str] = Field(
        default_factory=list,
        description="Categorical values reported per group in the training report: table columns, or for "
        "recordings the files' fields ('folder', name_pattern groups, sidecar values, e.g. Gender).",
    )
    age_column: str | None = Field(
        None, description="Numeric age column (table) or file field (recordings, e.g. a sidecar's Age) whose "
        "bands become a report group 'age_band'.",
    )
    age_bands: list[float] = Field(
        default_factory=list, description="Band edges for age_band, ascending, e.g. [75, 85] -> <75, 75-85, >=85."
    )
    imputation: Literal["median", "none"] = Field(
        "none",
        description="table: 'median' fills empty cells with the TRAIN split's column median (recorded in "
        "run.json 'imputation'); 'none' makes an empty cell a DataError.",
    )

    @field_validator("age_bands")
    @classmethod
    def _ascending(cls, v: list[float]) -> list[float]:
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"must be strictly ascending (got {v})")
        return v

    @field_validator("features")
    @classmethod
    def _unique_features(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if not v:
                raise ValueError("must name at least one column")
            dup = sorted({c for c in v if v.count(c) > 1})
            if dup:
                raise ValueError(f"columns named twice: {dup}")
        return v

    @field_validator("name_pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a regular expression ({exc})") from None
        return v

    def resolved_path(self) -> str:
        return self.path or ""


class WindowSection(Strict):
    size: int = Field(gt=1, description="Samples per window.")
    hop: int = Field(gt=0, description="Samples between window starts (size = no overlap).")


class BaselineSection(Strict):
    """Commissioning (edgekit/baseline.py): the models see each machine's features relative to its own
    first windows, in training (each recording's first `windows`) and on the device (its first `windows`,
    a baseline file, or again on command)."""

    windows: int = Field(
        ge=2, description="Windows of a machine's normal that make its baseline: each recording's first ones in "
        "training, the device's first ones on the agent (deferred as 'commissioning', never answered). E.g. "
        "SKAB's protocol fits on the first 400 rows of a file: with windows of 32 rows every 4, the 93 windows "
        "that end inside them.")
    std_floor: float = Field(
        0.1, gt=0, le=10, description="A baseline std below this fraction of the feature's spread over the "
        "training split (its std over every train window) is raised to it: a feature that did not move during "
        "commissioning does not make every later wobble a huge deviation.")


class FeaturesSection(Strict):
    extractor: Literal["machine", "gait", "spectral", "table", "trial"] = Field(
        description="edgekit.features extractor for windows ('machine': statistics and thirds of the spectrum per "
        "channel; 'gait': a lower-back IMU's; 'spectral': statistics and bands in Hz, configured by `params`), "
        "or 'table' when the rows are features already, or 'trial' when they are and every data.features column "
        "is a trial feature the agent computes from one walked test (edgekit/trial_features.py REGISTRY)."
    )
    params: FeatureParams | None = Field(
        None, description="'spectral' only: statistics, bands in Hz and the envelope option (edgekit/manifest.py "
        "FeatureParams); null: its defaults (time and spectral statistics, no bands)."
    )

    @model_validator(mode="after")
    def _params_for_extractor(self) -> FeaturesSection:
        if self.params is not None and self.extractor not in PARAM_EXTRACTORS:
            raise ValueError(f"extractor {self.extractor!r} takes no params (only {', '.join(PARAM_EXTRACTORS)} "
                             "does); remove [features.params]")
        return self


class PredictorSection(Strict):
    arch: Literal["mlp", "cnn1d"] = Field("mlp", description="mlp on features, or cnn1d on the raw window.")
    hidden: list[int] = Field(
        default_factory=lambda: [64, 32], description="mlp: hidden layer widths; cnn1d: [conv width]."
    )
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout before each hidden/last layer.")
    epochs: int = Field(30, ge=1, description="Passes over the training split.")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay.")
    batch_size: int = Field(64, ge=1, description="Rows per optimiser step.")

    @field_validator("hidden")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(h < 1 for h in v):
            raise ValueError(f"must be a non-empty list of positive widths (got {v})")
        return v


class AutoencoderSection(Strict):
    hidden: list[int] = Field(default_factory=lambda: [32, 8], description="Encoder widths; the last is the code.")
    epochs: int = Field(50, ge=1, description="Passes over the normal training rows.")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate.")
    batch_size: int = Field(64, ge=1, description="Rows per optimiser step.")
    normal: str | None = Field(
        None, description="The label whose training rows are 'normal' (default: the first of `labels`)."
    )
    fit_on: Literal["normal", "all"] = Field(
        "normal",
        description="'normal': fit on training rows of the normal label only (anomaly tasks); 'all': every "
        "training row (multi-class tasks where every class is in-distribution, e.g. gait phases).",
    )

    @field_validator("hidden")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(h < 1 for h in v):
            raise ValueError(f"must be a non-empty list of positive widths (got {v})")
        return v


class SecondOpinionSection(Strict):
    kind: Literal["random_forest", "svm"] = Field(
        "random_forest", description="scikit-learn RandomForestClassifier or SVC(probability=True)."
    )
    params: dict[str, int | float | str | bool | None] = Field(
        default_factory=dict,
        description="Constructor arguments for the estimator (checked against scikit-learn when training).",
    )


class SplitsSection(Strict):
    cal: float = Field(0.2, gt=0, lt=1, description="Fraction for calibration (gate thresholds); never trained on.")
    test: float = Field(0.2, gt=0, lt=1, description="Fraction held out for the final metrics; never fitted on.")
    group_by: str | None = Field(
        None, description="recordings: keep all windows of one recording ('file') or of one value of a file "
        "field (e.g. 'subject' from data.name_pattern) in one split."
    )

    @field_validator("test")
    @classmethod
    def _room_to_train(cls, v: float, info: ValidationInfo) -> float:
        cal = info.data.get("cal")
        if cal is not None and cal + v > 0.8:
            raise ValueError(f"cal + test must leave at least 20% to train (cal={cal}, test={v})")
        return v


class GateSection(Strict):
    target_error: float = Field(
        0.05, gt=0, lt=1, description="Wanted error rate on accepted cases; the gate defers the rest."
    )
    delta: float = Field(0.1, gt=0, lt=1, description="Allowed probability that the guarantee fails.")


class ExtraLabelsSection(Strict):
    """What a reviewer's labels mean to this recipe (`edgekit train --extra-labels`, issue 15). A label that is
    neither one of the recipe's labels, nor mapped, nor skipped here stops training with a list of them: a
    typed label is never guessed."""

    map: dict[str, str] = Field(default_factory=dict, description="A reviewer's label -> one of the recipe's "
                                "labels, e.g. { \"valve closed\" = \"anomaly\" }.")
    skip: list[str] = Field(default_factory=list, description="Reviewers' labels left out of training (counted), "
                            "e.g. [\"sensor fault\"]: a broken sensor is no example of the machine's states.")


class Recipe(Strict):
    """A whole recipe. Field order matters: later validators look at earlier sections."""

    task: str = Field(min_length=1, description="Name of the task; becomes the model name in the bundle.")
    seed: int = Field(0, description="Seed for splits, weight init and batch order.")
    labels: list[str] = Field(description="Class names in index order; the first is 'normal' unless set.")
    data: DataSection = Field(description="Where the rows come from.")
    window: WindowSection | None = Field(
        None, validate_default=True, description="Window size and hop in samples (recordings only)."
    )
    features: FeaturesSection = Field(description="Feature extractor.")
    baseline: BaselineSection | None = Field(
        None, description="Each machine's own baseline (commissioning): null for models of absolute levels.")
    predictor: PredictorSection = Field(default_factory=PredictorSection, description="The classifier.")
    autoencoder: AutoencoderSection = Field(
        default_factory=AutoencoderSection, description="Out-of-distribution scorer for the gate."
    )
    second_opinion: SecondOpinionSection = Field(
        default_factory=SecondOpinionSection, description="A different model family; disagreement defers."
    )
    splits: SplitsSection = Field(default_factory=SplitsSection, description="Train / cal / test split.")
    gate: GateSection = Field(default_factory=GateSection, description="What the gate promises.")
    extra_labels: ExtraLabelsSection = Field(
        default_factory=ExtraLabelsSection, description="Reviewers' labels this recipe maps or skips.")

    @field_validator("extra_labels")
    @classmethod
    def _mapped_to_labels(cls, v: ExtraLabelsSection, info: ValidationInfo) -> ExtraLabelsSection:
        labels = info.data.get("labels") or []
        bad = {k: t for k, t in v.map.items() if t not in labels}
        if bad:
            raise ValueError(f"map sends {bad} to labels the recipe does not have (labels: {labels})")
        both = sorted(set(v.map) & set(v.skip))
        if both:
            raise ValueError(f"{both} both mapped and skipped")
        return v

    @field_validator("task")
    @classmethod
    def _name_safe(cls, v: str) -> str:
        bad = set(v) & set("/\\+#$ ")
        if bad:
            raise ValueError(f"must not contain {''.join(sorted(bad))!r} (used in paths and topics; got {v!r})")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: list[str]) -> list[str]:
        if len(v) < 2:
            raise ValueError(f"needs at least two classes (got {v})")
        if len(set(v)) != len(v):
            raise ValueError(f"names a class twice (got {v})")
        return v

    @field_validator("data")
    @classmethod
    def _loader_keys(cls, v: DataSection, info: ValidationInfo) -> DataSection:
        need = {"table": ("path", "features", "target"), "recordings": ("path", "channels", "layout", "label")}
        missing = [k for k in need.get(v.loader, ()) if getattr(v, k) is None]
        if missing:
            raise ValueError(f"loader {v.loader!r} needs {', '.join(missing)}")
        if v.loader == "recordings":
            _check_recordings(v, info.data.get("labels") or [])
        return v

    @field_validator("window")
    @classmethod
    def _window_for_loader(cls, v: WindowSection | None, info: ValidationInfo) -> WindowSection | None:
        data = info.data.get("data")
        if data is None:
            return v
        if data.loader in WINDOW_LOADERS and v is None:
            raise ValueError(f"[window] is required for loader {data.loader!r}")
        if data.loader in TABLE_LOADERS and v is not None:
            raise ValueError(f"[window] does not apply to loader {data.loader!r}: its rows are features already")
        if v is not None and v.hop > v.size:
            raise ValueError(f"hop {v.hop} > size {v.size} would skip samples")
        return v

    @field_validator("features")
    @classmethod
    def _extractor_for_loader(cls, v: FeaturesSection, info: ValidationInfo) -> FeaturesSection:
        data = info.data.get("data")
        if data is not None and (data.loader in TABLE_LOADERS) != (v.extractor in TABLE_EXTRACTORS):
            use = "'table' or 'trial'" if data.loader in TABLE_LOADERS else "a window extractor (e.g. 'machine', 'gait')"
            raise ValueError(f"extractor {v.extractor!r} does not fit loader {data.loader!r}; use {use}")
        if data is not None and v.extractor == "trial":
            unknown = [c for c in data.features or [] if c not in TRIAL_REGISTRY]
            if unknown:
                raise ValueError(f"extractor 'trial' needs every data.features column to be a trial feature; not in "
                                 f"the registry: {unknown} (its names: {', '.join(TRIAL_REGISTRY)})")
        return v

    @field_validator("baseline")
    @classmethod
    def _baseline_for_windows(cls, v: BaselineSection | None, info: ValidationInfo) -> BaselineSection | None:
        data, window = info.data.get("data"), info.data.get("window")
        if v is None or data is None:
            return v
        if data.loader not in WINDOW_LOADERS or window is None:
            raise ValueError(f"needs windows over recordings (loader 'recordings' and a [window] section); loader "
                             f"{data.loader!r} gives one row per case, which has no first windows to learn from")
        for i, fs in enumerate(data.files):
            if fs.chunk_rows is None:
                continue
            per_chunk = max(0, (fs.chunk_rows - window.size) // window.hop + 1)
            if per_chunk <= v.windows:
                raise ValueError(f"windows = {v.windows} leaves nothing to train on in data.files[{i}]'s chunks: "
                                 f"chunk_rows = {fs.chunk_rows} gives {per_chunk} windows of {window.size} every "
                                 f"{window.hop} per chunk, and each chunk's first {v.windows} are its baseline; "
                                 "raise chunk_rows or lower windows")
        return v

    @field_validator("predictor")
    @classmethod
    def _arch_for_loader(cls, v: PredictorSection, info: ValidationInfo) -> PredictorSection:
        data = info.data.get("data")
        if data is not None and v.arch == "cnn1d":
            if data.loader not in WINDOW_LOADERS:
                raise ValueError(f"arch 'cnn1d' needs windows; loader {data.loader!r} gives a table (use 'mlp')")
            if len(v.hidden) != 1:
                raise ValueError(f"cnn1d takes one conv width in hidden (got {v.hidden})")
            window = info.data.get("window")
            if window is not None and window.size < 4:  # training/models.py CNN1D: two 2x poolings
                raise ValueError(f"cnn1d needs windows of at least 4 samples (window.size is {window.size})")
        return v

    @field_validator("autoencoder")
    @classmethod
    def _normal_is_a_label(cls, v: AutoencoderSection, info: ValidationInfo) -> AutoencoderSection:
        labels = info.data.get("labels")
        if labels and v.normal is not None and v.normal not in labels:
            raise ValueError(f"normal {v.normal!r} is not one of labels {labels}")
        return v

    @field_validator("splits")
    @classmethod
    def _group_for_loader(cls, v: SplitsSection, info: ValidationInfo) -> SplitsSection:
        data = info.data.get("data")
        if data is not None and v.group_by is not None and data.loader in TABLE_LOADERS:
            raise ValueError(f"group_by {v.group_by!r} needs recordings; loader {data.loader!r} is one table")
        return v

    @property
    def normal_label(self) -> str:
        return self.autoencoder.normal or self.labels[0]

    @property
    def positive_label(self) -> str | None:
        """The 'positive' class of a binary task: the label that is not normal; None for multi-class."""
        if len(self.labels) != 2:
            return None
        return next(lab for lab in self.labels if lab != self.normal_label)


def _check_recordings(v: DataSection, labels: list[str]) -> None:
    """A recordings section's labels name classes of `labels`, and each label source has its keys."""
    spec = v.label
    assert spec is not None
    named = [fs.label for fs in v.files if fs.label is not None] + list(spec.map.values()) + list(spec.keys)
    named += [spec.default] if spec.default is not None else []
    unknown = sorted({n for n in named if n not in labels})
    if labels and unknown:
        raise ValueError(f"labels {unknown} are not in labels {labels}")
    need = {"column": "column", "intervals": "intervals", "sidecar": "keys"}.get(spec.source)
    if need and not getattr(spec, need):
        raise ValueError(f"label.source {spec.source!r} needs label.{need}")
    if spec.source == "sidecar" and v.sidecar is None:
        raise ValueError("label.source 'sidecar' needs data.sidecar (the JSON file beside each recording)")
    if spec.source == "pattern" and "(?P<label>" not in (v.name_pattern or ""):
        raise ValueError("label.source 'pattern' needs a group (?P<label>...) in data.name_pattern")
    if spec.source == "files" and any(fs.label is None for fs in v.files):
        raise ValueError("label.source 'files' needs a label on every [[data.files]] set")
    units = sorted(set(v.units) - set(v.channels or []))
    if units:
        raise ValueError(f"units name {units}, which are not channels")


def load_recipe(path: Path | str, overrides: dict[str, object] | None = None) -> Recipe:
    """The one way a recipe file becomes a Recipe; errors read `file: key: message (got X)`."""
    return load_config(path, Recipe, overrides=overrides)
