"""Fuzz targets for hostile input (issue 10): per target one Hypothesis strategy and one contract check.

Shared by tests/test_fuzz.py (a few hundred inputs per target, in every test run) and bench/fuzz.py
(10,000+ per target, started by hand). A check returns quietly when the code handled its input and raises
when it did not: AssertionError for a broken contract, or whatever the code under test let out (a crash).

    replay   recorded-file lines (SKAB, IPOL, NAB headers + hostile lines) through ReplayReader
    serial   serial lines, cut into arbitrary reads, through SerialReader over a scripted port
    mqtt     MQTT source payloads through MqttReader.parse
    hub      hub payloads of every kind through hub.ingest.to_batch, then stored with HubDB (SQLite)
    recipe   recipe files (any bytes, any TOML) through recipe.load_recipe
    config   agent configs (any bytes, any TOML) through config.load_config
"""

from __future__ import annotations

import atexit
import copy
import json
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from messagefactory import result, review, trial

from edgekit import topics
from edgekit.config import AgentConfig, MqttSource, ReplaySource, SerialSource, load_config
from edgekit.contract import messages as m
from edgekit.datasets import IPOL_CHANNELS, IPOL_RECORDING, NAB_RECORDING, SKAB_CHANNELS, SKAB_RECORDING
from edgekit.errors import ConfigError, DataError
from edgekit.source import MAX_LINE_CHARS, LineRejected, decode_line, open_source
from edgekit.values import Quarantined, Sample, SampleBlock

ROOT = Path(__file__).resolve().parent.parent

# --- settings profiles ---------------------------------------------------------------------------------
# ci: the same few hundred inputs on every run (derandomized, no example database), each under a deadline
# that a loaded 2-core CI machine still meets; long: HYPOTHESIS_PROFILE=long for many fresh inputs.
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
          HealthCheck.large_base_example]
settings.register_profile("ci", max_examples=150, deadline=5000, derandomize=True, database=None,
                          suppress_health_check=_QUIET, print_blob=True)
settings.register_profile("long", max_examples=2000, deadline=20000, derandomize=False, database=None,
                          suppress_health_check=_QUIET, print_blob=True)


@cache
def scratch() -> Path:
    """One temporary folder per process for the files the checks write (removed at exit)."""
    path = Path(tempfile.mkdtemp(prefix="edgekit-fuzz-"))
    atexit.register(shutil.rmtree, path, True)
    return path


# --- shared pieces -------------------------------------------------------------------------------------

# Cells a sensor or a broken file can send instead of a number.
HOSTILE_TOKENS = ("", " ", "nan", "NaN", "-nan", "inf", "-inf", "Infinity", "4e300", "-4e300", "1e400",
                  "1e-400", "1e308", "1.7976931348623157e308", "0x10", "1_000", "\u0661\u0662", "\u00a012",
                  "5\x1c", "5\x00", "\x00", "True", "None", "null", "1,5", "1;5", "1\t5", "--1", "+-1",
                  "9" * 400, "0." + "0" * 400 + "1", "1e", "e1", ".", "-", "\ufeff1", "１２")
EDGE_INTS = (0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), -(2**63) - 1, 10**30)
EDGE_STRINGS = ("", " ", "no-colon", "edge-1:-1", "edge-1:000000000001", "evil:000000000001", "x" * 129,
                "x" * 2001, "accept", "defer", "online", "offline", "ood,low", "\x00", "nan", "é",
                "edgekit.result/1", "edgekit.result-batch/1", "edgekit.review/1", "edgekit.status/1",
                "edgekit.metrics/1", "edgekit.trial/1", "edgekit.result/2")

numbers = st.one_of(st.floats(), st.integers(-(2**70), 2**70), st.sampled_from(EDGE_INTS))
json_leaves = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=20), st.sampled_from(EDGE_STRINGS))
json_values = st.recursive(json_leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)), max_leaves=16)
# What a mutation puts in a field: the edge cases as often as anything else
hostile_json = st.one_of(st.sampled_from(EDGE_INTS), st.sampled_from(EDGE_STRINGS), json_values)


