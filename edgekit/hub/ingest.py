"""Ingest: an MQTT v5 shared subscription on edgekit/v1/+/+/+ written to the hub database in batches.

paho's network thread only queues messages; one writer thread decodes a batch, writes it in one
transaction and only then acknowledges (manual PUBACK), so a crash loses nothing and a redelivery is a
no-op (writes are idempotent by result id). Bad payloads are logged and acknowledged, never fatal.
Trial summaries (gait bundles) are stored the same way, idempotent by trial id; a scored trial's answer
also becomes a result under the trial's id, so it is reviewed, labelled and exported like any result.
Identity comes from the topic (which the broker's ACL ties to the account): a payload naming another site,
device or device's id is rejected (hub.rejected), never stored, so no device can take or shadow another's
result ids. BatchWriter is that one parse/batch/store/ack path; the JetStream intake (jetstream.py) feeds it
too. A broker without MQTT 5 (or without shared subscriptions) stops the hub with one TransportError.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import paho.mqtt.client as mqtt
import sqlalchemy.exc
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgekit import topics
from edgekit.contract import messages as messages_contract
from edgekit.errors import DataError, IdentityError, TransportError
from edgekit.hub.db import Batch, HubDB, result_row, review_row, trial_result_row, trial_row
from edgekit.mqtt import Endpoint, MqttSecurity, make_client, parse_url

log = logging.getLogger(__name__)

MAX_BATCH = 2000  # messages per transaction; a result-batch message holds many results, so also:
MAX_BATCH_BYTES = 4 << 20  # ~6k results of ~600 bytes: a retry (lock, deadlock) stays cheap, acks flow
SESSION_EXPIRY_S = 86400  # a named hub's queued messages wait a day for it at the broker
RANDOM_SESSION_EXPIRY_S = 300  # an unnamed one's survives a broker restart or a short network outage
SEEN_EVERY_S = 1.0  # last-seen writes per device at most this often: the row is a lock two hubs share
RECONNECT_MAX_S = 2.0  # the hub sits next to its broker: retrying often is cheap, missing results is not
KEY = "edgekit hub"  # errors about the broker name this command's options
PROBE_TIMEOUT_S = 3.0  # an MQTT 3.1.1 CONNACK from a broker that dropped our MQTT 5 CONNECT
UNSUPPORTED_PROTOCOL_VERSION = 0x84  # CONNACK reason; paho reports a 3.1.1 broker's return code 1 as this
SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E  # SUBACK reason (MQTT 5.0, 3.9.3)
CLUSTER_DOC = "deploy/cluster/README.md"

M = TypeVar("M")


@dataclass
class IngestStats:
    messages: int = 0
    results: int = 0  # result objects received (a batch counts each), duplicates included
    new_results: int = 0  # rows created
    reviews: int = 0
    trials: int = 0  # trial summaries received, duplicates included
    new_trials: int = 0  # trial rows created
    bad: int = 0  # messages refused as malformed: not JSON, wrong schema for the topic, a bad field
    rejected: int = 0  # messages refused for identity, not counted in bad: a site, device, id or seq that is
    #                    missing or not the topic device's own (a spoof, or a device_id unlike its account)
    batches: int = 0
    # (topic kind, ok | bad | rejected) -> messages: the hub's /metrics (edgekit/hub/observe.py)
    by_kind: Counter[tuple[str, str]] = field(default_factory=Counter)


def message_kind(topic_name: str) -> str:
    """The kind a topic names (result, review, trial, status, metrics), "other" for any other last level: a
    bounded label for the hub's metrics whatever a device publishes."""
    kind = topic_name.rpartition("/")[2]
    return kind if kind in messages_contract.PARSERS else "other"


