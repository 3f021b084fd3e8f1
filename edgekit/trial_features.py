"""Trial features: one number per walked test (a TUG), computed on the device from the raw IMU signal or
entered by the operator, kept in REGISTRY, whose names a table recipe's columns use (`extractor = "trial"`).

numpy only (agent side): the phases come from `edgekit.gait.segment`, the spectral features from
`edgekit.features.tug_frequency_features`; never imports the training side or a dataset reader.

Which columns of the shipped seed table (edgekit/data/tug_gait_23.tsv) are registry features, and why
(evidence measured on its 23 rows; tests/test_trial_features.py re-checks it):
- `age` (years) and `TUG` (total test time, s) and `steps`: registered (their definitions below).
- `time`: round(t6 - t1) in all 23 rows, the same quantity as TUG; left out as a duplicate of TUG.
- `t1..t6`: increasing "phase times" in s; t_i = n_i / 45 (frame indices n1..n6 of a 45 frame/s record,
  within 0.07 s, the table's 3 significant digits), and TUG = t6 - t1 (within 0.04 s in 22 rows), so t1
  and t6 are the test's start and end. Which events t2..t5 mark is not written anywhere; their gaps fit
  stand-up, walk out, turn, walk back, sit-down, but that is inferred, not documented. They are also times
  from the recording's start, with a lead-in of 0.2-3.1 s before t1 that depends on when the recording
  was started, not on the person; and `gait.segment` finds no stand-up or sit-down. Left out; the
  device's phase times and durations below are registered under their own names.
- `step_frequency`: every value is a multiple of 45/256 Hz (one a half multiple): a bin of an FFT at
  45 frames/s, a spectral peak of a signal the notes do not name, and uncorrelated with steps per test
  time (r = -0.08). Not the device's cadence; left out.
- `px`, `py`, `pz`: no definition or unit in the notes (px 11.1-11.7, py 1.4-4.1, pz -4.9 to -1.3); left out.
- `gender`: F/M letters; the operator's `sex` below (a report group, not a model input there).
- `y1`, `BBS`, `y2`: labels and a clinical score, not features.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from edgekit.errors import ConfigError, DataError, NotScored
from edgekit.features import TUG_FEATURES, tug_frequency_features
from edgekit.gait import Segmentation, segment

log = logging.getLogger(__name__)

Source = Literal["signal", "operator"]
OperatorValue = float | int | str
# The shortest trial gait.segment takes (it refuses fewer samples: its activity windows need a few strides).
MIN_TRIAL_S = 4.0
# Oldest age accepted from the operator; older is a typing error (the seed table's 109 is kept: it is < 130).
MAX_AGE_YEARS = 130.0
# The operator's sex, coded where a table holds it as a number.
SEX_CODES = {"f": 0.0, "female": 0.0, "0": 0.0, "m": 1.0, "male": 1.0, "1": 1.0}


class TrialInput:
    """One trial's signal and the operator's entries; the segmentation and the spectral features are
    computed at most once, on first use, and shared by every feature that needs them."""

    def __init__(self, values: np.ndarray, rate_hz: float, operator: Mapping[str, OperatorValue] | None,
                 segmented: Segmentation | None = None) -> None:
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or values.shape[1] != 6:
            raise ValueError(f"values must have shape (T, 6) acc xyz (m/s^2) + gyr xyz (rad/s) (got {values.shape})")
        if not (math.isfinite(rate_hz) and rate_hz > 0):
            raise ValueError(f"rate_hz must be a finite number > 0 (got {rate_hz!r})")
        self.values = values
        self.rate_hz = float(rate_hz)
        self.operator = dict(operator or {})
        self._segmented = segmented  # gait.segment of these values, when the caller ran it already

    @property
    def duration_s(self) -> float:
        return len(self.values) / self.rate_hz

    @functools.cached_property
    def segmentation(self) -> Segmentation:
        """gait.segment of the whole trial; NotScored when there is no walk to segment."""
        if self.duration_s < MIN_TRIAL_S:
            raise NotScored(f"the trial lasts {self.duration_s:.2f} s; segmenting needs at least {MIN_TRIAL_S:g} s",
                            reason="too_short")
        if not np.all(np.isfinite(self.values)):
            raise NotScored("the trial's signal holds NaN or infinity", reason="non_finite")
        try:
            seg = self._segmented if self._segmented is not None else segment(self.values, self.rate_hz)
        except ValueError as exc:  # e.g. an all-zero accelerometer: no gravity to find the vertical
            raise NotScored(str(exc), reason="unsegmentable") from None
        if not math.isfinite(seg.walk_start_s):
            raise NotScored("no walk in the signal (its activity never rose clearly above still standing)",
                            reason="no_walk")
        return seg

    @functools.cached_property
    def spectral(self) -> dict[str, float]:
        """The nine fall-screening features of the trial's accelerometer (the first three channels)."""
        self.segmentation  # noqa: B018 -- a trial without a walk is not scored, whichever features it names
        return tug_frequency_features(self.values[:, :3], self.rate_hz)

    def turn(self) -> tuple[float, float]:
        seg = self.segmentation
        if not math.isfinite(seg.turn_start_s):
            raise NotScored("no U-turn found in the walk (the yaw turned less than 90 deg)", reason="no_turn")
        return seg.turn_start_s, seg.turn_end_s

    def entered(self, key: str) -> OperatorValue:
        if key not in self.operator:
            raise DataError(f"the operator did not enter {key!r}, which this recipe's features use",
                            where=f"operator.{key}", hint="enter it for the participant before the trial")
        return self.operator[key]