def json_bytes(obj: Any) -> bytes:
    """JSON as a peer might send it: orjson when it can (64-bit ints), else the stdlib (big ints, NaN)."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, allow_nan=True).encode("utf-8", "surrogatepass")


@st.composite
def mutated(draw: st.DrawFn, seed: Any, values: st.SearchStrategy[Any] = hostile_json, most: int = 4) -> Any:
    """A copy of a valid JSON-like value with up to `most` fields, anywhere inside, deleted, replaced by a
    hostile value or added (a field of a nested object or list item is as likely as a top-level one)."""
    obj = copy.deepcopy(seed)
    for _ in range(draw(st.integers(0, most))):
        node = obj
        while isinstance(node, (dict, list)):
            inner = [k for k, v in _items(node) if isinstance(v, (dict, list)) and v]
            if not inner or not draw(st.booleans()):
                break
            node = node[draw(st.sampled_from(inner))]
        if not isinstance(node, (dict, list)):
            break
        keys = [k for k, _ in _items(node)]
        action = draw(st.sampled_from(("delete", "replace", "add", "edge") if keys else ("add",)))
        numeric = [k for k, v in _items(node) if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if action == "edge" and numeric:  # a number field at the edge of its type: 2**63, 2**64 - 1, 1e308
            node[draw(st.sampled_from(numeric))] = draw(st.sampled_from((*EDGE_INTS, 1e308, -1e308, 5e-324)))
            continue
        if action == "edge":
            action = "replace"
        if action == "add":
            if isinstance(node, list):
                node.append(draw(values))
            else:
                node[draw(st.text(max_size=10) | st.sampled_from([k + "s" for k in keys] or ["x"]))] = draw(values)
            continue
        key = draw(st.sampled_from(keys))
        if action == "delete":
            del node[key]
        else:
            node[key] = draw(values)
    return obj


def _items(node: dict[Any, Any] | list[Any]) -> list[tuple[Any, Any]]:
    return list(node.items()) if isinstance(node, dict) else list(enumerate(node))


# --- replay: recorded-file lines -----------------------------------------------------------------------

SKAB_HEADER = ";".join(("datetime", *SKAB_CHANNELS, "anomaly", "changepoint"))
IPOL_HEADER = ("Acquisition frequency: 100 Hz",
               "\t".join(("PacketCounter", *IPOL_CHANNELS, "Mag_X", "Mag_Y", "Mag_Z")))
LAYOUTS = {  # format -> (header lines, delimiter, cells per line)
    "skab": ((SKAB_HEADER,), ";", 1 + len(SKAB_CHANNELS) + 2),
    "ipol": (IPOL_HEADER, "\t", 1 + len(IPOL_CHANNELS) + 3),
    "nab": (("timestamp,value",), ",", 2),
}
# The layouts replay reads them with (the training side's, one place per dataset), and the columns it reads.
RECORDINGS = {"skab": (SKAB_RECORDING, SKAB_CHANNELS), "ipol": (IPOL_RECORDING, IPOL_CHANNELS),
              "nab": (NAB_RECORDING, ("value",))}
STAMP0 = np.datetime64("2020-03-09T10:34:33", "s")
HOSTILE_STAMPS = ("", "2020-02-30 00:00:00", "9999-12-31 23:59:59", "0001-01-01 00:00:00",
                  "2020-03-09T10:34:33+05:00", "2020-03-09 10:34:33.5", "20200309", "nan", "2020-03-09 25:00:00",
                  "2020-03-09 10:34:33 ", " 2020-03-09 10:34:33", "2020-W10", "2020-03-09T10:34:33.000000001",
                  "1e300")
# Interleaved between every line by the check: quarantined for its width before any state changes.
SPACER = "fuzz-spacer"


@dataclass(frozen=True)
class ReplayCase:
    fmt: str
    encoding: str
    header_ok: bool
    data: bytes

    @property
    def exact(self) -> bool:
        """Whether the line count is known: a valid header, and an encoding where every byte that does not
        decode is escaped on its own (utf-16/32 also fail on a missing BOM or an odd length)."""
        return self.header_ok and self.encoding in NARROW

    def __repr__(self) -> str:  # what a failing run prints: enough to rebuild the file
        return (f"ReplayCase(fmt={self.fmt!r}, encoding={self.encoding!r}, header_ok={self.header_ok}, "
                f"data={self.data!r})")


NARROW = ("utf-8", "latin-1", "cp1252")
WIDE = ("utf-16", "utf-16-le", "utf-32")


def _cells(fmt: str, clock: int, rng: np.random.Generator) -> list[str]:
    """A valid data line's cells at time step `clock`."""
    _, _, ncols = LAYOUTS[fmt]
    values = [repr(float(v)) for v in np.round(rng.normal(10.0, 5.0, ncols - 1), 6)]
    if fmt == "ipol":
        return [f"{float(clock)}", *values]
    stamp = str(STAMP0 + np.timedelta64(clock, "s")).replace("T", " ")
    return [stamp, *values]


@st.composite
def replay_lines(draw: st.DrawFn, fmt: str) -> list[str | bytes]:
    """Data lines: runs of valid lines (long enough for the reader's 64- and 2048-line chunks), lines with
    one hostile cell, a missing or extra cell, time repeated or going backwards, raw bytes, text, blanks."""
    _, delim, _ = LAYOUTS[fmt]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    clock = draw(st.integers(0, 10**6))
    lines: list[str | bytes] = []
    run_len = st.one_of(st.integers(1, 10), st.integers(1, 10), st.integers(1, 80), st.integers(60, 200),
                        st.integers(2040, 2100))
    for piece in draw(st.lists(st.sampled_from(
            ("run", "cell", "width", "time", "stamp", "bytes", "text", "blank", "long")), max_size=12)):
        if piece == "long" and draw(st.integers(0, 3)):
            piece = "run"  # a line over MAX_LINE_CHARS is slow to make and read: 1 in 4 of those drawn
        if piece == "run":
            for _ in range(draw(run_len)):
                clock += 1
                lines.append(delim.join(_cells(fmt, clock, rng)))
            continue
        clock += 1
        cells = _cells(fmt, clock, rng)
        if piece == "cell":
            cells[draw(st.integers(0, len(cells) - 1))] = draw(st.sampled_from(HOSTILE_TOKENS) | st.text(max_size=8))
        elif piece == "width":
            if draw(st.booleans()):
                del cells[draw(st.integers(0, len(cells) - 1))]
            else:
                cells.insert(draw(st.integers(0, len(cells))), draw(st.sampled_from(HOSTILE_TOKENS)))
        elif piece == "time":
            clock += draw(st.sampled_from((-1, -2, -(10**5))))  # the previous line's time again, or earlier
            cells[0] = _cells(fmt, clock, rng)[0]
        elif piece == "stamp":
            cells[0] = draw(st.sampled_from(HOSTILE_STAMPS) | st.sampled_from(HOSTILE_TOKENS))
        if piece in ("cell", "width", "time", "stamp"):
            lines.append(delim.join(cells))
        elif piece == "bytes":
            lines.append(draw(st.binary(max_size=120)))
        elif piece == "text":
            lines.append(draw(st.text(max_size=80)))
        elif piece == "blank":
            lines.append(draw(st.sampled_from(("", " ", "\t", "  \t ", "\x0c", "\u00a0", "\u3000"))))
        elif piece == "long":
            unit = draw(st.sampled_from(("1", delim, "x", "\u00e9")))
            lines.append(unit * (MAX_LINE_CHARS + draw(st.integers(-1, 9))))
    return lines


