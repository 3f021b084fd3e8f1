"""The bundle manifest: one schema written by the exporter and read by the agent, plus hashing and signing.

A bundle is a directory: manifest.json (this schema), manifest.sig (optional Ed25519 signature over the exact
bytes of manifest.json), and every other file listed in `files` with its sha256, so the signature covers all of
them. Must not import torch or onnx: the agent imports this (numpy, pydantic, cryptography, hashlib only).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

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

from edgekit.errors import ModelError

log = logging.getLogger(__name__)

SCHEMA = "edgekit.manifest/1"
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
Role = Literal["predictor", "gate", "second_opinion"]
InputKind = Literal["window", "table"]
Extractor = Literal["machine", "gait", "spectral", "table", "trial"]
# The extractors that take FeatureParams (edgekit/features.py); the others take none.
PARAM_EXTRACTORS = ("spectral",)
TimeStat = Literal["mean", "std", "rms", "peak", "ptp", "crest", "kurtosis", "skewness"]
SpectralStat = Literal["centroid_hz", "spread_hz", "entropy", "dominant_hz"]
TIME_STATS: tuple[TimeStat, ...] = ("mean", "std", "rms", "peak", "ptp", "crest", "kurtosis", "skewness")
SPECTRAL_STATS: tuple[SpectralStat, ...] = ("centroid_hz", "spread_hz", "entropy", "dominant_hz")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class PlausibleRange(_Strict):
    low: list[float] = Field(description="Per channel (input.channels order): the lowest plausible sample.")
    high: list[float] = Field(description="Per channel: the highest plausible sample.")
    basis: str = Field(description="How the range was set, e.g. 'training range widened by 1 span each side'.")


class ChannelEnvelope(_Strict):
    low: list[float] = Field(description="Per channel (input.channels order): a window with a sample below this is "
                             "deferred as 'out_of_range:<channel>'.")
    high: list[float] = Field(description="Per channel: a window with a sample above this is deferred as "
                              "'out_of_range:<channel>'.")
    stuck_below: list[float] = Field(description="Per channel: a window whose spread (max - min) is below this is "
                                     "still; still in `stuck_after` windows in a row, it is deferred as "
                                     "'stuck:<channel>'; 0: never stuck.")
    stuck_after: list[int] | None = Field(None, description="Per channel: how many still windows in a row make it "
                                          "stuck: 1 for a channel that always moves in training, more for one "
                                          "that is still now and then (twice its longest still run there, plus "
                                          "one); absent: 1 for every channel.")

    @model_serializer(mode="wrap")
    def _omit_no_runs(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        return omit_absent(handler(self), self, ("stuck_after",))  # older bundles keep their bytes


class FeatureEnvelope(_Strict):
    low: list[float] = Field(description="Per feature (input.feature_names order): a raw feature below this defers "
                             "the window as 'feature_range:<feature>'.")
    high: list[float] = Field(description="Per feature: a raw feature above this defers the window as "
                              "'feature_range:<feature>'.")


class RelationEnvelope(_Strict):
    """How the channels move together in training (edgekit/plausible.py ChannelRelations): per channel, linear
    models of its window level and log spread (relation_stats) from the other channels', and the range of
    their residuals; a window outside one is deferred as 'relation:<channel>', naming the channel that best
    explains it. C channels; model set 0 uses every other channel, set e + 1 leaves channel e out too."""

    log_level: list[bool] = Field(description="Per channel: its level is taken as a log (its training windows "
                                  "never reached 0).")
    level_floor: list[float] = Field(description="Per channel: a level (of a log_level channel) is at least "
                                     "this before its log.")
    spread_floor: list[float] = Field(description="Per channel: a spread is at least this before its log.")
    mean: list[float] = Field(description="2C: each statistic's mean over the train split (levels, then spreads).")
    std: list[float] = Field(description="2C: each statistic's standard deviation there (> 0).")
    weights: list[list[list[list[float]]]] = Field(description="(C + 1) x C x 2 x (2C + 1): per model set, "
                                                   "channel and statistic (level, spread), the coefficients on "
                                                   "the 2C standardised statistics, then the intercept.")
    low: list[list[list[float]]] = Field(description="(C + 1) x C x 2: the lowest residual; set e + 1's "
                                         "channel e unused.")
    high: list[list[list[float]]] = Field(description="(C + 1) x C x 2: the highest residual.")

    @model_validator(mode="after")
    def _shapes(self) -> RelationEnvelope:
        c = len(self.log_level)
        want = {"level_floor": (c,), "spread_floor": (c,), "mean": (2 * c,), "std": (2 * c,),
                "weights": (c + 1, c, 2, 2 * c + 1), "low": (c + 1, c, 2), "high": (c + 1, c, 2)}
        for key, shape in want.items():
            value = getattr(self, key)
            got = _shape(value, len(shape))
            if got != shape:
                raise ValueError(f"relations.{key} must be {' x '.join(map(str, shape))} for {c} channels "
                                 f"(got {' x '.join(map(str, got)) or 'ragged'})")
            if not all(math.isfinite(v) for v in _flat(value)):
                raise ValueError(f"relations.{key} must be finite")
        if not all(v > 0 for v in self.std) or not all(v > 0 for v in self.spread_floor):
            raise ValueError("relations.std and relations.spread_floor must be > 0")
        if not all(lo <= hi for lo, hi in zip(_flat(self.low), _flat(self.high))):
            raise ValueError("relations: every low must be <= its high")
        return self


def _shape(value: Any, depth: int) -> tuple[int, ...]:
    """A nested list's shape to `depth`, () when ragged."""
    shape = []
    level = [value]
    for _ in range(depth):
        sizes = {len(v) if isinstance(v, list) else -1 for v in level}
        if len(sizes) != 1 or -1 in sizes:
            return ()
        shape.append(sizes.pop())
        level = [x for v in level for x in v]
    return tuple(shape) if all(not isinstance(v, list) for v in level) else ()


