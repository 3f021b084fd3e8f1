"""`edgekit eval sensor-faults`: held-out recordings with one channel broken at a time, through the agent.

Issue 14, acceptance 2. The shipped recipes skab.toml and ipol_gait.toml are trained and exported INT8 as
`edgekit train` and `edgekit export --int8` do. The recordings of the run's test split (files or subjects
neither training nor calibration saw; `{split}_group` in splits.npz) are read with the training loader (the
agent's replay decoding), one fault is injected into one channel of the whole recording, and the windows
the agent's Windower cuts go through a real `Agent`'s pipeline (`Agent.pipeline.run`, what
`Agent.process_many` runs before it encodes each result: the decision's reasons are the result's reasons),
in batches of the agent's MAX_WINDOWS_PER_CALL. The same windows also go through the same models and gate
without the bundle's envelope: what the gate did before issue 14. Each recording is a fresh device: a bundle
with a per-machine baseline (the recipe's [baseline] windows = N) commissions again on each recording's own
first N windows (faulty ones too: the fault is there from the first sample, as a miswired or broken sensor at
installation), and only the windows from position N on are scored.

Faults (FAULTS), each on channel c of every test recording, sized from the train split's recordings:
    stuck      the channel holds its first value          dead       it reads 0
    gain       x2, x10                                    offset     + 0.5 and 2 train standard deviations
    swapped    c and the next channel trade places (a wiring slip; both are the fault's channels)
    noise      + Gaussian noise of 1 and 5 times the channel's median within-window standard deviation
    drift      a ramp from 0 to + 0.5 and 2 train standard deviations over the recording
    dropout    5 % and 20 % of the samples read 0
Per fault (over every channel and window): the share deferred with and without the envelope, and the share
deferred with the fault's channel named first, by the envelope's reasons (`stuck:<c>`, `out_of_range:<c>`,
`feature_range:<c>.<stat>`, `relation:<c>`) and, for an `ood` deferral the envelope did not name, by the attribution's
largest share (gate.OodAttribution). Gross faults (GROSS): dead, stuck, gain x10, swapped. Nothing is tuned
here or on these recordings: the recipes, export's envelope and the agent are the shipped ones.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.paths import shipped
from edgekit.plausible import ENVELOPE_REASONS

log = logging.getLogger(__name__)

RECIPES = ("skab", "ipol_gait")
SEED = 0


@dataclass(frozen=True)
class Fault:
    kind: str  # stuck | dead | gain | offset | swapped | noise | drift | dropout
    size: float | None = None  # gain factor, offset/drift in train stds, noise in window stds, dropout share

    @property
    def name(self) -> str:
        if self.size is None:
            return self.kind
        unit = {"gain": "x", "offset": " sd", "drift": " sd", "noise": " wsd", "dropout": ""}[self.kind]
        size = f"{self.size:.0%}" if self.kind == "dropout" else f"{self.size:g}"
        return f"{self.kind} x{size}" if self.kind == "gain" else f"{self.kind} {size}{unit}"


FAULTS = (Fault("dead"), Fault("stuck"), Fault("gain", 10.0), Fault("swapped"), Fault("gain", 2.0),
          Fault("offset", 0.5), Fault("offset", 2.0), Fault("drift", 0.5), Fault("drift", 2.0),
          Fault("noise", 1.0), Fault("noise", 5.0), Fault("dropout", 0.05), Fault("dropout", 0.2))
GROSS = ("dead", "stuck", "gain x10", "swapped")


@dataclass(frozen=True)
class Scales:
    """Per channel, from the train split's recordings: `level` the samples' standard deviation (offsets,
    drifts), `motion` the median within-window standard deviation (noise)."""

    level: np.ndarray
    motion: np.ndarray


def inject(values: np.ndarray, fault: Fault, c: int, scales: Scales, rng: np.random.Generator) -> np.ndarray:
    """A copy of one recording's (n, C) samples with `fault` on channel `c` from its first sample on."""
    out = np.array(values, dtype=np.float64, copy=True)
    n, channels = out.shape
    x = out[:, c]
    k = fault.kind
    if k == "stuck":
        x[:] = x[0]
    elif k == "dead":
        x[:] = 0.0
    elif k == "gain":
        x *= fault.size
    elif k == "offset":
        x += fault.size * scales.level[c]
    elif k == "swapped":
        d = (c + 1) % channels
        out[:, [c, d]] = out[:, [d, c]]
    elif k == "noise":
        x += rng.normal(0.0, fault.size * scales.motion[c], size=n)
    elif k == "drift":
        x += np.linspace(0.0, fault.size * scales.level[c], n)
    elif k == "dropout":
        x[rng.random(n) < fault.size] = 0.0
    else:
        raise ValueError(f"unknown fault {k!r}")
    return out


