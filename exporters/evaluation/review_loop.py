"""`edgekit eval review-loop`: do a reviewer's labels make the next model defer less? (issue 15, acceptance 4)

SKAB with the shipped recipe. The run's test split (files neither training nor calibration saw; a chunk of
anomaly-free.csv is replayed as a file of its own) is cut in two by position in sorted order: even positions
are the review pool, odd ones are never labelled. Round 0's bundle is the recipe trained and exported INT8 as
`edgekit train` and `edgekit export --int8` do. Each round:
  1. the never-labelled recordings are replayed through a real Agent with the round's bundle: the share of
     windows deferred, and the error of the accepted windows against the ground truth (SKAB's `anomaly`
     column at each window's last row: the recipe's own label rule), windows a baseline is learned on left out;
  2. the pool is replayed the same way and its results and reviews stored in a hub database (HubDB, SQLite);
     the hub's queue gives the incidents highest priority first (those of a device learning its baseline are
     not in it: they wait for no label), and the simulated reviewer takes the first K
     with a window it has not labelled before (by sensor time: a later round's bundle sees the same windows),
     labels each with the ground truth most of its new windows have (one label for the incident,
     HubDB.add_labels, as the incident page does) and relabels on its own every window whose truth differs
     (as a reviewer going through the windows would);
  3. `edgekit labels export` writes every label so far, and the recipe is trained again with
     `--extra-labels` and exported: the next round's bundle.
Nothing is tuned on the never-labelled recordings. The recipe runs with its [baseline]: each replay is a fresh
device that learns its baseline first, and the reviews carry each window's features relative to it, which the
labels export writes and training reads (windows labelled while a baseline was learned have none: skipped).
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.paths import shipped

from . import review_load

log = logging.getLogger(__name__)

K = 50  # incidents the reviewer labels per round (the budget: at most 50)
ROUNDS = 2  # rounds of labels after round 0


def truth(results: list[Any], rec: review_load.Recording) -> list[str | None]:
    """Each result's ground truth: the recording's label at the window's last row (None: no such row)."""
    idx = np.searchsorted(rec.t_s, [r.end_s for r in results])
    out: list[str | None] = []
    for r, i in zip(results, idx):
        ok = i < len(rec.t_s) and abs(rec.t_s[i] - r.end_s) < 1e-6
        out.append(str(rec.labels[i]) if ok else None)
    return out


def score(results: list[Any], labels: list[str | None]) -> dict[str, int]:
    """Windows, deferred, accepted and wrong accepted ones; windows deferred only while a baseline was learned
    are neither (they say nothing of the model)."""
    from edgekit.incidents import learning_only, reason_kind

    n: dict[str, Any] = {"windows": 0, "deferred": 0, "accepted": 0, "accepted_wrong": 0, "reasons": {}}
    for r, t in zip(results, labels):
        if r.decision == "defer" and learning_only(r.reasons):
            continue
        n["windows"] += 1
        if r.decision == "defer":
            n["deferred"] += 1
            for kind in {reason_kind(x) for x in r.reasons}:
                n["reasons"][kind] = n["reasons"].get(kind, 0) + 1
        else:
            n["accepted"] += 1
            n["accepted_wrong"] += int(t is not None and r.label != t)
    return n


def _device(round_: int, group: str) -> str:
    return f"r{round_}-" + re.sub(r"[^A-Za-z0-9_-]", "-", group)


def review_round(db: Any, bundle: Path, pool: list[review_load.Recording], work: Path, round_: int,
                 seen: set[tuple[str, float]], k: int = K) -> dict[str, Any]:
    """Replay the pool with `bundle` into the hub database `db`, and label the first `k` incidents of its queue
    that hold a window not labelled before (`seen`: (recording, window start) labelled in earlier rounds)."""
    from edgekit.hub.ingest import to_batch

    truth_of: dict[str, str | None] = {}
    key_of: dict[str, tuple[str, float]] = {}
    for rec in pool:
        device = _device(round_, rec.group)
        results = review_load.replay(bundle, rec.path, work, device=device, keep_outbox=True)
        for r, t in zip(results, truth(results, rec)):
            truth_of[r.id] = t
            key_of[r.id] = (rec.group, float(r.start_s))
        outbox = review_load.outbox_path(work, bundle, rec.path)
        db.store(to_batch(review_load.outbox_messages(outbox), time.time()))
        outbox.unlink(missing_ok=True)
    # the hub's default queue: this round's devices are new, so every incident waiting for a label (not those of
    # a baseline being learned: their windows carry no features relative to a baseline to train on)
    queue = [i for i in db.incidents(status="unlabelled")["incidents"] if i["device"].startswith(f"r{round_}-")]
    used = {"incidents": 0, "incident_windows": 0, "relabelled": 0, "queue": len(queue)}
    for inc in queue:
        if used["incidents"] >= k:
            break
        new = [w for w in inc["window_ids"] if key_of[w] not in seen and truth_of.get(w) is not None]
        if not new:
            continue
        votes: dict[str, int] = {}
        for w in new:
            votes[truth_of[w]] = votes.get(truth_of[w], 0) + 1  # type: ignore[index]
        label = max(votes.items(), key=lambda kv: (kv[1], kv[0]))[0]
        db.add_labels(new, label, "simulated-reviewer", f"round {round_}: ground truth of most windows")
        for w in new:
            if truth_of[w] != label:
                db.add_label(w, truth_of[w] or label, "simulated-reviewer", "window relabelled on its own")
                used["relabelled"] += 1
            seen.add(key_of[w])
        used["incidents"] += 1
        used["incident_windows"] += len(new)
    log.info("review_loop round=%d %s", round_, " ".join(f"{k}={v}" for k, v in used.items()))
    return used


