"""The message contract (edgekit/contract/messages.py) round-trips, keeps schema /1's bytes, and is what the
real agent writes and the real hub reads (issue 11: one encode, one parse, both sides tested)."""

from __future__ import annotations

import dataclasses
import re
import sqlite3
from pathlib import Path

import orjson
import pytest
from messagefactory import participant, trial

from edgekit import topics
from edgekit.contract import messages as m
from edgekit.errors import DataError, IdentityError
from edgekit.hub.ingest import IngestStats, to_batch

SITE, DEVICE = "plant1", "pump7"


def full_result(seq: int = 5) -> m.Result:
    """A Result with every field set to something other than its default."""
    return m.Result(
        id=topics.result_id(DEVICE, seq), seq=seq, site=SITE, device=DEVICE, ts=1700000000.25, start_s=10.0,
        end_s=41.0, model_version="skab@abc", task="skab", label="anomaly", confidence=0.75,
        probs={"normal": 0.25, "anomaly": 0.75}, decision="defer", reasons=["disagreement", "low_confidence"],
        scores={"confidence": 0.75, "ood": 0.5, "disagreement": 0.4},
        thresholds={"ood_max_score": 1.0, "min_confidence": 0.9, "max_disagreement": 0.3},
        second_opinion=m.SecondOpinion("normal", {"normal": 0.6, "anomaly": 0.4}),
        implausible="channel 'Current' = 4e+300, outside the plausible range",
        attribution={"Volume Flow RateRMS": 0.625, "Pressure": 0.25, "acc_mag.std": 0.125}, replayed=True)


def full_trial() -> m.Trial:
    return m.Trial(id=topics.result_id(DEVICE, 9), seq=9, site=SITE, device=DEVICE, ts=5.5, model_version="g@1",
                   task="ipol", trial=m.TrialSpan(0.0, 20.0, 2001, 100.0, "end", "operator"),
                   walk_start_s=2.0,
                   walk_end_s=15.0, turn_start_s=8.0, turn_end_s=9.5, steps=18, cadence_spm=104.5,
                   phase_s={"still": 2.0, "walk": 11.5}, step_times_s=[2.5, 3.1], reason="slow turn",
                   participant=participant("AB-123"), replayed=True,
                   answer=m.TrialAnswer("faller", 0.625, {"non_faller": 0.375, "faller": 0.625}, "defer",
                                        ["low_confidence"], {"confidence": 0.625, "ood": 0.5},
                                        {"TUG": 13.0, "steps": 18.0, "pse": 1.25}, {"TUG": 96.5, "steps": 40.0},
                                        referred=True),
                   signal=m.Signal(["ax", "ay"], 100.0, 0.0, [[9.5, 9.75], [0.25, None]]))


CASES = {
    "result": lambda: full_result(),
    "review": lambda: m.Review(full_result(), {"mean": 1.5, "energy": None},
                               m.Signal(["a", "b"], 1.0, 10.0, [[1.0, None], [2.0, 3.0]], units=["g", ""],
                                        ranges=[[-0.5, 1.5], [2.0, 2.0]]), percentiles={"mean": 97.5},
                               relative={"mean": -1.25, "energy": None}),
    "trial": full_trial,
    "trial-error": lambda: dataclasses.replace(
        full_trial(), error="too short: 3.2 s < 4 s", walk_start_s=None, walk_end_s=None, turn_start_s=None,
        turn_end_s=None, steps=None, cadence_spm=None, phase_s={}, step_times_s=[], reason=None, answer=None,
        not_scored="too_short: needs at least 4 s of samples"),
    "status": lambda: m.Status(SITE, DEVICE, "online", 3.0, "skab@abc", 12, 1, "birth", signature="verified"),
    "metrics": lambda: m.Metrics(SITE, DEVICE, 4.0, 7, 2, {"windows": 9, "quarantine_reasons": {"not a number": 2},
                                                           "uptime_s": 1.5}),
    "batch": lambda: m.ResultBatch(SITE, DEVICE, [full_result(1), dataclasses.replace(full_result(2), replayed=False)],
                                   replayed=True),
    "status-rollout": lambda: m.Status(SITE, DEVICE, "online", 3.0, rollout=full_rollout()),
}
KIND = {"result": "result", "review": "review", "trial": "trial", "trial-error": "trial", "status": "status",
        "metrics": "metrics", "batch": "result", "status-rollout": "status"}