@st.composite
def replay_cases(draw: st.DrawFn) -> ReplayCase:
    """A recorded file: a valid header (or, 1 in 8, a damaged one) and hostile data lines, in an encoding
    the reader is told about, with \\n, \\r\\n or \\r line ends and maybe no final newline."""
    fmt = draw(st.sampled_from(sorted(LAYOUTS)))
    encoding = draw(st.sampled_from((*NARROW, "utf-8", "utf-8", *WIDE)))
    header = list(LAYOUTS[fmt][0])
    header_ok = draw(st.integers(0, 7)) > 0
    if not header_ok:
        k = draw(st.integers(0, len(header) - 1))
        header[k] = draw(st.sampled_from(("", "\ufeff" + header[k], header[k][:-1], header[k].upper())) |
                         st.text(max_size=40))
    end = draw(st.sampled_from(("\n", "\n", "\r\n", "\r")))
    lines = [*header, *draw(replay_lines(fmt))]
    if encoding in NARROW:
        data = end.encode().join(x if isinstance(x, bytes) else x.encode(encoding, "replace") for x in lines)
        data += end.encode() if draw(st.booleans()) else b""
    else:  # encoded whole (one BOM), then maybe the BOM cut off or a stray byte put in
        text = end.join(x.decode("latin-1") if isinstance(x, bytes) else x for x in lines)
        data = (text + (end if draw(st.booleans()) else "")).encode(encoding, "replace")
        cut = draw(st.sampled_from(("none", "bom", "byte")))
        if cut == "bom":
            data = data[4 if encoding == "utf-32" else 2:]
        elif cut == "byte":
            at = draw(st.integers(0, len(data)))
            data = data[:at] + draw(st.binary(min_size=1, max_size=3)) + data[at:]
    return ReplayCase(fmt=fmt, encoding=encoding, header_ok=header_ok, data=data)


def _split_lines(case: ReplayCase) -> list[str]:
    """The file's lines as the contract defines them: decoded (undecodable bytes kept as escapes), split at
    \\n, \\r\\n and \\r."""
    text = case.data.decode(case.encoding, "surrogateescape")
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _read(cfg: ReplaySource, blocks: bool, channels: tuple[str, ...]) -> list[Sample | Quarantined]:
    """Every item of one pass, blocks flattened to samples; checks each item's type and values on the way."""
    out: list[Sample | Quarantined] = []
    with open_source(cfg, channel_names=channels) as src:
        for item in (src.iter_blocks() if blocks else src):
            if isinstance(item, SampleBlock):
                assert blocks, "iter() yielded a SampleBlock"
                out.extend(item.samples())
            else:
                assert isinstance(item, (Sample, Quarantined)), f"unexpected item {item!r:.200}"
                out.append(item)
        channels = len(src.channels)
    for s in out:
        if isinstance(s, Sample):
            assert math.isfinite(s.t_s) and np.isfinite(s.values).all() and s.values.shape == (channels,)
    return out


def _samples(items: list[Sample | Quarantined]) -> list[Sample]:
    return [i for i in items if isinstance(i, Sample)]


