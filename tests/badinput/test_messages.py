"""Bad, odd and hostile HL7 content against a real engine process: the ACK and what is stored.

One engine for the module, five channels:

* ``msg``  on-commit, passthrough, default acceptance (processing ids P/T only), latin-1 fallback;
* ``req``  like ``msg`` with ``require: [PID-3]``;
* ``fhir`` ``ack: after-processing`` + ``hl7-to-fhir`` with ``site_tz: America/Chicago``;
* ``fhirtz`` the same with ``site_tz`` only at channel level;
* ``json`` ``ack: after-processing`` + ``hl7-to-json`` (to see how the engine decoded the text).

Every test ends by checking that a normal message on a fresh connection still gets AA.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine import store as st
from engine.admin.search import installation_key, patient_hash
from tests.badinput.conftest import (
    Engine,
    Reader,
    adt,
    connect,
    frame,
    parse_ack,
    send_one,
    start_engine,
    uid,
)
from tests.support.polling import wait_for


@pytest.fixture(scope="module")
def eng(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    base: Path = tmp_path_factory.mktemp("messages")
    yield from start_engine(
        base,
        {
            "msg": {"accept": {"processing_ids": ["P", "T"]}},
            "req": {"require": ["PID-3"]},
            "fhir": {
                "ack": "after-processing",
                "site_tz": "America/Chicago",
                "strictness": "strict",
                "transform": [
                    {"hl7-to-fhir": {"derive_unknown_systems": True, "site_tz": "America/Chicago"}}
                ],
            },
            # site_tz only at channel level (as docs/channels.md shows it)
            "fhirtz": {
                "ack": "after-processing",
                "site_tz": "America/Chicago",
                "transform": [{"hl7-to-fhir": {"derive_unknown_systems": True}}],
            },
            "json": {"ack": "after-processing", "transform": ["hl7-to-json"]},
        },
    )


def ack_of(eng: Engine, channel: str, payload: bytes) -> Any:
    return parse_ack(send_one(eng.ports[channel], payload))


def no_reply(eng: Engine, channel: str, payload: bytes) -> None:
    """The engine sends nothing back for this message (a probe on the same connection is answered first)."""
    with connect(eng.ports[channel]) as s:
        s.sendall(frame(payload))
        Reader(s).nothing_before_probe()


def msh(control: str, mtype: str = "ADT^A08", version: str = "2.5.1", **fields: str) -> str:
    """An MSH with standard delimiters; ``fields`` like f15="AL" set MSH-15 etc."""
    f = [
        "MSH",
        "|",
        "^~\\&",
        "EHR",
        "NORTH",
        "SL",
        "HOSP",
        "20250314083000",
        "",
        mtype,
        control,
        "P",
        version,
    ]
    for k, v in fields.items():
        n = int(k[1:])
        while len(f) <= n:
            f.append("")
        f[n] = v
    return "MSH|" + "|".join(f[2:])


def oru(control: str, obx11: str = "F", obx5: str = "182", obx2: str = "NM", **kw: str) -> bytes:
    return (
        msh(control, "ORU^R01^ORU_R01", **kw) + "\r"
        "PID|1||MRN7^^^NORTH^MR||Testpatient^Alex||19800101|F\r"
        "OBR|1|ORD1^NORTH|FIL1^NORTH|24331-1^Lipid panel^LN|||20250110090000\r"
        f"OBX|1|{obx2}|2093-3^Cholesterol^LN||{obx5}|mg/dL|||||{obx11}|||20250314100000\r"
    ).encode("latin-1")


def bundle_of(eng: Engine, row: Any) -> dict[str, Any]:
    (payload,) = eng.payloads(row.id)
    doc: dict[str, Any] = json.loads(payload)
    return doc


def resources(bundle: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


# ---------------------------------------------------------------------------
# header problems


def test_no_msh_is_ar_100_quarantined(eng: Engine) -> None:
    body = b"PID|1||MRN1^^^NORTH^MR||Testpatient^Alex\rPV1|1|O\r"
    a = ack_of(eng, "msg", body)
    assert (a.code, a.control_id, a.err_code) == ("AR", "", "100")
    row = eng.latest("msg")
    assert row.raw == body and row.status == st.QUARANTINED
    eng.assert_serving("msg")


@pytest.mark.parametrize("body", [b"MSH", b"MSH\r", b"MSH|\rPID|1\r"], ids=["bare", "bare-cr", "no-enc"])
def test_bare_msh_is_ar_101(eng: Engine, body: bytes) -> None:
    a = ack_of(eng, "msg", body)
    assert (a.code, a.control_id, a.err_code) == ("AR", "", "101")
    eng.assert_serving("msg")


def test_custom_delimiters_are_parsed_and_used_in_the_ack(eng: Engine) -> None:
    cid = uid("D")
    body = (
        f"MSH!@#$%!EHR!NORTH!SL!HOSP!20250314083000!!ADT@A08!{cid}!P!2.5.1\r"
        "PID!1!!MRN1@@@NORTH@MR#MRN2@@@SOUTH@MR!!Testpatient@Alex\r"
    ).encode()
    raw = send_one(eng.ports["msg"], body)
    assert raw.startswith(b"MSH!@#$%!SL!HOSP!EHR!NORTH!"), raw
    a = parse_ack(raw)
    assert (a.code, a.control_id) == ("AA", cid)
    assert a.field("MSH", 9).startswith("ACK@A08")
    row = eng.rows(cid)[0]
    assert row.message_type == "ADT" and row.trigger == "A08" and row.raw == body
    eng.assert_serving("msg")


def test_v27_truncation_character_is_accepted(eng: Engine) -> None:
    cid = uid("T")
    body = (
        f"MSH|^~\\&#|EHR|NORTH|SL|HOSP|20250314083000||ADT^A08|{cid}|P|2.7\rPID|1||MRN1^^^NORTH^MR\r".encode()
    )
    raw = send_one(eng.ports["msg"], body)
    a = parse_ack(raw)
    assert (a.code, a.control_id) == ("AA", cid)
    assert raw.startswith(b"MSH|^~\\&#|")
    eng.assert_serving("msg")


def test_three_character_msh2_is_accepted(eng: Engine) -> None:
    cid = uid("T")
    body = (
        f"MSH|^~\\|EHR|NORTH|SL|HOSP|20250314083000||ADT^A08|{cid}|P|2.3\rPID|1||MRN1^^^NORTH^MR\r".encode()
    )
    a = ack_of(eng, "msg", body)
    assert (a.code, a.control_id) == ("AA", cid)
    eng.assert_serving("msg")


@pytest.mark.parametrize("kind", ["lf", "crlf", "mixed"])
def test_segment_terminators_are_normalised_and_raw_kept(eng: Engine, kind: str) -> None:
    cid = uid("N")
    if kind == "mixed":
        body = adt(cid).replace(b"\r", b"\n", 1).replace(b"\rPID", b"\r\nPID")
    else:
        body = adt(cid, sep="\n" if kind == "lf" else "\r\n")
    a = ack_of(eng, "msg", body)
    assert (a.code, a.control_id) == ("AA", cid)
    row = eng.rows(cid)[0]
    assert row.raw == body  # byte for byte
    # the patient key (a keyed hash, never the identifier) is PID-3.1's, so PID was split off right
    key = installation_key(eng.store)
    assert row.message_type == "ADT" and row.trigger == "A08" and row.patient_key == patient_hash(key, "MRN1")
    eng.assert_serving("msg")


def test_missing_control_id_is_ar_101_with_empty_msa2(eng: Engine) -> None:
    a = ack_of(eng, "msg", adt(""))
    assert (a.code, a.control_id, a.err_code) == ("AR", "", "101")
    assert a.err_location == "MSH^1^10"
    eng.assert_serving("msg")


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"mtype": "ZZZ", "trigger": "Z01"}, "200"),
        ({"trigger": "A99"}, "201"),
        ({"processing": "X"}, "202"),
        ({"processing": "D"}, "202"),  # D is a real value, but not accepted by this channel
        ({"version": "9.9"}, "203"),
        ({"version": ""}, "203"),
    ],
    ids=["type", "trigger", "pid-X", "pid-D", "version", "blank-version"],
)
def test_header_not_accepted_is_ar_and_stored_rejected(
    eng: Engine, kwargs: dict[str, str], code: str
) -> None:
    cid = uid("H")
    a = ack_of(eng, "msg", adt(cid, **kwargs))
    assert (a.code, a.control_id, a.err_code) == ("AR", cid, code)
    row = eng.rows(cid)[0]
    assert row.status == st.REJECTED and row.ack_code == "AR"
    eng.assert_serving("msg")


# ---------------------------------------------------------------------------
# content problems


def test_required_pid3_missing_is_ae_101_at_pid_1_3(eng: Engine) -> None:
    cid = uid("Q")
    a = ack_of(eng, "req", adt(cid, pid3=""))
    assert (a.code, a.control_id, a.err_code, a.err_location) == ("AE", cid, "101", "PID^1^3")
    assert eng.rows(cid)[0].status == st.ERROR  # kept, replayable
    eng.assert_serving("req")


def test_pid3_missing_in_fhir_conversion_is_ae_101_at_pid_1_3(eng: Engine) -> None:
    cid = uid("Q")
    a = ack_of(eng, "fhir", adt(cid, pid3=""))
    assert (a.code, a.control_id, a.err_code) == ("AE", cid, "101")
    assert a.err_location.startswith("PID^1^3")
    assert eng.rows(cid)[0].status == st.ERROR
    eng.assert_serving("fhir")


def test_impossible_date_in_an_optional_field_is_dropped_with_a_stored_warning(eng: Engine) -> None:
    """``strictness: lenient`` (the default, channel fhirtz): the bad birth date is left out, the message
    converts (AA), and the located warning is stored with it (no value in it)."""
    cid = uid("L")
    body = adt(cid).replace(b"19800101", b"20250230")
    a = ack_of(eng, "fhirtz", body)
    assert (a.code, a.control_id) == ("AA", cid), a.raw
    row = eng.rows(cid)[0]
    assert row.status == st.PROCESSED
    (bundle,) = [json.loads(p) for p in eng.payloads(row.id)]
    (patient,) = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"]
    assert "birthDate" not in patient and patient["identifier"]
    warnings = eng.store.warnings_of(row.id)
    assert warnings[:1] == [
        (
            "field_dropped",
            "PID-7: is not a valid HL7 date/time (no such date); PID-7 was left out (channel strictness: lenient)",
        )
    ]
    assert b"20250230" not in json.dumps(warnings).encode()
    eng.assert_serving("fhirtz")


def test_impossible_date_is_ae_102_with_location(eng: Engine) -> None:
    """``strictness: strict`` (channel fhir): rejected as before, with the location."""
    cid = uid("Q")
    body = adt(cid).replace(b"19800101", b"20250230")
    a = ack_of(eng, "fhir", body)
    assert (a.code, a.control_id, a.err_code) == ("AE", cid, "102")
    assert a.err_location.startswith("PID^1^7")
    row = eng.rows(cid)[0]
    assert row.status == st.ERROR and "PID-7" in row.reason
    assert eng.payloads(row.id) == []  # nothing routed
    eng.assert_serving("fhir")


@pytest.mark.parametrize(
    "channel",
    [
        "fhir",
        "fhirtz",
    ],
)
def test_time_without_offset_gets_the_site_zone(eng: Engine, channel: str) -> None:
    """America/Chicago: -05:00 in March (DST), -06:00 in January; never the host's zone."""
    cid = uid("Z")
    a = ack_of(eng, channel, oru(cid))
    assert (a.code, a.control_id) == ("AA", cid)
    b = bundle_of(eng, eng.rows(cid)[0])
    (obs,) = resources(b, "Observation")
    (rep,) = resources(b, "DiagnosticReport")
    assert obs["effectiveDateTime"] == "2025-03-14T10:00:00-05:00"
    assert rep["effectiveDateTime"] == "2025-01-10T09:00:00-06:00"
    eng.assert_serving("fhir")