def to_batch(messages: list[tuple[str, bytes]] | list[tuple[str, bytes, bool]], now: float,
             stats: IngestStats | None = None) -> Batch:
    """Parse (topic, payload[, retained]) with the message contract (edgekit/contract/messages.py) into one
    Batch. Malformed messages are logged as hub.bad_payload, foreign ones (another site's or device's
    identity, an id not the topic device's own) as hub.rejected; both are skipped whole (a batch with one
    foreign result too).

    A device was last seen `now`, when the hub heard from it, except for a retained status (the broker's
    copy, maybe old), which counts from its own ts."""
    out = Batch()
    for name, payload, *flags in messages:
        retained = bool(flags and flags[0])
        try:
            msg = messages_contract.parse(name, payload)
        except IdentityError as exc:
            log.warning("hub.rejected topic=%s reason=%s", name, exc.message)
            if stats:
                stats.rejected += 1
                stats.by_kind[message_kind(name), "rejected"] += 1
            continue
        except DataError as exc:
            log.warning("hub.bad_payload topic=%s reason=%s", name, exc.message)
            if stats:
                stats.bad += 1
                stats.by_kind[message_kind(name), "bad"] += 1
            continue
        if stats:
            stats.by_kind[message_kind(name), "ok"] += 1
        _add(out, msg, now, retained, stats)
    return out


def _add(out: Batch, msg: messages_contract.Message, now: float, retained: bool,
         stats: IngestStats | None) -> None:
    """One parsed message into the batch's rows and device facts."""
    key = (msg.site, msg.device)
    if isinstance(msg, (messages_contract.Result, messages_contract.ResultBatch)):
        results = msg.results if isinstance(msg, messages_contract.ResultBatch) else [msg]
        out.results.extend(result_row(r, now) for r in results)
        if results:
            out.see(*key, now)
        if stats:
            stats.results += len(results)
    elif isinstance(msg, messages_contract.Review):
        out.reviews.append(review_row(msg, now))
        out.see(*key, now)
    elif isinstance(msg, messages_contract.Status):
        # Arrival order, not ts: a last will carries the ts of the connect that registered it,
        # older than the "online" sent after that connect, yet it is the newer news.
        out.status[key] = {"state": msg.state, "ts": msg.ts, "queued": msg.queued, "dropped": msg.dropped,
                           "model_version": msg.model_version, "signature": msg.signature}
        if msg.rollout is not None:
            out.status[key]["rollout"] = msg.rollout.to_obj()
        out.see(*key, msg.ts if retained else now)
    elif isinstance(msg, messages_contract.Metrics):
        m = msg.to_obj()
        old = out.metrics.get(key)
        if old is None or old["ts"] <= m["ts"]:
            out.metrics[key] = m
        out.see(*key, now)
    else:
        out.trials.append(trial_row(msg, now))
        answer = trial_result_row(msg, now)  # written in the same transaction as the trial, by the same id
        if answer is not None:
            out.results.append(answer)
        log.info("hub.trial site=%s device=%s id=%s steps=%s walk_start_s=%s walk_end_s=%s reason=%s",
                 msg.site, msg.device, msg.id, msg.steps, msg.walk_start_s, msg.walk_end_s,
                 msg.reason or msg.error or "none")
        out.see(*key, now)
        if stats:
            stats.trials += 1


