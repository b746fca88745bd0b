"""The per-message metric updates of the listener and intake path alone, for callgrind.

One accepted message costs ``received.inc``, ``ack_latency.observe`` and ``ack("AA")`` on its channel;
with ``engine`` as the second argument also what the rest of the engine process counts for it (its
processing status, its delivery and the delivery lag).  Run on two checkouts (``cd <checkout>``) with two
sizes and take the difference, so start-up cancels out::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null .venv/bin/python bench/metrics_ops.py 1000
    valgrind --tool=callgrind --callgrind-out-file=/dev/null .venv/bin/python bench/metrics_ops.py 21000
    valgrind --tool=callgrind --callgrind-out-file=/dev/null .venv/bin/python bench/metrics_ops.py 21000 engine

(Ir(21000) - Ir(1000)) / 20000 is the instructions per message.  Figures are in bench/README.md.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.getcwd())

from engine.metrics import Metrics


def main() -> None:
    n = int(sys.argv[1])
    metrics = Metrics(channels=["c"], destinations=["d"])
    cm = metrics.channel("c")
    if sys.argv[2:] == ["engine"]:
        dm = metrics.destination("d")
        for _ in range(n):
            cm.received.inc(1)
            cm.ack_latency.observe(0.0012)
            cm.ack("AA")
            cm.processed("processed", 1)
            dm.outcomes["delivered"].inc()
            dm.lag.observe(0.35)
        return
    for _ in range(n):
        cm.received.inc(1)
        cm.ack_latency.observe(0.0012)
        cm.ack("AA")


if __name__ == "__main__":
    main()
