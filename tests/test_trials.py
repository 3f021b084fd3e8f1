"""Where trials begin and end (edgekit/trials.py, issue 13): the operator's commands win, movement detection
is the fallback and finds each walked IPOL test in a day-long stream, fidgets and overlong trials are
handled, and the commands parse the same from the command topic, the button's serial line and the screen."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from edgekit import topics
from edgekit.contract.messages import TrialCommand
from edgekit.errors import DataError
from edgekit.station import command_from
from edgekit.trials import MAX_DURATION, TrialControl

RATE = 100.0
G = np.array([0.0, 0.0, 9.81, 0.0, 0.0, 0.0])


def still(seconds: float, rng: np.random.Generator) -> np.ndarray:
    return G + rng.normal(0, 0.01, (int(seconds * RATE), 6))


def walking(seconds: float) -> np.ndarray:
    """Steps at 2 Hz: the trunk's vertical acceleration swings +-2 m/s^2, its yaw rate +-0.8 rad/s."""
    t = np.arange(int(seconds * RATE)) / RATE
    out = np.tile(G, (len(t), 1))
    out[:, 2] += 2.0 * np.sin(2 * np.pi * 2.0 * t)
    out[:, 5] = 0.8 * np.sin(2 * np.pi * 1.0 * t)
    return out


def feed(control: TrialControl, values: np.ndarray, t0: float = 0.0, block: int = 37) -> list:
    """Push `values` in odd-sized blocks (frames straddle them), timed from t0; the trials that closed."""
    t = t0 + np.arange(len(values)) / RATE
    out = []
    for a in range(0, len(values), block):
        out += control.push_many(t[a:a + block], values[a:a + block])
    return out


def test_movement_opens_a_trial_with_the_stillness_before_and_stillness_closes_it() -> None:
    rng = np.random.default_rng(0)
    control = TrialControl(RATE, 6, max_s=120, detect="movement")
    closed = feed(control, np.concatenate([still(10, rng), walking(12), still(5, rng)]))
    assert len(closed) == 1
    trial = closed[0]
    assert trial.started_by == "movement" and trial.closed_by == "still" and trial.participant is None
    # from ~3 s before the movement (the pre-roll) to >= 3 s of stillness after it
    assert 6.5 <= trial.t_s[0] <= 7.5 and 24.9 <= trial.t_s[-1] <= 26.0
    assert np.all(np.diff(trial.t_s) > 0)  # contiguous, in order, nothing doubled by the pre-roll
    assert control.finish("end") is None


def test_a_fidget_is_not_a_trial() -> None:
    rng = np.random.default_rng(1)
    control = TrialControl(RATE, 6, max_s=120, detect="movement")
    assert feed(control, np.concatenate([still(5, rng), walking(1.5), still(6, rng)])) == []
    assert control.ignored == 1 and not control.state()["recording"]


def test_the_operators_start_and_stop_win_over_movement() -> None:
    rng = np.random.default_rng(2)
    control = TrialControl(RATE, 6, max_s=120, detect="movement")
    control.command(TrialCommand("start", "AB-7", {"age": 81.0, "sex": "F"}, origin="screen"))
    # stillness inside an operator's trial does not end it (a participant who pauses is still walking it)
    assert feed(control, np.concatenate([still(2, rng), walking(6), still(5, rng), walking(4)])) == []
    assert control.state()["recording"] and control.state()["started_by"] == "operator"
    control.command(TrialCommand("stop", origin="serial"))
    (trial,) = feed(control, still(1, rng), t0=100.0)
    assert trial.started_by == "operator" and trial.closed_by == "operator"
    assert trial.participant == "AB-7" and trial.operator == {"age": 81.0, "sex": "F"}
    assert len(trial.t_s) == 17 * RATE and trial.t_s[-1] < 100.0  # the samples after stop are not in it


def test_cancel_drops_the_trial_and_a_stop_without_one_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(3)
    control = TrialControl(RATE, 6, max_s=120, detect="source")
    control.command(TrialCommand("cancel"))
    assert feed(control, walking(5)) == []
    assert control.finish("end") is None  # the source trial was cancelled: nothing to send
    control.command(TrialCommand("stop"))
    assert feed(control, still(1, rng)) == []
    assert "trial.command_ignored action=stop reason=no trial is running" in caplog.text