def test_unknown_z_segment_is_accepted_and_kept(eng: Engine) -> None:
    cid = uid("Z")
    body = adt(cid, extra="ZXY|1|site specific^stuff|\\X4\\\r")
    a = ack_of(eng, "msg", body)
    assert (a.code, a.control_id) == ("AA", cid)
    assert eng.rows(cid)[0].raw == body
    a2 = ack_of(eng, "fhir", adt(uid("Z"), extra="ZXY|1|x\r"))
    assert a2.code == "AA"
    eng.assert_serving("msg")


def test_batch_each_message_stored_one_ack(eng: Engine) -> None:
    ids = [uid("BA") for _ in range(3)]
    msgs = [adt(c).decode() for c in ids]
    body = (
        "FHS|^~\\&|EHR|NORTH|SL|HOSP|20250314083000||||F1\r"
        "BHS|^~\\&|EHR|NORTH|SL|HOSP|20250314083000||||B1\r" + "".join(msgs) + "BTS|3\rFTS|1\r"
    ).encode()
    with connect(eng.ports["msg"]) as s:
        s.sendall(frame(body))
        r = Reader(s)
        a = parse_ack(r.one())
        r.nothing_before_probe()  # one ACK for the batch
    assert a.code == "AA"
    for c, m in zip(ids, msgs, strict=True):
        (row,) = eng.rows(c)
        assert row.raw == m.encode() and row.status != st.QUARANTINED
    eng.assert_serving("msg")


