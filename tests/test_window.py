"""Windows from the streaming Windower are the same arrays as sliding_windows over the same samples."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.datasets import ipol_files, read_ipol, read_skab, skab_files
from edgekit.values import Sample
from edgekit.window import Windower, sliding_windows


def stream_one_by_one(t: np.ndarray, values: np.ndarray, size: int, hop: int) -> list:
    w = Windower(size, hop, values.shape[1])
    out = [w.push(Sample(float(t[i]), values[i])) for i in range(len(values))]
    return [x for x in out if x is not None]


def stream_in_chunks(t: np.ndarray, values: np.ndarray, size: int, hop: int, cuts: list[int]) -> list:
    w = Windower(size, hop, values.shape[1])
    bounds = [0, *cuts, len(values)]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        out += w.push_many(t[a:b], values[a:b])
    return out


def test_sliding_windows_starts_and_shapes() -> None:
    x = np.arange(20, dtype=float).reshape(10, 2)
    w = sliding_windows(x, 4, 3)
    assert w.shape == (3, 4, 2)  # starts 0, 3, 6 (9 would not be full)
    assert w[:, 0, 0].tolist() == [0.0, 6.0, 12.0]
    assert w.flags.c_contiguous and w.dtype == np.float64
    assert sliding_windows(x, 11, 1).shape == (0, 11, 2)


@pytest.mark.parametrize("size,hop", [(50, 10), (7, 7), (10, 13), (1, 1), (64, 1)])
def test_streaming_equals_batch_on_random_data(size: int, hop: int) -> None:
    rng = np.random.default_rng(size * 100 + hop)
    x = rng.normal(size=(500, 3))
    t = np.arange(500) * 0.01
    ref = sliding_windows(x, size, hop)
    one = stream_one_by_one(t, x, size, hop)
    chunks = stream_in_chunks(t, x, size, hop, [3, 4, 100, 101, 333])
    assert np.array_equal(np.stack([w.data for w in one]), ref)
    assert np.array_equal(np.stack([w.data for w in chunks]), ref)
    assert [w.seq for w in one] == list(range(len(ref))) == [w.seq for w in chunks]
    starts = np.arange(len(ref)) * hop
    assert [w.start_s for w in chunks] == t[starts].tolist() == [w.start_s for w in one]
    assert [w.end_s for w in chunks] == t[starts + size - 1].tolist()


def test_window_data_is_a_fresh_array() -> None:
    w = Windower(3, 1, 1)
    got = [w.push(Sample(float(i), np.array([float(i)]))) for i in range(5)]
    assert got[1] is None and got[2] is not None
    first = got[2].data.copy()
    assert first[:, 0].tolist() == [0.0, 1.0, 2.0]
    assert np.array_equal(got[2].data, first)  # later pushes did not overwrite it
    assert got[4].data[:, 0].tolist() == [2.0, 3.0, 4.0]


def test_bad_arguments_name_the_value() -> None:
    with pytest.raises(ValueError, match="size.*0"):
        Windower(0, 1, 1)
    with pytest.raises(ValueError, match="hop.*-2"):
        sliding_windows(np.zeros((5, 1)), 2, -2)
    with pytest.raises(ValueError, match="channels.*0"):
        Windower(2, 1, 0)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        Windower(2, 1, 2).push(Sample(0.0, np.zeros(3)))
    with pytest.raises(ValueError, match="2-D"):
        sliding_windows(np.zeros(5), 2, 1)
    w = Windower(2, 1, 1)
    w.push(Sample(1.0, np.zeros(1)))
    with pytest.raises(ValueError, match="0.5"):
        w.push(Sample(0.5, np.zeros(1)))
    with pytest.raises(ValueError, match="goes back"):
        w.push_many(np.array([2.0, 1.5]), np.zeros((2, 1)))


@pytest.mark.data
def test_streaming_equals_batch_on_skab(data_dir) -> None:
    table = read_skab(skab_files("valve1")[0])
    ref = sliding_windows(table.values, 60, 10)
    one = stream_one_by_one(table.t_s, table.values, 60, 10)
    chunks = stream_in_chunks(table.t_s, table.values, 60, 10, [1, 59, 60, 500])
    assert len(ref) > 50
    assert np.array_equal(np.stack([w.data for w in one]), ref)
    assert np.array_equal(np.stack([w.data for w in chunks]), ref)


@pytest.mark.data
def test_streaming_equals_batch_on_ipol(data_dir) -> None:
    table = read_ipol(ipol_files()[0])
    ref = sliding_windows(table.values, 200, 50)
    one = stream_one_by_one(table.t_s, table.values, 200, 50)
    chunks = stream_in_chunks(table.t_s, table.values, 200, 50, [77, 1000])
    assert len(ref) > 40
    assert np.array_equal(np.stack([w.data for w in one]), ref)
    assert np.array_equal(np.stack([w.data for w in chunks]), ref)


@pytest.mark.parametrize("chunks", [[250], [7, 93, 55, 95], [1] * 250, [100, 100, 50]])
def test_a_gap_starts_the_windows_afresh(chunks: list[int]) -> None:
    """A step over max_gap_s: no window spans it, and the windows are sliding_windows over each segment (what
    training cuts, exporters/training/tasks.py); seq keeps counting, so result numbers never repeat."""
    rng = np.random.default_rng(0)
    t = np.concatenate([np.arange(100) * 0.01, 5 + np.arange(100) * 0.01, 9 + np.arange(50) * 0.01])
    v = rng.normal(size=(250, 3))
    win = Windower(16, 8, 3, max_gap_s=0.05)
    out, i = [], 0
    for c in chunks:
        out += win.push_many(t[i:i + c], v[i:i + c]) if c > 1 else [w for w in [win.push(Sample(t[i], v[i]))] if w]
        i += c
    expected = np.concatenate([sliding_windows(v[a:b], 16, 8) for a, b in ((0, 100), (100, 200), (200, 250))])
    assert np.array_equal(np.stack([w.data for w in out]), expected)
    assert [w.seq for w in out] == list(range(len(expected)))
    assert all(w.end_s - w.start_s < 0.2 for w in out)
    assert win.gaps == 2
