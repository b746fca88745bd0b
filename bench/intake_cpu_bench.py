"""Engine-process CPU per message on the intake path, this tree against another (A/B, alternated).

Throughput on a shared, loaded machine says little; the engine process's own CPU time (utime + stime from
/proc) per message is steadier.  Each round starts the engine of each tree (pure Python, one processing
worker, passthrough → file), warms it up with 300 messages, then sends ``--count`` ADT messages over
``--connections`` connections and reads the engine process's CPU before and after.

    python bench/intake_cpu_bench.py --before /tmp/sluice-before --rounds 3

The other tree is a plain copy of the code to compare (``git archive COMMIT | tar -x -C DIR``).  Figures go
to bench/results/intake_cpu_ab.json.  Nothing here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.client import MLLPClient  # noqa: E402
from tests.support.engine import basic_channel, free_port, write_config  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def adt(i: int) -> bytes:
    return (
        f"MSH|^~\\&|EHR|NORTH|SL|HOSP|20250101120000||ADT^A08^ADT_A01|C{i}|P|2.5.1\r"
        f"PID|1||MRN{i}^^^NORTH^MR||Testpatient^Alex||19800101|F\rPV1|1|O\r"
    ).encode()


async def send(port: int, count: int, connections: int) -> None:
    async def one(k: int) -> None:
        client = MLLPClient("127.0.0.1", port, ack_timeout=60)
        for i in range(count // connections):
            await client.send(adt(k * 1_000_000 + i))
        await client.close()

    await asyncio.gather(*(one(k) for k in range(connections)))


def measure(tree: Path, count: int, connections: int) -> tuple[float, float]:
    """(engine CPU microseconds per message, messages per second) for the engine of ``tree``."""
    work = Path(tempfile.mkdtemp(prefix="sluice-cpu-"))
    try:
        port = free_port()
        cfg = write_config(
            work,
            channels={"c": basic_channel(port)},
            destinations={"out": {"kind": "file", "directory": str(work / "out"), "fsync": False}},
            processing={"workers": 1},
        )
        env = dict(os.environ, SLUICE_PURE_PYTHON="1", SLUICE_ADMIN_PORT="0")
        with open(work / "engine.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "engine.cli", "run", "--config", str(cfg)],
                cwd=str(tree),
                env=env,
                stdout=log,
                stderr=log,
            )
            try:
                for _ in range(600):
                    try:
                        socket.create_connection(("127.0.0.1", port), 0.2).close()
                        break
                    except OSError:
                        time.sleep(0.05)
                asyncio.run(send(port, 300, 10))  # warm-up
                c0, t0 = cpu_seconds(proc.pid), time.monotonic()
                asyncio.run(send(port, count, connections))
                c1, t1 = cpu_seconds(proc.pid), time.monotonic()
            finally:
                proc.terminate()
                proc.wait(30)
        return (c1 - c0) / count * 1e6, count / (t1 - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--before", type=Path, required=True, help="the other tree (a copy of the code to compare)"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--count", type=int, default=3000)
    ap.add_argument("--connections", type=int, default=10)
    ap.add_argument("--json", type=Path, default=RESULTS / "intake_cpu_ab.json")
    args = ap.parse_args()
    runs = []
    for r in range(args.rounds):
        for label, tree in (("before", args.before), ("after", ROOT)):
            us, rate = measure(tree, args.count, args.connections)
            runs.append(
                {"round": r + 1, "tree": label, "cpu_us_per_message": round(us, 1), "msg_per_s": round(rate)}
            )
            print(runs[-1], flush=True)
    load = os.getloadavg()
    out = {"method": __doc__.split("\n\n")[1].replace("\n", " "), "load_average": load, "runs": runs}
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
