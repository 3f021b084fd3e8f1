"""The agent's Prometheus endpoint (issue 16), off unless [prometheus] port is set: what the agent counts, read
when scraped (windows, deferrals, quarantines, outbox depth and drops, the broker connection, publish-to-PUBACK
latency). Imported only when enabled (prometheus_client, the `metrics` extra); must not import torch, onnx or
the hub.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from edgekit.errors import ConfigError, EdgekitError, TransportError

try:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    from prometheus_client.registry import Collector
except ImportError as exc:  # an agent-only install: one line naming the extra, raised where the agent imports us
    raise ConfigError("the agent's metrics endpoint needs the prometheus_client package", where="prometheus.port",
                      hint="pip install 'edgekit[metrics]', or leave [prometheus] port unset") from exc

log = logging.getLogger(__name__)


class AgentCollector(Collector):
    """Reads `agent` (edgekit.agent.Agent: its counters, transport and outbox) at each scrape."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Any]:
        a = self.agent
        c = a.counters
        info = GaugeMetricFamily("edgekit_agent_info", "What the agent runs (always 1)",
                                 labels=["site", "device", "model_version", "signature"])
        info.add_metric([a.cfg.site, a.cfg.device_id, getattr(a, "model_version", ""),
                         "verified" if a.cfg.public_key else "unchecked"], 1)
        yield info
        for name, value, doc in (
                ("windows", c.windows, "Windows judged"),
                ("deferrals", c.deferred, "Windows deferred to a person (any reason)"),
                ("implausible", c.implausible, "Windows deferred before the models (outside the bundle's "
                                               "plausible range)"),
                ("quarantined", c.quarantined, "Source items quarantined (undecodable, non-finite, time going "
                                               "back)"),
                ("samples", c.samples, "Samples read")):
            yield CounterMetricFamily(f"edgekit_agent_{name}", doc, value=value)
        transport = a.transport
        try:
            stats = transport.stats()  # outbox depth and drops: one read of this thread's outbox connection
        except EdgekitError:  # the outbox is closed: the agent is stopping
            return
        finally:
            a.outbox.release()  # each scrape runs on a thread of its own: close its connection
        yield GaugeMetricFamily("edgekit_agent_outbox_queued", "Messages waiting in the outbox for the broker",
                                value=stats["queued"])
        yield CounterMetricFamily("edgekit_agent_outbox_dropped", "Rows the outbox dropped when full (since "
                                  "the file was made)", value=stats["dropped"])
        yield GaugeMetricFamily("edgekit_agent_broker_connected", "1 while connected to the broker",
                                value=float(bool(stats["connected"])))
        yield CounterMetricFamily("edgekit_agent_published", "Results the broker acknowledged",
                                  value=stats.get("acked", 0))
        yield CounterMetricFamily("edgekit_agent_reconnects", "Reconnections to the broker",
                                  value=stats.get("reconnects", 0))
        latency = transport.publish_latency
        counts, total, buckets = list(latency.counts), 0, []
        for bound, n in zip((*latency.bounds, float("inf")), counts):
            total += n
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
        yield HistogramMetricFamily("edgekit_agent_publish_seconds", "Seconds from publishing a message to "
                                    "the broker's PUBACK", buckets=buckets, sum_value=latency.sum_s)


@contextmanager
def serve(agent: Any, host: str, port: int) -> Iterator[int]:
    """Serve the agent's metrics at http://host:port/metrics while inside; yields the port (a free one for 0)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise TransportError(f"the metrics endpoint could not listen ({exc.strerror})",
                             where=f"prometheus {host}:{port}",
                             hint="is the port in use? set another [prometheus] port") from None
    bound = int(server.server_port)
    log.info("agent.metrics_http url=http://%s:%d/metrics", host, bound)
    try:
        yield bound
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
