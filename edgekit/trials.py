"""Where a screening station's trials begin and end, from a stream of IMU samples.

A trial (one walked test) starts and stops by the operator's command (messages.TrialCommand: the command
topic, the station button's line on the serial port, the station screen). When no operator has started
one, movement detection is the fallback (`detect = "movement"`): a trial opens when the trunk starts to
move (with PRE_ROLL_S of the stillness before it, which gait.segment needs as its baseline) and closes
after STILL_END_S of stillness. With `detect = "source"` the whole source run is one trial unless the
operator starts or stops one (a recorded trial replayed from its file).

A trial longer than `max_s` is cut there and reported as too long (closed_by "max_duration"); a movement
that ends within MIN_MOVEMENT_S is fidgeting, not a trial: dropped and counted, not reported. numpy only.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from edgekit.contract.messages import TrialCommand

log = logging.getLogger(__name__)

Detect = Literal["movement", "source"]

# Movement detection works on FRAME_S frames of the acc norm (m/s^2) and gyro norm (rad/s). Measured on the
# IPOL lower-back recordings (edgekit eval trials' data): standing still, the acc norm's std per 0.25 s is
# 0.02-0.15 and the mean gyro norm 0.01-0.17; walking, their medians are 0.86-3.5 and 0.38-1.14. The
# thresholds sit between, with hysteresis (a frame is active above ACTIVE_*, still below STILL_*).
FRAME_S = 0.25
ACTIVE_ACC_STD = 0.35
ACTIVE_GYRO = 0.35
STILL_ACC_STD = 0.2
STILL_GYRO = 0.25
START_FRAMES = 2  # 0.5 s of movement opens a trial (one jolt does not)
PRE_ROLL_S = 3.0  # stillness kept before the movement: the segmentation's still baseline
STILL_END_S = 3.0  # this long still after moving closes the trial (a TUG has no pause that long)
MIN_MOVEMENT_S = 4.0  # shorter movement is fidgeting (gait.segment needs 4 s anyway)

MAX_DURATION = "max_duration"  # closed_by of a trial cut at max_s


@dataclass(frozen=True, eq=False)
class ClosedTrial:
    """One trial's samples and how it began and ended. `participant` is the operator's code (hashed by the
    agent before it leaves), `operator` the operator's entries for this trial."""

    t_s: np.ndarray
    values: np.ndarray
    started_by: str  # "operator" | "movement" | "source"
    closed_by: str  # "operator" | "still" | "end" | "stop" | MAX_DURATION
    participant: str | None = None
    operator: dict[str, Any] = field(default_factory=dict)


