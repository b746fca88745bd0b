"""Worker-process housekeeping that needs no engine around it."""

from __future__ import annotations

import multiprocessing
import threading
import time

from engine import procpool


def _worker_whose_engine_is_gone(fake_parent: int) -> None:
    # What _init starts, with the pid of an engine that is no longer this process's parent (it died
    # while the worker was starting): the watch must notice and end the process.
    threading.Thread(target=procpool._exit_with_parent, args=(fake_parent, 0.1), daemon=True).start()
    time.sleep(30)


def test_worker_exits_when_its_engine_died_before_it_started() -> None:
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=_worker_whose_engine_is_gone, args=(2**22 + 12345,))
    p.start()
    p.join(timeout=15)
    alive = p.is_alive()
    if alive:
        p.kill()
        p.join()
    assert not alive
    assert p.exitcode == 0
