"""Valid MQTT messages for tests, built with the contract (edgekit/contract/messages.py), so no test keeps its
own copy of a payload (STYLE.md 13): a gait agent's result, its review and its trial summary (with a
participant's pseudonym when asked: `participant`), and a screening station's trial with its answer
(`screened`, `trial_answer`). Status and Metrics need no factory (every field is the
test's own): tests call m.Status(...) and m.Metrics(...).

A malformed payload starts from a valid one's `to_obj()`, and the test writes only what it breaks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from edgekit import topics
from edgekit.contract import messages as m
from edgekit.privacy import pseudonym

CHANNELS = ["acc_x", "acc_y", "gyro_z"]


def result(device: str, seq: int, *, site: str = "lab", defer: bool | None = None, **fields: Any) -> m.Result:
    """A gait classifier's result for window `seq`; every 5th one deferred (low confidence, and the second
    opinion disagrees) unless `defer` says. `fields` replace any other field."""
    defer = seq % 5 == 0 if defer is None else defer
    p = 0.45 if defer else 0.9
    res = m.Result(
        id=topics.result_id(device, seq), seq=seq, site=site, device=device, ts=1_700_000_000.0 + seq,
        start_s=seq * 2.0, end_s=seq * 2.0 + 2, model_version="gait-cnn@3", task="classify", label="walk",
        confidence=p, probs={"walk": p, "turn": (1 - p) * 0.7, "sit": (1 - p) * 0.3},
        decision="defer" if defer else "accept", reasons=["low_confidence", "disagreement"] if defer else [],
        scores={"ood": 0.8, "confidence": p, "disagreement": 0.5 if defer else 0.05},
        thresholds={"ood_max_score": 1.5, "min_confidence": 0.6, "max_disagreement": 0.3},
        second_opinion=m.SecondOpinion("turn", {"walk": 0.3, "turn": 0.6, "sit": 0.1}) if defer else
        m.SecondOpinion("walk", {"walk": 0.85, "turn": 0.1, "sit": 0.05}))
    return dataclasses.replace(res, **fields)


def review(res: m.Result, n: int = 128, **fields: Any) -> m.Review:
    """The review the agent sends with a deferred result: its features and `n` points of three channels."""
    points = [[round(math.sin(i / 8 + c) * (c + 1), 4) for i in range(n)] for c in range(len(CHANNELS))]
    rev = m.Review(res, {"acc_rms": 1.0 + res.seq / 100, "gyro_rms": 0.5, "cadence_hz": 1.8},
                   m.Signal(list(CHANNELS), 64.0, res.start_s, points))
    return dataclasses.replace(rev, **fields)


TEST_SALT = bytes(range(32))  # a station's salt (edgekit.privacy.device_salt makes a random one)


def participant(code: str) -> str:
    """The pseudonym a station whose salt is TEST_SALT gives the participant code `code`."""
    return pseudonym(code, TEST_SALT)


def trial(device: str, seq: int, *, site: str = "lab", walk: bool = True, error: str | None = None,
          **fields: Any) -> m.Trial:
    """A 24 s TUG trial's summary: segmented (walk out, turn, walk back), with no walk found (`walk=False`:
    a reason, 0 steps), or refused by segmentation (`error`: no segment fields); with no participant
    unless `participant=participant("CODE")`. `fields` replace any other field."""
    span = m.TrialSpan(0.0, 24.0, 2401, 100.0, "end")
    base = m.Trial(id=topics.result_id(device, seq), seq=seq, site=site, device=device,
                   ts=1_700_000_000.0 + seq, model_version="gait-cnn@3", task="classify", trial=span)
    if error is not None:
        out = dataclasses.replace(base, error=error)
    elif not walk:
        out = dataclasses.replace(base, steps=0, reason="no walk: activity never rose above still standing")
    else:
        out = dataclasses.replace(
            base, walk_start_s=2.5, walk_end_s=19.25, turn_start_s=9.0, turn_end_s=11.5, steps=18,
            cadence_spm=96.4, step_times_s=[3.1, 3.7, 4.3],
            phase_s={"still_before": 2.5, "walk_out": 6.5, "turn": 2.5, "walk_back": 7.75,
                     "still_after": 4.75})
    return dataclasses.replace(out, **fields)


TRIAL_CHANNELS = ["acc_x", "acc_y", "acc_z", "gyr_x", "gyr_y", "gyr_z"]


def trial_answer(label: str = "no_risk", p: float = 0.8, *, reasons: tuple[str, ...] = (),
                 features: dict[str, float] | None = None, **fields: Any) -> m.TrialAnswer:
    """A tug_seed_trial bundle's answer (labels no_risk, balance_risk; registry features age, TUG, steps):
    `label` at probability `p`, deferred when `reasons` are given. `fields` replace any other field."""
    features = features or {"age": 78.0, "TUG": 12.0, "steps": 18.0}
    probs = {k: p if k == label else round(1 - p, 6) for k in ("no_risk", "balance_risk")}
    ans = m.TrialAnswer(label=label, confidence=p, probs=probs,
                        decision="defer" if reasons else "accept", reasons=list(reasons),
                        scores={"confidence": p, "ood": 0.4, "disagreement": 0.1}, features=features,
                        percentiles={name: 50.0 + 5 * i for i, name in enumerate(features)})
    return dataclasses.replace(ans, **fields)


def screened(device: str, seq: int, answer: m.TrialAnswer | None, *, code: str = "AB-123", referred: bool = False,
             not_scored: str | None = None, points: int = 240, **fields: Any) -> m.Trial:
    """A walked trial (`trial`) of participant `code` with a screening `answer`, or `not_scored` ("reason:
    detail"); the trial's signal (6 channels, `points` each) comes with it as the agent sends it: with a
    deferred answer, a referral (`referred`: the answer is not the normal label) or a trial not scored."""
    if answer is not None and (referred or answer.decision == "defer"):
        answer = dataclasses.replace(answer, referred=True)  # as the agent marks it
    base = trial(device, seq, participant=participant(code), answer=answer, not_scored=not_scored)
    if (answer is not None and answer.decision == "defer") or referred or not_scored:
        values = [[round(math.sin(i / 6 + c), 4) for i in range(points)] for c in range(len(TRIAL_CHANNELS))]
        base = dataclasses.replace(base, signal=m.Signal(list(TRIAL_CHANNELS), base.trial.rate_hz,
                                                         base.trial.start_s, values))
    return dataclasses.replace(base, **fields)
