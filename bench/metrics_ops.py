"""The per-message metric updates of the listener and intake path alone, for callgrind.

One accepted message costs ``received.inc``, ``ack_latency.observe`` and ``ack("AA")`` on its channel.
Run on two checkouts (``cd <checkout>``) with two sizes and take the difference, so start-up cancels out::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null .venv/bin/python bench/metrics_ops.py 1000
    valgrind --tool=callgrind --callgrind-out-file=/dev/null .venv/bin/python bench/metrics_ops.py 21000

(Ir(21000) - Ir(1000)) / 20000 is the instructions per message.  Figures are in bench/README.md.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.getcwd())

from engine.metrics import Metrics


def main() -> None:
    n = int(sys.argv[1])
    cm = Metrics(channels=["c"]).channel("c")
    for _ in range(n):
        cm.received.inc(1)
        cm.ack_latency.observe(0.0012)
        cm.ack("AA")


if __name__ == "__main__":
    main()