def check_replay(case: ReplayCase) -> None:
    """Never raises (a damaged header: DataError naming the file); iter() and iter_blocks() give the same
    items; samples finite with strictly increasing time; samples + quarantined = non-blank data lines; the
    per-line result does not depend on a line's neighbours (the same lines spaced out by a bad line, so
    that every one is read alone, give the same samples)."""
    path = scratch() / f"recording.{'txt' if case.fmt == 'ipol' else 'csv'}"
    path.write_bytes(case.data)
    layout, channels = RECORDINGS[case.fmt]
    cfg = ReplaySource(path=path, layout=layout, encoding=case.encoding)
    try:
        items = _read(cfg, blocks=False, channels=channels)
    except DataError as exc:
        assert not case.exact, f"a valid header was refused: {exc}"
        assert str(path) in str(exc), f"DataError does not name the file: {exc}"
        return
    assert [_key(i) for i in _read(cfg, blocks=True, channels=channels)] == [_key(i) for i in items], \
        "iter_blocks() != iter()"
    samples = _samples(items)
    times = [s.t_s for s in samples]
    assert all(b > a for a, b in zip(times, times[1:])), f"time does not increase: {times[:20]}"
    for q in items:
        if isinstance(q, Quarantined):
            assert q.where.startswith(f"{path}:") and q.reason, f"quarantine without file:line or reason: {q}"
    if not case.exact:
        return
    nheader = len(LAYOUTS[_fmt(case, path)][0])
    body = _split_lines(case)[nheader:]
    expected = sum(1 for line in body if len(line) >= MAX_LINE_CHARS or line.strip())
    assert len(items) == expected, f"{len(items)} items for {expected} non-blank data lines"
    # The same lines one by one: a spacer after every line leaves no two data lines side by side.
    spaced = path.with_name("spaced-" + path.name)
    text = "\n".join([*(_split_lines(case)[:nheader]), *(f"{line}\n{SPACER}" for line in body)])
    spaced.write_bytes(text.encode(case.encoding, "surrogateescape"))
    alone = _samples(_read(cfg.model_copy(update={"path": spaced}), blocks=False, channels=channels))
    scale = 2.0 if _fmt(case, path) == "ipol" else 1.0  # ipol time is the line number: spacing doubles it
    assert [(s.t_s * scale, s.values.tolist()) for s in samples] == [(s.t_s, s.values.tolist()) for s in alone], \
        "a line's fate depends on its neighbours (chunked and line-by-line parsing disagree)"


def _key(item: Sample | Quarantined) -> tuple[Any, ...]:
    if isinstance(item, Sample):
        return ("sample", item.t_s, item.values.tolist())
    return ("quarantined", item.where, item.reason, item.raw)


def _fmt(case: ReplayCase, path: Path) -> str:
    return case.fmt


# --- serial lines --------------------------------------------------------------------------------------

SERIAL_CHANNELS = 3


class ScriptedPort:
    """A serial port (the part of pyserial's API the reader uses) that hands over `data` in reads of the
    given sizes (repeated), then sets `stop`, as a sensor that sent everything and went quiet."""

    def __init__(self, data: bytes, sizes: list[int], stop: threading.Event) -> None:
        self._chunks = _cut(data, sizes)
        self._stop = stop

    @property
    def in_waiting(self) -> int:
        return len(self._chunks[0]) if self._chunks else 0

    def read(self, n: int) -> bytes:
        if not self._chunks:
            self._stop.set()
            return b""
        chunk = self._chunks[0]
        if n >= len(chunk):
            return self._chunks.pop(0)
        self._chunks[0] = chunk[n:]
        return chunk[:n]

    def close(self) -> None:
        pass


def _cut(data: bytes, sizes: list[int]) -> list[bytes]:
    """`data` in pieces of the given sizes, the sizes repeated until it is all cut."""
    out, i, k = [], 0, 0
    while i < len(data):
        size = max(1, sizes[k % len(sizes)]) if sizes else len(data)
        out.append(data[i:i + size])
        i, k = i + size, k + 1
    return out


@dataclass(frozen=True)
class SerialCase:
    encoding: str
    data: bytes
    reads: list[int]


