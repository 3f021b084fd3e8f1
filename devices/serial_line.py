"""Serial-line sensor source (pyserial, the `serial` extra): one sample per text line.

Line format, text in source.encoding (default UTF-8), ended by "\\n" ("\\r\\n" accepted), values separated by commas:

    v1,v2,...,vN          N values as source.channels declares them (a count in the bundle's order, or names
                          in the device's order, mapped to the bundle's); t = previous t + 1/rate_hz (0 first)
    t,v1,v2,...,vN        N + 1 values: the first is the sensor's time in seconds
    START [code] | STOP | CANCEL
                          a screening station's button (any case): the operator's trial command
                          (messages.TrialCommand), in order with the samples around it

rate_hz is source.rate_hz, else the bundle's; a configured one more than source.RATE_TOLERANCE off the
bundle's refuses to open. While reading, `rate_watch` measures the rate: from the lines' times when the
first line carries one (that first measurement is a start check: off -> DataError), else from when lines
arrive (wall clock; drift only); later measurements off by more than the tolerance count as drift.

Every line is validated like a replayed file: wrong value count, a non-numeric or non-finite value,
time going backwards (or repeating) or undecodable bytes give a Quarantined item naming `port:line`.
A lost device (unplugged, reset) is reopened with backoff until it returns or the stop event is set;
point source.port at a stable name (/dev/serial/by-id/...) so the device is found again.
Must not import torch or paho.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import serial  # pyserial; a missing package is reported by edgekit.source.resolve with the extra's name

from edgekit.config import SerialSource
from edgekit.contract.messages import TrialCommand
from edgekit.errors import ConfigError, DataError, DeviceError
from edgekit.source import (
    RAW_CHARS,
    BaseReader,
    ChannelMap,
    Item,
    LineRejected,
    RateWatch,
    check_rate,
    check_time,
    decode_line,
    shown,
    to_floats,
    undecodable,
)
from edgekit.values import Quarantined, Sample

log = logging.getLogger(__name__)

RECONNECT_MAX_S = 5.0  # longest wait between attempts to reopen a lost port
MAX_LINE_BYTES = 4096  # a line longer than this is noise on the wire (wrong baud rate), not a sample


class SerialReader(BaseReader):
    """Reads `port` (a device path or any pyserial URL such as loop://) at `baudrate`."""

    finite = False

    def __init__(self, cfg: SerialSource, *, stop: threading.Event, channel_names: Sequence[str] | None = None,
                 rate_hint: float | None = None, **_: Any) -> None:
        super().__init__(stop)
        self.port = cfg.port
        self.baudrate = cfg.baudrate
        if cfg.rate_hz is None and not rate_hint:
            raise ConfigError("no sample rate", where="source.rate_hz",
                              hint="set source.rate_hz (the bundle records none)")
        check_rate(float(cfg.rate_hz or 0), rate_hint if cfg.rate_hz else None, what="source.rate_hz",
                   where="source.rate_hz", hint="leave source.rate_hz out to use the bundle's, or use a bundle "
                   "trained at the sensor's rate")
        self.rate_hz = float(cfg.rate_hz or rate_hint or 0)
        self.expected_hz = float(rate_hint) if rate_hint else None  # the bundle's: the start check's reference
        self.encoding = cfg.encoding
        self.map = ChannelMap.of(cfg.channels, channel_names)
        self.map.log_ignored(self.port)
        self.channels = self.map.channels
        self._serial: Any = None
        self._last_t: float | None = None
        self._timed = False  # whether the last parsed line carried its own time
        self.started = False  # True once the first rate measurement passed (timed lines with a bundle rate)
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        """False while a lost device is being reopened."""
        return self._serial is not None

    def _open(self) -> Any:
        # timeout: read returns at least every 0.1 s so a set stop event is noticed promptly
        return serial.serial_for_url(self.port, baudrate=self.baudrate, timeout=0.1)

    def __enter__(self) -> SerialReader:
        try:
            self._serial = self._open()
        except (serial.SerialException, ValueError, OSError) as exc:
            raise DeviceError(f"cannot open serial port: {exc}", where=self.port,
                              hint="check source.port, that the device is plugged in, and that this user "
                                   "may open it (group dialout)") from exc
        log.info("source_serial_open port=%s baudrate=%d", self.port, self.baudrate)
        return self

    def _close_port(self) -> None:
        if self._serial is not None:
            try:
                self._serial.close()
            except (serial.SerialException, OSError):
                pass
            self._serial = None

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._close_port()

    def _reopen(self) -> bool:
        """After a lost device (unplugged, reset): reopen with backoff until it is back or stop is set."""
        self._close_port()
        self.reconnects += 1
        if self.rate_watch is not None:
            self.rate_watch.restart()  # the time unplugged is not drift
        delay = 0.1
        while not self.stop.wait(delay):
            try:
                self._serial = self._open()
            except (serial.SerialException, ValueError, OSError) as exc:
                log.debug("source_serial_retry port=%s error=%s", self.port, exc)
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            log.info("source_serial_reopened port=%s reconnects=%d", self.port, self.reconnects)
            return True
        return False

    def parse(self, text: str) -> Sample:
        """One decoded line to a Sample (LineRejected with the reason otherwise)."""
        cells = text.split(",")
        n = len(self.map.sent)
        if len(cells) == n + 1:
            t = float(to_floats(cells[:1], ["t"])[0])
            values = to_floats(cells[1:], self.map.sent)
        elif len(cells) == n:
            values = to_floats(cells, self.map.sent)
            t = 0.0 if self._last_t is None else self._last_t + 1.0 / self.rate_hz
        else:
            raise LineRejected(f"wrong width: expected {n} values (or {n + 1} with a leading time), "
                               f"got {len(cells)}")
        check_time(t, self._last_t)
        self._last_t = t
        self._timed = len(cells) == n + 1
        return Sample(t, self.map.apply(values))

    def _watch(self, t_s: float) -> None:
        """Feed the rate watch, made at the first sample: on the lines' times when that one carries a time,
        else on the wall clock of their arrival. The first measurement of times is the start check."""
        watch = self.rate_watch
        if watch is None:
            clock = "sample times" if self._timed else "arrival"
            watch = self.rate_watch = RateWatch(self.rate_hz, where=self.port, clock=clock)
            self.started = clock == "arrival" or self.expected_hz is None
        now = t_s if watch.clock == "sample times" else time.monotonic()
        rate = watch.add(now, now, 1)
        if rate is not None and not self.started:
            check_rate(rate, self.expected_hz, what=f"the lines' rate (their times over {watch.last_span_s:.3g} s)",
                       where=self.port, error=DataError, hint="check the device's sample rate and the times it "
                       "sends, or use a bundle trained at its rate")
            self.started = True

    def _items(self) -> Iterator[Item]:
        if self._serial is None:
            raise DeviceError("the serial source is not open", where=self.port,
                              hint="use it as a context manager: with open_source(...) as src")
        self._last_t = None
        buf = bytearray()
        lineno = 0
        skipping = False
        while not self.stop.is_set():
            try:
                chunk = self._serial.read(max(1, self._serial.in_waiting))
            except (serial.SerialException, OSError) as exc:
                log.warning("source_serial_lost port=%s error=%s", self.port, exc)
                del buf[:]  # a line cut by the loss is not a sample
                skipping = False
                if not self._reopen():
                    return
                continue
            if not chunk:
                continue
            buf += chunk
            while True:
                end = buf.find(b"\n")
                if end < 0:
                    if len(buf) > MAX_LINE_BYTES:
                        if not skipping:
                            lineno += 1
                            raw = bytes(buf[:RAW_CHARS]).decode("ascii", "replace")
                            reason = f"line too long: over {MAX_LINE_BYTES} bytes without a newline"
                            yield Quarantined(where=f"{self.port}:{lineno}", reason=reason, raw=raw)
                        skipping = True  # the rest of that line, up to its newline, is not a sample either
                        del buf[:]
                    break
                line = bytes(buf[:end]).rstrip(b"\r")
                del buf[: end + 1]
                if skipping:  # the tail of a line already quarantined as too long
                    skipping = False
                    continue
                lineno += 1
                if not line.strip():
                    continue
                where = f"{self.port}:{lineno}"
                text = decode_line(line, self.encoding)
                bad = undecodable(text, self.encoding)
                if bad:
                    yield Quarantined(where=where, reason=f"{bad} (wrong baud rate?)", raw=shown(text[:RAW_CHARS]))
                    continue
                command = TrialCommand.from_line(text, origin=where)
                if command is not None:  # the station's button: START [code], STOP, CANCEL
                    yield command
                    continue
                try:
                    sample = self.parse(text)
                except LineRejected as exc:
                    yield Quarantined(where=where, reason=str(exc), raw=shown(text[:RAW_CHARS]))
                    continue
                self._watch(sample.t_s)
                yield sample
