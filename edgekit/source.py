"""Sensor sources: replay a recorded file, read a serial line or an MQTT topic (simulation: simulate.py).

Generic: a recording is read by its layout (manifest.Recording: delimiter, header line, time column or rate),
never by the name of the dataset it came from.

Each source is a context manager and an iterator of `Sample` or `Quarantined` items: a bad line or
message never stops the stream, it comes out as `Quarantined(where, reason, raw)` and the agent counts
it. `iter_blocks()` gives the same items with runs of samples as one `SampleBlock` where a source has many
at once (replay, simulation at speed 0, block payloads on MQTT); the agent uses it. Drivers are import
strings in `SOURCES`, resolved only when selected. Must not import torch, and
must not import paho or pyserial at module level (they are imported by the driver that needs them).

The bundle's input contract (issue 12) is held here, at open: `ChannelMap` maps a live source's declared
channels (a count, or names in the device's order) onto the bundle's, `check_rate` refuses a configured
or file rate off by more than RATE_TOLERANCE, and `RateWatch` measures a live stream's rate from its sample
times (the first measurement is the start check, later ones count drift).
"""

from __future__ import annotations

import codecs
import importlib
import itertools
import logging
import math
import queue
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from edgekit.config import MqttSource, ReplaySource
from edgekit.contract import samples as payloads
from edgekit.contract.messages import TrialCommand
from edgekit.errors import ConfigError, DataError, EdgekitError, TransportError
from edgekit.manifest import Recording
from edgekit.mqtt import MqttSecurity, make_client, parse_url, redact_url
from edgekit.values import Quarantined, Sample, SampleBlock
from edgekit.window import sample_rate

log = logging.getLogger(__name__)

# kind -> "module:Class"; a class is imported only when its kind is selected.
SOURCES: dict[str, str] = {
    "replay": "edgekit.source:ReplayReader",
    "simulated": "edgekit.simulate:SimulatedReader",
    "serial": "edgekit.devices.serial_line:SerialReader",
    "mqtt": "edgekit.source:MqttReader",
}
# top-level module a driver needs -> the extra that installs it
EXTRAS: dict[str, str] = {"serial": "serial"}

# A TrialCommand is an operator's order read from the same stream (the station button's line on a serial
# port); the agent hands it to its trial control, in order with the samples around it.
Item = Sample | Quarantined | TrialCommand
BlockItem = SampleBlock | Sample | Quarantined | TrialCommand


@runtime_checkable
class Source(Protocol):
    """What the agent iterates over. `finite` is True for files and simulations, False for live inputs."""

    channels: tuple[str, ...]
    rate_hz: float
    finite: bool
    rate_watch: RateWatch | None

    def __enter__(self) -> Source: ...

    def __exit__(self, *exc: object) -> None: ...

    def __iter__(self) -> Iterator[Item]: ...

    def iter_blocks(self) -> Iterator[BlockItem]: ...


def resolve(kind: str) -> type:
    """The reader class registered for `kind`; a missing optional dependency names the extra to install."""
    if kind not in SOURCES:
        raise ConfigError(f"unknown source kind {kind!r}", where="source.kind",
                          hint=f"one of {', '.join(sorted(SOURCES))}")
    module_name, _, attr = SOURCES[kind].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        top = (exc.name or "").split(".")[0]
        if top in EXTRAS:
            raise ConfigError(f"source kind {kind!r} needs the Python package {top!r}", where="source.kind",
                              hint=f"pip install 'edgekit[{EXTRAS[top]}]'") from exc
        raise
    return getattr(module, attr)


def open_source(cfg: Any, *, rate_hint: float | None = None, stop: threading.Event | None = None,
                mqtt_url: str | None = None, mqtt_security: MqttSecurity | None = None,
                channel_names: Sequence[str] | None = None, recording: Recording | None = None) -> Source:
    """Build the source selected by `cfg.kind` (not started yet: use it as a context manager).

    rate_hint: the bundle's sample rate, the rate the source is held to: `replay` refuses a file whose rate
    differs, `serial` takes it when source.rate_hz is unset and refuses a source.rate_hz that differs,
    `mqtt` reports it as `rate_hz`, times blocks without a rate_hz with it and measures the stream against it
    (None: no check; mqtt then reports 0.0, its payloads carry their own time);
    stop: set it to end the iteration promptly; mqtt_url and mqtt_security: the agent's broker and its
    account and TLS files (its [mqtt] config), used by `mqtt` when `cfg.url` is unset;
    channel_names: the bundle's channels, the ones a source yields in this order: the columns `replay`
    reads, what `serial`/`mqtt` map their declared channels onto (None: a live source yields its declared
    channels, named ch0, ch1, ... when given as a count); recording: the layout `replay` reads when
    `cfg.layout` is unset (the bundle's).
    """
    cls = resolve(cfg.kind)
    return cls(cfg, rate_hint=rate_hint, stop=stop or threading.Event(), mqtt_url=mqtt_url,
               mqtt_security=mqtt_security, channel_names=channel_names, recording=recording)


# --- the bundle's input contract: channels and rate ------------------------------------------------