@st.composite
def serial_cases(draw: st.DrawFn) -> SerialCase:
    """Lines as a sensor (or a wrong baud rate) sends them: values with or without a leading time, hostile
    cells, wrong widths, time repeated or going back, raw bytes, blanks, \\r\\n, an unended last line;
    delivered in reads of arbitrary sizes, repeated (a line may be cut anywhere)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    t = float(draw(st.integers(0, 10**6)))
    lines: list[bytes] = []
    encoding = draw(st.sampled_from(("utf-8", "utf-8", "latin-1")))
    for piece in draw(st.lists(st.sampled_from(
            ("values", "timed", "cell", "width", "time", "bytes", "text", "blank", "long")), max_size=30)):
        t += 0.01
        cells = [repr(float(v)) for v in np.round(rng.normal(0, 3, SERIAL_CHANNELS), 5)]
        if piece in ("timed", "cell", "time"):
            cells.insert(0, repr(t if piece != "time" else t - draw(st.sampled_from((0.01, 0.02, 1000.0)))))
        if piece == "cell":
            cells[draw(st.integers(0, len(cells) - 1))] = draw(st.sampled_from(HOSTILE_TOKENS) | st.text(max_size=8))
        elif piece == "width":
            cells = cells[:draw(st.integers(0, 1))] if draw(st.booleans()) else cells * 2
        if piece == "bytes":
            lines.append(draw(st.binary(max_size=80)))
        elif piece == "text":
            lines.append(draw(st.text(max_size=40)).encode(encoding, "replace"))
        elif piece == "blank":
            lines.append(draw(st.sampled_from((b"", b" ", b"\t", b"\r", b" \r"))))
        elif piece == "long":  # noise over the limit, maybe ending like a line (a fragment must not pass)
            lines.append(draw(st.sampled_from((b"1,", b"9", b"\xff"))) * draw(st.integers(2100, 4400))
                         + draw(st.sampled_from((b"", b",1,2,3", b"1,2,3"))))
        else:
            lines.append(",".join(cells).encode(encoding, "replace"))
    end = draw(st.sampled_from((b"\n", b"\r\n")))
    data = end.join(lines) + (end if draw(st.booleans()) else b"")
    reads = draw(st.one_of(st.just([len(data) + 1]), st.lists(st.integers(1, 64), min_size=1, max_size=40),
                           st.lists(st.integers(1, 5000), min_size=1, max_size=5)))
    return SerialCase(encoding=encoding, data=data, reads=reads)


def _read_serial(data: bytes, reads: list[int], encoding: str) -> list[Sample | Quarantined]:
    from edgekit.devices.serial_line import SerialReader

    stop = threading.Event()
    port = ScriptedPort(data, reads, stop)

    class ScriptedReader(SerialReader):
        def _open(self) -> Any:
            return port

    cfg = SerialSource(port="scripted://fuzz", channels=SERIAL_CHANNELS, rate_hz=100.0, encoding=encoding)
    items = []
    with ScriptedReader(cfg, stop=stop) as src:
        for item in src:
            assert isinstance(item, (Sample, Quarantined)), f"unexpected item {item!r:.200}"
            items.append(item)
    return items


def check_serial(case: SerialCase) -> None:
    """Never raises; only Sample/Quarantined; samples finite, time strictly increasing; when no line is over
    the reader's limit, samples + quarantined = the non-blank lines that were ended by a newline; a line over
    the limit gives no sample, not even its last piece (the same samples as with a short bad line there)."""
    from edgekit.devices.serial_line import MAX_LINE_BYTES

    items = _read_serial(case.data, case.reads, case.encoding)
    samples = _samples(items)
    for s in samples:
        assert math.isfinite(s.t_s) and np.isfinite(s.values).all() and s.values.shape == (SERIAL_CHANNELS,)
    times = [s.t_s for s in samples]
    assert all(b > a for a, b in zip(times, times[1:])), f"time does not increase: {times[:20]}"
    *ended, tail = case.data.split(b"\n")
    if all(len(line) <= MAX_LINE_BYTES for line in [*ended, tail]):
        expected = sum(1 for line in ended if line.rstrip(b"\r").strip())
        assert len(items) == expected, f"{len(items)} items for {expected} non-blank lines"
        return
    short = b"\n".join(b"x" if len(line) > MAX_LINE_BYTES else line for line in [*ended, tail])
    alone = _samples(_read_serial(short, [len(short) + 1], case.encoding))
    assert [(s.t_s, s.values.tolist()) for s in samples] == [(s.t_s, s.values.tolist()) for s in alone], \
        "a line over the limit (or a piece of it) changed the samples"


# --- mqtt source payloads ------------------------------------------------------------------------------

MQTT_CHANNELS = 3


@st.composite
def mqtt_cases(draw: st.DrawFn) -> tuple[bytes, float | None]:
    """(payload, time of the previous sample): any bytes, any JSON, or {'t', 'values'} with hostile fields."""
    number_like = numbers | st.sampled_from(HOSTILE_TOKENS) | json_values
    good = {"t": draw(st.floats(-1e9, 1e9)),
            "values": draw(st.lists(st.floats(-1e6, 1e6), min_size=MQTT_CHANNELS, max_size=MQTT_CHANNELS))}
    shaped = mutated(good, values=number_like) | st.fixed_dictionaries(
        {"t": number_like, "values": st.lists(number_like, min_size=2, max_size=4)})
    payload = draw(st.one_of(st.binary(max_size=200), json_values.map(json_bytes), shaped.map(json_bytes)))
    last_t = draw(st.none() | st.floats(allow_nan=False, allow_infinity=False) | st.just(good["t"]))
    return payload, last_t


@cache
def _mqtt_reader() -> Any:
    # Not entered: parse() needs no connection.
    return open_source(MqttSource(topic="sensors/fuzz", channels=MQTT_CHANNELS), mqtt_url="mqtt://127.0.0.1:1")


def check_mqtt(case: tuple[bytes, float | None]) -> None:
    """parse() returns a finite Sample of the right width, later than the previous one, or raises
    LineRejected; nothing else."""
    payload, last_t = case
    try:
        sample = _mqtt_reader().parse(payload, last_t)
    except LineRejected as exc:
        assert str(exc), "LineRejected without a reason"
        return
    assert isinstance(sample, Sample)
    assert math.isfinite(sample.t_s) and np.isfinite(sample.values).all()
    assert sample.values.shape == (MQTT_CHANNELS,)
    assert last_t is None or sample.t_s > last_t


# --- hub payloads --------------------------------------------------------------------------------------

SITES = ("lab", "ward")
DEVICES = ("edge-1", "edge-2", "evil")


def _metrics(site: str, device: str) -> dict[str, Any]:
    """A metrics payload from the agent's own builder (Agent.metrics) over small stand-ins for its parts."""
    from edgekit.agent import Agent, Counters

    agent = SimpleNamespace(
        cfg=SimpleNamespace(site=site, device_id=device),
        counters=Counters(windows=12, accepted=9, deferred=3, quarantined=2, samples=400),
        transport=SimpleNamespace(stats=lambda: {"acked": 10, "replayed": 1}),
        outbox=SimpleNamespace(backlog=lambda: 2, dropped=0), baseline_state=lambda: None)
    agent.counters.quarantine_reasons["wrong width"] += 2
    return Agent.metrics(agent).to_obj()  # type: ignore[arg-type]


