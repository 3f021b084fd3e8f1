"""The composition root: source -> window -> features -> models -> gate -> result -> outbox/MQTT.

The only module that wires the stages together. Never imports torch (tests/test_no_torch.py).

A bundle with a baseline (manifest input.baseline, edgekit/baseline.py) learns this machine's normal from its
first windows (deferred as `commissioning`), from a [baseline] file, or again on the command topic's
`baseline` command, and keeps it in the outbox file's state table: a restart keeps it. A restart while it is
still learning starts the learning over.

What a crash can lose: samples read but not yet in a completed window, and windows completed but not yet
written (at most one source block, <= 2,048 samples at replay speed 0; one window when paced) are lost like
unread samples; replay the source to get them back. Whatever `process_many` has written (one outbox
transaction per call) survives a crash or SIGKILL and is published at least once. With a gait or trial bundle
the open trial's samples (at most MAX_TRIAL_S) are also lost by a crash: its message is sent when the trial
closes (edgekit/trials.py: the operator's stop, stillness, its maximum length), when the source ends, or on
a clean stop.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from edgekit import topics
from edgekit.config import AgentConfig
from edgekit.contract import messages
from edgekit.errors import ConfigError, DataError, ModelError
from edgekit.gate import Gate
from edgekit.mqtt import redact_url
from edgekit.values import Quarantined, SampleBlock, Window

if TYPE_CHECKING:
    from edgekit.pipeline import Judged
    from edgekit.rollout import BundleStore, RolloutControl
    from edgekit.transport import SendKind
    from edgekit.trials import ClosedTrial, TrialControl

log = logging.getLogger(__name__)

SEQ_BLOCK = 1024  # result sequence numbers reserved per outbox write (a gap after restart is harmless)
# Windows per process_many call when a source block completes many: past ~64 the per-window cost stops
# falling (bench/README.md: edge path 267 -> 70 -> 48 us at 1, 8, 64 windows), and this bounds one outbox
# transaction (8 channels, 104 features: a 722-byte result and a 7.2 KB review per deferred window, <= 2 MB at
# 256 windows).
MAX_WINDOWS_PER_CALL = 256
# Longest trial kept for gait.segment (issue 3: still / walk / turn, steps, cadence of a TUG-like trial).
# A TUG takes 7-30 s; 300 s at 100 Hz is 30k rows x 6 channels (1.4 MB). A longer stream (a live source)
# is cut here: the full buffer is segmented and sent as one trial (closed_by "max_duration"), and the next
# sample starts a new trial, so memory stays bounded and no sample goes unsegmented.
MAX_TRIAL_S = 300.0
GAIT_CHANNELS = 6  # gait.segment reads acc xyz (m/s^2) then gyr xyz (rad/s)
# Points per channel of a referred or deferred trial's signal: a 30 s TUG at 100 Hz in 0.075 s blocks, enough
# to see each step (~0.5 s) on the clinician's plot; 6 x 400 numbers are ~17 KB of JSON.
TRIAL_POINTS = 400
FIRST_CONNECT_WAIT_S = 5.0  # at start, the longest wait for the broker before reading (see _await_first_connect)
COMMAND_MAX_AGE_S = 60.0  # an operator's trial command older than this is dropped (see _mqtt_command)
BASELINE_STATE = "baseline"  # the outbox state key of this device's baseline (edgekit/outbox.py put_state)


@dataclass
class Counters:
    windows: int = 0
    accepted: int = 0
    deferred: int = 0
    quarantined: int = 0
    implausible: int = 0  # windows deferred before the models (edgekit/plausible.py)
    commissioning: int = 0  # windows deferred while the baseline was learned (edgekit/baseline.py)
    samples: int = 0
    rate_drift: int = 0  # measurements of a live source's rate off the bundle's (source.RateWatch)
    source_rate_hz: float | None = None  # a live source's last measured rate
    quarantine_reasons: Counter = field(default_factory=Counter)
    started_s: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Summary:
    windows: int
    accepted: int
    deferred: int
    quarantined: int
    published: int
    queued: int
    dropped: int

    def line(self) -> str:
        return (f"windows={self.windows} accepted={self.accepted} deferred={self.deferred} "
                f"quarantined={self.quarantined} published={self.published} queued={self.queued} "
                f"dropped={self.dropped}")


def _downsample(data: np.ndarray, points: int) -> list[list[float]]:
    """(size, C) -> per-channel lists of at most `points` block means, for the reviewer's plot."""
    size = data.shape[0]
    if size > points:
        step = int(np.ceil(size / points))
        cut = (size // step) * step
        data = data[:cut].reshape(-1, step, data.shape[1]).mean(axis=1)
    return np.round(data.T, 5).tolist()


def _downsample_many(windows: list[np.ndarray], points: int) -> list[list[list[float]]]:
    """`_downsample` of each window; windows that need no averaging are rounded in one call (elementwise,
    so the same numbers)."""
    if windows and all(w.shape == windows[0].shape for w in windows) and windows[0].shape[0] <= points:
        return np.round(np.stack(windows).transpose(0, 2, 1), 5).tolist()
    return [_downsample(w, points) for w in windows]


@dataclass(frozen=True)
class Loaded:
    """What the agent runs of one bundle; a rollout swaps it whole (Agent._swap_bundle)."""

    manifest: Any
    models: Any
    pre: Any
    gate: Gate
    pipeline: Any
    reviews: Any
    bundle: Path
    fresh: bool = True  # built for a swap; False: what ran before (its baseline is in memory, as it was)


def rollout_store_default(outbox: Path) -> Path:
    """[rollout] store's default: a folder beside the outbox file, named after it (outbox.db -> outbox.bundles)."""
    return outbox.with_suffix(".bundles")


def _close_quietly(resource: Any) -> None:
    """Close `resource`; a failure is logged, not raised: closing must not hide the error that led here."""
    try:
        resource.close()
    except Exception:
        log.exception("agent.close_failed resource=%s", type(resource).__name__)


class Agent:
    """Runs one config until the source ends or `stop` is set. Use as a context manager."""

    def __init__(self, cfg: AgentConfig, stop: threading.Event | None = None) -> None:
        self.cfg = cfg
        self.stop = stop or threading.Event()
        self.counters = Counters()
        self._seq_next = 0
        self._seq_end = 0
        self._stack = contextlib.ExitStack()
        self._implausible_seen: set[str] = set()
        self._relearn = threading.Event()  # a baseline command (paho's thread), applied before the next windows
        self._baseline_file_sha: str | None = None  # the [baseline] file's sha256 when it was last loaded
        self.source: Any = None  # the source while run() reads it (its rate_watch, an mqtt source's subscribed)
        self.rollout: RolloutControl | None = None  # model rollout (edgekit/rollout.py): with a broker, unless off

    # --- setup -------------------------------------------------------------------------------------

    def __enter__(self) -> "Agent":
        # Resources join an ExitStack as they open; if a later step fails (a transport that cannot start,
        # a bundle that does not load), the ones already open are closed before the error leaves.
        with contextlib.ExitStack() as stack:
            self._open(stack)
            self._stack = stack.pop_all()
        return self

    def _open(self, stack: contextlib.ExitStack) -> None:
        from edgekit import manifest as manifest_mod
        from edgekit.devices import detect as detect_mod
        from edgekit.devices import profile as profile_mod
        from edgekit.outbox import Outbox
        from edgekit.pipeline import EdgePipeline
        from edgekit.review import ReviewBuilder
        from edgekit.runtime import ModelSet, Preprocess
        from edgekit.transport import Transport

        cfg = self.cfg
        self._configured_bundle = cfg.bundle
        store = self._rollout_store()
        if store is not None:  # a rollout may have left a newer bundle than the configured one
            from edgekit.rollout import start_bundle

            cfg = self.cfg = cfg.model_copy(update={"bundle": start_bundle(store, cfg.bundle)})
        self.manifest = manifest_mod.load_bundle(cfg.bundle, public_key=cfg.public_key)
        m = self.manifest
        # A trial bundle: a table of trial features (edgekit/trial_features.py) that the agent computes
        # from each walked test; one answer per trial, no windows.
        self.trial_mode = m.input.kind != "window" and m.input.extractor == "trial"
        if m.input.kind != "window" and not self.trial_mode:
            raise ConfigError(f"bundle {cfg.bundle} takes table rows ({m.input.kind}), not a sensor stream",
                              where=f"{cfg.bundle}/manifest.json: input.kind",
                              hint="use a bundle whose recipe cuts windows (a [window] section), or a table "
                                   "recipe of trial features ([features] extractor = 'trial')")
        if self.trial_mode and cfg.trial is None:
            raise ConfigError(f"bundle {cfg.bundle} answers per trial and needs the IMU's channels",
                              where="trial", hint="add [trial] channels = [acc x, y, z, gyr x, y, z column names]")
        profile = (detect_mod.detect() if cfg.runtime.profile == "auto"
                   else profile_mod.load_profile(cfg.runtime.profile))
        import onnxruntime as ort

        providers = profile_mod.available_providers(profile, ort.get_available_providers())
        threads = cfg.runtime.intra_op_threads or profile.intra_op_threads
        self._runtime = (list(providers), threads)  # for a bundle that a rollout swaps in
        self.models = ModelSet(Path(cfg.bundle), m, providers, threads)
        self.pre = Preprocess.from_manifest(m)
        self.reviews = ReviewBuilder(m)  # units, training ranges and percentiles for deferred windows (issue 15)
        th = m.thresholds
        self.gate = Gate(th.ood_max_score, th.min_confidence, th.max_disagreement, enabled=cfg.gate.enabled,
                         defer_all=th.defer_all)
        self.pipeline = None if self.trial_mode else EdgePipeline(m, self.models, self.pre, self.gate)
        self.trials: TrialControl | None = None  # set by run(): cuts the stream into trials
        self._trial_rate = float(m.input.rate_hz or 0.0)
        if self.trial_mode:
            self._check_trial_features()
        self.labels = list(m.labels)
        self.model_version = f"{m.task}@{m.data_fingerprint[:12]}"
        self.outbox = Outbox(Path(cfg.outbox.path), max_rows=cfg.outbox.max_rows)
        stack.callback(_close_quietly, self.outbox)
        self.commissioning = self.pipeline.commissioning if self.pipeline is not None else None
        if self.commissioning is not None:
            self._restore_baseline()
        if store is not None:
            self.rollout = self._open_rollout(store)
            stack.callback(self.rollout.close)
        self.transport = Transport(
            cfg.mqtt.url, site=cfg.site, device=cfg.device_id, outbox=self.outbox,
            security=cfg.mqtt, keepalive_s=cfg.mqtt.keepalive_s,
            batch_interval_s=cfg.mqtt.batch_interval_s, max_batch=cfg.mqtt.max_batch,
            max_inflight=cfg.mqtt.max_inflight, reconnect_max_s=cfg.mqtt.reconnect_max_s,
            status_extra=self._status_extra,
            on_command=(self._mqtt_command if self.trial_mode or self.commissioning is not None
                        or self.rollout is not None else None),
        )
        stack.callback(_close_quietly, self.transport)
        self.transport.__enter__()
        if cfg.prometheus.port is not None:  # the agent's /metrics (issue 16): prometheus_client only when asked
            from edgekit.telemetry import serve

            self.metrics_port = stack.enter_context(serve(self, cfg.prometheus.host, cfg.prometheus.port))

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _pseudonym(self, code: str | None = None) -> str | None:
        """The salted hash (edgekit/privacy.py) of the operator's participant code for this trial, else of the
        configured one; the code itself never leaves the device."""
        trial = self.cfg.trial
        code = code or (trial.participant if trial is not None else None)
        if code is None:
            return None
        from edgekit.privacy import device_salt, pseudonym

        return pseudonym(code, device_salt())

    def _check_trial_features(self) -> None:
        """At start, not at the first trial: every feature is one the agent computes, and what the operator
        must enter for them is in [trial] operator."""
        from edgekit.trial_features import REGISTRY

        assert self.cfg.trial is not None
        names = list(self.manifest.input.feature_names)
        unknown = [n for n in names if n not in REGISTRY]
        if unknown:
            raise ConfigError(f"bundle features {unknown} are not trial features this agent computes",
                              where=f"{self.cfg.bundle}/manifest.json: input.feature_names",
                              hint="update the agent, or retrain with registry features")
        missing = [n for n in names if REGISTRY[n].source == "operator" and n not in self.cfg.trial.operator]
        if missing:
            raise ConfigError(f"the bundle's features need the operator's {missing}", where="trial.operator",
                              hint=f"e.g. [trial] operator = {{ {missing[0]} = ... }}")

    def _channels(self) -> tuple[str, ...]:
        """The source columns the agent reads: the bundle's channels, or a trial bundle's [trial] channels."""
        if self.trial_mode:
            assert self.cfg.trial is not None
            return tuple(self.cfg.trial.channels)
        return tuple(self.manifest.input.channels or ())

    def _status_extra(self) -> dict[str, Any]:
        extra = {"model_version": self.model_version, "queued": self.outbox.backlog(),
                 "dropped": self.outbox.dropped, "signature": "verified" if self.cfg.public_key else "unchecked"}
        state = self.baseline_state()
        if state is not None:
            extra["baseline"] = state
        if self.rollout is not None:
            extra["rollout"] = self.rollout.status().to_obj()
        return extra

    # --- the machine's baseline (commissioning) ----------------------------------------------------

    def baseline_state(self) -> dict[str, Any] | None:
        """The baseline as the status says it: {"state": "learning", "windows": k, "of": N, "source"} or
        {"state": "ready", "windows", "of", "source": learned | command | file, "since": unix time}; None for a
        bundle without one."""
        return None if self.commissioning is None else self.commissioning.state()

    def _restore_baseline(self) -> None:
        """At start: a new or changed [baseline] file wins; else the baseline the outbox keeps for this bundle's
        features; else learn it from the first windows (or go on learning again, if a command asked for it)."""
        from edgekit import baseline as baseline_mod

        comm = self.commissioning
        assert comm is not None
        names = list(self.manifest.input.feature_names)
        where = f"{self.cfg.outbox.path} (state {BASELINE_STATE})"
        kept = self.outbox.state(BASELINE_STATE)
        record = orjson.loads(kept) if kept else {}
        self._baseline_file_sha = record.get("file_sha256")
        if self.cfg.baseline.file is not None:
            filed, sha = baseline_mod.read_file(self.cfg.baseline.file, comm.key, names)
            if sha != self._baseline_file_sha:
                comm.use(filed)
                self._baseline_file_sha = sha
                self._store_baseline()
                log.info("agent.baseline state=ready source=file path=%s windows=%d", self.cfg.baseline.file,
                         filed.windows)
                return
        stored = record.get("baseline")
        if stored is not None:
            b = baseline_mod.Baseline.from_obj(stored, where)
            if b.key == comm.key and len(b.mean) == len(names):
                comm.use(b)
                log.info("agent.baseline state=ready source=%s since=%.3f windows=%d restored_from=%s", b.source,
                         b.since, b.windows, self.cfg.outbox.path)
                return
            log.warning("agent.baseline_relearn reason=the kept baseline is of other features or another window "
                        "count than this bundle's (key %s, bundle %s)", b.key, comm.key)
        comm.restart(record.get("learning", "learned"))
        log.info("agent.baseline state=learning source=%s windows_needed=%d", comm.source, comm.needed)

    def _store_baseline(self) -> None:
        """Keep the baseline state in the outbox file (its own transaction): the ready baseline, or that one is
        being learned again on command (so a restart goes on learning rather than using the old one)."""
        comm = self.commissioning
        assert comm is not None
        record: dict[str, Any] = {"file_sha256": self._baseline_file_sha}
        if comm.baseline is not None:
            record["baseline"] = comm.baseline.to_obj(list(self.manifest.input.feature_names))
        else:
            record["learning"] = comm.source
        self.outbox.put_state(BASELINE_STATE, orjson.dumps(record))

    def _baseline_due(self) -> None:
        """Before a batch: a baseline command that arrived meanwhile starts the learning again."""
        comm = self.commissioning
        if comm is None or not self._relearn.is_set():
            return
        self._relearn.clear()
        comm.restart("command")
        self._store_baseline()
        log.info("agent.baseline state=learning source=command windows_needed=%d", comm.needed)

    def _baseline_learned(self) -> None:
        """After a batch: a baseline it completed is kept in the outbox file."""
        comm = self.commissioning
        if comm is None or not comm.completed:
            return
        comm.completed = False
        self._store_baseline()
        assert comm.baseline is not None
        log.info("agent.baseline state=ready source=%s windows=%d since=%.3f", comm.baseline.source,
                 comm.baseline.windows, comm.baseline.since)

    # --- model rollout (edgekit/rollout.py) --------------------------------------------------------

    def _rollout_store(self) -> BundleStore | None:
        """The bundle store when this agent takes bundle commands: a broker, and [rollout] enabled."""
        r = self.cfg.rollout
        if not (r.enabled and self.cfg.mqtt.url):
            return None
        from edgekit.rollout import BundleStore

        return BundleStore(r.store or rollout_store_default(Path(self.cfg.outbox.path)))

    def _open_rollout(self, store: BundleStore) -> RolloutControl:
        from edgekit.rollout import RolloutControl

        r = self.cfg.rollout
        return RolloutControl(store, Path(self.cfg.bundle), self.manifest, configured=self._configured_bundle,
                              public_key=self.cfg.public_key, ca_file=r.ca_file or self.cfg.mqtt.ca_file,
                              timeout_s=r.timeout_s, max_bytes=r.max_bytes, prepare=self._prepare_bundle,
                              on_change=self._rollout_changed, providers=tuple(self._runtime[0]))

    def _rollout_changed(self) -> None:
        transport = getattr(self, "transport", None)  # a command comes through the transport: it exists then
        if transport is not None:
            transport.refresh_status()

    def _prepare_bundle(self, path: Path, m: Any) -> Loaded:
        """(The rollout's thread.) The models, preprocessing, gate and pipeline of the checked bundle at `path`,
        built as `_open` builds them; raises when they do not load."""
        from edgekit.pipeline import EdgePipeline
        from edgekit.review import ReviewBuilder
        from edgekit.runtime import ModelSet, Preprocess

        if self.trial_mode:
            raise ConfigError("a screening station takes a new trial bundle at its next start, not while it runs",
                              where="rollout")
        providers, threads = self._runtime
        models = ModelSet(path, m, providers, threads)
        pre = Preprocess.from_manifest(m)
        th = m.thresholds
        gate = Gate(th.ood_max_score, th.min_confidence, th.max_disagreement, enabled=self.cfg.gate.enabled,
                    defer_all=th.defer_all)
        return Loaded(m, models, pre, gate, EdgePipeline(m, models, pre, gate), ReviewBuilder(m), path)

    def _loaded(self) -> Loaded:
        return Loaded(self.manifest, self.models, self.pre, self.gate, self.pipeline, self.reviews,
                      Path(self.cfg.bundle), fresh=False)

    def _swap_bundle(self, new: Loaded, path: Path) -> Loaded:
        """(The agent's thread, between two source items.) Run `new` from the next window on; the windower and the
        source stay (the input contract is the same: edgekit/rollout.py CONTRACT). Returns what ran before."""
        old = self._loaded()
        m = new.manifest
        self.manifest, self.models, self.pre, self.gate, self.pipeline, self.reviews = (
            m, new.models, new.pre, new.gate, new.pipeline, new.reviews)
        self.labels = list(m.labels)
        self.model_version = f"{m.task}@{m.data_fingerprint[:12]}"
        self.cfg = self.cfg.model_copy(update={"bundle": path})
        self.commissioning = self.pipeline.commissioning if self.pipeline is not None else None
        if self.commissioning is not None:
            # A new bundle takes the machine's kept baseline if it fits its features (else learns one); the one
            # swapped back after a rollback has its own still in memory: it is kept in the outbox file again.
            if new.fresh:
                self._restore_baseline()
            else:
                self._store_baseline()
        log.info("agent.bundle_swapped bundle=%s model_version=%s", path, self.model_version)
        return old

    def _rollout_step(self, now: float) -> None:
        from edgekit.rollout import Counts

        assert self.rollout is not None
        c = self.counters
        # Windows deferred only while a baseline is learned are neither windows nor deferrals of the bundle.
        self.rollout.step(now, Counts(c.windows - c.commissioning, c.deferred - c.commissioning, c.quarantined,
                                      c.samples), self._swap_bundle)

    # --- the loop ----------------------------------------------------------------------------------

    def _next_seq(self) -> int:
        if self._seq_next >= self._seq_end:
            self._seq_next = self.outbox.next_seq(SEQ_BLOCK)
            self._seq_end = self._seq_next + SEQ_BLOCK
        seq = self._seq_next
        self._seq_next += 1
        return seq

    def _check_channels(self, source_channels: tuple[str, ...]) -> list[int]:
        wanted = list(self._channels())
        missing = [c for c in wanted if c not in source_channels]
        if missing:
            raise ConfigError(f"the source lacks channels {missing} that the bundle needs "
                              f"(source has {list(source_channels)})", where="source")
        return [source_channels.index(c) for c in wanted]

    def process(self, window: Window) -> None:
        """One window through features, models and gate, into the outbox."""
        self.process_many([window])

    def process_many(self, windows: Sequence[Window]) -> None:
        """Windows through features, models and gate together, into the outbox in one transaction.

        One `extract` over (n, size, C), one model run per role over n rows, the gate per row. Writes each
        window's result, in window order, then the reviews of the deferred ones (so the results can share
        one batch message while the reviews still go out at once). Payloads are those of `process` on
        each window alone, bar the `ts` stamp (tests/test_agent_blocks.py).
        """
        if not windows:
            return
        self._baseline_due()
        judged = self.pipeline.run(windows)
        self._baseline_learned()
        ts = time.time()
        results: list[tuple[SendKind, bytes]] = []
        reviews: list[tuple[SendKind, bytes]] = []
        deferred = [j for j in judged if j.decision.action == "defer"]
        signals = dict(zip((id(j) for j in deferred),
                           _downsample_many([j.window.data for j in deferred], self.cfg.gate.downsample_points)))
        for j in judged:
            if j.implausible is not None:
                self._log_implausible(j.window, j.implausible)
            self._payloads(j, ts, signals.get(id(j)), results, reviews)
        self.transport.send_many(results + reviews)
        c = self.counters
        c.windows += len(results)
        c.deferred += len(reviews)
        c.accepted += len(results) - len(reviews)
        c.commissioning += sum("commissioning" in j.decision.reasons for j in deferred)

    def _log_implausible(self, window: Window, why: str) -> None:
        """Count the window; log the first of each channel or feature as a warning, the rest at debug (a
        broken sensor would otherwise write one warning per window)."""
        self.counters.implausible += 1
        key = " ".join(why.split(" ", 2)[:2])  # "channel 'X'" / "feature 'Y'"
        first = key not in self._implausible_seen
        self._implausible_seen.add(key)
        log.log(logging.WARNING if first else logging.DEBUG,
                "agent.implausible window=%d start_s=%.6g reason=%s%s", window.seq, window.start_s, why,
                " (further windows of this kind at debug level; counted in metrics)" if first else "")

    def _payloads(self, judged: Judged, ts: float, points: list[list[float]] | None,
                  results: list[tuple[SendKind, bytes]], reviews: list[tuple[SendKind, bytes]]) -> None:
        """Append the window's encoded result (and its review, with the signal's `points`, when deferred).
        tolist() gives the same Python floats as float() of each numpy scalar, at a fraction of the cost
        (104 features: ~30 -> ~3 us). An implausible window (no model saw it: `probs` None) carries no label,
        confidence or probabilities, and says why in `implausible`."""
        window, probs, second, decision = judged.window, judged.probs, judged.second_probs, judged.decision
        seq = self._next_seq()
        p = probs.tolist() if probs is not None else []
        label_i = int(probs.argmax()) if probs is not None else -1
        result = messages.Result(
            id=topics.result_id(self.cfg.device_id, seq), seq=seq, site=self.cfg.site, device=self.cfg.device_id,
            ts=ts, start_s=window.start_s, end_s=window.end_s, model_version=self.model_version,
            task=self.manifest.task, label=self.labels[label_i] if p else None,
            confidence=p[label_i] if p else None, probs=dict(zip(self.labels, p)), decision=decision.action,
            reasons=list(decision.reasons), scores=decision.scores, thresholds=decision.thresholds,
            second_opinion=None if second is None else messages.SecondOpinion(
                self.labels[int(second.argmax())], dict(zip(self.labels, second.tolist()))),
            implausible=judged.implausible, attribution=judged.attribution)
        results.append(("result", result.encode()))
        if decision.action == "defer":
            reviews.append(("review", self.reviews.review(result, judged.features, points or [], window.start_s,
                                                          judged.relative).encode()))

    def _trial_control(self, channels: int) -> TrialControl | None:
        """What cuts the stream into trials when the bundle reads gait or answers per trial, else None: a trial
        bundle's by [trial] detect and the operator's commands; a gait bundle's, each source run (cut at
        MAX_TRIAL_S)."""
        m = self.manifest
        if m.input.extractor not in ("gait", "trial"):
            return None
        if channels != GAIT_CHANNELS or not self._trial_rate:
            if self.trial_mode:
                raise ConfigError(f"a trial needs {GAIT_CHANNELS} channels (acc xyz, gyr xyz) and a rate (got "
                                  f"{channels} channels, rate {self._trial_rate or 'unknown'})", where="trial",
                                  hint="set [trial] channels, and [trial] rate_hz when the source has no rate")
            log.warning("agent.trial_off reason=gait.segment needs %d channels (acc xyz, gyr xyz) and a rate "
                        "(bundle has %d channels, rate_hz=%s)", GAIT_CHANNELS, channels, m.input.rate_hz)
            return None
        from edgekit.trials import TrialControl

        if not self.trial_mode:
            return TrialControl(self._trial_rate, channels, max_s=MAX_TRIAL_S, detect="source")
        assert self.cfg.trial is not None
        return TrialControl(self._trial_rate, channels, max_s=self.cfg.trial.max_s, detect=self.cfg.trial.detect)

    def trial_payload(self, closed: ClosedTrial) -> messages.Trial:
        """Segment one trial's samples (gait.segment) into its summary message, and log it in one line; with a
        trial bundle, its answer too (or why it is not scored).

        Times of the walk, turn and steps are seconds from the trial's first sample (`trial.start_s` in
        source time). No walk found: `reason`, steps 0 and the walk/turn times null. Segmentation refused
        (fewer than 4 s of samples): `error` with its message, no segmentation fields.
        """
        from edgekit import gait

        t_s, values, closed_by = closed.t_s, closed.values, closed.closed_by
        rate = float(self._trial_rate or self.manifest.input.rate_hz or 1.0)
        seq = self._next_seq()
        span = messages.TrialSpan(float(t_s[0]) if len(t_s) else None, float(t_s[-1]) if len(t_s) else None,
                                  int(len(t_s)), rate, closed_by, closed.started_by)
        msg = messages.Trial(id=topics.result_id(self.cfg.device_id, seq), seq=seq, site=self.cfg.site,
                             device=self.cfg.device_id, ts=time.time(), model_version=self.model_version,
                             task=self.manifest.task, trial=span, participant=self._pseudonym(closed.participant))

        def num(x: float) -> float | None:
            return float(x) if math.isfinite(x) else None

        try:
            seg = gait.segment(values, rate)
        except ValueError as exc:
            msg.error = str(exc)
            log.warning("agent.trial id=%s samples=%d closed_by=%s error=%s", msg.id, len(t_s), closed_by, exc)
            if self.trial_mode:
                self._answer(msg, closed, rate, None)  # not scored, with the registry's reason
            return msg
        if self.trial_mode:
            self._answer(msg, closed, rate, seg)
        msg.walk_start_s, msg.walk_end_s = num(seg.walk_start_s), num(seg.walk_end_s)
        msg.turn_start_s, msg.turn_end_s = num(seg.turn_start_s), num(seg.turn_end_s)
        msg.steps, msg.cadence_spm = seg.steps, num(seg.cadence_spm)
        msg.phase_s = {k: num(v) for k, v in seg.phase_s.items()}
        msg.step_times_s = np.round(seg.step_times_s, 3).tolist()
        if msg.walk_start_s is None:
            msg.reason = "no walk: activity never rose above still standing"
        elif msg.turn_start_s is None:
            msg.reason = "no turn: the walk never turned by 90 degrees"
        cadence = "none" if msg.cadence_spm is None else f"{msg.cadence_spm:.1f}"
        log.info("agent.trial id=%s samples=%d started_by=%s closed_by=%s walk_start_s=%s walk_end_s=%s "
                 "turn_start_s=%s turn_end_s=%s steps=%d cadence_spm=%s reason=%s", msg.id, len(t_s),
                 closed.started_by, closed_by, msg.walk_start_s, msg.walk_end_s, msg.turn_start_s, msg.turn_end_s,
                 seg.steps, cadence, msg.reason or "none")
        return msg

    def _attach_signal(self, msg: messages.Trial, values: np.ndarray) -> None:
        """The whole trial, downsampled to TRIAL_POINTS per channel, on a referral (an answer other than the
        normal label), a deferred answer or a trial not scored: what the clinician opens."""
        if msg.answer is not None and not msg.answer.referred:
            return
        assert self.cfg.trial is not None
        msg.signal = messages.Signal(list(self.cfg.trial.channels), msg.trial.rate_hz, msg.trial.start_s,
                                     _downsample(values, TRIAL_POINTS) if len(values) else [])

    def _answer(self, msg: messages.Trial, closed: ClosedTrial, rate: float, seg: Any) -> None:
        """A trial bundle's answer on this trial: its registry features (on the summary's segmentation `seg`,
        not a second one), the models and the gate (one row, Gate.decide); or `not_scored` with the reason
        when the trial was cut at [trial] max_s or its features cannot be computed. Then the signal, for a
        referral, a deferral or a trial not scored (`_attach_signal`), and the station screen's answer."""
        from edgekit.errors import NotScored
        from edgekit.population import percentiles
        from edgekit.trial_features import compute_trial_features
        from edgekit.trials import MAX_DURATION

        assert self.cfg.trial is not None and self.trials is not None
        names = list(self.manifest.input.feature_names)
        try:
            if closed.closed_by == MAX_DURATION:
                raise NotScored("too_long", f"the trial reached trial.max_s = {self.cfg.trial.max_s:g} s "
                                "without being stopped; it was cut there")
            raw = compute_trial_features(names, closed.values, rate, {**self.cfg.trial.operator, **closed.operator},
                                         seg)
        except NotScored as exc:
            msg.not_scored = f"{exc.reason}: {exc.message}"
            log.warning("agent.trial_not_scored id=%s reason=%s", msg.id, exc.reason)
        else:
            out = self.models.infer(self.pre.features(raw[None]), None)
            second = None if out.second_probs is None else out.second_probs[0]
            d = self.gate.decide(out.probs[0], second, None if out.ood_score is None else out.ood_score[0])
            probs = out.probs[0]
            features = dict(zip(names, raw.tolist()))
            label = self.labels[int(probs.argmax())] if np.isfinite(probs).all() else None
            msg.answer = messages.TrialAnswer(
                label=label, confidence=d.scores.get("confidence"), probs=dict(zip(self.labels, probs.tolist())),
                decision=d.action, reasons=list(d.reasons), scores=dict(d.scores),
                features=features, percentiles=percentiles(self.manifest.population, features),
                referred=d.action == "defer" or label != self.manifest.normal_label)
            log.info("agent.trial_answer id=%s label=%s decision=%s reasons=%s", msg.id, msg.answer.label,
                     d.action, ",".join(d.reasons) or "none")
        self._attach_signal(msg, closed.values)
        self.trials.last = self._screen_answer(msg, closed)

    def _screen_answer(self, msg: messages.Trial, closed: ClosedTrial) -> dict[str, Any]:
        """The answer as the station screen shows it: the outcome and its reasons in plain words."""
        from edgekit.gate import reason_words

        a = msg.answer
        out: dict[str, Any] = {"id": msg.id, "participant": closed.participant, "seconds": msg.trial.samples
                               / (msg.trial.rate_hz or 1.0), "closed_by": closed.closed_by}
        if a is None:
            reason, _, detail = (msg.not_scored or "not_scored: no answer").partition(": ")
            return out | {"outcome": "not_scored", "label": None, "words": [detail or reason]}
        words = [reason_words(r) for r in a.reasons]
        if a.decision == "accept" and a.referred:
            words = [f"the model answered {a.label} with confidence {a.confidence or 0:.0%}"]
        return out | {"outcome": "referred" if a.referred else "not_referred", "label": a.label,
                      "decision": a.decision, "confidence": a.confidence, "words": words}

    def metrics(self) -> messages.Metrics:
        c = self.counters
        stats = self.transport.stats()
        counters = {"windows": c.windows, "accepted": c.accepted, "deferred": c.deferred,
                    "quarantined": c.quarantined, "implausible": c.implausible,
                    "quarantine_reasons": dict(c.quarantine_reasons), "samples": c.samples,
                    "published": stats.get("acked", 0), "replayed_results": stats.get("replayed", 0),
                    "uptime_s": time.monotonic() - c.started_s, "rate_drift": c.rate_drift}
        if c.source_rate_hz is not None:
            counters["source_rate_hz"] = c.source_rate_hz
        state = self.baseline_state()
        if state is not None:  # numbers only, as every counter: learned k of N, ready since (unix time)
            counters.update(commissioning=c.commissioning, baseline_windows=state["windows"],
                            baseline_needed=state["of"], baseline_ready=int(state["state"] == "ready"))
            if "since" in state:
                counters["baseline_since"] = state["since"]
        return messages.Metrics(self.cfg.site, self.cfg.device_id, time.time(), self.outbox.backlog(),
                                self.outbox.dropped, counters)

    def _publish_metrics(self) -> None:
        self.transport.send("metrics", self.metrics().encode())

    def run(self, drain_timeout_s: float = 30.0) -> Summary:
        """Read the source to its end (or until stop), then drain the outbox as far as the broker allows.

        Sample blocks (replay or simulation at speed 0) go through `Windower.push_many` and the windows
        they complete through `process_many`; single samples (paced or live sources) through `push`.
        With a gait bundle or a trial bundle the same samples also go to a `TrialControl`, which cuts them
        into trials (edgekit/trials.py); each is segmented and sent as one trial message, the open one when
        the source ends or stop is set. A trial bundle's station screen ([trial] screen) runs meanwhile.
        """
        from edgekit.source import open_source

        m = self.manifest
        rate = self.cfg.trial.rate_hz if self.cfg.trial is not None and self.trial_mode else m.input.rate_hz
        with open_source(self.cfg.source, stop=self.stop, mqtt_url=self.cfg.mqtt.url, mqtt_security=self.cfg.mqtt,
                         channel_names=self._channels(), rate_hint=rate, recording=m.input.recording) as source:
            self.source = source
            self._read(source)
        return self._finish(drain_timeout_s)

    def _read(self, source: Any) -> None:
        """The source's items to their end or stop: quarantines counted, samples windowed and processed,
        trials cut and sent, operator commands on the serial line applied, metrics sent every
        metrics_interval_s."""
        from edgekit.window import Windower

        m = self.manifest
        idx = self._check_channels(tuple(source.channels))
        windower = None if self.trial_mode else Windower(int(m.input.window_size), int(m.input.window_hop),
                                                           len(idx), m.input.max_gap_s)
        select = None if idx == list(range(len(source.channels))) else np.asarray(idx)
        self._trial_rate = float(getattr(source, "rate_hz", 0.0) or (m.input.rate_hz or 0.0))
        self.trials = self._trial_control(len(idx))
        screen = self._open_screen()
        next_metrics = time.monotonic() + self.cfg.metrics_interval_s
        log.info("agent.start device=%s site=%s bundle=%s source=%s broker=%s", self.cfg.device_id,
                 self.cfg.site, self.cfg.bundle, self.cfg.source.kind, redact_url(self.cfg.mqtt.url or "none"))
        if self.cfg.allow_unsigned:
            log.warning("agent.unsigned bundle=%s signature=unchecked reason=allow_unsigned", self.cfg.bundle)
        if not self.cfg.mqtt.url:
            log.warning("agent.offline reason=no-broker results stay in the outbox path=%s", self.cfg.outbox.path)
        else:
            self._await_first_connect()
        try:
            self._items(source, windower, select, next_metrics)
        finally:
            if screen is not None:
                screen.close()

    def _items(self, source: Any, windower: Any, select: np.ndarray | None, next_metrics: float) -> None:
        for item in source.iter_blocks():
            if self.stop.is_set():
                break
            if isinstance(item, messages.TrialCommand):
                self._on_command(item)
                continue
            if isinstance(item, Quarantined):
                self.counters.quarantined += 1
                self.counters.quarantine_reasons[item.reason.split(":")[0]] += 1
                log.warning("agent.quarantine where=%s reason=%s", item.where, item.reason)
                continue
            if isinstance(item, SampleBlock):
                t_s, values = item.t_s, item.values if select is None else item.values[:, select]
                windows = windower.push_many(t_s, values) if windower is not None else []
                for a in range(0, len(windows), MAX_WINDOWS_PER_CALL):
                    self.process_many(windows[a:a + MAX_WINDOWS_PER_CALL])
            else:
                sample = item if select is None else type(item)(item.t_s, item.values[select])
                t_s, values = np.array([sample.t_s]), sample.values[None]
                window = windower.push(sample) if windower is not None else None
                if window is not None:
                    self.process(window)
            self.counters.samples += len(t_s)
            watch = getattr(source, "rate_watch", None)
            if watch is not None:
                self.counters.rate_drift, self.counters.source_rate_hz = watch.drift, watch.measured_hz
            if self.trials is not None:
                for closed in self.trials.push_many(t_s, values):
                    self.transport.send("trial", self.trial_payload(closed).encode())
            now = time.monotonic()
            if self.rollout is not None and self.rollout.due(now):
                self._rollout_step(now)
            if now >= next_metrics:
                self._publish_metrics()
                next_metrics = now + self.cfg.metrics_interval_s

    def _await_first_connect(self) -> None:
        """Before the first item: wait up to FIRST_CONNECT_WAIT_S for the broker's first CONNACK, and no longer
        than its first failed attempt. Results queued while not connected are marked replayed (they wait in the
        outbox as after an outage); without this wait, a run with the broker up began by marking the results of
        its first milliseconds replayed whenever reading outran the connect (seen on a loaded CI machine)."""
        tr = self.transport
        deadline = time.monotonic() + FIRST_CONNECT_WAIT_S
        while not tr.connected and tr.last_failure is None and time.monotonic() < deadline:
            if self.stop.wait(0.01):
                return

    def _on_command(self, cmd: messages.TrialCommand) -> None:
        """An operator's trial command, from any thread (MQTT, the screen) or the serial line: to the trial
        control, or refused in one line when this agent does not run trials."""
        if self.trials is None or not self.trial_mode:
            log.warning("agent.command_ignored action=%s origin=%s reason=this agent's bundle does not answer "
                        "per trial (or its source is not open yet)", cmd.action, cmd.origin or "-")
            return
        self.trials.command(cmd)

    def _mqtt_command(self, name: str, payload: bytes) -> None:
        """A message on this device's command topic (paho's thread): a trial command, a baseline command, or
        one line saying why not. Commands older than COMMAND_MAX_AGE_S (queued while the device was away) are
        dropped: an operator's start, or a machine's new normal, is for now, not for whenever the network
        comes back."""
        where = f"topic {topics.command(self.cfg.site, self.cfg.device_id, name)!r}"
        if name == topics.BUNDLE_COMMAND and self.rollout is not None:  # retained: the bundle to run, not stale
            self.rollout.command(payload, where)
            return
        parsers: dict[str, type[messages.TrialCommand] | type[messages.BaselineCommand]] = {
            topics.TRIAL_COMMAND: messages.TrialCommand, topics.BASELINE_COMMAND: messages.BaselineCommand}
        kind = parsers.get(name)
        if kind is None:
            log.warning("agent.command_refused where=%s reason=unknown command (this agent takes %s)", where,
                        " and ".join(repr(n) for n in parsers))
            return
        try:
            cmd = kind.decode(payload, where)
        except DataError as exc:
            log.warning("agent.command_refused %s", exc)
            return
        age_s = time.time() - cmd.ts
        if cmd.ts and age_s > COMMAND_MAX_AGE_S:
            log.warning("agent.command_refused where=%s reason=stale: sent %.0f s ago (> %g s)", where, age_s,
                        COMMAND_MAX_AGE_S)
            return
        if isinstance(cmd, messages.BaselineCommand):
            if self.commissioning is None:
                log.warning("agent.command_refused where=%s reason=this agent's bundle has no baseline to learn",
                            where)
                return
            log.info("agent.command where=%s action=%s (learning starts before the next window)", where, cmd.action)
            self._relearn.set()
            return
        self._on_command(cmd)

    def _open_screen(self) -> Any:
        """The station screen ([trial] screen), serving while the source is read; None when not configured."""
        trial = self.cfg.trial
        if not self.trial_mode or trial is None or trial.screen is None or self.trials is None:
            return None
        from edgekit.station import StationScreen

        return StationScreen(trial.screen, self._on_command, self.trials.state, self.cfg.device_id)

    def _finish(self, drain_timeout_s: float) -> Summary:
        """The open trial's summary and the final metrics in one outbox transaction, then the drain."""
        last: list[tuple[SendKind, bytes]] = []
        closed = self.trials.finish("stop" if self.stop.is_set() else "end") if self.trials is not None else None
        if closed is not None:
            last.append(("trial", self.trial_payload(closed).encode()))
        self.transport.send_many([*last, ("metrics", self.metrics().encode())])
        tr = self.transport
        if self.cfg.mqtt.url and self.outbox.backlog() and (tr.connected or not self.stop.is_set()):
            # Say what the agent waits for and how long: with the broker away, the whole timeout unless a stop
            # (SIGTERM) ends it, which Transport.flush does at once while disconnected.
            log.log(logging.INFO if tr.connected else logging.WARNING,
                    "agent.draining queued=%d endpoint=%s connected=%s up_to_s=%g hint=%r", self.outbox.backlog(),
                    tr.endpoint, tr.connected, drain_timeout_s,
                    "SIGTERM ends the wait while the broker is away; the outbox keeps every row")
        if self.cfg.mqtt.url:
            tr.flush(drain_timeout_s, stop=self.stop)
        stats = tr.stats()
        c = self.counters
        summary = Summary(c.windows, c.accepted, c.deferred, c.quarantined, stats.get("acked", 0),
                          self.outbox.backlog(), self.outbox.dropped)
        log.info("agent.done %s", summary.line())
        if summary.queued:
            self._log_queued(drain_timeout_s)
        return summary

    def _log_queued(self, drain_timeout_s: float) -> None:
        """One line at the end of a run that leaves rows behind: how many of each kind, in which outbox file,
        for which broker, and why they are still there (they are sent after the next start)."""
        tr = self.transport
        kinds = tr.backlog_by_kind()
        if not self.cfg.mqtt.url:
            reason = "no broker configured"
        elif not tr.connected:
            reason = f"broker unreachable ({tr.last_failure or 'no connection yet'})"
        else:
            reason = f"drain timed out after {drain_timeout_s:g} s"
        log.warning("agent.queued results=%d reviews=%d other=%d outbox=%s broker=%s stopped=%s reason=%r",
                    kinds.pop("result", 0), kinds.pop("review", 0), sum(kinds.values()),
                    Path(self.cfg.outbox.path).resolve(), tr.endpoint or "none", self.stop.is_set(), reason)


def run_agent(cfg: AgentConfig, stop: threading.Event | None = None, drain_timeout_s: float = 30.0) -> Summary:
    if not Path(cfg.bundle).is_dir():
        raise ModelError("bundle directory not found", where=str(cfg.bundle), hint="run `edgekit export` first")
    with Agent(cfg, stop) as agent:
        return agent.run(drain_timeout_s)
