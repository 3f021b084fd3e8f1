"""Log line formats for every edgekit program (agent, hub, the rest): `text` (the grep-able `event key=value`
lines) or `json` (one object per line, for a log shipper: `edgekit --log-format json ...`). Only the CLI
configures logging (setup); this module holds the one formatter. Imports nothing of edgekit's programs.
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import datetime, timezone
from typing import Any, TextIO

import orjson

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# Where a message's `key=value` fields start: a space, then a lower-case identifier and '='. A value runs to
# the next such key, so one with spaces stays whole (reason=cannot open the database: ...).
_FIELD = re.compile(r" (?=[a-z_][a-z0-9_]*=)")


def fields(message: str) -> tuple[str, dict[str, str]]:
    """`hub.rejected topic=a/b reason=x y` -> ("hub.rejected", {"topic": "a/b", "reason": "x y"}); a message
    that does not start with one word followed by key=value parts is all `event`-less text: ("", {})."""
    head, *parts = _FIELD.split(message)
    if " " in head or "=" in head:
        return "", {}
    out: dict[str, str] = {}
    for part in parts:
        key, _, value = part.partition("=")
        out.setdefault(key, value)
    return head, out


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601 with ms), level, logger, event and the message's
    key=value fields (as text; `fields`), msg (the whole line as text would show it), exc (a traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        event, found = fields(message)
        obj: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name,
        }
        if event:
            obj["event"] = event
            obj.update({k: v for k, v in found.items() if k not in obj and k != "msg"})
        obj["msg"] = message
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            obj["exc"] = record.exc_text
        return orjson.dumps(obj).decode()


def setup(level: int, fmt: str = "text", stream: TextIO | None = None) -> None:
    """Configure the root logger once (the CLI's call): `fmt` text or json, to stderr by default."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {list(FORMATS)} (got {fmt!r})")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