def _flat(value: Any) -> list[float]:
    return [x for v in value for x in _flat(v)] if isinstance(value, list) else [value]


class InputEnvelope(_Strict):
    """What the training data showed, per channel and per feature (edgekit/plausible.py EnvelopeCheck): inside
    the plausible range but outside this envelope, no model is trusted and the window is deferred with a
    reason naming the channel or feature. Written by export from the run's train and cal splits."""

    channels: ChannelEnvelope | None = Field(None, description="Per-channel range and stuck detection; null "
                                             "when the run recorded no window extremes.")
    features: FeatureEnvelope | None = Field(None, description="Per-feature range; null: none.")
    relations: RelationEnvelope | None = Field(None, description="How the channels move together; absent: not "
                                               "checked (a bundle exported before it, or fewer than 2 channels).")
    basis: str = Field(description="How the bounds were set (quantiles, margins, splits).")

    @model_serializer(mode="wrap")
    def _omit_no_relations(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
                           ) -> dict[str, Any]:
        return omit_absent(handler(self), self, ("relations",))  # older bundles keep their bytes


class BaselineSpec(_Strict):
    """Commissioning (edgekit/baseline.py): the models were trained on each recording's features relative to
    its own first `windows` windows; the agent learns a device's baseline the same way before it answers."""

    windows: int = Field(ge=2, description="Windows a device's baseline is learned from (deferred as "
                         "'commissioning' meanwhile).")
    std_floor: float = Field(gt=0, description="A baseline std is floored at this fraction of the feature's `spread`.")
    spread: list[float] = Field(description="Per feature (input.feature_names order): its std over the training "
                                "split's windows, before any baseline.")
    basis: str = Field(description="How training applied it, in words.")

    @field_validator("spread")
    @classmethod
    def _finite(cls, v: list[float]) -> list[float]:
        if not all(math.isfinite(x) and x >= 0 for x in v):
            raise ValueError("every spread must be finite and >= 0")
        return v


class Recording(_Strict):
    """How a recorded file holds samples: the training data's layout, so the agent replays a recording in the
    same layout without knowing which dataset it came from (edgekit/source.py ReplayReader). Data lines start
    after `header_line`; blank lines are skipped."""

    delimiter: str = Field(",", min_length=1, max_length=1, description="Cell separator, e.g. ',', ';' or a tab.")
    header_line: int = Field(1, ge=1, description="1-based line holding the column names.")
    time_column: str | None = Field(None, description="Column with each sample's time; null: the sample clock "
                                    "(line number / rate) is the time.")
    time_format: Literal["iso", "seconds"] = Field(
        "iso", description="'iso': naive ISO 8601 timestamps, read as UTC; 'seconds': a number of seconds.")
    rate_hz: float | None = Field(None, gt=0, description="Sample rate. Null: read with rate_pattern, or the "
                                  "median step of the time column.")
    rate_pattern: str | None = Field(None, description="Regular expression with one group, searched in the lines "
                                     "above the header for the sample rate in Hz (e.g. 'frequency: ([0-9.]+) Hz').")
    counter_column: str | None = Field(None, description="A packet counter checked never to go back (a line whose "
                                       "counter does is quarantined); it may wrap at counter_wrap.")
    counter_wrap: int | None = Field(None, gt=1, description="The counter's modulus (65536 for 16 bits): a drop of "
                                     "more than half of it is a wrap, not a rewind.")

    @model_validator(mode="after")
    def _usable(self) -> Recording:
        if self.time_column is None and self.rate_hz is None and self.rate_pattern is None:
            raise ValueError("without a time_column, give rate_hz or rate_pattern (the sample clock)")
        if self.rate_pattern is not None:
            try:
                groups = re.compile(self.rate_pattern).groups
            except re.error as exc:
                raise ValueError(f"rate_pattern is not a regular expression ({exc})") from None
            if groups != 1:
                raise ValueError(f"rate_pattern needs exactly one group (has {groups})")
        return self