def full_rollout() -> m.Rollout:
    return m.Rollout("rolled_back", running="a" * 16, previous="b" * 16, target="c" * 16,
                     deployment="20261201-101010-abcdef", reason="failed on-device parity: labels agree on 0/150",
                     since=1700000001.5)


def full_bundle_command() -> m.BundleCommand:
    return m.BundleCommand(deployment="20261201-101010-abcdef", version="c" * 16,
                           url="https://hub.example:8443/bundles/20261201-101010-abcdef", token="T" * 43,
                           sha256="d" * 64, size=123456, model_version="stream@222222222222", watch_s=30.0,
                           min_windows=50, deferral_band=(0.0, 0.25), quarantine_band=(0.0, 0.01), ts=1700000000.5,
                           origin="topic 'edgekit/v1/plant1/pump7/command/bundle'")


def _not_default(obj: object) -> set[str]:
    """The fields of a dataclass instance that differ from their defaults."""
    out = set()
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if getattr(obj, f.name) != default:
            out.add(f.name)
    return out


def test_the_rollout_tests_cover_every_field() -> None:
    """The rollout's two contract classes (issue 16) are set in full above: a field added without a value there
    fails here, and then the round trips below cover it."""
    for obj in (full_rollout(), full_bundle_command()):
        assert _not_default(obj) == {f.name for f in dataclasses.fields(obj)}, type(obj).__name__
    status = CASES["status-rollout"]()
    assert status.rollout == full_rollout() and "rollout" in _not_default(status)


def test_a_bundle_command_round_trips_and_never_names_its_token_when_refused() -> None:
    cmd = full_bundle_command()
    where = cmd.origin
    assert m.BundleCommand.decode(cmd.encode(), where) == cmd
    assert topics.decode(cmd.encode(), where, {topics.SCHEMA_BUNDLE_COMMAND})["band"] == {
        "deferral": [0.0, 0.25], "quarantine": [0.0, 0.01]}
    for change, words in ((("band", {"deferral": [0.5, 0.2], "quarantine": [0, 1]}), "band.deferral must be"),
                          (("url", "ftp://hub/b"), "url must be an http:// or https://"),
                          (("sha256", "D" * 64), "sha256 must be 64 lower-case hex digits"),
                          (("token", "short"), "token must be 16-256 printable ASCII"),
                          (("size", -1), "size and min_windows must be integers >= 0"),
                          (("watch_s", None), "watch_s is missing"),
                          (("name", "x"), "'name' is not a field of edgekit.bundle-command/1")):
        obj = cmd.to_obj() | dict([change])
        with pytest.raises(DataError, match=re.escape(words)) as err:
            m.BundleCommand.decode(orjson.dumps(obj), where)
        assert err.value.where == where and cmd.token not in str(err.value)


def test_a_status_carries_the_rollout_and_drops_a_malformed_one() -> None:
    st = topics.topic(SITE, DEVICE, "status")
    birth = topics.status(SITE, DEVICE, "online", ts=1.0, rollout=full_rollout().to_obj())
    assert m.parse(st, birth).rollout == full_rollout()
    for bad in ({"state": "maybe"}, {"state": "healthy", "running": 5}, {"state": "healthy", "extra": 1}, "healthy"):
        assert m.parse(st, topics.status(SITE, DEVICE, "online", ts=1.0, rollout=bad)).rollout is None
    idle = m.Rollout("idle", running="a" * 16)
    assert idle.to_obj() == {"state": "idle", "running": "a" * 16}  # what an agent without a rollout yet says


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_field_round_trips(case: str) -> None:
    msg = CASES[case]()
    back = m.parse(topics.topic(SITE, DEVICE, KIND[case]), msg.encode())  # type: ignore[arg-type]
    if case == "batch":  # a batch's replay flag is the message's: every result in it was re-sent
        msg.results[1].replayed = True
    assert back == msg


