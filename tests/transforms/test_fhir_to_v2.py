"""FHIR → HL7 v2 (``fhir-to-hl7``): SIU/ADT/ORM from FHIR resources, read back by Sluice's own inbound
converter (round trip), escaping, time zones, versions, charsets and the send decision (synthetic data)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.errors import ConfigError, ConversionError
from engine.hl7 import parse_bytes
from engine.pipeline import StageContext, Work
from engine.stages import build_pipeline
from transforms.convert import convert as inbound
from transforms.fhir_to_v2.convert import convert
from transforms.fhir_to_v2.outbound import ALREADY_CLOSED, DELETED_TAG, NEVER_SENT, UNCHANGED, Sent, decide
from transforms.fhir_to_v2.settings import WritebackSettings
from transforms.settings import ConvertSettings

PLACER = "urn:portal:appointment"
SETTINGS = WritebackSettings(sending_application="SLUICE", sending_facility="PORTAL", placer_system=PLACER)
INBOUND = ConvertSettings(site_tz="America/Los_Angeles", derive_unknown_systems=True)

APPOINTMENT: dict[str, Any] = {
    "resourceType": "Appointment",
    "id": "appt-1",
    "meta": {"versionId": "1", "lastUpdated": "2026-12-01T10:00:00Z"},
    "identifier": [{"system": PLACER, "value": "PA-1001"}],
    "status": "booked",
    "serviceType": [
        {"coding": [{"system": "http://snomed.info/sct", "code": "11429006", "display": "Consultation"}]}
    ],
    "appointmentType": {
        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0276", "code": "FOLLOWUP"}]
    },
    "start": "2026-12-10T17:00:00Z",
    "end": "2026-12-10T17:30:00Z",
    "minutesDuration": 30,
    "comment": "Bring | the list\nof meds ^ & ~ \\ too",
    "participant": [
        {"actor": {"reference": "Patient/pat-1", "display": "Testperson, Alexandra"}, "status": "accepted"},
        {"actor": {"reference": "Practitioner/prac-1", "display": "Dana Synthetic"}, "status": "accepted"},
        {"actor": {"reference": "Location/loc-1", "display": "Clinic 3"}, "status": "accepted"},
    ],
}


def appointment(**changes: Any) -> dict[str, Any]:
    res = copy.deepcopy(APPOINTMENT)
    res.update(changes)
    return res


def read_back(payload: bytes) -> dict[str, Any]:
    """The Appointment Sluice's inbound converter makes of an SIU we wrote."""
    bundle = inbound(parse_bytes(payload), INBOUND)
    (appt,) = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Appointment"]
    return appt


FACTS = ("status", "start", "end", "minutesDuration", "serviceType", "comment", "cancelationReason")


def facts(res: dict[str, Any]) -> dict[str, Any]:
    return {k: res.get(k) for k in FACTS}


def test_booked_appointment_round_trips_through_the_inbound_converter() -> None:
    out = convert(APPOINTMENT, SETTINGS)
    assert out.state == "active" and set(out.variants) == {"S12", "S13", "S14"}
    back = read_back(out.variants["S12"])
    assert back["status"] == "booked"
    # the same instants, written in the site zone (America/Los_Angeles, PST in December)
    assert back["start"] == "2026-12-10T09:00:00-08:00" and back["end"] == "2026-12-10T09:30:00-08:00"
    assert back["minutesDuration"] == 30
    assert back["comment"] == APPOINTMENT["comment"]  # every delimiter escaped and read back
    assert back["serviceType"] == APPOINTMENT["serviceType"]
    assert back["appointmentType"]["coding"][0]["code"] == "FOLLOWUP"
    placer = [i for i in back["identifier"] if i["type"]["coding"][0]["code"] == "PLAC"]
    assert [(i["system"], i["value"]) for i in placer] == [(PLACER, "PA-1001")]
    # one participant each: the patient (PID), the location (AIL), the practitioner (AIP)
    assert len(back["participant"]) == 3
    # the variants differ only in MSH-9 and MSH-10
    s12, s13 = (parse_bytes(out.variants[t]) for t in ("S12", "S13"))
    assert (s12.trigger, s13.trigger) == ("S12", "S13") and s12.control_id != s13.control_id
    assert s12.text.split("\r", 1)[1] == s13.text.split("\r", 1)[1]
    assert s12.version == "2.5.1" and s12.sending_application == "SLUICE" and s12.sending_facility == "PORTAL"


