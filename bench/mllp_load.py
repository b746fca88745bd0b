"""MLLP load generator: N connections, one message in flight each, every ACK checked.

Why this exists: issue 2's targets (msg/s on 1 and 50 connections, p99 ACK latency at
a fixed offered rate) need one tool that measures the engine and, in the same run, a
plain asyncio echo-ACK server (``bench/echo_server.py``) as the ceiling.

Each message is a synthetic ~1.6 KB ADT^A01 (no real data) with a unique MSH-10 (a
per-run prefix, so reruns are not deduplicated by the engine).  An ACK counts as good
when MSA-1 is AA or CA and MSA-2 equals the control id sent; anything else is a failure.

    # one scenario against a running engine
    python bench/mllp_load.py --host 127.0.0.1 --port 2575 --connections 50 --seconds 10
    # offered rate: 1000 msg/s spread over 50 connections, report p99
    python bench/mllp_load.py --port 2575 --connections 50 --seconds 10 --rate 1000
    # the standard matrix (1 conn, 50 conns, 50 conns @ 1000 msg/s) against a spawned echo server
    python bench/mllp_load.py --echo --suite --json bench/results/mllp_echo.json
    # the matrix against the engine, with the echo ceiling measured in the same run
    python bench/mllp_load.py --port 2575 --suite --compare-echo --json bench/results/mllp_engine.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.client import MLLPClient, parse_ack  # noqa: E402
from engine.errors import DeliveryError  # noqa: E402


# -- the message ---------------------------------------------------------------------------------
def _template() -> tuple[bytes, bytes]:
    """(prefix, suffix) of a synthetic ADT^A01 around MSH-10; about 1.6 KB in all."""
    ts = time.strftime("%Y%m%d%H%M%S")
    segments = [
        f"MSH|^~\\&|LOADGEN|BENCH_HOSP|SLUICE|BENCH_HOSP|{ts}||ADT^A01^ADT_A01|@CID@|P|2.5|||AL|NE|USA|UNICODE UTF-8",
        f"EVN|A01|{ts}|||OP0001^OPERATOR^TEST^^^^^^BENCH_HOSP^L^^^EI|{ts}",
        "PID|1||MRN00012345^^^BENCH_HOSP^MR~SSN000000000^^^USSSA^SS||TESTPATIENT^SYNTHETIC^Q^JR^^^L||19700101|F|||"
        "100 MAIN ST^APT 1^SPRINGFIELD^ST^00000^USA^H||^PRN^PH^^1^555^5550100|^WPN^PH^^1^555^5550101|EN^English^HL70296|"
        "S^Single^HL70002|NON^None^HL70006|ACC000123456^^^BENCH_HOSP^AN||||N^Not Hispanic^HL70189",  # PID-22
        "PD1|||BENCH CLINIC^^12345|DR0001^PHYSICIAN^TEST^A^^^MD^^^^L",
        "NK1|1|TESTCONTACT^SYNTHETIC^^^^^L|SPO^Spouse^HL70063|100 MAIN ST^APT 1^SPRINGFIELD^ST^00000^USA^H|"
        "^PRN^PH^^1^555^5550102||EC^Emergency Contact^HL70131",
        f"PV1|1|I|WARD3^301^A^BENCH_HOSP^^^^N|E^Emergency^HL70007|||DR0001^PHYSICIAN^TEST^A^^^MD^^^^L|"
        f"DR0002^REFERRER^TEST^B^^^MD^^^^L|DR0003^CONSULT^TEST^C^^^MD^^^^L|MED||||7|||DR0001^PHYSICIAN^TEST^A^^^MD^^^^L|"
        f"IP|VN000987654^^^BENCH_HOSP^VN|SP||||||||||||||||||BENCH_HOSP||A|||{ts}",
        "OBX|1|NM|8867-4^Heart rate^LN||72|/min^per minute^UCUM|60-100|N|||F",
        "OBX|2|NM|8480-6^Systolic blood pressure^LN||120|mm[Hg]^millimeter of mercury^UCUM|90-140|N|||F",
        "AL1|1|DA|PCN^Penicillin^RXNORM|SV^Severe^HL70128|Hives",
        f"DG1|1||R07.9^Chest pain, unspecified^I10||{ts}|A",
        "IN1|1|PLAN001^Synthetic Health Plan|INS0001^^^BENCH_HOSP|SYNTHETIC INSURANCE CO|PO BOX 1^^SPRINGFIELD^ST^00000^USA||"
        "^WPN^PH^^1^555^5550199|GRP0001||||||||TESTPATIENT^SYNTHETIC^Q^JR|SEL^Self^HL70063|19700101|"
        "100 MAIN ST^APT 1^SPRINGFIELD^ST^00000^USA^H|||||||||||||||||POL000111222",  # IN1-16..19, IN1-36
    ]
    text = "\r".join(segments) + "\r"
    prefix, suffix = text.split("@CID@")
    return prefix.encode(), suffix.encode()


PREFIX, SUFFIX = _template()
MESSAGE_SIZE = len(PREFIX) + len(SUFFIX) + 17


def _registration() -> tuple[bytes, bytes]:
    """(prefix, suffix) of a small ADT^A04 (~0.5 KB): Patient, Practitioner, Encounter and its Locations.

    Converts to 6 bundle entries, under the 8-entry limit the Medplum test server puts on conditional
    transactions (the full template converts to ~18), so a FHIR server run measures delivery, not refusals.
    """
    ts = time.strftime("%Y%m%d%H%M%S")
    segments = [
        f"MSH|^~\\&|LOADGEN|BENCH_HOSP|SLUICE|BENCH_HOSP|{ts}||ADT^A04^ADT_A01|@CID@|P|2.5|||AL|NE",
        f"EVN|A04|{ts}",
        "PID|1||MRN00012345^^^BENCH_HOSP^MR||TESTPATIENT^SYNTHETIC^Q^JR^^^L||19700101|F|||"
        "100 MAIN ST^APT 1^SPRINGFIELD^ST^00000^USA^H||^PRN^PH^^1^555^5550100",
        "PV1|1|O|CLINIC1^^^BENCH_HOSP|R^Routine^HL70007|||DR0001^PHYSICIAN^TEST^A^^^MD^^^^L||||||||||||"
        f"VN000987654^^^BENCH_HOSP^VN|||||||||||||||||||||BENCH_HOSP||A|||{ts}",
    ]
    text = "\r".join(segments) + "\r"
    prefix, suffix = text.split("@CID@")
    return prefix.encode(), suffix.encode()


TEMPLATES = {"adt-a01": (PREFIX, SUFFIX), "registration": _registration()}


def suffixes(patients: int, suffix: bytes = SUFFIX) -> list[bytes]:
    """The message tail for ``patients`` distinct synthetic patients (MRN and visit number vary).

    One patient (the default) is the worst case for a channel with ``order_by``: a single ordered lane.
    """
    if patients <= 1:
        return [suffix]
    return [
        suffix.replace(b"MRN00012345", b"MRN%08d" % n).replace(b"VN000987654", b"VN%09d" % n)
        for n in range(patients)
    ]


def message_pairs(message: str, patients: int) -> list[tuple[bytes, bytes]]:
    """(text before MSH-10, text after it) for each synthetic patient: a built-in template
    (``adt-a01``, ``registration``), or any type ``sluice generate`` makes (``ADT^A04``, ``ORU^R01``,
    ``SIU^S12``..., engine/synthetic.py: valid for the converter, the same bytes every run)."""
    if message in TEMPLATES:
        head, tail = TEMPLATES[message]
        return [(head, t) for t in suffixes(patients, tail)]
    from engine import synthetic

    pairs = []
    for text in synthetic.generate(message, max(1, patients), patients=patients):
        fields = text.split("|", 10)  # MSH-10 is the tenth field after the segment name (MSH-1 is the bar)
        head = "|".join(fields[:9]) + "|"
        tail = "|" + fields[10]
        pairs.append((head.encode(), tail.encode()))
    return pairs


def _message_arg(value: str) -> str:
    if value in TEMPLATES:
        return value
    from engine import synthetic

    try:
        synthetic.parse_type(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}; or one of {', '.join(sorted(TEMPLATES))}") from None
    return value.upper()


def _base36(n: int, width: int) -> str:
    digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out = ""
    while n:
        n, r = divmod(n, 36)
        out = digits[r] + out
    return out.rjust(width, "0")[-width:]


def ack_ok(ack: bytes, control_id: bytes) -> bool:
    """MSA-1 is AA or CA and MSA-2 == control_id (fast path for '|' ACKs, parse_ack otherwise)."""
    i = ack.find(b"\rMSA|")
    if i >= 0:
        end = ack.find(b"\r", i + 1)
        fields = ack[i + 1 : end if end >= 0 else len(ack)].split(b"|")
        if len(fields) > 2:
            return fields[1] in (b"AA", b"CA") and fields[2] == control_id
    info = parse_ack(ack)
    return info.code in ("AA", "CA") and info.control_id == control_id.decode("latin-1")


# -- one run -------------------------------------------------------------------------------------
@dataclass
class Result:
    target: str
    scenario: str
    connections: int
    seconds: float
    rate: float | None
    sent: int = 0
    acked_ok: int = 0
    failures: int = 0  # ACK received but wrong code or MSA-2
    errors: int = 0  # timeouts, connection errors
    behind_schedule: int = 0  # rate mode: sends that started > 1 ms after their slot
    msg_per_s: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    first_failure: str = ""


def percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {}
    s = sorted(samples)

    def pick(q: float) -> float:
        return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 3)

    return {
        "p50": pick(0.50),
        "p90": pick(0.90),
        "p99": pick(0.99),
        "p999": pick(0.999),
        "max": round(s[-1] * 1000, 3),
        "mean": round(sum(s) / len(s) * 1000, 3),
    }


async def run_load(
    host: str,
    port: int,
    *,
    connections: int,
    seconds: float,
    count: int | None = None,
    rate: float | None = None,
    warmup: float = 1.0,
    ack_timeout: float = 30.0,
    target: str = "",
    scenario: str = "",
    patients: int = 1,
    template: str = "adt-a01",
) -> Result:
    """Drive ``connections`` clients; measure for ``seconds`` (or until ``count`` messages)."""
    result = Result(target or f"{host}:{port}", scenario, connections, seconds, rate)
    run_id = _base36(time.time_ns() // 1_000_000, 6)
    latencies: list[float] = []
    state = {"measuring": False, "stop": False, "sent": 0}
    clients = [MLLPClient(host, port, ack_timeout=ack_timeout) for _ in range(connections)]
    await asyncio.gather(*(c.connect() for c in clients))
    interval = connections / rate if rate else 0.0
    perf = time.perf_counter
    pairs = message_pairs(template, patients)

    async def worker(k: int, client: MLLPClient) -> None:
        seq = 0
        slot = perf() + (interval * k / connections if interval else 0.0)
        prefix = (run_id + f"{k:03d}").encode()
        while not state["stop"]:
            if interval:
                delay = slot - perf()
                if delay > 0:
                    await asyncio.sleep(delay)
                elif delay < -0.001 and state["measuring"]:
                    result.behind_schedule += 1
                slot += interval
            seq += 1
            cid = prefix + b"%08d" % seq
            measuring = state["measuring"]
            t0 = perf()
            try:
                head, tail = pairs[(k * 7919 + seq) % len(pairs)]
                ack = await client.send(head + cid + tail)
            except DeliveryError as exc:
                if measuring:
                    result.errors += 1
                    result.first_failure = result.first_failure or str(exc)
                await asyncio.sleep(0.05)
                continue
            t1 = perf()
            if not measuring:
                continue
            result.sent += 1
            if ack_ok(ack, cid):
                result.acked_ok += 1
                latencies.append(t1 - t0)
            else:
                result.failures += 1
                if not result.first_failure:
                    info = parse_ack(ack)
                    result.first_failure = (
                        f"ACK {info.code} for {info.control_id!r} (sent {cid.decode()}): {info.text}"
                    )
            if count is not None and result.sent >= count:
                state["stop"] = True

    tasks = [asyncio.create_task(worker(k, c)) for k, c in enumerate(clients)]
    try:
        await asyncio.sleep(warmup)
        state["measuring"] = True
        start = perf()
        if count is None:
            await asyncio.sleep(seconds)
            state["stop"] = True
        else:
            while not state["stop"] and perf() - start < seconds:
                await asyncio.sleep(0.05)
            state["stop"] = True
        elapsed = perf() - start
        state["measuring"] = False
        await asyncio.wait(tasks, timeout=ack_timeout + 1)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    result.seconds = round(elapsed, 3)
    result.msg_per_s = round(result.acked_ok / elapsed, 1) if elapsed else 0.0
    result.latency_ms = percentiles(latencies)
    return result


# -- the framer alone ---------------------------------------------------------------------------
def bench_framer(seconds: float = 1.0) -> dict[str, dict[str, float]]:
    """frames/s of engine.mllp.Framer for typical read patterns (no sockets, one core)."""
    from engine import mllp

    frame = mllp.encode(PREFIX + b"0" * 17 + SUFFIX)
    batch = frame * 1000
    segments = [frame[i : i + 1460] for i in range(0, len(frame), 1460)]  # TCP MSS-sized reads
    patterns: dict[str, tuple[list[bytes], int]] = {
        "one-frame-per-read": ([frame], 1),
        "1000-frames-per-read": ([batch], 1000),
        "mss-sized-reads": (segments, 1),
        "one-byte-reads": ([bytes((b,)) for b in frame], 1),
    }
    out: dict[str, dict[str, float]] = {}
    for name, (reads, per_round) in patterns.items():
        framer = mllp.Framer()
        frames = 0
        deadline = time.perf_counter() + seconds
        start = time.perf_counter()
        while time.perf_counter() < deadline:
            for _ in range(50):
                for chunk in reads:
                    framer.receive_data(chunk, 0.0)
                    while framer.next_event() is not mllp.NEED_DATA:
                        frames += 1
        elapsed = time.perf_counter() - start
        assert frames % per_round == 0
        out[name] = {
            "frames_per_s": round(frames / elapsed),
            "mb_per_s": round(frames * len(frame) / elapsed / 1e6, 1),
            "us_per_frame": round(elapsed / frames * 1e6, 3),
        }
        print(f"[framer] {name}: {out[name]['frames_per_s']:,} frames/s ({out[name]['mb_per_s']} MB/s)")
    return out


# -- echo server subprocess and the standard matrix ----------------------------------------------
class EchoServer:
    """bench/echo_server.py in its own process (so it gets its own core)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def __enter__(self) -> EchoServer:
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "echo_server.py"), "--port", "0"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            self.proc.kill()
            raise RuntimeError(f"echo server did not start: {line!r}")
        self.port = int(line.rsplit(":", 1)[1])
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


