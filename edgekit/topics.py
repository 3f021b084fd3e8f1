"""The MQTT contract: every topic and payload schema edgekit speaks is built and parsed here, and only here.

Topics: edgekit/v1/{site}/{device}/{result|review|status|metrics|trial}, which the agent publishes, and
edgekit/v1/{site}/{device}/command/{name}, which it subscribes to. Payloads are JSON objects with a `schema`
field "edgekit.<kind>/<version>". Must not import paho, onnxruntime or torch.

    result   one result, or a batch {"schema": "edgekit.result-batch/1", "results": [...]}   QoS 1
    review   a deferred result plus its features and a downsampled signal                     QoS 1
    status   retained {"state": "online"|"offline", ...}; "offline" is also the last will     QoS 1
    metrics  counters: windows, accepted, deferred, quarantined, published, queued, dropped   QoS 1
    trial    gait bundles only: one summary per trial (edgekit.gait.segment: walk and turn      QoS 1
             times, phase durations, steps, cadence), or its `error` / `reason`; the participant's
             pseudonym (edgekit/privacy.py) when the station has one
    command  to the device: an order for one device (the screening station's trial start and stop,
             from the hub side or the station's own button; a machine's baseline learned again), one
             topic level per command name

A participant is only ever a pseudonym on the wire: `parse_pseudonym` is the format's one definition.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from edgekit.errors import DataError

PREFIX = "edgekit/v1"
KINDS = ("result", "review", "status", "metrics", "trial")
Kind = Literal["result", "review", "status", "metrics", "trial"]

SCHEMA_RESULT = "edgekit.result/1"
SCHEMA_RESULT_BATCH = "edgekit.result-batch/1"
SCHEMA_REVIEW = "edgekit.review/1"
SCHEMA_STATUS = "edgekit.status/1"
# /2: the counter of re-sent results is "replayed_results" (in /1 "replayed", which the transport's
# "replayed": true on a re-sent metrics message overwrote). The hub reads both.
SCHEMA_METRICS = "edgekit.metrics/2"
SCHEMA_METRICS_V1 = "edgekit.metrics/1"
# /2 (issue 13): a trial may carry "participant", a pseudonym. A /1 hub ignored keys it did not know, so it
# would store such a trial without its pseudonym, out of reach of export and delete by pseudonym; it refuses
# /2 as a bad payload instead (upgrade the hub first). The hub reads both; /1 never carries a participant.
# /3: the trial's downsampled signal and the answer's feature percentiles (a /2 hub refuses them the same way).
SCHEMA_TRIAL = "edgekit.trial/3"
SCHEMA_TRIAL_V2 = "edgekit.trial/2"
SCHEMA_TRIAL_V1 = "edgekit.trial/1"
# To the device on command/trial (messages.TrialCommand): start, stop or cancel the station's trial.
SCHEMA_TRIAL_COMMAND = "edgekit.trial-command/1"
TRIAL_COMMAND = "trial"  # the command name (topic level) of trial commands
# To the device on command/baseline (messages.BaselineCommand): learn this machine's baseline again (issue 14).
SCHEMA_BASELINE_COMMAND = "edgekit.baseline-command/1"
BASELINE_COMMAND = "baseline"
SCHEMAS = {SCHEMA_RESULT, SCHEMA_RESULT_BATCH, SCHEMA_REVIEW, SCHEMA_STATUS, SCHEMA_METRICS, SCHEMA_METRICS_V1,
           SCHEMA_TRIAL, SCHEMA_TRIAL_V2, SCHEMA_TRIAL_V1}

COMMAND = "command"
# To the device on command/bundle, retained (messages.BundleCommand): the bundle it should run, where to fetch it
# and its credential for that (issue 16). The device reports how the rollout went in its status (`rollout`).
SCHEMA_BUNDLE_COMMAND = "edgekit.bundle-command/1"
BUNDLE_COMMAND = "bundle"

QOS = 1

# A participant on the wire and on the hub: "p-" and 16 lower-case hex digits of an HMAC-SHA256 (64 bits:
# no two of a station's participants share one in practice). edgekit/privacy.py makes them.
PSEUDONYM_PREFIX = "p-"
PSEUDONYM_HEX = 16
PSEUDONYM_LEN = len(PSEUDONYM_PREFIX) + PSEUDONYM_HEX
_PSEUDONYM = re.compile(rf"{PSEUDONYM_PREFIX}[0-9a-f]{{{PSEUDONYM_HEX}}}")


def _levels(**named: str) -> None:
    for name, value in named.items():
        if not value or set(value) & set("/+#"):
            raise ValueError(f"topic {name} must be non-empty without '/', '+', '#' (got {value!r})")


def topic(site: str, device: str, kind: Kind) -> str:
    """`edgekit/v1/{site}/{device}/{kind}`; site and device must not contain MQTT wildcards or '/'."""
    _levels(site=site, device=device)
    if kind not in KINDS:
        raise ValueError(f"topic kind must be one of {KINDS} (got {kind!r})")
    return f"{PREFIX}/{site}/{device}/{kind}"


def command(site: str, device: str, name: str) -> str:
    """`edgekit/v1/{site}/{device}/command/{name}`: the topic of one command to one device; `name` "+" gives
    the filter the device subscribes to (all of its own commands, no other device's)."""
    _levels(site=site, device=device)
    if name != "+":
        _levels(command=name)
    return f"{PREFIX}/{site}/{device}/{COMMAND}/{name}"


def subscription(kind: Kind | Literal["+"] = "+", *, site: str = "+", device: str = "+",
                 share_group: str | None = None) -> str:
    """A filter for all devices (or one); with `share_group`, an MQTT v5 shared subscription."""
    flt = f"{PREFIX}/{site}/{device}/{kind}"
    return f"$share/{share_group}/{flt}" if share_group else flt


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    site: str
    device: str
    kind: Kind


def parse_topic(name: str) -> ParsedTopic:
    """Inverse of `topic`; raises DataError naming the topic when it is not ours."""
    parts = name.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != PREFIX or parts[4] not in KINDS:
        raise DataError(f"expected {PREFIX}/SITE/DEVICE/{{{'|'.join(KINDS)}}}", where=f"topic {name!r}")
    return ParsedTopic(site=parts[2], device=parts[3], kind=parts[4])  # type: ignore[arg-type]


def parse_pseudonym(value: object) -> str:
    """`value` when it is a pseudonym ("p-" and 16 lower-case hex digits), else DataError. The error never
    repeats the value: what fails here may be a name, and the error goes to the hub's log."""
    if isinstance(value, str) and _PSEUDONYM.fullmatch(value):
        return value
    got = f"a string of {len(value)} characters" if isinstance(value, str) else type(value).__name__
    raise DataError(f"participant must be a pseudonym, {PSEUDONYM_PREFIX!r} and {PSEUDONYM_HEX} hex digits "
                    f"(edgekit.privacy.pseudonym), never a name or a code (got {got})")


def result_id(device: str, seq: int) -> str:
    """Unique, sortable per device: the device id and its persistent monotonic sequence number."""
    return f"{device}:{seq:012d}"


def parse_result_id(rid: object, device: str) -> int:
    """Inverse of `result_id` for one device: the sequence number in `rid`, which must be exactly
    `result_id(device, seq)` for some seq >= 0 (so a device cannot write another device's ids, nor a second
    spelling of its own, e.g. "pump7:5" next to "pump7:000000000005"); DataError says what is wrong."""
    if not isinstance(rid, str):
        raise DataError(f"id must be a string {device}:SEQUENCE (got {rid!r:.80})")
    prefix = f"{device}:"
    digits = rid[len(prefix):] if rid.startswith(prefix) else ""
    if not (digits.isascii() and digits.isdigit()):
        raise DataError(f"id must be {device}:SEQUENCE, this device's (got {rid!r:.80})")
    seq = int(digits)
    if rid != result_id(device, seq):
        raise DataError(f"id must be {result_id(device, seq)!r}, the one spelling of sequence {seq} "
                        f"(got {rid!r:.80})")
    return seq


def encode(payload: dict[str, Any]) -> bytes:
    """JSON with numpy scalars and arrays converted (orjson: ~5x faster than json.dumps here)."""
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)