# How far a source's rate may be from the bundle's (relative): a configured rate, a replayed file's rate or
# a live stream's measured rate further off stops the agent at start; a live stream drifting further off
# while running is a warning and the metric rate_drift. 2 % keeps a window within 2 % of the duration the
# model was trained on (a 100 ms window stays 98-102 ms) and is wider than any crystal's error (< 0.01 %).
RATE_TOLERANCE = 0.02
RATE_PERIOD_S = 1.0  # a measurement of a live stream's rate covers at least this much of its time...
RATE_PERIOD_INTERVALS = 16  # ...this many sample intervals and two payloads (or lines)
RATE_WARN_EVERY_S = 60.0  # at most one rate-drift warning per this many seconds (each one is counted)


def rate_differs(found_hz: float, expected_hz: float) -> bool:
    """True when `found_hz` is further than RATE_TOLERANCE (relative) from `expected_hz`."""
    return not abs(found_hz - expected_hz) <= RATE_TOLERANCE * expected_hz


def check_rate(found_hz: float, expected_hz: float | None, *, what: str, where: str, hint: str,
               error: type[EdgekitError] = ConfigError) -> None:
    """Raise `error` ("bundle expects 1000 Hz, source.rate_hz is 800 Hz ...") when the rates differ by more
    than RATE_TOLERANCE; nothing when the bundle gives no rate."""
    if expected_hz and rate_differs(found_hz, expected_hz):
        off = abs(found_hz / expected_hz - 1) * 100
        raise error(f"bundle expects {expected_hz:.6g} Hz, {what} is {found_hz:.6g} Hz ({off:.3g} % off, more than "
                    f"the {RATE_TOLERANCE:.0%} tolerance)", where=where, hint=hint)


@dataclass(frozen=True)
class ChannelMap:
    """How a live source's samples become the bundle's channels: `sent` names the values as the device sends
    them, `channels` those the source yields (the bundle's, in its order), `pick` the indices into `sent`
    (None: yielded as sent), `ignored` the sent channels the bundle does not read."""

    sent: tuple[str, ...]
    channels: tuple[str, ...]
    pick: np.ndarray | None
    ignored: tuple[str, ...]

    @classmethod
    def of(cls, declared: int | Sequence[str] | None, wanted: Sequence[str] | None, *,
           key: str = "source.channels") -> ChannelMap:
        """Map `declared` (config: a count in the bundle's order, names in the device's, None: the bundle's)
        onto `wanted` (the bundle's channels; None: no bundle). ConfigError in one line, saying what the
        bundle expects and what `key` gives, when a channel the bundle needs is not there."""
        wanted = tuple(wanted or ())
        if not wanted:
            if declared is None:
                raise ConfigError("no channels declared", where=key, hint="set source.channels (a count or names)")
            sent = tuple(f"ch{i}" for i in range(declared)) if isinstance(declared, int) else tuple(declared)
            return cls(sent, sent, None, ())
        if declared is None:
            return cls(wanted, wanted, None, ())
        if isinstance(declared, int):
            if declared != len(wanted):
                raise ConfigError(f"bundle expects {len(wanted)} channels {list(wanted)}; {key} is {declared}",
                                  where=key, hint="a count means the bundle's channels in its order; to map by "
                                  "name, list the names the device sends, in its order (extra ones are ignored)")
            return cls(wanted, wanted, None, ())
        return cls.by_name(tuple(declared), wanted, what=f"{key} has", where=key)

    @classmethod
    def by_name(cls, sent: tuple[str, ...], wanted: tuple[str, ...], *, what: str, where: str,
                error: type[EdgekitError] = ConfigError) -> ChannelMap:
        missing = [c for c in wanted if c not in sent]
        if missing:
            raise error(f"bundle expects channels {list(wanted)}; {what} {list(sent)}: missing {missing}",
                        where=where, hint="name the channels the device sends, in its order, as the bundle "
                        "names them (edgekit inspect BUNDLE lists them)")
        pick = [sent.index(c) for c in wanted]
        ignored = tuple(c for c in sent if c not in wanted)
        same = pick == list(range(len(sent)))
        return cls(sent, wanted, None if same else np.asarray(pick, dtype=np.intp), ignored)

    def log_ignored(self, where: str) -> None:
        if self.ignored:
            log.info("source.channels_ignored where=%s ignored=%s reason=not in the bundle's channels %s",
                     where, list(self.ignored), list(self.channels))

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Values (C,) or (n, C) in `sent` order -> the bundle's order."""
        return values if self.pick is None else values[..., self.pick]


