"""Garbage-collector settings for the engine's long-running processes.

The hot paths build trees of plain dicts and lists (bundles, store rows, ACKs) that reference counting
frees on its own; the cyclic collector only finds them garbage-free, and each full collection walks every
long-lived object (modules, config, the converter's caches).  So, once start-up is done:

* ``gc.freeze()`` moves what exists now (modules, config, pipelines) out of the collector's sight;
* the youngest generation's threshold goes from 700 to ``GEN0_THRESHOLD`` allocations, so the collector
  runs about 14 times less often (cycles are still collected, just later).

Measured with bench/convert_bench.py (ORU^R01, 15 OBX): about 20 % of conversion time was the collector.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 10_000


def tune() -> None:
    """Call once a process has finished starting up (engine main, each worker)."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
