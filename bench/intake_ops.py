"""The engine process's intake path in parts, one thread, no sockets: instruction counts that repeat exactly.

``intake_loops.py listener --callgrind`` counts the whole path (sockets, the committer thread, group
commits), so its figure moves by 10-30k instructions between runs with how the commits happen to batch.
This script runs each part alone on the same frames (the ``adt-a01`` template, a control id per message),
with a fixed hash seed: ``decide`` and ``commit`` run without an event loop and repeat closely; ``listener``
runs on uvloop and still moves by ~10-25k between runs (seen in session 6), so compare it over several runs:

* ``decide``: ``Intake.decide`` (decode, parse, header checks, patient hash, ACK built) for each frame;
* ``listener``: a real ``MLLPProtocol`` on a stand-in transport, one frame at a time through
  ``data_received``, the connection's limits bookkeeping, the metrics and the ACK written, with an intake
  that answers a fixed ACK (so nothing of the intake is counted);
* ``commit``: the committer's transaction for groups of 10 decided jobs (dedupe lookup, insert, commit:
  SQLite, ``synchronous=FULL``), run in this thread;
* ``all``: the three in turn.

Run on a checkout (``cd <checkout>``) with two sizes and take the difference so start-up cancels out::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null .venv/bin/python bench/intake_ops.py decide 200
    valgrind --tool=callgrind --callgrind-out-file=/dev/null .venv/bin/python bench/intake_ops.py decide 2200

(Ir(2200) - Ir(200)) / 2000 is the instructions per message; ``--callgrind 200 2200`` does that.  Metrics
are on and the patient hash keyed (as ``sluice run``).  Nothing here is a test; figures in bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, os.getcwd())

GROUP = 10  # jobs per committed transaction in ``commit``


def _frames(n: int) -> list[bytes]:
    from bench.mllp_load import TEMPLATES

    head, tail = TEMPLATES["adt-a01"]
    return [head + b"abc123%03d%08d" % (i % GROUP, i) + tail for i in range(n)]


def _intake(store: Any = None) -> Any:
    from engine.config import ChannelConfig, SourceConfig
    from engine.intake import Committer, Intake
    from engine.metrics import Metrics

    channel = ChannelConfig(
        name="c", file="c.yaml", source=SourceConfig(host="127.0.0.1", port=0), types={"ADT": ()}
    )
    committer = Committer(store) if store is not None else None
    return Intake(channel, committer, metrics=Metrics(channels=["c"]), patient_key=b"k" * 32)  # type: ignore[arg-type]


def decide(n: int) -> None:
    intake = _intake()
    for frame in _frames(n):
        intake.decide(frame, "127.0.0.1:40000")


class _Transport:
    """What the protocol uses of an asyncio transport; writes are counted, not sent."""

    def __init__(self) -> None:
        self.written = 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.written += 1

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def listener(n: int) -> None:
    from engine import logs
    from engine.config import SourceConfig
    from engine.listener import Listener, MLLPProtocol
    from engine.metrics import Metrics

    logs.configure("json", "info")
    ack = b"MSH|^~\\&|B|B|A|A|20240101||ACK^A01|X1|P|2.5\rMSA|AA|abc123\r"

    class FixedIntake:
        async def handle(self, payload: bytes, peer: str) -> list[bytes]:
            return [ack]

    async def run() -> None:
        lst = Listener(
            "c", SourceConfig(host="127.0.0.1", port=0), FixedIntake(), metrics=Metrics(channels=["c"])
        )  # type: ignore[arg-type]
        proto = MLLPProtocol(lst)
        tr = _Transport()
        proto.connection_made(tr)  # type: ignore[arg-type]
        for frame in _frames(n):
            proto.data_received(b"\x0b" + frame + b"\x1c\x0d")
            worker = proto.worker
            if worker is not None:
                await worker
        assert tr.written == n, tr.written
        proto.connection_lost(None)

    try:
        import uvloop

        uvloop.install()  # as the engine
    except ImportError:
        pass
    asyncio.run(run())


def commit(n: int) -> None:
    from engine.store import Store

    work = Path(tempfile.mkdtemp(prefix="sluice-intake-ops-"))
    store = Store(f"sqlite:///{work}/ops.db")
    intake = _intake(store)
    committer = intake.committer
    loop = asyncio.new_event_loop()
    frames = _frames(n)
    try:
        for i in range(0, n, GROUP):
            batch = []
            for frame in frames[i : i + GROUP]:
                jobs, _ = intake.decide(frame, "127.0.0.1:40000")
                batch.extend((j, loop.create_future()) for j in jobs)
            committer._commit(batch, [])
    finally:
        if committer._conn is not None:
            committer._conn.close()
        loop.close()
        store.close()
        shutil.rmtree(work, ignore_errors=True)


MODES = {"decide": decide, "listener": listener, "commit": commit}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=[*MODES, "all"])
    ap.add_argument("n", type=int, nargs="?", default=1000, help="messages (a multiple of 10)")
    ap.add_argument("--callgrind", type=int, nargs=2, metavar=("SMALL", "LARGE"))
    args = ap.parse_args()
    modes = list(MODES) if args.mode == "all" else [args.mode]
    if not args.callgrind:
        for mode in modes:
            MODES[mode](args.n)
        return
    small, large = args.callgrind
    for mode in modes:
        ir = []
        for n in (small, large):
            cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
                   str(Path(__file__).resolve()), mode, str(n)]  # fmt: skip
            env = dict(os.environ, PYTHONHASHSEED="0")
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            m = re.search(r"Collected : (\d+)", proc.stderr)
            assert m is not None, proc.stderr[-2000:]
            ir.append(int(m.group(1)))
        per = (ir[1] - ir[0]) / (large - small)
        print(
            f"{os.getcwd()} {mode}: {per:,.0f} instructions per message (Ir {ir[0]:,} / {ir[1]:,})",
            flush=True,
        )


if __name__ == "__main__":
    main()