def test_coding_systems_name_a_local_service_type_and_the_inbound_block_reads_it_back() -> None:
    local = "http://clinic.example.org/visit-types"
    appt = appointment(
        serviceType=[{"coding": [{"system": local, "code": "NP-30", "display": "New patient visit"}]}],
    )
    systems = {"99VT": local}
    out = convert(appt, WritebackSettings(placer_system=PLACER, coding_systems=systems))
    assert parse_bytes(out.variants["S12"])["AIS-3"] == "NP-30^New patient visit^99VT"
    back = inbound(
        parse_bytes(out.variants["S12"]), ConvertSettings(derive_unknown_systems=True, coding_systems=systems)
    )
    (res,) = [e["resource"] for e in back["entry"] if e["resource"]["resourceType"] == "Appointment"]
    assert res["serviceType"] == appt["serviceType"]  # the same block of the channel serves both directions
    # without the option the URI itself is written in CWE-3 (receivers then see no short name)
    assert parse_bytes(convert(appt, SETTINGS).variants["S12"])["AIS-3"] == f"NP-30^New patient visit^{local}"


def test_cancel_and_noshow_round_trip() -> None:
    reason = {
        "coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/appointment-cancellation-reason", "code": "pat"}
        ]
    }
    out = convert(appointment(status="cancelled", cancelationReason=reason), SETTINGS)
    assert out.state == "cancelled" and list(out.variants) == ["S15"]
    back = read_back(out.variants["S15"])
    assert back["status"] == "cancelled" and back["cancelationReason"]["coding"][0]["code"] == "pat"
    noshow = convert(appointment(status="noshow"), SETTINGS)
    assert list(noshow.variants) == ["S26"] and read_back(noshow.variants["S26"])["status"] == "noshow"


def test_summer_time_uses_the_site_zone_offset_of_that_date() -> None:
    out = convert(appointment(start="2026-07-01T16:00:00Z", end="2026-07-01T16:45:00Z"), SETTINGS)
    msg = parse_bytes(out.variants["S12"])
    assert msg["TQ1-7"] == "20260701090000-0700"  # PDT
    assert read_back(out.variants["S12"])["start"] == "2026-07-01T09:00:00-07:00"
    local = convert(
        appointment(), WritebackSettings(placer_system=PLACER, site_tz="Europe/Berlin", time_offsets=False)
    )
    assert parse_bytes(local.variants["S12"])["TQ1-7"] == "20261210180000"


def test_version_before_2_5_has_no_tq1_and_sch_11_carries_the_times() -> None:
    out = convert(appointment(), WritebackSettings(placer_system=PLACER, version="2.3"))
    msg = parse_bytes(out.variants["S12"])
    assert msg.version == "2.3" and msg.first("TQ1") is None
    assert facts(read_back(out.variants["S12"])) == facts(
        read_back(convert(APPOINTMENT, SETTINGS).variants["S12"])
    )


def test_charset_utf8_and_a_character_ascii_cannot_carry() -> None:
    res = appointment(comment="Zoë's follow-up")
    with pytest.raises(ConversionError, match="UNICODE UTF-8"):
        convert(res, SETTINGS)
    out = convert(res, WritebackSettings(placer_system=PLACER, charset="UNICODE UTF-8"))
    assert parse_bytes(out.variants["S12"])["MSH-18"] == "UNICODE UTF-8"
    assert read_back(out.variants["S12"])["comment"] == "Zoë's follow-up"


def test_placer_id_falls_back_to_the_resource_id() -> None:
    out = convert(appointment(identifier=[]), SETTINGS)
    assert out.key == "Appointment||appt-1"
    assert parse_bytes(out.variants["S12"])["SCH-1"].startswith("appt-1^SLUICE")
    with pytest.raises(ConversionError, match="placer_system"):
        convert(appointment(identifier=[], id=None), SETTINGS)


def test_what_the_hl7_does_not_carry_does_not_change_the_content_digest() -> None:
    a = convert(APPOINTMENT, SETTINGS)
    b = convert(
        appointment(meta={"versionId": "2", "lastUpdated": "2026-12-02T10:00:00Z"}, priority=5), SETTINGS
    )
    assert (a.content, a.timing) == (b.content, b.timing)
    moved = convert(appointment(start="2026-12-11T17:00:00Z", end="2026-12-11T17:30:00Z"), SETTINGS)
    assert moved.timing != a.timing and moved.content != a.content
    noted = convert(appointment(comment="other"), SETTINGS)
    assert noted.timing == a.timing and noted.content != a.content