Band = tuple[float, float]


def band_label(band: Band) -> str:
    """A band's part of a feature name: (100, 500) -> '100_500Hz', (12.5, 25) -> '12.5_25Hz'."""
    return f"{band[0]:g}_{band[1]:g}Hz"


def band_bins(band: Band, rate_hz: float, size: int) -> tuple[int, int]:
    """The rFFT bins [k0, k1) of a window of `size` samples at `rate_hz` that the band [lo, hi) Hz holds:
    bin k (frequency k * rate_hz / size) with lo <= f < hi, never DC (k >= 1); a band that ends at Nyquist
    holds the Nyquist bin. Half-open, so adjacent bands [a, b], [b, c] share no bin."""
    lo, hi = band
    last = size // 2  # the Nyquist bin for an even size, the top bin for an odd one
    k0 = max(1, math.ceil(lo * size / rate_hz))
    k1 = last + 1 if hi >= rate_hz / 2 else min(last + 1, math.ceil(hi * size / rate_hz))
    return k0, max(k0, k1)


def _show(band: Band) -> str:
    return f"[{band[0]:g}, {band[1]:g}]"


def _check_band(band: Band) -> Band:
    lo, hi = band
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi):
        raise ValueError(f"a band is [lo, hi] Hz with 0 <= lo < hi, both finite (got {_show(band)})")
    return band


def _check_names(bands: tuple[Band, ...]) -> tuple[Band, ...]:
    seen: dict[str, Band] = {}
    for b in bands:
        _check_band(b)
        label = band_label(b)
        if label in seen:
            raise ValueError(f"bands {_show(seen[label])} and {_show(b)} Hz would both be named {label!r}")
        seen[label] = b
    return bands


class Envelope(_Strict):
    """Envelope (demodulation) analysis for rolling-element bearings (Randall & Antoni 2011, "Rolling element
    bearing diagnostics - a tutorial", MSSP 25(2)): band-pass around a resonance the impacts excite, take the
    magnitude of the analytic signal, and read the envelope spectrum's power at the fault frequencies."""

    carrier_hz: Band = Field(description="[lo, hi] Hz: the band-pass around the excited resonance (FFT bins "
                             "lo <= f < hi), the carrier the fault impacts modulate.")
    bands_hz: tuple[Band, ...] = Field(min_length=1, description="[lo, hi] Hz bands of the envelope spectrum, e.g. "
                                       "around a bearing's BPFO/BPFI/BSF/FTF; each below the carrier's width.")

    @field_validator("carrier_hz")
    @classmethod
    def _carrier(cls, v: Band) -> Band:
        return _check_band(v)

    @field_validator("bands_hz")
    @classmethod
    def _bands(cls, v: tuple[Band, ...]) -> tuple[Band, ...]:
        return _check_names(v)