def seed_payloads(site: str, device: str, seq: int) -> dict[str, list[Any]]:
    """Valid payloads of every kind, by topic kind, built with the contract (tests/messagefactory.py, the
    agent's own metrics) and given as dicts (`to_obj()`) for mutations to work on. A result-batch is a dict
    too (its encoding decoded) so that mutations reach inside it."""
    res = result(device, seq, site=site, defer=True)
    return {
        "result": [res.to_obj(), result(device, seq, site=site, defer=False).to_obj(),
                   orjson.loads(m.ResultBatch(site, device, [result(device, seq + k, site=site)
                                                             for k in range(3)]).encode())],
        "review": [review(res, n=16).to_obj()],
        "status": [m.Status(site, device, "online", 1_700_000_000.0, model_version="m@1", queued=4,
                            dropped=0).to_obj(),
                   m.Status(site, device, "offline", 1_700_000_000.0).to_obj()],
        "metrics": [_metrics(site, device)],
        "trial": [trial(device, seq, site=site).to_obj(), trial(device, seq, site=site, walk=False).to_obj()],
    }


@st.composite
def hub_messages(draw: st.DrawFn) -> list[tuple[str, bytes, bool]]:
    """1-6 (topic, payload, retained) as the hub's subscription delivers them: our topics (sometimes a
    stranger's), carrying any bytes, any JSON, or a valid payload of any kind with fields mutated, removed
    or wrong-typed, sometimes from another device or site than the topic's."""
    out = []
    for _ in range(draw(st.integers(1, 6))):
        site, device = draw(st.sampled_from(SITES)), draw(st.sampled_from(DEVICES))
        kind = draw(st.sampled_from(topics.KINDS))
        ours = f"{topics.PREFIX}/{site}/{device}/{kind}"
        name = draw(st.sampled_from((ours, ours, f"{topics.PREFIX}/{site}//{kind}")) | st.text(max_size=40))
        p_site, p_device = site, device
        if not draw(st.integers(0, 3)):  # 1 in 4 speaks for a device or site that is not its topic's
            p_site, p_device = draw(st.sampled_from(SITES)), draw(st.sampled_from(DEVICES))
        seeds = seed_payloads(p_site, p_device, draw(st.integers(0, 99)))
        seed_kind = kind if draw(st.integers(0, 4)) else draw(st.sampled_from(topics.KINDS))
        payload = draw(st.one_of(
            st.binary(max_size=200), json_values.map(json_bytes),
            st.sampled_from(seeds[seed_kind]).flatmap(lambda s: mutated(s, most=3)).map(json_bytes),
            st.sampled_from(seeds[seed_kind]).flatmap(lambda s: mutated(s, most=3)).map(json_bytes)))
        out.append((name, payload, draw(st.booleans())))
    return out


@cache
def _hub_db() -> Any:
    from edgekit.hub.db import HubDB

    db = HubDB(f"sqlite:///{scratch() / 'hub.db'}")
    db.create()
    atexit.register(db.close)
    return db


def _refused(stats: Any) -> int:
    """Messages the hub counted as not stored: bad payloads, and any counter of rejected ones."""
    return sum(v for k, v in vars(stats).items() if k == "bad" or k.startswith("rejected"))


def check_hub(messages: list[tuple[str, bytes, bool]]) -> None:
    """to_batch never raises; each message alone either gives rows or is counted refused (or is an empty
    result batch); the whole list gives the rows and counts of its messages one by one; rows carry the
    topic's site and device and are stored by HubDB in SQLite without an exception."""
    from edgekit.hub.ingest import IngestStats, to_batch

    now = 1_700_000_100.0
    stats = IngestStats()
    batch = to_batch(messages, now, stats)
    ones, refused = [], 0
    for name, payload, retained in messages:
        one_stats = IngestStats()
        one = to_batch([(name, payload, retained)], now, one_stats)
        ones.append(one)
        if _refused(one_stats):
            refused += 1
            assert not len(one), f"a refused message still gave rows: {one!r:.300}"
        elif not len(one):
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError:
                obj = None
            assert isinstance(obj, dict) and obj.get("schema") == topics.SCHEMA_RESULT_BATCH \
                and obj.get("results") == [], "a message gave no rows and was not counted as refused"
        for row in (*one.results, *one.reviews, *one.trials):
            site, device = name.split("/")[2:4]
            assert (row["site"], row["device"]) == (site, device), f"row not bound to its topic: {row!r:.300}"
            assert isinstance(row["id"], str) and 0 < len(row["id"]) <= 128
    assert _refused(stats) == refused, f"{_refused(stats)} counted refused, {refused} one by one"
    for kind in ("results", "reviews", "trials"):
        assert [r["id"] for r in getattr(batch, kind)] == [r["id"] for one in ones for r in getattr(one, kind)]
    _hub_db().store(batch, now=now)


# --- recipes and agent configs -------------------------------------------------------------------------

