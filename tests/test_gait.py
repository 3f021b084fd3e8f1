"""Gait segmentation: signal helpers, a synthetic trial, and the IPOL annotations (leave-subjects-out).

The segmentation's constants were chosen on IPOL subjects 1-5; the data tests assert only on subjects
6-15. Measured there (58 trials): median |error| walk start 0.12 s, walk end 0.30 s, turn start 0.04 s,
turn end 0.04 s, step count 2 (worst trial 19 % of its steps), per-sample phase agreement median
97.6 %, worst 85.7 %. The bounds below are looser than those numbers, not fitted to them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgekit.datasets import ipol_files, read_ipol
from edgekit.exporters.evaluation.ipol import ERRORS, evaluate, plot, table
from edgekit.gait import STILL, TURN, WALK, band_pass, find_peaks, moving_average, segment

RATE = 100.0


def synthetic_trial(step_hz: float = 1.8) -> tuple[np.ndarray, dict[str, float]]:
    """Still 3 s, walk 6 s, 180 deg turn over 2 s, walk 6 s, still 3 s; sensor tilted like a real one."""
    rng = np.random.default_rng(7)
    truth = {"walk_start_s": 3.0, "turn_start_s": 9.0, "turn_end_s": 11.0, "walk_end_s": 17.0}
    t = np.arange(int(20 * RATE)) / RATE
    walking = (t >= 3.0) & (t < 17.0)
    turning = (t >= 9.0) & (t < 11.0)
    up = np.array([0.9, 0.0, np.sqrt(1 - 0.81)])
    side = np.array([0.0, 1.0, 0.0])
    bounce = np.where(walking, 2.0 * np.cos(2 * np.pi * step_hz * (t - 3.0)), 0.0)
    acc = (9.81 + bounce)[:, None] * up + np.where(walking, 0.5 * np.sin(np.pi * step_hz * t), 0)[:, None] * side
    yaw = np.where(turning, np.pi / 2.0, 0.0)  # pi/2 rad/s for 2 s = 180 deg
    sway = np.where(walking, 0.3 * np.sin(np.pi * step_hz * t), 0.0)  # pelvis yaw sway, one per stride
    gyr = (yaw + sway)[:, None] * up + np.where(walking, 0.2 * np.cos(np.pi * step_hz * t), 0)[:, None] * side
    values = np.concatenate([acc, gyr], axis=1) + rng.normal(0, 0.01, size=(len(t), 6))
    truth["steps"] = int(round(14.0 * step_hz))
    return values, truth


def test_moving_average_and_band_pass() -> None:
    x = np.arange(10, dtype=float)
    assert np.allclose(moving_average(x, 3)[1:-1], x[1:-1])
    assert moving_average(x, 3)[0] == pytest.approx(0.5)  # shrinks at the edge
    t = np.arange(1000) / RATE
    mixed = np.sin(2 * np.pi * 0.1 * t) + np.sin(2 * np.pi * 2.0 * t) + np.sin(2 * np.pi * 20.0 * t)
    assert np.allclose(band_pass(mixed, RATE, 0.5, 3.0), np.sin(2 * np.pi * 2.0 * t), atol=1e-9)


def test_find_peaks_keeps_prominent_peaks_apart() -> None:
    t = np.arange(500) / RATE
    x = np.sin(2 * np.pi * 2.0 * t) + 0.05 * np.sin(2 * np.pi * 23.0 * t)  # ripple makes tiny maxima
    peaks = find_peaks(x, min_distance=30, min_prominence=0.5)
    assert len(peaks) == 10
    assert np.all(np.diff(peaks) >= 30)
    assert np.allclose(t[peaks] % 0.5, 0.125, atol=0.03)


def test_synthetic_trial_is_segmented() -> None:
    values, truth = synthetic_trial()
    seg = segment(values, RATE)
    for key in ("walk_start_s", "walk_end_s"):
        assert getattr(seg, key) == pytest.approx(truth[key], abs=0.7)
    for key in ("turn_start_s", "turn_end_s"):
        assert getattr(seg, key) == pytest.approx(truth[key], abs=0.4)
    assert abs(seg.steps - truth["steps"]) <= 3
    assert seg.cadence_spm == pytest.approx(60 * 1.8, rel=0.15)
    assert seg.phase_labels.dtype == np.int8 and len(seg.phase_labels) == len(values)
    assert seg.phase_labels[100] == STILL and seg.phase_labels[500] == WALK and seg.phase_labels[1000] == TURN
    assert sum(seg.phase_s.values()) == pytest.approx(len(values) / RATE)
    assert set(seg.phase_s) == {"still_before", "walk_out", "turn", "walk_back", "still_after"}


def test_standing_still_has_no_walk() -> None:
    rng = np.random.default_rng(1)
    values = np.concatenate([np.tile([0.0, 0.0, 9.81], (1000, 1)), np.zeros((1000, 3))], axis=1)
    seg = segment(values + rng.normal(0, 0.02, size=values.shape), RATE)
    assert math.isnan(seg.walk_start_s) and math.isnan(seg.turn_start_s)
    assert seg.steps == 0 and not seg.phase_labels.any()


def test_bad_input_names_the_problem() -> None:
    with pytest.raises(ValueError, match=r"\(T, 6\).*\(100, 3\)"):
        segment(np.zeros((100, 3)), RATE)
    with pytest.raises(ValueError, match="rate_hz"):
        segment(np.zeros((1000, 6)), -1.0)
    with pytest.raises(ValueError, match="4 s"):
        segment(np.zeros((100, 6)), RATE)


@pytest.mark.data
def test_held_out_subjects_match_the_annotations(data_dir) -> None:
    rows, agreement, relative_steps = [], [], []
    for path in ipol_files():
        trial = read_ipol(path)
        if trial.meta["Subject"] <= 5:  # the constants were chosen on these
            continue
        seg = segment(trial.values, trial.rate_hz)
        (a, b), (c, d) = trial.meta["TrialBoundaries"], trial.meta["UTurnBoundaries"]
        ref_steps = len(trial.meta["LeftFootEvents"]) + len(trial.meta["RightFootEvents"])
        rows.append([seg.walk_start_s - a / RATE, seg.walk_end_s - b / RATE, seg.turn_start_s - c / RATE,
                     seg.turn_end_s - d / RATE, seg.steps - ref_steps])
        agreement.append(float((seg.phase_labels == trial.labels["phase"]).mean()))
        relative_steps.append(abs(seg.steps - ref_steps) / ref_steps)
    err = np.abs(np.array(rows))
    assert len(err) >= 50 and np.all(np.isfinite(err))  # every held-out trial has a walk and a turn
    median = np.median(err, axis=0)
    assert median[0] < 0.25  # walk start (measured 0.12 s)
    assert median[1] < 0.6  # walk end (0.30 s): the last, softest steps are hard to see at the trunk
    assert median[2] < 0.15 and median[3] < 0.15  # turn start / end (0.04 s each)
    assert median[4] <= 3  # steps (2)
    assert max(relative_steps) < 0.3  # every trial's step count within 30 % (worst 19 %)
    assert np.median(agreement) > 0.93 and min(agreement) > 0.8  # per-sample phase labels


@pytest.mark.data
def test_evaluation_report(data_dir, tmp_path) -> None:
    files = [p for p in ipol_files() if p.name.split("-")[1] == "1_lb.txt"][:8]  # trial 1 of 8 subjects
    result = evaluate(files)
    assert len(result["trials"]) == 8
    assert set(result["summary"]) == {"all", "tuning", "held_out"}
    assert all(k in result["trials"][0] for k in ERRORS)
    assert result["summary"]["held_out"]["turn_start_s"]["median_abs"] < 0.3
    text = table(result)
    assert "held-out subjects 6-15" in text and "subjects 1-5 (constants chosen here)" in text
    out = plot(result, tmp_path / "ipol.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
