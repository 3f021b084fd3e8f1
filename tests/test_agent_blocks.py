"""The agent's block path (source blocks -> Windower.push_many -> Agent.process_many, one outbox transaction
per call) writes exactly what the per-sample, per-window path writes, on recordings with bad lines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from edgekit.agent import Agent
from edgekit.config import AgentConfig, validate
from edgekit.outbox import Outbox
from edgekit.source import open_source
from edgekit.values import Quarantined, Sample
from edgekit.window import Windower

pytestmark = [pytest.mark.data, pytest.mark.torch, pytest.mark.slow]

SKAB_FAULT = "skab/data/valve1/1.csv"
IPOL_TRIAL = "ipol_gait/GaitData/3-2_lb.txt"


def config(bundle: Path, source: Path, outbox: Path) -> AgentConfig:
    return validate(AgentConfig, {
        "device_id": "dev-blocks", "site": "test", "allow_unsigned": True, "bundle": str(bundle),
        "source": {"kind": "replay", "path": str(source), "speed": 0},
        "mqtt": {"url": None}, "outbox": {"path": str(outbox)}, "runtime": {"intra_op_threads": 1},
    }, "tests/test_agent_blocks.py")


def with_bad_lines(src: Path, dst: Path) -> Path:
    """The recording with bad lines in the middle (text, NaN, wrong width, inf), as tests/test_agent.py does."""
    lines = src.read_text().splitlines()
    d = ";" if src.suffix == ".csv" else "\t"
    row = lines[300].split(d)
    bad = [d.join([row[0], "abc", *row[2:]]), d.join([row[0], "nan", *row[2:]]), d.join(row[:4]),
           d.join([row[0], "inf", *row[2:]])]
    dst.write_text("\n".join(lines[:300] + bad + lines[300:2300] + bad[:1] + lines[2300:]) + "\n")
    return dst


def per_window(agent: Agent) -> None:
    """The agent's loop as it was before blocks: one item at a time, Windower.push, Agent.process."""
    inp = agent.manifest.input
    with open_source(agent.cfg.source, channel_names=inp.channels, recording=inp.recording) as source:
        idx = [list(source.channels).index(c) for c in inp.channels]
        windower = Windower(int(inp.window_size), int(inp.window_hop), len(idx), inp.max_gap_s)
        for item in source:
            if isinstance(item, Quarantined):
                agent.counters.quarantined += 1
                agent.counters.quarantine_reasons[item.reason.split(":")[0]] += 1
                continue
            agent.counters.samples += 1
            window = windower.push(Sample(item.t_s, item.values[idx]))
            if window is not None:
                agent.process(window)


def messages(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Outbox payloads by kind, oldest first, without the `ts` stamp (the one field allowed to differ)."""
    out: dict[str, list[dict[str, Any]]] = {}
    with Outbox(path) as box:
        for row in box.pending(10**7):
            obj = orjson.loads(row.payload)
            obj.pop("ts")
            out.setdefault(row.topic.rsplit("/", 1)[1], []).append(obj)
    return out


@pytest.mark.parametrize("which", ["skab", "ipol"])
def test_block_path_writes_what_the_per_window_path_writes(which: str, request: pytest.FixtureRequest,
                                                           data_dir: Path, tmp_path: Path) -> None:
    bundle = request.getfixturevalue(f"{which}_bundle")
    path = with_bad_lines(data_dir / (SKAB_FAULT if which == "skab" else IPOL_TRIAL),
                          tmp_path / ("pump.csv" if which == "skab" else "9-9_lb.txt"))
    with Agent(config(bundle, path, tmp_path / "one.db")) as agent:
        per_window(agent)
        one = agent.counters
    with Agent(config(bundle, path, tmp_path / "blocks.db")) as agent:
        puts: list[int] = []
        put_many = agent.outbox.put_many
        agent.outbox.put_many = lambda items, **kw: puts.append(len(items)) or put_many(items, **kw)  # type: ignore[method-assign]
        summary = agent.run()
        blocks = agent.counters
    assert (blocks.windows, blocks.accepted, blocks.deferred, blocks.samples) == (
        one.windows, one.accepted, one.deferred, one.samples)
    assert blocks.quarantined == one.quarantined == 5 and blocks.quarantine_reasons == one.quarantine_reasons
    assert summary.windows == one.windows > 40
    a, b = messages(tmp_path / "one.db"), messages(tmp_path / "blocks.db")
    assert len(a["result"]) == one.windows and len(a.get("review", [])) == one.deferred
    assert b["result"] == a["result"]  # same ids, labels, probabilities, scores, decisions: bit for bit
    assert b.get("review", []) == a.get("review", [])
    # one transaction per source block, not per window (the last put is the final metrics message); ipol's
    # hop (64) equals the sub-chunk a dirty chunk is re-read in, so there each block completes one window
    assert len(puts) - 1 < (one.windows / 4 if which == "skab" else one.windows + 1), puts


def test_process_many_of_nothing_writes_nothing(skab_bundle: Path, data_dir: Path, tmp_path: Path) -> None:
    with Agent(config(skab_bundle, data_dir / SKAB_FAULT, tmp_path / "o.db")) as agent:
        agent.process_many([])
        assert agent.outbox.backlog() == 0 and agent.counters.windows == 0
