"""The edge pipeline: windows -> plausibility -> features -> (baseline) -> normalise -> models -> gate -> one
`Judged` each. With an envelope in the bundle (edgekit/plausible.py EnvelopeCheck) its reasons join the gate's
decision; with a baseline (edgekit/baseline.py Commissioning) the device's first windows teach it the machine's
normal and are deferred as `commissioning`, and every later window's features are made relative to it.

The one copy of what the agent does to a window before it encodes a result: `Agent.process_many` runs it,
`edgekit bench` times it, and bench/torch_path.py runs it with torch models in place of onnxruntime
(anything with ModelSet's `input_kind` and `infer`). Must not import paho, the outbox or torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edgekit.baseline import Commissioning
from edgekit.features import extractor
from edgekit.gate import Gate, OodAttribution
from edgekit.plausible import EnvelopeCheck, Plausibility, StillRuns
from edgekit.values import GateDecision, Window


class Models(Protocol):
    """What the pipeline needs of a model set (edgekit/runtime.py ModelSet; bench/torch_path.py)."""

    input_kind: dict[str, str]

    def infer(self, features: np.ndarray, window: np.ndarray | None) -> Any: ...


@dataclass(frozen=True, slots=True)
class Judged:
    """One window after the gate. `features` are the raw features (None when the window was implausible
    before they were computed); `probs`/`second_probs` None when no model saw the window; `implausible`
    says why it was refused before the models, else None; `attribution` for a window deferred as `ood` by a
    bundle whose gate model gives its errors: {channel or feature: share of the error} (gate.OodAttribution),
    else None."""

    window: Window
    features: np.ndarray | None
    probs: np.ndarray | None
    second_probs: np.ndarray | None
    decision: GateDecision
    implausible: str | None = None
    attribution: dict[str, float] | None = None
    relative: np.ndarray | None = None  # a baseline bundle's features relative to the device's baseline, once learned


class EdgePipeline:
    """Built once per bundle; `run(windows)` judges a batch (one extract, one model run per role)."""

    def __init__(self, manifest: Any, models: Models, pre: Any, gate: Gate) -> None:
        # The bundle's extractor with its parameters, as training ran it (resolved once, not per window).
        self.extract = extractor(manifest.input.extractor, manifest.input.feature_params)
        self.rate_hz = float(manifest.input.rate_hz or 1.0)
        self.feature_names = list(manifest.input.feature_names)
        self.models = models
        self.pre = pre
        self.gate = gate
        self.plausible = Plausibility.from_manifest(manifest)
        self.envelope = EnvelopeCheck.from_manifest(manifest)
        # how long each channel has been still, for a channel stuck only after a run of still windows
        self.still = (StillRuns(len(manifest.input.channels or ()))
                      if self.envelope is not None and self.envelope.counts_runs else None)
        self.attribution = (OodAttribution.for_features(self.feature_names, manifest.input.channels or [])
                            if getattr(models, "has_errors", False) else None)
        self.uses_window = "window" in models.input_kind.values()
        # the device's baseline state (learning, or ready): the agent restores, stores and restarts it
        self.commissioning = Commissioning.from_manifest(manifest)

    def run(self, windows: Sequence[Window]) -> list[Judged]:
        """Judge `windows` in order. A window with an implausible sample is never featurised, one with a
        non-finite feature never reaches a model; both are deferred as `implausible`. One outside the
        envelope runs through the models and is deferred with the envelope's reasons. While a baseline is
        being learned, each window is deferred as `commissioning` (with the envelope's reasons, if any) and
        no model sees it; the plausible ones are what the baseline is learned from, and the windows after the
        one that completes it are judged against it, in the same call."""
        if not windows:
            return []
        one = len(windows) == 1  # the paced path: no copies into a batch
        data = windows[0].data[None] if one else np.stack([w.data for w in windows])
        env = self.envelope
        # per-channel extremes, once, for both checks
        extremes = (data.min(axis=1), data.max(axis=1)) if env is not None and env.checks_channels else None
        runs = None  # every window counts, in order, plausible or not: a stuck sensor is stuck in all of them
        if self.still is not None and env is not None and extremes is not None:
            runs = self.still.update(env.still(*extremes))
        why = self.plausible.windows(data, extremes)
        keep = [i for i, w in enumerate(why) if w is None]
        if len(keep) < len(windows):
            data = data[keep]
        raw = (self.extract(data, self.rate_hz) if keep
               else np.empty((0, len(self.feature_names))))
        learning: dict[int, tuple[str, ...]] = {}  # window index -> envelope reasons, while commissioning
        comm = self.commissioning
        if comm is not None and not comm.ready and keep:
            learning = self._learn(raw, keep, extremes, runs, len(windows))
        if learning:  # the first len(learning) windows of keep (a non-finite one among them is implausible)
            first = len(learning)
            for j, w in enumerate(Plausibility.features(raw[:first], raw[:first], self.feature_names)):
                if w is not None:
                    why[keep[j]] = w
                    del learning[keep[j]]
            all_raw, all_keep = raw, keep
            keep, raw = keep[first:], raw[first:]
        else:
            all_raw, all_keep = raw, keep
        rel = None if comm is None or not len(raw) else comm.relative(raw)  # rows of keep
        feats = self.pre.features(raw if rel is None else rel)
        for j, w in enumerate(Plausibility.features(feats, raw, self.feature_names)):
            if w is not None:
                why[keep[j]] = w
        ok = [j for j, i in enumerate(keep) if why[i] is None]  # rows of raw/feats the models see
        decisions: list[GateDecision | None] = [None] * len(windows)  # None: refused below
        probs: list[np.ndarray | None] = [None] * len(windows)
        second: list[np.ndarray | None] = [None] * len(windows)
        attribution: dict[int, dict[str, float]] = {}
        if ok:
            rows = [keep[j] for j in ok]
            named = None
            if env is not None:
                lo = hi = None
                if extremes is not None:
                    lo, hi = extremes if len(rows) == len(windows) else (extremes[0][rows], extremes[1][rows])
                named = env.reasons(lo, hi, raw if len(ok) == len(raw) else raw[ok],
                                    None if runs is None else runs if len(rows) == len(windows) else runs[rows])
            if len(ok) < len(keep):
                feats = feats[ok]
            win = None
            if self.uses_window:
                win = (self.pre.window(windows[0].data) if one
                       else np.concatenate([self.pre.window(windows[i].data) for i in rows]))
            out = self.models.infer(feats, win)
            if len(rows) == 1:  # the paced path: the same rule on one row's scalars (Gate.decide)
                judged = [self.gate.decide(out.probs[0], None if out.second_probs is None else out.second_probs[0],
                                           None if out.ood_score is None else out.ood_score[0],
                                           None if named is None else named[0])]
            else:
                judged = self.gate.decide_many(out.probs, out.second_probs, out.ood_score, named)
            if self.attribution is not None:
                attribution = self._attribute(judged, rows, feats)
            for k, d in enumerate(judged):
                i = rows[k]
                decisions[i] = d
                probs[i] = out.probs[k]
                second[i] = None if out.second_probs is None else out.second_probs[k]
        for i, named_i in learning.items():
            decisions[i] = self.gate.refuse("commissioning", named_i)
        if len(ok) + len(learning) < len(windows):
            refused = self.gate.refuse("implausible")
            for i, d in enumerate(decisions):
                if d is None:  # with channel checks, the refusal also names the channels outside the envelope
                    named = (env.reasons(extremes[0][i:i + 1], extremes[1][i:i + 1], None,
                                         None if runs is None else runs[i:i + 1])[0]
                             if env is not None and extremes is not None else ())
                    decisions[i] = self.gate.refuse("implausible", named) if named else refused
        features = dict(zip(all_keep, all_raw))
        relatives = {} if rel is None else dict(zip(keep, rel))
        return [Judged(w, features.get(i), probs[i], second[i], decisions[i], why[i],  # type: ignore[arg-type]
                       attribution.get(i), relatives.get(i)) for i, w in enumerate(windows)]

    def restart_stream(self) -> None:
        """Forget what earlier windows said about the next ones (how long each channel has been still): a
        new recording or another device's stream follows. The baseline is the agent's (`commissioning`)."""
        if self.still is not None:
            self.still.reset()

    def _learn(self, raw: np.ndarray, keep: list[int], extremes: tuple[np.ndarray, np.ndarray] | None,
               runs: np.ndarray | None, n: int) -> dict[int, tuple[str, ...]]:
        """Commissioning on one batch: feed the baseline the plausible windows (every sample in the plausible
        range, every feature finite) in order, until it has all it needs. A window outside the envelope is
        learned from too (a machine is not the training fleet: that is why it has a baseline), and the
        envelope's reasons go with its `commissioning` deferral. Returns, for the windows of `keep` up to the
        one that completed it (or all of them), the window index -> the envelope's reasons (() inside it)."""
        comm = self.commissioning
        assert comm is not None
        env = self.envelope
        named: list[tuple[str, ...]] = [()] * len(keep)
        if env is not None:
            lo = hi = None
            if extremes is not None:
                lo, hi = extremes if len(keep) == n else (extremes[0][keep], extremes[1][keep])
            named = env.reasons(lo, hi, raw, None if runs is None else runs if len(keep) == n else runs[keep])
        good = np.flatnonzero(np.isfinite(raw).all(axis=1)).tolist()
        need = comm.needed - comm.learned
        comm.take(raw[good[:need]])
        last = good[need - 1] + 1 if len(good) >= need else len(keep)
        return {keep[j]: named[j] for j in range(last)}

    def _attribute(self, judged: list[GateDecision], rows: list[int], feats: np.ndarray
                   ) -> dict[int, dict[str, float]]:
        """Window index -> attribution of each window the gate deferred as `ood` (one more gate-model run,
        over those rows only: the accepted windows cost nothing)."""
        assert self.attribution is not None
        ood = [k for k, d in enumerate(judged) if "ood" in d.reasons]
        if not ood:
            return {}
        errors = self.models.errors(feats if len(ood) == len(feats) else feats[ood])  # type: ignore[attr-defined]
        if errors is None:
            return {}
        return {rows[k]: a for k, a in zip(ood, self.attribution(errors))}
