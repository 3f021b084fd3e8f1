"""Model rollout on the device (issue 16): the bundle command's bundle fetched, checked, swapped in between two
source items, watched, and rolled back when it misbehaves. The agent (the composition root) builds the models
(`prepare`) and swaps them (`swap`); this module decides when. Standard library and numpy (via heldout.py)
only: never torch, never the hub.

    bundle command (paho's thread) -> worker thread: fetch over HTTP(S) with the command's token, no redirects
    -> archive size and sha256 -> unpack into the store -> signature under the agent's public key and every
    file's sha256 (manifest.load_bundle) -> input contract (CONTRACT: the windower and source stay) -> load
    (`prepare`) -> on-device parity on heldout.npz (heldout.check_heldout) -> ready
    agent's loop, between two source items (`due`, `step`): swap, `current` link replaced (os.replace) -> watch
    the deferral and quarantine rates for watch_s and at least min_windows windows -> healthy, or rolled back
    (the old models swapped back, the link put back)

A version that failed (signature, contract, load, parity, band) is remembered in the store's rollout.json and
never tried again, whatever the retained command says. The store:

    STORE/rollout.json            what the device knows (running, previous, refused versions with why, the
                                  state the status says), replaced atomically
    STORE/current -> VERSION      the bundle the agent runs (a relative link, replaced with os.replace)
    STORE/previous -> VERSION     the one it ran before, kept for a rollback
    STORE/VERSION/                unpacked bundles (the configured one is copied in at the first swap)

A restart while a new bundle is watched counts as its failure (the agent may have died of it): the links go
back to the previous bundle before the agent loads anything (`start_bundle`).
"""

from __future__ import annotations

import logging
import os
import shutil
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from edgekit.contract import archive
from edgekit.contract.messages import BundleCommand, Rollout, RolloutState
from edgekit.errors import ConfigError, DataError, EdgekitError, ModelError

log = logging.getLogger(__name__)

STATE_FILE = "rollout.json"
CURRENT, PREVIOUS = "current", "previous"
# What must not change under a running agent: its source, windower and channel selection are built from these.
CONTRACT = ("kind", "channels", "rate_hz", "window_size", "window_hop", "max_gap_s")
RETRY_MIN_S, RETRY_MAX_S = 1.0, 60.0  # a hub that cannot be reached: retried with backoff while the command stands
CHUNK = 1 << 16


class Refusal(EdgekitError):
    """A bundle this device will not run. `state` is what its status says (refused | rolled_back | failed);
    `final`: the version is never tried again."""

    def __init__(self, state: RolloutState, message: str, *, final: bool) -> None:
        self.state = state
        self.final = final
        super().__init__(message)


@dataclass(frozen=True)
class Counts:
    """The agent's counters the watch compares: windows, deferred windows, quarantined items, samples."""

    windows: int
    deferred: int
    quarantined: int
    samples: int

    def minus(self, other: Counts) -> Counts:
        return Counts(self.windows - other.windows, self.deferred - other.deferred,
                      self.quarantined - other.quarantined, self.samples - other.samples)


def band_verdict(cmd: BundleCommand, since: Counts) -> str | None:
    """Why the new bundle's rates since the swap leave the command's bands, or None when they are inside. The
    deferral rate is deferred / windows; the quarantine rate quarantined / (samples + quarantined)."""
    deferral = since.deferred / since.windows if since.windows else 0.0
    items = since.samples + since.quarantined
    quarantine = since.quarantined / items if items else 0.0
    for name, rate, (low, high) in (("deferral", deferral, cmd.deferral_band),
                                    ("quarantine", quarantine, cmd.quarantine_band)):
        if not low <= rate <= high:
            return (f"{name} rate {rate:.3f} outside the band [{low:g}, {high:g}] over {since.windows} windows "
                    f"({since.deferred} deferred, {since.quarantined} quarantined)")
    return None


def contract_changes(old: Any, new: Any) -> list[str]:
    """The input contract fields (CONTRACT) in which manifest `new` differs from `old`, as 'key old -> new'; a
    trial bundle and a window bundle never swap for each other."""
    out = [f"{key} {getattr(old.input, key)!r} -> {getattr(new.input, key)!r}" for key in CONTRACT
           if getattr(old.input, key) != getattr(new.input, key)]
    if (old.input.extractor == "trial") != (new.input.extractor == "trial"):
        out.append(f"extractor {old.input.extractor!r} -> {new.input.extractor!r}")
    return out


