"""Transport.send_many against a real mosquitto: one outbox transaction per call, order kept, everything
delivered; the publisher is woken only while idle and never left asleep with rows to send."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import messagefactory
import pytest
from subscriber import Subscriber
from test_transport import wait_for

from edgekit.broker import Mosquitto
from edgekit.contract import messages as m
from edgekit.outbox import Outbox
from edgekit.transport import Transport

SITE, DEVICE = "plant1", "pump8"


def result(i: int) -> bytes:
    """This device's result with sequence number `i`, encoded by the contract."""
    return messagefactory.result(DEVICE, i, site=SITE).encode()


def review(i: int) -> bytes:
    """The review of this device's deferred result `i`, a short signal (the transport just carries it)."""
    return messagefactory.review(messagefactory.result(DEVICE, i, site=SITE, defer=True), n=16).encode()


def count_calls(obj: Any, name: str) -> list[str]:
    """Wrap obj.name; returns the list of calling threads' names, one per call."""
    calls: list[str] = []
    inner = getattr(obj, name)

    def wrapped(*a: Any, **kw: Any) -> Any:
        calls.append(threading.current_thread().name)
        return inner(*a, **kw)

    setattr(obj, name, wrapped)
    return calls


def test_send_many_offline_is_one_transaction_in_order(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as ob, Transport(None, site=SITE, device=DEVICE, outbox=ob) as tr:
        puts = count_calls(ob, "put_many")
        metrics = m.Metrics(SITE, DEVICE, 1.0, counters={"windows": 2}).encode()
        items = [("result", result(0)), ("result", result(1)), ("review", review(0)), ("metrics", metrics)]
        tr.send_many(items)  # type: ignore[arg-type]
        assert len(puts) == 1
        rows = ob.pending(10)
        assert [(r.topic.rsplit("/", 1)[1], r.payload, r.batchable) for r in rows] == [
            ("result", result(0), True), ("result", result(1), True), ("review", review(0), False),
            ("metrics", metrics, False)]
        assert all(r.replayed for r in rows)  # queued with no broker: replays when one comes
        status = m.Status(SITE, DEVICE, "online", 1.0).encode()
        with pytest.raises(ValueError, match="send kind must be one of"):
            tr.send_many([("result", result(2)), ("status", status)])  # type: ignore[list-item]
        assert ob.backlog() == 4  # nothing of the refused call was written
        tr.send_many([])
        assert len(puts) == 1


@pytest.mark.broker
@pytest.mark.parametrize("batch_interval_s", [0.0, 0.05], ids=["per-result", "batched"])
def test_send_many_delivers_everything_once_and_wakes_once_per_call(mosquitto: Mosquitto, tmp_path: Path,
                                                                    batch_interval_s: float) -> None:
    sub = Subscriber(mosquitto.port, client_id=f"sub-many-{batch_interval_s}")
    try:
        with Outbox(tmp_path / "o.db") as ob, Transport(mosquitto.url, site=SITE, device=DEVICE, outbox=ob,
                                                          batch_interval_s=batch_interval_s, max_batch=100) as tr:
            wait_for(lambda: tr.connected, 10, "CONNACK")
            me = threading.current_thread().name
            sets = count_calls(tr._wake, "set")
            n, calls = 0, 0
            for _ in range(60):
                items: list[tuple[str, bytes]] = [("result", result(n + j)) for j in range(25)]
                items += [("review", review(n + j)) for j in range(0, 25, 5)]
                tr.send_many(items)  # type: ignore[arg-type]
                n += 25
                calls += 1
            assert sum(1 for t in sets if t == me) <= calls
            assert tr.flush(30), tr.stats()
            wait_for(lambda: len(sub.results()) >= n and len(sub.of("review")) >= n // 5, 20, "every message")
            time.sleep(0.2)  # a duplicate would arrive right behind
            ids = [r["seq"] for r in sub.results()]
            assert ids == list(range(n))  # once each, oldest first
            assert [r["seq"] for r in sub.of("review")] == list(range(0, n, 5))
            if batch_interval_s > 0:
                assert len(sub.of("result")) < n / 10
            assert ob.backlog() == 0 and tr.stats()["acked"] == n + n // 5
    finally:
        sub.close()


@pytest.mark.broker
@pytest.mark.parametrize("batch_interval_s", [0.0, 0.05], ids=["per-result", "batched"])
def test_no_send_waits_for_the_fallback_timer(mosquitto: Mosquitto, tmp_path: Path, batch_interval_s: float) -> None:
    """Short bursts from two threads, each waited out: a lost wake-up would leave rows for the publisher's
    fallback wait, stretched here to 60 s so that no scheduling stall of this machine can pass for one (nor a
    lost wake-up hide behind the 1 s default). Reviews go out at once even while results are batched."""
    with Outbox(tmp_path / "o.db") as ob, Transport(mosquitto.url, site=SITE, device=DEVICE, outbox=ob,
                                                      batch_interval_s=batch_interval_s) as tr:
        tr.idle_wait_s = 60.0
        wait_for(lambda: tr.connected, 10, "CONNACK")
        rng = random.Random(1)
        slowest = 0.0
        for burst in range(150):
            def sender(k: int, base: int) -> None:
                for j in range(k):
                    tr.send("review", review(base + j))
                    if rng.random() < 0.3:
                        time.sleep(rng.random() * 0.0005)

            threads = [threading.Thread(target=sender, args=(rng.randint(1, 3), burst * 100 + 10 * t))
                       for t in range(2)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wait_for(lambda: ob.backlog() == 0, 10, f"burst {burst} PUBACKed (a lost wake-up sleeps 60 s)")
            slowest = max(slowest, time.monotonic() - t0)
        assert slowest < 5.0, f"a burst took {slowest:.3f} s: the publisher slept through a send"