class RateWatch:
    """A live stream's sample rate, measured from its sample times over periods of at least RATE_PERIOD_S,
    RATE_PERIOD_INTERVALS intervals and two runs (payloads or lines): the samples from the first of a run
    to the first of a later run, over the time between them, so a block's own rate (t0 + i / rate_hz) does
    not hide how its t0s advance. The first measurement is for the reader's start check; each later one
    further than RATE_TOLERANCE from `expected_hz` counts in `drift` and is logged as a warning, at most
    once per RATE_WARN_EVERY_S. A step longer than RATE_PERIOD_S or 10 sample intervals, whichever is longer
    (an outage, a reconnect), starts the measurement again: lost time is not drift."""

    def __init__(self, expected_hz: float, *, where: str, clock: str = "sample times") -> None:
        self.expected_hz = float(expected_hz)
        self.gap_s = max(RATE_PERIOD_S, 10.0 / self.expected_hz)
        self.where = where
        self.clock = clock
        self.measured_hz: float | None = None
        self.periods = 0
        self.drift = 0
        self.last_span_s = 0.0
        self._t0: float | None = None  # the first sample of the period's first run
        self._t_last = 0.0
        self._intervals = 0  # samples from the period's first run up to (not including) the latest run
        self._pending = 0  # samples of the latest run
        self._warned_at = -math.inf
        self._unwarned = 0

    def restart(self) -> None:
        self._t0 = None

    def add(self, t_first: float, t_last: float, n: int) -> float | None:
        """Count a run of `n` samples from `t_first` to `t_last`; the measured rate when this completes a
        period, else None."""
        if self._t0 is None or t_first - self._t_last > self.gap_s:
            self._t0, self._intervals, self._pending, self._t_last = t_first, 0, n, t_last
            return None
        self._intervals += self._pending
        self._pending, self._t_last = n, t_last
        span = t_first - self._t0
        if span < RATE_PERIOD_S or self._intervals < RATE_PERIOD_INTERVALS:
            return None
        rate = self._intervals / span
        self._t0, self._intervals = t_first, 0  # this run starts the next period
        self.periods += 1
        self.measured_hz, self.last_span_s = rate, span
        if self.periods > 1 and rate_differs(rate, self.expected_hz):
            self.drift += 1
            self._warn(rate, span)
        return rate

    def _warn(self, rate: float, span: float) -> None:
        self._unwarned += 1
        now = time.monotonic()
        if now - self._warned_at < RATE_WARN_EVERY_S:
            return
        log.warning("source.rate_drift where=%s expected_hz=%.6g measured_hz=%.6g over_s=%.3g clock=%r "
                    "tolerance=%g%% periods_off=%d since_last_warning=%d (at most one warning per %g s; counted in "
                    "metrics rate_drift)", self.where, self.expected_hz, rate, span, self.clock,
                    RATE_TOLERANCE * 100, self.drift, self._unwarned, RATE_WARN_EVERY_S)
        self._warned_at, self._unwarned = now, 0


# --- shared line checks (replay, serial and mqtt use the same ones) ----------------------------------


class LineRejected(ValueError):
    """Internal: a line or message that cannot become a Sample; the message is the quarantine reason."""


def to_floats(cells: Sequence[Any], names: Sequence[str]) -> np.ndarray:
    """Cells to a float64 vector; a non-numeric or non-finite cell raises LineRejected naming its column."""
    if len(cells) != len(names):
        raise LineRejected(f"wrong width: expected {len(names)} values, got {len(cells)}")
    out = np.empty(len(names), dtype=np.float64)
    for i, (cell, name) in enumerate(zip(cells, names)):
        if isinstance(cell, bool):
            raise LineRejected(f"not a number: column {name!r} (got {cell!r})")
        try:
            v = float(cell)
        except (TypeError, ValueError, OverflowError):
            shown = cell.strip() if isinstance(cell, str) else cell
            raise LineRejected(f"not a number: column {name!r} (got {shown!r})") from None
        if not math.isfinite(v):
            shown = cell.strip() if isinstance(cell, str) else cell
            raise LineRejected(f"not finite: column {name!r} (got {shown!r})")
        out[i] = v
    return out


def check_time(t_s: float, last_s: float | None, *, strict: bool = True) -> None:
    """Raise LineRejected when time goes backwards (or, with `strict`, does not advance)."""
    if not math.isfinite(t_s):
        raise LineRejected(f"not finite: time (got {t_s!r})")
    if last_s is not None and (t_s < last_s or (strict and t_s == last_s)):
        word = "went backwards" if t_s < last_s else "did not advance"
        raise LineRejected(f"time {word}: {t_s:.6g} s after {last_s:.6g} s")


def shown(text: str) -> str:
    """A quarantined line as printable text: undecodable bytes (lone surrogates) as \\xNN escapes."""
    if text.isascii():
        return text
    return _ESCAPED.sub(lambda m: f"\\x{ord(m.group()) - 0xDC00:02x}", text)


class Pacer:
    """Keeps a stream at `speed` times the sensor clock; speed 0 = no waiting. `wait(t)` is False on stop."""

    def __init__(self, speed: float, stop: threading.Event) -> None:
        self.speed = speed
        self.stop = stop
        self._origin: tuple[float, float] | None = None

    def wait(self, t_s: float) -> bool:
        if self.speed <= 0:
            return not self.stop.is_set()
        now = time.monotonic()
        if self._origin is None:
            self._origin = (now, t_s)
        wall0, t0 = self._origin
        delay = wall0 + (t_s - t0) / self.speed - now
        if delay > 0.0005:  # shorter waits are caught up on later samples
            return not self.stop.wait(delay)
        return not self.stop.is_set()


class BaseReader:
    """Common context-manager plumbing: __exit__ closes the running iterator (and its file/socket)."""

    channels: tuple[str, ...]
    rate_hz: float
    finite: bool
    rate_watch: RateWatch | None = None  # live sources: their measured rate and drift (agent metrics)

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self._gen: Iterator[Item] | None = None

    def __enter__(self) -> BaseReader:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._gen is not None:
            self._gen.close()  # type: ignore[attr-defined]
            self._gen = None

    def __iter__(self) -> Iterator[Item]:
        self._gen = self._items()
        return self._gen

    def iter_blocks(self) -> Iterator[BlockItem]:
        """The same samples and quarantines, in the same order, as iterating; runs of samples may come
        as one `SampleBlock`. Readers without a faster path give their items one by one."""
        self._gen = self._block_items()
        return self._gen

    def _items(self) -> Iterator[Item]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _block_items(self) -> Iterator[BlockItem]:
        return self._items()


