"""`iter_blocks()`: the same samples and quarantines, in the same order, as iterating a source one item at a
time; replay and simulation at speed 0 hand clean runs over as `SampleBlock`s, paced sources never do."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgekit.config import ReplaySource, SimulatedSource
from edgekit.datasets import IPOL_CHANNELS, IPOL_RECORDING, NAB_RECORDING, SKAB_CHANNELS, SKAB_RECORDING
from edgekit.source import open_source
from edgekit.values import Quarantined, Sample, SampleBlock

SKAB_FAULT = "skab/data/valve1/1.csv"
IPOL_TRIAL = "ipol_gait/GaitData/1-1_lb.txt"
NAB_FILE = "nab/data/realKnownCause/machine_temperature_system_failure.csv"


def flat(items: list[Any]) -> list[tuple]:
    """Items as comparable tuples, blocks unrolled into their samples."""
    out: list[tuple] = []
    for item in items:
        if isinstance(item, SampleBlock):
            out.extend(("sample", s.t_s, s.values.tolist()) for s in item.samples())
        elif isinstance(item, Sample):
            out.append(("sample", item.t_s, item.values.tolist()))
        else:
            assert isinstance(item, Quarantined), item
            out.append(("quarantined", item.where, item.reason, item.raw))
    return out


IPOL = {"layout": IPOL_RECORDING}
IPOL_COLUMNS = {"channel_names": IPOL_CHANNELS}
LAYOUTS = {SKAB_FAULT: (SKAB_RECORDING, SKAB_CHANNELS), IPOL_TRIAL: (IPOL_RECORDING, IPOL_CHANNELS),
           NAB_FILE: (NAB_RECORDING, ("value",))}


def both(cfg: Any, **kw: Any) -> tuple[list[Any], list[Any]]:
    """(items from iterating, items from iter_blocks) of two fresh sources with the same config."""
    with open_source(cfg, **kw) as src:
        one = list(src)
    with open_source(cfg, **kw) as src:
        blocks = list(src.iter_blocks())
    return one, blocks


def write_ipol_like(path: Path, rows: int) -> list[str]:
    rng = np.random.default_rng(0)
    data = np.column_stack([np.arange(rows), rng.normal(size=(rows, 9))])
    header = "PacketCounter\tAcc_X\tAcc_Y\tAcc_Z\tGyr_X\tGyr_Y\tGyr_Z\tMag_X\tMag_Y\tMag_Z"
    lines = ["Acquisition frequency: 100 Hz", header, *("\t".join(f"{v:.6f}" for v in row) for row in data)]
    path.write_text("\n".join(lines) + "\n")
    return lines


@pytest.mark.data
@pytest.mark.parametrize("name", [SKAB_FAULT, IPOL_TRIAL, NAB_FILE])
def test_blocks_carry_the_same_items_as_samples_on_recordings(data_dir: Path, name: str) -> None:
    layout, channels = LAYOUTS[name]
    one, blocks = both(ReplaySource(path=data_dir / name, layout=layout), channel_names=channels)
    assert flat(blocks) == flat(one)
    assert any(isinstance(b, SampleBlock) and len(b) > 1 for b in blocks)
    assert len(blocks) < len(one) / 50  # clean runs came as blocks


def test_bad_lines_come_out_in_place_between_blocks(tmp_path: Path) -> None:
    path = tmp_path / "big_lb.txt"
    lines = write_ipol_like(path, 5000)
    for i in (100, 2100, 2101, 4999):  # file lines 101, 2101, 2102, 5000
        lines[i] = lines[i].replace("\t", "\tx", 1)
    lines[3000] = "\t".join(["7.0", *lines[3000].split("\t")[1:]])  # PacketCounter goes back (line 3001)
    path.write_text("\n".join(lines) + "\n\n")
    one, blocks = both(ReplaySource(path=path, **IPOL), **IPOL_COLUMNS)
    assert flat(blocks) == flat(one)
    bad = [b for b in blocks if isinstance(b, Quarantined)]
    assert [q.where for q in bad] == [f"{path}:{n}" for n in (101, 2101, 2102, 3001, 5000)]
    assert sum(len(b) if isinstance(b, SampleBlock) else isinstance(b, Sample) for b in blocks) == 5000 - 5


@pytest.mark.parametrize("generator, duration_s", [("gait", 45.0), ("pump", 4000.0)])
def test_simulated_blocks_are_the_same_stream(generator: str, duration_s: float) -> None:
    one, blocks = both(SimulatedSource(generator=generator, duration_s=duration_s, seed=3))
    assert all(isinstance(b, SampleBlock) for b in blocks) and len(blocks) < len(one) / 100
    assert flat(blocks) == flat(one)  # times included: k / rate_hz, exact both ways


def test_paced_sources_give_single_samples(tmp_path: Path) -> None:
    path = tmp_path / "1-1_lb.txt"
    write_ipol_like(path, 21)
    one, blocks = both(ReplaySource(path=path, speed=50, **IPOL), **IPOL_COLUMNS)
    assert all(isinstance(b, Sample) for b in blocks) and flat(blocks) == flat(one)
    one, blocks = both(SimulatedSource(generator="pump", duration_s=3, speed=100))
    assert all(isinstance(b, Sample) for b in blocks) and flat(blocks) == flat(one)


def test_stop_event_ends_block_iteration(tmp_path: Path) -> None:
    stop = threading.Event()
    stop.set()
    with open_source(SimulatedSource(generator="pump", duration_s=1e6), stop=stop) as src:
        assert list(src.iter_blocks()) == []
    path = tmp_path / "big_lb.txt"
    write_ipol_like(path, 5000)
    with open_source(ReplaySource(path=path, **IPOL), stop=stop, **IPOL_COLUMNS) as src:
        assert list(src.iter_blocks()) == []


def test_sample_block_checks_its_invariants() -> None:
    ok = SampleBlock(np.array([0.0, 1.0, 1.0]), np.zeros((3, 2)))  # equal times pass, as in Windower
    assert len(ok) == 3 and [s.t_s for s in ok.samples()] == [0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"t_s goes back at row 2: 0\.5 after 1\.0"):
        SampleBlock(np.array([0.0, 1.0, 0.5]), np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"values must be finite \(got \[1\.0, nan\] at row 1\)"):
        SampleBlock(np.array([0.0, 1.0]), np.array([[0.0, 0.0], [1.0, np.nan]]))
    with pytest.raises(ValueError, match=r"t_s must be finite \(got inf at row 0\)"):
        SampleBlock(np.array([np.inf]), np.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"values must be \(2, channels\) \(got shape \(3, 2\)\)"):
        SampleBlock(np.array([0.0, 1.0]), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="non-empty"):
        SampleBlock(np.array([]), np.zeros((0, 2)))
