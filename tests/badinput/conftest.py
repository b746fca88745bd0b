"""Helpers for the bad-input suite: one engine per module, raw sockets, ACK parsing, store look-ups.

Everything here talks to 127.0.0.1 only and uses synthetic data.  Framing tests write raw bytes
through plain sockets so every byte is under the test's control; the ACK reader below is a tiny
independent MLLP parser (not engine.mllp) so a framer bug cannot hide itself.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from engine import store as st
from tests.support.engine import EngineProcess, free_port, write_config

VT, FS, CR = b"\x0b", b"\x1c", b"\x0d"
_ids = itertools.count(1)


def uid(prefix: str = "B") -> str:
    """A control id unique within the test session."""
    return f"{prefix}{int(time.time() * 1000) % 10_000_000:07d}{next(_ids):04d}"


def frame(payload: bytes) -> bytes:
    return VT + payload + FS + CR


def adt(
    control: str,
    *,
    trigger: str = "A08",
    mtype: str = "ADT",
    pid3: str = "MRN1^^^NORTH^MR",
    version: str = "2.5.1",
    processing: str = "P",
    msh15: str = "",
    msh16: str = "",
    msh18: str = "",
    name: str = "Testpatient^Alex",
    extra: str = "",
    sep: str = "\r",
) -> bytes:
    """A small synthetic ADT (or any type) with the given header values."""
    msh = (
        f"MSH|^~\\&|EHR|NORTH|SL|HOSP|20250101120000||{mtype}^{trigger}|{control}|{processing}|{version}"
        f"|||{msh15}|{msh16}||{msh18}"
    ).rstrip("|")
    segs = [msh, f"EVN|{trigger}|20250101120000", f"PID|1||{pid3}||{name}||19800101|F", "PV1|1|O"]
    text = sep.join(segs) + sep + extra
    return text.encode("latin-1")


# ---------------------------------------------------------------------------
# sockets


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


@dataclass
class Reader:
    """Reads MLLP frames from a socket with an independent, minimal parser."""

    sock: socket.socket
    buf: bytearray = field(default_factory=bytearray)
    closed: bool = False  # peer closed (EOF) or reset
    reset: bool = False

    def _fill(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or self.closed:
            return False
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            return False
        except (ConnectionResetError, BrokenPipeError):
            self.closed = self.reset = True
            return False
        if not data:
            self.closed = True
            return False
        self.buf += data
        return True

    def _pop(self) -> bytes | None:
        start = self.buf.find(VT)
        if start < 0:
            return None
        end = self.buf.find(FS + CR, start)
        if end < 0:
            return None
        payload = bytes(self.buf[start + 1 : end])
        del self.buf[: end + 2]
        return payload

    def frames(self, n: int, timeout: float = 10.0) -> list[bytes]:
        """Exactly ``n`` frames, or AssertionError naming what arrived."""
        deadline = time.monotonic() + timeout
        out: list[bytes] = []
        while len(out) < n:
            f = self._pop()
            if f is not None:
                out.append(f)
                continue
            if not self._fill(deadline):
                raise AssertionError(
                    f"expected {n} ACK frame(s), got {len(out)} (closed={self.closed}, "
                    f"leftover={bytes(self.buf[:200])!r})"
                )
        return out

    def one(self, timeout: float = 10.0) -> bytes:
        return self.frames(1, timeout)[0]

    def nothing_before_probe(self) -> None:
        """Assert that no reply is pending for what was sent so far on this connection.

        Sends a normal message (the probe) on the same connection: the engine answers a connection's
        frames in order, so the probe's AA must be the very next frame; a reply still to come for
        anything sent earlier would arrive before it.  Order, not a wait for silence.
        """
        cid = uid("PR")
        self.sock.sendall(frame(adt(cid)))
        raw = self.one()
        ack = parse_ack(raw)
        assert (ack.code, ack.control_id) == ("AA", cid), f"expected the probe's AA next, got {raw[:300]!r}"

    def wait_closed(self, timeout: float = 30.0) -> None:
        """Read until the engine closes the connection; AssertionError if it stays open past ``timeout``
        (a bound for a hung test: what closed it is for the test to check, e.g. in the engine's log)."""
        deadline = time.monotonic() + timeout
        while not self.closed:
            if not self._fill(deadline) and not self.closed and time.monotonic() >= deadline:
                raise AssertionError(f"connection still open after {timeout}s")

    def is_open(self) -> bool:
        """True while the engine has not closed the connection (reads only what is already there)."""
        if self.closed:
            return False
        self.sock.setblocking(False)
        try:
            data = self.sock.recv(1 << 20)
        except BlockingIOError:
            return True
        except (ConnectionResetError, BrokenPipeError):
            self.closed = self.reset = True
            return False
        finally:
            self.sock.setblocking(True)
        if not data:
            self.closed = True
            return False
        self.buf += data
        return True


def send_recv(port: int, payload: bytes, n: int = 1, timeout: float = 10.0) -> list[bytes]:
    """Send one framed payload on a fresh connection and read ``n`` ACK frames."""
    with connect(port) as s:
        s.sendall(frame(payload))
        return Reader(s).frames(n, timeout)


def send_one(port: int, payload: bytes, timeout: float = 10.0) -> bytes:
    return send_recv(port, payload, 1, timeout)[0]


def rst_close(s: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0) instead of a FIN."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()


# ---------------------------------------------------------------------------
# ACK parsing


@dataclass(frozen=True)
class Ack:
    raw: bytes
    fs: str
    cs: str
    segments: dict[str, list[str]]

    @property
    def code(self) -> str:
        return self.field("MSA", 1)

    @property
    def control_id(self) -> str:
        return self.field("MSA", 2)

    @property
    def err_code(self) -> str:
        """ERR-3.1 (v2.5+) or the code inside ERR-1 (older)."""
        e3 = self.field("ERR", 3)
        if e3:
            return e3.split(self.cs)[0]
        e1 = self.field("ERR", 1)
        return e1.split(self.cs)[3].split("&")[0] if e1.count(self.cs) >= 3 else ""

    @property
    def err_location(self) -> str:
        return self.field("ERR", 2)

    def field(self, seg: str, n: int) -> str:
        fields = self.segments.get(seg)
        if fields is None:
            return ""
        if seg == "MSH":
            fields = [fields[0], self.fs, *fields[1:]]
        return fields[n] if n < len(fields) else ""


def parse_ack(raw: bytes) -> Ack:
    text = raw.decode("latin-1")
    assert text.startswith("MSH"), f"not an HL7 ACK: {raw[:80]!r}"
    fs = text[3]
    cs = text[4]
    segs: dict[str, list[str]] = {}
    for line in text.split("\r"):
        if line:
            parts = line.split(fs)
            segs.setdefault(parts[0], parts)
    return Ack(raw, fs, cs, segs)


# ---------------------------------------------------------------------------
# engine per module


@dataclass
class Engine:
    dir: Path
    ports: dict[str, int]
    proc: EngineProcess
    out: Path
    _store: st.Store | None = None

    @property
    def store(self) -> st.Store:
        if self._store is None:
            self._store = st.Store(f"sqlite:///{self.dir}/sluice.db", create=False)
        return self._store

    def rows(self, control_id: str, channel: str | None = None) -> list[Any]:
        """Full message rows with this control id (oldest first)."""
        from sqlalchemy import select

        q = select(st.M).where(st.M.c.control_id == control_id).order_by(st.M.c.id)
        if channel:
            q = q.where(st.M.c.channel == channel)
        with self.store.engine.connect() as conn:
            return list(conn.execute(q).all())

    def count(self, channel: str | None = None) -> int:
        from sqlalchemy import func, select

        q = select(func.count()).select_from(st.M)
        if channel:
            q = q.where(st.M.c.channel == channel)
        with self.store.engine.connect() as conn:
            return int(conn.execute(q).scalar_one())

    def latest(self, channel: str) -> Any:
        from sqlalchemy import select

        with self.store.engine.connect() as conn:
            return conn.execute(
                select(st.M).where(st.M.c.channel == channel).order_by(st.M.c.id.desc()).limit(1)
            ).first()

    def wait_row(
        self, control_id: str, pred: Callable[[Any], bool] = lambda r: True, timeout: float = 10.0
    ) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.rows(control_id)
            if rows and pred(rows[-1]):
                return rows[-1]
            time.sleep(0.05)
        raise AssertionError(f"no matching stored row for control id {control_id} after {timeout}s")

    def payloads(self, message_id: int) -> list[bytes]:
        """Delivery payloads created for a message (e.g. the FHIR Bundle), in delivery-row order."""
        from sqlalchemy import select

        from engine import payloads

        q = select(st.D.c.payload).where(st.D.c.message_id == message_id).order_by(st.D.c.id)
        with self.store.engine.connect() as conn:
            return [payloads.unpack(r[0]) for r in conn.execute(q)]

    def log_size(self) -> int:
        """The engine log's length in bytes now: ``log_lines(since=...)`` reads only what comes after."""
        return self.proc.log.stat().st_size

    def log_lines(self, since: int = 0) -> list[dict[str, Any]]:
        with self.proc.log.open("rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        out = []
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def assert_serving(self, channel: str) -> None:
        """A normal message on a fresh connection still gets AA."""
        cid = uid("OK")
        ack = parse_ack(send_one(self.ports[channel], adt(cid)))
        assert (ack.code, ack.control_id) == ("AA", cid), ack.raw
        assert self.proc.proc is not None and self.proc.proc.poll() is None, "engine died"


def start_engine(base: Path, channels: dict[str, dict[str, Any]]) -> Iterator[Engine]:
    """One engine process serving every channel (each on its own free port)."""
    out = base / "out"
    ports: dict[str, int] = {}
    bodies: dict[str, dict[str, Any]] = {}
    for name, body in channels.items():
        port = free_port()
        ports[name] = port
        src = {"host": "127.0.0.1", "port": port, "idle_timeout": 5, "frame_timeout": 5}
        src.update(body.pop("source", {}))
        b: dict[str, Any] = {"source": src, "routes": [{"destination": "out"}], "transform": ["passthrough"]}
        b.update(body)
        bodies[name] = b
    dest = {"kind": "file", "directory": str(out), "pattern": "{channel}/{message_id}.{ext}", "fsync": False}
    cfg = write_config(base, channels=bodies, destinations={"out": dest})
    proc = EngineProcess(cfg, next(iter(ports.values())))
    proc.start()
    # Every listener is up before the first test runs.
    for port in ports.values():
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    proc.stop()
                    raise
                time.sleep(0.05)
    eng = Engine(base, ports, proc, out)
    try:
        yield eng
    finally:
        if eng._store is not None:
            eng._store.close()
        code = proc.stop()
        assert code == 0, f"engine exited with {code}:\n{proc.log.read_text()[-3000:]}"


@pytest.fixture
def fresh_id() -> Callable[[str], str]:
    return uid
