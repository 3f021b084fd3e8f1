"""`edgekit demo`: the whole path on one machine — train, export (INT8, signed), verify, run the agent on a
recorded SKAB fault file through a local mosquitto (when installed; else the outbox alone), show the results.

Each step runs as its own `edgekit` process, exactly as a user would type it, so the agent process never
loads torch. Library code: returns lines for the CLI to print.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

from edgekit import incidents, topics
from edgekit.errors import DataError, EdgekitError
from edgekit.paths import shipped

log = logging.getLogger(__name__)

RECIPE = shipped("recipes", "skab.toml")


def _step(say: Callable[[str], None], title: str, args: list[str]) -> None:
    say(f"$ edgekit {' '.join(args)}")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "edgekit", *args], text=True, capture_output=True)
    if proc.returncode != 0:
        raise EdgekitError(f"{title} failed (exit {proc.returncode}):\n{proc.stderr.strip()[-2000:]}")
    for line in proc.stdout.strip().splitlines():
        say(f"  {line}")
    say(f"  ({title}: {time.monotonic() - t0:.1f} s)")


class _Collector:
    """A subscriber on edgekit/v1/# that keeps what the devices publish."""

    def __init__(self, url: str) -> None:
        import paho.mqtt.client as mqtt

        host, port = url.removeprefix("mqtt://").split(":")
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="edgekit-demo-viewer")
        self.client.on_connect = lambda c, *_: (c.subscribe(topics.subscription(), qos=1), self.ready.set())
        self.client.on_message = self._on_message
        self.client.connect(host, int(port))
        self.client.loop_start()
        self.ready.wait(10)

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        try:
            self.messages.append((msg.topic, topics.decode(msg.payload, where=msg.topic)))
        except EdgekitError as exc:
            log.warning("demo.bad_message %s", exc)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _when(t: float) -> str:
    """A window time as the recording wrote it: a date (an ISO-stamped recording's replay) or seconds."""
    from datetime import datetime, timezone

    if t >= 1e8:
        return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    return f"t={t:.0f}s"


def run_demo(workdir: Path, say: Callable[[str], None], *, fault_file: str = "valve1/1.csv",
             epochs: int | None = None) -> None:
    from edgekit.broker import Mosquitto, installed
    from edgekit.datasets import data_dir

    skab = data_dir() / "skab" / "data"
    replay = skab / fault_file
    if not replay.exists():
        raise DataError("the demo trains on SKAB and replays one of its fault files, not found",
                        where=str(replay), hint="set EDGEKIT_DATA_DIR to the folder holding skab/")
    workdir.mkdir(parents=True, exist_ok=True)
    run_dir, bundle, keys = workdir / "runs" / "skab", workdir / "bundles" / "skab", workdir / "keys"
    train = ["train", str(RECIPE), "--out", str(run_dir), "--no-progress"]
    if epochs:
        train += ["--epochs", str(epochs)]
    _step(say, "train", train)
    _step(say, "keygen", ["keygen", "--out", str(keys)])
    _step(say, "export", ["export", str(run_dir), "--int8", "--out", str(bundle),
                          "--sign-key", str(keys / "edgekit.key"), "--no-progress"])
    _step(say, "verify", ["verify", str(bundle), "--pub", str(keys / "edgekit.pub")])

    with ExitStack() as stack:
        url = ""
        collector = None
        if installed():
            broker = stack.enter_context(Mosquitto(workdir / "broker"))
            url = broker.url
            collector = _Collector(url)
            stack.callback(collector.close)
            say(f"local mosquitto on {url}")
        else:
            say("mosquitto is not installed: results stay in the outbox (apt-get install mosquitto)")
        outbox = workdir / "outbox.db"
        outbox.unlink(missing_ok=True)
        _step(say, "edge agent", ["run", "--bundle", str(bundle), "--source", f"replay:{replay}",
                                  "--speed", "0", "--broker", url, "--outbox", str(outbox),
                                  "--device-id", "demo-pump-1", "--site", "demo",
                                  "--public-key", str(keys / "edgekit.pub")])
        if collector is None:
            return
        time.sleep(0.5)
        results = [r for t, m in collector.messages if t.endswith("/result") for r in topics.results_of(m)]
        reviews = [m for t, m in collector.messages if t.endswith("/review")]
        say(f"received {len(results)} results and {len(reviews)} review cases on {topics.subscription()}")
        say("  decisions: " + ", ".join(f"{k}={v}" for k, v in Counter(r["decision"] for r in results).items()))
        say("  labels:    " + ", ".join(f"{k}={v}" for k, v in Counter(r["label"] for r in results).items()))
        reasons = Counter(x for m in reviews for x in m["reasons"])
        say("  deferred because: " + (", ".join(f"{k}={v}" for k, v in reasons.items()) or "nothing deferred"))
        found = incidents.group(incidents.Deferred(m["id"], m["site"], m["device"], m["window"]["start_s"],
                                                   m["window"]["end_s"], tuple(m["reasons"])) for m in reviews)
        say(f"  {len(reviews)} review cases are {len(found)} incidents for a person to open (edgekit/incidents.py)")
        for m in reviews[:5]:
            scores = ", ".join(f"{k}={v:.3g}" for k, v in m["scores"].items())
            say(f"  review {m['id']} {_when(m['window']['start_s'])}-{_when(m['window']['end_s'])} "
                f"label={m['label']} reasons={'+'.join(m['reasons'])} ({scores})")
