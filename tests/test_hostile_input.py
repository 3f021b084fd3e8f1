"""Hostile input (issue 10): recorded files with undecodable bytes, binary junk, huge finite numbers, NaN/inf,
wrong widths and backwards time. The reader quarantines exactly the bad lines and reads the rest; the agent
never exits with a traceback and accepts no window holding a non-finite or implausible value."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgekit.config import ReplaySource
from edgekit.datasets import SKAB_CHANNELS, SKAB_RECORDING
from edgekit.errors import DataError
from edgekit.source import MAX_LINE_CHARS, open_source
from edgekit.values import Quarantined, Sample, SampleBlock

SKAB_FAULT = "skab/data/valve1/1.csv"
HEADER = "datetime;" + ";".join(SKAB_CHANNELS) + ";anomaly;changepoint"


def skab_line(k: int, values: list[str] | None = None) -> str:
    """Data line k of a synthetic SKAB-format recording (1 Hz from 2020-03-09 10:00:00)."""
    stamp = f"2020-03-09 10:{k // 60:02d}:{k % 60:02d}"
    vals = values or [f"{0.02 + 0.001 * (k % 7):.5f}", "0.04", "1.3", "0.05", "75.5", "25.8", "230.1", "32.0"]
    return ";".join([stamp, *vals, "0.0", "0.0"])


def corrupt(lines: list[bytes], header_lines: int) -> tuple[list[bytes], dict[int, str], int]:
    """Replace some data lines with hostile ones. Returns the lines, {1-based line number: what the reader
    must say} for the lines it must quarantine, and the 1-based line number of the huge-but-finite one."""
    def cells(i: int) -> list[bytes]:
        return lines[i].split(b";")

    bad: dict[int, str] = {}
    out = list(lines)

    def put(i: int, line: bytes, reason: str) -> None:
        out[i] = line
        bad[i + 1] = reason

    first = header_lines  # index of the first data line
    c = cells(first + 10)
    put(first + 10, b";".join([c[0], c[1] + b"\xff", *c[2:]]), "not text")          # undecodable byte
    c = cells(first + 20)
    put(first + 20, b";".join([c[0], "é".encode("latin-1"), *c[2:]]), "not text")  # Latin-1 in UTF-8
    put(first + 30, bytes(range(256)).replace(b"\n", b"").replace(b"\r", b""), "")  # binary junk
    c = cells(first + 40)
    put(first + 40, b";".join([c[0], b"nan", *c[2:]]), "not finite")
    c = cells(first + 50)
    put(first + 50, b";".join([c[0], c[1], b"-inf", *c[3:]]), "not finite")
    c = cells(first + 60)
    put(first + 60, b";".join(c[:-2]), "wrong width")
    c = cells(first + 70)
    put(first + 70, b";".join([lines[first + 5].split(b";")[0], *c[1:]]), "time went backwards")
    put(first + 80, b"1;" * (MAX_LINE_CHARS // 2 + 10), "line too long")
    c = cells(first + 90)
    put(first + 90, b";".join([c[0], b"1e309", *c[2:]]), "not finite")  # overflows to inf
    c = cells(first + 120)
    huge = first + 120
    out[huge] = b";".join([c[0], c[1], c[2], b"4e300", *c[4:]])  # finite: a sample, but implausible
    return out, bad, huge + 1


def read_all(path: Path, blocks: bool, **kw) -> tuple[list[Sample], list[Quarantined]]:
    samples: list[Sample] = []
    quarantined: list[Quarantined] = []
    with open_source(ReplaySource(path=path, layout=SKAB_RECORDING, **kw), channel_names=SKAB_CHANNELS) as src:
        for item in (src.iter_blocks() if blocks else src):
            if isinstance(item, SampleBlock):
                samples.extend(item.samples())
            elif isinstance(item, Sample):
                samples.append(item)
            else:
                quarantined.append(item)
    return samples, quarantined


@pytest.mark.parametrize("blocks", [False, True], ids=["per-sample", "blocks"])
def test_reader_quarantines_exactly_the_bad_lines(tmp_path: Path, blocks: bool) -> None:
    lines = [HEADER.encode()] + [skab_line(k).encode() for k in range(3000)]
    hostile, bad, huge_line = corrupt(lines, header_lines=1)
    path = tmp_path / "hostile.csv"
    path.write_bytes(b"\n".join(hostile) + b"\n")
    samples, quarantined = read_all(path, blocks)
    got = {int(q.where.rsplit(":", 1)[1]): q.reason for q in quarantined}
    assert set(got) == set(bad), (sorted(got), sorted(bad))
    for n, expected in bad.items():
        assert all(q.where.startswith(f"{path}:") for q in quarantined)
        assert expected in got[n], (n, got[n])
    assert len(samples) + len(quarantined) == 3000
    assert all(np.isfinite(s.values).all() for s in samples)
    t = np.array([s.t_s for s in samples])
    assert (np.diff(t) > 0).all()
    assert any(s.values[2] == 4e300 for s in samples)  # the reader passes finite values; the agent judges them
    # the undecodable byte is shown, escaped, in the quarantined line
    assert "\\xff" in next(q.raw for q in quarantined if int(q.where.rsplit(":", 1)[1]) == 12)


def test_other_encodings_are_an_option_not_a_crash(tmp_path: Path) -> None:
    lines = [HEADER] + [skab_line(k) for k in range(50)]
    text = "\n".join(lines) + "\n"
    utf16 = tmp_path / "utf16.csv"
    utf16.write_text(text, encoding="utf-16")
    with pytest.raises(DataError, match=r"utf16.csv:1: .*not valid utf-8.*source.encoding"):
        open_source(ReplaySource(path=utf16, layout=SKAB_RECORDING), channel_names=SKAB_CHANNELS)
    samples, quarantined = read_all(utf16, True, encoding="utf-16")
    assert len(samples) == 50 and quarantined == []
    latin = tmp_path / "latin1.csv"
    latin.write_bytes(text.encode("latin-1")
                      + skab_line(50).replace("0.04", "0.04\xe9").encode("latin-1") + b"\n")
    samples, quarantined = read_all(latin, True)  # read as UTF-8: that line does not decode
    assert len(samples) == 50 and [q.reason.split(":")[0] for q in quarantined] == ["not text"]
    samples, quarantined = read_all(latin, True, encoding="latin-1")  # decodes, then is not a number
    assert len(samples) == 50 and [q.reason.split(":")[0] for q in quarantined] == ["not a number"]


def test_binary_file_without_newlines_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "junk.bin"
    path.write_bytes(bytes(range(256)) * 4000)
    with pytest.raises(DataError, match="junk.bin:1"):
        open_source(ReplaySource(path=path, layout=SKAB_RECORDING), channel_names=SKAB_CHANNELS)
    # after a good header, a binary tail is one overlong line: quarantined, not held in memory
    path.write_bytes(HEADER.encode() + b"\n" + skab_line(0).encode() + b"\n"
                     + bytes(range(14, 256)) * 2000 + b"\n" + skab_line(1).encode() + b"\n")
    samples, quarantined = read_all(path, True)
    assert len(samples) == 2 and [q.reason.split(":")[0] for q in quarantined] == ["line too long"]


# --- the agent, as a process, on a corrupted real recording ---------------------------------------


@pytest.mark.data
@pytest.mark.torch
@pytest.mark.slow
def test_agent_survives_hostile_recording(skab_bundle: Path, data_dir: Path, tmp_path: Path) -> None:
    lines = (data_dir / SKAB_FAULT).read_bytes().splitlines()
    hostile, bad, huge_line = corrupt(lines, header_lines=1)
    c = hostile[400].split(b";")
    hostile[400] = b";".join([c[0], b"1000000", *c[2:]])  # finite and plausible to a parser, not to the bundle
    path = tmp_path / "valve1-hostile.csv"
    path.write_bytes(b"\n".join(hostile) + b"\n")
    outbox = tmp_path / "outbox.db"
    cmd = [sys.executable, "-m", "edgekit", "-v", "run", "--bundle", str(skab_bundle), "--source",
           f"replay:{path}", "--broker", "", "--outbox", str(outbox), "--device-id", "dev-h", "--site", "test",
           "--allow-unsigned"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    logged = {int(m) for m in re.findall(r"agent\.quarantine where=\S+:(\d+) ", out.stderr)}
    assert logged == set(bad)

    con = sqlite3.connect(outbox)
    payloads = [json.loads(p) for t, p in con.execute("select topic, payload from outbox") if t.endswith("/result")]
    con.close()
    results = [r for p in payloads for r in p.get("results", [p])]
    assert results
    manifest = json.loads((skab_bundle / "manifest.json").read_text())
    assert manifest["input"]["plausible"] is not None
    from edgekit.source import parse_stamp

    def at(line_no: int) -> float:  # a window's times are the recording's own (ISO stamps: s since 1970)
        return parse_stamp(hostile[line_no - 1].split(b";")[0].decode())

    implausible_t = [at(huge_line), at(401)]
    covering = [r for r in results if any(r["window"]["start_s"] <= t <= r["window"]["end_s"]
                                          for t in implausible_t)]
    assert covering
    for r in covering:
        # refused before the models; the envelope names the channel the reading left (issue 14)
        assert r["decision"] == "defer" and r["reasons"][0] == "implausible", r
        assert set(r["reasons"][1:]) <= {"out_of_range:Current", "out_of_range:Accelerometer1RMS"}, r
        assert r["label"] is None and r["probs"] == {}
        assert re.match(r"channel '(Current|Accelerometer1RMS)' = ", r["implausible"]), r["implausible"]
    for r in results:
        if r["decision"] == "accept":
            assert all(np.isfinite(v) for v in r["probs"].values()) and np.isfinite(r["confidence"])
            assert all(v is not None and np.isfinite(v) for v in r["scores"].values())
    assert "agent.implausible" in out.stderr
