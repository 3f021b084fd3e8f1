"""Segment a TUG-like trial (stand, walk, U-turn, walk back, stand) from one lower-back IMU.

numpy only (the agent runs it on the device); filtering is moving averages and FFT masks. The tuned
constants below were chosen on IPOL subjects 1-5 only and checked on subjects 6-15
(exporters/evaluation/ipol.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

STILL, WALK, TURN = 0, 1, 2

# Walking cadence of adults is 1.5-2.3 steps/s, so one stride (two steps) lasts ~0.9-1.3 s
# (Zijlstra & Hof 2003, Gait & Posture 18:1-10, trunk-acceleration gait analysis).
STEP_BAND_HZ = (0.5, 3.0)  # band of the vertical trunk acceleration that holds the step rhythm
ACTIVITY_WINDOW_S = 1.0  # moving-RMS window of the activity signal: about one stride
YAW_SMOOTH_S = 1.1  # moving average of the yaw rate over ~one stride cancels the pelvis' yaw sway
MIN_STEP_INTERVAL_S = 0.3  # 200 steps/min, faster than any walking cadence
MIN_TURN_DEG = 90.0  # a U-turn turns ~180 deg; the detected IPOL turns span 135-195 deg of yaw
# Walking raises the activity signal 1.5-3 units above still standing in every IPOL trial; a still
# sensor moves it by < 0.1, so below this rise there is no walk to segment.
MIN_WALK_ACTIVITY = 0.3
# Tuned on subjects 1-5 only, by a small grid (exporters/evaluation/ipol.py reports 6-15 separately). Levels
# are shares of (walking level - still baseline) of the activity signal:
ACTIVITY_LEVEL = 0.3  # the walk's core: the longest run above this level ...
MAX_GAP_S = 1.0  # ... after closing quieter gaps shorter than this
START_LEVEL = 0.1  # the core is extended back while the activity stays above this level ...
END_LEVEL = 0.2  # ... and forward while it stays above this one (post-trial fidgeting ends it sooner)
WALK_START_SHIFT_S = 0.55  # the centred 1 s activity window rises ~0.5 s before the first heel strike
WALK_END_SHIFT_S = 0.0  # the falling edge already matches the last toe-off (median bias -0.01 s)
TURN_LEVEL = 0.35  # the turn spans where |smoothed yaw rate| exceeds this share of its peak
TURN_SEARCH = (0.2, 0.8)  # the U-turn's peak is searched in this central share of the walk
STEP_PROMINENCE = 0.3  # a step peak rises this many std of the band-passed signal above its valleys


@dataclass(frozen=True, eq=False)
class Segmentation:
    """Times in seconds from the first sample; NaN when a phase was not found (no walk: steps 0).

    `phase_s`: durations of still_before, walk_out, turn, walk_back, still_after (TUG phases without the
    chair). `phase_labels`: int8 per sample, 0 still, 1 walk, 2 turn. `step_times_s`: detected steps.
    """

    walk_start_s: float
    walk_end_s: float
    turn_start_s: float
    turn_end_s: float
    steps: int
    cadence_spm: float
    phase_s: dict[str, float] = field(default_factory=dict)
    phase_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int8))
    step_times_s: np.ndarray = field(default_factory=lambda: np.zeros(0))


def moving_average(x: np.ndarray, n: int) -> np.ndarray:
    """Centred moving average over n samples along axis 0 (shrinking at the edges), same length."""
    x = np.asarray(x, dtype=np.float64)
    n = max(1, int(n))
    c = np.cumsum(np.concatenate([np.zeros((1,) + x.shape[1:]), x]), axis=0)
    i = np.arange(len(x))
    lo = np.clip(i - n // 2, 0, len(x))
    hi = np.clip(i - n // 2 + n, 0, len(x))
    shape = (-1,) + (1,) * (x.ndim - 1)
    return (c[hi] - c[lo]) / (hi - lo).reshape(shape)


def band_pass(x: np.ndarray, rate_hz: float, low_hz: float, high_hz: float) -> np.ndarray:
    """Zero-phase band-pass of a 1-D signal by zeroing rFFT bins outside [low_hz, high_hz]."""
    spec = np.fft.rfft(x - x.mean())
    f = np.fft.rfftfreq(len(x), d=1.0 / rate_hz)
    spec[(f < low_hz) | (f > high_hz)] = 0.0
    return np.fft.irfft(spec, len(x))


def runs(mask: np.ndarray) -> np.ndarray:
    """(start, stop) index pairs of the True runs of a boolean mask, shape (k, 2)."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return np.stack([np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)], axis=1)


