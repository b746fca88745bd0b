"""End to end over real sockets: the engine as a process, `sluice send`, the store, destinations."""

from __future__ import annotations

import asyncio
import collections
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from engine import store as st
from engine.cli import main
from engine.client import MLLPClient, parse_ack
from engine.errors import DeliveryError
from tests.support.engine import EngineProcess, basic_channel, child_pids, free_port, write_config
from tests.support.polling import wait_for, wait_for_async

SAMPLES = Path(__file__).parent / "samples"
PLUGINS = str(Path(__file__).resolve().parents[1] / "support" / "plugins")


def adt(control: str, mrn: str = "MRN1") -> bytes:
    return (
        f"MSH|^~\\&|EHR|NORTH|SL|HOSP|20250101120000||ADT^A08^ADT_A01|{control}|P|2.5.1\r"
        f"PID|1||{mrn}^^^NORTH^MR||Testpatient^Alex||19800101|F\r"
        "PV1|1|O\r"
    ).encode()


def file_dest(directory: Path, **extra: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "kind": "file",
        "directory": str(directory),
        "pattern": "{control_id}.{ext}",
        "fsync": False,
    }
    d.update(extra)
    return d


def test_send_store_deliver(tmp_path: Path, store_url: str) -> None:
    port = free_port()
    out = tmp_path / "out"
    cfg = write_config(
        tmp_path, channels={"c": basic_channel(port)}, destinations={"out": file_dest(out)}, store=store_url
    )
    sample = SAMPLES / "adt_a01.hl7"
    with EngineProcess(cfg, port):
        res = CliRunner().invoke(main, ["send", str(sample), "--to", f"127.0.0.1:{port}"])
        assert res.exit_code == 0, res.output
        assert "\tAA\tDEMO0001" in res.output
        wait_for(lambda: (out / "DEMO0001.hl7").exists(), what="the delivered file")
        assert (out / "DEMO0001.hl7").read_bytes() == sample.read_bytes()
    s = st.Store(store_url)
    try:
        (row,) = s.list_messages()
        assert row.control_id == "DEMO0001" and row.status == st.PROCESSED and row.ack_code == "AA"
        full = s.get_message(row.id)
        assert full.raw == sample.read_bytes() and full.message_type == "ADT" and full.trigger == "A01"
        assert full.ack.startswith(b"MSH|^~\\&|SLUICE|HOSP|ALLSCRIPTS|NORTHCLINIC|")
        (d,) = s.deliveries_of(row.id)
        assert d.status == st.DELIVERED and d.attempts == 1
    finally:
        s.close()


