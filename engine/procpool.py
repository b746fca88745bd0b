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

import contextlib
import dataclasses
import multiprocessing
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, NamedTuple

from engine import collector, keyring, logflood, logs
from engine.config import Config
from engine.intake import ProcessResult
from engine.store import stored_payload

WORKER_NICENESS = 5
_RUNTIMES: dict[str, Any] = {}
_STORE: list[Any] = []  # the worker's own read-only view of the store (SQLite), opened on first use
_CONFIG: list[Config] = []
_KEYS: list[keyring.KeyRing | None] = []  # the store's key ring: payloads are sealed here, bodies opened


class Claimed(NamedTuple):
    """The fields of a stored message the parent needs to record a result (no body)."""

    id: int
    order_key: str
    replay_destinations: str | None
    override_guards: bool


def _exit_with_parent(parent: int, interval: float = 1.0) -> None:
    """A worker whose engine died (SIGKILL, OOM) would wait on its task queue forever: leave instead."""
    while True:
        time.sleep(interval)
        if os.getppid() != parent:
            os._exit(0)


def _init(config: Config, parent: int, log_settings: tuple[str, str] = ("console", "info")) -> None:
    import signal

    from engine import registry
    from engine.processing import ChannelRuntime

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    logs.configure(*log_settings)  # the engine's format and level (JSON when it logs JSON)
    logflood.apply(config.logging.flood)  # and its log flood control
    # The engine's pid comes from the engine itself: if it died while this worker was starting, the
    # parent here is already someone else and the watch must see that too.
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="parent-watch").start()
    with contextlib.suppress(OSError):
        # Conversion uses what CPU is spare; the listener's ACKs come first when cores are short.
        os.nice(WORKER_NICENESS)
    registry.load_plugins(config.plugin_paths, config.plugins, config.base_dir)
    _CONFIG.append(config)
    _KEYS.append(keyring.from_config(config))
    for ch in config.channels:
        if ch.enabled:
            _RUNTIMES[ch.name] = ChannelRuntime(config, ch, store=None)
    collector.tune()


def _run(channel: str, items: list[tuple[int, bytes]]) -> list[ProcessResult]:
    rt = _RUNTIMES[channel]
    out = []
    for mid, raw in items:
        res = rt.run_raw(mid, raw)
        # Exceptions do not travel well between processes; the reason text says it all.
        res.error = None
        if res.output is not None and not res.output.packed:
            # Compress (and seal) here, in parallel, rather than in the engine process (smaller to send, too).
            res.output = dataclasses.replace(
                res.output,
                payload=stored_payload(_KEYS[0] if _KEYS else None, res.output.payload),
                packed=True,
            )
        out.append(res)
    return out


def _read_and_run(channel: str, ids: list[int]) -> list[tuple[Claimed, ProcessResult]]:
    """Single node (SQLite): read the given received messages here, in the worker, and process them.

    The engine process then only records the results; reading and unpickling message bodies
    stays off its GIL, which the listener and the committer need.
    """
    if not _STORE:
        from engine.store import Store

        _STORE.append(Store(_CONFIG[0].store_url, create=False, keys=_KEYS[0]))
    rows = _STORE[0].received_by_id(ids)
    items = _run(channel, [(r.id, r.raw) for r in rows])
    return [
        (Claimed(r.id, r.order_key, r.replay_destinations, bool(r.override_guards)), res)
        for r, res in zip(rows, items, strict=True)
    ]


class ProcessingPool:
    def __init__(self, config: Config, workers: int):
        self.workers = workers
        self.executor = self._executor(config)

    def _executor(self, config: Config) -> ProcessPoolExecutor:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that has threads
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=ctx,
            initializer=_init,
            initargs=(config, os.getpid(), logs.current()),
        )

    def reload(self, config: Config) -> None:
        """Live reload: later work goes to new worker processes built from ``config``.

        Batches already submitted finish in the old processes (with the pipelines they were sent to),
        which then exit; nothing is cancelled.
        """
        old, self.executor = self.executor, self._executor(config)
        old.shutdown(wait=False, cancel_futures=False)

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

    def read_and_run(self, channel: str, ids: list[int]) -> Future[list[tuple[Claimed, ProcessResult]]]:
        """Read and process the messages ``ids`` in one worker; several calls run side by side."""
        return self.executor.submit(_read_and_run, channel, ids)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
