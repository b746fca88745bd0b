"""Sans-IO MLLP framer: bytes in, events out.

Why this exists: MLLP wraps each HL7 message as ``0x0B payload 0x1C 0x0D`` on a TCP
stream.  Reads split and merge frames arbitrarily, senders put junk between frames,
slow senders trickle bytes.  Like h11, this module owns the protocol and nothing else:
no sockets, no asyncio.  The listener feeds bytes with :meth:`Framer.receive_data`
(``b""`` is EOF) and loops over :meth:`Framer.next_event` until it gets ``NEED_DATA``.

The stream grammar (one function of the bytes, whatever the read boundaries):

* Bytes outside a frame before a start block ``0x0B`` are junk: discarded and counted
  in ``junk_bytes``; the connection is kept.  More than ``max_junk`` junk bytes in a
  row (between two frames) is a :class:`~engine.errors.FramingError`.
* Inside a frame the content runs to the first ``0x0B`` or ``0x1C``:

  - ``0x0B`` again (a start block inside a frame) starts a new frame, as HAPI does; the
    abandoned partial frame, its start block included, counts as junk.  The per-frame
    deadline is *not* restarted, so re-sending start blocks cannot buy a slow sender time.
  - ``0x1C 0x0D`` ends the frame.  ``0x1C 0x0D`` inside data therefore cuts the frame;
    what follows is junk up to the next start block.
  - ``0x1C`` followed by anything else is a FramingError, unless ``lenient_end`` (for
    senders that omit the CR): then ``0x1C`` alone ends the frame, a following ``0x0D``
    is swallowed as part of the end block and anything else is read as outside a frame.

* A frame whose content exceeds ``max_frame`` is not buffered past the cap: the framer
  skips to its end block and emits ``Oversize(size)`` (the listener answers AR 207).
* EOF outside a frame gives ``Closed(clean=True)``; EOF inside a frame (or between
  ``0x1C`` and its ``0x0D``) gives ``Closed(clean=False)`` and the partial frame is dropped.

Each byte is searched at most once per delimiter (``bytearray.find`` from remembered
cursors), so feeding a frame one byte at a time is O(n) overall.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from engine.errors import FramingError

START: Final = b"\x0b"
END: Final = b"\x1c\x0d"
_FS: Final = b"\x1c"
_CR: Final = 0x0D


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()
"""Returned by :meth:`Framer.next_event` when more bytes are needed."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One complete frame, without the framing bytes."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Oversize:
    """A frame past ``max_frame`` was skipped through its end block (``size`` = content bytes)."""

    size: int


@dataclass(frozen=True, slots=True)
class Closed:
    """EOF seen.  ``clean`` is False when EOF came inside a frame (that frame gets no ACK)."""

    clean: bool


Event = Frame | Oversize | Closed | _NeedData

_OUTSIDE: Final = 0
_INSIDE: Final = 1
_CLOSED: Final = 2


def encode(payload: bytes) -> bytes:
    """Wrap one message in MLLP framing.

    Raises ValueError when the payload holds a framing byte (``0x0B`` or ``0x1C``): the
    receiver would cut or restart the frame there.
    """
    if START in payload or _FS in payload:
        raise ValueError(
            "payload contains an MLLP framing byte (0x0B or 0x1C); remove or escape it before sending"
        )
    return START + payload + END