def test_duplicate_same_bytes_resends_the_original_ack(eng: Engine) -> None:
    cid = uid("DU")
    body = adt(cid)
    first = send_one(eng.ports["msg"], body)
    sent_at = int(time.time())
    # Resend once the clock is in a later second: a newly built ACK would carry a new MSH-7 time.
    wait_for(lambda: int(time.time()) > sent_at, what="the next second")
    second = send_one(eng.ports["msg"], body)
    assert second == first
    assert parse_ack(first).code == "AA"
    assert len(eng.rows(cid)) == 1
    eng.assert_serving("msg")


def test_duplicate_id_different_content_is_ae_205_quarantined(eng: Engine) -> None:
    cid = uid("DU")
    assert ack_of(eng, "msg", adt(cid)).code == "AA"
    other = adt(cid, name="Otherpatient^Sam")
    a = ack_of(eng, "msg", other)
    assert (a.code, a.control_id, a.err_code) == ("AE", cid, "205")
    first, second = eng.rows(cid)
    assert first.raw == adt(cid) and first.status != st.QUARANTINED
    assert second.raw == other and second.status == st.QUARANTINED
    eng.assert_serving("msg")


# ---------------------------------------------------------------------------
# acknowledgement modes


def test_ne_ne_gets_no_ack_but_is_stored(eng: Engine) -> None:
    cid = uid("NE")
    no_reply(eng, "msg", adt(cid, msh15="NE", msh16="NE"))
    row = eng.wait_row(cid)
    assert row.raw == adt(cid, msh15="NE", msh16="NE") and row.status not in (st.REJECTED, st.QUARANTINED)
    eng.assert_serving("msg")


