"""The review-load evaluations' bookkeeping (exporters/evaluation/review_load.py, review_loop.py; issue 15): how
deferred windows become incidents and how a round is scored, on results built with the contract. The runs
themselves (SKAB through the agent) are `edgekit eval incidents` and `edgekit eval review-loop`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from messagefactory import result

from edgekit.exporters.evaluation import review_load, review_loop

T0 = 1583750073.0


def windows(defer: set[int], reasons: dict[int, list[str]] | None = None) -> list:
    out = []
    for s in range(1, 41):
        r = result("pump", s, defer=s in defer, start_s=T0 + 2.0 * s, end_s=T0 + 2.0 * s + 7)
        if reasons and s in reasons:
            r = dataclasses.replace(r, reasons=reasons[s])
        out.append(r)
    return out


def test_deferred_windows_become_incidents_and_none_is_left_out() -> None:
    res = windows({1, 2, 3, 4, 5, 30, 31} | set(range(10, 15)), reasons={1: ["commissioning"], 2: ["commissioning"]})
    n = review_load.count(res, gap_s=0.0)
    # 1-2 deferred while the baseline was learned: an incident of their own, not with 3-5; 10-14 and 30-31
    assert (n["windows"], n["deferred"], n["learning"], n["incidents"]) == (40, 12, 2, 4)
    assert n["outside"] == 0 and n["twice"] == 0 and n["largest"] == 5
    assert review_load.count(res, gap_s=60.0)["incidents"] == 2  # 1-2; 3-5 .. 30-31 within a minute
    text = review_load.table({"recipe": "skab", "gaps_s": [60.0, 0.0], "recordings": {
        "valve1/1.csv": {"first_window_start_s": T0, "by_gap": {"60.0": review_load.count(res, 60.0),
                                                                  "0.0": n}}}})
    assert "valve1/1.csv" in text and "2020-03-09 10:34" in text and "outside an incident or in two: 0" in text


def test_a_round_is_scored_against_the_ground_truth_at_each_windows_last_row() -> None:
    res = windows({5, 6})
    t_s = np.array([T0 + 2.0 * s + 7 for s in range(1, 41)])
    truth = np.array(["anomaly" if s >= 20 else "walk" for s in range(1, 41)])  # the factory says "walk"
    rec = review_load.Recording("valve1/1.csv", Path("valve1/1.csv"), t_s, truth)
    labels = review_loop.truth(res, rec)
    assert labels[0] == "walk" and labels[-1] == "anomaly"
    n = review_loop.score(res, labels)
    assert (n["windows"], n["deferred"], n["accepted"], n["accepted_wrong"]) == (40, 2, 38, 21)
    assert n["reasons"] == {"low_confidence": 2, "disagreement": 2}
    text = review_loop.table({"recipe": "skab", "k": 50, "baseline": True, "pool": ["a"],
                              "never_labelled": ["b"], "rounds": [
                                  {"round": 0, **n, "labels_windows": 0, "labelled_now": {"incidents": 1,
                                                                                          "relabelled": 0}},
                                  {"round": 1, **{**n, "deferred": 1}, "labels_windows": 2}]})
    assert "with its baseline" in text and "0.50 x round 0's" in text