def sent(out: Any, message: str) -> Sent:
    return Sent(out.state, out.content, out.timing, message)


def test_a_deleted_resource_becomes_its_deletion_message_for_the_same_key() -> None:
    """A fhir-poll tombstone (the last version taken, tagged deleted): S17 for the same SCH-1, read back as
    entered-in-error; a Patient's A29 (ADT_A21); a ServiceRequest's ORC-1 CA; decided like a cancel."""
    tag = {"meta": {"versionId": "2", "tag": [DELETED_TAG]}}
    booked = convert(APPOINTMENT, SETTINGS)
    gone = convert({**APPOINTMENT, **tag}, SETTINGS)
    assert gone.state == "deleted" and list(gone.variants) == ["S17"] and gone.key == booked.key
    msg = parse_bytes(gone.variants["S17"])
    assert msg["SCH-1.1"] == "PA-1001" and msg["SCH-25"] == "DELETED" and msg["RGS-2"] == "D"
    assert read_back(gone.variants["S17"])["status"] == "entered-in-error"
    assert decide(gone, sent(booked, "S12")) == ("S17", "")
    assert decide(gone, None) == (None, NEVER_SENT)
    patient = {"resourceType": "Patient", "id": "pat-1", "name": [{"family": "Testperson"}], **tag}
    out = convert(patient, SETTINGS)
    assert out.state == "deleted" and list(out.variants) == ["A29"]
    a29 = parse_bytes(out.variants["A29"])
    assert a29["MSH-9"] == "ADT^A29^ADT_A21" and a29["EVN-1"] == "A29" and a29["PID-5.1"] == "Testperson"
    order = {"resourceType": "ServiceRequest", "id": "sr-1", "status": "active", "intent": "order", **tag}
    assert list(convert(order, SETTINGS).variants) == ["CA"]
    # a tombstone without the last version (only its id): the key falls back to the id
    bare = convert({"resourceType": "Appointment", "id": "appt-1", **tag}, SETTINGS)
    assert list(bare.variants) == ["S17"] and parse_bytes(bare.variants["S17"])["SCH-1.1"] == "appt-1"


def test_decide_table() -> None:
    booked = convert(APPOINTMENT, SETTINGS)
    moved = convert(appointment(start="2026-12-11T17:00:00Z", end="2026-12-11T17:30:00Z"), SETTINGS)
    noted = convert(appointment(comment="other"), SETTINGS)
    cancelled = convert(appointment(status="cancelled"), SETTINGS)
    assert decide(booked, None) == ("S12", "")
    assert decide(booked, sent(booked, "S12")) == (None, UNCHANGED)
    assert decide(moved, sent(booked, "S12")) == ("S13", "")
    assert decide(noted, sent(booked, "S12")) == ("S14", "")
    assert decide(cancelled, sent(moved, "S13")) == ("S15", "")
    assert decide(cancelled, None) == (None, NEVER_SENT)
    assert decide(cancelled, sent(cancelled, "S15")) == (None, ALREADY_CLOSED)
    assert decide(booked, sent(cancelled, "S15")) == ("S12", "")  # booked again after a cancel


def test_patient_a28_a31_round_trip() -> None:
    patient = {
        "resourceType": "Patient",
        "id": "pat-1",
        "identifier": [
            {
                "system": "urn:oid:2.16.840.1.113883.19.999.1",
                "value": "MRN900001",
                "type": {"coding": [{"code": "MR"}]},
            }
        ],
        "name": [{"family": "Testperson", "given": ["Alexandra", "Q"], "use": "official"}],
        "birthDate": "1980-02-29",
        "gender": "female",
        "address": [{"line": ["1 Synthetic Way"], "city": "Faketown", "state": "CA", "postalCode": "90000"}],
        "telecom": [{"system": "phone", "value": "555-0100", "use": "home"}],
    }
    out = convert(patient, SETTINGS)
    assert set(out.variants) == {"A28", "A31"}
    msg = parse_bytes(out.variants["A28"])
    assert msg.trigger == "A28" and msg["EVN-1"] == "A28"
    bundle = inbound(msg, INBOUND)
    (pat,) = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"]
    assert pat["identifier"][0]["system"] == "urn:oid:2.16.840.1.113883.19.999.1"
    assert pat["identifier"][0]["value"] == "MRN900001"
    assert pat["name"][0]["family"] == "Testperson" and pat["name"][0]["given"] == ["Alexandra", "Q"]
    assert (pat["birthDate"], pat["gender"]) == ("1980-02-29", "female")
    assert pat["address"][0]["city"] == "Faketown"
    assert decide(out, None) == ("A28", "")
    changed = convert({**patient, "gender": "other"}, SETTINGS)
    assert decide(changed, sent(out, "A28")) == ("A31", "")