def test_al_ne_gets_only_a_commit_ack(eng: Engine) -> None:
    cid = uid("CA")
    with connect(eng.ports["msg"]) as s:
        s.sendall(frame(adt(cid, msh15="AL", msh16="NE")))
        r = Reader(s)
        a = parse_ack(r.one())
        r.nothing_before_probe()  # no application ACK follows the CA
    assert (a.code, a.control_id) == ("CA", cid)
    assert eng.rows(cid)  # the CA went out after the durable write
    eng.assert_serving("msg")


def test_inbound_ack_is_never_acked_back(eng: Engine) -> None:
    cid = uid("AK")
    body = f"MSH|^~\\&|EHR|NORTH|SL|HOSP|20250314083000||ACK^A08^ACK|{cid}|P|2.5.1\rMSA|AA|X123\r".encode()
    no_reply(eng, "msg", body)
    row = eng.wait_row(cid)
    assert row.status == st.IGNORED
    eng.assert_serving("msg")


def test_ten_megabyte_oru_with_base64_pdf_is_accepted(eng: Engine) -> None:
    pdf = b"%PDF-1.4\n" + os.urandom(7_500_000) + b"\n%%EOF\n"
    data = base64.b64encode(pdf).decode()
    cid = uid("BIG")
    body = oru(cid, obx2="ED", obx5=f"LAB^AP^PDF^Base64^{data}", obx11="F")
    assert len(body) > 10_000_000
    a = parse_ack(send_one(eng.ports["msg"], body, timeout=60))
    assert (a.code, a.control_id) == ("AA", cid)
    (row,) = eng.rows(cid)
    assert row.size == len(body) and row.raw == body
    eng.assert_serving("msg")