class TrialControl:
    """Cuts a sample stream into trials. `command` may be called from any thread (MQTT, the screen); the
    commands take effect, in order, before the next samples `push_many` is given. `state()` is what the
    station screen shows."""

    def __init__(self, rate_hz: float, channels: int, *, max_s: float, detect: Detect = "movement") -> None:
        if rate_hz <= 0 or max_s <= 0:
            raise ValueError(f"rate_hz and max_s must be > 0 (got {rate_hz}, {max_s})")
        self.rate_hz, self.detect, self.max_s = float(rate_hz), detect, float(max_s)
        self._max_rows = max(1, int(round(max_s * rate_hz)))
        self._pre_rows = int(round(PRE_ROLL_S * rate_hz))
        self._frame_n = max(2, int(round(FRAME_S * rate_hz)))
        cap = self._max_rows + self._pre_rows
        self._t = np.empty(cap, dtype=np.float64)
        self._v = np.empty((cap, channels), dtype=np.float64)
        self._n = 0  # rows held: the open trial's, or the pre-roll while idle
        self._frame = np.empty((self._frame_n, channels), dtype=np.float64)
        self._frame_fill = 0
        self._commands: queue.SimpleQueue[TrialCommand] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards the fields state() reads
        self.open: TrialCommand | str | None = "source" if detect == "source" else None
        self._active_run = 0
        self._still_run = 0
        self._moved_rows = 0  # rows up to the open movement trial's last active frame
        self.ignored = 0  # movements too short to be a trial
        self.last: dict[str, Any] | None = None  # the latest answer, for the screen (set by the agent)

    # --- commands ----------------------------------------------------------------------------------

    def command(self, cmd: TrialCommand) -> None:
        self._commands.put(cmd)
        log.info("trial.command action=%s origin=%s participant=%s", cmd.action, cmd.origin or "-",
                 "given" if cmd.participant else "none")

    def _apply(self, cmd: TrialCommand) -> ClosedTrial | None:
        if cmd.action == "start":
            if self.open is not None and self._n:
                log.info("trial.restarted dropped_samples=%d by=%s", self._n, cmd.origin or "operator")
            self._set_open(cmd)
            self._n = 0
            return None
        if self.open is None:
            log.warning("trial.command_ignored action=%s reason=no trial is running", cmd.action)
            return None
        if cmd.action == "cancel":
            log.info("trial.cancelled dropped_samples=%d", self._n)
            self._set_open(None)
            self._n = 0
            return None
        return self._close("operator")

    def _set_open(self, value: TrialCommand | str | None) -> None:
        with self._lock:
            self.open = value
        self._active_run = self._still_run = self._moved_rows = 0

    # --- samples -----------------------------------------------------------------------------------

    def push_many(self, t_s: np.ndarray, values: np.ndarray) -> list[ClosedTrial]:
        """Samples (n,), (n, C) in; the trials they (or the commands before them) closed out."""
        out: list[ClosedTrial] = []
        while not self._commands.empty():
            closed = self._apply(self._commands.get())
            if closed is not None:
                out.append(closed)
        i, n = 0, len(t_s)
        while i < n:
            k = min(self._frame_n - self._frame_fill, n - i)
            if self.open is not None:
                k = min(k, self._max_rows - self._n)
            self._keep(t_s[i:i + k], values[i:i + k])
            self._frame[self._frame_fill:self._frame_fill + k] = values[i:i + k]
            self._frame_fill += k
            i += k
            if self._frame_fill == self._frame_n:
                self._frame_fill = 0
                closed = self._on_frame(self._frame)
                if closed is not None:
                    out.append(closed)
            if self.open is not None and self._n >= self._max_rows:
                out.append(self._close(MAX_DURATION))
        return out

    def _keep(self, t_s: np.ndarray, values: np.ndarray) -> None:
        """Append to the open trial, or to the pre-roll while idle (only its last PRE_ROLL_S is kept)."""
        if self.open is None:
            if self.detect != "movement":
                return
            if self._n + len(t_s) > len(self._t):
                keep = self._pre_rows
                self._t[:keep] = self._t[self._n - keep:self._n]
                self._v[:keep] = self._v[self._n - keep:self._n]
                self._n = keep
        self._t[self._n:self._n + len(t_s)] = t_s
        self._v[self._n:self._n + len(t_s)] = values
        self._n += len(t_s)

    def _on_frame(self, frame: np.ndarray) -> ClosedTrial | None:
        """Movement detection, one frame at a time; only ever opens and closes movement trials."""
        if self.detect != "movement" or (self.open is not None and self.open != "movement"):
            return None
        acc_std = float(np.linalg.norm(frame[:, :3], axis=1).std())
        gyro = float(np.linalg.norm(frame[:, 3:6], axis=1).mean())
        active = acc_std > ACTIVE_ACC_STD or gyro > ACTIVE_GYRO
        still = acc_std < STILL_ACC_STD and gyro < STILL_GYRO
        if self.open is None:
            self._active_run = self._active_run + 1 if active else 0
            if self._active_run >= START_FRAMES:
                pre = min(self._n, self._pre_rows + START_FRAMES * self._frame_n)
                self._t[:pre], self._v[:pre] = self._t[self._n - pre:self._n], self._v[self._n - pre:self._n]
                self._n = pre
                self._set_open("movement")
                self._moved_rows = self._n
            return None
        self._still_run = self._still_run + 1 if still else 0
        if not still:
            self._moved_rows = self._n
        if self._still_run * FRAME_S < STILL_END_S:
            return None
        moved_s = (self._moved_rows - min(self._pre_rows, self._moved_rows)) / self.rate_hz
        if moved_s < MIN_MOVEMENT_S:
            self.ignored += 1
            log.info("trial.movement_ignored moved_s=%.1f reason=shorter than %g s: not a walked test", moved_s,
                     MIN_MOVEMENT_S)
            self._set_open(None)
            return None
        return self._close("still")

    def finish(self, closed_by: str) -> ClosedTrial | None:
        """At the source's end or a stop: the open trial, if it holds samples (pending commands first)."""
        closed = None
        while not self._commands.empty():
            closed = self._apply(self._commands.get()) or closed
        if closed is not None:
            return closed
        return self._close(closed_by) if self.open is not None and self._n else None

    def _close(self, closed_by: str) -> ClosedTrial:
        opened = self.open
        cmd = opened if isinstance(opened, TrialCommand) else None
        trial = ClosedTrial(self._t[:self._n].copy(), self._v[:self._n].copy(),
                            "operator" if cmd else str(opened), closed_by,
                            cmd.participant if cmd else None, dict(cmd.operator) if cmd else {})
        self._n = 0
        # A source trial cut at max_s goes on as the next one (memory stays bounded, no sample unsegmented);
        # an operator's or a movement trial ends there.
        self._set_open("source" if opened == "source" and closed_by == MAX_DURATION else None)
        return trial

    def state(self) -> dict[str, Any]:
        """What the station screen shows: recording or waiting, for how long, and the latest answer."""
        with self._lock:
            opened = self.open
        return {"recording": opened is not None, "started_by": None if opened is None else
                ("operator" if isinstance(opened, TrialCommand) else opened),
                "seconds": round(self._n / self.rate_hz, 1) if opened is not None else 0.0, "last": self.last}
