"""The gate: accept a window's prediction, or defer it to a person with the reasons and the scores.

One rule (`Gate.rule`), run by the agent on every window (`decide_many` on a batch, `decide` on a lone
window, with the same scores bit for bit) and by export calibration (exporters/export/calibrate.py
`accept_mask`, through `verdicts`) on the calibration and held-out splits, so both accept the same rows on
the same scores (tests/test_gate.py). Checks against thresholds calibrated at export (manifest
`thresholds`):
    ood             autoencoder reconstruction error > ood_max_score   (input unlike the training data)
    disagreement    total variation distance between predictor and second opinion > max_disagreement
    low_confidence  predictor's top probability < min_confidence
    non_finite      a probability or score is NaN or infinite: NaN compares false both ways, so a rule
                    written `score > threshold -> defer` would accept it (FIELD-NOTES.md, "Gates and numbers")
and two the agent applies before any model runs:
    implausible     a sample outside the bundle's plausible range, or a non-finite feature (edgekit/plausible.py)
    commissioning   a bundle with a per-machine baseline is still learning this device's normal from its first
                    windows (edgekit/baseline.py): no model may answer before it knows that normal
and the input envelope (edgekit/plausible.py EnvelopeCheck, manifest `input.envelope`), whose mask the rule
takes as `outside`: a window outside what the training data showed is deferred whatever the models say, with
reasons that name the channel or feature (`stuck:<channel>`, `out_of_range:<channel>`,
`feature_range:<feature>`, `relation:<channel>`) in place of the mask's name `envelope`.
`non_finite`, `implausible` and `commissioning` defer even when the gate is disabled: disabling the gate turns off the
judgement calls (the envelope is one), never the refusal to answer from numbers that are not numbers.
Must not import onnxruntime, paho or torch: it only compares numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgekit.values import GateDecision

REASONS = ("implausible", "envelope", "ood", "disagreement", "low_confidence", "non_finite")
ALWAYS = ("implausible", "non_finite", "commissioning")  # deferred whatever `enabled` says
# Each reason in plain words, for the people who read it (the station screen, the hub's pages); the key is
# the reason up to its first ':' (a reason may name a channel after it).
REASON_TEXT = {
    "implausible": "a reading was outside anything the sensor can plausibly give",
    "stuck": "a channel stopped moving, unlike in any training recording (a stuck or dead sensor?)",
    "out_of_range": "a channel read outside the range the training data showed",
    "feature_range": "a feature of the window was outside the range the training data showed",
    "relation": "a channel did not move with the others as in the training data (a gain, a swapped wire?)",
    "ood": "the input was unlike anything the model learned from",
    "disagreement": "the model and the second opinion disagreed",
    "low_confidence": "the model was not confident enough",
    "non_finite": "the model's numbers were not numbers (NaN or infinite)",
    "commissioning": "the device was still learning this machine's normal (its baseline)",
}


def reason_words(reason: str) -> str:
    """One reason in plain words (REASON_TEXT), with what it names after its ':' (a channel or a feature):
    'out_of_range:Pressure' -> 'a channel read outside the range the training data showed: Pressure'. A
    reason this version does not know is returned as sent."""
    key, _, named = reason.partition(":")
    words = REASON_TEXT.get(key)
    if words is None:
        return reason
    return f"{words}: {named}" if named else words


def confidence(probs: np.ndarray) -> np.ndarray:
    """Top-class probability per row."""
    return probs.max(axis=-1)


def disagreement(probs: np.ndarray, second_probs: np.ndarray) -> np.ndarray:
    """Total variation distance between two probability vectors per row (0 = same, 1 = disjoint)."""
    return 0.5 * np.abs(probs - second_probs).sum(axis=-1)


@dataclass(frozen=True, slots=True)
class Verdicts:
    """The gate's rule applied to n rows: the scores and one boolean mask per reason (True = defer)."""

    confidence: np.ndarray  # (n,)
    ood: np.ndarray | None  # (n,) or None without an autoencoder
    disagreement: np.ndarray | None  # (n,) or None without a second opinion
    masks: dict[str, np.ndarray]  # reason -> (n,) bool, in REASONS order

    @property
    def accept(self) -> np.ndarray:
        """(n,) True where no reason defers the row."""
        out = np.ones(len(self.confidence), dtype=bool)
        for mask in self.masks.values():
            out &= ~mask
        return out


