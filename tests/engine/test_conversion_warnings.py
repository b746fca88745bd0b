"""Conversion warnings end to end (issue #14): a real engine process, real sockets, the SQLite store.

A message that converts only because something was dropped or re-read (a bad value in a non-key field under
``strictness: lenient``, UTF-8 bytes under MSH-18 ``8859/1``, ASCII bytes under an MSH-18 Sluice does not know)
is processed, and its located, PHI-free warnings are stored with it: ``sluice messages show``, the admin API's message detail and the Prometheus counter per
kind show them.  ``strictness: strict`` rejects the same message; ``source.utf8_fallback: false`` reads the
bytes as declared.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from engine import store as st
from engine.cli import main
from engine.client import MLLPClient, parse_ack
from tests.admin.conftest import make_token
from tests.support.engine import EngineProcess, fhir_channel, free_port, write_config
from tests.support.polling import wait_for

NAME = "Núñez"  # synthetic; UTF-8 bytes c3 ba / c3 b1


def mislabelled(control: str) -> bytes:
    """UTF-8 bytes under MSH-18 8859/1, and an impossible birth date in PID-7 (an optional field)."""
    return (
        f"MSH|^~\\&|EHR|NORTH|SL|HOSP|20250101120000||ADT^A08^ADT_A01|{control}|P|2.5.1||||||8859/1\r"
        f"PID|1||MRNW1^^^NORTH^MR||{NAME}^Alex||20250230|F\r"
        + "|".join(["PV1", "1", "O"] + [""] * 16 + [f"V{control}^^^NORTH"])
        + "\r"
    ).encode()


def unknown_charset(control: str) -> bytes:
    """ASCII bytes under an MSH-18 Sluice does not know (``8859``, no part number), the same bad PID-7."""
    return mislabelled(control).replace(b"|8859/1\r", b"|8859\r").replace(NAME.encode(), b"Nunez")


def send(port: int, payload: bytes) -> str:
    import asyncio

    async def go() -> str:
        async with MLLPClient("127.0.0.1", port) as c:
            return parse_ack(await c.send(payload)).code

    return asyncio.run(go())


@pytest.mark.parametrize("workers", [pytest.param(1, id="worker-process"), pytest.param(0, id="in-engine")])
def test_warnings_are_stored_shown_and_counted(tmp_path: Path, workers: int) -> None:
    lenient, strict, off, admin_port = free_port(), free_port(), free_port(), free_port()
    out = tmp_path / "out"
    dest = {"kind": "file", "directory": str(out), "pattern": "{channel}-{control_id}.{ext}", "fsync": False}
    cfg = write_config(
        tmp_path,
        channels={
            "len": fhir_channel(lenient, "out"),
            "str": fhir_channel(strict, "out", strictness="strict"),
            "raw": fhir_channel(
                off, "out", source={"host": "127.0.0.1", "port": off, "utf8_fallback": False}
            ),
        },
        destinations={"out": dest},
        processing={"workers": workers},
    )
    with EngineProcess(cfg, lenient, env={"SLUICE_ADMIN_PORT": str(admin_port)}):
        for port, cid in ((lenient, "W1"), (strict, "W2"), (off, "W3")):
            assert send(port, mislabelled(cid)) == "AA"  # ack: on-commit
        assert send(lenient, unknown_charset("W4")) == "AA"  # was AE 103 (unsupported character set)
        wait_for(
            lambda: all((out / f).exists() for f in ("len-W1.json", "raw-W3.json", "len-W4.json")),
            what="bundles",
        )
        store = st.Store(f"sqlite:///{tmp_path}/sluice.db", create=False)
        try:
            rows = {r.control_id: r for r in store.list_messages()}
            wait_for(lambda: store.get_message(rows["W2"].id).status == st.ERROR, what="W2 rejected")
            w1, w2, w3, w4 = rows["W1"].id, rows["W2"].id, rows["W3"].id, rows["W4"].id
            assert store.get_message(w1).status == st.PROCESSED
            got = store.warnings_of(w1)
            assert [k for k, _ in got] == ["charset_fallback", "field_dropped"]
            assert got[0][1].startswith("MSH-18: the message declares 8859/1 but its bytes are UTF-8")
            assert got[1][1].startswith("PID-7: ")
            text = json.dumps(got, ensure_ascii=False)
            assert "20250230" not in text and NAME not in text and "MRNW1" not in text  # never a value
            # lenient converted: the name read as UTF-8, the bad birth date left out
            bundle = json.loads((out / "len-W1.json").read_bytes())
            (patient,) = [
                e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"
            ]
            assert patient["name"][0]["family"] == NAME and "birthDate" not in patient
            # strict: rejected with the located error, as before; the charset still fell back
            r2 = store.get_message(w2)
            assert "PID-7" in r2.reason and store.warnings_of(w2) == []
            # utf8_fallback off: read as declared (latin-1), no charset warning
            raw = json.loads((out / "raw-W3.json").read_bytes())
            (p3,) = [e["resource"] for e in raw["entry"] if e["resource"]["resourceType"] == "Patient"]
            assert p3["name"][0]["family"] == NAME.encode().decode("latin-1")
            assert [k for k, _ in store.warnings_of(w3)] == ["field_dropped"]
            # an unknown MSH-18 on ASCII bytes: read as ASCII, said first, the name redacted
            row4 = store.get_message(w4)
            assert row4 is not None and row4.status == st.PROCESSED
            got4 = store.warnings_of(w4)
            assert [k for k, _ in got4] == ["charset_unknown", "field_dropped"]
            assert got4[0][1] == (
                "MSH-18: the message declares a character set Sluice does not decode (invalid (4 characters)) but "
                "its bytes are all ASCII, which every ASCII-based character set reads alike; decoded as ASCII"
            )
        finally:
            store.close()

        show = CliRunner().invoke(main, ["messages", "show", str(w1), "--config", str(cfg)])
        assert show.exit_code == 0, show.output
        assert "warning:     MSH-18: the message declares 8859/1" in show.output
        assert "[charset_fallback]" in show.output and "[field_dropped]" in show.output
        assert NAME not in show.output and "20250230" not in show.output
        show4 = CliRunner().invoke(main, ["messages", "show", str(w4), "--config", str(cfg)])
        assert show4.exit_code == 0, show4.output
        assert (
            "warning:     MSH-18: the message declares a character set Sluice does not decode" in show4.output
        )
        assert "[charset_unknown]" in show4.output

        token = make_token(cfg, "viewer", "viewer")
        base = f"http://127.0.0.1:{admin_port}"
        detail = httpx.get(
            f"{base}/api/v1/messages/{w1}", headers={"Authorization": f"Bearer {token}"}, timeout=10
        ).json()
        assert [w["kind"] for w in detail["warnings"]] == ["charset_fallback", "field_dropped"]
        assert detail["warnings"][1]["text"].startswith("PID-7: ")
        detail4 = httpx.get(
            f"{base}/api/v1/messages/{w4}", headers={"Authorization": f"Bearer {token}"}, timeout=10
        ).json()
        assert [w["kind"] for w in detail4["warnings"]] == ["charset_unknown", "field_dropped"]

        metrics = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10).text
        assert 'sluice_conversion_warnings_total{channel="len",kind="charset_fallback"} 1.0' in metrics
        assert 'sluice_conversion_warnings_total{channel="len",kind="charset_unknown"} 1.0' in metrics
        assert 'sluice_conversion_warnings_total{channel="len",kind="field_dropped"} 2.0' in metrics
        assert 'sluice_conversion_warnings_total{channel="raw",kind="field_dropped"} 1.0' in metrics
        assert 'channel="str",kind=' not in metrics


def bad_attachment(control: str) -> bytes:
    """An ORU whose PDF (OBX-5 ED) was cut short in transit: base64 of 4n+1 characters, no padding explains it."""
    return (
        f"MSH|^~\\&|LAB|NORTH|SL|HOSP|20250101120000||ORU^R01^ORU_R01|{control}|P|2.5.1\r"
        "PID|1||MRNW5^^^NORTH^MR||Testpatient^Alex\r"
        f"OBR|1|PL{control}^EHR|FI{control}^LAB|24323-8^Panel^LN|||20250101080000\r"
        "OBX|1|NM|2345-7^Glucose^LN||90|mg/dL|||||F\r"
        "OBX|2|ED|11502-2^Report^LN||^application^pdf^Base64^JVBERi0xLjQKJSBzeW50aGV0aWMK1||||||F\r"
    ).encode()


def test_a_bad_attachment_keeps_the_report_under_lenient(tmp_path: Path) -> None:
    """A corrupt ED (OBX-5) no longer rejects the whole report on a lenient channel: the report and its results
    are delivered, the attachment without its data, and the located attachment_data_dropped warning is stored and
    counted.  A strict channel fails the message at OBX(2)-5.5, as before."""
    lenient, strict, admin_port = free_port(), free_port(), free_port()
    out = tmp_path / "out"
    dest = {"kind": "file", "directory": str(out), "pattern": "{channel}-{control_id}.{ext}", "fsync": False}
    cfg = write_config(
        tmp_path,
        channels={
            "len": fhir_channel(lenient, "out", types=("ORU",)),
            "str": fhir_channel(strict, "out", types=("ORU",), strictness="strict"),
        },
        destinations={"out": dest},
        processing={"workers": 0},
    )
    with EngineProcess(cfg, lenient, env={"SLUICE_ADMIN_PORT": str(admin_port)}):
        assert send(lenient, bad_attachment("E1")) == "AA"
        assert send(strict, bad_attachment("E2")) == "AA"  # ack: on-commit; processing decides
        wait_for(lambda: (out / "len-E1.json").exists(), what="the lenient bundle")
        store = st.Store(f"sqlite:///{tmp_path}/sluice.db", create=False)
        try:
            rows = {r.control_id: r for r in store.list_messages()}
            e2 = wait_for(
                lambda: (r := store.get_message(rows["E2"].id)) is not None and r.status == st.ERROR and r,
                what="E2 failed",
            )
            assert "OBX(2)-5.5" in e2.reason and "base64" in e2.reason
            assert store.warnings_of(rows["E1"].id) == [
                (
                    "attachment_data_dropped",
                    "OBX(2)-5.5: is not valid base64 data; the attachment was kept without its data, with its type "
                    "and title (channel strictness: lenient); send the data in the encoding OBX-5.4 names",
                )
            ]
        finally:
            store.close()
        bundle = json.loads((out / "len-E1.json").read_bytes())
        (report,) = [
            e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"
        ]
        assert report["presentedForm"] == [{"contentType": "application/pdf", "title": "Report"}]
        assert len(report["result"]) == 1
        token = make_token(cfg, "viewer", "viewer")
        metrics = httpx.get(
            f"http://127.0.0.1:{admin_port}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10
        ).text
        assert 'sluice_conversion_warnings_total{channel="len",kind="attachment_data_dropped"} 1.0' in metrics
        assert 'channel="str",kind=' not in metrics
