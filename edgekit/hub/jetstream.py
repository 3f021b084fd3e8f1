"""The JetStream intake (issue 17): the hub as a competing consumer of NATS's MQTT gateway, on a cluster.

Devices publish MQTT 3.1.1 QoS 1 to any node; the gateway stores each QoS 1 PUBLISH in the replicated stream
`$MQTT_msgs` and sends the PUBACK only after JetStream acknowledged the store (nats-server 2.9: one
synchronous store per PUBLISH, acknowledged by a majority of the stream's replicas). Every hub pulls from one
durable consumer on that stream (`--share-group`, filter `$MQTT.msgs.edgekit.v1.>`), feeds what it pulls to the
MQTT intake's BatchWriter (the one parse/batch/store path) and acknowledges each message after its transaction
commits; a message a dead hub pulled and never acknowledged goes to another hub after `ack_wait_s`.

nats-py is asyncio: its loop runs in a thread of its own, the writer thread acknowledges through it. Needs
the `cluster` extra (nats-py); imported only when `edgekit hub --broker nats://...` is used.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from edgekit import topics
from edgekit.errors import ConfigError, TransportError
from edgekit.hub.db import HubDB
from edgekit.hub.ingest import (
    CLUSTER_DOC,
    KEY,
    MAX_BATCH,
    MAX_BATCH_BYTES,
    BatchWriter,
    IngestStats,
    log_stopped,
)
from edgekit.mqtt import TLS_FIELDS, MqttSecurity, label, read_password, tls_context

if TYPE_CHECKING:
    from nats.aio.msg import Msg

log = logging.getLogger(__name__)

SCHEMES = {"nats": 4222, "tls": 4222}
STREAM = "$MQTT_msgs"  # the gateway's stream of QoS 1 messages (nats-server mqtt.go: mqttStreamName)
SUBJECT_PREFIX = "$MQTT.msgs."  # + the topic as a NATS subject ('/' -> '.'; the gateway refuses '.' and ' ')
ACK_WAIT_S = 30.0  # a dead hub's unacknowledged messages go to another hub after this
MAX_ACK_PENDING = 20_000  # per consumer, all hubs together: ~10 batches of MAX_BATCH in flight
FETCH_BATCH = 256  # messages per pull: small enough that two hubs share a backlog of 100-result messages
FETCH_TIMEOUT_S = 1.0  # one pull request waits this long for messages (and the stop flag is read as often)
RETRY_S = 0.5  # after a failed connect, JetStream API call or pull (a node down, a leader election)
JS_REPLICAS_NOT_CLUSTERED = 10074  # JetStream API err_code: "replicas > 1 not supported in non-clustered mode"
JS_STREAM_NAME_IN_USE = 10058  # "stream name already in use with a different configuration"
URL_HINT = "nats://[USER@]HOST[:PORT][,HOST[:PORT]...] (the cluster's client ports), or tls://... for TLS"
EXTRA_HINT = "pip install 'edgekit[cluster]' (nats-py)"


@dataclass(frozen=True)
class Servers:
    """The cluster's client URLs (no account in them), the account, and whether TLS is on."""

    urls: list[str]
    tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def parse_servers(url: str, where: str = f"{KEY} --broker") -> Servers:
    """`nats://[user[:password]@]host[:port][,host[:port]...]` (each item may repeat the scheme) -> Servers."""
    from edgekit.mqtt import redact_url

    shown = f"{where} {redact_url(url)!r}"
    items = [part.strip() for part in url.split(",") if part.strip()]
    if not items:
        raise ConfigError("no server", where=shown, hint=URL_HINT)
    first = urlsplit(items[0])
    if first.scheme not in SCHEMES:
        raise ConfigError(f"must start with nats:// or tls:// (got scheme {first.scheme!r})", where=shown,
                          hint=URL_HINT)
    urls = []
    for item in items:
        parts = urlsplit(item if "://" in item else f"{first.scheme}://{item}")
        try:
            host, port = parts.hostname, parts.port
        except ValueError:
            raise ConfigError("a bad host or port", where=shown, hint=URL_HINT) from None
        if parts.scheme != first.scheme or not host or parts.path not in ("", "/") or parts.query:
            raise ConfigError(f"cannot read server {item!r}", where=shown, hint=URL_HINT)
        hostport = f"[{host}]" if ":" in host else host
        urls.append(f"{parts.scheme}://{hostport}:{port or SCHEMES[parts.scheme]}")
    return Servers(urls, first.scheme == "tls", unquote(first.username) if first.username else None,
                   unquote(first.password) if first.password is not None else None)