def test_send_reports_rejections(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(
        tmp_path,
        channels={"c": basic_channel(port, accept={"types": ["ORU"]})},
        destinations={"out": file_dest(tmp_path / "o")},
    )
    with EngineProcess(cfg, port):
        res = CliRunner().invoke(main, ["send", str(SAMPLES / "adt_a01.hl7"), "--to", f"127.0.0.1:{port}"])
        assert res.exit_code == 1
        assert "\tAR\tDEMO0001\t200" in res.output


def test_send_timeout_exit_code(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        main, ["send", str(SAMPLES / "adt_a01.hl7"), "--to", f"127.0.0.1:{free_port()}", "--timeout", "1"]
    )
    assert res.exit_code == 1 and "ERROR" in res.output


def test_filtered_message_acked_and_kept(tmp_path: Path) -> None:
    port = free_port()
    ch = basic_channel(port, filter={"field": "MSH-9.1", "in": ["ORU"]})
    cfg = write_config(tmp_path, channels={"c": ch}, destinations={"out": file_dest(tmp_path / "o")})
    with EngineProcess(cfg, port):
        res = CliRunner().invoke(main, ["send", str(SAMPLES / "adt_a01.hl7"), "--to", f"127.0.0.1:{port}"])
        assert "\tAA\t" in res.output
        s = st.Store(f"sqlite:///{tmp_path}/sluice.db")
        try:
            wait_for(lambda: s.list_messages()[0].status == st.FILTERED, what="filtered status")
        finally:
            s.close()


def test_failing_destination_recovers(tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "blocked"
    out.write_text("a file where the directory should be")  # writes fail until this is removed
    dest = file_dest(out, retry={"max_attempts": 50, "backoff": 0.1, "max_backoff": 0.3})
    cfg = write_config(tmp_path, channels={"c": basic_channel(port)}, destinations={"out": dest})
    eng = EngineProcess(cfg, port)
    # The destination creates its directory at start; block it after start instead.
    out.unlink()
    with eng:
        out.rmdir() if out.is_dir() else None
        out.write_text("blocked")
        res = CliRunner().invoke(main, ["send", str(SAMPLES / "adt_a01.hl7"), "--to", f"127.0.0.1:{port}"])
        assert "\tAA\t" in res.output
        s = st.Store(f"sqlite:///{tmp_path}/sluice.db")
        try:
            wait_for(
                lambda: any(d.attempts >= 2 for m in s.list_messages() for d in s.deliveries_of(m.id)),
                what="retries",
            )
            out.unlink()
            out.mkdir()
            wait_for(lambda: (out / "DEMO0001.hl7").exists(), what="delivery after recovery")
            (m,) = s.list_messages()
            wait_for(lambda: s.deliveries_of(m.id)[0].status == st.DELIVERED, what="delivered status")
        finally:
            s.close()


def test_dead_letter_then_replay(tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "out"
    dest = file_dest(out, retry={"max_attempts": 2, "backoff": 0.05, "max_backoff": 0.1})
    cfg = write_config(tmp_path, channels={"c": basic_channel(port)}, destinations={"out": dest})
    runner = CliRunner()
    with EngineProcess(cfg, port):
        out.rmdir()
        out.write_text("blocked")
        res = runner.invoke(main, ["send", str(SAMPLES / "adt_a01.hl7"), "--to", f"127.0.0.1:{port}"])
        assert "\tAA\t" in res.output
        s = st.Store(f"sqlite:///{tmp_path}/sluice.db")
        try:
            wait_for(lambda: bool(s.dead_letters()), what="dead letter")
            (dl,) = s.dead_letters()
            assert "gave up after 2 attempts" in dl.reason and "cannot write" in dl.reason
            assert "will retry" not in dl.reason and "sluice replay" in dl.reason
            listing = runner.invoke(main, ["dead-letter", "list", "--config", str(cfg)])
            assert "gave up after 2 attempts" in listing.output
            dry = runner.invoke(
                main, ["replay", "--config", str(cfg), "--channel", "c", "--status", "dead", "--dry-run"]
            )
            assert "would replay message" in dry.output and s.dead_letters()
            typo = runner.invoke(
                main, ["replay", "--config", str(cfg), "--id", "1", "--id", "4242", "--dry-run"]
            )
            assert typo.exit_code == 1 and "would replay message 1" in typo.output
            assert "message 4242: no such message" in typo.output  # an id that selects nothing is said
            out.unlink()
            out.mkdir()
            rep = runner.invoke(
                main,
                ["replay", "--config", str(cfg), "--channel", "c", "--status", "dead", "--why", "dir fixed"],
            )
            assert rep.exit_code == 0 and "1 message(s) queued" in rep.output
            wait_for(lambda: (out / "DEMO0001.hl7").exists(), what="replayed delivery")
            assert s.replays()[0].why == "dir fixed"
            wait_for(lambda: not s.dead_letters(), what="dead letter cleared")
        finally:
            s.close()


def test_messages_cli_hides_phi(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(
        tmp_path, channels={"c": basic_channel(port)}, destinations={"out": file_dest(tmp_path / "o")}
    )
    runner = CliRunner()
    with EngineProcess(cfg, port):
        runner.invoke(main, ["send", str(SAMPLES / "adt_a01.hl7"), "--to", f"127.0.0.1:{port}"])
    listing = runner.invoke(main, ["messages", "list", "--config", str(cfg), "--json"])
    assert '"control_id": "DEMO0001"' in listing.output and "Sampleton" not in listing.output
    show = runner.invoke(main, ["messages", "show", "1", "--config", str(cfg)])
    assert "DEMO0001" in show.output and "Sampleton" not in show.output and "MRN100234" not in show.output
    shown = runner.invoke(main, ["messages", "show", "1", "--config", str(cfg), "--show-phi"])
    assert "Sampleton" in shown.output
    log = (tmp_path / "engine.log").read_text()
    assert "Sampleton" not in log and "MRN100234" not in log and "19760412" not in log


async def _sender(port: int, ids: list[str], acked: set[str], stop: asyncio.Event) -> None:
    """Send every id until it is AA'd; resend anything not ACKed (the engine may die at any moment)."""
    pending = list(ids)
    while pending and not stop.is_set():
        client = MLLPClient("127.0.0.1", port, connect_timeout=1.0, ack_timeout=5.0)
        try:
            while pending:
                cid = pending[0]
                ack = await client.send(adt(cid, mrn=f"M{cid}"))
                info = parse_ack(ack)
                assert info.control_id == cid
                if info.code == "AA":
                    acked.add(cid)
                    pending.pop(0)
                else:
                    await asyncio.sleep(0.05)
        except DeliveryError:
            await asyncio.sleep(0.1)
        finally:
            await client.close()


def send_through_kills(
    eng: EngineProcess,
    per_conn: list[list[str]],
    acked: set[str],
    *,
    kills: int,
    seed: int,
    timeout: float,
    kill_when: Callable[[int], bool] | None = None,
    between: Callable[[int], None] | None = None,
) -> None:
    """Send each connection's ids until AA'd while SIGKILLing and restarting the engine ``kills`` times.

    The n-th kill (1-based) falls once a random share of the ids (10 to 90 %) has been acknowledged and,
    if given, ``kill_when(n)`` holds (e.g. "this process has delivered a few hundred messages", so the kill
    lands while deliveries are under way, not before the first one).  ``between(n)`` runs after the n-th
    kill and before the restart, while no engine process is alive: a test snapshots the store there or
    points the next process elsewhere.
    """
    rnd = random.Random(seed)
    total = sum(len(c) for c in per_conn)
    marks = sorted(int(rnd.uniform(0.1, 0.9) * total) for _ in range(kills))

    async def run() -> None:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(_sender(eng.port, chunk, acked, stop)) for chunk in per_conn]
        try:
            for n, mark in enumerate(marks, 1):

                def reached(m: int = mark, k: int = n) -> bool:
                    if any(t.done() and not t.cancelled() and t.exception() for t in tasks):
                        return True  # a sender failed: stop waiting, gather() below raises its error
                    return len(acked) >= m and (kill_when is None or kill_when(k))

                def state(m: int = mark, k: int = n) -> str:
                    return f"kill {k}: {m} of {total} acknowledged (have {len(acked)}) and kill_when({k})"

                await wait_for_async(reached, timeout=timeout, what=state)
                eng.kill()
                if between is not None:
                    await asyncio.to_thread(between, n)
                await asyncio.to_thread(eng.start)
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=timeout)
        finally:
            stop.set()

    asyncio.run(run())


def recorded_delivered(db: Path, destination: str) -> set[str]:
    """Control ids whose delivery to ``destination`` the store has recorded as delivered."""
    s = st.Store(f"sqlite:///{db}")
    try:
        q = (
            select(st.M.c.control_id)
            .join(st.D, st.D.c.message_id == st.M.c.id)
            .where(st.D.c.destination == destination, st.D.c.status == st.DELIVERED)
        )
        with s.engine.connect() as conn:
            return {r[0] for r in conn.execute(q)}
    finally:
        s.close()


def delivery_rows(db: Path) -> dict[tuple[str, str], list[tuple[str, int]]]:
    """(control id, destination) → [(status, attempts)] for every delivery row in the store."""
    s = st.Store(f"sqlite:///{db}")
    try:
        q = select(st.M.c.control_id, st.D.c.destination, st.D.c.status, st.D.c.attempts).join(
            st.D, st.D.c.message_id == st.M.c.id
        )
        out: dict[tuple[str, str], list[tuple[str, int]]] = {}
        with s.engine.connect() as conn:
            for cid, dest, status, attempts in conn.execute(q):
                out.setdefault((cid, dest), []).append((status, attempts))
        return out
    finally:
        s.close()


def check_deliveries_through_kills(
    ids: list[str], per_process: list[collections.Counter[str]], recorded_at_kill: list[set[str]]
) -> int:
    """What a duplicate delivery would change, counted per engine process.

    ``per_process[g]`` counts what the destination received from the g-th engine process (0 = the first;
    the last one ran to the end), ``recorded_at_kill[g]`` is what the store had recorded as delivered when
    process g was killed.  The engine delivers at least once: a row it delivered but had not yet recorded
    when it was killed is delivered again by the next process.  Nothing else may repeat:

    * every acknowledged id reaches the destination, and nothing else does;
    * no process delivers an id twice;
    * no process delivers an id that the store had recorded as delivered before that process started.

    Returns how many ids were delivered by more than one process (the unrecorded ones at the kills).
    """
    assert len(per_process) == len(recorded_at_kill) + 1
    total: collections.Counter[str] = collections.Counter()
    for counts in per_process:
        total.update(counts)
    assert set(total) == set(ids), (
        f"missing {sorted(set(ids) - set(total))[:5]}, foreign {sorted(set(total) - set(ids))[:5]}"
    )
    for g, counts in enumerate(per_process):
        twice = sorted(cid for cid, n in counts.items() if n > 1)
        assert not twice, f"engine process {g} delivered {len(twice)} ids more than once: {twice[:5]}"
        done_before = set().union(*recorded_at_kill[:g])
        again = sorted(done_before & set(counts))
        assert not again, f"engine process {g} re-delivered {len(again)} ids already recorded: {again[:5]}"
    return sum(1 for n in total.values() if n > 1)


@pytest.mark.slow
def test_kill_9_while_sending_loses_nothing(tmp_path: Path) -> None:
    """5,000 messages over 20 connections, SIGKILL 3 times (at random points of the stream, each while that
    process is delivering) and restarted; the senders resend anything not ACKed.  Every AA'd message is
    stored exactly once, gets exactly one delivery row per destination, and is delivered at least once; a
    message is delivered twice only when a process was killed after delivering it and before recording
    that, and then by the next process.

    Two routes: the file destination (one file per message, written atomically: a re-delivery rewrites the
    same name, so the files alone cannot show a duplicate) and the recorder plugin, which appends every
    delivery to a log of its own per engine process, so each delivery is counted."""
    port = free_port()
    out = tmp_path / "out"
    logs = [tmp_path / f"recorded-{g}.txt" for g in range(4)]  # one per engine process: 3 kills

    def configure(g: int) -> None:
        rec = {"kind": "batch-recorder", "log": str(logs[g])}  # batch_across_keys, like the file kind
        channel = basic_channel(port, routes=[{"destination": "out"}, {"destination": "rec"}])
        cfg = write_config(
            tmp_path, channels={"c": channel}, destinations={"out": file_dest(out), "rec": rec}
        )
        cfg.write_text(cfg.read_text() + f"plugin_paths: [{PLUGINS}]\nplugins: [sluice_test_recorder]\n")

    recorded_at_kill: list[set[str]] = []

    def delivering(n: int) -> bool:  # the process about to be killed has delivered a few hundred
        log = logs[n - 1]
        return log.exists() and log.read_bytes().count(b"\n") >= (300, 900, 150)[n - 1]

    def between(n: int) -> None:
        recorded_at_kill.append(recorded_delivered(db, "rec"))
        configure(n)

    db = tmp_path / "sluice.db"
    configure(0)
    ids = [f"K{i:05d}" for i in range(5000)]
    per_conn = [ids[i::20] for i in range(20)]
    acked: set[str] = set()
    eng = EngineProcess(tmp_path / "routes.yaml", port).start()
    try:
        send_through_kills(
            eng, per_conn, acked, kills=3, seed=7, timeout=240, kill_when=delivering, between=between
        )
        assert acked == set(ids)
        s = st.Store(f"sqlite:///{db}")
        try:
            wait_for(
                lambda: all(
                    s.delivery_counts().get((d, st.DELIVERED), 0) >= len(ids) for d in ("out", "rec")
                ),
                timeout=60,
                what=lambda: f"all delivered: {s.delivery_counts()}",
            )
            rows = s.list_messages(limit=10_000)
            controls = [r.control_id for r in rows]
            assert sorted(controls) == sorted(ids)  # stored exactly once each (resends were deduped)
            assert s.check() == "ok"
            assert all(r.status == st.PROCESSED for r in rows)
        finally:
            s.close()
    finally:
        eng.stop()
    # one delivery row per message and destination, delivered at the first recorded attempt
    by_row = delivery_rows(db)
    assert set(by_row) == {(c, d) for c in ids for d in ("out", "rec")}
    bad = {k: v for k, v in by_row.items() if v != [(st.DELIVERED, 1)]}
    assert not bad, list(bad.items())[:5]
    files = sorted(p.stem for p in out.glob("*.hl7"))
    assert files == sorted(ids)  # one file per message (deterministic names)
    assert not list(out.glob(".*.tmp"))
    per_process = [
        collections.Counter(p.read_text().split()) if p.exists() else collections.Counter() for p in logs
    ]
    redelivered = check_deliveries_through_kills(ids, per_process, recorded_at_kill)
    print(
        f"\nkill -9 x3, 5,000 messages: deliveries per engine process {[sum(c.values()) for c in per_process]}, "
        f"{redelivered} delivered again by the next process (sent, not yet recorded at the kill)"
    )


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_worker_processes_leave_when_the_engine_is_killed(tmp_path: Path) -> None:
    """A SIGKILLed engine cannot stop its worker processes; they notice and exit on their own."""
    port = free_port()
    channel = basic_channel(port)
    cfg = write_config(
        tmp_path,
        channels={"c": channel},
        destinations={"out": file_dest(tmp_path / "out")},
        processing={"workers": 2},
    )
    eng = EngineProcess(cfg, port).start()
    assert eng.proc is not None

    async def send() -> None:
        async with MLLPClient("127.0.0.1", port) as c:
            for i in range(20):
                assert parse_ack(await c.send(adt(f"W{i}"))).code == "AA"

    asyncio.run(send())
    s = st.Store(f"sqlite:///{tmp_path}/sluice.db")
    try:
        wait_for(lambda: s.delivery_counts().get(("out", st.DELIVERED), 0) >= 20, what="delivered")
    finally:
        s.close()
    workers = [p for p in child_pids(eng.proc.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
    assert workers, "the engine should have started worker processes"
    eng.kill()
    wait_for(lambda: not any(_alive(p) for p in workers), timeout=10, what="worker processes to exit")
