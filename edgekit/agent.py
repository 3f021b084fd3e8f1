"""The composition root: source -> window -> features -> models -> gate -> result -> outbox/MQTT.

The only module that wires the stages together. Never imports torch (tests/test_no_torch.py).

What a crash can lose: samples read but not yet in a completed window, and windows completed but not yet
written (at most one source block, <= 2,048 samples at replay speed 0; one window when paced) are lost like
unread samples; replay the source to get them back. Whatever `process_many` has written (one outbox
transaction per call) survives a crash or SIGKILL and is published at least once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekit import topics
from edgekit.config import AgentConfig
from edgekit.errors import ConfigError, ModelError
from edgekit.gate import Gate
from edgekit.values import GateDecision, Quarantined, SampleBlock, Window

if TYPE_CHECKING:
    from edgekit.transport import SendKind

log = logging.getLogger(__name__)

SEQ_BLOCK = 1024  # result sequence numbers reserved per outbox write (a gap after restart is harmless)
# Windows per process_many call when a source block completes many: past ~64 the per-window cost stops
# falling (bench/README.md: edge path 267 -> 70 -> 48 us at 1, 8, 64 windows), and this bounds one outbox
# transaction (skab: a 722-byte result and a 7.2 KB review per deferred window, <= 2 MB at 256 windows).
MAX_WINDOWS_PER_CALL = 256


@dataclass
class Counters:
    windows: int = 0
    accepted: int = 0
    deferred: int = 0
    quarantined: int = 0
    samples: int = 0
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


class Agent:
    """Runs one config until the source ends or `stop` is set. Use as a context manager."""

    def __init__(self, cfg: AgentConfig, stop: threading.Event | None = None) -> None:
        self.cfg = cfg
        self.stop = stop or threading.Event()
        self.counters = Counters()
        self._seq_next = 0
        self._seq_end = 0
        self._stack: list[Any] = []

    # --- setup -------------------------------------------------------------------------------------

    def __enter__(self) -> "Agent":
        from edgekit import manifest as manifest_mod
        from edgekit.devices import detect as detect_mod
        from edgekit.devices import profile as profile_mod
        from edgekit.outbox import Outbox
        from edgekit.runtime import ModelSet, Preprocess
        from edgekit.transport import Transport

        cfg = self.cfg
        self.manifest = manifest_mod.load_bundle(cfg.bundle, public_key=cfg.public_key)
        m = self.manifest
        if m.input.kind != "window":
            raise ConfigError(f"bundle {cfg.bundle} takes table rows ({m.input.kind}), not a sensor stream",
                              where=f"{cfg.bundle}/manifest.json: input.kind",
                              hint="use a bundle trained on windows (e.g. examples/skab.toml)")
        profile = (detect_mod.detect() if cfg.runtime.profile == "auto"
                   else profile_mod.load_profile(cfg.runtime.profile))
        import onnxruntime as ort

        providers = profile_mod.available_providers(profile, ort.get_available_providers())
        threads = cfg.runtime.intra_op_threads or profile.intra_op_threads
        self.models = ModelSet(Path(cfg.bundle), m, providers, threads)
        self.pre = Preprocess.from_manifest(m)
        th = m.thresholds
        self.gate = Gate(th.ood_max_score, th.min_confidence, th.max_disagreement, enabled=cfg.gate.enabled,
                         defer_all=th.defer_all)
        self.labels = list(m.labels)
        self.model_version = f"{m.task}@{m.data_fingerprint[:12]}"
        self.outbox = Outbox(Path(cfg.outbox.path), max_rows=cfg.outbox.max_rows)
        self._stack.append(self.outbox)
        self.transport = Transport(
            cfg.mqtt.url, site=cfg.site, device=cfg.device_id, outbox=self.outbox,
            username=cfg.mqtt.username, password=cfg.mqtt.password, keepalive_s=cfg.mqtt.keepalive_s,
            batch_interval_s=cfg.mqtt.batch_interval_s, max_batch=cfg.mqtt.max_batch,
            max_inflight=cfg.mqtt.max_inflight, reconnect_max_s=cfg.mqtt.reconnect_max_s,
            status_extra=self._status_extra,
        )
        self._stack.append(self.transport)
        self.transport.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for res in reversed(self._stack):
            try:
                res.close()
            except Exception:  # closing must not hide the original error
                log.exception("agent.close_failed resource=%s", type(res).__name__)
        self._stack.clear()

    def _status_extra(self) -> dict[str, Any]:
        return {"model_version": self.model_version, "queued": self.outbox.backlog(),
                "dropped": self.outbox.dropped}

    # --- the loop ----------------------------------------------------------------------------------

    def _next_seq(self) -> int:
        if self._seq_next >= self._seq_end:
            self._seq_next = self.outbox.next_seq(SEQ_BLOCK)
            self._seq_end = self._seq_next + SEQ_BLOCK
        seq = self._seq_next
        self._seq_next += 1
        return seq

    def _check_channels(self, source_channels: tuple[str, ...]) -> list[int]:
        wanted = list(self.manifest.input.channels or [])
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
        from edgekit.features import extract

        if not windows:
            return
        m = self.manifest
        rate = float(m.input.rate_hz or 1.0)
        one = len(windows) == 1  # the paced path: no copies into a batch
        data = windows[0].data[None] if one else np.stack([w.data for w in windows])
        raw = extract(m.input.extractor, data, rate)
        feats = self.pre.features(raw)
        win = None
        if "window" in self.models.input_kind.values():
            win = (self.pre.window(windows[0].data) if one
                   else np.concatenate([self.pre.window(w.data) for w in windows]))
        out = self.models.infer(feats, win)
        ts = time.time()
        results: list[tuple[SendKind, bytes]] = []
        reviews: list[tuple[SendKind, bytes]] = []
        decisions = [self.gate.decide(out.probs[i], None if out.second_probs is None else out.second_probs[i],
                                      None if out.ood_score is None else float(out.ood_score[i]))
                     for i in range(len(windows))]
        deferred = [i for i, d in enumerate(decisions) if d.action == "defer"]
        signals = dict(zip(deferred, _downsample_many([windows[i].data for i in deferred],
                                                      self.cfg.gate.downsample_points)))
        for i, window in enumerate(windows):
            self._payloads(window, raw[i], out.probs[i], None if out.second_probs is None else out.second_probs[i],
                           decisions[i], ts, signals.get(i), results, reviews)
        self.transport.send_many(results + reviews)
        c = self.counters
        c.windows += len(results)
        c.deferred += len(reviews)
        c.accepted += len(results) - len(reviews)

    def _payloads(self, window: Window, raw_features: np.ndarray, probs: np.ndarray, second: np.ndarray | None,
                  decision: GateDecision, ts: float, points: list[list[float]] | None,
                  results: list[tuple[SendKind, bytes]], reviews: list[tuple[SendKind, bytes]]) -> None:
        """Append the window's encoded result (and its review, with the signal's `points`, when deferred).
        tolist() gives the same Python floats as float() of each numpy scalar, at a fraction of the cost
        (104 features: ~30 -> ~3 us)."""
        seq = self._next_seq()
        label_i = int(probs.argmax())
        p = probs.tolist()
        payload: dict[str, Any] = {
            "schema": topics.SCHEMA_RESULT,
            "id": topics.result_id(self.cfg.device_id, seq),
            "seq": seq,
            "site": self.cfg.site,
            "device": self.cfg.device_id,
            "ts": ts,
            "window": {"start_s": window.start_s, "end_s": window.end_s},
            "model_version": self.model_version,
            "task": self.manifest.task,
            "label": self.labels[label_i],
            "confidence": p[label_i],
            "probs": dict(zip(self.labels, p)),
            "decision": decision.action,
            "reasons": list(decision.reasons),
            "scores": decision.scores,
            "thresholds": decision.thresholds,
        }
        if second is not None:
            payload["second_opinion"] = {"label": self.labels[int(second.argmax())],
                                         "probs": dict(zip(self.labels, second.tolist()))}
        results.append(("result", topics.encode(payload)))
        if decision.action == "defer":
            payload["schema"] = topics.SCHEMA_REVIEW
            payload["features"] = dict(zip(self.manifest.input.feature_names, raw_features.tolist()))
            payload["signal"] = {"channels": list(self.manifest.input.channels or []),
                                 "rate_hz": self.manifest.input.rate_hz, "start_s": window.start_s,
                                 "points": points}
            reviews.append(("review", topics.encode(payload)))

    def metrics(self) -> dict[str, Any]:
        c = self.counters
        stats = self.transport.stats()
        return {"schema": topics.SCHEMA_METRICS, "site": self.cfg.site, "device": self.cfg.device_id,
                "ts": time.time(), "windows": c.windows, "accepted": c.accepted, "deferred": c.deferred,
                "quarantined": c.quarantined, "quarantine_reasons": dict(c.quarantine_reasons),
                "samples": c.samples, "published": stats.get("acked", 0), "queued": self.outbox.backlog(),
                "dropped": self.outbox.dropped, "replayed": stats.get("replayed", 0),
                "uptime_s": time.monotonic() - c.started_s}

    def _publish_metrics(self) -> None:
        self.transport.send("metrics", topics.encode(self.metrics()))

    def run(self, drain_timeout_s: float = 30.0) -> Summary:
        """Read the source to its end (or until stop), then drain the outbox as far as the broker allows.

        Sample blocks (replay or simulation at speed 0) go through `Windower.push_many` and the windows
        they complete through `process_many`; single samples (paced or live sources) through `push`.
        """
        from edgekit.source import open_source
        from edgekit.window import Windower

        m = self.manifest
        size, hop = int(m.input.window_size), int(m.input.window_hop)
        with open_source(self.cfg.source, stop=self.stop, mqtt_url=self.cfg.mqtt.url,
                         channel_names=tuple(m.input.channels or ()), rate_hint=m.input.rate_hz) as source:
            idx = self._check_channels(tuple(source.channels))
            windower = Windower(size, hop, len(idx))
            select = None if idx == list(range(len(source.channels))) else np.asarray(idx)
            next_metrics = time.monotonic() + self.cfg.metrics_interval_s
            log.info("agent.start device=%s site=%s bundle=%s source=%s broker=%s", self.cfg.device_id,
                     self.cfg.site, self.cfg.bundle, self.cfg.source.kind, self.cfg.mqtt.url or "none")
            if not self.cfg.mqtt.url:
                log.warning("agent.offline reason=no-broker results stay in the outbox path=%s",
                            self.cfg.outbox.path)
            for item in source.iter_blocks():
                if self.stop.is_set():
                    break
                if isinstance(item, Quarantined):
                    self.counters.quarantined += 1
                    self.counters.quarantine_reasons[item.reason.split(":")[0]] += 1
                    log.warning("agent.quarantine where=%s reason=%s", item.where, item.reason)
                    continue
                if isinstance(item, SampleBlock):
                    self.counters.samples += len(item)
                    values = item.values if select is None else item.values[:, select]
                    windows = windower.push_many(item.t_s, values)
                    for a in range(0, len(windows), MAX_WINDOWS_PER_CALL):
                        self.process_many(windows[a:a + MAX_WINDOWS_PER_CALL])
                else:
                    self.counters.samples += 1
                    sample = item if select is None else type(item)(item.t_s, item.values[select])
                    window = windower.push(sample)
                    if window is not None:
                        self.process(window)
                now = time.monotonic()
                if now >= next_metrics:
                    self._publish_metrics()
                    next_metrics = now + self.cfg.metrics_interval_s
        self._publish_metrics()
        if self.cfg.mqtt.url:
            self.transport.flush(drain_timeout_s)
        stats = self.transport.stats()
        c = self.counters
        summary = Summary(c.windows, c.accepted, c.deferred, c.quarantined, stats.get("acked", 0),
                          self.outbox.backlog(), self.outbox.dropped)
        log.info("agent.done %s", summary.line())
        return summary


def run_agent(cfg: AgentConfig, stop: threading.Event | None = None, drain_timeout_s: float = 30.0) -> Summary:
    if not Path(cfg.bundle).is_dir():
        raise ModelError("bundle directory not found", where=str(cfg.bundle), hint="run `edgekit export` first")
    with Agent(cfg, stop) as agent:
        return agent.run(drain_timeout_s)