def decode(data: bytes, where: str, schemas: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """Parse a payload and check its schema field is one of `schemas` (default: those the hub reads, SCHEMAS);
    DataError names `where` (usually the topic)."""
    schemas = schemas or SCHEMAS
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise DataError(f"payload is not JSON ({exc})", where=where) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("schema"), str) or obj["schema"] not in schemas:
        got = obj.get("schema") if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"payload schema must be one of {sorted(schemas)} (got {got!r})", where=where)
    return obj


def mark_replayed(payload: bytes) -> bytes:
    """Add `"replayed": true` to an encoded JSON object without re-encoding it."""
    if not payload.endswith(b"}"):
        raise ValueError("payload must be an encoded JSON object")
    return payload[:-1] + b',"replayed":true}'


def batch(site: str, device: str, results: list[bytes]) -> bytes:
    """Wrap already-encoded result payloads into one batch message (no re-encoding)."""
    head = encode({"schema": SCHEMA_RESULT_BATCH, "site": site, "device": device, "count": len(results)})
    return head[:-1] + b',"results":[' + b",".join(results) + b"]}"


def results_of(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The result objects in a decoded result or result-batch payload."""
    if obj["schema"] == SCHEMA_RESULT_BATCH:
        return list(obj["results"])
    return [obj]


def status(site: str, device: str, state: Literal["online", "offline"], ts: float,
           **extra: Any) -> bytes:
    return encode({"schema": SCHEMA_STATUS, "site": site, "device": device, "state": state, "ts": ts,
                   **extra})