class FeatureParams(_Strict):
    """The parameters of the 'spectral' extractor (edgekit/features.py SpectralFeatures), all in the units of
    the field: frequencies in Hz, powers in the channel's unit squared. Per channel, in this order: the
    `time` statistics, one value per `bands_hz` band, the `spectral` statistics, one value per envelope band.
    Spectra are of the mean-removed window with a periodic Hann taper, one-sided and scaled so that the
    powers of all bins but DC add up to the tapered window's mean square (Parseval)."""

    time: tuple[TimeStat, ...] = Field(
        TIME_STATS, description="Per-channel statistics of the window, named '<channel>.<stat>': mean, std, rms "
        "(of the raw samples, offset included), peak (max |x - mean|), ptp, crest (peak / std), kurtosis "
        "(excess, Fisher) and skewness (both biased, as scipy.stats). A flat channel's std, crest, kurtosis, "
        "skewness are 0.")
    bands_hz: tuple[Band, ...] = Field(
        (), description="[lo, hi] Hz bands of the spectrum, named '<channel>.band_<lo>_<hi>Hz'; each holds the FFT "
        "bins lo <= f < hi (a band ending at Nyquist holds it) and must lie at or below Nyquist.")
    band_value: Literal["power", "rms", "share"] = Field(
        "power", description="What a band's (and an envelope band's) value is: 'power' (unit^2, the band's part "
        "of the mean square), 'rms' (unit, its square root) or 'share' (power / all AC power, 0..1).")
    spectral: tuple[SpectralStat, ...] = Field(
        SPECTRAL_STATS, description="Statistics of the AC power spectrum, named '<channel>.<stat>': centroid_hz "
        "(power-weighted mean frequency), spread_hz (power-weighted std around it), entropy (Shannon entropy of "
        "the normalised spectrum over log(bins), 0..1), dominant_hz (the strongest bin). 0 for a flat channel.")
    envelope: Envelope | None = Field(
        None, description="Envelope spectrum bands, named '<channel>.env_band_<lo>_<hi>Hz'; null: none.")

    @field_validator("time", "spectral")
    @classmethod
    def _unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        dup = sorted({s for s in v if v.count(s) > 1})
        if dup:
            raise ValueError(f"statistics named twice: {dup}")
        return v

    @field_validator("bands_hz")
    @classmethod
    def _bands(cls, v: tuple[Band, ...]) -> tuple[Band, ...]:
        return _check_names(v)

    @model_validator(mode="after")
    def _something(self) -> FeatureParams:
        if not (self.time or self.bands_hz or self.spectral or self.envelope):
            raise ValueError("asks for no features: give time, bands_hz, spectral or envelope")
        env = self.envelope
        if env is not None:
            width = env.carrier_hz[1] - env.carrier_hz[0]
            for i, b in enumerate(env.bands_hz):
                if b[1] > width:
                    raise ValueError(f"envelope.bands_hz[{i}] {_show(b)} Hz reaches above the carrier band's width "
                                     f"({width:g} Hz of {_show(env.carrier_hz)}): the envelope holds no "
                                     "modulation faster than that")
        return self

    def per_channel(self) -> list[str]:
        """The feature names after '<channel>.', in column order."""
        env = self.envelope.bands_hz if self.envelope is not None else ()
        return ([*self.time] + [f"band_{band_label(b)}" for b in self.bands_hz] + [*self.spectral]
                + [f"env_band_{band_label(b)}" for b in env])

    def names(self, channels: list[str] | tuple[str, ...]) -> list[str]:
        """The feature names over these channels, channel-major: what the extractor's columns are."""
        per = self.per_channel()
        return [f"{ch}.{f}" for ch in channels for f in per]

    def check(self, rate_hz: float, window_size: int) -> None:
        """ValueError naming the band when a band reaches above Nyquist or holds no FFT bin of these windows."""
        nyq = rate_hz / 2
        named = [(f"bands_hz[{i}]", b) for i, b in enumerate(self.bands_hz)]
        if self.envelope is not None:
            named.append(("envelope.carrier_hz", self.envelope.carrier_hz))
            named += [(f"envelope.bands_hz[{i}]", b) for i, b in enumerate(self.envelope.bands_hz)]
        for key, band in named:
            if band[1] > nyq:
                raise ValueError(f"{key}: band {_show(band)} Hz reaches above Nyquist ({nyq:g} Hz at rate_hz "
                                 f"{rate_hz:g}); lower the band or record faster")
            k0, k1 = band_bins(band, rate_hz, window_size)
            if k1 <= k0:
                raise ValueError(f"{key}: band {_show(band)} Hz holds no FFT bin of a {window_size}-sample window at "
                                 f"{rate_hz:g} Hz (bins every {rate_hz / window_size:g} Hz); widen the band or the "
                                 "window")


# Input keys added after the first bundles: written only when set (InputSpec here, RunInput in run.json).
OPTIONAL_INPUT_KEYS = ("feature_params", "units", "max_gap_s", "baseline")


def omit_absent(data: dict[str, Any], model: BaseModel, keys: tuple[str, ...]) -> dict[str, Any]:
    """`data` (a model's serialised dict) without the `keys` whose value on `model` is None."""
    for key in keys:
        if getattr(model, key) is None:
            data.pop(key, None)
    return data