def test_a_trial_past_max_s_is_cut_and_reported_as_such() -> None:
    control = TrialControl(RATE, 6, max_s=10, detect="movement")
    control.command(TrialCommand("start", "AB-8"))
    (trial,) = feed(control, walking(14))
    assert trial.closed_by == MAX_DURATION and len(trial.t_s) == 10 * RATE and trial.participant == "AB-8"
    # an operator's trial ends there; the movement that goes on opens a trial of its own, without the code
    assert control.state()["started_by"] == "movement"
    last = control.finish("end")
    assert last is not None and last.participant is None


@pytest.mark.data
def test_movement_detection_finds_each_walked_ipol_test_in_a_days_stream(data_dir: Path) -> None:
    """All 86 IPOL trials back to back, 6 s of stillness between: each walked test (gait.segment's walk,
    from 1 s before it) lies inside exactly one detected trial. Measured: 87 trials, the extra one 6-5's
    subject walking on after the test (annotated steps at 29-33 s), and 14 short movements ignored."""
    from edgekit import gait
    from edgekit.datasets import ipol_files, read_ipol

    rng = np.random.default_rng(0)
    control = TrialControl(RATE, 6, max_s=120, detect="movement")
    closed, walks, t0 = [], [], 0.0
    for path in ipol_files():
        table = read_ipol(path)
        seg = gait.segment(table.values, table.rate_hz)
        gap = table.values[:50].mean(axis=0) + rng.normal(0, 0.01, (600, 6))
        closed += feed(control, gap, t0, block=2048)
        t0 += 6.0
        walks.append((path.name, t0 + seg.walk_start_s - 1.0, t0 + seg.walk_end_s))
        closed += feed(control, table.values, t0, block=2048)
        t0 += len(table.values) / RATE
    last = control.finish("end")
    closed += [last] if last is not None else []
    for name, start, end in walks:
        inside = [c for c in closed if c.t_s[0] <= start and c.t_s[-1] >= end]
        assert len(inside) == 1, name
    assert len(walks) <= len(closed) <= len(walks) + 2
    assert all(c.started_by == "movement" for c in closed)


def test_commands_parse_alike_from_the_topic_the_button_and_the_screen() -> None:
    sent = TrialCommand("start", "AB-123", {"age": 77.0, "sex": "M"}, ts=5.0)
    where = f"topic {topics.command('clinic', 'station-1', topics.TRIAL_COMMAND)!r}"
    got = TrialCommand.decode(sent.encode(), where)
    assert (got.action, got.participant, got.operator, got.ts) == ("start", "AB-123", {"age": 77.0, "sex": "M"}, 5.0)
    assert TrialCommand.from_line("START AB-123", "tty:4").participant == "AB-123"  # type: ignore[union-attr]
    assert TrialCommand.from_line("stop", "tty:5").action == "stop"  # type: ignore[union-attr]
    for line in ("1.0,2.0,3.0", "STOP NOW", "START A B", "go"):
        assert TrialCommand.from_line(line, "tty:6") is None
    screen = command_from("start", {"participant": " AB-123 ", "age": "77", "sex": "M"})
    assert (screen.participant, screen.operator, screen.origin) == ("AB-123", {"age": 77.0, "sex": "M"}, "screen")


@pytest.mark.parametrize("payload, says", [
    (b'{"schema":"edgekit.trial-command/1","action":"jump"}', "action must be one of"),
    (b'{"schema":"edgekit.trial-command/1","action":"start","name":"Jane Doe"}', "'name' is not a field"),
    (b'{"schema":"edgekit.trial-command/1","action":"start","participant":"Jane Doe"}', "without spaces"),
    (b'{"schema":"edgekit.result/1"}', re.escape("payload schema must be one of ['edgekit.trial-command/1']")),
    (b'not json', "payload is not JSON"),
])
def test_a_bad_command_names_the_topic_and_what_was_expected(payload: bytes, says: str) -> None:
    where = f"topic {topics.command('clinic', 'station-1', 'trial')!r}"
    with pytest.raises(DataError, match=says) as err:
        TrialCommand.decode(payload, where)
    assert "station-1/command/trial" in str(err.value) and "Jane" not in str(err.value)


def test_the_screen_refuses_an_age_that_is_not_a_number() -> None:
    with pytest.raises(DataError, match="age must be a number"):
        command_from("start", {"participant": "AB-1", "age": "eighty"})
