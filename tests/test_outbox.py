"""The SQLite outbox: order, durability across reopen (and SIGKILL), the persistent sequence, drop-oldest."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edgekit.outbox import Outbox, OutboxRow

T = "edgekit/v1/s/d/result"


def test_rows_come_back_oldest_first_and_ack_deletes(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as ob:
        ids = [ob.put(T, b'{"n":%d}' % i) for i in range(10)]
        ob.put("edgekit/v1/s/d/review", b'{"r":1}', batchable=False)
        assert ids == sorted(ids) and len(set(ids)) == 10
        rows = ob.pending(100)
        assert [r.payload for r in rows[:10]] == [b'{"n":%d}' % i for i in range(10)]
        assert rows[10] == OutboxRow(ids[-1] + 1, "edgekit/v1/s/d/review", b'{"r":1}', False, False)
        assert [r.id for r in ob.pending(3, after_id=ids[4])] == ids[5:8]
        ob.ack(ids[2:5] + [ids[7], ids[7], 999_999])  # duplicates and unknown ids are ignored
        assert ob.backlog() == 7
        assert [r.id for r in ob.pending(100)][:6] == ids[:2] + ids[5:7] + ids[8:10]


def test_rows_and_sequence_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as ob:
        first = ob.next_seq(1024)
        ob.put(T, b'{"a":1}')
        ob.put(T, b'{"a":2}')
        ob.ack([ob.pending(1)[0].id])
    with Outbox(path) as ob:
        assert [r.payload for r in ob.pending(10)] == [b'{"a":2}']
        assert ob.backlog() == 1
        assert ob.next_seq() == first + 1024
        assert ob.next_seq(5) == first + 1025
        assert ob.next_seq() == first + 1030


def test_committed_rows_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from edgekit.outbox import Outbox\n"
        f"ob = Outbox(Path({str(path)!r}))\n"
        "seq = ob.next_seq(100)\n"
        "for i in range(500): ob.put('t', b'{\"i\":%d}' % i)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()
    with Outbox(path) as ob:
        assert ob.backlog() == 500
        assert [r.payload for r in ob.pending(1000)][-1] == b'{"i":499}'
        assert ob.next_seq() == 101


def test_drop_oldest_bound_is_counted_and_persisted(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path, max_rows=5) as ob:
        for i in range(8):
            ob.put(T, b'{"i":%d}' % i)
        assert ob.backlog() == 5
        assert ob.dropped == 3
        assert [r.payload for r in ob.pending(10)] == [b'{"i":%d}' % i for i in range(3, 8)]
        ob.put_many([(T, b'{"j":%d}' % i, True) for i in range(7)])
        assert ob.backlog() == 5 and ob.dropped == 10
        assert [r.payload for r in ob.pending(10)] == [b'{"j":%d}' % i for i in range(2, 7)]
    with Outbox(path, max_rows=5) as ob:
        assert ob.dropped == 10
        with sqlite3.connect(path) as raw:
            assert raw.execute("SELECT value FROM meta WHERE key='dropped'").fetchone()[0] == 10


def test_wal_mode_is_on(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as ob:
        assert ob.journal_mode() == "wal"
    with sqlite3.connect(tmp_path / "o.db") as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_put_many_is_atomic(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as ob:
        ob.put(T, b'{"before":1}')
        with pytest.raises(sqlite3.IntegrityError):
            ob.put_many([(T, b'{"ok":1}', True), (T, b'{"ok":2}', True), (T, None, True)])  # type: ignore[list-item]
        assert ob.backlog() == 1
        assert [r.payload for r in ob.pending(10)] == [b'{"before":1}']
        ids = ob.put_many([(T, b'{"x":1}', True), ("edgekit/v1/s/d/review", b'{"x":2}', False)])
        assert len(ids) == 2 and ob.backlog() == 3
        assert [r.batchable for r in ob.pending(10)] == [True, True, False]


def test_mark_all_replayed_flags_queued_rows_only(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as ob:
        ob.put_many([(T, b"{}", True)] * 3)
        assert ob.mark_all_replayed() == 3
        ob.put(T, b'{"new":1}')
        assert [r.replayed for r in ob.pending(10)] == [True, True, True, False]
        ob.put(T, b'{"late":1}', replayed=True)
        assert ob.pending(10)[-1].replayed
        mark = ob.last_id()
        ob.put_many([(T, b'{"after":1}', True)] * 2)
        assert ob.mark_all_replayed(up_to_id=mark) == 1  # only {"new":1}; rows after the mark stay fresh
        assert [r.replayed for r in ob.pending(10)] == [True] * 5 + [False, False]
        ob.ack([r.id for r in ob.pending(10)])
        assert ob.last_id() == mark + 2  # ids are never reused, even with the table empty


def test_each_thread_uses_its_own_connection(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as ob:
        errors: list[BaseException] = []

        def writer() -> None:
            try:
                for i in range(200):
                    ob.put(T, b'{"w":%d}' % i)
                ob.release()
            except BaseException as exc:  # surfaced by the assert below
                errors.append(exc)

        threads = [threading.Thread(target=writer) for _ in range(3)]
        for t in threads:
            t.start()
        for i in range(200):
            ob.put(T, b'{"m":%d}' % i)
        for t in threads:
            t.join(30)
        assert errors == []
        assert ob.backlog() == 800
        assert len({r.id for r in ob.pending(1000)}) == 800


def test_put_many_ids_are_the_rows_ids_in_order(tmp_path: Path) -> None:
    """Multi-row INSERTs (200 rows a statement): the returned ids are the rows' own, in the items' order,
    also after acks, drops and a reopen (AUTOINCREMENT never reuses an id)."""
    path = tmp_path / "o.db"
    with Outbox(path, max_rows=1000) as ob:
        first = ob.put_many([(T, f'{{"i":{i}}}'.encode(), i % 3 != 0) for i in range(450)], replayed=True)
        rows = ob.pending(1000)
        assert first == [r.id for r in rows] and len(set(first)) == 450
        assert [r.payload for r in rows] == [f'{{"i":{i}}}'.encode() for i in range(450)]
        assert [r.batchable for r in rows] == [i % 3 != 0 for i in range(450)] and all(r.replayed for r in rows)
        ob.ack(first[-10:])  # the newest rows go: their ids must not come back
        more = ob.put_many([(T, b'{"j":1}', True)] * 700)  # past max_rows: the oldest are dropped
        assert more[0] == first[-1] + 1 and more == list(range(more[0], more[0] + 700))
        assert ob.backlog() == 1000 and ob.dropped == 140
    with Outbox(path, max_rows=1000) as ob:
        again = ob.put_many([(T, b'{"k":1}', True)] * 3)
        assert again[0] == more[-1] + 1 and [r.id for r in ob.pending(5000)][-3:] == again


def test_iter_pending_reads_what_pending_reads_and_lets_go_when_closed(tmp_path: Path) -> None:
    from contextlib import closing

    with Outbox(tmp_path / "o.db") as ob:
        ob.put_many([(T, f'{{"i":{i}}}'.encode(), i % 2 == 0) for i in range(30)])
        assert list(ob.iter_pending(20, after_id=5)) == ob.pending(20, after_id=5)
        with closing(ob.iter_pending(30)) as rows:
            assert next(rows).payload == b'{"i":0}'  # stop early: the rest is never read
        ob.ack([r.id for r in ob.pending(10)])
        with sqlite3.connect(tmp_path / "o.db") as raw:  # no snapshot left open: a full checkpoint completes
            busy, _, _ = raw.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0 and ob.backlog() == 20
