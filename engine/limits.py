"""Resource limits for the MLLP listeners: the in-flight byte budget and the eviction choice (pure).

Why this exists: a hostile or broken client must not be able to grow the engine without bound or
lock other senders out (issue #12).  The listener (``engine/listener.py``) is the I/O adaptor; the
decisions live here, free of sockets and asyncio, and are tested on their own (tests/test_limits.py).

* :class:`InflightBudget`: bytes read from the network and not yet answered, across every
  connection of every channel (``limits.inflight_bytes``).  A connection that holds bytes stops
  reading while the engine is over the budget; a connection that holds nothing may always read, so a
  well-behaved sender with one small message in flight is never starved by flooders (the overshoot is
  at most one read, 256 KiB, per such connection).  Bytes are released only once their frame is
  answered or dropped: nothing acknowledged is ever dropped, nothing is acknowledged unstored.
* :class:`ConnectionSlots`: at ``max_connections`` (or a peer's ``max_connections_per_peer``) the
  engine closes an existing connection (:meth:`ConnectionSlots.victim`) rather than refusing the
  newcomer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, Protocol, TypeVar


class Waiter(Protocol):
    def budget_available(self) -> None: ...


W = TypeVar("W", bound=Waiter)


class InflightBudget(Generic[W]):
    """Bytes in flight across connections, against ``limit`` (0 = no global limit).

    A connection reports what it holds with :meth:`update` (its previous figure is replaced, so a
    connection never counts twice); :meth:`may_read` says whether it may read now; one that may not
    registers with :meth:`wait` and is called back (``budget_available``) once the total is under the
    limit again.  Everything runs on the event loop thread.
    """

    def __init__(self, limit: int):
        if limit < 0:
            raise ValueError("the in-flight budget must be 0 (no limit) or more bytes")
        self.limit = limit
        self.total = 0
        self.peak = 0
        self.pauses = 0  # times a connection was paused by the budget (a metric)
        self._waiting: dict[W, None] = {}  # insertion-ordered: the first paused is the first resumed

    @property
    def over(self) -> bool:
        return 0 < self.limit <= self.total

    def update(self, old: int, new: int) -> None:
        """A connection's holding went from ``old`` to ``new`` bytes."""
        if old == new:
            return
        was_over = self.over
        self.total += new - old
        if self.total > self.peak:
            self.peak = self.total
        if was_over and not self.over and self._waiting:
            waiting = list(self._waiting)
            self._waiting.clear()
            for w in waiting:
                w.budget_available()

    def may_read(self, held: int) -> bool:
        """May a connection holding ``held`` bytes read more now?"""
        return held == 0 or not self.over

    def wait(self, w: W) -> None:
        if w not in self._waiting:
            self.pauses += 1
            self._waiting[w] = None

    def forget(self, w: W) -> None:
        self._waiting.pop(w, None)

    @property
    def waiting(self) -> int:
        return len(self._waiting)


K = TypeVar("K", bound=Hashable)


