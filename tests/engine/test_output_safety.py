"""Nothing unescaped leaves the engine (issue #12): header values reach reasons, ACK error text and log
fields only once validated; CLI tables and console logs escape control characters; worker processes
log with the engine's settings."""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner

from engine import hl7, logs, redact
from engine import store as st
from engine.cli import main
from engine.client import MLLPClient
from engine.config import ChannelConfig, SourceConfig
from engine.errors import MessageContentError
from engine.intake import Intake
from tests.support.engine import EngineProcess, fhir_channel, free_port, write_config
from tests.support.polling import wait_for

SECRET = "Quorthvexil"  # a synthetic "patient name" a sender misplaced in a header field

CH = ChannelConfig(
    name="t", file="channels/t.yaml", source=SourceConfig(), types={"ADT": ("A01", "A08"), "ZPH": ()}
)


def msh(
    *, mtype: str = "ADT^A01", pid: str = "P", version: str = "2.5.1", charset: str = "", latin1: bool = False
) -> bytes:
    """``latin1``: a Latin-1 name (a byte outside ASCII that is no UTF-8), so an unknown MSH-18 is AE 103
    (ASCII bytes under an unknown MSH-18 are read as ASCII)."""
    return (
        f"MSH|^~\\&|EHR|NORTH|SL|HOSP|20250101120000||{mtype}|C1|{pid}|{version}||||||{charset}\r"
        f"PID|1||P1^^^NORTH^MR||{'Müller' if latin1 else 'Testpatient'}^Alex\r"
    ).encode("latin-1" if latin1 else "utf-8")


def decide(payload: bytes) -> tuple[str, bytes]:
    jobs, immediate = Intake(CH, None).decide(payload, "test")  # type: ignore[arg-type]
    assert jobs, immediate
    row = jobs[0].row
    assert row.ack is not None
    return row.reason, row.ack


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        pytest.param(
            msh(mtype=f"{SECRET}^A01"), "message type invalid (11 characters) is not accepted", id="type"
        ),
        pytest.param(
            msh(mtype=f"ADT^{SECRET}"), "trigger event ADT^invalid (11 characters) is not", id="trigger"
        ),
        pytest.param(
            msh(pid=SECRET), "processing id invalid (11 characters) is not accepted", id="processing-id"
        ),
        pytest.param(
            msh(version=SECRET), "HL7 version invalid (11 characters) is not accepted", id="version"
        ),
        pytest.param(
            msh(charset=SECRET.upper(), latin1=True),
            "unsupported character set in MSH-18: invalid (11 characters)",
            id="charset",
        ),
    ],
)
def test_reasons_and_ack_text_quote_no_unvalidated_header_value(payload: bytes, reason: str) -> None:
    got, ack = decide(payload)
    assert reason in got
    assert SECRET.lower() not in got.lower()
    err = [seg for seg in ack.decode().split("\r") if seg.startswith("ERR")]
    assert err and SECRET.lower() not in err[0].lower()  # the ERR text going back is the same reason


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        pytest.param(msh(mtype="ORU^R01"), "message type ORU is not accepted by channel t", id="known-type"),
        pytest.param(msh(mtype="ADT^A04"), "trigger event ADT^A04 is not accepted", id="known-trigger"),
        pytest.param(msh(pid="X"), "processing id invalid (1 characters)", id="unknown-processing-id"),
        pytest.param(msh(version="2.4"), "", id="accepted"),
        pytest.param(msh(version="3.0"), "HL7 version invalid (3 characters)", id="unknown-version"),
        pytest.param(
            msh(charset="UNICODE UTF-16", latin1=True),
            "unsupported character set in MSH-18: UNICODE UTF-16",
            id="known-charset",
        ),
        pytest.param(msh(charset="UNICODE UTF-16"), "", id="known-charset-ascii-bytes"),
    ],
)
def test_known_codes_are_still_named(payload: bytes, reason: str) -> None:
    got, _ = decide(payload)
    assert got.startswith(reason) if reason else got == ""


def test_charset_reason_from_the_parser() -> None:
    with pytest.raises(MessageContentError) as exc:
        hl7.decode(msh(charset=f"{SECRET}^X", latin1=True))
    assert SECRET.upper() not in str(exc.value).upper() and "invalid (" in str(exc.value)