# ---------------------------------------------------------------------------
# character sets and escapes


def test_invalid_utf8_under_declared_utf8_is_ae_102_quarantined(eng: Engine) -> None:
    cid = uid("CS")
    body = adt(cid, msh18="UNICODE UTF-8", name="M\xfcller^Alex")  # latin-1 byte 0xFC: invalid UTF-8
    a = ack_of(eng, "msg", body)
    assert (a.code, a.control_id, a.err_code) == ("AE", cid, "102")
    row = eng.rows(cid)[0]
    assert row.status == st.QUARANTINED and row.raw == body
    eng.assert_serving("msg")


def test_valid_utf8_under_declared_utf8_is_accepted(eng: Engine) -> None:
    cid = uid("CS")
    body = adt(cid, msh18="UNICODE UTF-8").replace(b"Testpatient", "Müller".encode())
    a = ack_of(eng, "json", body)
    assert (a.code, a.control_id) == ("AA", cid)
    (payload,) = eng.payloads(eng.rows(cid)[0].id)
    assert "Müller" in payload.decode("utf-8")


def test_unknown_charset_on_non_ascii_bytes_is_ae_103_quarantined(eng: Engine) -> None:
    """Bytes outside ASCII (Latin-1, not UTF-8: source.utf8_fallback cannot read them) under an MSH-18 Sluice
    does not know: AE 103, stored as sent."""
    cid = uid("CS")
    body = adt(cid, msh18="KLINGON-8", name="M\xfcller^Alex")
    a = ack_of(eng, "msg", body)
    assert (a.code, a.control_id, a.err_code) == ("AE", cid, "103")
    assert a.err_location.startswith("MSH^1^18")
    row = eng.rows(cid)[0]
    assert row.status == st.QUARANTINED and row.raw == body
    eng.assert_serving("msg")


@pytest.mark.parametrize("channel", ["json", "fhir"])  # fhir: strictness strict (nothing is dropped)
def test_unknown_charset_on_ascii_bytes_is_read_as_ascii_with_a_warning(eng: Engine, channel: str) -> None:
    """Every ASCII-based charset reads ASCII bytes alike: junk in MSH-18 no longer rejects the message; the
    stored charset_unknown warning names no value."""
    cid = uid("CS")
    body = adt(cid, msh18="Quorthvexil")  # synthetic: a sender's value misplaced in MSH-18
    a = ack_of(eng, channel, body)  # ack: after-processing: the ACK follows the conversion
    assert (a.code, a.control_id) == ("AA", cid)
    row = eng.rows(cid)[0]
    assert row.status == st.PROCESSED and row.raw == body
    # said first (the conversion's own warnings, such as the visit without a number, follow)
    assert eng.store.warnings_of(row.id)[0] == (
        "charset_unknown",
        "MSH-18: the message declares a character set Sluice does not decode (invalid (11 characters)) but "
        "its bytes are all ASCII, which every ASCII-based character set reads alike; decoded as ASCII",
    )
    (payload,) = eng.payloads(row.id)
    assert b"Testpatient" in payload
    eng.assert_serving(channel)


def test_high_bytes_without_msh18_use_the_fallback_charset_and_raw_is_kept(eng: Engine) -> None:
    cid = uid("CS")
    body = adt(cid, name="M\xfcller^Ren\xe9e")  # latin-1 bytes, MSH-18 empty
    a = ack_of(eng, "json", body)
    assert (a.code, a.control_id) == ("AA", cid)
    row = eng.rows(cid)[0]
    assert row.raw == body
    (payload,) = eng.payloads(row.id)
    text = payload.decode("utf-8")
    assert "Müller" in text and "Renée" in text
    eng.assert_serving("json")


def test_malformed_escapes_are_kept_literally(eng: Engine) -> None:
    cid = uid("ES")
    body = adt(cid, extra="NTE|1||odd \\X4\\ and \\Q\\ and \\X4 end|ok \\F\\ sep\r")
    a = ack_of(eng, "json", body)
    assert (a.code, a.control_id) == ("AA", cid)
    (payload,) = eng.payloads(eng.rows(cid)[0].id)
    doc = json.loads(payload)
    nte = next(s for s in doc["segments"] if s["name"] == "NTE")
    assert nte["fields"][2] == "odd \\X4\\ and \\Q\\ and \\X4 end"
    assert nte["fields"][3] == "ok | sep"
    eng.assert_serving("json")


