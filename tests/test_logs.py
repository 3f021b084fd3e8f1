"""JSON logs as an option (issue 16): one formatter (edgekit/logs.py) for agent and hub alike; `edgekit
--log-format json ...` writes one JSON object per line with the event and its fields."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

from edgekit import logs


def test_json_log_lines_carry_the_event_and_its_fields():
    record = logging.LogRecord("edgekit.hub.observe", logging.WARNING, __file__, 1,
                               "hub.broker_unreachable broker=%s for_s=%.0f error=%s", ("mqtt://h:1883", 31.2,
                                                                                       "h:1883: Connection refused"),
                               None)
    obj = json.loads(logs.JsonFormatter().format(record))
    assert obj == {"ts": obj["ts"], "level": "warning", "logger": "edgekit.hub.observe",
                   "event": "hub.broker_unreachable", "broker": "mqtt://h:1883", "for_s": "31",
                   "error": "h:1883: Connection refused",
                   "msg": "hub.broker_unreachable broker=mqtt://h:1883 for_s=31 error=h:1883: Connection refused"}
    assert obj["ts"].endswith("+00:00")
    plain = logging.LogRecord("x", logging.INFO, __file__, 1, "not an event line: a=b", (), None)
    assert json.loads(logs.JsonFormatter().format(plain))["msg"] == "not an event line: a=b"
    assert "event" not in json.loads(logs.JsonFormatter().format(plain))


def test_the_cli_writes_json_logs_for_the_hub(tmp_path):
    """`edgekit --log-format json hub ...` with an unreachable broker: its lines are JSON objects."""
    script = ("import sys, threading\nfrom edgekit import cli\n"
              "threading.Timer(6.0, lambda: __import__('os').kill(__import__('os').getpid(), 15)).start()\n"
              "cli.main(sys.argv[1:])\n")
    out = subprocess.run([sys.executable, "-c", script, "-v", "--log-format", "json", "hub", "--broker",
                          "mqtt://127.0.0.1:1", "--db", f"sqlite:///{tmp_path / 'hub.db'}", "--http", ""],
                         capture_output=True, text=True, timeout=60)
    lines = [json.loads(x) for x in out.stderr.splitlines() if x.strip()]
    events = [x.get("event") for x in lines]
    assert "hub.broker_unreachable" in events, out.stderr[-2000:]
    [line] = [x for x in lines if x.get("event") == "hub.broker_unreachable"]
    assert line["broker"] == "mqtt://127.0.0.1:1" and line["error"] == "127.0.0.1:1: Connection refused"
