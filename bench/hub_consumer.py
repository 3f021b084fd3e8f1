"""One hub ingest process for bench/hub_ingest.py and bench/hub_cluster.py: the intake `edgekit hub` picks for
BROKER_URL (edgekit.hub.make_ingest: mqtt:// an MQTT v5 shared subscription with a named client id, a
persistent session; nats:// a JetStream durable consumer named SHARE_GROUP) writing to DB_URL. Says "loaded"
once imported, connects when "go" arrives on stdin (so several consumers start together), says "ready" once
connected and subscribed, ingests until the next stdin line, then prints its stats (CPU seconds counted from
"go"). That line is "stop" (keep the broker session: it queues for the next start) or "end" (drop the session
and its subscription, so a finished case's consumers do not make the broker queue every later case's
messages).

    python bench/hub_consumer.py DB_URL BROKER_URL CLIENT_ID SHARE_GROUP
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgekit.hub import make_ingest  # noqa: E402
from edgekit.hub.db import HubDB  # noqa: E402

SUBACK_SETTLE_S = 0.3  # Ingest subscribes from on_connect; give the SUBACK time before saying "ready"


def main() -> None:
    db_url, broker_url, client_id, group = sys.argv[1:5]
    with HubDB(db_url) as db:
        ingest = make_ingest(broker_url, db, share_group=group, client_id=client_id)
        print(json.dumps({"event": "loaded", "client_id": client_id}), flush=True)
        sys.stdin.readline()
        cpu0 = _cpu_s()
        end = False
        ingest.start()
        try:
            if not ingest.connected.wait(30):
                raise SystemExit(f"{client_id}: not connected within 30 s")
            t_conn = time.time()
            time.sleep(SUBACK_SETTLE_S)
            print(json.dumps({"event": "ready", "client_id": client_id, "connected_at": t_conn}), flush=True)
            end = sys.stdin.readline().strip() == "end"
        finally:
            ingest.stop(end_session=end)
        print(json.dumps({"event": "stopped", "client_id": client_id, "cpu_s": _cpu_s() - cpu0,
                          **{k: v for k, v in asdict(ingest.stats).items() if isinstance(v, int)}}), flush=True)


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


if __name__ == "__main__":
    main()
