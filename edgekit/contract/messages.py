"""The MQTT messages as typed values: one class per payload kind, one `encode` (the agent and its transport)
and one parse (the hub), so a field exists once and a change to it breaks both sides' tests.

    Result       one window's answer (accept, or defer with reasons)                    result topic
    ResultBatch  many results of one device in one message (bytes joined, not re-encoded) result topic
    Review       a deferred Result plus its features and a downsampled signal           review topic
    Trial        a gait trial's summary (edgekit.gait.segment), or why there is none,   trial topic
                 and the participant's pseudonym
    Status       retained online/offline (and the last will)                            status topic
    Metrics      the agent's counters                                                   metrics topic
    BundleCommand  the bundle a device should run, retained (issue 16; Status.rollout     command/bundle
                 says how its rollout went)

Encoding keeps the key order and the optional keys the agent always wrote, so payloads of schema /1 are
byte-for-byte what they were (tests/test_contract.py). Parsing is the hub's validation: `parse(topic,
payload)` raises DataError for a malformed payload and IdentityError (a DataError) for one that does not
belong to its topic's site and device. Classes are slotted but not frozen: a frozen dataclass of ~18 fields
costs ~3 us more per result on the agent's path; treat them as immutable. Must not import paho, onnxruntime
or torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from edgekit import topics
from edgekit.errors import DataError, IdentityError

Decision = Literal["accept", "defer"]
INT_MAX = 2**63 - 1  # what the hub's INTEGER columns hold (SQLite and PostgreSQL bigint)
TEXT_MAX = 128  # ids, labels, model versions: what the hub's columns hold
LONG_TEXT_MAX = 2000  # reasons and errors people read


# --- field checks (raise DataError naming the field) ------------------------------------------------


def _num(obj: dict[str, Any], key: str, kind: type = float, required: bool = False) -> Any:
    value = obj.get(key)
    if value is None:
        if required:
            raise DataError(f"{key} is missing")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{key} must be a number (got {value!r:.80})")
    if kind is int and not (isinstance(value, int) and -INT_MAX <= value <= INT_MAX):
        raise DataError(f"{key} must be an integer within +-2**63 (got {value!r:.40})")
    return kind(value)


def _text(obj: dict[str, Any], key: str, limit: int = TEXT_MAX) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise DataError(f"{key} must be a string of at most {limit} characters (got {value!r:.80})")
    return value


def _object(obj: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, dict):
        raise DataError(f"{key} must be an object (got {value!r:.80})")
    return value


def _owner(obj: dict[str, Any], site: str, device: str, named_only: bool = False) -> None:
    """IdentityError unless the object names the topic's site and device (with `named_only`, unless each
    one it names is the topic's: status and metrics may leave them out)."""
    for key, want in (("site", site), ("device", device)):
        if (key in obj or not named_only) and obj.get(key) != want:
            raise IdentityError(f"{key} {obj.get(key)!r:.60} is not the topic's {want!r}")


def _keyed(obj: dict[str, Any], site: str, device: str) -> tuple[str, int]:
    """(id, seq) of a result, review or trial that is the topic device's own, else IdentityError."""
    _owner(obj, site, device)
    try:
        seq = topics.parse_result_id(obj.get("id"), device)
    except DataError as exc:
        raise IdentityError(exc.message) from None
    if seq > INT_MAX:
        raise IdentityError(f"id's sequence {seq} is past 2**63 - 1")
    got = obj.get("seq")
    if isinstance(got, bool) or not isinstance(got, int) or got != seq:
        raise IdentityError(f"seq {got!r:.40} is not the id's sequence {seq}")
    return obj["id"], seq


# --- result, review, batch --------------------------------------------------------------------------


@dataclass(slots=True)
class SecondOpinion:
    label: str
    probs: dict[str, float]