SUITE: list[tuple[str, int, float | None]] = [
    ("1-connection", 1, None),
    ("50-connections", 50, None),
    ("50-connections@1000/s", 50, 1000.0),
]


def scenarios(args: argparse.Namespace) -> list[tuple[str, int, float | None]]:
    if args.suite:
        return SUITE
    name = f"{args.connections}-connection{'s' if args.connections != 1 else ''}"
    if args.rate:
        name += f"@{args.rate:g}/s"
    return [(name, args.connections, args.rate)]


async def run_matrix(args: argparse.Namespace, host: str, port: int, target: str) -> list[Result]:
    out = []
    for name, conns, rate in scenarios(args):
        r = await run_load(
            host,
            port,
            connections=conns,
            seconds=args.seconds,
            count=args.count,
            rate=rate,
            warmup=args.warmup,
            ack_timeout=args.ack_timeout,
            target=target,
            scenario=name,
            patients=args.patients,
            template=args.message,
        )
        print(summary(r), flush=True)
        out.append(r)
    return out


def summary(r: Result) -> str:
    lat = r.latency_ms
    rate = f" offered {r.rate:g}/s" if r.rate else ""
    behind = f" behind-schedule={r.behind_schedule}" if r.rate else ""
    text = (
        f"[{r.target}] {r.scenario}:{rate} {r.msg_per_s:,.0f} msg/s over {r.seconds:.1f}s; "
        f"ACK p50 {lat.get('p50', 0):.2f} ms p99 {lat.get('p99', 0):.2f} ms max {lat.get('max', 0):.2f} ms; "
        f"ok={r.acked_ok} failures={r.failures} errors={r.errors}{behind}"
    )
    if r.first_failure:
        text += f"\n    first failure: {r.first_failure}"
    return text