class ConnectionSlots(Generic[K]):
    """Open connections grouped by peer, each peer's ordered by last activity (oldest first).

    The listener calls :meth:`touch` when a connection completes a frame or is answered, so choosing
    whom to close when a cap is reached (:meth:`victim`) looks at a handful of entries, not at every
    connection: a flood of new connections at the cap costs little per connection.
    """

    def __init__(self) -> None:
        self._peers: dict[str, OrderedDict[K, None]] = {}
        self.count = 0

    def add(self, conn: K, peer: str) -> None:
        self._peers.setdefault(peer, OrderedDict())[conn] = None
        self.count += 1

    def remove(self, conn: K, peer: str) -> bool:
        conns = self._peers.get(peer)
        if conns is None or conn not in conns:
            return False
        del conns[conn]
        if not conns:
            del self._peers[peer]
        self.count -= 1
        return True

    def touch(self, conn: K, peer: str) -> None:
        conns = self._peers.get(peer)
        if conns is not None and conn in conns:
            conns.move_to_end(conn)

    def of(self, peer: str) -> int:
        conns = self._peers.get(peer)
        return len(conns) if conns is not None else 0

    def peers(self) -> dict[str, int]:
        return {p: len(c) for p, c in self._peers.items()}

    def victim(self, busy: Callable[[K], bool], only_peer: str | None = None) -> K | None:
        """The connection to close so a newcomer can be served (None when there is none).

        From the peer with the most connections (or ``only_peer``, at a peer's own cap), the one idle
        the longest; connections answering frames (``busy``) only when a peer has nothing else, and
        then the next peer's idle ones first.  A flooder holding most slots therefore loses its own
        connections first, and a quiet sender with one connection keeps it.
        """
        if only_peer is not None:
            order = [only_peer] if only_peer in self._peers else []
        elif not self._peers:
            return None
        else:
            top = max(self._peers, key=lambda p: len(self._peers[p]))
            order = [top]
        fallback: K | None = None
        for rank in range(2):
            for peer in order:
                for conn in self._peers[peer]:
                    if not busy(conn):
                        return conn
                    if fallback is None:
                        fallback = conn
            if rank == 0 and only_peer is None and len(self._peers) > 1:
                # Every connection of the biggest peer is busy: the others, biggest first.
                order = sorted((p for p in self._peers if p != order[0]), key=lambda p: -len(self._peers[p]))
            else:
                break
        return fallback


def prepare_process(connections: int) -> None:
    """Per-process settings the limits rely on; called once by the engine at start (engine/server.py).

    * Open files: the soft limit is raised towards the hard one, so the engine can hold the
      connections its channels allow (plus the store, logs, worker pipes and listening sockets).
    * Memory (glibc): threads share four arenas; freed memory is given back by :func:`trim_memory`.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + 512
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(hard, want)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    tune_malloc()


M_ARENA_MAX = -8
M_MMAP_THRESHOLD = -3


def _libc() -> Any:
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def tune_malloc() -> bool:
    """glibc only (a no-op elsewhere): threads share a few arenas (less memory held per thread).  True
    when applied."""
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(M_ARENA_MAX, 4) == 1
    return libc.mallopt(M_MMAP_THRESHOLD, 1024 * 1024) == 1 and ok


class MemoryTrim:
    """Gives memory the process has freed back to the system (glibc ``malloc_trim``).

    After a burst of large frames glibc keeps the freed heap memory for reuse, so RSS stays at the
    burst's peak.  :meth:`maybe_trim` releases it once more than ``min_free`` bytes are free (a walk of
    the free lists, a few milliseconds); the engine calls it every few seconds (engine/server.py).
    """

    def __init__(self, min_free: int = 16 * 1024 * 1024):
        self.min_free = min_free
        self.trims = 0
        self._libc = _libc()
        self._info2 = None
        if self._libc is not None and hasattr(self._libc, "mallinfo2"):
            import ctypes

            class _Info2(ctypes.Structure):
                _fields_ = [
                    (name, ctypes.c_size_t)
                    for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                 "uordblks", "fordblks", "keepcost")
                ]  # fmt: skip

            self._libc.mallinfo2.restype = _Info2
            self._info2 = self._libc.mallinfo2

    def free_bytes(self) -> int | None:
        """Bytes free in the heap (main arena) or None when glibc cannot say."""
        if self._info2 is None:
            return None
        return int(self._info2().fordblks)

    def maybe_trim(self) -> bool:
        if self._libc is None:
            return False
        free = self.free_bytes()
        if free is not None and free < self.min_free:
            return False
        self._libc.malloc_trim(0)
        self.trims += 1
        return True


async def trim_memory(stop: asyncio.Event, every: float = 5.0) -> None:
    """The engine's periodic :class:`MemoryTrim` (runs until ``stop`` is set)."""
    trim = MemoryTrim()
    if trim._libc is None:
        return
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
        trim.maybe_trim()