@dataclass(slots=True)
class Result:
    """One window's answer. `label`/`confidence` are None and `probs` empty when no model saw the window
    (`implausible` says why); `replayed` is set by the transport on a re-sent message, not by the agent."""

    id: str
    seq: int
    site: str
    device: str
    ts: float
    start_s: float | None
    end_s: float | None
    model_version: str | None
    task: str | None
    label: str | None
    confidence: float | None
    probs: dict[str, float]
    decision: Decision
    reasons: list[str]
    scores: dict[str, float]
    thresholds: dict[str, float]
    second_opinion: SecondOpinion | None = None
    implausible: str | None = None
    # An `ood` deferral's make-up: channel or feature -> its share (0..1) of the autoencoder's error, at most
    # ATTRIBUTION_MAX, largest first (gate.OodAttribution). Absent when None, so results without one keep
    # their bytes; an older hub ignores the key.
    attribution: dict[str, float] | None = None
    replayed: bool = False

    SCHEMA = topics.SCHEMA_RESULT

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "schema": self.SCHEMA, "id": self.id, "seq": self.seq, "site": self.site, "device": self.device,
            "ts": self.ts, "window": {"start_s": self.start_s, "end_s": self.end_s},
            "model_version": self.model_version, "task": self.task, "label": self.label,
            "confidence": self.confidence, "probs": self.probs, "decision": self.decision,
            "reasons": self.reasons, "scores": self.scores, "thresholds": self.thresholds,
        }
        if self.implausible is not None:
            obj["implausible"] = self.implausible
        if self.second_opinion is not None:
            obj["second_opinion"] = {"label": self.second_opinion.label, "probs": self.second_opinion.probs}
        if self.attribution is not None:
            obj["attribution"] = self.attribution
        if self.replayed:
            obj["replayed"] = True
        return obj

    def encode(self) -> bytes:
        return topics.encode(self.to_obj())

    @classmethod
    def from_obj(cls, obj: dict[str, Any], site: str, device: str, replayed: bool = False) -> Result:
        rid, seq = _keyed(obj, site, device)
        decision = obj.get("decision")
        if decision not in ("accept", "defer"):
            raise DataError(f"decision must be accept or defer (got {decision!r:.40})")
        reasons = obj.get("reasons") or []
        if not isinstance(reasons, list) or not all(isinstance(r, str) and r and "," not in r and
                                                    len(r) <= TEXT_MAX for r in reasons):
            raise DataError(f"reasons must be a list of names (got {reasons!r:.80})")
        window = _object(obj, "window") or {}
        maps = {key: _object(obj, key) or {} for key in ("probs", "scores", "thresholds")}
        second = _object(obj, "second_opinion")
        if second is not None and (_text(second, "label") is None or not isinstance(second.get("probs"), dict)):
            raise DataError(f"second_opinion must have a label and probs (got {second!r:.80})")
        return cls(
            id=rid, seq=seq, site=site, device=device, ts=_num(obj, "ts", required=True),
            start_s=_num(window, "start_s"), end_s=_num(window, "end_s"),
            model_version=_text(obj, "model_version"), task=_text(obj, "task", 64), label=_text(obj, "label"),
            confidence=_num(obj, "confidence"), probs=maps["probs"], decision=decision, reasons=reasons,
            scores=maps["scores"], thresholds=maps["thresholds"],
            second_opinion=None if second is None else SecondOpinion(second.get("label"), second.get("probs")),
            implausible=_text(obj, "implausible", LONG_TEXT_MAX), attribution=_attribution(obj),
            replayed=bool(replayed or obj.get("replayed")),
        )


ATTRIBUTION_MAX = 3  # entries of a result's attribution (gate.ATTRIBUTION_TOP sends 3)


def _attribution(obj: dict[str, Any]) -> dict[str, float] | None:
    """A result's `attribution`: None, or at most ATTRIBUTION_MAX names (<= TEXT_MAX characters) -> a finite
    share in [0, 1]."""
    found = _object(obj, "attribution")
    if found is None:
        return None
    if len(found) > ATTRIBUTION_MAX or not all(isinstance(k, str) and 0 < len(k) <= TEXT_MAX for k in found):
        raise DataError(f"attribution must name at most {ATTRIBUTION_MAX} channels or features "
                        f"(got {len(found)} keys)")
    for key in found:
        share = _num(found, key)
        if share is None or not 0.0 <= share <= 1.0:
            raise DataError(f"attribution[{key!r:.40}] must be a share from 0 to 1 (got {share!r:.20})")
    return found


@dataclass(slots=True)
class Signal:
    """The deferred window for the reviewer's plot: per channel, at most `gate.downsample_points` means.
    `units` (per channel, '' when unknown) and `ranges` (per channel [low, high]: what the training windows
    covered, the bundle's input envelope) let the page name and shade them; both absent when None (an older
    hub ignores them)."""

    channels: list[str]
    rate_hz: float | None
    start_s: float | None
    points: list[list[float | None]]
    units: list[str] | None = None
    ranges: list[list[float]] | None = None

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"channels": self.channels, "rate_hz": self.rate_hz, "start_s": self.start_s,
                               "points": self.points}
        if self.units is not None:
            obj["units"] = self.units
        if self.ranges is not None:
            obj["ranges"] = self.ranges
        return obj

    @classmethod
    def from_obj(cls, signal: Any) -> Signal:
        if not isinstance(signal, dict) or not isinstance(signal.get("points"), list):
            raise DataError("signal must be an object with points")
        channels = signal.get("channels") or []
        if not isinstance(channels, list):
            raise DataError(f"signal.channels must be a list (got {channels!r:.80})")
        units = signal.get("units")
        if units is not None and (not isinstance(units, list) or len(units) != len(channels) or
                                  not all(isinstance(u, str) and len(u) <= UNIT_MAX for u in units)):
            raise DataError(f"signal.units must be one text of at most {UNIT_MAX} characters per channel "
                            f"(got {units!r:.80})")
        ranges = signal.get("ranges")
        if ranges is not None and (not isinstance(ranges, list) or len(ranges) != len(channels) or
                                   not all(_low_high(r) for r in ranges)):
            raise DataError(f"signal.ranges must be one [low, high] of finite numbers per channel (got {ranges!r:.80})")
        return cls(channels, _num(signal, "rate_hz"), _num(signal, "start_s"), signal["points"], units, ranges)


UNIT_MAX = 32  # a channel's unit ("m/s^2", "l/min")


def _low_high(pair: Any) -> bool:
    return (isinstance(pair, list) and len(pair) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in pair)
            and pair[0] <= pair[1])


