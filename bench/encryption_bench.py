"""What store encryption costs (issue #12): the engine with ``store_encryption`` off and on, side by side.

Runs the real engine (``sluice run``) through ``bench/engine_bench.py``, alternating off and on (off-on, then
on-off, ...) so that drift in the machine's load hits both alike, and reports the median of the rounds:

* intake: 1 connection and 50 connections flat out (SQLite, commit before ACK, passthrough to files):
  CPU microseconds the engine process spends per acknowledged message, msg/s and ACK latency;
* end to end: ADT^A01 → ``hl7-to-fhir`` → file destination over 50 connections: intake msg/s, bundles
  delivered per second, and CPU ms per delivered message (engine process + worker processes);
* the crypto itself: microseconds to seal and open a message body, an ACK and a FHIR bundle, and the sum
  one message costs on its way through (seal body and ACK at intake, open the body in the worker, seal the
  bundle there, open body and bundle at delivery);
* instructions per message of the engine process's intake path (checks, durable commit, ACK), off and on,
  counted with valgrind's callgrind (``--only-instructions`` runs just that).

    python bench/encryption_bench.py                    # 3 rounds; bench/results/encryption.json
    python bench/encryption_bench.py --rounds 5 --seconds 10 --count 10000

CPU per message is the figure to compare: msg/s and latency move with whatever else the machine runs,
CPU time per message hardly does. Nothing here is a test: figures go to the JSON file and stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
import timeit
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import engine_bench as eb  # noqa: E402

from engine import keyring, native, payloads  # noqa: E402
from tests.support.engine import basic_channel  # noqa: E402


def crypto_micro() -> dict[str, Any]:
    """Microseconds per seal/open of the values one ADT^A01 produces (body, ACK, its FHIR bundle)."""
    import orjson
    from mllp_load import TEMPLATES  # the synthetic ~1.6 KB ADT^A01 the load generator sends

    from engine.hl7 import parse_bytes
    from transforms.convert import convert
    from transforms.settings import ConvertSettings

    prefix, suffix = TEMPLATES["adt-a01"]
    raw = prefix + b"BENCH000000000001" + suffix
    ack = b"MSH|^~\\&|SL|HOSP|EHR|NORTH|20250101120000+0000||ACK^A01^ACK|6b1316641048000001|P|2.5.1\rMSA|AA|BENCH1\r"
    bundle = orjson.dumps(convert(parse_bytes(raw), ConvertSettings(derive_unknown_systems=True)))
    packed = payloads.pack(bundle)
    ring = keyring.KeyRing([keyring.new_key()])
    out: dict[str, Any] = {
        "sizes": {"raw": len(raw), "ack": len(ack), "bundle": len(bundle), "packed": len(packed)}
    }
    n = 20000
    for name, value, purpose in (
        ("raw", raw, keyring.RAW),
        ("ack", ack, keyring.ACK),
        ("bundle", packed, keyring.PAYLOAD),
    ):
        sealed = ring.seal(value, purpose)
        seal = min(timeit.repeat(lambda v=value, p=purpose: ring.seal(v, p), number=n, repeat=5)) / n
        opened = (
            min(timeit.repeat(lambda s=sealed, p=purpose: keyring.unseal(ring, s, p), number=n, repeat=5)) / n
        )
        out[name] = {"seal_us": round(seal * 1e6, 2), "open_us": round(opened * 1e6, 2)}
    per_message = (
        out["raw"]["seal_us"]  # intake
        + out["ack"]["seal_us"]
        + out["raw"]["open_us"]  # the worker reads the body
        + out["bundle"]["seal_us"]  # the worker seals the bundle
        + out["raw"]["open_us"]  # delivery loads body and payload
        + out["bundle"]["open_us"]
    )
    out["per_message_us"] = round(per_message, 2)
    return out


KEY = keyring.Key("bench", bytes(range(32)))  # a fixed synthetic key: instruction counts repeat exactly


def intake_loop(encrypted: bool, n: int, order_by: str | None = None) -> None:
    """``n`` messages through the engine process's intake path as the listener drives it: checks, the
    durable group commit (SQLite, synchronous=FULL; bodies and ACKs sealed when ``encrypted``), the ACK.
    ``order_by``: the channel's (with a patient-search key, as the engine runs it).
    Run under callgrind by :func:`instructions` (instruction counts do not move with the machine's load)."""
    import asyncio
    import tempfile

    from mllp_load import PREFIX, SUFFIX

    from engine import logs
    from engine.config import ChannelConfig, SourceConfig
    from engine.intake import Committer, Intake, _msa1
    from engine.store import Store

    logs.configure("json", "info")
    work = Path(tempfile.mkdtemp(prefix="sluice-enc-loop-"))
    store = Store(f"sqlite:///{work}/loop.db", keys=keyring.KeyRing([KEY]) if encrypted else None)
    committer = Committer(store)
    committer.start()
    channel = ChannelConfig(
        name="c", file="c.yaml", source=SourceConfig(), types={"ADT": ()}, order_by=order_by
    )
    intake = Intake(channel, committer, patient_key=bytes(32) if order_by else None)

    async def go() -> None:
        for i in range(n):
            acks = await intake.handle(PREFIX + b"LOOP%08d" % i + SUFFIX, "127.0.0.1:1")
            assert acks and _msa1(acks[0]) == "CA"

    asyncio.run(go())
    committer.stop()
    store.close()
    shutil.rmtree(work, ignore_errors=True)


def callgrind_instructions(args: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None) -> int:
    """Instructions valgrind's callgrind counts for ``python ARGS`` (AssertionError if it does not say)."""
    import re
    import subprocess

    valgrind = shutil.which("valgrind")
    assert valgrind is not None, "valgrind is not installed"
    cmd = [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=True)
    m = re.search(r"Collected : (\d+)", proc.stderr)
    assert m is not None, proc.stderr[-2000:]
    return int(m.group(1))


def instructions(small: int = 300, large: int = 1300) -> dict[str, Any]:
    """Instructions per message of :func:`intake_loop`, encryption off and on (valgrind callgrind):
    (Ir(large) - Ir(small)) / (large - small) cancels the interpreter's start-up."""
    if shutil.which("valgrind") is None:
        return {"skipped": "valgrind is not installed"}
    per: dict[str, float] = {}
    for side in ("off", "on"):
        ir = [
            callgrind_instructions(
                [str(Path(__file__).resolve()), "--intake-loop", side, "--messages", str(n)]
            )
            for n in (small, large)
        ]
        per[side] = (ir[1] - ir[0]) / (large - small)
        print(f"intake path, encryption {side}: {per[side]:,.0f} instructions per message", flush=True)
    return {
        "messages": [small, large],
        "instructions_per_message_off": round(per["off"]),
        "instructions_per_message_on": round(per["on"]),
        "on_vs_off_pct": round((per["on"] - per["off"]) / per["off"] * 100, 2),
    }


def _median(runs: list[dict[str, Any]], *path: str) -> float:
    vals = []
    for r in runs:
        v: Any = r
        for p in path:
            v = v[p]
        vals.append(float(v))
    return round(statistics.median(vals), 3)


def intake_once(seconds: float, connections: int, encrypted: bool) -> dict[str, Any]:
    work = eb._scratch()
    dest = {"out": {"kind": "file", "directory": str(work / "out"), "fsync": True}}
    eng = eb.start_engine(work, basic_channel(0), dest, encrypted=encrypted)
    assert eng.proc is not None
    pid = eng.proc.pid
    try:
        cpu0 = eb._cpu_seconds(pid)
        data = eb.run_load(
            eng.port, "--connections", str(connections), "--seconds", str(seconds), "--warmup", "0"
        )
        cpu = eb._cpu_seconds(pid) - cpu0  # the engine process: listener, intake checks, store writer
    finally:
        eng.stop()
    res = data["results"][0]
    return {
        "msg_per_s": res["msg_per_s"],
        "p50_ms": res["latency_ms"]["p50"],
        "p99_ms": res["latency_ms"]["p99"],
        "acked": res["acked_ok"],
        # CPU the engine process spent per acknowledged message: what encryption adds to intake, hardly
        # disturbed by other load on the machine (unlike msg/s and latency)
        "engine_cpu_us_per_msg": round(cpu * 1e6 / max(1, int(res["acked_ok"])), 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0, help="per intake run")
    ap.add_argument("--count", type=int, default=10000, help="messages per end-to-end run")
    ap.add_argument("--json", type=Path, default=eb.RESULTS / "encryption.json")
    ap.add_argument("--intake-loop", choices=["off", "on"], help=argparse.SUPPRESS)  # run under callgrind
    ap.add_argument("--messages", type=int, default=300, help=argparse.SUPPRESS)
    ap.add_argument(
        "--only-instructions", action="store_true", help="just the callgrind count of the intake path"
    )
    ap.add_argument("--only", choices=["intake", "e2e"], help="run only these engine scenarios")
    args = ap.parse_args(argv)
    if args.intake_loop:
        intake_loop(args.intake_loop == "on", args.messages)
        return 0
    if args.only_instructions:
        print(json.dumps(instructions(), indent=2))
        return 0
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        k: {"off": [], "on": []} for k in ("intake_1", "intake_50", "e2e_file")
    }
    try:
        for i in range(args.rounds):
            order = (False, True) if i % 2 == 0 else (True, False)
            for enc in order:
                key = "on" if enc else "off"
                if args.only != "e2e":
                    runs["intake_1"][key].append(intake_once(args.seconds, 1, enc))
                    runs["intake_50"][key].append(intake_once(args.seconds, 50, enc))
                if args.only != "intake":
                    runs["e2e_file"][key].append(eb.e2e("file", args.count, 50, encrypted=enc))
                print(f"round {i + 1} encryption {key}: done", flush=True)
    finally:
        if eb._SCRATCH:
            shutil.rmtree(eb._SCRATCH.pop(), ignore_errors=True)
    summary: dict[str, Any] = {}
    for scenario, metrics in (
        ("intake_1", ("engine_cpu_us_per_msg", "msg_per_s", "p50_ms", "p99_ms")),
        ("intake_50", ("engine_cpu_us_per_msg", "msg_per_s", "p50_ms", "p99_ms")),
        ("e2e_file", ("intake_msg_per_s", "delivered_per_s", "end_to_end_seconds")),
    ):
        if not runs[scenario]["off"]:
            continue  # not run (--only)
        summary[scenario] = {}
        for m in metrics:
            off, on = _median(runs[scenario]["off"], m), _median(runs[scenario]["on"], m)
            summary[scenario][m] = {
                "off": off,
                "on": on,
                "change_pct": round((on - off) / off * 100, 1) if off else None,
            }
    for r in runs["e2e_file"]["off"] + runs["e2e_file"]["on"]:
        c = r["cpu_ms_per_delivered"]
        c["total"] = round(c["engine"] + c["workers"], 3)
    for part in ("engine", "workers", "total") if runs["e2e_file"]["off"] else ():
        off = _median(runs["e2e_file"]["off"], "cpu_ms_per_delivered", part)
        on = _median(runs["e2e_file"]["on"], "cpu_ms_per_delivered", part)
        summary["e2e_file"][f"cpu_ms_per_delivered_{part}"] = {
            "off": off,
            "on": on,
            "change_pct": round((on - off) / off * 100, 1) if off else None,
        }
    report = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "load_average_at_start_and_end": None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "build": native.REASON,
        "rounds": args.rounds,
        "store": "sqlite (WAL, synchronous=FULL, commit before ACK)",
        "crypto": crypto_micro(),
        "intake_instructions": instructions(),
        "median": summary,
        "runs": runs,
    }
    report["load_average_at_start_and_end"] = [LOAD_AT_START, list(os.getloadavg())]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(
        json.dumps({"crypto_per_message_us": report["crypto"]["per_message_us"], "median": summary}, indent=2)
    )
    print(f"wrote {args.json}")
    return 0


LOAD_AT_START = list(os.getloadavg())

if __name__ == "__main__":
    raise SystemExit(main())
