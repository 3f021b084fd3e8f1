"""The station screen: a small local web page where the operator of a screening station enters a
participant code, starts and stops the trial, and reads the answer in plain words. Works offline: one page
with its own CSS and script, served by the agent from the standard library (no network, no CDN).

Bound to [trial] screen (e.g. 127.0.0.1:8088: the station's own display). The page POSTs JSON only: a
form on another site cannot send application/json without a preflight this server never answers, so a
page elsewhere cannot start or stop a trial. Must not import onnxruntime, paho or torch.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from edgekit.contract.messages import TrialCommand
from edgekit.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MAX_BODY = 4096  # bytes of a command's JSON body: a code, an age and a sex


class StationScreen:
    """Serves the page in a daemon thread until `close()`. `command` receives the operator's TrialCommands;
    `state` returns what the page shows (TrialControl.state)."""

    def __init__(self, listen: str, command: Callable[[TrialCommand], None], state: Callable[[], dict[str, Any]],
                 device: str) -> None:
        host, _, port = listen.rpartition(":")
        page = resources.files("edgekit").joinpath("data/station.html").read_text(encoding="utf-8")
        handler = type("Handler", (_Handler,), {"command": staticmethod(command), "state": staticmethod(state),
                                                "page": page.replace("{{device}}", _html(device)).encode(),
                                                "device": device})
        try:
            self.server = ThreadingHTTPServer((host.strip("[]"), int(port)), handler)
        except OSError as exc:
            raise ConfigError(f"cannot serve the station screen on {listen}: {exc.strerror or exc}",
                              where="trial.screen", hint="choose a free port, or an address of this device") from None
        self.server.daemon_threads = True
        self.url = f"http://{listen}/"
        self._thread = threading.Thread(target=self.server.serve_forever, name="edgekit-station-screen", daemon=True)
        self._thread.start()
        log.info("station.screen url=%s", self.url)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def command_from(action: str, body: dict[str, Any]) -> TrialCommand:
    """The page's JSON body as a TrialCommand: `participant` (code) and the operator's `age`, `sex` on start.
    DataError naming the field when one is not what the page should send."""
    operator: dict[str, float | str] = {}
    if action == "start":
        age, sex = body.get("age"), body.get("sex")
        if age not in (None, ""):
            try:
                operator["age"] = float(age)
            except (TypeError, ValueError):
                raise DataError(f"age must be a number of years (got {str(age)[:20]!r})", where="age") from None
        if sex not in (None, ""):
            operator["sex"] = str(sex)[:8]
    code = body.get("participant") or None
    if code is not None and not isinstance(code, str):
        raise DataError("participant must be text", where="participant")
    return TrialCommand(action, code.strip() if code else None, operator, origin="screen")  # type: ignore[arg-type]


class _Handler(BaseHTTPRequestHandler):
    command: Callable[[TrialCommand], None]
    state: Callable[[], dict[str, Any]]
    page: bytes
    device: str

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("station.http " + format, *args)

    def _send(self, status: HTTPStatus, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Frame-Options", "DENY")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: HTTPStatus, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/":
            self._send(HTTPStatus.OK, self.page, "text/html; charset=utf-8")
        elif self.path == "/state":
            self._json(HTTPStatus.OK, {"device": self.device, **self.state()})
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {self.path[:60]!r}"})

    def do_POST(self) -> None:  # noqa: N802
        action = self.path.strip("/")
        if action not in ("start", "stop", "cancel"):
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no action {action[:20]!r}"})
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            return self._json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "send JSON (Content-Type: application/json)"})
        size = int(self.headers.get("Content-Length") or 0)
        if size > MAX_BODY:
            return self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"body over {MAX_BODY} bytes"})
        try:
            body = json.loads(self.rfile.read(size) or b"{}")
            if not isinstance(body, dict):
                raise DataError("the body must be a JSON object")
            cmd = command_from(action, body)
        except (ValueError, DataError) as exc:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        type(self).command(cmd)
        self._json(HTTPStatus.ACCEPTED, {"ok": True, "action": action})