@dataclass(slots=True)
class Review:
    """A deferred result with what a person needs to judge it; stored as a result with its review.
    `percentiles`: each feature's place in the bundle's training population (0-100, edgekit/population.py),
    absent when None (a bundle without a population; an older hub ignores the key). `relative`: for a bundle
    with a per-machine baseline, the features relative to this device's baseline (edgekit/baseline.py
    `relative`: what the models read before the bundle's normalisation), so a reviewed case can retrain a
    baseline recipe; absent when None (no baseline, or the window came before it was learned)."""

    result: Result
    features: dict[str, float | None]
    signal: Signal
    percentiles: dict[str, float] | None = None
    relative: dict[str, float | None] | None = None

    SCHEMA = topics.SCHEMA_REVIEW

    @property
    def site(self) -> str:
        return self.result.site

    @property
    def device(self) -> str:
        return self.result.device

    def to_obj(self) -> dict[str, Any]:
        obj = self.result.to_obj()
        obj["schema"] = self.SCHEMA
        obj["features"] = self.features
        obj["signal"] = self.signal.to_obj()
        if self.percentiles is not None:
            obj["percentiles"] = self.percentiles
        if self.relative is not None:
            obj["relative"] = self.relative
        return obj

    def encode(self) -> bytes:
        return topics.encode(self.to_obj())

    @classmethod
    def from_obj(cls, obj: dict[str, Any], site: str, device: str) -> Review:
        result = Result.from_obj(obj, site, device)
        features, signal = obj.get("features"), obj.get("signal")
        if not isinstance(features, dict):
            raise DataError(f"features must be an object (got {features!r:.80})")
        placed = _object(obj, "percentiles")
        if placed is not None:
            for key in placed:
                value = _num(placed, key)
                if value is None or not 0.0 <= value <= 100.0:
                    raise DataError(f"percentiles[{key!r:.40}] must be from 0 to 100 (got {value!r:.20})")
        relative = _object(obj, "relative")
        if relative is not None:
            for key, value in relative.items():
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    raise DataError(f"relative[{key!r:.40}] must be a number or null (got {value!r:.20})")
        return cls(result, features, Signal.from_obj(signal), placed, relative)


@dataclass(slots=True)
class ResultBatch:
    """Results of one device in one message. `encoded` joins already-encoded results without re-encoding."""

    site: str
    device: str
    results: list[Result]
    replayed: bool = False

    SCHEMA = topics.SCHEMA_RESULT_BATCH

    @staticmethod
    def encoded(site: str, device: str, results: list[bytes]) -> bytes:
        return topics.batch(site, device, results)

    def encode(self) -> bytes:
        body = self.encoded(self.site, self.device, [r.encode() for r in self.results])
        return topics.mark_replayed(body) if self.replayed else body

    @classmethod
    def from_obj(cls, obj: dict[str, Any], site: str, device: str) -> ResultBatch:
        _owner(obj, site, device)
        items = obj.get("results")
        if not isinstance(items, list):
            raise DataError("results must be a list")
        for i, item in enumerate(items):  # every result's identity before any field: a spoof is a spoof
            if isinstance(item, dict):
                try:
                    _keyed(item, site, device)
                except IdentityError as exc:
                    raise IdentityError(f"results[{i}] {exc.message}") from None
        replayed = bool(obj.get("replayed"))
        out = []
        for item in items:
            if not isinstance(item, dict):
                raise DataError(f"each result must be an object (got {item!r:.60})")
            out.append(Result.from_obj(item, site, device, replayed))
        return cls(site, device, out, replayed)


# --- trial, status, metrics -------------------------------------------------------------------------


@dataclass(slots=True)
class TrialSpan:
    start_s: float | None
    end_s: float | None
    samples: int
    rate_hz: float
    closed_by: str  # operator | still | end | stop | max_duration (edgekit/trials.py)
    started_by: str | None = None  # operator | movement | source; /3 on (None in older payloads)


@dataclass(frozen=True, slots=True)
class TrialAnswer:
    """A trial bundle's answer for one walked test: the predictor's label and probabilities on the trial's
    registry features (edgekit/trial_features.py), the gate's decision with its reasons and scores, and the
    features themselves, so a clinician sees what the answer stands on; `percentiles` places each feature in
    the bundle's training population (0-100, edgekit/population.py; empty when the bundle has none).
    `referred`: the answer sends the person on (deferred to a clinician, or a label other than the bundle's
    normal one). Schema /3 added `percentiles` and `referred`."""

    label: str | None
    confidence: float | None
    probs: dict[str, float]
    decision: Decision
    reasons: list[str]
    scores: dict[str, float]
    features: dict[str, float]
    percentiles: dict[str, float] = field(default_factory=dict)
    referred: bool = False  # deferred, or a label other than the bundle's normal one: a clinician should see it

    KEYS_V2 = frozenset({"label", "confidence", "probs", "decision", "reasons", "scores", "features"})
    KEYS = KEYS_V2 | {"percentiles", "referred"}

    def to_obj(self) -> dict[str, Any]:
        return {"label": self.label, "confidence": self.confidence, "probs": self.probs, "decision": self.decision,
                "reasons": self.reasons, "scores": self.scores, "features": self.features,
                "percentiles": self.percentiles, "referred": self.referred}

    @classmethod
    def from_obj(cls, obj: dict[str, Any], schema: str) -> TrialAnswer:
        _known(obj, cls.KEYS_V2 if schema == topics.SCHEMA_TRIAL_V2 else cls.KEYS, f"{schema} answer")
        decision = obj.get("decision")
        if decision not in ("accept", "defer"):
            raise DataError(f"answer.decision must be 'accept' or 'defer' (got {decision!r:.40})")
        reasons = obj.get("reasons") or []
        if not isinstance(reasons, list) or not all(isinstance(r, str) and len(r) <= 64 for r in reasons):
            raise DataError("answer.reasons must be a list of short strings")
        maps = {k: _object(obj, k) or {} for k in ("probs", "scores", "features", "percentiles")}
        for mapping in maps.values():
            for key in mapping:
                _num(mapping, key)
        return cls(label=_text(obj, "label", 64), confidence=_num(obj, "confidence"), probs=maps["probs"],
                   decision=decision, reasons=reasons, scores=maps["scores"], features=maps["features"],
                   percentiles=maps["percentiles"], referred=obj.get("referred") is True)