# --- the store --------------------------------------------------------------------------------------


class BundleStore:
    """Unpacked bundles by version, the `current` and `previous` links, and rollout.json."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, version: str) -> Path:
        return self.root / version

    def link(self, name: str) -> str | None:
        """The version a link names, or None when there is no such link (or it names nothing unpacked)."""
        link = self.root / name
        if not link.is_symlink():
            return None
        version = os.readlink(link)
        return version if (self.root / version).is_dir() else None

    def point(self, name: str, version: str | None) -> None:
        """Make link `name` name `version` (None removes it), atomically: a new link renamed over the old."""
        link = self.root / name
        if version is None:
            link.unlink(missing_ok=True)
            return
        tmp = self.root / f".{name}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(version)
        os.replace(tmp, link)

    def read(self) -> dict[str, Any]:
        try:
            data = orjson.loads((self.root / STATE_FILE).read_bytes())
        except FileNotFoundError:
            return {}
        except orjson.JSONDecodeError as exc:
            log.warning("rollout.state_unreadable path=%s error=%s (starting afresh)", self.root / STATE_FILE, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def write(self, state: dict[str, Any]) -> None:
        tmp = self.root / f".{STATE_FILE}.{os.getpid()}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(orjson.dumps(state, option=orjson.OPT_INDENT_2))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.root / STATE_FILE)

    def adopt(self, bundle: Path, version: str) -> Path:
        """The bundle directory `bundle` copied into the store as `version` (kept as it is when already there)."""
        target = self.path(version)
        if target.is_dir():
            return target
        tmp = self.root / f".adopt-{version}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(bundle, tmp, symlinks=False)
        os.replace(tmp, target)
        return target

    def prune(self, keep: set[str]) -> None:
        """Remove unpacked bundles other than `keep` (and leftovers of interrupted work)."""
        for entry in self.root.iterdir():
            if entry.name in keep or entry.name in (STATE_FILE, CURRENT, PREVIOUS) or entry.is_symlink():
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.name.startswith("."):
                entry.unlink(missing_ok=True)


def configured_version(store: BundleStore, configured: Path) -> str | None:
    """The configured bundle's version, or None when the config names the store's own `current` link (the
    store then decides what runs, and a rollout changes what the link names, not the config)."""
    if Path(configured).absolute() == (store.root / CURRENT).absolute():
        return None
    return archive.bundle_version(configured)


def start_bundle(store: BundleStore, configured: Path) -> Path:
    """The bundle the agent loads at start: the store's `current` when a rollout put one there for this
    configured bundle (or the config names that link), else `configured`. A restart during a watch is that
    bundle's failure: the links go back first, and the version is remembered as rolled back."""
    state = store.read()
    mine = configured_version(store, configured)
    if mine is not None and state.get("configured") not in (None, mine):
        log.warning("rollout.config_changed configured=%s was=%s store=%s (the config's bundle wins; the store "
                    "starts afresh)", mine, state.get("configured"), store.root)
        store.point(CURRENT, None)
        store.point(PREVIOUS, None)
        store.write({"configured": mine, "refused": state.get("refused", {})})
        return configured
    if state.get("state") == "watching" and state.get("previous"):
        failed, back = state.get("running"), state["previous"]
        reason = "the agent restarted while the new bundle was watched"
        store.point(CURRENT, back)
        store.point(PREVIOUS, state.get("before"))
        state.update(state="rolled_back", running=back, previous=state.get("before"), reason=reason,
                     since=time.time())
        state.setdefault("refused", {})[str(failed)] = reason
        store.write(state)
        log.warning("rollout.rolled_back version=%s running=%s reason=%r", failed, back, reason)
    current = store.link(CURRENT)
    return store.path(current) if current is not None else configured


# --- fetching ---------------------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is refused: urllib would send the Authorization header (the device's token) to its target."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        return None


