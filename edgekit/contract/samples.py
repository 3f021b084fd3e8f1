"""What a sensor gateway publishes on the MQTT source's topic: one sample, a JSON block or a binary block.

Encoded here (gateways written in Python, the tests, bench/stream_khz.py) and decoded here (edgekit/source.py,
MqttReader), one copy of each layout. README.md "Sensor payloads" documents them; the binary header is
HEADER below. A block decodes to its values in the payload's channel order and its own t0/rate; mapping to
the bundle's channels, the default rate and time order are the source's. Must not import paho, onnxruntime
or torch (numpy, orjson only).

    one sample   JSON {"t": seconds, "values": [v1, ..., vC]}
    JSON block   JSON {"t0": seconds, "rate_hz": R, "channels": [names], "values": [[v1, ..., vC], ...]}
                 one row per sample; rate_hz and channels optional (default: the bundle's rate, the
                 source's channels)
    binary block HEADER (32 bytes) + N x C samples, row-major, little-endian float32 or int16
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import orjson

from edgekit.errors import DataError

MAGIC = b"EKSB"  # edgekit sample block
VERSION = 1
# magic, version, dtype code, channels C, samples N, t0 (s), rate (Hz), scale: 4+1+1+2+4+8+8+4 = 32 bytes,
# so the samples start 8-byte aligned
HEADER = struct.Struct("<4sBBHIddf")
DTYPES: dict[int, np.dtype] = {1: np.dtype("<f4"), 2: np.dtype("<i2")}
DTYPE_CODES: dict[str, int] = {"float32": 1, "int16": 2}
Dtype = Literal["float32", "int16"]


@dataclass(frozen=True, slots=True)
class Block:
    """A decoded block: `values` (n, C) float64 in the payload's channel order; `channels` the names the
    payload gave (None: the source's declared order); `rate_hz` the rate it gave (None: not given)."""

    t0_s: float
    rate_hz: float | None
    channels: tuple[str, ...] | None
    values: np.ndarray


# --- encode ----------------------------------------------------------------------------------------


def encode_sample(t_s: float, values: Sequence[float] | np.ndarray) -> bytes:
    """One sample: {"t": t_s, "values": [...]}."""
    return orjson.dumps({"t": float(t_s), "values": np.asarray(values, dtype=np.float64).tolist()})


def encode_json_block(t0_s: float, values: np.ndarray, *, rate_hz: float | None = None,
                      channels: Sequence[str] | None = None) -> bytes:
    """A JSON block of `values` (n, C), one row per sample; rate_hz and channels only when given."""
    obj: dict[str, Any] = {"t0": float(t0_s)}
    if rate_hz is not None:
        obj["rate_hz"] = float(rate_hz)
    if channels is not None:
        obj["channels"] = list(channels)
    obj["values"] = np.ascontiguousarray(values, dtype=np.float64)
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def encode_binary(t0_s: float, rate_hz: float, values: np.ndarray, *, dtype: Dtype = "float32",
                  scale: float = 1.0) -> bytes:
    """A binary block of `values` (n, C). float32: the values as float32 (scale is written, and applied on
    decoding: leave it 1); int16: round(values / scale) as int16, ValueError when one does not fit."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 1 or not 1 <= arr.shape[1] <= 0xFFFF:
        raise ValueError(f"values must be (samples >= 1, 1..65535 channels) (got shape {arr.shape})")
    if dtype not in DTYPE_CODES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_CODES)} (got {dtype!r})")
    scale = float(np.float32(scale))  # as the header holds it, so decoding multiplies by what we divided by
    if not (math.isfinite(scale) and scale != 0):
        raise ValueError(f"scale must be finite and non-zero as a float32 (got {scale!r})")
    code = DTYPE_CODES[dtype]
    if dtype == "int16":
        raw = np.rint(arr / scale)
        if not np.isfinite(raw).all() or raw.min() < -32768 or raw.max() > 32767:
            raise ValueError(f"values / scale do not fit int16 (scale {scale!r})")
        body = raw.astype(DTYPES[code]).tobytes()
    else:
        body = arr.astype(DTYPES[code]).tobytes()
    head = HEADER.pack(MAGIC, VERSION, code, arr.shape[1], arr.shape[0], float(t0_s), float(rate_hz), scale)
    return head + body


# --- decode: DataError's message is the quarantine reason (its text before ':' is the counted kind) --------


def is_binary(payload: bytes) -> bool:
    return payload[:4] == MAGIC


def decode_binary(payload: bytes, channels: Sequence[str]) -> Block:
    """A binary block with one value per name in `channels` per sample (the source's declared order)."""
    if len(payload) < HEADER.size:
        raise DataError(f"wrong size: {len(payload)} bytes, shorter than the {HEADER.size}-byte header")
    _, version, code, n_channels, n, t0, rate, scale = HEADER.unpack_from(payload)
    if version != VERSION:
        raise DataError(f"bad block: unknown version {version} (this agent reads version {VERSION})")
    if code not in DTYPES:
        raise DataError(f"bad block: unknown dtype code {code} (1 float32, 2 int16)")
    if n_channels != len(channels):
        raise DataError(f"wrong width: the block has {n_channels} channels, the source expects {len(channels)}")
    if n < 1:
        raise DataError("bad block: no samples")
    dt = DTYPES[code]
    want = HEADER.size + n * n_channels * dt.itemsize
    if len(payload) != want:
        raise DataError(f"wrong size: {len(payload)} bytes, expected {want} for {n} samples x {n_channels} "
                        f"channels of {dt.name}")
    _check_clock(t0, rate, required=True)
    if not (math.isfinite(scale) and scale != 0):
        raise DataError(f"bad block: scale must be finite and non-zero (got {scale!r})")
    values = np.frombuffer(payload, dtype=dt, count=n * n_channels, offset=HEADER.size).reshape(n, n_channels)
    values = values.astype(np.float64) if scale == 1 else values * np.float64(scale)
    _check_finite(values, channels)
    return Block(float(t0), float(rate), None, values)


def decode_json_block(obj: dict[str, Any], payload: bytes, channels: Sequence[str]) -> Block:
    """A parsed JSON block ({"t0": ...}); `payload` its bytes, `channels` the source's declared names (used
    unless the block names its own)."""
    t0, rate = _number(obj.get("t0"), "t0"), obj.get("rate_hz")
    rate = None if rate is None else _number(rate, "rate_hz")
    _check_clock(t0, rate, required=False)
    names = obj.get("channels")
    if names is not None:
        if (not isinstance(names, list) or not names or not all(isinstance(c, str) and c for c in names)
                or len(set(names)) != len(names)):
            raise DataError(f"bad block: 'channels' must be a list of distinct names (got {names!r:.120})")
        channels = names
    rows = obj.get("values")
    if not isinstance(rows, list) or not rows:
        raise DataError("bad block: 'values' must be a non-empty list of rows, one per sample")
    values = None
    # numpy converts true/false to 1/0: a payload holding either goes through the per-cell check
    if b"true" not in payload and b"false" not in payload:
        try:
            values = np.array(rows, dtype=np.float64)
        except (ValueError, TypeError, OverflowError):
            values = None
    if values is None or values.ndim != 2 or values.shape[1] != len(channels):
        values = _rows(rows, channels)  # raises with the first bad row's reason
    _check_finite(values, channels)
    return Block(t0, rate, tuple(names) if names is not None else None, values)


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"bad block: '{key}' must be a number (got {value!r:.80})")
    return float(value)


def _check_clock(t0: float, rate: float | None, *, required: bool) -> None:
    if not math.isfinite(t0):
        raise DataError(f"bad block: t0 is not finite (got {t0!r})")
    if (rate is not None or required) and not (rate is not None and math.isfinite(rate) and rate > 0):
        raise DataError(f"bad block: rate_hz must be a finite number > 0 (got {rate!r})")


def _rows(rows: list[Any], channels: Sequence[str]) -> np.ndarray:
    """The careful path: each row and cell checked, the first bad one named."""
    out = np.empty((len(rows), len(channels)), dtype=np.float64)
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise DataError(f"bad block: row {i} is not a list (got {row!r:.80})")
        if len(row) != len(channels):
            raise DataError(f"wrong width: row {i} has {len(row)} values, expected {len(channels)}")
        for j, cell in enumerate(row):
            try:
                if isinstance(cell, bool):
                    raise ValueError
                out[i, j] = float(cell)
            except (TypeError, ValueError, OverflowError):
                raise DataError(f"not a number: column {channels[j]!r} at row {i} (got {cell!r:.80})") from None
    return out


def _check_finite(values: np.ndarray, channels: Sequence[str]) -> None:
    ok = np.isfinite(values)
    if not ok.all():
        i, j = (int(k) for k in np.argwhere(~ok)[0])
        raise DataError(f"not finite: column {channels[j]!r} at row {i} (got {float(values[i, j])!r})")