@dataclass(slots=True)
class Trial:
    """A gait trial's summary: walk and turn times (s from the trial's first sample), phases, steps,
    cadence; or `error` when segmentation refused the samples (then the other fields are absent).

    `participant` is the pseudonym of the person who walked it (edgekit/privacy.py), or None. Trials carry
    personal data, so their parser refuses what it does not know: a value of `participant` that is not a
    pseudonym (a name cannot travel there), and any key that is not a field (a "name" cannot travel
    beside it). `answer` is a trial bundle's answer (TrialAnswer), or `not_scored` says why the trial could
    not be scored (e.g. 'too_short: ...'). `signal` is the whole trial downsampled (Signal: the IMU channels,
    `start_s` = trial.start_s), sent with a referral, a deferred answer or a trial not scored, so the
    reviewer sees the walk; the phases are the walk/turn times above. Schema /2 added `participant`, `answer`
    and `not_scored`, /3 (topics.SCHEMA_TRIAL) `signal`, the answer's `percentiles` and the span's `started_by`; /1 and /2 payloads
    are read as before."""

    id: str
    seq: int
    site: str
    device: str
    ts: float
    model_version: str | None
    task: str | None
    trial: TrialSpan
    error: str | None = None
    walk_start_s: float | None = None
    walk_end_s: float | None = None
    turn_start_s: float | None = None
    turn_end_s: float | None = None
    steps: int | None = None
    cadence_spm: float | None = None
    phase_s: dict[str, float | None] = field(default_factory=dict)
    step_times_s: list[float] = field(default_factory=list)
    reason: str | None = None
    participant: str | None = None
    answer: TrialAnswer | None = None
    not_scored: str | None = None
    signal: Signal | None = None
    replayed: bool = False

    SCHEMA = topics.SCHEMA_TRIAL
    SEGMENT_KEYS = ("walk_start_s", "walk_end_s", "turn_start_s", "turn_end_s", "steps", "cadence_spm",
                    "phase_s", "step_times_s")
    SPAN_KEYS_V2 = frozenset({"start_s", "end_s", "samples", "rate_hz", "closed_by"})
    SPAN_KEYS = SPAN_KEYS_V2 | {"started_by"}
    KEYS_V1 = frozenset({"schema", "id", "seq", "site", "device", "ts", "model_version", "task", "trial", "error",
                         *SEGMENT_KEYS, "reason", "replayed"})
    KEYS_V2 = KEYS_V1 | {"participant", "answer", "not_scored"}
    KEYS = {topics.SCHEMA_TRIAL_V1: KEYS_V1, topics.SCHEMA_TRIAL_V2: KEYS_V2,
            topics.SCHEMA_TRIAL: KEYS_V2 | {"signal"}}

    def to_obj(self) -> dict[str, Any]:
        t = self.trial
        obj: dict[str, Any] = {
            "schema": self.SCHEMA, "id": self.id, "seq": self.seq, "site": self.site, "device": self.device,
            "ts": self.ts, "model_version": self.model_version, "task": self.task, "participant": self.participant,
            "trial": {"start_s": t.start_s, "end_s": t.end_s, "samples": t.samples, "rate_hz": t.rate_hz,
                      "closed_by": t.closed_by, **({"started_by": t.started_by} if t.started_by else {})},
        }
        if self.error is not None:
            obj["error"] = self.error
        else:
            obj.update({k: getattr(self, k) for k in self.SEGMENT_KEYS})
            if self.reason is not None:
                obj["reason"] = self.reason
        if self.answer is not None:
            obj["answer"] = self.answer.to_obj()
        if self.not_scored is not None:
            obj["not_scored"] = self.not_scored
        if self.signal is not None:
            obj["signal"] = self.signal.to_obj()
        if self.replayed:
            obj["replayed"] = True
        return obj

    def encode(self) -> bytes:
        return topics.encode(self.to_obj())

    @classmethod
    def from_obj(cls, obj: dict[str, Any], site: str, device: str) -> Trial:
        rid, seq = _keyed(obj, site, device)
        _known(obj, cls.KEYS[obj["schema"]], obj["schema"])
        participant = obj.get("participant")
        if participant is not None:
            topics.parse_pseudonym(participant)
        steps = _num(obj, "steps", int)
        span = _object(obj, "trial") or {}
        _known(span, cls.SPAN_KEYS if obj["schema"] == cls.SCHEMA else cls.SPAN_KEYS_V2, f"{obj['schema']} trial")
        phase = _object(obj, "phase_s") or {}
        for key in phase:
            _num(phase, key)
        times = obj.get("step_times_s") or []
        if not isinstance(times, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                  for x in times):
            raise DataError(f"step_times_s must be a list of numbers (got {times!r:.80})")
        samples = _num(span, "samples", int)
        answer = _object(obj, "answer")
        signal = obj.get("signal")
        return cls(
            id=rid, seq=seq, site=site, device=device, ts=_num(obj, "ts", required=True),
            model_version=_text(obj, "model_version"), task=_text(obj, "task", 64),
            trial=TrialSpan(_num(span, "start_s"), _num(span, "end_s"), samples or 0,
                            _num(span, "rate_hz") or 0.0, _text(span, "closed_by") or "", _text(span, "started_by")),
            error=_text(obj, "error", LONG_TEXT_MAX),
            walk_start_s=_num(obj, "walk_start_s"), walk_end_s=_num(obj, "walk_end_s"),
            turn_start_s=_num(obj, "turn_start_s"), turn_end_s=_num(obj, "turn_end_s"), steps=steps,
            cadence_spm=_num(obj, "cadence_spm"), phase_s=phase, step_times_s=times,
            reason=_text(obj, "reason", LONG_TEXT_MAX), participant=participant,
            answer=None if answer is None else TrialAnswer.from_obj(answer, obj["schema"]),
            not_scored=_text(obj, "not_scored", LONG_TEXT_MAX),
            signal=None if signal is None else Signal.from_obj(signal), replayed=bool(obj.get("replayed")),
        )