# --- replay ---------------------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1)
RAW_CHARS = 500  # a quarantined line is kept (and logged) up to this length
# A recorded line longer than this is not a sample (the widest real one, a 10-column IMU export's, is ~200 characters):
# it is quarantined and skipped without holding it in memory (a binary file may have no newline at all).
MAX_LINE_CHARS = 65536
_CHUNK_LINES = 2048
_SUB_CHUNK_LINES = 64  # a chunk with a bad line is retried in pieces this long


def undecodable(text: str, encoding: str) -> str | None:
    """The quarantine reason when `text` holds bytes that did not decode (read with errors=surrogateescape,
    they are lone surrogates U+DC80..U+DCFF), else None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        byte = ord(text[exc.start]) - 0xDC00
        return (f"not text: byte 0x{byte:02x} at character {exc.start} is not valid {encoding} "
                f"(set source.encoding if the file is in another encoding)")
    return None


def _escape_bytes(exc: UnicodeError) -> tuple[str, int]:
    """Decoding error handler: each undecodable byte becomes the lone surrogate U+DC00 + byte. Like
    Python's surrogateescape, but for bytes below 0x80 too (which other codecs than UTF-8 can reject)."""
    if isinstance(exc, UnicodeDecodeError):
        return "".join(chr(0xDC00 + b) for b in exc.object[exc.start:exc.end]), exc.end
    raise exc


ESCAPE = "edgekit.escape"
codecs.register_error(ESCAPE, _escape_bytes)
_ESCAPED = re.compile("[\udc00-\udcff]")


def decode_line(data: bytes, encoding: str) -> str:
    """Bytes to text; bytes that do not decode stay as lone surrogates (`undecodable` names the first)."""
    return data.decode(encoding, ESCAPE)


def _open_text(path: Path, encoding: str) -> Any:
    """A recorded file as text in `encoding`; bytes that do not decode stay in the line as lone surrogates
    (`undecodable` finds them), so one bad byte costs its line, not the file."""
    return path.open(encoding=encoding, errors=ESCAPE, newline=None)


def parse_stamp(cell: str) -> float:
    """A naive ISO timestamp as seconds since 1970, read as UTC so daylight-saving changes cannot reorder it
    (the training side reads recordings with this same function)."""
    try:
        return (datetime.fromisoformat(cell.strip()) - _EPOCH).total_seconds()
    except (TypeError, ValueError):
        raise LineRejected(f"bad timestamp: not understood (got {cell.strip()!r})") from None


def _stamp_seconds(cell: str) -> float:
    return float(to_floats([cell], ["time"])[0])


class _Layout:
    """Where time and values sit in a recording's lines: a Recording resolved against one file's header."""

    def __init__(self, rec: Recording, header: list[str], names: tuple[str, ...], rate_hz: float,
                 rate_from: str) -> None:
        self.delimiter = rec.delimiter
        self.rate_from = rate_from  # how rate_hz was found, for the contract check's message
        self.ncols = len(header)
        self.names = names
        self.value_cols = tuple(header.index(n) for n in names)
        self.first_line = rec.header_line + 1  # 1-based number of the first data line
        self.rate_hz = rate_hz
        self.time_col = header.index(rec.time_column) if rec.time_column else None
        self.stamp = parse_stamp if rec.time_format == "iso" else _stamp_seconds
        # An ISO stamp is a date: kept as the sample's time (seconds since 1970), so results carry the
        # recording's own dates (issue 15); a numeric time column counts from its first stamp.
        self.dated = rec.time_format == "iso"
        self.counter_col = header.index(rec.counter_column) if rec.counter_column else None
        self.counter_name = rec.counter_column or ""
        self.counter_wrap = rec.counter_wrap


def _read_header(path: Path, rec: Recording, encoding: str) -> tuple[list[str], list[str]]:
    """(lines above and at the header, up to 256 data lines after it), as text; DataError when the head of
    the file does not decode."""
    try:
        with _open_text(path, encoding) as fh:
            top = [fh.readline(MAX_LINE_CHARS).rstrip("\r\n") for _ in range(rec.header_line)]
            head = [fh.readline(MAX_LINE_CHARS).rstrip("\r\n") for _ in range(256)]
    except UnicodeError as exc:  # utf-16/utf-32 without a byte-order mark refuse the file, whatever the handler
        raise DataError(f"header not readable as {encoding} ({exc})", where=f"{path}:1",
                        hint="name the byte order in source.encoding (e.g. utf-16-le) or check the file") from None
    for n, line in enumerate(top, 1):
        bad = undecodable(line, encoding)
        if bad:
            raise DataError(f"header {bad}", where=f"{path}:{n}",
                            hint="set source.encoding (e.g. latin-1, utf-16) or check that this is a recording")
    return top, head