class BatchWriter(Generic[M]):
    """The one write path of every intake (MQTT v5 here, JetStream in jetstream.py): one thread takes what
    arrived in batches (up to `max_batch` messages or MAX_BATCH_BYTES), parses them with the contract
    (`to_batch`), stores each batch in one transaction, retrying while the database is away, and only then
    hands the batch to `ack`. The intake differs only in `unpack` (its message -> topic, payload, retained)
    and `ack` (how the broker hears that a message is stored)."""

    def __init__(self, db: HubDB, stats: IngestStats, unpack: Callable[[M], tuple[str, bytes, bool]],
                 ack: Callable[[list[M]], None], max_batch: int = MAX_BATCH) -> None:
        self.db = db
        self.stats = stats
        self.max_batch = max_batch
        self._unpack = unpack
        self._ack = ack
        self._queue: queue.SimpleQueue[M | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._queued_bytes = 0

    def put(self, msg: M) -> None:
        """Queue one message (any thread; never blocks)."""
        with self._lock:
            self._queued_bytes += len(self._unpack(msg)[1])
        self._queue.put(msg)

    def backlog(self) -> tuple[int, int]:
        """Messages and payload bytes queued and not yet written: how far an intake that pulls (JetStream) may
        run ahead of the database."""
        return self._queue.qsize(), self._queued_bytes

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="hub-ingest-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Write and acknowledge what was queued before this call, then end the thread."""
        self._stop.set()
        self._queue.put(None)
        if self._thread:
            self._thread.join(timeout=timeout_s)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            msgs: list[M] = [] if first is None else [first]
            size = len(self._unpack(first)[1]) if first is not None else 0
            done = first is None
            while len(msgs) < self.max_batch and size < MAX_BATCH_BYTES:
                try:
                    m = self._queue.get_nowait()
                except queue.Empty:
                    break
                if m is None:
                    done = True
                    break
                msgs.append(m)
                size += len(self._unpack(m)[1])
            if msgs:
                self._write(msgs)
            if done:
                return

    def _write(self, msgs: list[M]) -> None:
        pairs = [self._unpack(m) for m in msgs]
        with self._lock:
            self._queued_bytes -= sum(len(p[1]) for p in pairs)
        self.stats.messages += len(msgs)
        batch = to_batch(pairs, time.time(), self.stats)
        batch.seen = {k: t for k, t in batch.seen.items()
                      if k in batch.status or t - self._seen.get(k, float("-inf")) >= SEEN_EVERY_S}
        delay = 0.5
        while True:
            try:
                t0 = time.perf_counter()
                stored = self.db.store(batch)
                log.debug("hub.batch messages=%d rows=%d new=%d store_ms=%.1f", len(msgs), len(batch),
                          stored.new_results, 1000 * (time.perf_counter() - t0))
                self._seen.update(batch.seen)
                self.stats.new_results += stored.new_results
                self.stats.reviews += stored.reviews
                self.stats.new_trials += stored.new_trials
                break
            except sqlalchemy.exc.OperationalError as exc:
                # The database is down or locked: keep the batch unacknowledged and retry.
                log.warning("hub.db_retry rows=%d error=%s", len(batch), str(exc).splitlines()[0])
                if self._stop.is_set():
                    log.error("hub.db_gave_up rows=%d (unacknowledged: the broker redelivers)", len(batch))
                    return
                self._stop.wait(delay)
                delay = min(delay * 2, 10)
            except (sqlalchemy.exc.DBAPIError, ValueError, TypeError, OverflowError) as exc:
                # A value the database or its driver refuses (the contract should have): find the message,
                # skip it, keep the rest. The writer thread must not die: nothing would be acknowledged.
                log.warning("hub.batch_refused rows=%d error=%s (writing one by one)", len(batch),
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                self._write_one_by_one(pairs)
                break
        self.stats.batches += 1
        self._ack(msgs)

    def _write_one_by_one(self, pairs: list[tuple[str, bytes, bool]]) -> None:
        """A batch the database refused: find and skip the message(s) it cannot take."""
        for name, payload, retained in pairs:
            one = to_batch([(name, payload, retained)], time.time())
            try:
                stored = self.db.store(one)
                self.stats.new_results += stored.new_results
                self.stats.reviews += stored.reviews
                self.stats.new_trials += stored.new_trials
            except (sqlalchemy.exc.DBAPIError, ValueError, TypeError, OverflowError) as exc:
                log.warning("hub.bad_payload topic=%s reason=database refused: %s", name,
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                self.stats.bad += 1


def _unpack_mqtt(m: mqtt.MQTTMessage) -> tuple[str, bytes, bool]:
    return m.topic, bytes(m.payload), m.retain  # bytes() of bytes is the same object


class Ingest:
    """Subscribe, batch, write, acknowledge. A context manager; `stats` counts what happened.

    `security`: the broker account and TLS files (`edgekit hub --username --password-file --ca-file ...`);
    the url may carry the account. A ConfigError names the `edgekit hub` option at fault. A broker that
    cannot serve the hub (it speaks MQTT 3.1.1 only, or refuses shared subscriptions) is a TransportError
    in `error`, `failed` is set and `on_fatal` called once; the hub then stops instead of retrying."""

    def __init__(self, broker_url: str, db: HubDB, share_group: str | None = "edgekit-hub",
                 client_id: str | None = None, max_batch: int = MAX_BATCH,
                 security: MqttSecurity | None = None,
                 on_fatal: Callable[[TransportError], None] | None = None) -> None:
        self.endpoint = parse_url(broker_url, where=f"{KEY} --broker")
        self.db = db
        self.share_group = share_group or None  # "" or None: a plain subscription (one hub only)
        self.named = client_id is not None
        self.client_id = client_id or f"edgekit-hub-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.stats = IngestStats()
        self.connected = threading.Event()
        self.failed = threading.Event()
        self.error: TransportError | None = None
        self._on_fatal = on_fatal
        self._security = security
        self._connack_seen = False
        self._probed = False
        self._stop = threading.Event()
        self.writer = BatchWriter(db, self.stats, _unpack_mqtt, self._ack, max_batch)
        self.client = make_client(self.endpoint, security, client_id=self.client_id, version="5", manual_ack=True,
                                  key=KEY)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        # Back quickly after a broker restart: mosquitto 2.0.11 does not restore *shared* subscriptions
        # from persistence (measured), so results published before we re-subscribe are not queued for us.
        # paho sleeps for these as floats; its annotation says int.
        self.client.reconnect_delay_set(min_delay=0.25, max_delay=RECONNECT_MAX_S)  # type: ignore[arg-type]

    # paho callbacks run on its network thread: keep them tiny.
    def _on_connect(self, client: mqtt.Client, _ud: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self._connack_seen = True
        if reason.is_failure:
            if reason.value == UNSUPPORTED_PROTOCOL_VERSION:  # paho's name for a 3.1.1 CONNACK code 1
                self._fatal(not_mqtt5(self.endpoint, "it answered MQTT 5 with 'unacceptable protocol version'"))
                return
            log.warning("hub.connect_refused broker=%s:%s reason=%s", self.endpoint.host, self.endpoint.port,
                        reason)
            return
        flt = topics.subscription(share_group=self.share_group)
        client.subscribe(flt, options=SubscribeOptions(qos=topics.QOS))
        log.info("hub.connected broker=%s:%s client_id=%s subscription=%s", self.endpoint.host,
                 self.endpoint.port, self.client_id, flt)
        self.connected.set()

    def _on_subscribe(self, _c: mqtt.Client, _ud: Any, _mid: int, reasons: list[Any], _props: Any) -> None:
        for reason in reasons:
            if reason.value == SHARED_SUBSCRIPTIONS_NOT_SUPPORTED:
                self._fatal(TransportError(
                    "the broker refuses MQTT 5 shared subscriptions, which the hub subscribes with",
                    where=f"{KEY} --broker {self.endpoint}",
                    hint="run one hub with --share-group '' (a plain subscription), or use a broker with "
                         f"shared subscriptions (mosquitto 2, EMQX, HiveMQ) or NATS JetStream ({CLUSTER_DOC})"))
            elif reason.is_failure:
                log.warning("hub.subscribe_refused broker=%s reason=%s", self.endpoint, reason)

    def _on_disconnect(self, _c: mqtt.Client, _ud: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self.connected.clear()
        if self._stop.is_set() or self.failed.is_set():
            return
        if not self._connack_seen and not self._probed:
            # Closed before any CONNACK: a broker that drops an MQTT 5 CONNECT (RabbitMQ 3.x's MQTT plugin
            # does) looks like this. Ask it once in MQTT 3.1.1, off paho's network thread; it says what it found.
            self._probed = True
            threading.Thread(target=self._probe_311, args=(reason,), name="hub-mqtt-probe", daemon=True).start()
            return
        log.warning("hub.disconnected broker=%s:%s reason=%s", self.endpoint.host, self.endpoint.port, reason)

    def _on_message(self, _c: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        self.writer.put(msg)

    def _probe_311(self, reason: Any) -> None:
        if speaks_mqtt311(self.endpoint, self._security, f"{self.client_id}-probe"):
            self._fatal(not_mqtt5(self.endpoint, "it closed the MQTT 5 connection and accepts MQTT 3.1.1"))
        else:
            log.warning("hub.disconnected broker=%s:%s reason=%s (closed before any CONNACK)", self.endpoint.host,
                        self.endpoint.port, reason)

    def _fatal(self, error: TransportError) -> None:
        if self.failed.is_set():
            return
        self.error = error
        self.failed.set()
        log.info("hub.broker_unusable broker=%s", self.endpoint)  # the CLI prints the error itself, once
        self.client.disconnect()  # no more reconnects: run_hub stops and raises `error`
        if self._on_fatal is not None:
            self._on_fatal(error)

    def start(self) -> None:
        self.db.create()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S if self.named else RANDOM_SESSION_EXPIRY_S
        props.ReceiveMaximum = 65535
        # A named hub resumes its session (and what the broker queued for it); an unnamed one starts clean
        # once, then resumes on reconnects within the same process.
        clean = False if self.named else mqtt.MQTT_CLEAN_START_FIRST_ONLY
        self.client.connect_async(self.endpoint.host, self.endpoint.port, keepalive=30, clean_start=clean,
                                  properties=props)
        self.writer.start()
        self.client.loop_start()

    def stop(self, end_session: bool | None = None) -> None:
        """Write and acknowledge what has arrived, then disconnect.

        `end_session` (default: for an unnamed hub, whose session nobody would resume) tells the broker to
        drop the session and its subscription; otherwise the broker keeps queueing results for it."""
        if self._stop.is_set():
            return  # already stopped (stop() then the context manager's exit)
        self._stop.set()
        self.writer.stop()
        props = None
        if not self.named if end_session is None else end_session:
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
        self.client.disconnect(properties=props)
        self.client.loop_stop()
        log_stopped(self.stats)

    def __enter__(self) -> Ingest:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _ack(self, msgs: list[mqtt.MQTTMessage]) -> None:
        for m in msgs:
            if m.qos > 0:
                try:
                    self.client.ack(m.mid, m.qos)
                except Exception as exc:  # noqa: BLE001 - a lost connection: the broker redelivers
                    log.debug("hub.ack_failed mid=%s error=%s", m.mid, exc)


def log_stopped(stats: IngestStats) -> None:
    log.info("hub.ingest_stopped messages=%d results=%d new=%d reviews=%d trials=%d new_trials=%d "
             "bad=%d rejected=%d", stats.messages, stats.results, stats.new_results, stats.reviews,
             stats.trials, stats.new_trials, stats.bad, stats.rejected)


def not_mqtt5(endpoint: Endpoint, how: str) -> TransportError:
    """The one line a hub says about a broker without MQTT 5 (NATS's MQTT gateway, RabbitMQ 3.x's plugin)."""
    return TransportError(f"the broker speaks MQTT 3.1.1 only ({how}); the hub needs MQTT 5 shared "
                          "subscriptions", where=f"{KEY} --broker {endpoint}",
                          hint="for NATS, consume its JetStream instead: edgekit hub --broker nats://HOST:4222, "
                               f"see {CLUSTER_DOC}; else use an MQTT 5 broker: mosquitto 2, EMQX, HiveMQ")


def speaks_mqtt311(endpoint: Endpoint, security: MqttSecurity | None, client_id: str,
                   timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """True when the broker answers an MQTT 3.1.1 CONNECT with a CONNACK (accepted or not)."""
    answered = threading.Event()
    probe = make_client(endpoint, security, client_id=client_id, version="3.1.1", key=KEY)
    probe.on_connect = lambda *_a: answered.set()
    try:
        probe.connect(endpoint.host, endpoint.port, keepalive=10)
        deadline = time.monotonic() + timeout_s
        while not answered.is_set() and time.monotonic() < deadline:
            if probe.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                break
        return answered.is_set()
    except (OSError, ValueError) as exc:
        log.debug("hub.probe_failed broker=%s error=%s", endpoint, exc)
        return False
    finally:
        try:
            probe.disconnect()
        except Exception:  # noqa: BLE001 - a probe's socket that never opened
            pass