TrialAction = Literal["start", "stop", "cancel"]
TRIAL_ACTIONS: tuple[TrialAction, ...] = ("start", "stop", "cancel")
CODE_MAX = 32  # a participant code is short (e.g. "AB-123"); a longer value is probably a name or a mistake


@dataclass(frozen=True, slots=True)
class TrialCommand:
    """The operator's order to a screening station: start a trial (for a participant code, with what the
    operator enters: age, sex), stop it (it is then scored) or cancel it (dropped, nothing sent).

    The same value whichever way it comes: the command topic (`edgekit/v1/{site}/{device}/command/trial`,
    JSON with `schema`), a line from the station's button on the serial port (`START [code]`, `STOP`,
    `CANCEL`) or the station screen. `participant` is the code the operator types; the device sends only its
    salted hash (edgekit/privacy.py). `ts` is the sender's clock (0 when unknown); `origin` where it came
    from, for the log (not sent)."""

    action: TrialAction
    participant: str | None = None
    operator: dict[str, float | str] = field(default_factory=dict)
    ts: float = 0.0
    origin: str = ""

    SCHEMA = topics.SCHEMA_TRIAL_COMMAND
    KEYS = frozenset({"schema", "action", "participant", "operator", "ts"})

    def __post_init__(self) -> None:
        if self.action not in TRIAL_ACTIONS:
            raise DataError(f"action must be one of {list(TRIAL_ACTIONS)} (got {self.action!r:.40})")
        code = self.participant
        if code is not None and (not code or len(code) > CODE_MAX or not code.isprintable() or " " in code):
            raise DataError(f"participant code must be 1-{CODE_MAX} printable characters without spaces")

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"schema": self.SCHEMA, "action": self.action, "ts": self.ts}
        if self.participant is not None:
            obj["participant"] = self.participant
        if self.operator:
            obj["operator"] = self.operator
        return obj

    def encode(self) -> bytes:
        return topics.encode(self.to_obj())

    @classmethod
    def decode(cls, payload: bytes, where: str) -> TrialCommand:
        """A command topic's payload; DataError (naming `where`) when it is not a trial command."""
        def build(obj: dict[str, Any]) -> TrialCommand:
            operator = _object(obj, "operator") or {}
            for key, value in operator.items():
                if not isinstance(value, (int, float, str)) or isinstance(value, bool):
                    raise DataError(f"operator.{key:.40} must be a number or text")
            return cls(obj.get("action"), _text(obj, "participant", CODE_MAX), operator,  # type: ignore[arg-type]
                       _num(obj, "ts") or 0.0, origin=where)

        return _decode_command(payload, where, cls.SCHEMA, cls.KEYS, build, "; refused, as it may carry personal data")

    @classmethod
    def from_line(cls, text: str, origin: str) -> TrialCommand | None:
        """A station button's line (`START`, `START AB-123`, `STOP`, `CANCEL`, any case), or None when the line
        is not a command (a sample line)."""
        words = text.split()
        if not words or words[0].lower() not in TRIAL_ACTIONS or len(words) > 2:
            return None
        action = words[0].lower()
        code = words[1] if len(words) == 2 and action == "start" else None
        if len(words) == 2 and action != "start":
            return None
        return cls(action, code, origin=origin)  # type: ignore[arg-type]


