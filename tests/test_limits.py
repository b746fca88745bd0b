"""The pure parts of issue #12's network limits: the in-flight byte budget, the choice of which
connection to close at a cap (engine/limits.py) and the log flood control (engine/logflood.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest
import structlog

from engine import ack as ackmod
from engine.config import Config, LimitsConfig, LogFloodConfig, load
from engine.errors import ConfigError
from engine.intake import Committer, Job, _SizedOp
from engine.limits import ConnectionSlots, InflightBudget, tune_malloc
from engine.logflood import FloodControl, Summary, Throttle
from engine.store import NewMessage, Store, within_bytes

MB = 1024 * 1024


class Conn:
    def __init__(self, name: str, busy: bool = False) -> None:
        self.name, self.busy = name, busy
        self.woken = 0

    def budget_available(self) -> None:
        self.woken += 1

    def __repr__(self) -> str:
        return self.name


# -- the in-flight budget ----------------------------------------------------------------------------
def test_budget_counts_each_connection_once_and_says_who_may_read() -> None:
    b: InflightBudget[Conn] = InflightBudget(100)
    b.update(0, 60)
    b.update(0, 30)
    assert (b.total, b.over) == (90, False)
    b.update(60, 75)  # the first connection now holds 75, not 60 + 75
    assert (b.total, b.over, b.peak) == (105, True, 105)
    assert b.may_read(0) and not b.may_read(1)  # holding nothing: may always read
    b.update(75, 0)
    assert (b.total, b.over) == (30, False) and b.may_read(1)


def test_budget_wakes_waiters_once_when_it_drops_under_the_limit() -> None:
    b: InflightBudget[Conn] = InflightBudget(100)
    a, c = Conn("a"), Conn("c")
    b.update(0, 150)
    b.wait(a)
    b.wait(c)
    b.wait(a)  # registered once
    assert (b.waiting, b.pauses) == (2, 2)
    b.update(150, 120)  # still over: nobody woken
    assert (a.woken, c.woken) == (0, 0)
    b.forget(c)  # c went away
    b.update(120, 40)
    assert (a.woken, c.woken, b.waiting) == (1, 0, 0)
    b.update(40, 10)  # under already: no second wake-up
    assert a.woken == 1


def test_budget_zero_means_no_global_limit() -> None:
    b: InflightBudget[Conn] = InflightBudget(0)
    b.update(0, 10**12)
    assert not b.over and b.may_read(10**12)
    with pytest.raises(ValueError):
        InflightBudget(-1)


# -- which connection goes at a cap ------------------------------------------------------------------
def slots(*conns: tuple[Conn, str]) -> ConnectionSlots[Conn]:
    s: ConnectionSlots[Conn] = ConnectionSlots()
    for c, peer in conns:
        s.add(c, peer)
    return s


def busy(c: Conn) -> bool:
    return c.busy


def test_victim_is_the_longest_idle_of_the_peer_with_the_most_connections() -> None:
    quiet, f1, f2, f3 = Conn("quiet"), Conn("f1"), Conn("f2"), Conn("f3")
    s = slots((quiet, "10.0.0.2"), (f1, "10.0.0.9"), (f2, "10.0.0.9"), (f3, "10.0.0.9"))
    assert s.victim(busy) is f1  # quiet is older, but its peer has one connection
    s.touch(f1, "10.0.0.9")  # f1 completed a frame: f2 is now the flooder's longest idle
    assert s.victim(busy) is f2
    assert (s.count, s.of("10.0.0.9"), s.of("10.0.0.1")) == (4, 3, 0)


def test_victim_skips_busy_connections_and_falls_back_to_one() -> None:
    a1, a2, b1 = Conn("a1", busy=True), Conn("a2"), Conn("b1")
    s = slots((a1, "A"), (a2, "A"), (b1, "B"))
    assert s.victim(busy) is a2
    a2.busy = True
    assert s.victim(busy) is b1  # every connection of the biggest peer is busy: another peer's idle one
    b1.busy = True
    assert s.victim(busy) is a1  # all busy: the biggest peer's oldest


def test_victim_at_a_peers_own_cap_is_that_peers() -> None:
    b1, a1, a2 = Conn("b1"), Conn("a1"), Conn("a2")
    s = slots((b1, "B"), (a1, "A"), (a2, "A"))
    assert s.victim(busy, only_peer="A") is a1
    assert s.victim(busy, only_peer="C") is None
    assert s.remove(a1, "A") and not s.remove(a1, "A")
    assert s.peers() == {"B": 1, "A": 1}
    assert ConnectionSlots[Conn]().victim(busy) is None


def test_within_bytes_keeps_at_least_one_and_stops_before_the_limit() -> None:
    assert within_bytes([], 10) == 0
    assert within_bytes([50], 10) == 1  # a message larger than the limit still goes, alone
    assert within_bytes([4, 4, 4], 10) == 2
    assert within_bytes([4, 4, 4], 0) == 3  # 0: no limit


def test_tune_malloc_is_harmless_to_call() -> None:
    assert tune_malloc() in (True, False)


# -- log flood control ------------------------------------------------------------------------------
def test_throttle_per_peer_then_summary_when_the_window_ends() -> None:
    t = Throttle(per_peer=3, per_kind=0, window=10.0)
    out: list[Summary] = []
    shown = [
        t.admit("empty_frame", "127.0.0.1:4000", 100.0 + i * 0.001, out) for i in range(2_000_000 // 1000)
    ]
    assert shown[:3] == [True] * 3 and not any(shown[3:]) and out == []
    assert t.admit("empty_frame", "127.0.0.1:4001", 100.5, out)  # another connection has its own lines
    assert t.admit("empty_frame", "127.0.0.1:4000", 110.0, out)  # a new window
    assert out == [Summary("empty_frame", "127.0.0.1:4000", 1997, 10.0)]
    assert out[0].text() == "... and 1,997 more empty_frame from 127.0.0.1:4000"


def test_throttle_per_kind_limits_many_peers_and_due_says_what_was_left_out() -> None:
    t = Throttle(per_peer=10, per_kind=100, window=10.0)
    out: list[Summary] = []
    shown = sum(t.admit("connection_evicted", f"10.0.{i // 250}.{i % 250}:1", 5.0, out) for i in range(1500))
    assert shown == 100 and t.pending
    assert t.due(9.0) == []  # the window is not over
    assert t.due(15.0) == [Summary("connection_evicted", "", 1400, 10.0)]
    assert len(t) == 0 and not t.pending  # nothing kept for peers that said nothing more


def test_throttle_flushes_one_peer_at_once() -> None:
    t = Throttle(per_peer=1, per_kind=0, window=10.0)
    out: list[Summary] = []
    for _ in range(5):
        t.admit("junk_discarded", "p1", 1.0, out)
        t.admit("junk_discarded", "p2", 1.0, out)
    assert t.due(2.0, peer="p1") == [Summary("junk_discarded", "p1", 4, 10.0)]
    assert t.due(2.0) == []  # p2's window is still running
    assert t.due(11.0) == [Summary("junk_discarded", "p2", 4, 10.0)]


def test_flood_control_drops_and_summarises_through_structlog(capsys: pytest.CaptureFixture[str]) -> None:
    clock = [0.0]
    control = FloodControl(LogFloodConfig(per_peer=2, per_kind=50, window=10.0), clock=lambda: clock[0])
    structlog.configure(
        processors=[control, structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(),
        cache_logger_on_first_use=False,
    )
    try:
        log = structlog.get_logger()
        for _ in range(1000):
            log.info("message_rejected_unstored", peer="127.0.0.1:5000")
        log.info("listening", channel="c")  # no peer: only the per-kind limit applies
        control.flush_peer("127.0.0.1:5000")  # the connection closed
        lines: list[dict[str, Any]] = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    finally:
        structlog.reset_defaults()
    assert [x["event"] for x in lines] == [
        "message_rejected_unstored",
        "message_rejected_unstored",
        "listening",
        "log_suppressed",
    ]
    summary = lines[-1]
    assert (summary["of"], summary["count"], summary["peer"]) == (
        "message_rejected_unstored",
        998,
        "127.0.0.1:5000",
    )
    assert summary["summary"] == "... and 998 more message_rejected_unstored from 127.0.0.1:5000"
    assert control.suppressed_total == 998


# -- the committer keeps large writes apart from small ones -----------------------------------------
def committer_take(pending: list[tuple[Any, Any]], **kw: Any) -> tuple[list[Any], list[Any], Committer]:
    c = Committer(cast(Store, None), **kw)
    batch, rest = c._take(pending)
    return [i[1] for i in batch], [i[1] for i in rest], c


def job(peer: str, size: int, name: str) -> tuple[Any, str]:
    row = NewMessage(channel="c", received_at=0.0, peer=peer, raw=b"x" * size)
    return Job(cast(Any, None), row, None, ackmod.ACCEPTED), name


def test_small_messages_never_wait_behind_large_writes() -> None:
    big = 5 * MB
    pending = [
        job("A", big, "A1"),
        job("B", 100, "B1"),
        job("A", 100, "A2"),
        job("C", big, "C1"),
        job("D", 10, "D1"),
    ]
    batch, rest, c = committer_take(pending, max_batch_bytes=8 * MB)
    # Large ones may go (their turn), up to 8 MB together: A1 goes, C1 waits; A2 stays behind nothing.
    assert batch == ["A1", "B1", "A2", "D1"] and rest == ["C1"]
    # After a large write, waiting small ones get the next transaction alone; then the large again.
    c._large_turn = False
    batch2, rest2 = c._take([pending[3], job("E", 10, "E1")])
    assert [i[1] for i in batch2] == ["E1"] and [i[1] for i in rest2] == ["C1"]
    batch3, rest3 = c._take([pending[3], job("F", 10, "F1")])
    assert [i[1] for i in batch3] == ["C1", "F1"] and rest3 == []


def test_a_held_back_message_holds_back_the_rest_of_its_connection() -> None:
    big = 5 * MB
    pending = [job("A", big, "A1"), job("B", big, "B1"), job("B", 10, "B2"), job("C", 10, "C1")]
    batch, rest, _ = committer_take(pending, max_batch_bytes=8 * MB)
    assert batch == ["A1", "C1"] and rest == ["B1", "B2"]  # B2 after B1: never before it


def test_large_operations_count_like_large_messages() -> None:
    op = _SizedOp(lambda conn: None, 20 * MB)
    pending = [(op, "OP"), job("A", 10, "A1")]
    batch, rest, c = committer_take(pending)
    assert batch == ["OP", "A1"] and rest == []  # its turn: goes with the small ones
    c._large_turn = False
    batch2, rest2 = c._take(pending)
    assert [i[1] for i in batch2] == ["A1"] and [i[1] for i in rest2] == ["OP"]


# -- configuration ------------------------------------------------------------------------------------
def _load(tmp_path: Path, routes_extra: str = "", source_extra: str = "") -> Config:
    (tmp_path / "channels").mkdir(exist_ok=True)
    (tmp_path / "routes.yaml").write_text(
        f"store: sqlite:///{tmp_path}/s.db\ndestinations: {{out: {{kind: file, directory: out}}}}\n{routes_extra}"
    )
    (tmp_path / "channels" / "c.yaml").write_text(f"source: {{port: 2599{source_extra}}}\nroutes: [out]\n")
    return load(tmp_path / "routes.yaml")


def test_limits_defaults_and_sizes(tmp_path: Path) -> None:
    cfg = _load(tmp_path)
    assert cfg.limits == LimitsConfig() and cfg.limits.inflight_bytes == 128 * MB
    assert cfg.logging.flood == LogFloodConfig(per_peer=10, per_kind=100, window=10.0)
    src = cfg.channels[0].source
    assert (src.max_connections_per_peer, src.handshake_timeout, src.max_frame) == (0, 10.0, 16 * MB)
    cfg = _load(
        tmp_path,
        "limits: {inflight_bytes: 64MiB, batch_bytes: 0, connection_frames: 8}\n"
        "logging: {flood: {per_peer: 0, window: 2}}\n",
        ", max_frame_bytes: 1MiB, max_connections_per_peer: 5, handshake_timeout: 3",
    )
    assert (cfg.limits.inflight_bytes, cfg.limits.batch_bytes, cfg.limits.connection_frames) == (
        64 * MB,
        0,
        8,
    )
    assert (cfg.logging.flood.per_peer, cfg.logging.flood.window) == (0, 2.0)
    src = cfg.channels[0].source
    assert (src.max_frame, src.max_connections_per_peer, src.handshake_timeout) == (MB, 5, 3.0)


@pytest.mark.parametrize(
    ("routes_extra", "source_extra", "key"),
    [
        ("", ", max_frame: 1MiB, max_frame_bytes: 2MiB", "max_frame_bytes"),
        ("limits: {inflight_bytes: -1}\n", "", "limits.inflight_bytes"),
        ("limits: {connection_frames: 0}\n", "", "limits.connection_frames"),
        ("limits: {in_flight: 1}\n", "", "limits.in_flight"),
        ("logging: {flood: {window: 0}}\n", "", "logging.flood.window"),
        ("", ", handshake_timeout: 0", "source.handshake_timeout"),
        ("", ", max_connections_per_peer: -2", "source.max_connections_per_peer"),
    ],
)
def test_bad_limits_name_their_key(tmp_path: Path, routes_extra: str, source_extra: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, routes_extra, source_extra)
    assert key in str(err.value)