@dataclass(frozen=True)
class TrialFeature:
    """A registry entry: `compute` reads one `TrialInput` and returns the feature's value in `unit`."""

    name: str
    unit: str
    description: str
    source: Source
    compute: Callable[[TrialInput], float]


def _age(trial: TrialInput) -> float:
    raw = trial.entered("age")
    try:
        age = float(raw)
    except (TypeError, ValueError):
        raise DataError(f"age must be a number of years (got {raw!r})", where="operator.age") from None
    if not (math.isfinite(age) and 0 < age <= MAX_AGE_YEARS):
        raise DataError(f"age must be in (0, {MAX_AGE_YEARS:g}] years (got {raw!r})", where="operator.age")
    return age


def _sex(trial: TrialInput) -> float:
    raw = trial.entered("sex")
    code = SEX_CODES.get(str(raw).strip().lower())
    if code is None:
        raise DataError(f"sex must be F or M (or 0 / 1) (got {raw!r})", where="operator.sex")
    return code


def _spectral(name: str) -> Callable[[TrialInput], float]:
    return lambda trial: trial.spectral[name]


_SEG = "gait.segment"
_SPECTRAL_BASIS = (
    "of the magnitude of the trial's acceleration over the whole trial signal (the operator's start to stop), "
    "low-passed (Butterworth order 3, 3.667 Hz, causal), power spectrum bins 1-49 of its FFT; as the TUG "
    "accelerometer study of Bet, Castro & Ponti (2021) computed its table's column of this name "
    "(edgekit.features.tug_frequency_features). Bins are FFT indices, so bin k is k x rate / length Hz: the "
    "numbers compare with the study's at its 100 Hz and for similar trial lengths. Scale-free: the same in "
    "g or m/s^2."
)
_SPECTRAL_WHAT = {
    "pse": ("1", "Power spectral entropy: -sum p ln(1e-4 + p), p the 49 bins' power min-max scaled to 0..1"),
    "psp1": ("1", "Largest power spectrum peak: the maximum of the 49 bins' power z-scored over the 49 bins "
             "(population std)"),
    "psp2": ("1", "Second peak: the maximum of the z-scored power after zeroing the first peak and 3 bins "
             "each side"),
    "psp3": ("1", "Third peak: the maximum after also zeroing the second peak and 2 bins each side"),
    "pspf1": ("FFT bin", "Bin (1-49) of the first peak"),
    "pspf2": ("FFT bin", "Bin (1-49) of the second peak"),
    "pspf3": ("FFT bin", "Bin (1-49) of the third peak"),
    "wpsp": ("1", "Weighted peak: (pspf1 - 1) x psp1 (a bin index times a z-score)"),
    "cpt": ("1", "Weighted spectral sum: (sum of w_k P_k / max(w P) - 1) x 100 over bins 0-49 (DC included), "
            "w_k = 1 - k/100"),
}