BaselineAction = Literal["learn"]
BASELINE_ACTIONS: tuple[BaselineAction, ...] = ("learn",)


@dataclass(frozen=True, slots=True)
class BaselineCommand:
    """An order to a device whose bundle compares each machine with its own baseline (edgekit/baseline.py):
    `learn` forgets the baseline it has and learns it again from its next windows (after maintenance, a new
    machine, a sensor moved), deferring them as `commissioning` meanwhile. On the command topic
    `edgekit/v1/{site}/{device}/command/baseline`. `ts` is the sender's clock (0 when unknown); `origin` where
    it came from, for the log (not sent)."""

    action: BaselineAction = "learn"
    ts: float = 0.0
    origin: str = ""

    SCHEMA = topics.SCHEMA_BASELINE_COMMAND
    KEYS = frozenset({"schema", "action", "ts"})

    def __post_init__(self) -> None:
        if self.action not in BASELINE_ACTIONS:
            raise DataError(f"action must be one of {list(BASELINE_ACTIONS)} (got {self.action!r:.40})")

    def to_obj(self) -> dict[str, Any]:
        return {"schema": self.SCHEMA, "action": self.action, "ts": self.ts}

    def encode(self) -> bytes:
        return topics.encode(self.to_obj())

    @classmethod
    def decode(cls, payload: bytes, where: str) -> BaselineCommand:
        """A command topic's payload; DataError (naming `where`) when it is not a baseline command."""
        return _decode_command(payload, where, cls.SCHEMA, cls.KEYS,
                               lambda obj: cls(obj.get("action"), _num(obj, "ts") or 0.0, origin=where))  # type: ignore[arg-type]


C = TypeVar("C")


def _decode_command(payload: bytes, where: str, schema: str, keys: frozenset[str],
                    build: Callable[[dict[str, Any]], C], why: str = "") -> C:
    """A command's payload: JSON of `schema` with only `keys` (`why` follows the refusal of another key), built
    by `build`; every DataError names `where` (the command's topic)."""
    obj = topics.decode(payload, where, schemas={schema})
    try:
        _known(obj, keys, schema, why)
        return build(obj)
    except DataError as exc:
        raise DataError(exc.message, where=where) from None


def _known(obj: dict[str, Any], keys: frozenset[str], what: str,
           why: str = "; refused, as it may carry personal data") -> None:
    """DataError naming the first key of `obj` that `keys` does not hold (the key, never its value)."""
    for key in obj:
        if key not in keys:
            raise DataError(f"{key!r:.40} is not a field of {what}{why}")


@dataclass(slots=True)
class Status:
    """Retained `online` (birth, with what the agent runs and what waits), `offline` (close, last will).
    `signature`: whether the agent verified its bundle's signature (`verified`) or runs it under allow_unsigned
    (`unchecked`); absent from older agents' statuses and from the last will, and dropped (None) when it is
    neither word, as the other optional fields are."""

    site: str
    device: str
    state: Literal["online", "offline"]
    ts: float
    model_version: str | None = None
    queued: int | None = None
    dropped: int | None = None
    reason: str | None = None
    signature: Literal["verified", "unchecked"] | None = None
    # The model rollout on the device (issue 16): what it runs, ran before, was told to run, and how that went.
    # Absent from older agents' statuses and the last will; dropped (None) when malformed.
    rollout: Rollout | None = None

    SCHEMA = topics.SCHEMA_STATUS
    OPTIONAL = ("model_version", "queued", "dropped", "reason", "signature")

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"schema": self.SCHEMA, "site": self.site, "device": self.device,
                               "state": self.state, "ts": self.ts}
        obj.update({k: getattr(self, k) for k in self.OPTIONAL if getattr(self, k) is not None})
        if self.rollout is not None:
            obj["rollout"] = self.rollout.to_obj()
        return obj

    def encode(self) -> bytes:
        return topics.encode(self.to_obj())

    @classmethod
    def from_obj(cls, obj: dict[str, Any], site: str, device: str) -> Status:
        _owner(obj, site, device, named_only=True)
        state = obj.get("state")
        if state not in ("online", "offline"):
            raise DataError(f"state must be online or offline (got {state!r:.40})")
        mv = obj.get("model_version")
        return cls(site, device, state, _num(obj, "ts", required=True),
                   model_version=mv if isinstance(mv, str) and len(mv) <= TEXT_MAX else None,
                   queued=_lenient_int(obj, "queued"), dropped=_lenient_int(obj, "dropped"),
                   reason=obj["reason"] if isinstance(obj.get("reason"), str) else None,
                   signature=obj["signature"] if obj.get("signature") in SIGNATURES else None,
                   rollout=Rollout.lenient(obj.get("rollout")))


SIGNATURES = ("verified", "unchecked")  # Status.signature's words


def _lenient_int(obj: dict[str, Any], key: str) -> int | None:
    """An optional counter: kept when it is an integer, dropped (None) otherwise."""
    v = obj.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= INT_MAX else None


