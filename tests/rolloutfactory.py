"""Bundles for rollout tests (issue 16), made from one exported bundle: a new version (another data fingerprint,
so its results name another model_version), one that fails on-device parity (heldout.npz's answers changed,
its sha256 and the signature made anew: a bundle signed and intact that does not reproduce here), one whose
input contract differs, one that defers every window, and a tampered one (manifest changed after signing).
Plus a small HTTP server that hands out an archive for one bearer token, as the hub's /bundles route does."""

from __future__ import annotations

import hashlib
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from edgekit.contract import archive
from edgekit.contract.messages import BundleCommand
from edgekit.manifest import MANIFEST_FILE, sha256_file, sign_bundle


def variant(src: Path, dst: Path, key: Path | None, *, changes: dict[tuple[str, ...], Any] | None = None,
            heldout: str | None = None, tamper: dict[tuple[str, ...], Any] | None = None) -> Path:
    """A copy of bundle `src` at `dst`: manifest `changes` ((key, key, ...) -> value) applied, heldout.npz's answers changed
    when `heldout` = "wrong", signed with `key`; then `tamper` applied to manifest.json after signing."""
    shutil.copytree(src, dst)
    (dst / "manifest.sig").unlink(missing_ok=True)
    if heldout == "wrong":
        path = dst / "heldout.npz"
        with np.load(path) as npz:
            held = {k: npz[k] for k in npz.files}
        held["probs"] = held["probs"][:, ::-1].copy()  # every label flips: no device reproduces these
        np.savez_compressed(path, **held)
        changes = {**(changes or {}), ("files", "heldout.npz"): sha256_file(path)}
    _edit(dst, changes or {})
    if key is not None:
        sign_bundle(dst, key)
    if tamper:
        _edit(dst, tamper)
    return dst


def _edit(bundle: Path, changes: dict[tuple[str, ...], Any]) -> None:
    """Set each (key, key, ...) path of manifest.json to its value."""
    if not changes:
        return
    path = bundle / MANIFEST_FILE
    data = orjson.loads(path.read_bytes())
    for keys, value in changes.items():
        node = data
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")


def command(bundle: Path, url: str, token: str = "t" * 32, *, deployment: str = "d-1", watch_s: float = 1.0,
            min_windows: int = 4, deferral_band: tuple[float, float] = (0.0, 1.0)) -> tuple[BundleCommand, bytes]:
    """The bundle command for `bundle` served at `url`, and the archive the server must hand out."""
    blob = archive.pack(bundle)
    return BundleCommand(deployment=deployment, version=archive.bundle_version(bundle), url=url, token=token,
                         sha256=hashlib.sha256(blob).hexdigest(), size=len(blob), model_version="stream@test",
                         watch_s=watch_s, min_windows=min_windows, deferral_band=deferral_band,
                         quarantine_band=(0.0, 1.0), ts=1.0), blob


class BundleServer:
    """http://127.0.0.1:PORT/bundles/ID answers `archives[ID]` to `Authorization: Bearer TOKEN`, 403 otherwise
    (https:// with `tls`, a certificate and its key). A context manager; `requests` counts what it answered."""

    def __init__(self, token: str = "t" * 32, tls: tuple[Path, Path] | None = None) -> None:
        self.token = token
        self.archives: dict[str, bytes] = {}
        self.requests: list[tuple[str, int]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                blob = outer.archives.get(self.path.rsplit("/", 1)[-1])
                ok = blob is not None and self.headers.get("Authorization") == f"Bearer {outer.token}"
                outer.requests.append((self.path, 200 if ok else 403))
                self.send_response(200 if ok else 403)
                self.send_header("Content-Length", str(len(blob) if ok and blob is not None else 0))
                self.end_headers()
                if ok and blob is not None:
                    self.wfile.write(blob)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if tls is not None:  # (certificate, key): https
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> BundleServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