def _layout(path: Path, rec: Recording, names: tuple[str, ...], encoding: str) -> _Layout:
    """Resolve `rec` against the file's header: columns present, the sample rate known. DataError otherwise."""
    top, head = _read_header(path, rec, encoding)
    where = f"{path}:{rec.header_line}"
    header = top[-1].split(rec.delimiter)
    wanted = [*names, *(c for c in (rec.time_column, rec.counter_column) if c)]
    missing = [c for c in wanted if c not in header]
    if missing:
        more = f" and {len(header) - 20} more" if len(header) > 20 else ""
        raise DataError(f"missing columns {missing} that the bundle reads; the file has {header[:20]}{more}",
                        where=where, hint="check source.layout (delimiter, header_line) or the bundle's channels")
    rate, rate_from = rec.rate_hz, "the layout's rate_hz"
    if rec.rate_pattern is not None:
        rate_from = f"its rate_pattern {rec.rate_pattern!r}"
        found = next((m for m in (re.search(rec.rate_pattern, line) for line in top[:-1]) if m), None)
        try:
            rate = float(found.group(1)) if found else None
        except ValueError:
            rate = None
        if rate is None or not math.isfinite(rate) or rate <= 0:
            raise DataError(f"sample rate not found by rate_pattern {rec.rate_pattern!r} above the header",
                            where=f"{path}:1", hint="set source.layout.rate_hz")
    if rate is None:  # a time column and no rate: the median step of the first lines
        col = header.index(rec.time_column or "")
        stamps = []
        for line in head:
            cells = line.split(rec.delimiter)
            try:
                stamps.append(parse_stamp(cells[col]) if rec.time_format == "iso" else _stamp_seconds(cells[col]))
            except (LineRejected, IndexError):
                continue
        measured = sample_rate(np.asarray(stamps))
        rate = measured or 1.0
        rate_from = (f"the steps of its column {rec.time_column!r}" if measured
                     else f"assumed (no time steps in column {rec.time_column!r})")
    return _Layout(rec, header, names, float(rate), rate_from)


class _Unreadable(str):
    """Where a codec gave up on the rest of a file: quarantined with this reason, and the reading ends."""


# Control characters other than tab: numpy's parser skips some (a cell '5\x1c' reads as 5) that float()
# refuses, so a chunk holding any goes line by line and both paths quarantine the same lines.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")