@dataclass(slots=True)
class Metrics:
    """The agent's counters since it started. `counters` holds every other numeric field the agent sends
    (kept as sent, so a newer agent's counters reach the hub's page without a hub change)."""

    site: str
    device: str
    ts: float
    queued: int | None = None
    dropped: int | None = None
    counters: dict[str, Any] = field(default_factory=dict)

    SCHEMA = topics.SCHEMA_METRICS

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"schema": self.SCHEMA, "site": self.site, "device": self.device, "ts": self.ts}
        obj.update(self.counters)
        if self.queued is not None:
            obj["queued"] = self.queued
        if self.dropped is not None:
            obj["dropped"] = self.dropped
        return obj

    def encode(self) -> bytes:
        return topics.encode(self.to_obj())

    @classmethod
    def from_obj(cls, obj: dict[str, Any], site: str, device: str) -> Metrics:
        _owner(obj, site, device, named_only=True)
        reserved = {"schema", "site", "device", "ts", "queued", "dropped"}
        counters = {k: v for k, v in obj.items() if k not in reserved}
        if obj.get("schema") == topics.SCHEMA_METRICS_V1 and "replayed" in counters:
            counters["replayed_results"] = counters.pop("replayed")  # /1's name (a bool when re-sent: lost)
        counters.pop("replayed", None)  # the transport's re-send flag, not a counter
        return cls(site, device, _num(obj, "ts", required=True), _lenient_int(obj, "queued"),
                   _lenient_int(obj, "dropped"), counters)


# --- model rollout (issue 16) -------------------------------------------------------------------------

RolloutState = Literal["idle", "fetching", "checking", "watching", "healthy", "rolled_back", "refused", "failed"]
ROLLOUT_STATES: tuple[RolloutState, ...] = ("idle", "fetching", "checking", "watching", "healthy", "rolled_back",
                                            "refused", "failed")
# Where a device's rollout of one version ends: it runs the version through its watch (healthy), or it does not
# run it (rolled back: it failed to load, on-device parity or its band; refused: signature, input contract,
# archive; failed: the hub refused the download).
ROLLOUT_DONE: tuple[RolloutState, ...] = ("healthy", "rolled_back", "refused", "failed")
VERSION_MAX = 64  # a bundle version (edgekit/contract/archive.py: 16 hex digits) or a deployment id


def _band(obj: dict[str, Any], key: str) -> tuple[float, float]:
    """A rate band [low, high] with 0 <= low <= high <= 1."""
    pair: Any = obj.get(key)
    numbers = isinstance(pair, list) and len(pair) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair)
    if not (numbers and 0.0 <= pair[0] <= pair[1] <= 1.0):
        raise DataError(f"band.{key} must be [low, high] with 0 <= low <= high <= 1 (got {pair!r:.60})")
    return float(pair[0]), float(pair[1])


@dataclass(frozen=True, slots=True)
class BundleCommand:
    """The bundle a device should run: retained on `edgekit/v1/{site}/{device}/command/bundle`, which only that
    device may read (the broker's ACL), so `token` is its credential for the hub's `url` (GET with
    `Authorization: Bearer TOKEN`). `sha256` and `size` are the archive's (edgekit/contract/archive.py);
    `version` its manifest's. After the swap the device watches the new bundle for `watch_s` (and at least
    `min_windows` windows) and rolls back when its deferral or quarantine rate leaves its band. Not stale with
    age, unlike the operator's commands: it is the fleet's wanted state. `origin` is for the log (not sent)."""

    deployment: str
    version: str
    url: str
    token: str
    sha256: str
    size: int
    model_version: str | None = None
    watch_s: float = 120.0
    min_windows: int = 20
    deferral_band: tuple[float, float] = (0.0, 1.0)
    quarantine_band: tuple[float, float] = (0.0, 1.0)
    ts: float = 0.0
    origin: str = ""

    SCHEMA = topics.SCHEMA_BUNDLE_COMMAND
    KEYS = frozenset({"schema", "deployment", "version", "model_version", "url", "token", "sha256", "size",
                      "watch_s", "min_windows", "band", "ts"})

    def __post_init__(self) -> None:
        for key in ("deployment", "version"):
            value = getattr(self, key)
            if not isinstance(value, str) or not 0 < len(value) <= VERSION_MAX or not value.isprintable():
                raise DataError(f"{key} must be 1-{VERSION_MAX} printable characters (got {value!r:.80})")
        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")) \
                or len(self.url) > LONG_TEXT_MAX:
            raise DataError(f"url must be an http:// or https:// address (got {self.url!r:.80})")
        if not isinstance(self.token, str) or not 16 <= len(self.token) <= 256 or not self.token.isascii() \
                or not self.token.isprintable():
            raise DataError("token must be 16-256 printable ASCII characters")
        if not isinstance(self.sha256, str) or len(self.sha256) != 64 \
                or set(self.sha256) - set("0123456789abcdef"):
            raise DataError(f"sha256 must be 64 lower-case hex digits (got {self.sha256!r:.80})")
        if not 0 <= self.size <= INT_MAX or not 0 <= self.min_windows <= INT_MAX:
            raise DataError("size and min_windows must be integers >= 0")
        if not (math.isfinite(self.watch_s) and self.watch_s >= 0):
            raise DataError(f"watch_s must be a number of seconds >= 0 (got {self.watch_s!r:.40})")

    def to_obj(self) -> dict[str, Any]:
        return {"schema": self.SCHEMA, "deployment": self.deployment, "version": self.version,
                "model_version": self.model_version, "url": self.url, "token": self.token, "sha256": self.sha256,
                "size": self.size, "watch_s": self.watch_s, "min_windows": self.min_windows,
                "band": {"deferral": list(self.deferral_band), "quarantine": list(self.quarantine_band)},
                "ts": self.ts}

    def encode(self) -> bytes:
        return topics.encode(self.to_obj())

    @classmethod
    def decode(cls, payload: bytes, where: str) -> BundleCommand:
        """A command topic's payload; DataError (naming `where`, never the token) when it is not a bundle
        command."""
        obj = topics.decode(payload, where, schemas={cls.SCHEMA})
        try:
            unknown = next((k for k in obj if k not in cls.KEYS), None)
            if unknown is not None:
                raise DataError(f"{unknown!r:.40} is not a field of {cls.SCHEMA}")
            band = _object(obj, "band") or {}
            return cls(
                deployment=obj.get("deployment"), version=obj.get("version"), url=obj.get("url"),  # type: ignore[arg-type]
                token=obj.get("token"), sha256=obj.get("sha256"),  # type: ignore[arg-type]
                size=_num(obj, "size", int, required=True), model_version=_text(obj, "model_version"),
                watch_s=_num(obj, "watch_s", required=True), min_windows=_num(obj, "min_windows", int, required=True),
                deferral_band=_band(band, "deferral"), quarantine_band=_band(band, "quarantine"),
                ts=_num(obj, "ts") or 0.0, origin=where)
        except DataError as exc:
            raise DataError(exc.message, where=where) from None