# ---------------------------------------------------------------------------
# out-of-order clinical events


def test_a40_with_unknown_prior_patient_is_ae_204(eng: Engine) -> None:
    cid = uid("MG")
    body = (
        msh(cid, "ADT^A40^ADT_A39") + "\rEVN|A40|20250314083000\r"
        "PID|1||MRN40^^^NORTH^MR||Testpatient^Alex||19800101|F\r"
        "MRG|NEVERSEEN99^^^NORTH^MR\r"
    ).encode()
    a = ack_of(eng, "fhir", body)
    assert (a.code, a.control_id, a.err_code) == ("AE", cid, "204")
    assert eng.rows(cid)[0].status == st.ERROR
    eng.assert_serving("fhir")


def test_a40_with_known_prior_patient_is_accepted(eng: Engine) -> None:
    prior = uid("MP")
    assert ack_of(eng, "fhir", adt(prior, pid3="OLD77^^^NORTH^MR")).code == "AA"
    cid = uid("MG")
    body = (
        msh(cid, "ADT^A40^ADT_A39") + "\rEVN|A40|20250314083000\r"
        "PID|1||NEW77^^^NORTH^MR||Testpatient^Alex||19800101|F\r"
        "MRG|OLD77^^^NORTH^MR\r"
    ).encode()
    a = ack_of(eng, "fhir", body)
    assert (a.code, a.control_id) == ("AA", cid)


def test_oru_correction_before_original(eng: Engine) -> None:
    """Documented: the correction is applied; the original final arriving later goes to review."""
    fil = uid("FIL")
    c1, c2 = uid("OC"), uid("OF")
    corr = oru(c1, obx11="C", obx5="190").replace(b"FIL1^NORTH", f"{fil}^NORTH".encode())
    orig = oru(c2, obx11="F", obx5="182").replace(b"FIL1^NORTH", f"{fil}^NORTH".encode())
    assert ack_of(eng, "fhir", corr).code == "AA"
    row = eng.rows(c1)[0]
    assert row.status == st.PROCESSED
    (obs,) = resources(bundle_of(eng, row), "Observation")
    assert obs["status"] == "corrected"
    a = ack_of(eng, "fhir", orig)
    assert (a.code, a.control_id) == ("AA", c2)
    assert eng.rows(c2)[0].status == st.REVIEW
    eng.assert_serving("fhir")


def test_siu_cancel_before_book(eng: Engine) -> None:
    """Documented (cancel_before_book: create): the Appointment is created cancelled; a later booking → review."""
    apt = uid("APT")

    def siu(control: str, trig: str, status: str) -> bytes:
        return (
            msh(control, f"SIU^{trig}^SIU_S12") + "\r"
            f"SCH|{apt}^NORTH|{apt}^NORTH|||||ROUTINE^Routine|FOLLOWUP|30|MIN|"
            f"^^30^20250320093000^20250320100000|||||||||||||||{status}\r"
            "PID|1||MRN5^^^NORTH^MR||Testpatient^Alex||19800101|F\r"
        ).encode()

    c1, c2 = uid("SC"), uid("SB")
    assert ack_of(eng, "fhir", siu(c1, "S15", "Cancelled")).code == "AA"
    row = eng.rows(c1)[0]
    assert row.status == st.PROCESSED
    (appt,) = resources(bundle_of(eng, row), "Appointment")
    assert appt["status"] == "cancelled"
    assert ack_of(eng, "fhir", siu(c2, "S12", "Booked")).code == "AA"
    assert eng.rows(c2)[0].status == st.REVIEW
    eng.assert_serving("fhir")


# ---------------------------------------------------------------------------
# the store cannot write


def _sql(eng: Engine, statement: str) -> None:
    con = sqlite3.connect(str(eng.dir / "sluice.db"), timeout=30)
    try:
        con.execute(statement)
        con.commit()
    finally:
        con.close()


