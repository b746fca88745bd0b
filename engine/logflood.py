"""Log flood control: repeated lines are rate-limited and summarised (issue #12).

Why this exists: a client that sends two million empty frames made the engine write a line for each
(1.78 million lines, a 253 MB log).  Every structlog event passes :class:`FloodControl` (a processor
that :func:`engine.logs.configure` installs): per window (``logging.flood.window``, 10 s) at most
``per_peer`` lines of one event from one connection (events carrying ``peer``) and ``per_kind`` lines of
one event in all; the rest are counted and dropped, and once the window is over one line says what
was left out::

    {"event": "log_suppressed", "of": "message_rejected_unstored", "count": 1999990,
     "peer": "127.0.0.1:40112", "summary": "... and 1,999,990 more message_rejected_unstored from 127.0.0.1:40112"}

:class:`Throttle` is the pure part (a clock passed in, no logging); :class:`FloodControl` adapts it to
structlog and writes the summaries: when the next line of that key comes, when a connection closes
(:func:`flush_peer`, called by the listener), and from a timer otherwise.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from engine.config import LogFloodConfig


@dataclass(slots=True)
class _Window:
    start: float
    shown: int = 0
    suppressed: int = 0


@dataclass(frozen=True, slots=True)
class Summary:
    """``count`` lines of ``event`` were left out (from ``peer``, or from everywhere when it is empty)."""

    event: str
    peer: str
    count: int
    window: float

    def text(self) -> str:
        where = f" from {self.peer}" if self.peer else ""
        return f"... and {self.count:,} more {self.event}{where}"


@dataclass
class Throttle:
    """Counts lines per (event, peer) and per event in fixed windows; pure and not thread-safe."""

    per_peer: int = 10
    per_kind: int = 100
    window: float = 10.0
    _peers: dict[tuple[str, str], _Window] = field(default_factory=dict)
    _kinds: dict[str, _Window] = field(default_factory=dict)

    def admit(self, event: str, peer: str, now: float, out: list[Summary]) -> bool:
        """Should this line be written?  Summaries of windows that ended are appended to ``out``."""
        if peer and self.per_peer:
            w = self._roll(self._peers, (event, peer), now, out)
            if w.shown >= self.per_peer:
                w.suppressed += 1
                return False
        else:
            w = None
        if self.per_kind:
            k = self._roll(self._kinds, event, now, out)
            if k.shown >= self.per_kind:
                k.suppressed += 1
                return False
            k.shown += 1
        if w is not None:
            w.shown += 1
        return True

    def _roll(self, table: MutableMapping[Any, _Window], key: Any, now: float, out: list[Summary]) -> _Window:
        w = table.get(key)
        if w is None:
            w = table[key] = _Window(now)
        elif now - w.start >= self.window:
            if w.suppressed:
                out.append(self._summary(key, w))
            w.start, w.shown, w.suppressed = now, 0, 0
        return w

    def _summary(self, key: Any, w: _Window) -> Summary:
        event, peer = key if isinstance(key, tuple) else (key, "")
        return Summary(event, peer, w.suppressed, self.window)

    def due(self, now: float, peer: str | None = None) -> list[Summary]:
        """Summaries of every window that has ended (or, with ``peer``, of that peer's windows at once);
        forgets keys with nothing left to say, so a stream of new peers does not grow the tables."""
        out: list[Summary] = []
        self._sweep(self._peers, now, out, lambda key: peer is not None and key[1] == peer)
        self._sweep(self._kinds, now, out, lambda key: False)
        return out

    def _sweep(
        self, table: dict[Any, _Window], now: float, out: list[Summary], now_anyway: Callable[[Any], bool]
    ) -> None:
        for key in list(table):
            w = table[key]
            if now - w.start < self.window and not now_anyway(key):
                continue
            if w.suppressed:
                out.append(self._summary(key, w))
            del table[key]

    @property
    def pending(self) -> bool:
        """Is any line being held back (so a summary is still to come)?"""
        return any(w.suppressed for w in self._peers.values()) or any(
            w.suppressed for w in self._kinds.values()
        )

    def __len__(self) -> int:
        return len(self._peers) + len(self._kinds)


SUMMARY_EVENT = "log_suppressed"
_MARK = "_sluice_flood_summary"


class FloodControl:
    """The structlog processor around a :class:`Throttle` (thread-safe: the committer logs too)."""

    def __init__(self, settings: LogFloodConfig | None = None, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self.throttle = Throttle()
        self.suppressed_total = 0
        self.apply(settings or LogFloodConfig())

    def apply(self, settings: LogFloodConfig) -> None:
        with self._lock:
            self.throttle.per_peer = settings.per_peer
            self.throttle.per_kind = settings.per_kind
            self.throttle.window = settings.window

    def __call__(self, _logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
        if event_dict.pop(_MARK, False):
            return event_dict
        peer = event_dict.get("peer")
        out: list[Summary] = []
        with self._lock:
            ok = self.throttle.admit(
                str(event_dict.get("event", "")), peer if isinstance(peer, str) else "", self.clock(), out
            )
            if not ok:
                self.suppressed_total += 1
                self._arm()
        self._write(out)
        if not ok:
            raise structlog.DropEvent
        return event_dict

    def flush_peer(self, peer: str) -> None:
        """A connection closed: say now what was left out of its lines."""
        with self._lock:
            if not self.throttle.pending:
                return
            out = self.throttle.due(self.clock(), peer)
        self._write(out)

    def flush(self) -> None:
        with self._lock:
            out = self.throttle.due(self.clock())
            self._timer = None
            if self.throttle.pending:
                self._arm()
        self._write(out)

    def _arm(self) -> None:
        if self._timer is None:
            self._timer = threading.Timer(self.throttle.window, self.flush)
            self._timer.daemon = True
            self._timer.start()

    def _write(self, summaries: list[Summary]) -> None:
        if not summaries:
            return
        log = structlog.get_logger("sluice.logs")
        for s in summaries:
            fields: dict[str, Any] = {
                "of": s.event,
                "count": s.count,
                "window": s.window,
                "summary": s.text(),
            }
            if s.peer:
                fields["peer"] = s.peer
            log.warning(SUMMARY_EVENT, **fields, **{_MARK: True})


CONTROL = FloodControl()
"""The process's flood control; :func:`engine.logs.configure` puts it in the processor chain."""


def apply(settings: LogFloodConfig) -> None:
    CONTROL.apply(settings)


def flush_peer(peer: str) -> None:
    CONTROL.flush_peer(peer)
