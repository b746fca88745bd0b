"""Long fuzz run over the whole intake path: MLLP framer → HL7 parser → Intake.decide → FHIR conversion.

    .venv/bin/python bench/fuzz_long.py                   # 10 minutes, hypothesis
    .venv/bin/python bench/fuzz_long.py --seconds 3600    # longer
    .venv/bin/python bench/fuzz_long.py --atheris         # coverage-guided, if atheris is installed

Contract checked on every input (see tests/fuzz/): the framer raises only FramingError; parse/decode only
SluiceError; ``Intake.decide`` never raises and every ACK it builds is an HL7 message that can be framed;
``transforms.convert._convert`` (no safety net) raises only SluiceError.  Any other exception is a bug:
the input is written to ``bench/results/fuzz-crashes/<target>-<exception>-<file>-<line>.bin`` (one file
per distinct crash site) and a summary to ``bench/results/fuzz-crashes/summary.json``.  Inputs are
synthetic (mutations of the corpus in tests/fuzz); nothing is sent over the network.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import hl7  # noqa: E402
from engine.errors import FramingError, SluiceError  # noqa: E402
from engine.intake import split_acks  # noqa: E402
from engine.mllp import NEED_DATA, Closed, Frame, Framer  # noqa: E402
from tests.fuzz import test_convert_fuzz as conv_fuzz  # noqa: E402
from tests.fuzz import test_parser_fuzz as parser_fuzz  # noqa: E402
from transforms.convert import _convert  # noqa: E402

OUT = ROOT / "bench" / "results" / "fuzz-crashes"


class Crashes:
    def __init__(self) -> None:
        self.sites: dict[str, dict[str, Any]] = {}
        self.inputs = 0

    def record(self, target: str, data: bytes, exc: BaseException) -> None:
        tb = traceback.extract_tb(exc.__traceback__)
        frame = tb[-1] if tb else None
        where = f"{Path(frame.filename).name}-{frame.lineno}" if frame else "unknown"
        key = f"{target}-{type(exc).__name__}-{where}"
        site = self.sites.setdefault(key, {"count": 0, "message": str(exc)[:300], "file": ""})
        site["count"] += 1
        if not site["file"]:
            OUT.mkdir(parents=True, exist_ok=True)
            path = OUT / f"{key}.bin"
            path.write_bytes(data)
            site["file"] = str(path.relative_to(ROOT))
            site["sha1"] = hashlib.sha1(data).hexdigest()
            site["traceback"] = "".join(traceback.format_exception(exc))[-3000:]
            print(f"NEW CRASH {key}: {str(exc)[:120]!r} -> {path}", flush=True)

    def write_summary(self, seconds: float, engine: str) -> None:
        OUT.mkdir(parents=True, exist_ok=True)
        summary = {
            "engine": engine,
            "seconds": round(seconds, 1),
            "inputs": self.inputs,
            "crashes": self.sites,
        }
        (OUT / "summary.json").write_text(json.dumps(summary, indent=2))


CRASHES = Crashes()
INTAKES = parser_fuzz.INTAKES
SETTINGS = conv_fuzz.SETTINGS


def one_input(data: bytes) -> None:
    """Run every target on one input; record anything outside the contract."""
    CRASHES.inputs += 1
    if not data:
        return
    # 1. framer: the input as a stream, split at a data-derived point, then EOF.
    frames: list[bytes] = []
    cut = data[0] % (len(data) + 1)
    try:
        f = Framer(max_frame=4096, max_junk=4096, lenient_end=bool(data[-1] & 1))
        for chunk in [*(c for c in (data[:cut], data[cut:]) if c), b""]:  # b"" = EOF, last
            f.receive_data(chunk, now=0.0)
            while True:
                ev = f.next_event()
                if ev is NEED_DATA or isinstance(ev, Closed):
                    break
                if isinstance(ev, Frame):
                    assert b"\x0b" not in ev.payload and b"\x1c" not in ev.payload, (
                        "frame holds a framing byte"
                    )
                    frames.append(ev.payload)
    except FramingError:
        pass
    except Exception as exc:
        CRASHES.record("framer", data, exc)
    # 2. parser (the raw input too, not only framed payloads)
    for payload in [data.replace(b"\x0b", b"").replace(b"\x1c", b""), *frames[:4]]:
        msg = None
        try:
            msg = hl7.parse_bytes(payload, "latin-1")
            parser_fuzz.exercise(msg)
        except SluiceError:
            pass
        except Exception as exc:
            CRASHES.record("parser", payload, exc)
        # 3. intake decision
        for i, intake in enumerate(INTAKES):
            try:
                jobs, immediate = intake.decide(payload, "fuzz")
                acks = split_acks(immediate) + [a for j in jobs for a in split_acks(j.row.ack)]
                for a in acks:
                    if not a.startswith(b"MSH") or b"\x0b" in a or b"\x1c" in a:
                        raise AssertionError(f"bad ACK from intake {i}: {a[:80]!r}")
            except Exception as exc:
                CRASHES.record(f"intake{i}", payload, exc)
        # 4. conversion without the safety net
        if msg is not None:
            for settings in SETTINGS:
                try:
                    _convert(msg, settings)
                except SluiceError:
                    pass
                except Exception as exc:
                    CRASHES.record("convert", payload, exc)


def run_hypothesis(seconds: float) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    stop_at = time.monotonic() + seconds

    class _Done(BaseException):  # not an Exception: hypothesis stops at once instead of shrinking it
        pass

    inputs = st.one_of(
        parser_fuzz.payloads,
        conv_fuzz.mutated().map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.lists(st.one_of(parser_fuzz.payloads, conv_fuzz.mutated().map(str.encode)), max_size=4).map(
            lambda ps: b"junk" + b"".join(b"\x0b" + p + b"\x1c\x0d" for p in ps)
        ),
    )

    @settings(
        max_examples=10**9,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        derandomize=False,
    )
    @given(inputs)
    def loop(data: bytes) -> None:
        if time.monotonic() > stop_at:
            raise _Done
        one_input(data)

    with contextlib.suppress(_Done):
        loop()


def run_atheris(seconds: float) -> None:
    import atheris

    stop_at = time.monotonic() + seconds

    def target(data: bytes) -> None:
        if time.monotonic() > stop_at:
            raise SystemExit(0)
        one_input(data)

    corpus_dir = OUT.parent / "fuzz-corpus"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(parser_fuzz.CORPUS):
        (corpus_dir / f"seed{i}.hl7").write_bytes(b"\x0b" + c + b"\x1c\x0d")
    atheris.Setup([sys.argv[0], str(corpus_dir)], target)
    atheris.Fuzz()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--atheris", action="store_true", help="use atheris (coverage-guided) if installed")
    args = ap.parse_args()
    t0 = time.monotonic()
    engine = "hypothesis"
    try:
        if args.atheris:
            try:
                import atheris  # noqa: F401

                engine = "atheris"
            except ImportError:
                print("atheris is not installed; using hypothesis", file=sys.stderr)
        if engine == "atheris":
            run_atheris(args.seconds)
        else:
            run_hypothesis(args.seconds)
    finally:
        CRASHES.write_summary(time.monotonic() - t0, engine)
    print(
        f"{CRASHES.inputs} inputs in {time.monotonic() - t0:.0f}s, {len(CRASHES.sites)} distinct crash site(s)"
    )
    for key, site in CRASHES.sites.items():
        print(f"  {key}: {site['count']}x  {site['file']}  {site['message'][:100]!r}")
    return 1 if CRASHES.sites else 0


if __name__ == "__main__":
    raise SystemExit(main())
