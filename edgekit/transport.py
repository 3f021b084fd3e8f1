"""The MQTT transport: publishes the outbox to the broker at QoS 1 and deletes a row only on its PUBACK.

It survives the network: connects in the background with exponential backoff, never reports connected after
a refused CONNACK, publishes a retained "online" birth on every (re)connect and leaves a retained "offline"
last will. A failed connection says why (TLS verify, refused, DNS, timeout, CONNACK refusal) once, and again
only when the cause changes. Topics and payloads come from topics.py, the client (url, account, TLS) from
mqtt.py. Must not import onnxruntime or torch.

Threads: the caller's thread writes to the outbox (send, send_many); paho's network thread only queues
PUBACKed mids; one publisher thread reads the outbox, publishes, and deletes acknowledged rows. Each thread
has its own SQLite connection (Outbox is per-thread). Senders and PUBACKs wake the publisher only while it
is idle (each wake-up is a GIL hand-off; bench/README.md measured 10 % of the agent's time in them); see
`_run` for why no wake-up is lost.
"""

from __future__ import annotations

import bisect
import errno
import logging
import queue
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from edgekit import topics
from edgekit.errors import ConfigError
from edgekit.mqtt import MqttSecurity, make_client, parse_url
from edgekit.outbox import Outbox, OutboxRow

log = logging.getLogger(__name__)

SendKind = Literal["result", "review", "metrics", "trial"]
_SEND_KINDS = ("result", "review", "metrics", "trial")
# Rows read from the outbox per query while draining: bounds the publisher's memory whatever the backlog.
_READ_CHUNK = 5000
# Status messages (birth, offline) ride beside the results; paho's own window must leave room for them.
_STATUS_SLOTS = 4
_COALESCE_S = 0.002
# The publisher's longest sleep without a wake-up (unbatched): a safety net, never the way rows get sent.
_IDLE_WAIT_S = 1.0
_STATUS_KEYS = {"schema", "site", "device", "state", "ts"}
PUBLISH_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Latency:
    """Seconds from handing a message to paho to its PUBACK (a resend after a reconnect counts from the first
    send), as a cumulative histogram: counts[i] for values <= bounds[i], the last for the rest. Written by the
    publisher thread only; read by the agent's /metrics (edgekit/telemetry.py)."""

    def __init__(self, bounds: Sequence[float] = PUBLISH_BUCKETS_S) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum_s = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum_s += seconds
# What to check, per cause of a failed connection (the log line carries it next to the cause).
_HINTS = {
    "tls_verify_failed": "the broker's certificate must be signed by a CA this device trusts and name this host",
    "tls_failed": "is this port TLS (mqtts://) and does the broker accept this TLS version?",
    "refused": "is the broker running and listening on this host and port?",
    "dns_failed": "check the host name in the broker url",
    "timeout": "no answer in time: a firewall dropping packets, a wrong address or port, or a stuck broker",
    "unreachable": "check the network route to the broker",
    "reset": "the broker or something in between closed the connection (see the broker's log)",
    "closed_before_connack": "a plain mqtt:// client on a TLS port, a client certificate the broker requires "
                             "(mqtt.cert_file), or the broker dropped the client (see its log)",
    "connack_refused": "check the broker account (username, password) and its ACL",
    "os_error": "see the detail",
}


