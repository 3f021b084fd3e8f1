"""The agent's optional Prometheus endpoint (issue 16): a real Agent on the session's stream bundle against a
real mosquitto serves what it counted, read by Prometheus' own text-format parser; without [prometheus] port the
agent never imports prometheus_client."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from streamfactory import recording, write_csv

from edgekit.agent import Agent
from edgekit.config import AgentConfig, validate


def config(bundle: Path, rec: Path, outbox: Path, broker: str | None, **extra: object) -> AgentConfig:
    return validate(AgentConfig, {
        "device_id": "dev-prom", "site": "test", "allow_unsigned": True, "bundle": str(bundle),
        "source": {"kind": "replay", "path": str(rec), "speed": 0},
        "mqtt": {"url": broker}, "outbox": {"path": str(outbox)}, "runtime": {"intra_op_threads": 1}, **extra,
    }, "tests/test_telemetry.py")


@pytest.mark.torch
@pytest.mark.broker
def test_the_agent_serves_its_counts_for_prometheus(stream_bundle, mosquitto, tmp_path):
    rec = tmp_path / "rec.csv"
    write_csv(rec, recording(1000.0, 2.0))
    cfg = config(stream_bundle, rec, tmp_path / "o.db", mosquitto.url, prometheus={"port": 0})
    with Agent(cfg) as agent:
        summary = agent.run(drain_timeout_s=20)
        with urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(text) for s in f.samples}
    assert summary.windows > 0 and summary.queued == 0
    assert got[("edgekit_agent_windows_total", ())] == summary.windows
    assert got[("edgekit_agent_deferrals_total", ())] == summary.deferred
    assert got[("edgekit_agent_quarantined_total", ())] == summary.quarantined
    assert got[("edgekit_agent_outbox_queued", ())] == 0
    assert got[("edgekit_agent_broker_connected", ())] == 1
    assert got[("edgekit_agent_published_total", ())] == summary.published
    published = got[("edgekit_agent_publish_seconds_count", ())]
    assert published >= 1 and got[("edgekit_agent_publish_seconds_bucket", (("le", "+Inf"),))] == published
    assert got[("edgekit_agent_publish_seconds_sum", ())] > 0
    info = [k for k in got if k[0] == "edgekit_agent_info"]
    assert dict(info[0][1]) == {"site": "test", "device": "dev-prom", "model_version": agent.model_version,
                                "signature": "unchecked"}
    with pytest.raises(OSError):  # closed with the agent
        urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=2)


@pytest.mark.torch
def test_without_a_port_the_agent_never_imports_prometheus_client(stream_bundle, tmp_path):
    rec = tmp_path / "rec.csv"
    write_csv(rec, recording(1000.0, 0.5))
    code = ("import sys\nfrom edgekit.cli import main\n"
            f"args = ['run', '--bundle', {str(stream_bundle)!r}, '--source', 'replay:{rec}', '--speed', '0',"
            f" '--broker', '', '--outbox', {str(tmp_path / 'o.db')!r}, '--allow-unsigned']\n"
            "try:\n    main(args)\nexcept SystemExit as e:\n    code = e.code\n"
            "print('PROM' if 'prometheus_client' in sys.modules else 'NO_PROM')\nsys.exit(code)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "NO_PROM" in out.stdout