def test_the_tests_cover_every_field() -> None:
    """Adding a field to a message without giving it a value in some case above fails here, so the round
    trip covers every field (a field missing from encode or parse then breaks test_every_field_round_trips)."""
    covered: dict[type, set[str]] = {}
    for build in CASES.values():
        msg = build()
        nested = [getattr(msg, "signal", None)]  # a Signal travels inside reviews and trials
        for part in [msg, *(n for n in nested if n is not None)]:
            for f in dataclasses.fields(part):
                default = f.default if f.default is not dataclasses.MISSING else (
                    f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
                if getattr(part, f.name) != default:
                    covered.setdefault(type(part), set()).add(f.name)
    for cls, names in covered.items():
        missing = {f.name for f in dataclasses.fields(cls)} - names
        assert not missing, f"{cls.__name__}: {sorted(missing)} keep their defaults in every case"
    assert set(covered) == {m.Result, m.Review, m.Trial, m.Status, m.Metrics, m.ResultBatch, m.Signal}


def test_schema_1_bytes_are_pinned() -> None:
    """What agents in the field send: a change here is a schema change (bump the version, keep parsing /1)."""
    r = dataclasses.replace(full_result(), replayed=False, implausible=None, attribution=None)
    assert r.encode() == (
        b'{"schema":"edgekit.result/1","id":"pump7:000000000005","seq":5,"site":"plant1","device":"pump7",'
        b'"ts":1700000000.25,"window":{"start_s":10.0,"end_s":41.0},"model_version":"skab@abc","task":"skab",'
        b'"label":"anomaly","confidence":0.75,"probs":{"normal":0.25,"anomaly":0.75},"decision":"defer",'
        b'"reasons":["disagreement","low_confidence"],"scores":{"confidence":0.75,"ood":0.5,"disagreement":0.4},'
        b'"thresholds":{"ood_max_score":1.0,"min_confidence":0.9,"max_disagreement":0.3},'
        b'"second_opinion":{"label":"normal","probs":{"normal":0.6,"anomaly":0.4}}}')
    assert m.Status(SITE, DEVICE, "offline", 2.0, reason="lost").encode() == (
        b'{"schema":"edgekit.status/1","site":"plant1","device":"pump7","state":"offline","ts":2.0,'
        b'"reason":"lost"}')


def test_a_status_says_whether_the_agent_checked_its_bundle_and_older_statuses_still_read() -> None:
    """The agent's transport builds its birth with topics.status and the agent's status_extra (issue 16)."""
    st = topics.topic(SITE, DEVICE, "status")
    birth = topics.status(SITE, DEVICE, "online", ts=1.0, model_version="skab@abc", signature="unchecked", queued=3)
    assert m.parse(st, birth).signature == "unchecked"
    assert m.parse(st, topics.status(SITE, DEVICE, "offline", ts=1.0, reason="lost")).signature is None
    assert m.parse(st, topics.status(SITE, DEVICE, "online", ts=1.0, signature="maybe")).signature is None


def test_metrics_1_is_still_read() -> None:
    old = topics.encode({"schema": topics.SCHEMA_METRICS_V1, "site": SITE, "device": DEVICE, "ts": 1.0,
                         "windows": 3, "replayed": 4, "queued": 1})
    msg = m.parse(topics.topic(SITE, DEVICE, "metrics"), old)
    assert isinstance(msg, m.Metrics) and msg.counters == {"windows": 3, "replayed_results": 4} and msg.queued == 1


def test_trial_1_is_still_read() -> None:
    """A trial as agents before schema /2 send it (pinned bytes): read as before, with no participant and no
    answer."""
    old = (b'{"schema":"edgekit.trial/1","id":"pump7:000000000009","seq":9,"site":"plant1","device":"pump7",'
           b'"ts":5.5,"model_version":"g@1","task":"ipol","trial":{"start_s":0.0,"end_s":20.0,"samples":2001,'
           b'"rate_hz":100.0,"closed_by":"end"},"walk_start_s":2.0,"walk_end_s":15.0,"turn_start_s":8.0,'
           b'"turn_end_s":9.5,"steps":18,"cadence_spm":104.5,"phase_s":{"still":2.0,"walk":11.5},'
           b'"step_times_s":[2.5,3.1],"reason":"slow turn","replayed":true}')
    msg = m.parse(topics.topic(SITE, DEVICE, "trial"), old)
    assert msg == dataclasses.replace(full_trial(), participant=None, answer=None, signal=None,
                                      trial=m.TrialSpan(0.0, 20.0, 2001, 100.0, "end"))
    assert topics.decode(msg.encode(), "t")["schema"] == topics.SCHEMA_TRIAL == "edgekit.trial/3"
    with_one = orjson.loads(old) | {"participant": participant("AB-123")}  # /1 has no such field
    with pytest.raises(DataError, match="'participant' is not a field of edgekit.trial/1"):
        m.parse(topics.topic(SITE, DEVICE, "trial"), orjson.dumps(with_one))


def test_trial_2_is_still_read_and_refuses_what_came_with_3() -> None:
    """A /2 trial (participant and answer, no signal, no percentiles) reads as before; the fields /3 added are
    not fields of /2."""
    obj = full_trial().to_obj() | {"schema": topics.SCHEMA_TRIAL_V2}
    del obj["signal"], obj["answer"]["percentiles"], obj["answer"]["referred"], obj["trial"]["started_by"]
    msg = m.parse(topics.topic(SITE, DEVICE, "trial"), orjson.dumps(obj))
    assert isinstance(msg, m.Trial) and msg.signal is None and msg.answer is not None
    assert msg.answer.percentiles == {} and not msg.answer.referred
    assert msg.answer.features == full_trial().answer.features
    for extra, where in ((obj | {"signal": full_trial().to_obj()["signal"]}, "edgekit.trial/2"),
                         (obj | {"answer": obj["answer"] | {"percentiles": {}}}, "edgekit.trial/2 answer")):
        with pytest.raises(DataError, match=f"is not a field of {where}"):
            m.parse(topics.topic(SITE, DEVICE, "trial"), orjson.dumps(extra))


@pytest.mark.parametrize("value", ["Jane Doe", "AB-123", "AB123", "p-0123456789ABCDEF", "p-0123456789abcde",
                                   "p-0123456789abcdef0", " p-0123456789abcdef", "p-0123456789abcdef\n",
                                   "q-0123456789abcdef", "", 7, ["p-0123456789abcdef"], {"name": "Jane"}])
def test_a_trials_participant_must_be_a_pseudonym_and_the_error_does_not_repeat_it(
        value: object, caplog: pytest.LogCaptureFixture) -> None:
    obj = full_trial().to_obj() | {"participant": value}
    with pytest.raises(DataError, match="participant must be a pseudonym") as err:
        m.parse(topics.topic(SITE, DEVICE, "trial"), orjson.dumps(obj))
    if isinstance(value, str) and value:
        assert value not in str(err.value)
    stats = IngestStats()  # the hub's path: counted bad, logged without the value
    assert not len(to_batch([(topics.topic(SITE, DEVICE, "trial"), orjson.dumps(obj))], 1.0, stats))
    assert stats.bad == 1
    assert "Jane" not in caplog.text and "AB" not in caplog.text


@pytest.mark.parametrize("where", ["top", "span"])
@pytest.mark.parametrize("key", ["name", "first_name", "patient", "age"])
def test_a_trial_with_a_key_the_contract_does_not_know_is_refused_naming_the_key(where: str, key: str) -> None:
    """Other messages ignore keys they do not know (a newer agent's extra counters reach the hub); a trial
    carries personal data, so a key that is not a field is refused, and the error names the key."""
    obj = trial(DEVICE, 3, site=SITE, participant=participant("AB-123")).to_obj()
    (obj if where == "top" else obj["trial"])[key] = "Jane Doe"
    with pytest.raises(DataError, match=f"'{key}' is not a field of edgekit.trial/3") as err:
        m.parse(topics.topic(SITE, DEVICE, "trial"), orjson.dumps(obj))
    assert "Jane" not in str(err.value)


@pytest.mark.parametrize(("where", "value", "expected"), [
    ("units", ["g"], "signal.units must be one text"),
    ("units", ["g", 5], "signal.units must be one text"),
    ("ranges", [[0.0, 1.0]], "signal.ranges must be one [low, high]"),
    ("ranges", [[2.0, 1.0], [0.0, 1.0]], "signal.ranges must be one [low, high]"),
    ("ranges", [[0.0, 1.0], [0.0, "x"]], "signal.ranges must be one [low, high]"),
    ("percentiles", {"mean": 101.0}, "percentiles['mean'] must be from 0 to 100"),
    ("percentiles", {"mean": "high"}, "mean must be a number"),
    ("relative", {"mean": "low"}, "relative['mean'] must be a number or null"),
    ("relative", [1.0], "relative must be an object"),
])
def test_a_review_with_malformed_units_ranges_or_percentiles_is_refused(where: str, value: object,
                                                                       expected: str) -> None:
    obj = CASES["review"]().to_obj()
    if where in ("percentiles", "relative"):
        obj[where] = value
    else:
        obj["signal"][where] = value
    with pytest.raises(DataError, match=re.escape(expected)):
        m.parse(topics.topic(SITE, DEVICE, "review"), orjson.dumps(obj))


def test_a_review_without_units_ranges_or_percentiles_reads_and_sends_none_of_them() -> None:
    """What agents before issue 15 send, and what a bundle without an envelope or population sends."""
    full = CASES["review"]()
    bare = dataclasses.replace(full, percentiles=None, relative=None,
                               signal=dataclasses.replace(full.signal, units=None, ranges=None))
    obj = bare.to_obj()
    assert "percentiles" not in obj and "relative" not in obj and set(obj["signal"]) == {"channels", "rate_hz", "start_s", "points"}
    assert m.parse(topics.topic(SITE, DEVICE, "review"), bare.encode()) == bare


@pytest.mark.parametrize("case", ["result", "review", "trial", "batch"])
def test_another_devices_identity_is_refused(case: str) -> None:
    payload = CASES[case]().encode()
    with pytest.raises(IdentityError):
        m.parse(topics.topic(SITE, "evil", KIND[case]), payload)
    with pytest.raises(IdentityError):
        m.parse(topics.topic("elsewhere", DEVICE, KIND[case]), payload)


def test_a_message_on_the_wrong_kind_of_topic_is_refused() -> None:
    with pytest.raises(DataError, match="does not belong on a trial topic"):
        m.parse(topics.topic(SITE, DEVICE, "trial"), full_result().encode())


# --- the real agent's payloads through the real hub's parser --------------------------------------


@pytest.mark.data
@pytest.mark.torch
@pytest.mark.slow
def test_what_the_agent_writes_the_hub_reads(skab_bundle: Path, data_dir: Path, tmp_path: Path) -> None:
    from edgekit.agent import Agent
    from edgekit.config import AgentConfig, validate

    lines = (data_dir / "skab/data/valve1/1.csv").read_text().splitlines()
    c = lines[300].split(";")
    lines[300] = ";".join([c[0], c[1], c[2], "4e300", *c[4:]])  # implausible windows too
    path = tmp_path / "rec.csv"
    path.write_text("\n".join(lines) + "\n")
    outbox = tmp_path / "o.db"
    cfg = validate(AgentConfig, {"device_id": DEVICE, "site": SITE, "allow_unsigned": True, "bundle": str(skab_bundle),
                                 "source": {"kind": "replay", "path": str(path)}, "mqtt": {"url": None},
                                 "outbox": {"path": str(outbox)}}, "tests/test_contract.py")
    with Agent(cfg) as agent:
        summary = agent.run()
    con = sqlite3.connect(outbox)
    rows = con.execute("select topic, payload from outbox order by id").fetchall()
    con.close()
    parsed = [m.parse(t, p) for t, p in rows]  # raises on anything the hub would refuse
    kinds = {type(x).__name__ for x in parsed}
    assert {"Result", "Review", "Metrics"} <= kinds
    results = [x for x in parsed if isinstance(x, m.Result)]
    reviews = [x for x in parsed if isinstance(x, m.Review)]
    assert len(results) == summary.windows and len(reviews) == summary.deferred
    assert any(r.implausible for r in results) and any(r.decision == "accept" for r in results)
    assert all(r.encode() == p for r, (t, p) in zip(parsed, rows) if isinstance(r, m.Result))  # same bytes back
    stats = IngestStats()
    batch = to_batch(rows, 1.0, stats)
    assert stats.bad == 0 and stats.rejected == 0
    assert len(batch.results) == len(results) and len(batch.reviews) == len(reviews)
