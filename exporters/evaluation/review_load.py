"""`edgekit eval incidents`: what a reviewer opens when the SKAB test recordings are replayed through the agent.

Issue 15, acceptance 1. The shipped skab recipe is trained and exported INT8 as `edgekit train` and `edgekit
export --int8` do; every recording of the run's test split (files neither training nor calibration saw; a
1000-row chunk of anomaly-free.csv is written out as a file of its own) is replayed through a real `Agent`
(replay source at speed 0 with the bundle's recorded layout, no broker, its own outbox), and the results it
wrote are grouped with the hub's rule (edgekit/incidents.py `group`, at its default gap and with no gap).
Per recording: windows, deferred windows, incidents, deferred windows per incident, and a check that every
deferred window is in exactly one incident. Nothing is tuned here: recipe, export, agent and rule are the
shipped ones. The replay helpers are shared with `edgekit eval review-loop` (review_loop.py).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.paths import shipped

log = logging.getLogger(__name__)

RECIPE = "skab"
GAPS_S = (None, 0.0)  # None: incidents.DEFAULT_GAP_S


@dataclass(frozen=True)
class Recording:
    """One held-out recording as a file the agent replays: its split group, the file, and per row its time
    (s since 1970, the agent's replay clock for ISO stamps) and its label (recipe label name)."""

    group: str
    path: Path
    t_s: np.ndarray
    labels: np.ndarray


def bundle(work: Path, recipe: Path | None = None, extra_labels: Path | None = None,
           name: str = "bundle", overrides: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Train `recipe` (default: the shipped skab.toml; `overrides` its dotted keys) with optional extra labels
    and export it INT8; (bundle directory, run directory)."""
    from edgekit.exporters.export.export import export
    from edgekit.exporters.training.train import train

    kwargs: dict[str, Any] = {"overrides": overrides} if overrides else {}
    run = train(recipe or shipped("recipes", f"{RECIPE}.toml"), work / f"run-{name}", extra_labels=extra_labels,
                progress=False, **kwargs)
    export(run, work / name, int8=True, progress=False)
    return work / name, run


def test_recordings(run_dir: Path, work: Path, split: str = "test") -> list[Recording]:
    """The run's `split` recordings (splits.npz groups), each a replayable file: a whole SKAB file as it is,
    a chunk ('file#k', `chunk_rows` rows) written out under `work` with its header. Sorted by group."""
    from edgekit.datasets import data_dir, read_skab
    from edgekit.recipe import load_recipe

    recipe = load_recipe(shipped("recipes", f"{RECIPE}.toml"))
    root = data_dir() / recipe.data.path
    chunk_rows = {str(g): fs.chunk_rows for fs in recipe.data.files
                  for g in ([fs.glob] if isinstance(fs.glob, str) else fs.glob)}
    with np.load(run_dir / "splits.npz") as s:
        groups = sorted(set(s[f"{split}_group"].tolist()))
    out = []
    for group in groups:
        rel, _, chunk = group.partition("#")
        src = root / rel
        table = read_skab(src)
        t_s = table.t_s + float(table.meta["t0"])
        anomaly = table.labels.get("anomaly")
        labels = np.where(anomaly == 1, "anomaly", "normal") if anomaly is not None else \
            np.full(len(t_s), "normal")
        if chunk:
            rows = chunk_rows.get(rel) or 1000
            a, b = int(chunk) * rows, (int(chunk) + 1) * rows
            lines = src.read_text().splitlines()
            path = work / "recordings" / f"{rel.replace('/', '_')}-{chunk}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join([lines[0], *lines[1 + a:1 + b]]) + "\n")
            t_s, labels = t_s[a:b], labels[a:b]
        else:
            path = src
        out.append(Recording(group, path, t_s, labels))
    return out


def outbox_path(work: Path, bundle_dir: Path, path: Path) -> Path:
    return work / f"outbox-{bundle_dir.name}-{path.stem}.db"


def outbox_messages(outbox: Path) -> list[tuple[str, bytes]]:
    """(topic, payload) of everything an agent wrote to its outbox: what a broker would carry to the hub."""
    from edgekit.outbox import Outbox

    with Outbox(outbox) as box:
        return [(row.topic, row.payload) for row in box.pending(10**7)]


def replay(bundle_dir: Path, path: Path, work: Path, device: str = "eval", keep_outbox: bool = False) -> list[Any]:
    """The agent's results (contract Results, in window order) for one recording replayed through a real
    Agent (no broker: read back from its outbox, which `keep_outbox` keeps for the caller)."""
    from edgekit.agent import Agent
    from edgekit.config import AgentConfig, validate
    from edgekit.contract import messages

    outbox = outbox_path(work, bundle_dir, path)
    outbox.unlink(missing_ok=True)
    cfg = validate(AgentConfig, {
        "device_id": device, "site": "eval", "bundle": str(bundle_dir), "mqtt": {"url": None},
        "allow_unsigned": True,  # the bundle this evaluation just exported
        "source": {"kind": "replay", "path": str(path), "speed": 0},
        "outbox": {"path": str(outbox)}, "runtime": {"intra_op_threads": 1}}, "exporters/evaluation/review_load.py")
    with Agent(cfg) as agent:
        agent.run(drain_timeout_s=0)
    results: list[Any] = []
    for topic, payload in outbox_messages(outbox):
        if topic.endswith("/result"):
            msg = messages.parse(topic, payload)
            results.extend(msg.results if isinstance(msg, messages.ResultBatch) else [msg])
    if not keep_outbox:
        outbox.unlink(missing_ok=True)
    return sorted(results, key=lambda r: r.seq)


def deferred(results: list[Any]) -> list[Any]:
    """The deferred results as incidents.Deferred (received now: age plays no part here)."""
    from edgekit.incidents import Deferred

    return [Deferred(r.id, r.site, r.device, r.start_s, r.end_s, tuple(r.reasons), r.scores, r.thresholds)
            for r in results if r.decision == "defer"]


def count(results: list[Any], gap_s: float) -> dict[str, Any]:
    """Windows, deferred windows, incidents at `gap_s`, and deferred windows outside or in two incidents."""
    from edgekit.incidents import group, learning_only

    d = deferred(results)
    found = group(d, gap_s)
    member = [i for inc in found for i in inc.window_ids]
    learning = sum(learning_only(w.reasons) for w in d)
    return {"windows": len(results), "deferred": len(d), "learning": learning, "incidents": len(found),
            "learning_incidents": sum(inc.learning for inc in found),
            "outside": len({w.id for w in d} - set(member)), "twice": len(member) - len(set(member)),
            "largest": max((inc.windows for inc in found), default=0)}


def evaluate(progress: bool = True) -> dict[str, Any]:
    """The skab bundle over every test recording; per recording count()'s numbers at each gap."""
    from edgekit.incidents import DEFAULT_GAP_S

    gaps = [DEFAULT_GAP_S if g is None else g for g in GAPS_S]
    out: dict[str, Any] = {"recipe": RECIPE, "gaps_s": gaps, "recordings": {}}
    with tempfile.TemporaryDirectory(prefix="edgekit-eval-incidents-") as tmp:
        work = Path(tmp)
        b, run = bundle(work)
        for rec in test_recordings(run, work):
            results = replay(b, rec.path, work)
            first = results[0].start_s if results else None
            out["recordings"][rec.group] = {"first_window_start_s": first,
                                            "by_gap": {str(g): count(results, g) for g in gaps}}
            if progress:
                log.info("eval_incidents recording=%s %s", rec.group, out["recordings"][rec.group])
    return out


def table(result: dict[str, Any]) -> str:
    from datetime import datetime, timezone

    gaps = result["gaps_s"]
    lines = [f"SKAB test recordings replayed through the agent ({result['recipe']} bundle, INT8); incidents at "
             + " and ".join(f"gap {g:g} s" for g in gaps),
             f"{'recording':<34}{'starts (sensor time)':>21}{'windows':>8}{'deferred':>9}{'learning':>9}"
             + "".join(f"{f'incidents@{g:g}s':>15}" for g in gaps) + f"{'deferred/incident':>19}"]
    tot: dict[str, int] = {"windows": 0, "deferred": 0, "learning": 0, **{str(g): 0 for g in gaps},
                           **{f"learning@{g}": 0 for g in gaps}}
    outside = 0
    for name, r in result["recordings"].items():
        by = r["by_gap"]
        first = by[str(gaps[0])]
        t0 = r["first_window_start_s"]
        when = datetime.fromtimestamp(t0, timezone.utc).strftime("%Y-%m-%d %H:%M") if t0 else "-"
        ratio = f"{first['deferred'] / first['incidents']:.1f}" if first["incidents"] else "-"
        lines.append(f"{name:<34}{when:>21}{first['windows']:>8}{first['deferred']:>9}{first.get('learning', 0):>9}"
                     + "".join(f"{by[str(g)]['incidents']:>15}" for g in gaps) + f"{ratio:>19}")
        tot["windows"] += first["windows"]
        tot["deferred"] += first["deferred"]
        tot["learning"] += first.get("learning", 0)
        for g in gaps:
            tot[str(g)] += by[str(g)]["incidents"]
            tot[f"learning@{g}"] += by[str(g)].get("learning_incidents", 0)
            outside += by[str(g)]["outside"] + by[str(g)]["twice"]
    n = tot[str(gaps[0])]
    ratio = f"{tot['deferred'] / n:.1f}" if n else "-"
    lines.append(f"{'total':<34}{'':>21}{tot['windows']:>8}{tot['deferred']:>9}{tot['learning']:>9}"
                 + "".join(f"{tot[str(g)]:>15}" for g in gaps) + f"{ratio:>19}")
    lines.append(f"deferred windows outside an incident or in two: {outside}; learning: deferred while the device "
                 "learned its baseline (commissioning), incidents of their own, not waiting in the queue: "
                 + ", ".join(f"{tot[f'learning@{g}']} of the incidents at gap {g:g} s" for g in gaps))
    return "\n".join(lines)
