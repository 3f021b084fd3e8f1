"""Incidents (edgekit/incidents.py, issue 15): deferred windows of one device that overlap or follow within the
gap are one incident; every window is in exactly one; the order they arrive in changes nothing; the priority
is the documented score."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from edgekit import incidents
from edgekit.gate import REASON_TEXT
from edgekit.incidents import Deferred, group, ranked

TH = {"ood_max_score": 1.0, "min_confidence": 0.8, "max_disagreement": 0.3}


def win(i: int, start: float, size: float = 32.0, device: str = "pump-1", reasons: tuple[str, ...] = ("ood",),
        **kw: object) -> Deferred:
    return Deferred(f"{device}:{i:012d}", "plant", device, start, start + size, reasons,
                    kw.pop("scores", {"ood": 1.5}), TH, **kw)  # type: ignore[arg-type]


def test_overlapping_and_close_windows_are_one_incident_and_a_gap_starts_the_next() -> None:
    # hop 4 s, 32 s windows: 0..9 overlap; 10 starts 20 s after 9 ends (inside a 30 s gap); 11 starts 31 s after.
    ws = [win(i, 4.0 * i) for i in range(10)] + [win(10, 4.0 * 9 + 32 + 20), win(11, 4.0 * 9 + 32 + 20 + 32 + 31)]
    found = group(ws, gap_s=30.0)
    assert [inc.window_ids for inc in found] == [tuple(w.id for w in ws[:11]), (ws[11].id,)]
    first = found[0]
    assert (first.id, first.start_s, first.end_s, first.windows) == (ws[0].id, 0.0, ws[10].end_s, 11)
    assert [len(i.window_ids) for i in group(ws, gap_s=0.0)] == [10, 1, 1]  # no gap: overlap only


def test_every_window_is_in_exactly_one_incident_whatever_the_order() -> None:
    rng = random.Random(0)
    ws = [win(i, start, device=dev) for i, (start, dev) in enumerate(
        (rng.uniform(0, 5000), rng.choice(["a", "b", "c"])) for _ in range(400))]
    ws.append(Deferred("a:999", "plant", "a", None, None, ("ood",)))  # no times: an incident of its own
    ws.append(win(1000, 10.0, device="a", alone=True))  # a trial's answer: alone whatever its times
    expected = group(ws, 60.0)
    for _ in range(3):
        rng.shuffle(ws)
        assert group(ws, 60.0) == expected
    ids = [i for inc in expected for i in inc.window_ids]
    assert sorted(ids) == sorted(w.id for w in ws) and len(ids) == len(set(ids))
    assert all(len({i.split(":")[0] for i in inc.window_ids}) == 1 for inc in expected)  # one device each
    assert [inc.window_ids for inc in expected if inc.start_s is None] == [("a:999",)]
    assert ("a:000000001000",) in [inc.window_ids for inc in expected]


def test_reasons_worst_scores_and_the_documented_priority() -> None:
    ws = [win(0, 0.0, reasons=("low_confidence",), scores={"confidence": 0.6, "ood": 0.5}),
          win(1, 4.0, reasons=("low_confidence", "stuck:Current"), scores={"confidence": 0.7, "ood": 3.0}),
          win(2, 8.0, reasons=("low_confidence",), scores={"confidence": 0.4, "ood": float("nan")})]
    (inc,) = group(ws)
    assert inc.reasons == {"low_confidence": 3, "stuck:Current": 1}
    assert inc.worst == {"confidence": 0.4, "ood": 3.0}  # lowest confidence, highest ood; NaN ignored
    assert inc.severity == incidents.SEVERITY["stuck"]
    assert inc.risk == 1.0  # ood 3x its threshold: capped
    now = 1_000_000.0
    fresh = win(3, 0.0, device="b", reasons=("low_confidence",), scores={"confidence": 0.6}, received_at=now)
    old = win(4, 0.0, device="c", reasons=("low_confidence",), scores={"confidence": 0.6}, received_at=now - 86400)
    f, o = group([fresh])[0], group([old])[0]
    assert f.risk == pytest.approx(0.25) and f.age(now) == 0.0 and o.age(now) == 1.0
    assert f.priority(now) == round(100 * (0.5 * 0.3 + 0.3 * 0.25), 1)
    assert o.priority(now) == round(f.priority(now) + 20.0, 1)
    assert [i.device for i in ranked([f, o, inc], now)] == ["pump-1", "c", "b"]


def test_every_gate_reason_has_a_severity_and_a_baseline_being_learned_comes_last() -> None:
    assert set(REASON_TEXT) <= set(incidents.SEVERITY)
    assert incidents.learning_only(["commissioning"])
    assert not incidents.learning_only(["commissioning", "stuck:Current"]) and not incidents.learning_only(["ood"])
    assert incidents.SEVERITY["commissioning"] == min(incidents.SEVERITY.values())
    with pytest.raises(ValueError, match="gap_s"):
        group([], gap_s=-1.0)


def test_a_baseline_being_learned_is_an_incident_of_its_own_ranked_last() -> None:
    """A device's first windows, deferred while it learned its baseline, never share an incident with the
    judged windows right after them (a person would label both as one), and come after every other."""
    learn = [win(i, 4.0 * i, reasons=("commissioning",), scores={}) for i in range(5)]
    judged = [win(5, 20.0), win(6, 24.0)]  # overlapping the last learning one
    found = group(learn + judged, gap_s=60.0)
    assert [(inc.window_ids, inc.learning) for inc in found] == [
        (tuple(w.id for w in learn), True), (tuple(w.id for w in judged), False)]
    # a channel named while the baseline was learned: one commissioning incident still, and it waits (not
    # learning alone), at the envelope reason's severity
    named = win(2, 8.0, reasons=("commissioning", "stuck:Current"), scores={})
    first, second = group([*learn[:2], named, *learn[3:], *judged], gap_s=60.0)
    assert first.windows == 5 and not first.learning and first.severity == incidents.SEVERITY["stuck"]
    assert second.window_ids == tuple(w.id for w in judged)
    old_learning = group([win(9, 0.0, device="b", reasons=("commissioning",), scores={}, received_at=0.0)])[0]
    fresh_doubt = group([win(8, 0.0, device="c", reasons=("low_confidence",), scores={"confidence": 0.79},
                             received_at=1e6)])[0]
    assert old_learning.priority(1e6) > fresh_doubt.priority(1e6)  # aged a day: its score alone would rank it first
    assert [i.device for i in ranked([old_learning, fresh_doubt], 1e6)] == ["c", "b"]


def test_the_module_imports_nothing_but_the_standard_library() -> None:
    code = ("import sys, edgekit.incidents; "
            "print(sorted(m for m in ('numpy', 'sqlalchemy', 'fastapi', 'onnxruntime', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