def connect_failure(exc: BaseException | None) -> tuple[str, str]:
    """A failed connection attempt's exception -> (cause, detail): a fixed word to grep for, and the words
    the operating system or TLS library gave. paho retries in its own thread and swallows the exception."""
    if exc is None:
        return "os_error", "no exception reached the transport"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "tls_verify_failed", f"certificate verify failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return "tls_failed", str(exc.reason or exc)
    if isinstance(exc, ConnectionRefusedError):
        return "refused", "connection refused"
    if isinstance(exc, socket.gaierror):
        return "dns_failed", f"host name lookup failed: {exc.strerror or exc}"
    if isinstance(exc, TimeoutError):  # socket.timeout, also a TLS handshake that never finished
        return "timeout", f"timed out ({exc})" if str(exc) else "timed out"
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "unreachable", exc.strerror or str(exc)
    if isinstance(exc, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        return "reset", exc.strerror or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return "os_error", f"{exc.strerror} (errno {exc.errno})"
    return "os_error", f"{type(exc).__name__}: {exc}"


def _check_settings(keepalive_s: int, max_batch: int, max_inflight: int, batch_interval_s: float,
                    reconnect_max_s: float, connect_timeout_s: float) -> None:
    """ConfigError naming the [mqtt] key of the first setting out of range."""
    for name, value, low in (("keepalive_s", keepalive_s, 1), ("max_batch", max_batch, 1),
                             ("max_inflight", max_inflight, 1)):
        if value < low:
            raise ConfigError(f"must be >= {low} (got {value})", where=f"mqtt.{name}")
    if batch_interval_s < 0:
        raise ConfigError(f"must be >= 0 (got {batch_interval_s})", where="mqtt.batch_interval_s")
    if reconnect_max_s <= 0:
        raise ConfigError(f"must be > 0 (got {reconnect_max_s})", where="mqtt.reconnect_max_s")
    if connect_timeout_s <= 0:
        raise ConfigError(f"must be > 0 (got {connect_timeout_s})", where="mqtt.connect_timeout_s")


class Transport:
    """Outbox-backed, at-least-once MQTT publisher. A context manager; close() says "offline" on purpose.

    send(), flush(), stats() and close() may be called from any thread. status_extra() is called from the
    publisher thread on every (re)connect; queued and dropped are added by the transport itself.
    `security`: the account and TLS files (the agent passes its [mqtt] config); the url may carry the account.
    """

    def __init__(self, url: str | None, *, site: str, device: str, outbox: Outbox | Path,
                 security: MqttSecurity | None = None, keepalive_s: int = 30,
                 batch_interval_s: float = 0.0, max_batch: int = 500, max_inflight: int = 200,
                 reconnect_max_s: float = 10.0, status_extra: Callable[[], dict[str, Any]] | None = None,
                 client_id: str | None = None, connect_timeout_s: float = 5.0,
                 on_command: Callable[[str, bytes], None] | None = None) -> None:
        _check_settings(keepalive_s, max_batch, max_inflight, batch_interval_s, reconnect_max_s, connect_timeout_s)
        try:
            self._topics = {kind: topics.topic(site, device, kind) for kind in topics.KINDS}
        except ValueError as exc:
            raise ConfigError(str(exc), where="site/device_id") from None
        endpoint = parse_url(url) if url is not None else None
        # Built before the outbox opens: a password or TLS file that will not load leaves nothing to close.
        paho_client = (make_client(endpoint, security, client_id=client_id or f"edgekit-{site}-{device}")
                       if endpoint is not None else None)
        self.site, self.device = site, device
        self._own_outbox = not isinstance(outbox, Outbox)
        self.outbox = Outbox(Path(outbox)) if self._own_outbox else outbox  # type: ignore[arg-type]
        self._batch_interval_s = float(batch_interval_s)
        self._max_batch = max_batch
        self._max_inflight = max_inflight
        self._status_extra = status_extra
        self._on_command = on_command
        self._command_filter = topics.command(site, device, "+")
        self._connected = False
        self._closed = False
        self._gen = 0                    # bumped by each accepted CONNACK (network thread)
        self._seen_gen = 0               # the last connection the publisher announced (publisher thread)
        self._watermark: int | None = None  # last row id queued before the newest CONNACK
        self._status_due = False         # refresh_status() asked for the retained status again
        self._wake = threading.Event()
        # True while the publisher is between passes (about to wait or waiting): only then do senders and
        # PUBACKs set _wake. _work counts sends that need a pass; the publisher re-reads it before waiting.
        self._idle = True
        self._work = 0
        self.idle_wait_s = _IDLE_WAIT_S  # tests stretch it so that a lost wake-up cannot hide behind it
        self._acked_cond = threading.Condition()
        self._stop = threading.Event()
        self._acks: queue.SimpleQueue[tuple[int, ReasonCode]] = queue.SimpleQueue()
        self._inflight: dict[int, list[int]] = {}  # mid -> row ids (publisher thread only)
        self._sent_at: dict[int, float] = {}  # mid -> monotonic time of its first send (publisher thread only)
        self.publish_latency = Latency()
        self._cursor = 0                 # highest row id handed to paho (publisher thread only)
        self._next_tick = 0.0
        self._flush_requests = 0
        self._unsignalled = 0
        self._failed_connects = 0
        self._failure: tuple[str, str] | None = None  # the cause last logged; None once connected
        self._connack_seen = False       # this attempt got a CONNACK (network thread)
        self.last_refusal: str | None = None
        self.last_failure: str | None = None  # "cause: detail" of the newest failed attempt; None once connected
        self._counts = {"published": 0, "acked": 0, "reconnects": 0, "replayed": 0, "messages": 0,
                        "rejected": 0}
        self._client: mqtt.Client | None = None
        self._thread: threading.Thread | None = None
        if endpoint is None or paho_client is None:
            self.endpoint = None
            self.tls = False
            log.warning("transport.offline reason=no-broker queued=%d path=%s", self.outbox.backlog(),
                        self.outbox.path)
            return
        self.endpoint = str(endpoint)
        self.tls = endpoint.tls
        self._start(paho_client, endpoint, keepalive_s, reconnect_max_s, connect_timeout_s)

    def _start(self, client: mqtt.Client, endpoint: Any, keepalive_s: int, reconnect_max_s: float,
               connect_timeout_s: float) -> None:
        """Wire paho's callbacks, start the publisher thread and paho's network loop."""
        max_inflight = self._max_inflight
        self._set_will(client)
        client.on_pre_connect = self._on_pre_connect
        client.connect_timeout = connect_timeout_s  # TCP connect and TLS handshake, each
        # We bound the window ourselves; paho's must be at least as wide or it would queue in memory.
        client.max_inflight_messages_set(max_inflight + _STATUS_SLOTS)
        client.reconnect_delay_set(min_delay=min(0.5, reconnect_max_s), max_delay=reconnect_max_s)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        if self._on_command is not None:
            client.on_message = self._on_message
        self._client = client
        self._thread = threading.Thread(target=self._run, name=f"edgekit-publisher-{self.device}", daemon=True)
        self._thread.start()
        client.connect_async(endpoint.host, endpoint.port, keepalive=keepalive_s)
        client.loop_start()
        log.info("transport.start endpoint=%s tls=%s queued=%d batch_interval_s=%g max_inflight=%d",
                 self.endpoint, self.tls, self.outbox.backlog(), self._batch_interval_s, max_inflight)

    # -- public API --------------------------------------------------------------------------------
    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        """True only between an accepted CONNACK and the next disconnect."""
        return self._connected

    def send(self, kind: SendKind, payload: bytes) -> None:
        """Queue one encoded payload durably in the outbox; the publisher thread sends it later."""
        self.send_many([(kind, payload)])

    def send_many(self, items: Sequence[tuple[SendKind, bytes]]) -> None:
        """Queue encoded (kind, payload) items durably in one outbox transaction (all or none), in order.

        When this returns every item is in the outbox: it survives a crash and leaves only on its PUBACK
        (or, past outbox.max_rows, by the counted drop-oldest). Wakes the publisher at most once: at once
        for reviews and metrics, and for results unless batching, where they wait for the tick or a full
        batch.
        """
        rows: list[tuple[str, bytes, bool]] = []
        results = 0
        for kind, payload in items:
            if kind not in _SEND_KINDS:
                raise ValueError(f"send kind must be one of {_SEND_KINDS} (got {kind!r})")
            batchable = kind == "result"
            results += batchable
            rows.append((self._topics[kind], payload, batchable))
        if not rows:
            return
        self.outbox.put_many(rows, replayed=not self._connected)
        if self._client is None:
            return
        # While batching, results wake the publisher only when a full batch is waiting; its tick does the rest.
        if self._batch_interval_s > 0 and results == len(rows):
            self._unsignalled += results
            if self._unsignalled < self._max_batch:
                return
            self._unsignalled = 0
        self._work += 1  # read by the publisher before it sleeps: a pass that missed these rows runs again
        if self._connected and self._idle:  # disconnected: _on_connect wakes it and it drains everything
            self._idle = False
            self._wake.set()

    def refresh_status(self) -> None:
        """Publish the retained "online" status again, with status_extra's values now (the agent's rollout state
        changed), at the publisher's next pass. Any thread. While disconnected the next connect's birth says it."""
        if self._client is None:
            return
        self._status_due = True
        self._work += 1
        if self._connected and self._idle:
            self._idle = False
            self._wake.set()

    def flush(self, timeout_s: float, stop: threading.Event | None = None) -> bool:
        """Publish partial batches now and wait until the outbox is empty (all PUBACKed) or timeout.

        A set `stop` ends the wait (within ~50 ms) whenever the transport is not connected: with the broker
        away there is nothing to wait for once asked to stop, and the outbox keeps every row. While connected
        the broker is taking rows, so the drain goes on until the outbox is empty or the timeout.
        """
        deadline = time.monotonic() + timeout_s
        if self._client is None:
            return self.outbox.backlog() == 0
        self._flush_requests += 1
        self._wake.set()
        try:
            while True:
                if self.outbox.backlog() == 0:
                    return True
                left = deadline - time.monotonic()
                if left <= 0 or (stop is not None and stop.is_set() and not self._connected):
                    return False
                with self._acked_cond:
                    self._acked_cond.wait(min(left, 0.05))
        finally:
            self._flush_requests -= 1

    def backlog_by_kind(self) -> dict[str, int]:
        """Rows queued per kind (result, review, metrics, trial, status; "other" for topics not this
        device's), from one scan of the outbox."""
        kind_of = {t: k for k, t in self._topics.items()}
        out: dict[str, int] = {}
        for t, n in self.outbox.backlog_by_topic().items():
            k = kind_of.get(t, "other")
            out[k] = out.get(k, 0) + n
        return out

    def stats(self) -> dict[str, Any]:
        """Counters since start (published/acked/replayed count results, messages count MQTT messages)."""
        return {**self._counts, "queued": self.outbox.backlog(), "dropped": self.outbox.dropped,
                "connected": self._connected, "last_refusal": self.last_refusal,
                "last_failure": self.last_failure, "failed_connects": self._failed_connects,
                "publisher_alive": self._thread is not None and self._thread.is_alive()}

    def close(self) -> None:
        """Stop publishing, say "offline" (retained) if connected, disconnect. Unacked rows stay queued."""
        if self._closed:
            return
        self._closed = True
        client = self._client
        if client is not None:
            self._stop.set()
            self._wake.set()
            if self._thread is not None:
                self._thread.join(timeout=10)
            if self._connected:
                payload = topics.status(self.site, self.device, "offline", ts=time.time(), reason="closed")
                info = client.publish(self._topics["status"], payload, qos=topics.QOS, retain=True)
                try:
                    info.wait_for_publish(timeout=2.0)
                except (RuntimeError, ValueError) as exc:
                    log.warning("transport.offline_status_failed endpoint=%s error=%s", self.endpoint, exc)
            if self._thread is None or not self._thread.is_alive():
                # The broker acks in order: PUBACKs that came in behind the publisher's last look are here
                # now; taking them spares those rows a duplicate after the next start.
                self._take_acks()
            client.disconnect()
            client.loop_stop()
            self._connected = False
        log.info("transport.closed endpoint=%s published=%d acked=%d queued=%d dropped=%d", self.endpoint,
                 self._counts["published"], self._counts["acked"], self.outbox.backlog(), self.outbox.dropped)
        if self._own_outbox:
            self.outbox.close()

    # -- paho callbacks (network thread): set flags, queue mids, wake the publisher ----------------
    def _set_will(self, client: mqtt.Client) -> None:
        payload = topics.status(self.site, self.device, "offline", ts=time.time(), reason="lost")
        client.will_set(self._topics["status"], payload, qos=topics.QOS, retain=True)

    def _on_pre_connect(self, client: mqtt.Client, userdata: Any) -> None:
        self._connack_seen = False
        self._set_will(client)  # the will's ts = this connect attempt

    def _failed(self, cause: str, detail: str) -> bool:
        """Count a failed attempt; True when its cause differs from the one last logged (log it then)."""
        self._failed_connects += 1
        self.last_failure = f"{cause}: {detail}"
        new = (cause, detail) != self._failure
        self._failure = (cause, detail)
        return new

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Any) -> None:
        self._connack_seen = True
        if reason.is_failure:
            self._connected = False
            self.last_refusal = str(reason)
            new = self._failed("connack_refused", str(reason))
            # One line per cause, not per retry; a changed reason (or one after a success) is logged again.
            log.log(logging.WARNING if new else logging.DEBUG,
                    "transport.refused endpoint=%s reason=%r code=%d attempts=%d hint=%r", self.endpoint,
                    str(reason), reason.value, self._failed_connects, _HINTS["connack_refused"])
            return
        if self._failure is not None:
            log.warning("transport.recovered endpoint=%s after_attempts=%d last_cause=%r", self.endpoint,
                        self._failed_connects, self.last_failure)
        self._failure = None
        self.last_failure = None
        self._failed_connects = 0
        # Rows up to here were queued before this connection: they are replays. Read before `connected`
        # turns True, so a row sent after it (replayed=False) always has a higher id.
        try:
            self._watermark = self.outbox.last_id()
        except Exception as exc:  # never let the network thread die; None = mark every queued row
            log.warning("transport.watermark_failed error=%r", exc)
            self._watermark = None
        self._connected = True
        self._gen += 1
        self._wake.set()
        if self._on_command is not None:
            # Every connect: a broker without our session (clean start, or one that lost it) forgets it.
            client.subscribe(self._command_filter, qos=topics.QOS)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """A command for this device: its name (the topic's last level) and payload to `on_command`. A failing
        handler is logged, never raised into paho's network thread."""
        name = msg.topic.rsplit("/", 1)[-1]
        try:
            self._on_command(name, msg.payload)  # type: ignore[misc]
        except Exception:
            log.exception("transport.command_failed topic=%s", msg.topic)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this from inside its `except OSError:` around reconnect(), so the exception it
        # swallows is still the one being handled here (the callback gets no argument for it).
        self._log_failure(*connect_failure(sys.exc_info()[1]))

    def _log_failure(self, cause: str, detail: str) -> None:
        new = self._failed(cause, detail)
        log.log(logging.WARNING if new else logging.DEBUG,
                "transport.connect_failed endpoint=%s tls=%s cause=%s detail=%r attempts=%d hint=%r",
                self.endpoint, self.tls, cause, detail, self._failed_connects, _HINTS[cause])

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Any) -> None:
        was = self._connected
        self._connected = False
        if was and not self._closed:
            log.warning("transport.disconnected endpoint=%s reason=%r inflight=%d", self.endpoint,
                        str(reason), len(self._inflight))
        elif not was and not self._connack_seen and not self._closed:
            # The socket opened (and TLS, if any, shook hands) but the connection ended before any CONNACK.
            self._log_failure("closed_before_connack", f"connection closed before any CONNACK ({reason})")
        self._wake.set()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Any) -> None:
        self._acks.put((mid, reason))
        if self._idle:  # a busy publisher takes this ack at its next pass (it looks before sleeping)
            self._idle = False
            self._wake.set()

    # -- publisher thread --------------------------------------------------------------------------
    def _run(self) -> None:
        """The publisher loop. No wake-up is lost although senders wake it only while `_idle`: a sender
        commits its rows, bumps `_work`, then reads `_idle`; the publisher sets `_idle`, then reads `_work`
        (and the ack queue) before it sleeps. Whichever comes second sees the other's write (the GIL orders
        them): the sender wakes it, or the publisher runs another pass. A stale False written by a waker
        is always followed by its `_wake.set()`, so it cannot leave the publisher asleep."""
        seen = self._work
        try:
            while not self._stop.is_set():
                self._idle = True
                if not self._more_work(seen):
                    self._wake.wait(self._wait_s())
                self._idle = False
                self._wake.clear()
                seen = self._work  # before reading the outbox: rows committed after this bump it again
                self._take_acks()
                if self._stop.is_set():
                    break
                if self._connected:
                    if self._gen != self._seen_gen:
                        self._announce()
                    elif self._status_due:
                        self._publish_status()
                    self._publish_some()
                    if len(self._inflight) >= self._max_inflight // 2:
                        # Draining with a busy window: let PUBACKs pile up so one DELETE and one SELECT
                        # serve many of them (per-ack transactions halved the unbatched drain rate).
                        time.sleep(_COALESCE_S)
            self._take_acks()
        except Exception:
            # A bug here must not take the agent down; rows stay in the outbox for the next start.
            log.exception("transport.publisher_failed endpoint=%s", self.endpoint)
        finally:
            self.outbox.release()

    def _more_work(self, seen: int) -> bool:
        """Work that arrived during the last pass: PUBACKs, or rows to publish that the pass may have missed."""
        if not self._acks.empty():
            return True
        return self._work != seen and self._connected and len(self._inflight) < self._max_inflight

    def _wait_s(self) -> float:
        if self._batch_interval_s <= 0:
            return self.idle_wait_s
        left = self._next_tick - time.monotonic()
        return left if left > 0.001 else self._batch_interval_s

    def _announce(self) -> None:
        """A fresh connection: everything still queued is a replay; say "online" (retained)."""
        first = self._seen_gen == 0
        self._seen_gen = self._gen
        if not first:
            self._counts["reconnects"] += 1
        replaying = self.outbox.mark_all_replayed(self._watermark)
        self._publish_status()
        log.info("transport.connected endpoint=%s reconnect=%s replaying=%d inflight_resent=%d",
                 self.endpoint, not first, replaying, len(self._inflight))

    def _publish_status(self) -> None:
        """The retained "online" status with status_extra's values, queued and dropped."""
        self._status_due = False
        extra: dict[str, Any] = {}
        if self._status_extra is not None:
            try:
                extra = {k: v for k, v in self._status_extra().items() if k not in _STATUS_KEYS}
            except Exception as exc:  # a broken callback must not stop the birth message
                log.warning("transport.status_extra_failed error=%r", exc)
        extra.update(queued=self.outbox.backlog(), dropped=self.outbox.dropped)
        payload = topics.status(self.site, self.device, "online", ts=time.time(), **extra)
        assert self._client is not None
        self._client.publish(self._topics["status"], payload, qos=topics.QOS, retain=True)

    def _take_acks(self) -> None:
        ids: list[int] = []
        while True:
            try:
                mid, reason = self._acks.get_nowait()
            except queue.Empty:
                break
            rows = self._inflight.pop(mid, None)
            sent = self._sent_at.pop(mid, None)
            if sent is not None:
                self.publish_latency.observe(time.monotonic() - sent)
            if rows is None:
                continue  # a status message
            if reason.is_failure:
                # The broker refused the message (MQTT v5 reason, e.g. ACL); keep the rows for a later start.
                self._counts["rejected"] += len(rows)
                log.warning("transport.rejected endpoint=%s reason=%r rows=%d", self.endpoint, str(reason),
                            len(rows))
                continue
            ids.extend(rows)
        if ids:
            self.outbox.ack(ids)
            self._counts["acked"] += len(ids)
            with self._acked_cond:
                self._acked_cond.notify_all()

    def _publish_some(self) -> None:
        batching = self._batch_interval_s > 0
        now = time.monotonic()
        flush_partial = not batching or self._flush_requests > 0 or now >= self._next_tick
        flushed_partial = False
        while self._connected:
            free = self._max_inflight - len(self._inflight)
            if free <= 0:
                return
            limit = min(_READ_CHUNK, free * self._max_batch) if batching else free
            # Rows are read as they are published: a window that fills after `free` reviews has read free + 1
            # rows, not `limit` (5,000 rows of 7 KB reviews per pass, re-read each pass, stalled the drain).
            with closing(self.outbox.iter_pending(limit, after_id=self._cursor)) as rows:
                row = next(rows, None)
                if row is None:
                    break
                sent, waiting = 0, False
                while row is not None and free > 0:
                    if batching and row.batchable:
                        chunk = [row]
                        row = next(rows, None)
                        while (row is not None and len(chunk) < self._max_batch and row.batchable
                               and row.topic == chunk[0].topic):
                            chunk.append(row)
                            row = next(rows, None)
                        if row is None and len(chunk) < self._max_batch and not flush_partial:
                            waiting = True  # a partial batch at the end of the queue waits for more rows or the tick
                            break
                        flushed_partial = flushed_partial or len(chunk) < self._max_batch
                        payload = topics.batch(self.site, self.device, [_body(r) for r in chunk])
                        self._publish(chunk[0].topic, payload, chunk)
                    else:
                        self._publish(row.topic, _body(row), [row])
                        row = next(rows, None)
                    free -= 1
                    sent += 1
            if sent == 0 or waiting or row is not None:
                break  # window full, or a partial batch is waiting
        if flushed_partial or (batching and now >= self._next_tick):
            self._next_tick = now + self._batch_interval_s

    def _publish(self, topic: str, payload: bytes, rows: list[OutboxRow]) -> None:
        assert self._client is not None
        info = self._client.publish(topic, payload, qos=topics.QOS)
        # Whatever rc says (even "no connection"), paho keeps a QoS 1 message and resends it after reconnect;
        # the rows stay in the outbox until its PUBACK either way.
        self._inflight[info.mid] = [r.id for r in rows]
        self._sent_at[info.mid] = time.monotonic()
        self._cursor = rows[-1].id
        self._counts["messages"] += 1
        self._counts["published"] += len(rows)
        self._counts["replayed"] += sum(r.replayed for r in rows)


def _body(row: OutboxRow) -> bytes:
    if not row.replayed:
        return row.payload
    try:
        return topics.mark_replayed(row.payload)
    except ValueError:  # not a JSON object (put there by someone else): send it unchanged, never stall
        return row.payload
