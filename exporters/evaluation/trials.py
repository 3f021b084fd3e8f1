"""`edgekit eval trials`: every IPOL trial walked through the agent with the two shipped trial bundles.

Issue 13's acceptance 1: the recipes tug_seed_trial.toml (the seed table's registry columns: age, TUG, steps)
and fall_screening.toml (the nine spectral TUG features) are trained and exported as `edgekit train` and
`edgekit export` do; each IPOL trial (subjects 1-15) is replayed through a real `Agent` (replay source with
the IPOL recipe's file layout, no broker, its own outbox, `[trial] detect = "source"`: the file is the trial), with the trial's age and sex from its JSON as the
operator's entries. Counted per bundle: answers, not-scored trials by reason, deferred answers by gate reason.
Nothing is tuned here: the recipes, the export and the agent are the shipped ones.
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from edgekit.datasets import ipol_files, read_ipol
from edgekit.paths import shipped

log = logging.getLogger(__name__)

RECIPES = ("tug_seed_trial", "fall_screening")
IMU = ["Acc_X", "Acc_Y", "Acc_Z", "Gyr_X", "Gyr_Y", "Gyr_Z"]


def _bundle(name: str, work: Path) -> Path:
    from edgekit.exporters.export.export import export
    from edgekit.exporters.training.train import train

    run = train(shipped("recipes", f"{name}.toml"), work / f"run-{name}", progress=False)
    export(run, work / f"bundle-{name}", progress=False)
    return work / f"bundle-{name}"


def _one(bundle: Path, path: Path, work: Path, operator: dict[str, Any]) -> Any:
    """The agent's one trial message for one recorded trial."""
    from edgekit.agent import Agent
    from edgekit.config import AgentConfig, validate
    from edgekit.contract import messages
    from edgekit.outbox import Outbox
    from edgekit.recipe import load_recipe

    layout = load_recipe(shipped("recipes", "ipol_gait.toml")).data.layout
    assert layout is not None
    outbox = work / f"{bundle.name}-{path.stem}.db"
    cfg = validate(AgentConfig, {
        "device_id": "eval", "site": "eval", "bundle": str(bundle), "mqtt": {"url": None},
        "allow_unsigned": True,  # the bundle this evaluation just exported
        "source": {"kind": "replay", "path": str(path), "speed": 0, "layout": layout.model_dump()},
        "outbox": {"path": str(outbox)}, "runtime": {"intra_op_threads": 1},
        # each file is one trial as recorded (the recording's start and end were the operator's)
        "trial": {"channels": IMU, "operator": operator, "detect": "source"},
    }, "exporters/evaluation/trials.py")
    with Agent(cfg) as agent:
        agent.run(drain_timeout_s=0)
    with Outbox(outbox) as box:
        found = [messages.parse(r.topic, r.payload) for r in box.pending(10**6) if r.topic.endswith("/trial")]
    if len(found) != 1:
        raise AssertionError(f"{path.name}: {len(found)} trial messages, expected one")
    return found[0]


def evaluate(progress: bool = True) -> dict[str, Any]:
    """Both bundles over every IPOL trial; per bundle the counts described in the module docstring."""
    files = ipol_files()
    out: dict[str, Any] = {"trials": len(files), "bundles": {}}
    with tempfile.TemporaryDirectory(prefix="edgekit-eval-trials-") as tmp:
        work = Path(tmp)
        for name in RECIPES:
            bundle = _bundle(name, work)
            counts: Counter[str] = Counter()
            reasons: Counter[str] = Counter()
            not_scored: Counter[str] = Counter()
            labels: Counter[str] = Counter()
            for path in files:
                meta = read_ipol(path).meta
                operator = {"age": float(meta["Age"]), "sex": str(meta["Gender"])}
                msg = _one(bundle, path, work, operator)
                if msg.answer is None:
                    counts["not_scored"] += 1
                    not_scored[(msg.not_scored or "?").split(":")[0]] += 1
                    continue
                counts[msg.answer.decision] += 1
                labels[msg.answer.label or "none"] += 1
                reasons.update(msg.answer.reasons)
            out["bundles"][name] = {"answered": counts["accept"] + counts["defer"], "accepted": counts["accept"],
                                    "deferred": counts["defer"], "not_scored": dict(not_scored),
                                    "defer_reasons": dict(reasons), "labels": dict(labels)}
            log.info("eval_trials bundle=%s %s", name, out["bundles"][name])
    return out


def table(result: dict[str, Any]) -> str:
    n = result["trials"]
    lines = [f"IPOL, {n} trials (subjects 1-15) replayed through the agent, one trial message each",
             f"{'bundle':<16}{'answered':>9}{'accepted':>9}{'deferred':>9}{'not scored':>11}  defer reasons / labels"]
    for name, b in result["bundles"].items():
        ns = sum(b["not_scored"].values())
        lines.append(f"{name:<16}{b['answered']:>9}{b['accepted']:>9}{b['deferred']:>9}{ns:>11}  "
                     f"{b['defer_reasons']} / {b['labels']}")
        if ns:
            lines.append(f"{'':<16}not scored: {b['not_scored']}")
    return "\n".join(lines)