TOML_STRINGS = ("", " ", "auto", "replay", "serial", "mqtt", "simulated", "skab", "ipol", "table", "nab",
                "utf-8", "latin-1", "utf-16", "rot13", "hex", "base64", "undefined", "idna", "utf-8-sig",
                "mqtt://127.0.0.1:1883", "mqtts://", "mqtt://:0", "http://x", "edge 1", "a/b", "#", "$SYS",
                "/dev/ttyUSB0", "../../etc/passwd", "\x00", "x" * 300, "random_forest", "svm", "file", "subject",
                "normal", "all", "data_dir", "recipe", "median", "none", "mlp", "cnn1d", "gait", "pump", "machine")
toml_leaves = st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), st.sampled_from(EDGE_INTS), st.floats(),
                        st.text(st.characters(exclude_categories=("Cs",)), max_size=20),
                        st.sampled_from(TOML_STRINGS))
toml_values = st.recursive(toml_leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=10)


def _toml_key(key: str) -> str:
    if key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key):
        return key
    return _toml_str(key)


def _toml_str(text: str) -> str:
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    return _toml_str(str(v))


def to_toml(doc: dict[str, Any]) -> str:
    """A TOML document: top-level values first, then one [table] per nested dict (deeper ones inline)."""
    head = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in doc.items()
            if not isinstance(v, dict) and v is not None]
    tables = [f"\n[{_toml_key(k)}]\n" + "\n".join(f"{_toml_key(kk)} = {_toml_value(vv)}" for kk, vv in v.items()
                                                 if vv is not None)
              for k, v in doc.items() if isinstance(v, dict)]
    return "\n".join(head) + "\n" + "\n".join(tables) + "\n"


@cache
def recipe_seeds() -> tuple[dict[str, Any], ...]:
    """The shipped recipes (edgekit/recipes/*.toml), parsed."""
    import tomllib

    found = sorted((ROOT / "edgekit" / "recipes").glob("*.toml")) or sorted((ROOT / "examples").glob("*.toml"))
    assert found, "no shipped recipes to start from"
    return tuple(tomllib.loads(p.read_text()) for p in found)


@cache
def config_seeds() -> tuple[dict[str, Any], ...]:
    """The shipped agent config (deploy/systemd/agent.example.toml) with each kind of source."""
    import tomllib

    base = tomllib.loads((ROOT / "deploy" / "systemd" / "agent.example.toml").read_text())
    sources = (
        base["source"],
        {"kind": "replay", "path": "recording.csv", "speed": 0.0, "encoding": "latin-1",
         "layout": {"delimiter": ";", "time_column": "datetime", "rate_hz": 1.0}},
        {"kind": "mqtt", "topic": "sensors/pump-1", "url": "mqtt://127.0.0.1:1883", "channels": 8},
        {"kind": "simulated", "generator": "gait", "duration_s": 60.0, "seed": 1, "speed": 1.0},
    )
    extra = {"gate": {"enabled": True, "downsample_points": 128}, "metrics_interval_s": 10.0}
    return tuple({**base, **extra, "source": s} for s in sources)


@st.composite
def _edited(draw: st.DrawFn, text: bytes) -> bytes:
    """Byte-level damage: a few insertions, deletions or replacements at arbitrary places."""
    data = bytearray(text)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(("insert", "delete", "replace")))
        piece = draw(st.binary(min_size=1, max_size=8) | st.sampled_from(
            (b"[", b"]", b"{", b"}", b"=", b'"', b"'", b"\n", b"\\", b"#", b".", b"\xff", b"\x00", b"[[a]]\n")))
        if op == "insert":
            data[i:i] = piece
        elif op == "delete":
            del data[i:i + len(piece)]
        else:
            data[i:i + len(piece)] = piece
    return bytes(data)


def toml_files(seeds: Callable[[], tuple[dict[str, Any], ...]]) -> st.SearchStrategy[bytes]:
    """Any bytes, any text, a shipped file with keys removed/renamed/wrong-typed, the same with its bytes
    damaged, other encodings of it, and deep nesting (arrays, inline tables, dotted keys)."""
    documents = st.sampled_from(range(len(seeds()))).flatmap(
        lambda i: mutated(seeds()[i], values=toml_values, most=5)).map(
        lambda d: to_toml(d).encode("utf-8", "surrogatepass"))
    depth = st.integers(1, 5000)
    return st.one_of(
        st.binary(max_size=400),
        st.text(max_size=300).map(lambda s: s.encode("utf-8", "surrogatepass")),
        documents, documents, documents,
        documents.flatmap(_edited),
        st.tuples(documents, st.sampled_from(("utf-16", "utf-8-sig", "latin-1", "utf-32"))).map(
            lambda de: de[0].decode("utf-8", "surrogatepass").encode(de[1], "replace")),
        depth.map(lambda n: f"a = {'[' * n}{']' * n}\n".encode()),
        depth.map(lambda n: f"a = {'{b = ' * n}1{'}' * n}\n".encode()),
        depth.map(lambda n: ("a" + ".b" * n + " = 1\n").encode()),
        depth.map(lambda n: ("[source]\nkind = " + "[" * n + "]" * n + "\n").encode()),
    )