def faulty_channels(fault: Fault, c: int, channels: int) -> tuple[int, ...]:
    """The channels a fault on `c` breaks (a swap breaks two)."""
    return (c, (c + 1) % channels) if fault.kind == "swapped" else (c,)


def named_channel(reasons: Sequence[str], attribution: dict[str, float] | None, channels: Sequence[str],
                  attributed: bool) -> str | None:
    """The first channel a deferred window's reasons name (a feature's channel for `feature_range`), else,
    with `attributed` and an `ood` reason, the attribution's largest share when it is a channel."""
    for r in reasons:
        kind, _, name = r.partition(":")
        if kind in ("stuck", "out_of_range", "relation") and name in channels:
            return name
        if kind == "feature_range":
            head = name.rsplit(".", 1)[0]
            if head in channels:
                return head
    if attributed and "ood" in reasons and attribution:
        top = next(iter(attribution))
        return top if top in channels else None
    return None


# --- the recordings ---------------------------------------------------------------------------------


def _recordings(recipe_path: Path, run_dir: Path
                ) -> tuple[list[np.ndarray], list[np.ndarray], Scales, list[np.ndarray]]:
    """The test split's recordings (segments without a gap, each (n, C)), the train split's, the channel
    scales from the train ones, and the test recordings' per-sample label indices (the recipe's labels).
    Groups are the run's own (splits.npz)."""
    from edgekit.exporters.training import recordings, tasks
    from edgekit.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    d = recipe.data
    with np.load(run_dir / "splits.npz") as s:
        groups = {split: set(s[f"{split}_group"].tolist()) for split in ("train", "test")}
    ctx = recordings.Context(recipe, tasks._resolve(recipe, recipe_path.parent))
    key = recipe.splits.group_by
    out: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    test_labels: list[np.ndarray] = []
    for fs in d.files:
        for path in recordings.list_files(ctx.root, fs, d.max_files):
            part = recordings.read_part(ctx, path, fs.label)
            if part is None:
                continue
            for group, a, b in tasks._pieces(part, fs.chunk_rows):
                if key not in (None, "file"):
                    group = f"{key}-{part.fields.get(str(key))}"
                for split, names in groups.items():
                    if group in names:
                        out[split].append(part.values[a:b])
                        if split == "test":
                            test_labels.append(part.labels[a:b])
    train = [v for v in out["train"] if len(v)]
    size = int(recipe.window.size) if recipe.window else 1
    stacked = np.concatenate(train)
    motion = [np.std(v[: len(v) // size * size].reshape(-1, size, v.shape[1]), axis=1) for v in train
              if len(v) >= size]
    return (out["test"], train, Scales(stacked.std(axis=0), np.median(np.concatenate(motion), axis=0)),
            test_labels)


def _window_labels(recordings: list[list[Any]], labels: list[np.ndarray], names: Sequence[str], at: str,
                   skip: int) -> list[str]:
    """The recipe's label of each window `_judge` scores (each recording's from position `skip` on), in its
    order: the sample's at the window's last row (`at` = 'last') or centre, as training labels them."""
    out = []
    for windows, lab in zip(recordings, labels):
        for w in windows[skip:]:
            size = len(w.data)
            out.append(names[int(lab[int(w.start_s) + (size - 1 if at == "last" else size // 2)])])
    return out


def _windows(segments: list[np.ndarray], size: int, hop: int) -> list[list[Any]]:
    """Per segment, the agent's Windower over it (a fresh one per segment: no window spans a gap)."""
    from edgekit.window import Windower

    out = []
    for values in segments:
        w = Windower(size, hop, values.shape[1])
        out.append(w.push_many(np.arange(len(values), dtype=np.float64), values))
    return out


# --- one bundle ----------------------------------------------------------------------------------------


def _agent(bundle: Path, work: Path) -> Any:
    from edgekit.agent import Agent
    from edgekit.config import AgentConfig, validate

    cfg = validate(AgentConfig, {
        "device_id": "eval", "site": "eval", "bundle": str(bundle), "mqtt": {"url": None},
        "allow_unsigned": True,  # the bundle this evaluation just exported
        "source": {"kind": "simulated", "generator": "pump"},  # never read: the windows come from here
        "outbox": {"path": str(work / f"{bundle.name}.db")},
        "runtime": {"intra_op_threads": 1}}, "exporters/evaluation/sensor_faults.py")
    return Agent(cfg)


def _judge(pipeline: Any, recordings: list[list[Any]]) -> list[Any]:
    """Each recording's windows through `pipeline` as a fresh device would judge them. With a baseline (the
    recipe's [baseline] windows = N) commissioning starts again at each recording, which learns from its own
    first plausible windows (deferred as `commissioning`: no model judges them); the windows from position N
    on are returned, the same ones for every fault and the clean recording (a fault that makes windows
    implausible makes commissioning take longer: such a window after N is scored as the device judged it)."""
    from edgekit.agent import MAX_WINDOWS_PER_CALL

    out: list[Any] = []
    comm = pipeline.commissioning
    for windows in recordings:
        pipeline.restart_stream()
        if comm is not None:
            comm.restart("learned")
        judged: list[Any] = []
        for a in range(0, len(windows), MAX_WINDOWS_PER_CALL):
            judged.extend(pipeline.run(windows[a:a + MAX_WINDOWS_PER_CALL]))
        out.extend(judged[comm.needed:] if comm is not None else judged)
    return out


def _count(judged: list[Any], right: set[str], channels: Sequence[str],
           labels: Sequence[str] | None = None) -> dict[str, Any]:
    """Windows, deferred, deferred with a `right` channel named first (by the reasons; by the reasons or the
    attribution), and deferred with any envelope reason (on clean recordings: the envelope's false alarms);
    with `labels` (each window's, in order) also windows and named per label (`by_label`)."""
    n: dict[str, Any] = {"windows": len(judged), "deferred": 0, "named": 0, "named_or_attributed": 0,
                         "enveloped": 0}
    by_label: dict[str, dict[str, int]] = {}
    for i, j in enumerate(judged):
        named = False
        if j.decision.action == "defer":
            n["deferred"] += 1
            n["enveloped"] += any(r.partition(":")[0] in ENVELOPE_REASONS for r in j.decision.reasons)
            named = named_channel(j.decision.reasons, None, channels, False) in right
            n["named"] += named
            n["named_or_attributed"] += named_channel(j.decision.reasons, j.attribution, channels, True) in right
        if labels is not None:
            b = by_label.setdefault(labels[i], {"windows": 0, "named": 0})
            b["windows"] += 1
            b["named"] += named
    if labels is not None:
        n["by_label"] = by_label
    return n


def evaluate_bundle(bundle: Path, run_dir: Path, recipe_path: Path, work: Path,
                    faults: Sequence[Fault] = FAULTS, channels: Sequence[int] | None = None,
                    progress: bool = False) -> dict[str, Any]:
    """Every fault on every channel (or those in `channels`) of the test recordings, through the bundle's
    agent with and without its envelope; counts per fault and channel, and the clean recordings'."""
    from edgekit.pipeline import EdgePipeline
    from edgekit.recipe import load_recipe

    test, _, scales, test_labels = _recordings(recipe_path, run_dir)
    recipe = load_recipe(recipe_path)
    rng = np.random.default_rng(SEED)
    with _agent(bundle, work) as agent:
        m = agent.manifest
        names = list(m.input.channels or [])
        size, hop = int(m.input.window_size or 1), int(m.input.window_hop or 1)
        bare = m.model_copy(update={"input": m.input.model_copy(update={"envelope": None})})
        pipelines = {"envelope": agent.pipeline, "none": EdgePipeline(bare, agent.models, agent.pre, agent.gate)}
        clean = _windows(test, size, hop)
        comm = agent.pipeline.commissioning
        # every fault keeps the recordings' lengths: the scored windows and their labels are the clean ones'
        at = recipe.data.label.at if recipe.data.label is not None else "last"
        labels = _window_labels(clean, test_labels, recipe.labels, at, comm.needed if comm else 0)
        result: dict[str, Any] = {
            "bundle": str(bundle), "channels": names, "recordings": len(test),
            "commissioning": comm.needed if comm else 0,
            "envelope": m.input.envelope.model_dump() if m.input.envelope else None,
            "clean": {k: _count(_judge(p, clean), set(), names) for k, p in pipelines.items()}, "faults": {}}
        for fault in faults:
            per: dict[str, Any] = {}
            for c in (range(len(names)) if channels is None else channels):
                wins = _windows([inject(v, fault, c, scales, rng) for v in test], size, hop)
                right = {names[i] for i in faulty_channels(fault, c, len(names))}
                per[names[c]] = {k: _count(_judge(p, wins), right, names, labels) for k, p in pipelines.items()}
            result["faults"][fault.name] = {"per_channel": per, **_total(per)}
            if progress:
                log.info("eval_sensor_faults bundle=%s fault=%s %s", bundle.name, fault.name,
                         {k: v for k, v in result["faults"][fault.name].items() if k != "per_channel"})
    return result


def _total(per: dict[str, Any]) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for variant in ("envelope", "none"):
        keys = ("windows", "deferred", "named", "named_or_attributed", "enveloped")
        total[variant] = {k: sum(v[variant][k] for v in per.values()) for k in keys}
        by_label: dict[str, dict[str, int]] = {}
        for v in per.values():
            for label, b in v[variant].get("by_label", {}).items():
                t = by_label.setdefault(label, {"windows": 0, "named": 0})
                t["windows"] += b["windows"]
                t["named"] += b["named"]
        if by_label:
            total[variant]["by_label"] = by_label
    return total


def _bundle(name: str, work: Path) -> tuple[Path, Path]:
    from edgekit.exporters.export.export import export
    from edgekit.exporters.training.train import train

    run = train(shipped("recipes", f"{name}.toml"), work / f"run-{name}", progress=False)
    export(run, work / f"bundle-{name}", int8=True, progress=False)
    return work / f"bundle-{name}", run


def evaluate(progress: bool = True, recipes: Sequence[str] = RECIPES) -> dict[str, Any]:
    """Both shipped recipes, trained and exported here; per recipe evaluate_bundle's counts."""
    out: dict[str, Any] = {"faults": [f.name for f in FAULTS], "gross": list(GROSS), "recipes": {}}
    with tempfile.TemporaryDirectory(prefix="edgekit-eval-faults-") as tmp:
        work = Path(tmp)
        for name in recipes:
            bundle, run = _bundle(name, work)
            out["recipes"][name] = evaluate_bundle(bundle, run, shipped("recipes", f"{name}.toml"), work,
                                                   progress=progress)
    return out


# --- the table --------------------------------------------------------------------------------------


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:5.1f}" if b else "    -"


def table(result: dict[str, Any]) -> str:
    """Per recipe, per fault: windows, % deferred without and with the envelope, % deferred with the
    fault's channel named first by the reasons, and by the reasons or the ood attribution."""
    lines = []
    for name, r in result["recipes"].items():
        lines.append(f"{name}: {r['recordings']} held-out recordings, {len(r['channels'])} channels, "
                     "one channel broken at a time"
                     + (f"; each a fresh device commissioned on its first {r['commissioning']} windows (not "
                        "scored)" if r.get("commissioning") else ""))
        lines.append(f"{'fault':<16}{'windows':>9}{'deferred before':>17}{'deferred':>10}{'named':>8}"
                     f"{'named+attr':>12}")
        for fault, f in [("clean", r["clean"]), *r["faults"].items()]:
            e, o = f["envelope"], f["none"]
            mark = " *" if fault in result.get("gross", ()) else ""
            lines.append(f"{fault + mark:<16}{e['windows']:>9}{_pct(o['deferred'], o['windows']):>17}"
                         f"{_pct(e['deferred'], e['windows']):>10}"
                         + ("" if fault == "clean" else f"{_pct(e['named'], e['windows']):>8}"
                            f"{_pct(e['named_or_attributed'], e['windows']):>12}"))
        gross = [r["faults"][g]["envelope"] for g in result.get("gross", ()) if g in r["faults"]]
        if gross:
            w = sum(g["windows"] for g in gross)
            lines.append(f"gross faults (*): {_pct(sum(g['named'] for g in gross), w).strip()} % deferred with "
                         f"the channel named by the reasons, {_pct(sum(g['named_or_attributed'] for g in gross), w).strip()} "
                         "% by the reasons or the attribution")
            labels = list(dict.fromkeys(k for g in gross for k in g.get("by_label", {})))
            if labels:
                parts = []
                for label in labels:
                    b = [g["by_label"].get(label, {"windows": 0, "named": 0}) for g in gross]
                    n = sum(x["windows"] for x in b)
                    parts.append(f"{label} {_pct(sum(x['named'] for x in b), n).strip()} % of {n}")
                lines.append("  named by the window's label: " + ", ".join(parts))
        c = r["clean"]
        e = c["envelope"]
        lines.append(f"clean: deferred {_pct(c['none']['deferred'], c['none']['windows']).strip()} % without the "
                     f"envelope, {_pct(e['deferred'], e['windows']).strip()} % with it; the envelope's reasons "
                     f"on {_pct(e['enveloped'], e['windows']).strip()} % of the clean windows")
        lines.append("")
    return "\n".join(lines).rstrip()
