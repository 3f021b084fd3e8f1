"""Incidents: the deferred windows of one device that overlap or follow each other within a gap (sensor time)
grouped into one thing a person opens, and the priority that orders them (issue 15).

One rule, `group`, for the hub (edgekit/hub/db.py groups at query time, so every hub process and both
databases give the same incidents from the same rows) and the evaluations (`edgekit eval incidents`,
`review-loop`). Pure: stdlib only; must not import numpy, the hub, onnxruntime or torch.

Priority (0-100, higher first): 100 x (0.5 severity + 0.3 risk + 0.2 age), each term in [0, 1].
    severity  the most severe reason among the incident's windows (SEVERITY: a broken or implausible input
              first, then "unlike the training data", then the models' doubts)
    risk      how far the worst window's gate score went past its threshold (RISK_RULES): ood and
              disagreement score / threshold - 1, confidence 1 - score / threshold; capped at 1
    age       how long the incident has waited since its newest window reached the hub, 1 at AGE_FULL_H
              hours: an old incident rises over time, so nothing waits for ever
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

DEFAULT_GAP_S = 60.0  # deferred windows this close (sensor time, end to next start) are one incident
# Each reason's weight, keyed like gate.REASON_TEXT (the reason up to its first ':'); tests/test_incidents.py
# checks that every reason the gate names has one. A reason this module does not know weighs UNKNOWN_SEVERITY.
SEVERITY = {
    "implausible": 1.0, "non_finite": 1.0,  # numbers no model may answer from
    "stuck": 0.9, "out_of_range": 0.9,  # a channel that broke or left what training saw: a sensor or a process
    "relation": 0.8,  # a channel out of step with the others: a miswired or mis-scaled sensor, or a process
    "feature_range": 0.7,
    "ood": 0.6,  # unlike the training data as a whole
    "disagreement": 0.4, "low_confidence": 0.3,  # the models' doubts about a familiar-looking input
    "commissioning": 0.1,  # the device is still learning its baseline: expected, rarely urgent
}
UNKNOWN_SEVERITY = 0.5
# A window deferred with one of these reasons came while the device learned its baseline: no judgement of the
# model. The windows of a commissioning are incidents of their own, never mixed with the judged windows after
# them. Deferred for these reasons alone (`Incident.learning`: every window so), an incident is ranked after
# every other and waits for no label (a person may look to confirm the machine was healthy then; a label there
# trains no baseline model: it has no features relative to a baseline); one where the envelope also named a
# channel (a sensor stuck or out of range while the baseline was learned on it) waits like any other. The
# review loop's rates and the hub's deferral budget leave learning windows out.
LEARNING = frozenset({"commissioning"})
# score key -> (threshold key, rule): "max" fails above the threshold, "min" below it (edgekit/gate.py).
RISK_RULES = {"ood": ("ood_max_score", "max"), "confidence": ("min_confidence", "min"),
              "disagreement": ("max_disagreement", "max")}
AGE_FULL_H = 24.0
WEIGHTS = {"severity": 0.5, "risk": 0.3, "age": 0.2}


@dataclass(frozen=True)
class Deferred:
    """One deferred window as the grouping needs it: sensor times (None: unknown, the window is an incident
    of its own), reasons, gate scores and thresholds, and when it reached the hub (its clock; None: now).
    `alone`: an incident of its own whatever its times (a screening trial's answer: one person's walk)."""

    id: str
    site: str
    device: str
    start_s: float | None
    end_s: float | None
    reasons: Sequence[str] = ()
    scores: Mapping[str, float] = field(default_factory=dict)
    thresholds: Mapping[str, float] = field(default_factory=dict)
    received_at: float | None = None
    alone: bool = False


@dataclass(frozen=True)
class Incident:
    """Deferred windows of one device, in sensor time order. `id` is its first window's id (the hub also finds
    an incident by any of its windows' ids). `reasons`: reason -> windows that gave it, most frequent
    first; `worst`: per gate score its worst value (highest ood and disagreement, lowest confidence);
    `learning`: its windows were deferred while the device learned its baseline (LEARNING), all of them."""

    id: str
    site: str
    device: str
    start_s: float | None
    end_s: float | None
    window_ids: tuple[str, ...]
    reasons: dict[str, int]
    worst: dict[str, float]
    thresholds: dict[str, float]
    severity: float
    risk: float
    last_received: float | None
    learning: bool = False

    @property
    def windows(self) -> int:
        return len(self.window_ids)

    def age(self, now: float) -> float:
        """0..1: hours waited since the newest window arrived, over AGE_FULL_H."""
        if self.last_received is None:
            return 0.0
        return min(max((now - self.last_received) / 3600.0 / AGE_FULL_H, 0.0), 1.0)

    def priority(self, now: float) -> float:
        """The documented score (module docstring), 0-100, rounded to 0.1."""
        w = WEIGHTS
        return round(100.0 * (w["severity"] * self.severity + w["risk"] * self.risk + w["age"] * self.age(now)), 1)


def reason_kind(reason: str) -> str:
    """`stuck:Current` -> `stuck` (a reason names a channel or feature after its first ':')."""
    return reason.partition(":")[0]


def learning_only(reasons: Iterable[str]) -> bool:
    """Whether a deferred window's reasons are LEARNING's alone (deferred while a baseline was learned)."""
    kinds = {reason_kind(r) for r in reasons}
    return bool(kinds) and kinds <= LEARNING


def commissioning(reasons: Iterable[str]) -> bool:
    """Whether a deferred window came while its device learned its baseline (a LEARNING reason among others)."""
    return any(reason_kind(r) in LEARNING for r in reasons)


def severity(reasons: Iterable[str]) -> float:
    return max((SEVERITY.get(reason_kind(r), UNKNOWN_SEVERITY) for r in reasons), default=0.0)


def risk(worst: Mapping[str, float], thresholds: Mapping[str, float]) -> float:
    """0..1: how far the worst gate score went past its threshold (RISK_RULES), the largest over the scores."""
    out = 0.0
    for key, (tkey, rule) in RISK_RULES.items():
        score, limit = worst.get(key), thresholds.get(tkey)
        if not _finite(score) or not _finite(limit) or limit == 0:
            continue
        assert score is not None and limit is not None
        past = score / limit - 1.0 if rule == "max" else 1.0 - score / limit
        out = max(out, past)
    return min(out, 1.0)


def group(windows: Iterable[Deferred], gap_s: float = DEFAULT_GAP_S) -> list[Incident]:
    """The incidents of `windows` (any devices, any order): per (site, device), windows sorted by start then
    id; a window joins the open incident when it starts at most `gap_s` after the latest end so far (an
    overlap starts before it) and is as the incident's windows are, deferred while a baseline was learned
    (`commissioning`) or not; else it opens the next. A window without times, or `alone`, is an incident of
    its own.
    Every window is in exactly one incident. Returned per device in sensor time order, devices sorted."""
    if not (gap_s >= 0 and math.isfinite(gap_s)):
        raise ValueError(f"gap_s must be a finite number >= 0 (got {gap_s!r})")
    timed: dict[tuple[str, str], list[Deferred]] = {}
    untimed: list[Deferred] = []
    for w in windows:
        if _finite(w.start_s) and _finite(w.end_s) and not w.alone:
            timed.setdefault((w.site, w.device), []).append(w)
        else:
            untimed.append(w)
    out: list[Incident] = []
    for key in sorted(timed):
        rows = sorted(timed[key], key=lambda w: (w.start_s, w.id))
        run: list[Deferred] = []
        end = -math.inf
        run_learning = False
        for w in rows:
            assert w.start_s is not None and w.end_s is not None
            learning = commissioning(w.reasons)
            if run and (w.start_s > end + gap_s or learning != run_learning):
                out.append(_incident(run))
                run, end = [], -math.inf
            run.append(w)
            run_learning = learning
            end = max(end, w.end_s)
        if run:
            out.append(_incident(run))
    out.extend(_incident([w]) for w in sorted(untimed, key=lambda w: (w.site, w.device, w.id)))
    return out


def ranked(incidents: Iterable[Incident], now: float) -> list[Incident]:
    """Highest priority first, incidents of a baseline being learned after every other; ties: the most recent
    in sensor time first, then by id."""
    return sorted(incidents, key=lambda i: (i.learning, -i.priority(now), -(i.end_s if _finite(i.end_s) else -math.inf),
                                            i.id))


def _incident(run: list[Deferred]) -> Incident:
    counts: dict[str, int] = {}
    worst: dict[str, float] = {}
    thresholds: dict[str, float] = {}
    for w in run:
        for r in dict.fromkeys(w.reasons):
            counts[r] = counts.get(r, 0) + 1
        for key, value in w.scores.items():
            if not _finite(value):
                continue
            rule = RISK_RULES.get(key, ("", "max"))[1]
            if key not in worst or (value < worst[key] if rule == "min" else value > worst[key]):
                worst[key] = float(value)
        for key, value in w.thresholds.items():
            if _finite(value):
                thresholds.setdefault(key, float(value))  # one model version's thresholds: the first window's
    first = run[0]
    ends = [w.end_s for w in run if _finite(w.end_s)]
    received = [w.received_at for w in run if _finite(w.received_at)]
    reasons = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return Incident(
        id=first.id, site=first.site, device=first.device, start_s=first.start_s,
        end_s=max(ends) if ends else None, window_ids=tuple(w.id for w in run), reasons=reasons, worst=worst,
        thresholds=thresholds, severity=severity(counts), risk=risk(worst, thresholds),
        last_received=max(received) if received else None, learning=all(learning_only(w.reasons) for w in run))


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