class InputSpec(_Strict):
    kind: InputKind = Field(description="'window': a sliding window over a sample stream; "
                                             "'table': one row of precomputed values per case.")
    extractor: Extractor = Field(
        description="Feature extractor the agent runs on each window (or 'table' for table rows).")
    channels: list[str] | None = Field(None, description="Sensor channels in the order the window holds them.")
    rate_hz: float | None = Field(None, gt=0, description="Sample rate the model was trained at.")
    window_size: int | None = Field(None, gt=0, description="Samples per window.")
    window_hop: int | None = Field(None, gt=0, description="Samples between consecutive window starts.")
    feature_names: list[str] = Field(description="Names of the feature vector, in model input order.")
    feature_params: FeatureParams | None = Field(
        None, description="The extractor's parameters (bands in Hz, statistics), as training used them; absent "
        "for extractors that take none (a bundle written before they existed reads the same).")
    imputation: dict[str, Any] | None = Field(
        None, description="How missing table values are filled (copied from the run), or null.")
    recording: Recording | None = Field(
        None, description="The training recordings' file layout: what `replay` reads by default.")
    units: dict[str, str] | None = Field(
        None, description="Unit of each channel, as the recipe gave them (e.g. 'm/s^2'); absent when none were.")
    max_gap_s: float | None = Field(
        None, gt=0, description="A step in sample time longer than this splits the stream: training cut its "
        "recordings there and the agent's windower starts afresh after one (no window spans a gap).")
    plausible: PlausibleRange | None = Field(
        None, description="Samples outside this range never reach a model: the agent defers the window as "
        "'implausible' (edgekit/plausible.py). Null: only non-finite values are refused.")
    envelope: InputEnvelope | None = Field(
        None, description="The training data's range per channel and feature and its stuck-channel floor: a "
        "window outside it is deferred with reasons naming the channel or feature (edgekit/plausible.py). "
        "Absent in bundles exported before it (they behave as before).")
    baseline: BaselineSpec | None = Field(
        None, description="Each machine's own baseline (commissioning, edgekit/baseline.py): the features are "
        "made relative to the device's first windows before `normalize`. Absent: absolute features, as before.")

    @model_serializer(mode="wrap")
    def _omit_no_params(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        # Left out rather than written as null: a bundle of an extractor without parameters (or of a table,
        # without units and gaps) stays byte for byte what it was, and an older agent still reads it.
        return omit_absent(handler(self), self, (*OPTIONAL_INPUT_KEYS, "envelope"))

    @model_validator(mode="after")
    def _params_fit_extractor(self) -> InputSpec:
        if self.feature_params is not None:
            if self.extractor not in PARAM_EXTRACTORS:
                raise ValueError(f"feature_params: extractor {self.extractor!r} takes none (only "
                                 f"{', '.join(PARAM_EXTRACTORS)} do)")
            if self.rate_hz is not None and self.window_size is not None:
                self.feature_params.check(self.rate_hz, self.window_size)
            want = self.feature_params.names(self.channels or [])
            if self.feature_names != want:
                raise ValueError(f"feature_names do not follow feature_params over the channels (expected "
                                 f"{len(want)} names starting {want[:3]}, got {len(self.feature_names)})")
        return self

    @model_validator(mode="after")
    def _plausible_fits_channels(self) -> InputSpec:
        rng = self.plausible
        if rng is None:
            return self
        n = len(self.channels or [])
        if len(rng.low) != n or len(rng.high) != n:
            raise ValueError(f"plausible.low/high need one value per channel ({n}), got {len(rng.low)} and "
                             f"{len(rng.high)}")
        for c, (lo, hi) in enumerate(zip(rng.low, rng.high)):
            if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                raise ValueError(f"plausible range of channel {c} must be finite with low <= high (got {lo}, {hi})")
        return self

    @model_validator(mode="after")
    def _baseline_fits_features(self) -> InputSpec:
        if self.baseline is not None:
            if self.kind != "window":
                raise ValueError("baseline needs window input (a device's first windows)")
            if len(self.baseline.spread) != len(self.feature_names):
                raise ValueError(f"baseline.spread needs one value per feature ({len(self.feature_names)}), got "
                                 f"{len(self.baseline.spread)}")
        return self

    @model_validator(mode="after")
    def _envelope_fits_input(self) -> InputSpec:
        env = self.envelope
        if env is None:
            return self
        sizes = []
        if env.channels is not None:
            n = len(self.channels or [])
            sizes += [("envelope.channels", len(v), n) for v in
                      (env.channels.low, env.channels.high, env.channels.stuck_below)]
        if env.features is not None:
            n = len(self.feature_names)
            sizes += [("envelope.features", len(v), n) for v in (env.features.low, env.features.high)]
        for key, got, want in sizes:
            if got != want:
                raise ValueError(f"{key} needs one value per entry ({want}), got {got}")
        for key, part in (("channels", env.channels), ("features", env.features)):
            if part is not None and not all(math.isfinite(lo) and math.isfinite(hi) and lo <= hi
                                            for lo, hi in zip(part.low, part.high)):
                raise ValueError(f"envelope.{key}: every bound must be finite with low <= high")
        if env.channels is not None and not all(math.isfinite(s) and s >= 0 for s in env.channels.stuck_below):
            raise ValueError("envelope.channels.stuck_below must be finite and >= 0")
        after = env.channels.stuck_after if env.channels is not None else None
        if after is not None and (len(after) != len(self.channels or []) or min(after, default=1) < 1):
            raise ValueError(f"envelope.channels.stuck_after needs one value >= 1 per channel "
                             f"({len(self.channels or [])}), got {after}")
        if env.relations is not None and len(env.relations.log_level) != len(self.channels or []):
            raise ValueError(f"envelope.relations is of {len(env.relations.log_level)} channels, the input has "
                             f"{len(self.channels or [])}")
        return self


class Population(_Strict):
    probs: list[float] = Field(description="Percentiles (0-100) at which `quantiles` are given.")
    n: int = Field(ge=0, description="Training cases the quantiles come from.")
    quantiles: dict[str, list[float]] = Field(
        description="Feature name -> its training-split values (raw, before normalisation) at `probs`; read by "
                    "edgekit/population.py to place a case's features in the training population.")


class Stats(_Strict):
    mean: list[float] = Field(description="Per-feature (or per-channel) mean subtracted before the model.")
    std: list[float] = Field(description="Per-feature (or per-channel) std divided by after the mean.")


class Normalize(_Strict):
    features: Stats = Field(description="Normalisation of the feature vector: (x - mean) / std.")
    window: Stats | None = Field(None, description="Per-channel normalisation of raw windows (cnn1d), or null.")


class ModelSpec(_Strict):
    file: str = Field(description="ONNX file the agent runs, relative to the bundle.")
    fp32_file: str = Field(description="The fp32 ONNX file (same as `file` when fp32 is used).")
    input: Literal["features", "window"] = Field(description="Normalised features [N, F] or window [N, C, W].")
    input_name: Literal["x"] = Field("x", description="Name of the single ONNX input.")
    input_shape: list[int | None] = Field(description="Input shape; null is the dynamic batch axis.")
    dtype: Literal["float32"] = Field("float32", description="Input element type.")
    outputs: list[str] = Field(description="ONNX output names, e.g. ['probs'], ['score'], "
                               "['label', 'probabilities'].")
    quantization: Literal["int8-qdq", "fp32"] = Field(description="Which variant `file` is.")
    quantization_reason: str = Field(description="Why that variant was chosen (parity, latency).")


class Thresholds(_Strict):
    ood_max_score: float = Field(description="Defer when the autoencoder score is above this (out of "
                                 "distribution).")
    min_confidence: float = Field(description="Defer when the predictor's top probability is below this.")
    max_disagreement: float = Field(description="Defer when the total variation distance between predictor "
                                    "and second-opinion probabilities is above this.")
    defer_all: bool = Field(False, description="True when no threshold met the error target on the "
                            "calibration split: the agent must defer every case.")


class GateCalibration(_Strict):
    method: str = Field(description="How thresholds were chosen, e.g. 'ltt-fixed-sequence-binomial'.")
    target_error: float = Field(gt=0, lt=1, description="Error rate allowed among accepted cases.")
    delta: float = Field(gt=0, lt=1, description="Allowed probability that the guarantee fails.")
    ood_quantile: float = Field(description="Quantile of calibration autoencoder scores used for ood_max_score.")
    ood_reference: Literal["normal", "all"] = Field(
        "normal", description="Which calibration cases that quantile is over: the autoencoder's fit_on.")
    n_cal: int = Field(ge=0, description="Calibration cases used.")
    cal_accepted: int = Field(ge=0, description="Calibration cases accepted at the chosen thresholds.")
    cal_error: float | None = Field(None, description="Error rate among accepted calibration cases.")
    cal_coverage: float = Field(description="Fraction of calibration cases accepted.")
    p_value: float | None = Field(None, description="Binomial p-value of the chosen threshold.")
    valid: bool = Field(description="False when no threshold met the target: every case is deferred.")
    n_test: int = Field(ge=0, description="Held-out (test) cases.")
    test_accepted: int = Field(ge=0, description="Held-out cases accepted.")
    test_error: float | None = Field(None, description="Error rate among accepted held-out cases "
                                     "(null when none accepted).")
    test_coverage: float = Field(description="Fraction of held-out cases accepted.")
    models: dict[str, str] = Field(default_factory=dict,
                                   description="Role -> the file whose outputs were calibrated.")


class Manifest(_Strict):
    schema_: Literal["edgekit.manifest/1"] = Field(SCHEMA, alias="schema", description="Schema version.")
    task: str = Field(description="Task name from the recipe.")
    created_at: str = Field(description="UTC time of export, ISO 8601.")
    code_version: str = Field(description="edgekit version (and git commit when known) that trained it.")
    edgekit_version: str = Field(description="edgekit version that exported the bundle.")
    data_fingerprint: str = Field(description="Hash of the training data, from the run.")
    labels: list[str] = Field(min_length=1, description="Class names in output order.")
    normal_label: str = Field(description="The label meaning 'nothing wrong'.")
    positive_label: str | None = Field(None, description="The label of interest for binary F1, or null.")
    input: InputSpec = Field(description="What the agent feeds the models and how it builds it.")
    normalize: Normalize = Field(description="Normalisation statistics from the training split.")
    models: dict[Role, ModelSpec] = Field(description="Role -> ONNX model spec.")
    thresholds: Thresholds = Field(description="Gate thresholds calibrated on the quantized outputs.")
    gate_calibration: GateCalibration = Field(description="How the thresholds were chosen and how they did.")
    parity: dict[str, Any] = Field(description="Summary of parity.json: per model pass/fail and metrics.")
    files: dict[str, str] = Field(description="Relative path -> sha256 of every file except manifest.json "
                                  "and manifest.sig.")
    population: Population | None = Field(
        None, description="The training population's feature quantiles (percentiles of a case on the review "
                          "pages and in trial answers); absent in bundles exported before it.")

    @model_serializer(mode="wrap")
    def _omit_no_population(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
                            ) -> dict[str, Any]:
        return omit_absent(handler(self), self, ("population",))

    def model_path(self, bundle: Path, role: str) -> Path:
        """The ONNX file the agent runs for `role`, as a path inside `bundle`."""
        if role not in self.models:
            raise ModelError(f"bundle has no model for role {role!r} (has {sorted(self.models)})",
                             where=str(Path(bundle) / MANIFEST_FILE))
        return Path(bundle) / self.models[role].file


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundle_files(bundle: Path) -> dict[str, str]:
    """sha256 of every file under `bundle` except manifest.json and manifest.sig, keyed by posix path."""
    bundle = Path(bundle)
    out: dict[str, str] = {}
    for path in sorted(bundle.rglob("*")):
        rel = path.relative_to(bundle).as_posix()
        if path.is_file() and rel not in (MANIFEST_FILE, SIGNATURE_FILE):
            out[rel] = sha256_file(path)
    return out


def write_manifest(path: Path, manifest: Manifest) -> Path:
    """Write `manifest` as manifest.json into the bundle directory `path` (or to `path` if it ends in .json)."""
    path = Path(path)
    target = path if path.suffix == ".json" else path / MANIFEST_FILE
    text = json.dumps(manifest.model_dump(mode="json", by_alias=True), indent=2, sort_keys=False) + "\n"
    target.write_text(text, encoding="utf-8")
    log.info("manifest_written path=%s files=%d", target, len(manifest.files))
    return target


def read_manifest(bundle: Path) -> Manifest:
    """Parse manifest.json without checking files or signature."""
    where = str(Path(bundle) / MANIFEST_FILE)
    try:
        raw = (Path(bundle) / MANIFEST_FILE).read_bytes()
    except FileNotFoundError:
        raise ModelError("manifest.json is missing", where=where,
                         hint="point at a bundle directory written by `edgekit export`") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelError(f"not valid JSON: {exc}", where=where, hint="re-export the bundle") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        got = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise ModelError(f"schema must be {SCHEMA!r} (got {got!r})", where=where,
                         hint="export the bundle with this edgekit version")
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise ModelError(f"{key}: {first['msg']} ({len(exc.errors())} problem(s))", where=where,
                         hint="re-export the bundle; the manifest does not match this edgekit's schema") from None


def check_files(bundle: Path, manifest: Manifest) -> None:
    """Every listed file exists with its sha256, every model file is listed, nothing unlisted is present."""
    bundle = Path(bundle)
    for rel, expected in manifest.files.items():
        path = bundle / rel
        if not path.is_file():
            raise ModelError(f"listed file is missing (expected sha256 {expected})", where=str(path),
                             hint="copy the whole bundle directory")
        actual = sha256_file(path)
        if actual != expected:
            raise ModelError(f"sha256 mismatch: expected {expected}, got {actual}", where=str(path),
                             hint="the file was altered or corrupted; re-copy or re-export the bundle")
    for role, spec in manifest.models.items():
        for rel in {spec.file, spec.fp32_file}:
            if rel not in manifest.files:
                raise ModelError(f"models.{role} names {rel!r}, which files does not list",
                                 where=str(bundle / MANIFEST_FILE), hint="re-export the bundle")
    unlisted = sorted(set(bundle_files_names(bundle)) - set(manifest.files))
    if unlisted:
        raise ModelError(f"bundle holds files the manifest does not list: {unlisted}", where=str(bundle),
                         hint="remove them, or re-export the bundle")


def bundle_files_names(bundle: Path) -> list[str]:
    bundle = Path(bundle)
    return [p.relative_to(bundle).as_posix() for p in sorted(bundle.rglob("*"))
            if p.is_file() and p.relative_to(bundle).as_posix() not in (MANIFEST_FILE, SIGNATURE_FILE)]


def _load_public_key(path: Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise ModelError("public key file not found", where=str(path),
                         hint="create a key pair with `edgekit keygen`") from None
    except ValueError as exc:
        raise ModelError(f"not a PEM public key: {exc}", where=str(path),
                         hint="pass the .pub file written by `edgekit keygen`") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ModelError(f"public key must be Ed25519 (got {type(key).__name__})", where=str(path),
                         hint="create a key pair with `edgekit keygen`")
    return key


def _load_private_key(path: Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise ModelError("private key file not found", where=str(path),
                         hint="create a key pair with `edgekit keygen`") from None
    except (ValueError, TypeError) as exc:
        raise ModelError(f"not an unencrypted PEM private key: {exc}", where=str(path),
                         hint="pass the .key file written by `edgekit keygen`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ModelError(f"private key must be Ed25519 (got {type(key).__name__})", where=str(path),
                         hint="create a key pair with `edgekit keygen`")
    return key


def check_signature(bundle: Path, public_key: Path) -> None:
    """manifest.sig must be a valid Ed25519 signature of manifest.json's exact bytes under `public_key`."""
    from cryptography.exceptions import InvalidSignature

    bundle = Path(bundle)
    key = _load_public_key(public_key)
    sig_path = bundle / SIGNATURE_FILE
    if not sig_path.is_file():
        raise ModelError("manifest.sig is missing: the bundle is not signed, but a public key was given",
                         where=str(sig_path),
                         hint="sign it with `edgekit export --sign-key KEY` (or sign_bundle); an agent runs "
                              "an unsigned bundle only without a public key and with allow_unsigned = true")
    raw = sig_path.read_bytes()
    text = raw[:-1] if raw.endswith(b"\n") else raw
    try:
        signature = base64.b64decode(text, validate=True)
    except ValueError:
        signature = b""
    # strict: exactly what sign_bundle writes, so no byte of the file can change unnoticed (b64decode
    # ignores the unused low bits of the last character)
    if base64.b64encode(signature) != text or len(signature) != 64:
        raise ModelError("manifest.sig is not a base64 Ed25519 signature as sign_bundle writes it",
                         where=str(sig_path), hint="the signature file was altered; re-sign the bundle")
    try:
        key.verify(signature, (bundle / MANIFEST_FILE).read_bytes())
    except InvalidSignature:
        raise ModelError(f"signature does not match manifest.json under {public_key}", where=str(sig_path),
                         hint="the manifest was altered or signed with another key; re-export and re-sign"
                         ) from None
    except FileNotFoundError:
        raise ModelError("manifest.json is missing", where=str(bundle / MANIFEST_FILE)) from None


def load_bundle(path: Path, *, public_key: Path | None = None) -> Manifest:
    """Read and check a bundle: signature first (when `public_key` is given), then schema and every sha256."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError("bundle directory not found", where=str(path),
                         hint="pass the directory written by `edgekit export --out`")
    if public_key is not None:
        check_signature(path, public_key)
    manifest = read_manifest(path)
    check_files(path, manifest)
    log.info("bundle_loaded path=%s task=%s signed=%s files=%d", path, manifest.task,
             public_key is not None, len(manifest.files))
    return manifest


def verify_bundle(path: Path, public_key: Path) -> Manifest:
    """Signature, schema and every file's sha256; raises ModelError naming the first problem."""
    return load_bundle(path, public_key=public_key)


def sign_bundle(path: Path, private_key: Path) -> Path:
    """Write manifest.sig (base64 Ed25519 signature of manifest.json). Returns the signature's path."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ModelError("manifest.json is missing", where=str(manifest_path),
                         hint="export the bundle before signing it")
    key = _load_private_key(private_key)
    signature = key.sign(manifest_path.read_bytes())
    sig_path = path / SIGNATURE_FILE
    sig_path.write_bytes(base64.b64encode(signature) + b"\n")
    log.info("bundle_signed path=%s key=%s", path, private_key)
    return sig_path


def keygen(out_dir: Path, name: str = "edgekit") -> tuple[Path, Path]:
    """Create an Ed25519 key pair: OUT/NAME.key (PEM PKCS8, mode 0600) and OUT/NAME.pub. Never overwrites."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out_dir = Path(out_dir)
    private_path, public_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for existing in (private_path, public_path):
        if existing.exists():
            raise ModelError("key file already exists; refusing to overwrite it", where=str(existing),
                             hint="choose another --name or directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
    os.chmod(private_path, 0o600)
    public_path.write_bytes(public_pem)
    log.info("keygen private=%s public=%s", private_path, public_path)
    return private_path, public_path
