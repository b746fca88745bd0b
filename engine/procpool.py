"""Worker processes for the channel pipelines.

Conversion is CPU-bound Python; in the engine's process it would compete for the GIL
with the listener and the committer and slow down every ACK.  So processing runs in a
small pool of worker processes (``processing.workers`` in routes.yaml, default: one per
core beyond the first).  Each worker builds the channels' pipelines once from the same
config; the parent sends (message id, raw bytes) and gets plain results back
(:class:`engine.intake.ProcessResult` with an :class:`engine.intake.Output`).  The store
is only ever touched by the parent.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

from engine.config import Config
from engine.intake import ProcessResult

_RUNTIMES: dict[str, Any] = {}


def _init(config: Config) -> None:
    import signal

    from engine import registry
    from engine.processing import ChannelRuntime

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    registry.load_plugins(config.plugin_paths, config.plugins, config.base_dir)
    for ch in config.channels:
        if ch.enabled:
            _RUNTIMES[ch.name] = ChannelRuntime(config, ch, store=None)


def _run(channel: str, items: list[tuple[int, bytes]]) -> list[ProcessResult]:
    rt = _RUNTIMES[channel]
    out = []
    for mid, raw in items:
        res = rt.run_raw(mid, raw)
        # Exceptions do not travel well between processes; the reason text says it all.
        res.error = None
        out.append(res)
    return out


class ProcessingPool:
    def __init__(self, config: Config, workers: int):
        self.workers = workers
        ctx = multiprocessing.get_context("spawn")  # never fork a process that has threads
        self.executor = ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=_init, initargs=(config,)
        )

    def run(self, channel: str, items: list[tuple[int, bytes]]) -> list[ProcessResult]:
        """Process ``items`` split across the workers; results in the same order."""
        if not items:
            return []
        n = min(self.workers, max(1, len(items) // 20))
        size = -(-len(items) // n)
        futures: list[Future[list[ProcessResult]]] = [
            self.executor.submit(_run, channel, items[i : i + size]) for i in range(0, len(items), size)
        ]
        out: list[ProcessResult] = []
        for f in futures:
            out.extend(f.result())
        return out

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