def subject_filter() -> str:
    """The consumer's filter: every device topic (topics.subscription()) as the gateway stores it."""
    return SUBJECT_PREFIX + topics.subscription().replace("/", ".").replace("+", "*")


def topic_of(subject: str) -> str:
    """A stored message's MQTT topic, from its subject (the gateway's '/' -> '.' undone)."""
    return subject[len(SUBJECT_PREFIX):].replace(".", "/")


def _unpack(m: Msg) -> tuple[str, bytes, bool]:
    # retained=False: the stream holds each PUBLISH as it arrived, never a broker's stale retained copy.
    return topic_of(m.subject), m.data, False


class JetStreamIngest:
    """Pull, batch, write, acknowledge, on a NATS cluster. A context manager, as `Ingest`; `stats` counts.

    `share_group` names the durable consumer: hubs with the same one split the messages. `replicas` is for
    `$MQTT_msgs` when the hub creates it (before any device connected): 3 on a cluster, 1 on a lone server.
    A server without JetStream is a TransportError in `error` (`failed` set, `on_fatal` called)."""

    def __init__(self, broker_url: str, db: HubDB, share_group: str | None = "edgekit-hub",
                 client_id: str | None = None, max_batch: int = MAX_BATCH, security: MqttSecurity | None = None,
                 ack_wait_s: float = ACK_WAIT_S, replicas: int = 3,
                 on_fatal: Callable[[TransportError], None] | None = None) -> None:
        try:
            import nats  # noqa: F401 - checked here, used in the loop's thread
        except ImportError:
            raise ConfigError("the JetStream intake needs nats-py", where=f"{KEY} --broker",
                              hint=EXTRA_HINT) from None
        if not ack_wait_s > 0:
            raise ConfigError(f"must be > 0 seconds (got {ack_wait_s})", where=f"{KEY} --ack-wait-s")
        self.servers = parse_servers(broker_url)
        self.security = security or MqttSecurity.model_validate({})
        self._check_security()
        self.db = db
        self.durable = share_group or "edgekit-hub"
        self.name = client_id or f"edgekit-hub-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.ack_wait_s = float(ack_wait_s)
        self.replicas = replicas
        self.max_batch = max_batch
        self.stats = IngestStats()
        self.connected = threading.Event()
        self.failed = threading.Event()
        self.error: TransportError | None = None
        self._on_fatal = on_fatal
        self.writer = BatchWriter(db, self.stats, _unpack, self._ack, max_batch)
        self._stopping = threading.Event()
        self._fetching_done = threading.Event()
        self._end_session = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._close_now: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._nc: Any = None
        self._js: Any = None

    def _check_security(self) -> None:
        s = self.security
        if self.servers.username is not None and s.username is not None:
            raise ConfigError("the user name is given twice, in the url and here", where=label(KEY, "username"))
        if not self.servers.tls:
            for name in TLS_FIELDS:
                if getattr(s, name) is not None:
                    raise ConfigError("a TLS file for a plain nats:// server", where=label(KEY, name),
                                      hint="use tls://HOST:PORT for TLS, or remove the file")

    @property
    def where(self) -> str:
        return ",".join(self.servers.urls)

    # --- the caller's side ---------------------------------------------------------------------------
    def start(self) -> None:
        self.db.create()
        self.writer.start()
        self._thread = threading.Thread(target=self._run, name="hub-jetstream", daemon=True)
        self._thread.start()

    def stop(self, end_session: bool | None = None) -> None:
        """Stop pulling, write and acknowledge what arrived, then close. `end_session` also deletes the durable
        consumer (nothing is kept for this group any more: the stream drops messages nobody has interest in)."""
        if self._stopping.is_set():
            return
        self._end_session = bool(end_session)
        self._stopping.set()
        self._fetching_done.wait(FETCH_TIMEOUT_S + 10)
        self.writer.stop()
        if self._loop is not None and self._close_now is not None:
            try:
                self._loop.call_soon_threadsafe(self._close_now.set)
            except RuntimeError:  # the loop already ended (its thread failed)
                pass
        if self._thread:
            self._thread.join(timeout=15)
        log_stopped(self.stats)

    def __enter__(self) -> JetStreamIngest:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _ack(self, msgs: list[Msg]) -> None:
        """The writer thread, after the batch's transaction committed: acknowledge each message (explicit
        acks; an ack-all would also take another hub's messages below this one's)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # unacknowledged: redelivered after ack_wait_s
        try:
            asyncio.run_coroutine_threadsafe(_ack_all(msgs), loop).result(timeout=10)
        except Exception as exc:  # noqa: BLE001 - a lost connection: redelivered after ack_wait_s, stored once
            log.debug("hub.ack_failed messages=%d error=%s", len(msgs), exc)

    def _fatal(self, error: TransportError) -> None:
        if self.failed.is_set():
            return
        self.error = error
        self.failed.set()
        log.info("hub.broker_unusable servers=%s", self.where)  # the CLI prints the error itself, once
        self._stopping.set()
        if self._on_fatal is not None:
            self._on_fatal(error)

    # --- the loop's thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except Exception:
            log.exception("hub.jetstream_failed servers=%s", self.where)
        finally:
            self._fetching_done.set()
            loop.close()

    async def _main(self) -> None:
        self._close_now = asyncio.Event()
        try:
            if await self._connect() and await self._ensure_consumer():
                await self._pull()
        finally:
            self._fetching_done.set()
            if self._nc is not None:
                await self._close_now.wait()  # the writer has acknowledged its last batch
                await self._close()

    async def _connect(self) -> bool:
        import nats

        password = self.servers.password if self.servers.password is not None else read_password(self.security, KEY)
        username = self.servers.username or self.security.username
        context: ssl.SSLContext | None = tls_context(self.security, KEY) if self.servers.tls else None

        async def disconnected() -> None:
            self.connected.clear()
            if not self._stopping.is_set():
                log.warning("hub.disconnected servers=%s", self.where)

        async def reconnected() -> None:
            log.info("hub.reconnected server=%s", self._nc.connected_url.netloc if self._nc else "?")
            self.connected.set()

        async def error(exc: Exception) -> None:
            log.debug("hub.nats_error error=%r", exc)

        while not self._stopping.is_set():
            try:
                self._nc = await nats.connect(self.servers.urls, user=username, password=password, tls=context,
                                              name=self.name, connect_timeout=2, allow_reconnect=True,
                                              max_reconnect_attempts=-1, reconnect_time_wait=RETRY_S,
                                              disconnected_cb=disconnected, reconnected_cb=reconnected,
                                              error_cb=error)
                self._js = self._nc.jetstream(timeout=5)
                return True
            except (OSError, nats.errors.Error, asyncio.TimeoutError) as exc:
                log.warning("hub.connect_failed servers=%s error=%s", self.where, str(exc) or type(exc).__name__)
                await asyncio.sleep(RETRY_S)
        return False

    async def _ensure_consumer(self) -> bool:
        """Create `$MQTT_msgs` (as the gateway would) if no device connected yet, and the durable consumer:
        from then on the stream keeps every QoS 1 message for this group, hubs running or not."""
        import nats
        from nats.js import api
        from nats.js.errors import NotFoundError, ServiceUnavailableError

        config = api.ConsumerConfig(durable_name=self.durable, filter_subject=subject_filter(),
                                    ack_policy=api.AckPolicy.EXPLICIT, deliver_policy=api.DeliverPolicy.ALL,
                                    ack_wait=self.ack_wait_s, max_ack_pending=MAX_ACK_PENDING, max_deliver=-1)
        while not self._stopping.is_set():
            try:
                try:
                    await self._js.stream_info(STREAM)
                except NotFoundError:
                    await self._create_stream()
                await self._js.add_consumer(STREAM, config)
                log.info("hub.connected servers=%s server=%s stream=%s consumer=%s filter=%s ack_wait_s=%g",
                         self.where, self._nc.connected_url.netloc, STREAM, self.durable, subject_filter(),
                         self.ack_wait_s)
                self.connected.set()
                return True
            except ServiceUnavailableError as exc:
                if "not enabled" in str(exc).lower():
                    self._fatal(TransportError(
                        "the NATS server has no JetStream, which the hub consumes from",
                        where=f"{KEY} --broker {self.where}",
                        hint=f"enable jetstream and the mqtt listener on every node ({CLUSTER_DOC})"))
                    return False
                log.warning("hub.jetstream_unavailable servers=%s error=%s", self.where, exc)
            except (nats.errors.Error, asyncio.TimeoutError) as exc:
                log.warning("hub.jetstream_retry servers=%s error=%s", self.where, str(exc) or type(exc).__name__)
            await asyncio.sleep(RETRY_S)
        return False

    async def _create_stream(self) -> None:
        from nats.js import api
        from nats.js.errors import APIError

        replicas = self.replicas
        while True:
            config = api.StreamConfig(name=STREAM, subjects=[SUBJECT_PREFIX + ">"], storage=api.StorageType.FILE,
                                      retention=api.RetentionPolicy.INTEREST, num_replicas=replicas)
            try:
                await self._js.add_stream(config)
                log.info("hub.stream_created stream=%s replicas=%d", STREAM, replicas)
                return
            except APIError as exc:
                if exc.err_code == JS_REPLICAS_NOT_CLUSTERED and replicas > 1:  # a lone server: R1 is all
                    replicas = 1
                    continue
                if exc.err_code == JS_STREAM_NAME_IN_USE:  # the gateway (or another hub) made it meanwhile
                    return
                raise

    async def _pull(self) -> None:
        import nats

        sub = await self._js.pull_subscribe_bind(self.durable, stream=STREAM)
        batch = min(self.max_batch, FETCH_BATCH)
        while not self._stopping.is_set():
            queued, queued_bytes = self.writer.backlog()
            if queued >= self.max_batch or queued_bytes >= MAX_BATCH_BYTES:  # a transaction's worth is waiting:
                await asyncio.sleep(0.005)  # pull no further ahead (their ack_wait runs from delivery)
                continue
            try:
                msgs = await sub.fetch(batch, timeout=FETCH_TIMEOUT_S)
            except nats.errors.TimeoutError:
                continue
            except (nats.errors.Error, asyncio.TimeoutError) as exc:  # a node down, a leader election
                log.debug("hub.fetch_retry error=%s", str(exc) or type(exc).__name__)
                await asyncio.sleep(RETRY_S)
                continue
            for m in msgs:
                self.writer.put(m)

    async def _close(self) -> None:
        try:
            if self._end_session:
                await self._js.delete_consumer(STREAM, self.durable)
                log.info("hub.consumer_deleted stream=%s consumer=%s", STREAM, self.durable)
            await self._nc.flush(timeout=5)
        except Exception as exc:  # noqa: BLE001 - closing anyway; unacknowledged messages are redelivered
            log.debug("hub.close_failed error=%r", exc)
        await self._nc.close()


async def _ack_all(msgs: list[Msg]) -> None:
    for m in msgs:
        await m.ack()

