"""The engine process's intake path in one process, measured in ways that do not move with the machine's load.

Runs on any checkout whose venv runs it (``cd <checkout> && .venv/bin/python /path/to/intake_loops.py``), so
two commits can be compared with the same script (it adapts to their ``Intake``/``Listener`` signatures):

* ``group``: ROUNDS rounds of CONNECTIONS concurrent messages through ``Intake.handle`` and the committer
  (SQLite, ``synchronous=FULL``): group commits and the bytes the process wrote per message
  (``/proc/self/io``: WAL and checkpoints; one message per commit with ``-c 1``).
* ``listener``: the real ``Listener`` on a socket with CONNECTIONS clients (in this process) sending ROUNDS
  messages each and waiting for each ACK: listener, intake, committer and ACK.
* ``--callgrind SMALL LARGE``: runs the chosen loop under valgrind twice and prints the instructions per
  message, (Ir(LARGE) - Ir(SMALL)) / ((LARGE - SMALL) * CONNECTIONS): start-up cancels out.

    .venv/bin/python bench/intake_loops.py group -n 200 -c 25
    .venv/bin/python bench/intake_loops.py listener -c 10 --callgrind 10 50

Metrics are on and the patient hash keyed where the checkout has them (as ``sluice run``).  Nothing here
is a test; figures are in bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.getcwd())


def _write_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("write_bytes"):
                return int(line.split()[1])
    return 0


def run(mode: str, rounds: int, connections: int, drop: list[str]) -> str:
    from bench.mllp_load import TEMPLATES
    from engine import logs
    from engine.config import ChannelConfig, SourceConfig
    from engine.intake import Committer, Intake
    from engine.listener import Listener
    from engine.store import Store

    head, tail = TEMPLATES["adt-a01"]
    logs.configure("json", "info")  # as `sluice run`
    work = Path(tempfile.mkdtemp(prefix="sluice-intake-loops-"))
    store = Store(f"sqlite:///{work}/loop.db")
    for name in drop:  # e.g. what an index costs
        db = sqlite3.connect(work / "loop.db")
        db.execute(f"DROP INDEX {name}")
        db.commit()
        db.close()
    committer = Committer(store)
    committer.start()
    source = SourceConfig(host="127.0.0.1", port=0)
    channel = ChannelConfig(name="c", file="c.yaml", source=source, types={"ADT": ()})
    kw: dict[str, Any] = {}
    lkw: dict[str, Any] = {}
    if "metrics" in inspect.signature(Intake).parameters:
        from engine.metrics import Metrics

        metrics = Metrics(channels=["c"])
        kw = {"metrics": metrics, "patient_key": b"k" * 32}
        lkw = {"metrics": metrics}
    intake = Intake(channel, committer, **kw)

    def cid(k: int, i: int) -> bytes:
        return b"abc123%03d%08d" % (k, i)  # as mllp_load.py: a prefix per connection, then a sequence

    async def group() -> None:
        for r in range(rounds):
            await asyncio.gather(
                *(intake.handle(head + cid(k, r) + tail, f"127.0.0.1:{k}") for k in range(connections))
            )

    async def client(port: int, k: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for i in range(rounds):
            writer.write(b"\x0b" + head + cid(k, i) + tail + b"\x1c\x0d")
            await reader.readuntil(b"\x1c\x0d")
        writer.close()

    async def listener() -> None:
        lst = Listener("c", source, intake, **lkw)
        await lst.start()
        await asyncio.gather(*(client(lst.port, k) for k in range(connections)))
        await lst.stop_accepting()

    try:
        import uvloop

        uvloop.install()  # as the engine
    except ImportError:
        pass
    w0, b0, t0 = _write_bytes(), committer.batches, time.perf_counter()
    asyncio.run(group() if mode == "group" else listener())
    n = rounds * connections
    out = (
        f"{os.getcwd()} {mode}: {n} messages, {committer.batches - b0} commits, "
        f"{(_write_bytes() - w0) / n / 1024:.2f} KB written per message, "
        f"{(time.perf_counter() - t0) / n * 1e6:.0f} us per message (wall)"
    )
    committer.stop()
    store.close()
    shutil.rmtree(work, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["group", "listener"])
    ap.add_argument("-n", "--rounds", type=int, default=100, help="messages per connection")
    ap.add_argument("-c", "--connections", type=int, default=10)
    ap.add_argument("--drop-index", action="append", default=[], help="drop this index first (repeatable)")
    ap.add_argument("--callgrind", type=int, nargs=2, metavar=("SMALL", "LARGE"))
    args = ap.parse_args()
    if not args.callgrind:
        print(run(args.mode, args.rounds, args.connections, args.drop_index), flush=True)
        return
    small, large = args.callgrind
    ir = []
    for n in (small, large):
        cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
               str(Path(__file__).resolve()), args.mode, "-n", str(n), "-c", str(args.connections)]  # fmt: skip
        for name in args.drop_index:
            cmd += ["--drop-index", name]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        m = re.search(r"Collected : (\d+)", proc.stderr)
        assert m is not None, proc.stderr[-2000:]
        ir.append(int(m.group(1)))
    per = (ir[1] - ir[0]) / ((large - small) * args.connections)
    print(f"{os.getcwd()} {args.mode}: {per:,.0f} instructions per message (Ir {ir[0]:,} / {ir[1]:,})")


if __name__ == "__main__":
    main()