class ReplayReader(BaseReader):
    """Replays a recorded file in a `Recording` layout (the config's source.layout, else the bundle's
    training layout), validating every line.

    Time: with an ISO time column, t = the stamp in seconds since 1970 (the recording's own dates reach the
    results); with a numeric one, t = stamp - first stamp; a stamp that does not advance is quarantined;
    without one, t = (line - first data line) / rate, the clock training read the same files with (a packet
    counter, when the layout names one, is only checked not to go back: real ones have gaps and repeats).
    Clean chunks are parsed with numpy in one go; a chunk with any bad line is re-read line by line.
    At speed 0, `iter_blocks()` hands each clean (sub-)chunk over as one `SampleBlock`; paced replay
    (speed > 0) always gives one `Sample` at a time, each at its time.
    """

    finite = True

    def __init__(self, cfg: ReplaySource, *, stop: threading.Event, recording: Recording | None = None,
                 channel_names: Sequence[str] | None = None, rate_hint: float | None = None, **_: Any) -> None:
        super().__init__(stop)
        self.path = Path(cfg.path)
        if not self.path.is_file():
            raise ConfigError("replay file not found", where=str(self.path), hint="check source.path")
        rec = cfg.layout or recording
        if rec is None:
            raise ConfigError("the file's layout is unknown", where="source.layout",
                              hint="set source.layout (delimiter, header_line, time_column or rate_hz), or use "
                                   "a bundle whose manifest records its training layout (input.recording)")
        if not channel_names:
            raise ConfigError("no channels to read", where="source",
                              hint="the bundle's input.channels name the columns replay reads")
        self.speed = cfg.speed
        self.encoding = cfg.encoding
        self.layout = _layout(self.path, rec, tuple(channel_names), cfg.encoding)
        self.channels = self.layout.names
        self.rate_hz = self.layout.rate_hz
        check_rate(self.rate_hz, rate_hint, what=f"the file's rate ({self.layout.rate_from})", where=str(self.path),
                   error=DataError, hint="replay a recording at the bundle's rate, or set source.layout (rate_hz, "
                   "rate_pattern or time_column) if the file's rate was read wrong")
        self._last_t: float | None = None
        self._last_counter: float | None = None
        self._t0: float | None = None

    def _check_counter(self, counter: float) -> None:
        """LineRejected when the packet counter goes back (a drop of over half its wrap is a wrap)."""
        lay, last = self.layout, self._last_counter
        if last is not None and counter < last:
            wrapped = lay.counter_wrap is not None and last - counter > lay.counter_wrap / 2
            if not wrapped:
                raise LineRejected(f"time went backwards: {lay.counter_name} {counter:.0f} after {last:.0f}")
        self._last_counter = counter

    # one line -> Sample, or LineRejected
    def _parse_line(self, text: str, lineno: int) -> Sample:
        lay = self.layout
        bad = undecodable(text, self.encoding)
        if bad:
            raise LineRejected(bad)
        cells = text.split(lay.delimiter)
        if len(cells) != lay.ncols:
            raise LineRejected(f"wrong width: expected {lay.ncols} cells, got {len(cells)}")
        values = to_floats([cells[i] for i in lay.value_cols], lay.names)
        if lay.counter_col is not None:
            self._check_counter(to_floats([cells[lay.counter_col]], [lay.counter_name])[0])
        if lay.time_col is None:
            t = (lineno - lay.first_line) / lay.rate_hz
        else:
            stamp = lay.stamp(cells[lay.time_col])
            if self._t0 is None:
                self._t0 = 0.0 if lay.dated else stamp
            t = stamp - self._t0
        check_time(t, self._last_t)
        self._last_t = t
        return Sample(t, values)

    def _parse_chunk(self, texts: list[str | None], linenos: list[int]) -> SampleBlock | None:
        """Vectorised parse of a clean, non-empty chunk; None when any line needs the careful per-line path."""
        lay = self.layout
        if not texts or any(t is None or type(t) is _Unreadable for t in texts):
            return None
        d = lay.delimiter
        want = lay.ncols - 1
        if any(s.count(d) != want for s in texts):
            return None
        joined = "".join(texts)
        if undecodable(joined, self.encoding) or _CONTROL.search(joined):
            return None
        cols = lay.value_cols if lay.counter_col is None else (lay.counter_col, *lay.value_cols)
        try:
            arr = np.loadtxt(texts, delimiter=d, usecols=cols, ndmin=2, dtype=np.float64, comments=None)
        except ValueError:
            return None
        if not np.isfinite(arr).all():
            return None
        values = arr if lay.counter_col is None else arr[:, 1:]
        if lay.counter_col is not None:
            counters = arr[:, 0]
            prev = self._last_counter if self._last_counter is not None else counters[0]
            if np.any(np.diff(counters, prepend=prev) < 0):
                return None  # a wrap or a rewind: the line path tells them apart
        t0 = self._t0
        if lay.time_col is None:
            t = (np.asarray(linenos, dtype=np.float64) - lay.first_line) / lay.rate_hz
        else:
            try:
                stamps = np.array([lay.stamp(s.split(d)[lay.time_col]) for s in texts])
            except LineRejected:
                return None
            t0 = self._t0 if self._t0 is not None else 0.0 if lay.dated else float(stamps[0])
            t = stamps - t0
            if not np.isfinite(t).all() or np.any(np.diff(t) <= 0):
                return None
        if self._last_t is not None and t[0] <= self._last_t:
            return None
        if lay.counter_col is not None:
            self._last_counter = float(arr[-1, 0])
        self._t0 = t0
        self._last_t = float(t[-1])
        return SampleBlock(np.ascontiguousarray(t, dtype=np.float64), values)

    def _lines(self, fh: Any) -> Iterator[str | _Unreadable | None]:
        """The rest of the file line by line, without line ends; None for a line over MAX_LINE_CHARS, whose
        characters are read and dropped in pieces (never held whole)."""
        while True:
            try:
                line = fh.readline(MAX_LINE_CHARS)
            except UnicodeError as exc:  # a codec that gives up on the stream (utf-16/32 byte order)
                yield _Unreadable(f"not text: the rest of the file does not decode ({exc})")
                return
            if not line:
                return
            if len(line) == MAX_LINE_CHARS and not line.endswith("\n"):
                while True:
                    more = fh.readline(MAX_LINE_CHARS)
                    if not more or more.endswith("\n"):
                        break
                yield None
                continue
            yield line.rstrip("\r\n")

    def _chunks(self) -> Iterator[tuple[list[str | None], list[int]]]:
        """The file's data lines in chunks of up to _CHUNK_LINES: (texts, 1-based line numbers), blanks left
        out; a text is None for a line too long to be a sample."""
        self._last_t = self._last_counter = self._t0 = None
        with _open_text(self.path, self.encoding) as fh:
            for _ in range(self.layout.first_line - 1):
                fh.readline(MAX_LINE_CHARS)
            lineno = self.layout.first_line
            lines = self._lines(fh)
            while True:
                raw = list(itertools.islice(lines, _CHUNK_LINES))
                if not raw:
                    return
                texts: list[str | None] = []
                linenos: list[int] = []
                for i, text in enumerate(raw):
                    if text is None or text.strip():  # blank lines (a trailing newline) are not samples
                        texts.append(text)
                        linenos.append(lineno + i)
                lineno += len(raw)
                yield texts, linenos

    def _items(self) -> Iterator[Item]:
        pacer = Pacer(self.speed, self.stop)
        for texts, linenos in self._chunks():
            for item in self._chunk_items(texts, linenos):
                for one in item.samples() if isinstance(item, SampleBlock) else (item,):
                    if isinstance(one, Sample):
                        if not pacer.wait(one.t_s):
                            return
                    elif self.stop.is_set():
                        return
                    yield one

    def _block_items(self) -> Iterator[BlockItem]:
        if self.speed > 0:  # paced: one sample at a time, each at its time
            yield from self._items()
            return
        for texts, linenos in self._chunks():
            for item in self._chunk_items(texts, linenos):
                if self.stop.is_set():
                    return
                yield item

    def _chunk_items(self, texts: list[str | None], linenos: list[int]) -> Iterator[BlockItem]:
        """A chunk as one block when clean; otherwise its clean sub-chunks as blocks and the rest per line."""
        if not texts:
            return
        fast = self._parse_chunk(texts, linenos)
        if fast is not None:
            yield fast
            return
        for a in range(0, len(texts), _SUB_CHUNK_LINES):
            sub_texts, sub_linenos = texts[a:a + _SUB_CHUNK_LINES], linenos[a:a + _SUB_CHUNK_LINES]
            fast = self._parse_chunk(sub_texts, sub_linenos) if len(texts) > _SUB_CHUNK_LINES else None
            if fast is not None:
                yield fast
                continue
            for text, n in zip(sub_texts, sub_linenos):
                if type(text) is _Unreadable:
                    yield Quarantined(where=f"{self.path}:{n}", reason=str(text), raw="")
                    continue
                if text is None:
                    yield Quarantined(where=f"{self.path}:{n}", reason=f"line too long: over {MAX_LINE_CHARS} "
                                      "characters without a newline", raw="")
                    continue
                try:
                    yield self._parse_line(text, n)
                except LineRejected as exc:
                    yield Quarantined(where=f"{self.path}:{n}", reason=str(exc),
                                      raw=shown(text[:RAW_CHARS]))