def fetch(cmd: BundleCommand, dest: Path, *, ca_file: Path | None, timeout_s: float, max_bytes: int) -> None:
    """GET the command's url with its token into `dest`; the body must be the command's size and sha256.
    Refusal(final=False) for an answer that will not change (4xx, a wrong size or sha256); OSError for one that
    may (network, 5xx)."""
    import hashlib

    if cmd.size > max_bytes:
        raise Refusal("refused", f"the bundle is {cmd.size} bytes, more than rollout.max_bytes = {max_bytes}",
                      final=True)
    handlers: list[Any] = [_NoRedirect()]
    if cmd.url.startswith("https://"):
        handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(
            cafile=str(ca_file) if ca_file else None)))
    opener = urllib.request.build_opener(*handlers)
    req = urllib.request.Request(cmd.url, headers={"Authorization": f"Bearer {cmd.token}",
                                                   "User-Agent": "edgekit-agent"})
    digest, size = hashlib.sha256(), 0
    try:
        with opener.open(req, timeout=timeout_s) as resp, open(dest, "wb") as fh:
            while block := resp.read(CHUNK):
                size += len(block)
                if size > cmd.size:
                    break
                digest.update(block)
                fh.write(block)
    except urllib.error.HTTPError as exc:
        if 400 <= exc.code < 500 or 300 <= exc.code < 400:
            raise Refusal("failed", f"the hub answered HTTP {exc.code} {exc.reason} for the bundle",
                          final=False) from None
        raise OSError(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise OSError(str(exc.reason)) from None
    if size != cmd.size or digest.hexdigest() != cmd.sha256:
        raise Refusal("refused", f"the download is not the command's bundle: {size} bytes, sha256 "
                      f"{digest.hexdigest()[:16]}... (expected {cmd.size} bytes, {cmd.sha256[:16]}...)", final=False)


# --- the rollout ------------------------------------------------------------------------------------


@dataclass
class _Ready:
    cmd: BundleCommand
    path: Path
    manifest: Any
    loaded: Any


@dataclass
class _Watch:
    cmd: BundleCommand
    start: Counts
    started_s: float
    next_s: float
    old: Any
    old_path: Path
    old_manifest: Any
    before: str | None  # the `previous` before this swap: what a rollback restores


class RolloutControl:
    """One device's rollouts. `command` takes bundle commands (any thread); a worker thread fetches and checks;
    the agent's loop calls `due` per source item and `step` when it says so. `on_change` is called (any
    thread) whenever `status()` changes.

    prepare(path, manifest) -> loaded: the agent's models for a bundle (raises when they do not load).
    swap(loaded, path) -> loaded: the agent runs `loaded` from now on and hands back what it ran.
    """

    def __init__(self, store: BundleStore, running: Path, manifest: Any, *, configured: Path,
                 public_key: Path | None, ca_file: Path | None, timeout_s: float, max_bytes: int,
                 prepare: Callable[[Path, Any], Any], on_change: Callable[[], None],
                 providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> None:
        self.store = store
        self._running_path = Path(running)
        self._manifest = manifest
        self._public_key = public_key
        self._ca_file = ca_file
        self._timeout_s = timeout_s
        self._max_bytes = max_bytes
        self._prepare = prepare
        self._on_change = on_change
        self._providers = providers
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()  # set while no watch runs: the worker takes the next command only then
        self._idle.set()
        self._wanted: BundleCommand | None = None
        self._withdrawn = False  # the hub cleared the retained command: work not yet swapped in is dropped
        self._ready: _Ready | None = None
        self._watch: _Watch | None = None
        self._thread: threading.Thread | None = None
        state = store.read()
        version = archive.bundle_version(running)
        state.setdefault("configured", configured_version(store, configured))
        state.setdefault("refused", {})
        if state.get("running") != version:
            state.update(running=version, previous=store.link(PREVIOUS) if store.link(CURRENT) == version else None)
        state.setdefault("state", "idle")
        self._state = state
        store.write(state)

    # --- what the status says ---

    @property
    def running(self) -> str:
        return str(self._state["running"])

    def status(self) -> Rollout:
        s = self._state
        return Rollout(s.get("state", "idle"), s.get("running"), s.get("previous"), s.get("target"),
                       s.get("deployment"), s.get("reason"), s.get("since"))

    def _set(self, **changes: Any) -> None:
        with self._lock:
            self._state.update(changes, since=time.time())
            self.store.write(self._state)
        s = self._state
        log.info("rollout.state state=%s running=%s previous=%s target=%s deployment=%s reason=%r", s.get("state"),
                 s.get("running"), s.get("previous"), s.get("target"), s.get("deployment"), s.get("reason"))
        self._on_change()

    # --- commands (paho's thread) ---

    def command(self, payload: bytes, where: str) -> None:
        """A retained bundle command: taken by the worker (the newest wins). An empty payload (the hub cleared it:
        the rollout stopped) drops a command not yet swapped in, and leaves a swapped-in one to its watch; a
        malformed one changes nothing."""
        if not payload:
            if self._thread is not None:
                log.info("rollout.command_withdrawn (what is not swapped in yet is dropped)")
                self._wanted, self._withdrawn = None, True
                self._wake.set()
            return
        try:
            cmd = BundleCommand.decode(payload, where)
        except DataError as exc:
            log.warning("rollout.command_refused %s", exc)
            return
        log.info("rollout.command deployment=%s version=%s model_version=%s watch_s=%g", cmd.deployment,
                 cmd.version, cmd.model_version, cmd.watch_s)
        self._wanted = cmd
        self._wake.set()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="edgekit-rollout", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._idle.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # --- the worker thread ---

    def _work(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._idle.wait()  # a new command waits for the watch of the previous one to end
            if self._stop.is_set():
                return
            self._wake.clear()
            cmd, self._wanted = self._wanted, None
            if cmd is None:
                continue
            self._withdrawn = False
            try:
                self._apply(cmd)
                if self._withdrawn and self._ready is None and self._watch is None and not self._stop.is_set():
                    self._set(state="idle", reason="the hub withdrew the bundle command before it ran")
            except Refusal as exc:
                if exc.final:
                    self._state["refused"][cmd.version] = exc.message
                self._set(state=exc.state, target=cmd.version, deployment=cmd.deployment, reason=exc.message)
                log.warning("rollout.%s version=%s deployment=%s reason=%r final=%s", exc.state, cmd.version,
                            cmd.deployment, exc.message, exc.final)
            except Exception:  # a bug must not end the thread nor the agent: the device keeps its bundle
                log.exception("rollout.failed version=%s", cmd.version)
                self._set(state="failed", target=cmd.version, deployment=cmd.deployment,
                          reason="an error in the agent (see its log)")

    def _superseded(self, cmd: BundleCommand) -> bool:
        """The agent stops, or a command for another version came meanwhile (the same one again, as the broker
        resends a retained command after each reconnect, does not interrupt the work)."""
        wanted = self._wanted
        return self._stop.is_set() or self._withdrawn or (wanted is not None and wanted.version != cmd.version)

    def _apply(self, cmd: BundleCommand) -> None:
        if cmd.version == self.running:
            self._set(state="healthy", target=cmd.version, deployment=cmd.deployment, reason=None)
            return
        before = self._state["refused"].get(cmd.version)
        if before is not None:
            raise Refusal("rolled_back", f"not tried again: {before}", final=False)
        self._set(state="fetching", target=cmd.version, deployment=cmd.deployment, reason=None)
        tar = self.store.root / f".download-{cmd.version}.tar"
        if not self._download(cmd, tar):
            return  # a newer command, or the agent stops
        self._set(state="checking", reason=None)
        incoming = self.store.root / f".incoming-{cmd.version}-{os.getpid()}"
        shutil.rmtree(incoming, ignore_errors=True)
        try:
            try:
                archive.unpack(tar, incoming, max_bytes=self._max_bytes)
            except DataError as exc:
                raise Refusal("refused", f"the archive is not a bundle: {exc}", final=False) from None
            finally:
                tar.unlink(missing_ok=True)
            if archive.bundle_version(incoming) != cmd.version:
                raise Refusal("refused", f"the archive holds version {archive.bundle_version(incoming)}, not the "
                              f"command's {cmd.version}", final=False)
            manifest = self._verify(incoming)
            path = self.store.path(cmd.version)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(incoming, path)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
        from edgekit.heldout import check_heldout

        try:
            try:
                loaded = self._prepare(path, manifest)
            except ConfigError as exc:  # this agent cannot swap such a bundle in (a screening station)
                raise Refusal("refused", str(exc), final=True) from None
            except Exception as exc:
                raise Refusal("rolled_back", f"failed to load: {exc}", final=True) from None
            try:
                report = check_heldout(path, manifest, self._providers)
            except ModelError as exc:
                raise Refusal("rolled_back", f"failed on-device parity: {exc}", final=True) from None
        except Refusal:
            shutil.rmtree(path, ignore_errors=True)
            raise
        log.info("rollout.checked version=%s rows=%d labels_agree=%d max_abs=%s", cmd.version, report["rows"],
                 report["labels_agree"], report["max_abs"])
        if self._superseded(cmd):
            return
        self._idle.clear()
        self._ready = _Ready(cmd, path, manifest, loaded)

    def _download(self, cmd: BundleCommand, tar: Path) -> bool:
        """Fetch until it works, a newer command comes, or the agent stops (False then)."""
        delay = RETRY_MIN_S
        while True:
            try:
                fetch(cmd, tar, ca_file=self._ca_file, timeout_s=self._timeout_s, max_bytes=self._max_bytes)
                log.info("rollout.fetched version=%s bytes=%d", cmd.version, cmd.size)
                return True
            except OSError as exc:
                tar.unlink(missing_ok=True)
                reason = f"cannot fetch the bundle from {cmd.url}: {exc}"
                if self._state.get("reason") != reason:
                    self._set(reason=reason)
                log.warning("rollout.fetch_retry version=%s in_s=%g reason=%r", cmd.version, delay, reason)
            except Refusal:
                tar.unlink(missing_ok=True)
                raise
            if self._stop.wait(delay) or self._superseded(cmd):
                return False
            delay = min(delay * 2, RETRY_MAX_S)

    def _verify(self, path: Path) -> Any:
        """Signature (when the agent has a key), every file's sha256, and the input contract."""
        from edgekit.manifest import load_bundle

        try:
            manifest = load_bundle(path, public_key=self._public_key)
        except ModelError as exc:
            raise Refusal("refused", f"{exc.message}", final=True) from None
        changed = contract_changes(self._manifest, manifest)
        if changed:
            raise Refusal("refused", "its input contract differs from the running bundle's: " + "; ".join(changed),
                          final=True)
        return manifest

    # --- the agent's loop ---

    def due(self, now: float) -> bool:
        """A checked bundle waits to be swapped in, or the watch has something to decide (cheap: per item)."""
        return self._ready is not None or (self._watch is not None and now >= self._watch.next_s)

    def step(self, now: float, counts: Counts, swap: Callable[[Any, Path], Any]) -> None:
        """Between two source items: swap a ready bundle in, or judge the watched one."""
        ready, watch = self._ready, self._watch
        if ready is not None:
            self._ready = None
            self._swap_in(ready, now, counts, swap)
        elif watch is not None and now >= watch.next_s:
            self._judge(watch, now, counts, swap)

    def _swap_in(self, ready: _Ready, now: float, counts: Counts, swap: Callable[[Any, Path], Any]) -> None:
        old_version, old_path = self.running, self._running_path
        kept = self.store.adopt(old_path, old_version)  # the old bundle stays on disk, in the store
        old = swap(ready.loaded, ready.path)
        self.store.point(PREVIOUS, old_version)
        self.store.point(CURRENT, ready.cmd.version)
        before = self._state.get("previous")
        kept_manifest = self._manifest
        self._running_path, self._manifest = ready.path, ready.manifest
        self._watch = _Watch(ready.cmd, counts, now, now + ready.cmd.watch_s, old, kept, kept_manifest, before)
        log.info("rollout.swapped version=%s previous=%s watch_s=%g min_windows=%d", ready.cmd.version, old_version,
                 ready.cmd.watch_s, ready.cmd.min_windows)
        self._set(state="watching", running=ready.cmd.version, previous=old_version, before=before, reason=None)

    def _judge(self, watch: _Watch, now: float, counts: Counts, swap: Callable[[Any, Path], Any]) -> None:
        since = counts.minus(watch.start)
        cmd = watch.cmd
        if since.windows < cmd.min_windows:
            watch.next_s = now + 1.0
            return
        why = band_verdict(cmd, since)
        self._watch = None
        if why is None:
            log.info("rollout.healthy version=%s windows=%d deferred=%d quarantined=%d after_s=%.1f", cmd.version,
                     since.windows, since.deferred, since.quarantined, now - watch.started_s)
            self._set(state="healthy", reason=None)
            self.store.prune({self.running, str(self._state.get("previous"))})
        else:
            swap(watch.old, watch.old_path)
            old_version = str(self._state["previous"])
            self.store.point(CURRENT, old_version)
            self.store.point(PREVIOUS, watch.before)
            self._running_path, self._manifest = watch.old_path, watch.old_manifest
            self._state["refused"][cmd.version] = why
            log.warning("rollout.rolled_back version=%s running=%s reason=%r", cmd.version, old_version, why)
            self._set(state="rolled_back", running=old_version, previous=watch.before, reason=why)
            self.store.prune({old_version, str(watch.before)})
        self._idle.set()