class Framer:
    """Split an MLLP byte stream into frames.  One per connection; see the module docstring."""

    __slots__ = (
        "_buf",
        "_closed_clean",
        "_deadline",
        "_eof",
        "_error",
        "_fs",
        "_fs_scan",
        "_junk_run",
        "_now",
        "_pos",
        "_skipped",
        "_state",
        "_swallow_cr",
        "_vt_scan",
        "clock",
        "frame_timeout",
        "junk_bytes",
        "lenient_end",
        "max_frame",
        "max_junk",
    )

    def __init__(
        self,
        max_frame: int = 16 * 1024 * 1024,
        frame_timeout: float = 30.0,
        max_junk: int = 1024 * 1024,
        lenient_end: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_frame < 0 or max_junk < 0 or frame_timeout <= 0:
            raise ValueError("max_frame and max_junk must be >= 0 and frame_timeout > 0")
        self.max_frame = max_frame
        self.frame_timeout = frame_timeout
        self.max_junk = max_junk
        self.lenient_end = lenient_end
        self.clock = clock  # seconds, monotonic; a test passes a fake one to move time by hand
        self.junk_bytes = 0
        self._buf = bytearray()
        self._pos = 0  # outside: first unread byte; inside: first content byte of the frame
        self._state = _OUTSIDE
        self._eof = False
        self._error: FramingError | None = None
        self._closed_clean = True
        self._now = 0.0
        self._deadline: float | None = None
        self._junk_run = 0  # junk since the last complete frame, checked against max_junk
        self._skipped = 0  # content bytes of an oversize frame already dropped
        self._fs = -1  # index of the next 0x1C in the frame, -1 when not found yet
        self._fs_scan = 0  # 0x1C searched (and absent) before this index
        self._vt_scan = 0  # 0x0B searched (and absent) inside the frame before this index
        self._swallow_cr = False  # lenient end seen at a read boundary: a 0x0D next is part of it

    # -- input ---------------------------------------------------------------
    def receive_data(self, data: bytes, now: float | None = None) -> None:
        """Buffer bytes from the peer; ``b""`` means EOF.

        ``now`` (a ``clock()`` value) is used to start the deadline of a frame whose start
        block is in these bytes; it defaults to ``clock()`` (``time.monotonic`` unless the
        framer was given another clock).
        """
        self._now = self.clock() if now is None else now
        if not data:
            self._eof = True
            return
        if self._eof:
            raise RuntimeError("receive_data() called with bytes after EOF")
        pos = self._pos
        if pos and pos * 2 >= len(self._buf):
            # Drop consumed bytes once they are at least half the buffer (so this stays linear).  Not
            # sooner: inside a large frame _pos sits at its start, and dropping those few bytes would
            # make CPython copy the whole buffer on every later growth instead of extending it in place.
            del self._buf[:pos]
            self._pos = 0
            self._fs_scan -= pos
            self._vt_scan -= pos
            if self._fs >= 0:
                self._fs -= pos
        self._buf += data

    # -- deadline ------------------------------------------------------------
    @property
    def deadline(self) -> float | None:
        """Clock time by which the frame in progress must be complete; None outside a frame."""
        return self._deadline

    def expired(self, now: float) -> bool:
        """True when a frame is in progress and its total deadline has passed."""
        return self._deadline is not None and now >= self._deadline

    def postpone(self, seconds: float) -> None:
        """Move the deadline of the frame in progress back: the listener stopped reading this
        connection for ``seconds`` (back-pressure), time the sender could not use."""
        if self._deadline is not None and seconds > 0:
            self._deadline += seconds

    @property
    def buffered(self) -> int:
        """Bytes held and not yet handed out: a partial frame, or input not yet split into events
        (the listener counts them against its memory budget)."""
        return len(self._buf) - self._pos

    @property
    def drained(self) -> bool:
        """Outside a frame with every byte read handed out and no EOF: :meth:`next_event` would only say
        ``NEED_DATA`` (the listener skips asking after the usual one frame per read)."""
        return self._state == _OUTSIDE and self._pos >= len(self._buf) and not self._eof

    # -- output --------------------------------------------------------------
    def next_event(self) -> Event:
        """The next ``Frame``, ``Oversize`` or ``Closed`` event, or ``NEED_DATA``.

        Raises FramingError on a protocol violation; the framer then stays broken (every
        later call raises the same error) and the connection should be closed.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except FramingError as exc:
            self._error = exc
            self._state = _CLOSED
            self._deadline = None
            raise

    def _junk(self, n: int) -> None:
        if n:
            self.junk_bytes += n
            self._junk_run += n
            if self._junk_run > self.max_junk:
                raise FramingError(
                    f"more than {self.max_junk} bytes outside MLLP frames; the peer is not sending MLLP "
                    "(check the sender's framing settings) so the connection is closed"
                )

    def _next(self) -> Event:
        buf = self._buf
        while True:
            state = self._state
            if state == _CLOSED:
                return Closed(self._closed_clean)
            n = len(buf)
            if state == _OUTSIDE:
                pos = self._pos
                if self._swallow_cr:
                    if pos < n:
                        self._swallow_cr = False
                        if buf[pos] == _CR:
                            pos += 1
                            self._pos = pos
                    elif not self._eof:
                        return NEED_DATA
                start = buf.find(START, pos)
                if start < 0:
                    self._pos = n
                    self._junk(n - pos)
                    if self._eof:
                        self._state = _CLOSED
                        self._closed_clean = True
                        return Closed(True)
                    return NEED_DATA
                self._pos = start + 1
                self._junk(start - pos)
                self._state = _INSIDE
                self._fs = -1
                self._fs_scan = self._vt_scan = start + 1
                self._skipped = 0
                self._deadline = self._now + self.frame_timeout
                continue

            # Inside a frame: content starts at _pos.
            pos = self._pos
            fs = self._fs
            if fs < 0:
                fs = buf.find(_FS, self._fs_scan)
                if fs < 0:
                    self._fs_scan = n
                else:
                    self._fs = fs
            limit = fs if fs >= 0 else n
            vt = buf.find(START, self._vt_scan, limit)
            if vt >= 0:
                # A start block inside the frame: abandon the partial frame (start block
                # included) as junk and begin a new one; the deadline keeps running.
                abandoned = 1 + self._skipped + vt - pos
                self._pos = self._vt_scan = vt + 1
                self._skipped = 0
                self._junk(abandoned)
                continue
            self._vt_scan = limit
            if fs >= 0:
                if fs + 1 < n:
                    if buf[fs + 1] == _CR:
                        end = fs + 2
                    elif self.lenient_end:
                        end = fs + 1
                    else:
                        raise FramingError(
                            f"MLLP end block 0x1C followed by 0x{buf[fs + 1]:02X} instead of 0x0D; "
                            "the sender's framing is broken (enable lenient_end on the channel if it "
                            "omits the CR)"
                        )
                elif self.lenient_end:
                    end = fs + 1
                    self._swallow_cr = True
                else:
                    # 0x1C is the last byte so far: its 0x0D may be in the next read.
                    return self._wait(fs)
                size = self._skipped + fs - pos
                if size > self.max_frame:
                    event: Event = Oversize(size)
                else:
                    with memoryview(buf) as view:  # one copy of the payload, not two
                        event = Frame(view[pos:fs].tobytes())
                if end == n:
                    # Everything read is consumed: free it now (a 15 MB frame must not stay buffered
                    # until the next read) and start the next read at 0.
                    buf.clear()
                    end = 0
                self._pos = end
                self._state = _OUTSIDE
                self._deadline = None
                self._junk_run = 0
                self._fs = -1
                return event
            return self._wait(n)

    def _wait(self, upto: int) -> Event:
        """Inside a frame with no end block yet; drop content past the cap, then wait or close."""
        pos = self._pos
        size = self._skipped + upto - pos
        if size > self.max_frame and upto > pos:
            # Oversize: stop buffering, remember only how much was skipped.
            del self._buf[pos:upto]
            self._skipped = size
            self._vt_scan = pos
            if self._fs >= 0:
                self._fs = pos
                self._fs_scan = pos
            else:
                self._fs_scan = pos
        if self._eof:
            self._state = _CLOSED
            self._closed_clean = False
            self._deadline = None
            return Closed(False)
        return NEED_DATA