@dataclass(frozen=True)
class Gate:
    ood_max_score: float
    min_confidence: float
    max_disagreement: float
    enabled: bool = True
    defer_all: bool = False  # export could certify no threshold for the target error: a person decides all

    def __post_init__(self) -> None:
        for name in ("ood_max_score", "min_confidence", "max_disagreement"):
            value = getattr(self, name)
            if not np.isfinite(value):
                raise ValueError(f"Gate.{name} must be finite (got {value!r})")

    @classmethod
    def from_thresholds(cls, thresholds: dict, *, enabled: bool = True) -> Gate:
        """From a manifest's (or calibration's) thresholds dict."""
        return cls(float(thresholds["ood_max_score"]), float(thresholds["min_confidence"]),
                   float(thresholds["max_disagreement"]), enabled=enabled,
                   defer_all=bool(thresholds.get("defer_all", False)))

    @property
    def thresholds(self) -> dict[str, float]:
        return {"ood_max_score": float(self.ood_max_score), "min_confidence": float(self.min_confidence),
                "max_disagreement": float(self.max_disagreement)}

    def rule(self, conf: Any, ood: Any, dis: Any, finite: Any, no: Any, outside: Any = None) -> dict[str, Any]:
        """THE rule, once: reason -> defer? for scores that are n-row arrays (`verdicts`) or one row's scalars
        (`decide`). `ood`/`dis` None when that model is absent; `finite` whether every probability and score
        is a number; `no` the all-False value of the kind (np.zeros(n, bool) or False); `outside` whether the
        input left the bundle's envelope (None: no envelope). Written with `<=`, `>=` and `^` only, which act
        alike on arrays and scalars, so that NaN fails each comparison and defers (`(x <= t) ^ True`)."""
        yes = no ^ True
        masks = {
            "implausible": no,
            "envelope": no if outside is None else outside,
            "ood": no if ood is None else (ood <= self.ood_max_score) ^ True,
            "disagreement": no if dis is None else (dis <= self.max_disagreement) ^ True,
            "low_confidence": yes if self.defer_all else (conf >= self.min_confidence) ^ True,
            "non_finite": finite ^ True,
        }
        if not self.enabled:
            masks = {r: (m if r in ALWAYS else no) for r, m in masks.items()}
        return masks

    def verdicts(self, probs: np.ndarray, second_probs: np.ndarray | None,
                 ood_score: np.ndarray | None, outside: np.ndarray | None = None) -> Verdicts:
        """The rule on n rows: `probs` (n, K), `second_probs` (n, K) or None, `ood_score` (n,) or None,
        `outside` (n,) bool (the envelope's mask) or None. Any non-finite probability or score defers as
        `non_finite` on its own."""
        probs = np.asarray(probs)
        conf = confidence(probs)
        n = len(conf)
        ood = dis = None
        finite = np.isfinite(probs).all(axis=-1)
        if ood_score is not None:
            ood = np.asarray(ood_score).reshape(n)
            finite &= np.isfinite(ood)
        if second_probs is not None:
            second_probs = np.asarray(second_probs)
            dis = disagreement(probs, second_probs)
            finite &= np.isfinite(second_probs).all(axis=-1)
        if outside is not None:
            outside = np.asarray(outside, dtype=bool).reshape(n)
        # `no` is shared by the reasons that cannot apply (never written to)
        return Verdicts(conf, ood, dis, self.rule(conf, ood, dis, finite, np.zeros(n, dtype=bool), outside))

    def decide_many(self, probs: np.ndarray, second_probs: np.ndarray | None,
                    ood_score: np.ndarray | None, envelope: list[tuple[str, ...]] | None = None
                    ) -> list[GateDecision]:
        """`verdicts` as one GateDecision per row (scores as Python floats). `envelope`: per row the reasons
        naming what left the bundle's envelope (edgekit/plausible.py EnvelopeCheck.reasons; () inside it), or
        None without one; they stand in the decision where the rule says `envelope`."""
        outside = None if envelope is None else np.fromiter(map(bool, envelope), dtype=bool, count=len(envelope))
        v = self.verdicts(probs, second_probs, ood_score, outside)
        flags = [(r, m.tolist()) for r, m in v.masks.items()]
        conf = v.confidence.tolist()
        ood = None if v.ood is None else v.ood.tolist()
        dis = None if v.disagreement is None else v.disagreement.tolist()
        th = self.thresholds
        out = []
        for i, c in enumerate(conf):
            scores = {"confidence": c}
            if ood is not None:
                scores["ood"] = ood[i]
            if dis is not None:
                scores["disagreement"] = dis[i]
            reasons = tuple(r for r, m in flags if m[i])
            if envelope is not None and envelope[i] and "envelope" in reasons:
                reasons = _named(reasons, envelope[i])
            out.append(GateDecision("defer" if reasons else "accept", reasons, scores, th))
        return out

    def decide(self, probs: np.ndarray, second_probs: np.ndarray | None, ood_score: float | None,
               envelope: tuple[str, ...] | None = None) -> GateDecision:
        """One window: `probs` (K,), `second_probs` (K,) or None, the autoencoder score or None, the envelope's
        reasons (None without one). The same rule and the same numpy reductions as `decide_many` on one row
        (the same scores, bit for bit), without its per-batch arrays: a few microseconds instead of tens on
        the paced, window-at-a-time path."""
        probs = np.asarray(probs)
        conf = probs.max(axis=-1)
        finite = bool(np.isfinite(probs).all())
        scores = {"confidence": float(conf)}
        dis = None
        ood = None
        if ood_score is not None:
            ood = np.asarray(ood_score)[()]  # a numpy scalar of its dtype: compared as the batch compares it
            finite = finite and math.isfinite(ood)
            scores["ood"] = float(ood)
        if second_probs is not None:
            second_probs = np.asarray(second_probs)
            dis = disagreement(probs, second_probs)
            finite = finite and bool(np.isfinite(second_probs).all())
            scores["disagreement"] = float(dis)
        masks = self.rule(conf, ood, dis, finite, False, None if envelope is None else bool(envelope))
        reasons = tuple(r for r, m in masks.items() if m)
        if envelope and "envelope" in reasons:
            reasons = _named(reasons, envelope)
        return GateDecision("defer" if reasons else "accept", reasons, scores, self.thresholds)

    def refuse(self, reason: str, envelope: tuple[str, ...] = ()) -> GateDecision:
        """The decision for a window no model may see (`implausible`, `commissioning`): deferred, no scores;
        `envelope` the envelope's reasons naming the channels outside it, after `reason` (left out with the gate
        disabled, which turns the envelope off)."""
        if reason not in ALWAYS:
            raise ValueError(f"Gate.refuse takes one of {ALWAYS} (got {reason!r})")
        return GateDecision("defer", (reason, *(envelope if self.enabled else ())), {}, self.thresholds)