def evaluate(progress: bool = True, k: int = K, rounds: int = ROUNDS) -> dict[str, Any]:
    """Round 0 and `rounds` rounds of labels; per round the never-labelled recordings' counts and the labels."""
    from edgekit.hub import export_labels
    from edgekit.hub.db import HubDB
    from edgekit.recipe import load_recipe

    recipe = load_recipe(shipped("recipes", f"{review_load.RECIPE}.toml"))
    out: dict[str, Any] = {"recipe": review_load.RECIPE, "k": k, "baseline": recipe.baseline is not None,
                           "rounds": []}
    with tempfile.TemporaryDirectory(prefix="edgekit-eval-review-loop-") as tmp:
        work = Path(tmp)
        bundle, run = review_load.bundle(work, name="bundle-r0")
        recordings = review_load.test_recordings(run, work)
        pool, held = recordings[0::2], recordings[1::2]
        out["pool"], out["never_labelled"] = [r.group for r in pool], [r.group for r in held]
        url = f"sqlite:///{work / 'hub.db'}"
        seen: set[tuple[str, float]] = set()
        labels_csv = work / "labels.csv"
        with HubDB(url) as db:
            db.create()
            for round_ in range(rounds + 1):
                counts: dict[str, Any] = {"windows": 0, "deferred": 0, "accepted": 0, "accepted_wrong": 0,
                                          "reasons": {}}
                for rec in held:
                    results = review_load.replay(bundle, rec.path, work, device="held")
                    for key, v in score(results, truth(results, rec)).items():
                        if key == "reasons":
                            for kind, n in v.items():
                                counts["reasons"][kind] = counts["reasons"].get(kind, 0) + n
                        else:
                            counts[key] += v
                row: dict[str, Any] = {"round": round_, **counts, "labels_windows": len(seen)}
                if round_ < rounds:
                    row["labelled_now"] = review_round(db, bundle, pool, work, round_, seen, k)
                    export_labels(url, labels_csv)
                    bundle, _ = review_load.bundle(work, extra_labels=labels_csv, name=f"bundle-r{round_ + 1}")
                out["rounds"].append(row)
                if progress:
                    log.info("eval_review_loop %s", row)
    return out


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}" if b else "-"


def table(result: dict[str, Any]) -> str:
    lines = [f"SKAB review loop ({result['recipe']} recipe{', with its baseline' if result.get('baseline') else ''}"
             f", INT8): pool {', '.join(result['pool'])}; never labelled {', '.join(result['never_labelled'])}; "
             f"at most {result['k']} incidents labelled per round",
             f"{'round':>5}{'windows':>9}{'deferred %':>12}{'error on accepted %':>21}{'labelled windows':>18}"
             f"{'incidents labelled':>20}{'relabelled':>12}"]
    for r in result["rounds"]:
        now = r.get("labelled_now") or {}
        lines.append(f"{r['round']:>5}{r['windows']:>9}{_pct(r['deferred'], r['windows']):>12}"
                     f"{_pct(r['accepted_wrong'], r['accepted']):>21}{r['labels_windows']:>18}"
                     f"{now.get('incidents', '-'):>20}{now.get('relabelled', '-'):>12}")
    first, last = result["rounds"][0], result["rounds"][-1]
    if first["windows"] and last["windows"] and first["deferred"]:
        ratio = (last["deferred"] / last["windows"]) / (first["deferred"] / first["windows"])
        lines.append(f"deferral after {len(result['rounds']) - 1} rounds: {ratio:.2f} x round 0's (target 0.5)")
    return "\n".join(lines)