def _check_loader(data: bytes, name: str, load: Callable[[Path], Any]) -> Any:
    path = scratch() / name
    path.write_bytes(data)
    try:
        return load(path)
    except ConfigError as exc:
        assert str(path) in str(exc), f"ConfigError does not name the file: {exc}"
        return None


def check_recipe(data: bytes) -> None:
    """load_recipe returns a Recipe or raises ConfigError naming the file; nothing else."""
    from edgekit.recipe import Recipe, load_recipe

    recipe = _check_loader(data, "recipe.toml", load_recipe)
    assert recipe is None or isinstance(recipe, Recipe)
    if recipe is not None:
        _all_finite(recipe.model_dump())


def check_config(data: bytes) -> None:
    """load_config returns an AgentConfig or raises ConfigError naming the file; a loaded config has only
    finite numbers and a text encoding its reader can decode with."""
    cfg = _check_loader(data, "agent.toml", lambda p: load_config(p, AgentConfig))
    if cfg is None:
        return
    assert isinstance(cfg, AgentConfig)
    _all_finite(cfg.model_dump())
    encoding = getattr(cfg.source, "encoding", None)
    if encoding is not None:
        decode_line(b"1.0,2.0\xff\r", encoding)


def _all_finite(obj: Any) -> None:
    for v in _walk(obj):
        assert not isinstance(v, float) or math.isfinite(v), f"a loaded config holds {v!r}"


def _walk(obj: Any) -> Iterator[Any]:
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk(v)
    else:
        yield obj


# --- inputs that broke a contract once (kept as regression examples, tried before any generated ones) ---


def _skab_with(line: str, at: int = 50, n: int = 100) -> bytes:
    rng = np.random.default_rng(0)
    rows = [";".join(_cells("skab", i, rng)) for i in range(n)]
    rows[at] = line
    return "\n".join((SKAB_HEADER, *rows)).encode()


def _status(**fields: Any) -> bytes:
    return orjson.dumps({**m.Status("lab", "edge-1", "online", 1_700_000_000.0).to_obj(), **fields})


FOUND: dict[str, list[Any]] = {
    "replay": [
        # utf-16 / utf-32 without a BOM: the codec raises UnicodeError (not UnicodeDecodeError) on line 1
        ReplayCase("skab", "utf-16", True, "\n".join((SKAB_HEADER, "2020-03-09 10:34:33" + ";1" * 10)).encode("utf-16-le")),
        # a cell "5\x1c": numpy's parser (whole clean chunks) takes it as 5, float() (line by line) refuses it
        ReplayCase("skab", "utf-8", True, _skab_with("2020-03-09 10:35:23;1;2;5\x1c;4;5;6;7;8;0;0")),
    ],
    "serial": [
        # the last piece of a line over the limit came through as a sample at t = 9.99e99 s, and every line
        # after it was then quarantined as going back in time
        SerialCase("utf-8", b"9" * 4200 + b",1,2,3\n4,5,6\n", [4100, 200]),
    ],
    "hub": [
        [(topics.topic("lab", "edge-1", "status"), _status(queued=2**63), True)],  # SQLite INTEGER overflow
        [(topics.topic("lab", "edge-1", "metrics"),
          orjson.dumps({**_metrics("lab", "edge-1"), "dropped": 2**64 - 1}), False)],
        [(topics.topic("lab", "edge-1", "review"),  # a schema that is not a string: unhashable in a set lookup
          orjson.dumps({**review(result("edge-1", 0)).to_obj(), "schema": []}), False)],
    ],
    "recipe": [b"\x80", f"a = {'[' * 1000}{']' * 1000}".encode(), b"task = 'x'\nseed = inf\n"],
    "config": [
        b"\xff\xfe[\x00",
        f"[source]\nkind = {'[' * 600}{']' * 600}".encode(),
        b"bundle = 'b'\nallow_unsigned = true\nmetrics_interval_s = inf\n[source]\nkind = 'simulated'\ngenerator = 'pump'\n",
        b"bundle = 'b'\nallow_unsigned = true\n[source]\nkind = 'replay'\npath = 'r.csv'\nencoding = 'undefined'\n",
        b"bundle = 'b'\nallow_unsigned = true\n[source]\nkind = 'serial'\nport = 'p'\nchannels = 1\nrate_hz = 1.0\nencoding = 'idna'\n",
    ],
}


# --- the registry --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    what: str
    strategy: st.SearchStrategy[Any]
    check: Callable[[Any], None]

    @property
    def found(self) -> list[Any]:
        return FOUND.get(self.name, [])


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("replay", "recorded-file lines (ReplayReader: SKAB, IPOL, NAB)", replay_cases(), check_replay),
    Target("serial", "serial lines (SerialReader, arbitrary reads)", serial_cases(), check_serial),
    Target("mqtt", "MQTT source payloads (MqttReader.parse)", mqtt_cases(), check_mqtt),
    Target("hub", "hub payloads of every kind (to_batch + HubDB on SQLite)", hub_messages(), check_hub),
    Target("recipe", "recipe files (load_recipe)", toml_files(recipe_seeds), check_recipe),
    Target("config", "agent configs (load_config)", toml_files(config_seeds), check_config),
)}

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
