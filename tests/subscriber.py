"""A real paho subscriber for tests: a persistent QoS 1 session on edgekit/v1/#, reconnecting on its own."""

from __future__ import annotations

import threading
import time
from typing import Any

import paho.mqtt.client as mqtt

from edgekit import topics


class Subscriber:
    def __init__(self, port: int, client_id: str = "test-subscriber", topic: str | None = None) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.raw: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.topic = topic or topics.subscription()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 1.0)
        self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise RuntimeError("subscriber could not subscribe")

    def _on_connect(self, client: Any, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        client.subscribe(self.topic, qos=1)

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        with self.lock:
            self.raw.append((msg.topic, msg.payload))
            self.messages.append((msg.topic, topics.decode(msg.payload, where=msg.topic)))

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self.lock:
            return [m for t, m in self.messages if t.endswith("/" + kind)]

    def results(self) -> list[dict[str, Any]]:
        """Every result, unbatched; a batch-level replayed flag is copied onto its results."""
        out = []
        for m in self.of("result"):
            for r in topics.results_of(m):
                if m.get("replayed") and "replayed" not in r:
                    r = {**r, "replayed": True}
                out.append(r)
        return out

    def wait_for(self, predicate, timeout_s: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.1)
        return predicate()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