def test_charset_warnings_quote_no_unvalidated_msh18() -> None:
    """ASCII bytes under an unknown MSH-18 are accepted: the warning kept with them names no misplaced value."""
    raw = msh(charset=f"{SECRET}^X")
    reason, ack = decide(raw)
    assert reason == "" and b"MSA|AA" in ack
    unknown = hl7.decode_warning(raw, False)
    assert (
        unknown is not None and unknown[0] == "charset_unknown" and "(invalid (13 characters))" in unknown[1]
    )
    utf8 = msh(charset=SECRET).replace(b"Testpatient", "Núñez".encode())
    fallback = hl7.decode_warning(utf8, True)
    assert (
        fallback is not None
        and fallback[0] == "charset_fallback"
        and "(invalid (11 characters))" in fallback[1]
    )
    for _kind, text in (unknown, fallback):
        assert SECRET.upper() not in text.upper()


def test_printable_escapes_every_control_and_reordering_character() -> None:
    assert redact.printable("A\nB\r\tC\x1b[2J\x00\x7f\x9b\u202e\u2028") == (
        "A\\nB\\r\\tC\\x1b[2J\\x00\\x7f\\x9b\\u202e\\u2028"
    )
    assert redact.printable("MSH|a\nPID|b\x1b", keep="\n") == "MSH|a\nPID|b\\x1b"
    assert redact.printable("plain ascii and ümlauts") == "plain ascii and ümlauts"
    assert redact.control_id("MSG-0001") == "MSG-0001"
    assert redact.control_id("X\n1") == "invalid (3 characters)"
    assert redact.type_and_trigger("ADT", "A01") == "ADT^A01"
    assert redact.type_and_trigger(SECRET, "") == "invalid (11 characters)^"


def test_console_log_escapes_control_characters() -> None:
    buf = io.StringIO()
    logs.configure("console", "info")
    try:
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=buf))
        structlog.get_logger("t").info("message_stored", control_id="A\n2026-01-01 [error] fake\x1b[31m")
    finally:
        logs.configure("console", "info")
    out = buf.getvalue()
    assert out.count("\n") == 1 and "\x1b" not in out and "A\\n2026-01-01" in out
    buf.truncate(0)
    structlog.get_logger("t").info("message_stored", control_id="\x1b]0;owned\x07")  # no space, no quote
    assert "\x1b" not in buf.getvalue() and "\x07" not in buf.getvalue()


def _hostile_store(tmp_path: Path) -> Path:
    """A config and a store holding messages whose header fields carry newlines, tabs and escapes."""
    cfg = write_config(
        tmp_path,
        channels={"c": fhir_channel(free_port(), "out")},
        destinations={"out": {"kind": "file", "directory": str(tmp_path / "out")}},
    )
    s = st.Store(f"sqlite:///{tmp_path}/sluice.db")
    evil = "C1\n99\t2026-01-01 00:00:00\tc\tADT^A01\tFAKE\tprocessed\x1b]0;owned\x07\x1b[2J"
    with s.write() as conn:
        (mid,) = s.insert_messages(
            conn,
            [
                st.NewMessage(
                    "c",
                    time.time(),
                    "peer",
                    b"MSH|^~\\&|A|B|C|D|20250101||ADT^A01|X|P|2.5\rPID|1||1||Name\x1b[2J\r",
                    control_id=evil,
                    message_type="ADT\x1b[1m",
                    trigger="A01",
                    status=st.ERROR,
                    reason="bad\nline\x1b[31m",
                )
            ],
        )
        s.add_deliveries(conn, mid, "c", "", [st.NewDelivery("out\x1b[5m", b"{}", "application/json")])
        conn.exec_driver_sql("UPDATE deliveries SET status = 'dead', last_error = 'down\r\nX-Fake: 1\x1b[0m'")
    s.close()
    return cfg


def test_cli_tables_escape_stored_control_characters(tmp_path: Path) -> None:
    cfg = _hostile_store(tmp_path)
    runner = CliRunner()
    for args in (
        ["messages", "list"],
        ["messages", "show", "1"],
        ["messages", "show", "1", "--show-phi"],
        ["dead-letter", "list"],
        ["replay", "--id", "1", "--dry-run"],
    ):
        res = runner.invoke(main, [*args, "--config", str(cfg)])
        assert res.exit_code == 0, (args, res.output)
        assert "\x1b" not in res.output and "\x07" not in res.output, args
        assert "\r" not in res.output, args
        if args[-1] == "list":
            rows = res.output.splitlines()
            # messages: the header row and the one message; dead letters: its two; no fake row
            assert len(rows) == 2, res.output
            assert all(len(r.split("\t")) == len(rows[0].split("\t")) for r in rows)  # no fake column
            assert "C1\\n99\\t2026" in res.output
    shown = runner.invoke(main, ["messages", "show", "1", "--show-phi", "--config", str(cfg)]).output
    assert "PID|1||1||Name\\x1b[2J" in shown  # content: one segment a line, escapes shown, not run
    listed = runner.invoke(main, ["messages", "list", "--json", "--config", str(cfg)]).output
    assert json.loads(listed)["control_id"].startswith("C1\n99")  # JSON carries the value, escaped by JSON