def machine() -> dict[str, Any]:
    loop = type(asyncio.get_event_loop_policy()).__module__.split(".")[0]
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "event_loop": "uvloop" if loop == "uvloop" else "asyncio",
        "message_bytes": MESSAGE_SIZE,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


async def amain(args: argparse.Namespace) -> list[Result]:
    results: list[Result] = []
    if args.echo or args.compare_echo:
        with EchoServer() as echo:
            results += await run_matrix(args, "127.0.0.1", echo.port, "echo-server")
    if not args.echo:
        results += await run_matrix(args, args.host, args.port, f"{args.host}:{args.port}")
    return results


def main() -> None:
    p = argparse.ArgumentParser(description="MLLP load generator (see bench/README.md)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=2575)
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--seconds", type=float, default=10.0, help="measured duration (after warm-up)")
    p.add_argument("--count", type=int, help="stop after this many measured messages (or --seconds)")
    p.add_argument(
        "--rate", type=float, help="offered rate in msg/s over all connections (default: flat out)"
    )
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured load first")
    p.add_argument("--ack-timeout", type=float, default=30.0)
    p.add_argument("--echo", action="store_true", help="measure a spawned bench/echo_server.py instead")
    p.add_argument("--compare-echo", action="store_true", help="also measure the echo server, same run")
    p.add_argument("--suite", action="store_true", help="run 1 conn, 50 conns, 50 conns @ 1000/s")
    p.add_argument("--uvloop", action="store_true", help="use uvloop if installed")
    p.add_argument("--patients", type=int, default=1, help="distinct synthetic patients (MRN, visit number)")
    p.add_argument(
        "--message",
        type=_message_arg,
        default="adt-a01",
        help="which synthetic message: adt-a01, registration, or a type `sluice generate` makes (ORU^R01...)",
    )
    p.add_argument("--framer", action="store_true", help="also benchmark the sans-IO framer alone")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    if args.uvloop:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            print("uvloop is not installed; using asyncio's default loop", file=sys.stderr)
    framer = bench_framer() if args.framer else None
    results = asyncio.run(amain(args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc: dict[str, Any] = {"machine": machine(), "results": [asdict(r) for r in results]}
        if framer is not None:
            doc["framer"] = framer
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        tmp.replace(args.json)
        print(f"wrote {args.json}")
    if any(r.failures or r.errors for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