# --- mqtt -----------------------------------------------------------------------------------------


class MqttReader(BaseReader):
    """Subscribes to a gateway topic (QoS 1). Payloads (edgekit/contract/samples.py): one sample JSON
    {"t": seconds, "values": [...]}, a JSON block {"t0", "rate_hz", "channels", "values": [[...], ...]} or
    a binary block; a block comes out as one `SampleBlock` from `iter_blocks()`, decoded with numpy.

    Channels: the declared ones (source.channels: a count in the bundle's order, or names in the device's
    order) mapped onto the bundle's (ChannelMap); a JSON block that names its channels is mapped by its names.
    Rate: a block's times are t0 + i / rate_hz (its own rate_hz, else the bundle's); with a bundle rate,
    `rate_watch` measures the stream from its sample times: the first measurement (after >= RATE_PERIOD_S of
    stream time) and the first block's own rate_hz are the start check, and a stream off by more than
    RATE_TOLERANCE stops the source with DataError; later measurements count drift. A JSON block missing a
    channel the bundle needs stops it the same way before the start check passed, later it is quarantined.

    Its broker, account and TLS files are the source's own (source.url and the same keys as [mqtt]) or,
    without source.url, the agent's (mqtt_url, mqtt_security). Messages wait in a queue filled by paho's
    network thread, bounded to `queue_size` messages and `queue_bytes` bytes; when it is full the oldest
    waiting message is dropped and counted in `dropped`. Bad payloads (not JSON nor a binary block, a wrong
    size, version, channel count, a non-finite number, time going backwards within or between payloads)
    come out as Quarantined naming the topic.
    """

    finite = False

    def __init__(self, cfg: MqttSource, *, stop: threading.Event, rate_hint: float | None = None,
                 mqtt_url: str | None = None, mqtt_security: MqttSecurity | None = None,
                 channel_names: Sequence[str] | None = None, queue_size: int = 100_000,
                 queue_bytes: int = 256 << 20, **_: Any) -> None:
        super().__init__(stop)
        own = bool(cfg.url)
        url = cfg.url if own else mqtt_url
        if not url:
            raise ConfigError("no broker for the mqtt source", where="source.url",
                              hint="set source.url or mqtt.url")
        self.key = "source" if own else "mqtt"  # the config section the broker, account and files come from
        self.endpoint = parse_url(url, where=f"{self.key}.url")
        self.url = redact_url(url)  # for messages and logs
        self.security = cfg if own else mqtt_security
        self.topic = cfg.topic
        self.rate_hz = float(rate_hint or 0.0)  # 0.0: unknown; each payload carries its own time
        self.map = ChannelMap.of(cfg.channels, channel_names)
        self.map.log_ignored(f"topic {self.topic}")
        self.channels = self.map.channels
        self._maps: dict[tuple[str, ...], ChannelMap] = {}  # by the names a JSON block gives
        self.rate_watch = RateWatch(self.rate_hz, where=f"topic {self.topic}") if self.rate_hz else None
        self.started = self.rate_watch is None  # True once the start check passed (or there is none)
        self.dropped = 0
        self._queue: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=queue_size)
        self._queue_bytes = queue_bytes
        self._queued_bytes = 0
        self._bytes_lock = threading.Lock()
        self._client: Any = None
        self.subscribed = threading.Event()

    def __enter__(self) -> MqttReader:
        client = make_client(self.endpoint, self.security, client_id=f"edgekit-source-{id(self):x}",
                             key=self.key)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_subscribe = lambda *a: self.subscribed.set()
        client.reconnect_delay_set(0.2, 10)
        try:
            client.connect(self.endpoint.host, self.endpoint.port, keepalive=30)
        except OSError as exc:
            raise TransportError(f"cannot connect: {exc}", where=self.url,
                                 hint="is the broker running and reachable?") from exc
        client.loop_start()
        self._client = client
        log.info("source_mqtt_connect url=%s topic=%s channels=%s rate_hz=%g", self.url, self.topic,
                 list(self.channels), self.rate_hz)
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.warning("source_mqtt_refused url=%s reason=%s", self.url, reason)
            return
        client.subscribe(self.topic, qos=1)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        item = (msg.topic, bytes(msg.payload))
        size = len(item[1])
        with self._bytes_lock:
            self._queued_bytes += size
        while True:
            if self._queued_bytes > self._queue_bytes and self._drop_oldest():
                continue
            try:
                self._queue.put_nowait(item)
                return
            except queue.Full:
                self._drop_oldest()

    def _drop_oldest(self) -> bool:
        try:
            _, old = self._queue.get_nowait()
        except queue.Empty:
            return False
        with self._bytes_lock:
            self._queued_bytes -= len(old)
        self.dropped += 1
        return True

    # --- payloads -> items --------------------------------------------------------------------------

    def parse(self, payload: bytes, last_t: float | None) -> Sample:
        """One sample's JSON payload to a Sample in the bundle's channel order, or LineRejected."""
        import orjson

        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise LineRejected(f"not JSON: {exc}") from None
        return self._sample(obj, last_t)

    def _sample(self, obj: Any, last_t: float | None) -> Sample:
        if not isinstance(obj, dict) or "t" not in obj or "values" not in obj:
            raise LineRejected("bad payload: expected a JSON object with 't' and 'values' (one sample) or 't0' "
                               "and 'values' (a block)")
        values = obj["values"]
        if not isinstance(values, list):
            raise LineRejected(f"bad payload: 'values' must be a list (got {type(values).__name__})")
        t = float(to_floats([obj["t"]], ["t"])[0])
        arr = to_floats(values, self.map.sent)
        check_time(t, last_t)
        return Sample(t, self.map.apply(arr))

    def decode(self, payload: bytes, last_t: float | None) -> Sample | SampleBlock:
        """Any payload to a Sample or a SampleBlock in the bundle's channel order; LineRejected with the reason
        when it is bad; DataError when it breaks the bundle's contract before the start check passed."""
        import orjson

        if payloads.is_binary(payload):
            try:
                block = payloads.decode_binary(payload, self.map.sent)
            except DataError as exc:
                raise LineRejected(exc.message) from None
            return self._block(block, self.map, last_t)
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise LineRejected(f"not JSON: {exc} (nor a binary block: no {payloads.MAGIC!r} magic)") from None
        if not (isinstance(obj, dict) and "t0" in obj):
            return self._sample(obj, last_t)
        try:
            block = payloads.decode_json_block(obj, payload, self.map.sent)
        except DataError as exc:
            raise LineRejected(exc.message) from None
        return self._block(block, self._names_map(block.channels), last_t)

    def _names_map(self, names: tuple[str, ...] | None) -> ChannelMap:
        """The map for a JSON block's own channel names (cached): a missing bundle channel stops the source
        before the start check passed and is quarantined after."""
        if names is None:
            return self.map
        found = self._maps.get(names)
        if found is None:
            try:
                found = ChannelMap.by_name(names, self.map.channels, what="the block has",
                                           where=f"topic {self.topic}", error=DataError)
            except DataError as exc:
                if not self.started:
                    raise
                raise LineRejected(f"missing channels: {exc.message}") from None
            found.log_ignored(f"topic {self.topic}")
            self._maps[names] = found
        return found

    def _block(self, block: payloads.Block, cmap: ChannelMap, last_t: float | None) -> SampleBlock:
        rate = block.rate_hz or self.rate_hz
        if not rate:
            raise LineRejected("bad block: no rate_hz in the block and no bundle rate to default to")
        if block.rate_hz and not self.started:
            check_rate(block.rate_hz, self.rate_hz, what="the first block's rate_hz", where=f"topic {self.topic}",
                       error=DataError, hint="publish at the bundle's rate, or use a bundle trained at this one")
        t = block.t0_s + np.arange(len(block.values), dtype=np.float64) / rate
        check_time(float(t[0]), last_t)
        return SampleBlock(t, cmap.apply(block.values))

    def _watch(self, t_first: float, t_last: float, n: int) -> None:
        """Feed the rate watch; its first measurement is the start check (DataError when off)."""
        watch = self.rate_watch
        if watch is None:
            return
        rate = watch.add(t_first, t_last, n)
        if rate is not None and not self.started:
            check_rate(rate, self.rate_hz, what=f"the stream's rate (its sample times over {watch.last_span_s:.3g} s)",
                       where=f"topic {self.topic}", error=DataError,
                       hint="check the gateway's sample rate and the times it sends (t, t0, rate_hz)")
            self.started = True
            log.info("source.rate_ok where=topic %s expected_hz=%g measured_hz=%.6g", self.topic, self.rate_hz, rate)

    def _block_items(self) -> Iterator[BlockItem]:
        if self._client is None:
            raise TransportError("the mqtt source is not open", where=self.url,
                                 hint="use it as a context manager: with open_source(...) as src")
        last_t: float | None = None
        while not self.stop.is_set():
            try:
                topic, payload = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            with self._bytes_lock:
                self._queued_bytes -= len(payload)
            try:
                item = self.decode(payload, last_t)
            except LineRejected as exc:
                raw = (payload[:payloads.HEADER.size].hex() if payloads.is_binary(payload)
                       else payload[:RAW_CHARS].decode("utf-8", "replace"))
                yield Quarantined(where=f"topic {topic}", reason=str(exc), raw=raw)
                continue
            if isinstance(item, SampleBlock):
                first, last_t = float(item.t_s[0]), float(item.t_s[-1])
                self._watch(first, last_t, len(item))
            else:
                last_t = item.t_s
                self._watch(last_t, last_t, 1)
            yield item

    def _items(self) -> Iterator[Item]:
        for item in self._block_items():
            if isinstance(item, SampleBlock):
                yield from item.samples()
            else:
                yield item