# The phase times are checked against annotated heel strikes, toe-offs and U-turn boundaries of the IPOL gait
# recordings (held-out subjects 6-15, tests/test_trial_features.py; tolerances in README "Trial features").
_FEATURES = [
    TrialFeature(
        "walk_start_s", "s",
        f"Time of the walk's start from the trial's first sample: where the activity signal rises for the first "
        f"steps ({_SEG} walk_start_s: 1 s moving RMS of the 0.5-3 Hz vertical acceleration plus the gyro norm, "
        "shifted 0.55 s to the first heel strike).",
        "signal", lambda t: t.segmentation.walk_start_s),
    TrialFeature(
        "turn_start_s", "s",
        f"Time of the U-turn's start from the trial's first sample ({_SEG} turn_start_s: where the yaw rate, "
        "averaged over a stride, rises above 35 % of its peak in the walk's central part). Not scored without "
        "a turn of at least 90 deg.",
        "signal", lambda t: t.turn()[0]),
    TrialFeature(
        "turn_end_s", "s",
        f"Time of the U-turn's end from the trial's first sample ({_SEG} turn_end_s: where the yaw rate falls "
        "back below 35 % of its peak). Not scored without a turn.",
        "signal", lambda t: t.turn()[1]),
    TrialFeature(
        "walk_end_s", "s",
        f"Time of the walk's end from the trial's first sample ({_SEG} walk_end_s: where the activity falls back "
        "to 20 % of the walking level above still standing).",
        "signal", lambda t: t.segmentation.walk_end_s),
    TrialFeature(
        "walk_out_s", "s", "Duration of the walk out: turn_start_s - walk_start_s. Not scored without a turn.",
        "signal", lambda t: t.turn()[0] - t.segmentation.walk_start_s),
    TrialFeature(
        "turn_s", "s", "Duration of the U-turn: turn_end_s - turn_start_s. Not scored without a turn.",
        "signal", lambda t: t.turn()[1] - t.turn()[0]),
    TrialFeature(
        "walk_back_s", "s", "Duration of the walk back: walk_end_s - turn_end_s. Not scored without a turn.",
        "signal", lambda t: t.segmentation.walk_end_s - t.turn()[1]),
    TrialFeature(
        "TUG", "s",
        "Total test time: walk_end_s - walk_start_s, from the first movement of the walk to the last. The seed "
        "table's TUG column is this time in whole seconds (it equals round(t6 - t1), its test's end minus start, "
        "in 22 of 23 rows; row 16 says 14 for 13.02 s). A stand-up from and sit-down onto a chair count only as "
        "far as the activity signal rises for them: segment finds no chair phases (its test recordings have no "
        "chair), so the chair's part is unchecked.",
        "signal", lambda t: t.segmentation.walk_end_s - t.segmentation.walk_start_s),
    TrialFeature(
        "steps", "steps",
        f"Steps taken in the walk, turn included ({_SEG} steps: peaks of the 0.5-3 Hz vertical acceleration "
        "between walk_start_s and walk_end_s, at least 0.3 s apart; one trunk peak per heel strike). The seed "
        "table's steps column counts the test's steps; how it was counted is not written.",
        "signal", lambda t: float(t.segmentation.steps)),
    TrialFeature(
        "cadence_spm", "steps/min",
        f"Cadence: 60 x steps / (walk_end_s - walk_start_s) ({_SEG} cadence_spm).",
        "signal", lambda t: t.segmentation.cadence_spm),
    *[TrialFeature(name, _SPECTRAL_WHAT[name][0], f"{_SPECTRAL_WHAT[name][1]}; {_SPECTRAL_BASIS}", "signal",
                   _spectral(name)) for name in TUG_FEATURES],
    TrialFeature(
        "age", "years", "The participant's age in whole or fractional years, as the operator enters it (0-130).",
        "operator", _age),
    TrialFeature(
        "sex", "code",
        "The participant's sex as the operator enters it: F (or 0) coded 0, M (or 1) coded 1. The seed table "
        "holds it as F/M letters in `gender`, a report group there (data.group_columns), not a model input.",
        "operator", _sex),
]

REGISTRY: dict[str, TrialFeature] = {f.name: f for f in _FEATURES}


def check_names(names: Sequence[str]) -> None:
    """ConfigError naming the names that are not registry features, and the registry's names."""
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ConfigError(f"not trial features: {unknown}", where="features",
                          hint=f"the registry's names: {', '.join(REGISTRY)}")


def compute_trial_features(names: Sequence[str], values: np.ndarray, rate_hz: float,
                           operator: Mapping[str, OperatorValue] | None = None,
                           segmented: Segmentation | None = None) -> np.ndarray:
    """The features `names` (registry names) of one trial, float64 in that order.

    `values` (T, 6): acc xyz (m/s^2) and gyr xyz (rad/s) of the whole trial at `rate_hz`. `operator`: what
    the operator entered (age, sex), needed only when a name's source is "operator". ConfigError for a name
    not in REGISTRY; DataError for a missing or unusable operator entry; NotScored (a DataError with
    `.reason`: too_short, non_finite, unsegmentable, no_walk, no_turn) for a trial the features cannot be
    computed on, naming the feature. gait.segment runs at most once, and only when a signal feature is named;
    `segmented` is its result on these values when the caller (the agent's trial summary) ran it already.
    """
    check_names(names)
    trial = TrialInput(values, rate_hz, operator, segmented)
    out = np.empty(len(names), dtype=np.float64)
    for i, name in enumerate(names):
        try:
            out[i] = REGISTRY[name].compute(trial)
        except NotScored as exc:
            raise NotScored(exc.message, reason=exc.reason, where=f"trial feature {name!r}") from None
    log.debug("trial_features names=%d samples=%d", len(names), len(trial.values))
    return out
