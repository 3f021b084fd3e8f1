"""A trial bundle through the agent (issue 13): IPOL trials replayed with a bundle trained on the
fall-screening table (its nine columns are trial features) give one answer per trial, computed from the same
features the registry defines; a trial too short to score says so instead; the operator's entries are
checked at start; the participant travels as a pseudonym only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from edgekit.agent import Agent
from edgekit.config import AgentConfig, validate
from edgekit.contract import messages
from edgekit.datasets import read_ipol
from edgekit.errors import ConfigError
from edgekit.outbox import Outbox
from edgekit.recipe import load_recipe
from edgekit.trial_features import compute_trial_features

pytestmark = [pytest.mark.data, pytest.mark.torch]
ROOT = Path(__file__).resolve().parent.parent
IMU = ["Acc_X", "Acc_Y", "Acc_Z", "Gyr_X", "Gyr_Y", "Gyr_Z"]


@pytest.fixture
def bundles(trial_bundles: dict[str, Path]) -> dict[str, Path]:
    return trial_bundles


def config(bundle: Path, trial_file: Path, outbox: Path, **trial: object) -> AgentConfig:
    layout = load_recipe(ROOT / "edgekit" / "recipes" / "ipol_gait.toml").data.layout
    assert layout is not None
    return validate(AgentConfig, {
        "device_id": "station-1", "site": "clinic", "allow_unsigned": True, "bundle": str(bundle),
        "source": {"kind": "replay", "path": str(trial_file), "speed": 0, "layout": layout.model_dump()},
        "mqtt": {"url": None}, "outbox": {"path": str(outbox)}, "runtime": {"intra_op_threads": 1},
        "trial": {"channels": IMU, "detect": "source", **trial},  # each file is one recorded trial
    }, "tests/test_trial_answer.py")


def trials(outbox: Path) -> list[messages.Trial]:
    out = []
    with Outbox(outbox) as box:
        for row in box.pending(10**6):
            if row.topic.endswith("/trial"):
                msg = messages.parse(row.topic, row.payload)
                assert isinstance(msg, messages.Trial)
                out.append(msg)
    return out


@pytest.mark.parametrize("trial", ["6-1", "9-3", "14-2"])
def test_each_trial_gets_one_answer_from_the_registry_features(bundles, data_dir: Path, tmp_path: Path,
                                                              trial: str) -> None:
    path = data_dir / "ipol_gait" / "GaitData" / f"{trial}_lb.txt"
    with Agent(config(bundles["fall_screening"], path, tmp_path / "o.db", participant="AB-1234")) as agent:
        summary = agent.run()
    assert summary.windows == 0
    (msg,) = trials(tmp_path / "o.db")
    assert msg.answer is not None and msg.not_scored is None
    table = read_ipol(path)
    names = list(agent.manifest.input.feature_names)
    expected = compute_trial_features(names, table.values, table.rate_hz)
    assert list(msg.answer.features) == names
    np.testing.assert_array_equal(np.array(list(msg.answer.features.values())), expected)
    assert msg.answer.label in ("non_faller", "faller") and msg.answer.decision in ("accept", "defer")
    assert set(msg.answer.probs) == {"non_faller", "faller"}
    assert msg.participant is not None and msg.participant.startswith("p-")
    raw = (tmp_path / "o.db").read_bytes()
    assert b"AB-1234" not in raw and b"AB1234" not in raw  # the code never leaves the station


def test_a_trial_too_short_to_score_says_so(bundles, data_dir: Path, tmp_path: Path) -> None:
    lines = (data_dir / "ipol_gait" / "GaitData" / "6-1_lb.txt").read_text().splitlines()
    short = tmp_path / "6-1_lb.txt"
    short.write_text("\n".join(lines[:2 + 250]) + "\n")  # 2.5 s at 100 Hz
    with Agent(config(bundles["fall_screening"], short, tmp_path / "o.db")) as agent:
        agent.run()
    (msg,) = trials(tmp_path / "o.db")
    assert msg.answer is None and msg.not_scored is not None and msg.not_scored.startswith("too_short")
    assert msg.participant is None


def test_operator_entries_are_checked_at_start(bundles, data_dir: Path, tmp_path: Path) -> None:
    path = data_dir / "ipol_gait" / "GaitData" / "7-1_lb.txt"
    with pytest.raises(ConfigError, match=r"trial\.operator: the bundle's features need the operator's \['age'\]"):
        Agent(config(bundles["tug_seed_trial"], path, tmp_path / "a.db")).__enter__()
    with Agent(config(bundles["tug_seed_trial"], path, tmp_path / "o.db", operator={"age": 71})) as agent:
        agent.run()
    (msg,) = trials(tmp_path / "o.db")
    assert msg.answer is not None and msg.answer.features["age"] == 71.0
    assert set(msg.answer.features) == {"age", "TUG", "steps"}
    payload = orjson.loads(msg.encode())
    assert payload["answer"]["decision"] == msg.answer.decision


def test_a_trial_bundle_without_a_trial_section_is_refused(bundles, data_dir: Path, tmp_path: Path) -> None:
    cfg = config(bundles["fall_screening"], data_dir / "ipol_gait" / "GaitData" / "6-1_lb.txt", tmp_path / "o.db")
    with pytest.raises(ConfigError, match=r"trial: bundle .* answers per trial and needs the IMU's channels"):
        Agent(cfg.model_copy(update={"trial": None})).__enter__()