@pytest.mark.parametrize(("channel", "table"), [("msg", "messages"), ("fhir", "deliveries")])
def test_store_write_failure_is_ar_207_and_nothing_half_written(
    eng: Engine, channel: str, table: str
) -> None:
    """A trigger in the engine's own database makes this one write fail (safe: nothing is revoked).

    On ``fhir`` (after-processing) the message row is inserted first and the delivery insert fails
    afterwards in the same transaction: the message row must be rolled back too.
    """
    cid = uid("SF")
    trig = f"sluice_test_fail_{cid}"
    cond = (
        f"NEW.control_id = '{cid}'"
        if table == "messages"
        else f"(SELECT control_id FROM messages WHERE id = NEW.message_id) = '{cid}'"
    )
    before = eng.count()
    _sql(
        eng,
        f"CREATE TRIGGER {trig} BEFORE INSERT ON {table} WHEN {cond} BEGIN SELECT RAISE(ABORT, 'test'); END",
    )
    try:
        a = ack_of(eng, channel, adt(cid))
        assert (a.code, a.control_id, a.err_code) == ("AR", cid, "207")
        assert eng.rows(cid) == [] and eng.count() == before
        eng.assert_serving("msg")  # other messages are still stored
    finally:
        _sql(eng, f"DROP TRIGGER IF EXISTS {trig}")
    # Resend later: accepted, exactly one row.
    a = ack_of(eng, channel, adt(cid))
    assert (a.code, a.control_id) == ("AA", cid)
    assert len(eng.rows(cid)) == 1


# ---------------------------------------------------------------------------
# regressions found by fuzzing (tests/fuzz/test_parser_fuzz.py)


def _superscript_version(cid: str) -> bytes:
    # MSH-12 = 0xB2, which the latin-1 fallback decodes to '²' (str.isdigit() is True, int() fails).
    return adt(cid).replace(b"|P|2.5.1", b"|P|\xb2")


def test_internal_error_while_accepting_still_answers_and_connection_survives(eng: Engine) -> None:
    """Whatever goes wrong inside intake, the sender gets an answer and the connection keeps working."""
    cid, after = uid("IE"), uid("IE")
    with connect(eng.ports["msg"]) as s:
        r = Reader(s)
        s.sendall(frame(_superscript_version(cid)))
        a = parse_ack(r.one(timeout=5))
        assert a.code == "AR"
        s.sendall(frame(adt(after)))
        a2 = parse_ack(r.one(timeout=5))
        assert (a2.code, a2.control_id) == ("AA", after)
    eng.assert_serving("msg")


def test_superscript_digit_version_is_ar_203(eng: Engine) -> None:
    cid = uid("IE")
    a = ack_of(eng, "msg", _superscript_version(cid))
    assert (a.code, a.control_id, a.err_code) == ("AR", cid, "203")


def test_control_character_delimiters_are_ar_101_with_a_readable_ack(eng: Engine) -> None:
    """MSH-1 = NUL: the ACK must not be built with (or split on) it."""
    cid = uid("NU")
    body = adt(cid).replace(b"|", b"\x00")
    raw = send_one(eng.ports["msg"], body)
    a = parse_ack(raw)
    assert raw.startswith(b"MSH|^~\\&|")
    assert a.code == "AR" and a.err_code == "101"
    with connect(eng.ports["msg"]) as s:
        s.sendall(frame(body))
        r = Reader(s)
        r.one()
        r.nothing_before_probe()  # exactly one ACK frame, not fragments
    eng.assert_serving("msg")


def test_batch_keeps_each_messages_raw_bytes_in_its_charset(eng: Engine) -> None:
    """Batch members are stored as the sender's bytes (UTF-8 stays UTF-8, nothing replaced by '?')."""
    ids = [uid("BU") for _ in range(2)]
    msgs = [
        adt(c, msh18="UNICODE UTF-8", sep="\r\n").replace(b"Testpatient", "Łukasz-Müller".encode())
        for c in ids
    ]
    body = (
        b"FHS|^~\\&|EHR|NORTH|SL|HOSP|20250314083000||||F1\r\nBHS|^~\\&|EHR|NORTH\r\n"
        + b"".join(msgs)
        + b"BTS|2\r\nFTS|1\r\n"
    )
    a = ack_of(eng, "json", body)
    assert a.code == "AA"
    for c, m in zip(ids, msgs, strict=True):
        (row,) = eng.rows(c)
        assert row.raw == m
        (payload,) = eng.payloads(row.id)
        assert "Łukasz-Müller" in payload.decode("utf-8")