def find_peaks(x: np.ndarray, min_distance: int, min_prominence: float) -> np.ndarray:
    """Indices of local maxima at least `min_distance` apart and at least `min_prominence` tall.

    Prominence as in scipy.signal.peak_prominences: height above the higher of the two minima between
    the peak and the nearest higher sample on each side (or the signal's end). Loops over candidate
    peaks (a few per second), never over samples.
    """
    x = np.asarray(x, dtype=np.float64)
    if len(x) < 3:
        return np.zeros(0, dtype=np.int64)
    d = np.diff(x)
    cand = np.flatnonzero((d[:-1] > 0) & (d[1:] <= 0)) + 1
    keep_prom = np.zeros(len(cand), dtype=bool)
    for j, i in enumerate(cand):
        higher = np.flatnonzero(x > x[i])
        left = higher[higher < i]
        right = higher[higher > i]
        lo = int(left[-1]) if len(left) else 0
        hi = int(right[0]) + 1 if len(right) else len(x)
        keep_prom[j] = x[i] - max(x[lo:i].min(), x[i:hi].min()) >= min_prominence
    cand = cand[keep_prom]
    # Greedy non-maximum suppression: tallest first, drop peaks closer than min_distance.
    keep: list[int] = []
    taken = np.zeros(len(x), dtype=bool)
    for i in cand[np.argsort(-x[cand], kind="stable")]:
        if not taken[i]:
            keep.append(int(i))
            taken[max(0, i - min_distance + 1): i + min_distance] = True
    return np.sort(np.asarray(keep, dtype=np.int64))


def vertical(acc: np.ndarray) -> np.ndarray:
    """Unit vector of gravity in the sensor frame: the trial's mean acceleration direction."""
    g = acc.mean(axis=0)
    norm = float(np.linalg.norm(g))
    if norm == 0:
        raise ValueError("mean acceleration is zero: no gravity to find the vertical axis")
    return g / norm


