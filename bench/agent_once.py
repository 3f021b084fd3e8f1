"""Cold start of the agent, run as a fresh process by bench/startup.py: build the real Agent on a bundle
(no broker: the result goes to its durable outbox), process one window, print JSON and exit.

    python bench/agent_once.py BUNDLE WINDOWS.npz OUTBOX_DIR
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgekit.agent import Agent  # noqa: E402
from edgekit.config import AgentConfig, validate  # noqa: E402
from edgekit.values import Window  # noqa: E402


def main() -> None:
    bundle, windows_file, outbox_dir = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    data = np.load(windows_file)["windows"][0]
    cfg = validate(AgentConfig, {
        "device_id": "bench", "site": "bench", "allow_unsigned": True, "bundle": str(bundle),
        "source": {"kind": "simulated", "generator": "pump"},
        "mqtt": {"url": None}, "outbox": {"path": str(outbox_dir / "outbox.db")},
        "runtime": {"intra_op_threads": 1},
    }, "bench/agent_once.py")
    with Agent(cfg) as agent:
        agent.process(Window(seq=0, start_s=0.0, end_s=float(len(data) - 1), data=data))
        first_s = time.perf_counter() - T_START
        queued = agent.outbox.backlog()
    print(json.dumps({"first_result_s_in_process": first_s, "queued": queued,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "torch_imported": "torch" in sys.modules}))


if __name__ == "__main__":
    main()