def test_service_request_orm_order_controls() -> None:
    sr = {
        "resourceType": "ServiceRequest",
        "id": "sr-1",
        "identifier": [{"system": PLACER, "value": "ORD-77"}],
        "status": "active",
        "intent": "order",
        "code": {
            "coding": [
                {"system": "http://loinc.org", "code": "24323-8", "display": "Comprehensive metabolic panel"}
            ]
        },
        "subject": {"reference": "Patient/pat-1", "display": "Testperson, Alexandra"},
        "requester": {"reference": "Practitioner/prac-1", "display": "Dana Synthetic"},
        "authoredOn": "2026-12-01T18:00:00Z",
        "priority": "stat",
    }
    out = convert(sr, SETTINGS)
    assert set(out.variants) == {"NW", "XO"}
    msg = parse_bytes(out.variants["NW"])
    assert msg.message_type == "ORM" and msg.trigger == "O01"
    assert msg["ORC-1"] == "NW" and msg["ORC-2"].startswith("ORD-77") and msg["OBR-2"] == msg["ORC-2"]
    assert msg["OBR-4"] == "24323-8^Comprehensive metabolic panel^LN" and msg["OBR-5"] == "S"
    assert msg["ORC-9"] == "20261201100000-0800"
    cancel = convert({**sr, "status": "revoked"}, SETTINGS)
    assert list(cancel.variants) == ["CA"] and parse_bytes(cancel.variants["CA"])["ORC-1"] == "CA"
    assert decide(cancel, None) == (None, NEVER_SENT)


def test_unsupported_resource_and_bad_values_say_what_to_do() -> None:
    with pytest.raises(ConversionError, match="filter other types out"):
        convert({"resourceType": "Observation"}, SETTINGS)
    with pytest.raises(ConversionError, match="valid FHIR R4"):
        convert(appointment(start="next tuesday"), SETTINGS)


def _step(options: dict[str, Any]) -> Any:
    ctx = StageContext(
        channel="wb", base_dir=Path("."), config_file="channels/wb.yaml", site_tz="America/New_York"
    )
    return build_pipeline(None, ({"fhir-to-hl7": options},), ctx)


def test_the_step_puts_every_candidate_in_its_facts() -> None:
    pipeline = _step({"sending_application": "SLUICE", "sending_facility": "PORTAL", "placer_system": PLACER})
    body = orjson.dumps(APPOINTMENT)
    work = Work(message=None, raw=body, payload=body, content_type="application/fhir+json")  # type: ignore[arg-type]
    out = pipeline.steps[0](work)
    assert out.content_type == "x-application/hl7-v2+er7"
    wb = out.facts["writeback"]
    assert wb["key"] == f"Appointment|{PLACER}|PA-1001" and set(wb["variants"]) == {"S12", "S13", "S14"}
    # the channel's site_tz is the default: New York
    assert parse_bytes(out.payload)["TQ1-7"] == "20261210120000-0500"


@pytest.mark.parametrize(
    ("options", "match"),
    [
        pytest.param({"placer": PLACER}, "unknown fhir-to-hl7 option 'placer'", id="unknown-key"),
        pytest.param({"version": "3.0"}, "not supported", id="version"),
        pytest.param({"charset": "EBCDIC"}, "character set", id="charset"),
        pytest.param({"placer_system": "portal"}, "not an identifier system URI", id="placer-system"),
        pytest.param({"sending_facility": "A|B"}, "plain HL7 header value", id="delimiter"),
        pytest.param({"site_tz": "Mars/Olympus"}, "unknown time zone", id="zone"),
        pytest.param({"coding_systems": ["99LAB"]}, "coding_systems must be a mapping", id="systems-list"),
        pytest.param(
            {"coding_systems": {"99^LAB": "urn:x:lab"}}, "is not a plain name", id="systems-delimiter"
        ),
        pytest.param({"coding_systems": {"99LAB": "lab codes"}}, "is not a URI", id="systems-uri"),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as exc:
        _step(options)
    assert exc.value.file == "channels/wb.yaml"