def segment(values: np.ndarray, rate_hz: float) -> Segmentation:
    """Walk, U-turn and steps of one trial. `values` (T, 6): acc xyz (m/s^2), gyr xyz (rad/s).

    1. vertical axis = mean acceleration direction; activity = 1 s moving RMS of the 0.5-3 Hz vertical
       acceleration (m/s^2) plus the 1 s moving mean of the gyro norm (rad/s; keeps the slow-stepping
       turn active); still baseline = its 5th percentile, walking level = median of its upper half;
       the walk's core is the longest run above ACTIVITY_LEVEL (short gaps closed), extended outwards
       by hysteresis down to START_LEVEL / END_LEVEL, then shifted by the biases measured on 1-5;
    2. yaw rate = gyro on the vertical, averaged over a stride; the turn is the run around the largest
       |yaw rate| in the walk's central part where the yaw rate keeps the peak's sign and stays above
       TURN_LEVEL of it; no turn when that run turns less than MIN_TURN_DEG;
    3. steps = peaks of the 0.5-3 Hz vertical acceleration inside the walk, >= 0.3 s apart and rising
       STEP_PROMINENCE std above their valleys (one trunk-acceleration peak per heel strike).
    """
    # One function on purpose: the three numbered steps read top to bottom against the docstring and share
    # the signals of step 1 (vertical axis, activity, walk bounds); split, they would pass eight arrays around.
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != 6:
        raise ValueError(f"values must have shape (T, 6) acc xyz + gyr xyz (got {values.shape})")
    if not (math.isfinite(rate_hz) and rate_hz > 0):
        raise ValueError(f"rate_hz must be a finite number > 0 (got {rate_hz!r})")
    n = len(values)
    if n < int(4 * rate_hz):
        raise ValueError(f"need at least 4 s of samples to segment a trial (got {n} at {rate_hz} Hz)")
    if not np.all(np.isfinite(values)):
        raise ValueError("values contain NaN or infinity")
    acc, gyr = values[:, :3], values[:, 3:]
    up = vertical(acc)
    vert = acc @ up
    duration = n / rate_hz

    # 1. Activity and the walk.
    w = int(round(ACTIVITY_WINDOW_S * rate_hz))
    bp = band_pass(vert, rate_hz, *STEP_BAND_HZ)
    # Step-band RMS of the vertical acceleration plus the gyro norm (the turn has soft steps but rotates).
    gnorm = np.sqrt((gyr * gyr).sum(axis=1))
    activity = np.sqrt(moving_average(bp * bp, w)) + moving_average(gnorm, w)
    base = float(np.percentile(activity, 5))
    level = float(np.median(activity[activity >= np.median(activity)]))
    active = activity > base + ACTIVITY_LEVEL * (level - base)
    spans = runs(~active)
    gap = int(round(MAX_GAP_S * rate_hz))
    for a, b in spans:
        if b - a < gap and a > 0 and b < n:
            active[a:b] = True
    spans = runs(active)
    labels = np.zeros(n, dtype=np.int8)
    if len(spans) == 0 or level - base < MIN_WALK_ACTIVITY:
        log.info("gait_segment walk=none samples=%d", n)
        nan = float("nan")
        return Segmentation(nan, nan, nan, nan, 0, nan, {"still_before": duration}, labels)
    a, b = spans[np.argmax(spans[:, 1] - spans[:, 0])]
    # Hysteresis: the first and last steps are softer than the walk's core, so the core (above
    # ACTIVITY_LEVEL) is extended outwards while the activity stays above a lower level.
    quiet_before = np.flatnonzero(activity[:a] <= base + START_LEVEL * (level - base))
    quiet_after = np.flatnonzero(activity[b:] <= base + END_LEVEL * (level - base))
    a = int(quiet_before[-1]) + 1 if len(quiet_before) else 0
    b = b + int(quiet_after[0]) if len(quiet_after) else n
    walk_start = min(max(a / rate_hz + WALK_START_SHIFT_S, 0.0), duration)
    walk_end = min(max((b - 1) / rate_hz + WALK_END_SHIFT_S, walk_start), duration)
    i0, i1 = int(round(walk_start * rate_hz)), int(round(walk_end * rate_hz))
    labels[i0:i1] = WALK

    # 2. The U-turn.
    yaw = moving_average(gyr @ up, int(round(YAW_SMOOTH_S * rate_hz)))
    s0 = i0 + int(TURN_SEARCH[0] * (i1 - i0))
    s1 = i0 + int(TURN_SEARCH[1] * (i1 - i0))
    turn_start = turn_end = float("nan")
    peak = s0 + int(np.argmax(np.abs(yaw[s0:s1]))) if s1 > s0 else -1
    if peak >= 0 and yaw[peak] != 0:
        sign = np.sign(yaw[peak])
        r = runs(sign * yaw > TURN_LEVEL * abs(yaw[peak]))
        hit = r[(r[:, 0] <= peak) & (r[:, 1] > peak)][0]
        t0, t1 = max(int(hit[0]), i0), min(int(hit[1]), i1)
        angle_deg = abs(float(np.degrees((gyr[t0:t1] @ up).sum() / rate_hz)))
        if angle_deg >= MIN_TURN_DEG:
            turn_start, turn_end = t0 / rate_hz, t1 / rate_hz
            labels[t0:t1] = TURN

    # 3. Steps.
    seg = bp[i0:i1 + 1]
    scale = float(seg.std()) if len(seg) > 1 else 0.0
    peaks = find_peaks(seg, int(round(MIN_STEP_INTERVAL_S * rate_hz)), STEP_PROMINENCE * scale) + i0
    steps = int(len(peaks)) if scale > 0 else 0
    walk_s = walk_end - walk_start
    cadence = 60.0 * steps / walk_s if walk_s > 0 else float("nan")
    phases = {
        "still_before": walk_start,
        "walk_out": (turn_start - walk_start) if math.isfinite(turn_start) else walk_s,
        "turn": (turn_end - turn_start) if math.isfinite(turn_start) else 0.0,
        "walk_back": (walk_end - turn_end) if math.isfinite(turn_end) else 0.0,
        "still_after": duration - walk_end,
    }
    log.info("gait_segment walk_start_s=%.2f walk_end_s=%.2f turn_start_s=%.2f turn_end_s=%.2f steps=%d",
             walk_start, walk_end, turn_start, turn_end, steps)
    return Segmentation(walk_start, walk_end, turn_start, turn_end, steps, cadence, phases, labels,
                        peaks / rate_hz)