def test_worker_processes_log_json_like_the_engine(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(
        tmp_path,
        channels={"c": fhir_channel(port, "out")},
        destinations={"out": {"kind": "file", "directory": str(tmp_path / "out")}},
        processing={"workers": 2},
    )
    cfg.write_text(cfg.read_text().replace("format: json", "format: console"))
    engine = EngineProcess(cfg, port, args=["--log-format", "json"])
    bad = (
        "MSH|^~\\&|EHR|NORTH|SL|HOSP|20250101120000||ADT^A01|W1|P|2.5.1\rEVN|A01|20250101\r"
        f"PID|1||||{SECRET}^Alex\r"  # no patient identifier: the conversion fails in a worker process
    ).encode()

    async def send() -> None:
        c = MLLPClient("127.0.0.1", port)
        try:
            await c.send(bad)
        finally:
            await c.close()

    with engine:
        asyncio.run(send())
        wait_for(
            lambda: "processing_failed" in engine.log.read_text(), what="the worker's processing_failed line"
        )
    # every line is JSON but the one-line notice each process prints on stderr when it runs the pure-Python
    # build of a compiled module (engine/native.py), which is no log line
    lines = [
        ln
        for ln in engine.log.read_text().splitlines()
        if ln.strip() and not ln.startswith("sluice: pure Python")
    ]
    events = [json.loads(ln) for ln in lines]  # every line, the workers' too, is JSON
    assert any(e["event"] == "processing_failed" and e.get("control_id") == "W1" for e in events)
    assert SECRET not in engine.log.read_text()


def test_engine_log_and_ack_carry_no_phi_from_msh9_or_msh18(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(
        tmp_path,
        channels={"c": fhir_channel(port, "out")},
        destinations={"out": {"kind": "file", "directory": str(tmp_path / "out")}},
        processing={"workers": 0},
    )
    messages = [
        msh(mtype=f"{SECRET}^A01"),
        msh(charset=SECRET.upper(), latin1=True),
        msh(mtype=f"ADT^{SECRET[:3].upper()}"),
    ]

    async def send() -> list[bytes]:
        c = MLLPClient("127.0.0.1", port)
        try:
            return [await c.send(m) for m in messages]
        finally:
            await c.close()

    s = st.Store(f"sqlite:///{tmp_path}/sluice.db")
    with EngineProcess(cfg, port) as engine:
        acks = asyncio.run(send())
        # the channel accepts any ADT trigger; the converter then fails the third message on it
        wait_for(
            lambda: s.list_messages()[0].status == st.ERROR, what="the third message failed in processing"
        )
    assert [a.split(b"\r")[1][:6] for a in acks] == [b"MSA|AR", b"MSA|AE", b"MSA|AA"]
    for ack in acks[:2]:
        assert SECRET.lower().encode() not in ack.lower()
    log = engine.log.read_text()
    assert SECRET.lower() not in log.lower() and SECRET[:3].upper() not in log
    assert "invalid (10 characters)^A01" in log  # the stored MSH-9.1, cut to 10 characters
    reasons = [r.reason for r in s.list_messages()]
    s.close()
    assert "ADT trigger invalid (3 characters) is not supported by the FHIR conversion" in reasons[0]
    assert len(reasons) == 3 and not any(
        SECRET.lower() in r.lower() or SECRET[:3].upper() in r for r in reasons
    )


def test_audit_table_escapes_control_characters(tmp_path: Path) -> None:
    cfg = _hostile_store(tmp_path)
    runner = CliRunner()
    why = "ticket 1\n2\tfake\x1b[2J"  # an operator's reason for looking (token names are validated already)
    shown = runner.invoke(
        main, ["messages", "show", "1", "--show-phi", "--reason", why, "--config", str(cfg)]
    )
    assert shown.exit_code == 0, shown.output
    res = runner.invoke(main, ["audit", "list", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    rows = res.output.splitlines()
    assert len(rows) == 1 and "\x1b" not in res.output
    assert rows[0].endswith("ticket 1\\n2\\tfake\\x1b[2J")
