"""The agent's resources are held by an ExitStack: when a later one fails to open, the ones already open are
closed before the error leaves `Agent.__enter__` (issue 11: a failing transport does not leak the outbox)."""

from __future__ import annotations

from pathlib import Path

import pytest

import edgekit.outbox
import edgekit.transport
from edgekit.agent import Agent
from edgekit.config import AgentConfig, validate
from edgekit.errors import TransportError

pytestmark = [pytest.mark.data, pytest.mark.torch]


class RefusingTransport:
    """A transport that cannot start (as one whose TLS files are unreadable would)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise TransportError("cannot start", where="mqtt://127.0.0.1:1")


def test_a_transport_that_fails_to_open_does_not_leak_the_outbox(skab_bundle: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[edgekit.outbox.Outbox] = []
    real_outbox = edgekit.outbox.Outbox

    class RecordingOutbox(real_outbox):  # the real outbox, remembered so the test can look at it
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            opened.append(self)

    monkeypatch.setattr(edgekit.outbox, "Outbox", RecordingOutbox)
    monkeypatch.setattr(edgekit.transport, "Transport", RefusingTransport)
    cfg = validate(AgentConfig, {
        "device_id": "dev-r", "site": "test", "allow_unsigned": True, "bundle": str(skab_bundle),
        "source": {"kind": "simulated", "generator": "pump", "duration_s": 10},
        "mqtt": {"url": None}, "outbox": {"path": str(tmp_path / "o.db")},
    }, "tests/test_agent_resources.py")
    with pytest.raises(TransportError, match="cannot start"):
        with Agent(cfg):
            pass
    assert len(opened) == 1 and opened[0]._closed
