"""A local NATS cluster (nats-server with JetStream and its MQTT gateway, Debian's package) on free loopback
ports for the tests and the benchmark: three nodes by default, each with its own ports and store directory,
from the config that ships in the package (edgekit/data/nats-node.conf). A node can be SIGKILLed and started
again on the same ports and store (node-loss tests). Starts nothing at import.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from edgekit.broker import free_port
from edgekit.paths import shipped

CONF = shipped("data", "nats-node.conf")
HEALTH_TIMEOUT_S = 30.0


def installed() -> str | None:
    """Path of the nats-server binary, or None."""
    found = shutil.which("nats-server")
    if found:
        return found
    return "/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None


@dataclass(frozen=True)
class Node:
    name: str
    client_port: int
    cluster_port: int
    mqtt_port: int
    http_port: int
    store_dir: Path
    conf: Path
    log: Path

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"


class NatsCluster:
    """`nodes` nats-server processes routed to each other. A context manager; `.kill(i)` / `.start_node(i)`."""

    def __init__(self, workdir: Path, nodes: int = 3, cluster: str = "edgekit") -> None:
        binary = installed()
        if binary is None:
            raise FileNotFoundError("nats-server is not installed (apt-get install nats-server)")
        self.binary = binary
        workdir.mkdir(parents=True, exist_ok=True)
        self.nodes: list[Node] = []
        for i in range(1, nodes + 1):
            d = workdir / f"n{i}"
            d.mkdir(exist_ok=True)
            self.nodes.append(Node(f"n{i}", free_port(), free_port(), free_port(), free_port(), d / "js",
                                   d / "nats.conf", d / "nats.log"))
        routes = ", ".join(f"nats-route://127.0.0.1:{n.cluster_port}" for n in self.nodes)
        template = CONF.read_text()
        for n in self.nodes:
            n.conf.write_text(template.format(name=n.name, client_port=n.client_port, http_port=n.http_port,
                                              store_dir=n.store_dir, cluster=cluster, cluster_port=n.cluster_port,
                                              routes=routes, mqtt_port=n.mqtt_port))
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * nodes

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated: what `edgekit hub --broker` takes."""
        return ",".join(n.url for n in self.nodes)

    def start(self, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
        for i in range(len(self.nodes)):
            self._spawn(i)
        self.wait_healthy(timeout_s)

    def start_node(self, i: int, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
        """Start node `i` again (after kill) on its ports and store; returns once it listens for MQTT."""
        self._spawn(i)
        self._wait_port(i, self.nodes[i].mqtt_port, timeout_s)

    def kill(self, i: int) -> None:
        """SIGKILL node `i`: no shutdown, no flush, as a crash or a power cut."""
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        self.procs[i] = None

    def pid(self, i: int) -> int | None:
        proc = self.procs[i]
        return proc.pid if proc is not None else None

    def wait_healthy(self, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
        """Every running node's /healthz says ok (JetStream current: a meta leader, its streams caught up)."""
        deadline = time.monotonic() + timeout_s
        for i, node in enumerate(self.nodes):
            if self.procs[i] is None:
                continue
            self._wait_port(i, node.mqtt_port, max(0.1, deadline - time.monotonic()))
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/healthz", timeout=1) as r:
                        if r.status == 200:
                            break
                except (urllib.error.URLError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{node.name} not healthy within {timeout_s}s: {self._tail(i)}")
                time.sleep(0.1)

    def stop(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            self.procs[i] = None

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, i: int) -> None:
        node = self.nodes[i]
        if self.procs[i] is not None and self.procs[i].poll() is None:  # type: ignore[union-attr]
            raise RuntimeError(f"{node.name} is already running")
        with node.log.open("ab") as log:
            self.procs[i] = subprocess.Popen([self.binary, "-c", str(node.conf)], stdout=log, stderr=log)

    def _wait_port(self, i: int, port: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            proc = self.procs[i]
            if proc is None or proc.poll() is not None:
                raise RuntimeError(f"{self.nodes[i].name} exited: {self._tail(i)}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.nodes[i].name} did not listen on {port} within {timeout_s}s") from None
                time.sleep(0.05)

    def _tail(self, i: int) -> str:
        try:
            return self.nodes[i].log.read_text()[-2000:]
        except OSError:
            return "(no log)"