@dataclass(slots=True)
class Rollout:
    """A device's rollout, in its status: the bundle version it `running`, the one it ran before (`previous`,
    kept on disk for a rollback), the one the newest bundle command asked for (`target`, of `deployment`), how
    that went (`state`, ROLLOUT_STATES; `reason` in words when it did not), and since when (`since`, unix time).
    """

    state: RolloutState
    running: str | None = None
    previous: str | None = None
    target: str | None = None
    deployment: str | None = None
    reason: str | None = None
    since: float | None = None

    KEYS = ("state", "running", "previous", "target", "deployment", "reason", "since")

    def to_obj(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.KEYS if getattr(self, k) is not None}

    @classmethod
    def from_obj(cls, obj: Any) -> Rollout:
        if not isinstance(obj, dict):
            raise DataError(f"rollout must be an object (got {obj!r:.60})")
        unknown = next((k for k in obj if k not in cls.KEYS), None)
        if unknown is not None:
            raise DataError(f"rollout.{unknown:.40} is not a field")
        state = obj.get("state")
        if state not in ROLLOUT_STATES:
            raise DataError(f"rollout.state must be one of {list(ROLLOUT_STATES)} (got {state!r:.40})")
        versions = {k: _text(obj, k, VERSION_MAX) for k in ("running", "previous", "target", "deployment")}
        return cls(state, **versions, reason=_text(obj, "reason", LONG_TEXT_MAX), since=_num(obj, "since"))

    @classmethod
    def lenient(cls, obj: Any) -> Rollout | None:
        """As from_obj, None when absent or malformed (Status's optional fields are dropped, not refused)."""
        if obj is None:
            return None
        try:
            return cls.from_obj(obj)
        except DataError:
            return None


Message = Result | ResultBatch | Review | Trial | Status | Metrics
# topic kind -> schema -> the class that parses it
PARSERS: dict[str, dict[str, Any]] = {
    "result": {topics.SCHEMA_RESULT: Result, topics.SCHEMA_RESULT_BATCH: ResultBatch},
    "review": {topics.SCHEMA_REVIEW: Review},
    "trial": dict.fromkeys(Trial.KEYS, Trial),  # every schema version the hub reads
    "status": {topics.SCHEMA_STATUS: Status},
    "metrics": {topics.SCHEMA_METRICS: Metrics, topics.SCHEMA_METRICS_V1: Metrics},
}


def parse(topic_name: str, payload: bytes) -> Message:
    """A received message as its typed value. DataError names what is malformed; IdentityError (a
    DataError) says why it does not belong to its topic's site and device. Both name no payload bytes
    beyond 80 characters."""
    where = f"topic {topic_name!r}"
    tp = topics.parse_topic(topic_name)
    obj = topics.decode(payload, where)
    schema = obj["schema"]
    cls = PARSERS[tp.kind].get(schema)
    if cls is None:
        _identity_first(obj, tp)
        raise DataError(f"schema {schema!r} does not belong on a {tp.kind} topic")
    return cls.from_obj(obj, tp.site, tp.device)


def _identity_first(obj: dict[str, Any], tp: topics.ParsedTopic) -> None:
    """A payload on the wrong topic that also claims another device is reported as foreign, not as bad."""
    if obj.get("schema") in (topics.SCHEMA_RESULT, topics.SCHEMA_REVIEW, *Trial.KEYS):
        _keyed(obj, tp.site, tp.device)
    elif obj.get("schema") == topics.SCHEMA_RESULT_BATCH:
        _owner(obj, tp.site, tp.device)