def _named(reasons: tuple[str, ...], envelope: tuple[str, ...]) -> tuple[str, ...]:
    """`reasons` with the envelope's named reasons in place of `envelope`."""
    i = reasons.index("envelope")
    return reasons[:i] + envelope + reasons[i + 1:]


# Names in an `ood` deferral's attribution: a person looks at the first two or three, and the hub keeps them
# beside the case.
ATTRIBUTION_TOP = 3


@dataclass(frozen=True)
class OodAttribution:
    """What an `ood` deferral's autoencoder error is made of: per row, the share (0..1) of the squared
    reconstruction error (the gate model's `errors` output, one column per feature, whose mean is the `ood`
    score) that each channel's features ('<channel>.<stat>', summed) and each feature of no single channel
    (e.g. 'acc_mag.std') account for; the `top` largest, largest first. Built once per bundle."""

    names: tuple[str, ...]  # the groups: channels, then derived features
    member: np.ndarray  # (F, G) 1.0 where feature f belongs to group g
    top: int = ATTRIBUTION_TOP

    @classmethod
    def for_features(cls, feature_names: list[str] | tuple[str, ...], channels: list[str] | tuple[str, ...],
                     top: int = ATTRIBUTION_TOP) -> OodAttribution:
        groups: list[str] = []
        of: list[int] = []
        for name in feature_names:
            head = name.rsplit(".", 1)[0]
            group = head if head in channels else name
            if group not in groups:
                groups.append(group)
            of.append(groups.index(group))
        member = np.zeros((len(feature_names), len(groups)))
        member[np.arange(len(feature_names)), of] = 1.0
        return cls(tuple(groups), member, top)

    def __call__(self, errors: np.ndarray) -> list[dict[str, float]]:
        """(n, F) squared errors -> per row {channel or feature: share}, the `top` largest shares (a row whose
        error is 0 or not finite gets {})."""
        errors = np.asarray(errors, dtype=np.float64)
        by_group = errors @ self.member
        total = by_group.sum(axis=1, keepdims=True)
        ok = np.isfinite(total[:, 0]) & (total[:, 0] > 0)
        shares = np.divide(by_group, total, out=np.zeros_like(by_group), where=ok[:, None])
        order = np.argsort(-shares, axis=1, kind="stable")[:, :self.top]
        out: list[dict[str, float]] = []
        for i, row in enumerate(order.tolist()):
            out.append({self.names[g]: float(shares[i, g]) for g in row} if ok[i] else {})
        return out
