"""Simulated sensors: deterministic synthetic streams per seed, for demos and tests without hardware.

    gait   a lower-back IMU during a Timed-Up-and-Go-like trial (6 channels, 100 Hz)
    pump   a water pump's vibration, current, pressure and temperature, with valve and rotor faults (8, 1 Hz)

Their channels are named as in the recordings each imitates (IPOL gait trials, SKAB), so bundles trained on
those accept them; the statistics come from those recordings (cited below). Must not import torch.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from edgekit.config import SimulatedSource
from edgekit.source import BaseReader, BlockItem, Item, Pacer
from edgekit.values import Sample, SampleBlock

GAIT_CHANNELS = ("Acc_X", "Acc_Y", "Acc_Z", "Gyr_X", "Gyr_Y", "Gyr_Z")  # m/s^2, rad/s, sensor frame
PUMP_CHANNELS = ("Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure", "Temperature", "Thermocouple",
                 "Voltage", "Volume Flow RateRMS")


# Lower-back IMU in the IPOL sensor frame, measured on 1-1_lb.txt while still: gravity reads
# (8.30, 0.13, 5.77) m/s^2, i.e. the sensor is tilted ~35 deg; the U-turn's yaw rate shows on Gyr_X and
# Gyr_Z in the same proportion. Steps: ~2 per second (README of ipol_gait: healthy adults, 10 m walks).
_GRAVITY = np.array([8.30, 0.13, 5.77])
_UP = _GRAVITY / np.linalg.norm(_GRAVITY)
_SIDE = np.array([0.0, 1.0, 0.0])

# SKAB anomaly-free.csv, 9,405 rows: per-channel mean and standard deviation (PUMP_CHANNELS order).
_PUMP_MEAN = np.array([0.213, 0.268, 2.403, 0.111, 89.472, 28.474, 228.647, 125.237])
_PUMP_STD = np.array([0.005, 0.004, 0.486, 0.253, 0.667, 0.731, 10.98, 1.605])
# fault name -> per-channel shift in units of the channel's std (valve closures, rotor imbalance)
_PUMP_FAULTS = {
    "valve1": np.array([1.0, 1.0, -2.0, -1.5, 0.5, 0.0, 0.0, -25.0]),   # inlet closure: flow and pressure fall
    "valve2": np.array([1.5, 1.5, 1.0, 3.0, 0.5, 0.0, 0.0, -20.0]),     # outlet closure: pressure rises
    "imbalance": np.array([8.0, 10.0, 1.0, 0.0, 1.0, 0.0, 0.0, -1.0]),  # rotor imbalance: vibration
}


def gait_trial(rng: np.random.Generator, rate_hz: float = 100.0) -> tuple[np.ndarray, np.ndarray]:
    """One TUG-like trial: still, walk, 180 deg turn, walk back, still. Returns (values (T, 6), phase (T,))."""
    still1, walk1, turn, walk2, still2 = (
        rng.uniform(1.8, 2.4), rng.uniform(6.0, 8.5), rng.uniform(1.3, 1.8), rng.uniform(6.0, 8.5),
        rng.uniform(1.8, 2.4),
    )
    bounds = np.cumsum([0.0, still1, walk1, turn, walk2, still2])
    n = int(round(bounds[-1] * rate_hz))
    t = np.arange(n) / rate_hz
    phase = np.searchsorted(bounds[1:], t, side="right")  # 0 still, 1 walk, 2 turn, 3 walk, 4 still
    moving = ((phase >= 1) & (phase <= 3)).astype(np.float64)
    step_hz = rng.uniform(1.8, 2.2)
    # vertical bounce at the step rate, sway at the stride rate (half of it)
    bounce = 2.2 * np.sin(2 * np.pi * step_hz * t) * moving
    sway = 1.2 * np.sin(np.pi * step_hz * t + rng.uniform(0, np.pi)) * moving
    acc = _GRAVITY + bounce[:, None] * _UP + sway[:, None] * _SIDE
    gyr = np.zeros((n, 3))
    gyr += (0.35 * np.sin(np.pi * step_hz * t) * moving)[:, None] * np.array([0.6, 0.5, -0.6])
    in_turn = phase == 2
    if in_turn.any():
        # half-sine yaw rate whose integral over the turn is pi
        tt = (t[in_turn] - bounds[2]) / (bounds[3] - bounds[2])
        yaw = (np.pi * np.pi / (2 * (bounds[3] - bounds[2]))) * np.sin(np.pi * tt)
        gyr[in_turn] += -yaw[:, None] * _UP * rng.choice([-1.0, 1.0])
    acc += rng.normal(0.0, 0.06, acc.shape)
    gyr += rng.normal(0.0, 0.012, gyr.shape)
    labels = np.select([phase == 2, moving > 0], [2, 1], 0).astype(np.int8)
    return np.hstack([acc, gyr]), labels


def pump_block(rng: np.random.Generator, n: int, fault: str | None) -> np.ndarray:
    """`n` seconds of SKAB-like pump readings (n, 8), with `fault`'s shift ramped in and held."""
    values = _PUMP_MEAN + rng.normal(0.0, 1.0, (n, 8)) * _PUMP_STD
    if fault is not None:
        ramp = np.clip(np.arange(n) / max(1.0, min(30.0, n / 3)), 0.0, 1.0)
        values += ramp[:, None] * _PUMP_FAULTS[fault] * _PUMP_STD
    return values


class SimulatedReader(BaseReader):
    """Deterministic synthetic streams per seed: 'gait' (IPOL channels, 100 Hz), 'pump' (SKAB, 1 Hz).

    At speed 0, `iter_blocks()` gives each generated block as one `SampleBlock`; paced, one `Sample` each.
    """

    finite = True

    def __init__(self, cfg: SimulatedSource, *, stop: threading.Event, **_: Any) -> None:
        super().__init__(stop)
        self.generator = cfg.generator
        self.duration_s = cfg.duration_s
        self.seed = cfg.seed
        self.speed = cfg.speed
        if cfg.generator == "gait":
            self.channels, self.rate_hz = GAIT_CHANNELS, 100.0
        else:
            self.channels, self.rate_hz = PUMP_CHANNELS, 1.0

    def blocks(self) -> Iterator[np.ndarray]:
        """The stream as consecutive (rows, channels) blocks; same seed, same numbers."""
        rng = np.random.default_rng(self.seed)
        if self.generator == "gait":
            while True:
                yield gait_trial(rng, self.rate_hz)[0]
        while True:
            normal = int(rng.integers(300, 1200))
            yield pump_block(rng, normal, None)
            fault = str(rng.choice(sorted(_PUMP_FAULTS)))
            yield pump_block(rng, int(rng.integers(60, 300)), fault)

    def _items(self) -> Iterator[Item]:
        pacer = Pacer(self.speed, self.stop)
        total = int(round(self.duration_s * self.rate_hz))
        k = 0
        for block in self.blocks():
            for row in block:
                if k >= total:
                    return
                t = k / self.rate_hz
                if not pacer.wait(t):
                    return
                yield Sample(t, row)
                k += 1

    def _block_items(self) -> Iterator[BlockItem]:
        """At speed 0 each generated block is one SampleBlock (same times: k / rate_hz, exact in both)."""
        if self.speed > 0:
            yield from self._items()
            return
        total = int(round(self.duration_s * self.rate_hz))
        k = 0
        for block in self.blocks():
            if k >= total or self.stop.is_set():
                return
            rows = block[:total - k]
            yield SampleBlock(np.arange(k, k + len(rows)) / self.rate_hz, rows)
            k += len(rows)
