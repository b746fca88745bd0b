"""SIU → Appointment: golden files per trigger, lifecycle on one Appointment, statuses, times (synthetic data)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from engine.errors import ConversionError, MessageRejected, SluiceError
from engine.hl7 import parse
from tests.transforms.conftest import (
    assert_golden,
    golden_settings,
    load,
    msg,
    resources,
    validate_resources,
)
from transforms.convert import _convert
from transforms.siu import APPOINTMENT_STATUS_RANK, FILLER_STATUS

KEY = "Appointment?identifier=urn:oid:2.16.840.1.113883.19.999.4|APT-FL-77"
MSH = "MSH|^~\\&|SYNSCHED|SYNTH HOSP|SLUICE|SLUICE|20250301100000||SIU^{}|C1|P|2.5.1"
PID = "PID|1||MRN900001^^^SYNTH HOSP&2.16.840.1.113883.19.999.1&ISO^MR||TESTPERSON^ALEXANDRA||19800229|F"
SCH = "|".join(
    [
        "SCH",
        "PL1^SYNEHR",
        "FL1^SYNSCHED^2.16.840.1.113883.19.999.4^ISO",
        "",
        "",
        "",
        "",
        "",
        "",
        "30",
        "min",
        "^^30^20250315090000^20250315093000",
    ]
    + [""] * 13
    + ["{}"]
)
VALID = {
    "proposed",
    "pending",
    "booked",
    "arrived",
    "fulfilled",
    "cancelled",
    "noshow",
    "entered-in-error",
    "checked-in",
    "waitlist",
}


def conv(trigger: str, *segments: str, status: str = "Booked", **kw: Any) -> Any:
    return _convert(msg(MSH.format(trigger), SCH.format(status), *segments), golden_settings(**kw))


def appointment(bundle: dict[str, Any]) -> dict[str, Any]:
    (a,) = resources(bundle, "Appointment")
    return a


def entry_of(bundle: dict[str, Any], resource: dict[str, Any]) -> dict[str, Any]:
    return next(e for e in bundle["entry"] if e["resource"] is resource)


GOLDEN = ["siu_s12", "siu_s13", "siu_s14", "siu_s15", "siu_s16", "siu_s17", "siu_s26", "siu_s12_dst"]


@pytest.mark.parametrize("name", GOLDEN)
def test_golden(name: str) -> None:
    result = _convert(load(name), golden_settings())
    validate_resources(result.bundle)
    got = {
        "bundle": result.bundle,
        "guards": [list(g) for g in result.guards],
        "events": dict(result.events),
        "requires": list(result.requires),
    }
    assert_golden(name, got)


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("siu_s12", "booked"),
        ("siu_s13", "booked"),
        ("siu_s14", "booked"),
        ("siu_s15", "cancelled"),
        ("siu_s16", "cancelled"),
        ("siu_s17", "entered-in-error"),
        ("siu_s26", "noshow"),
    ],
)
def test_lifecycle_updates_one_appointment(name: str, status: str) -> None:
    r = _convert(load(name), golden_settings())
    a = appointment(r.bundle)
    e = entry_of(r.bundle, a)
    assert e["request"] == {"method": "PUT", "url": KEY}
    booked = _convert(load("siu_s12"), golden_settings())
    assert e["fullUrl"] == entry_of(booked.bundle, appointment(booked.bundle))["fullUrl"]
    assert a["status"] == status
    assert dict(r.guards)[KEY] == APPOINTMENT_STATUS_RANK[status]


def test_book_fields() -> None:
    a = appointment(_convert(load("siu_s12"), golden_settings()).bundle)
    assert a["start"] == "2025-03-15T09:00:00-07:00" and a["end"] == "2025-03-15T09:30:00-07:00"
    assert a["minutesDuration"] == 30
    assert a["appointmentType"]["coding"][0]["code"] == "ROUTINE"
    assert a["serviceType"][0]["coding"][0]["code"] == "11429006"
    assert a["comment"].startswith("First visit.\nFasting not required.")
    assert "AIS: Bring previous imaging." in a["comment"]
    kinds = sorted(p["actor"]["reference"].startswith("urn:uuid:") for p in a["participant"])
    assert kinds == [True, True, True]
    assert len(a["participant"]) == 3  # patient, location, practitioner
    prac = a["participant"][2]
    assert prac["type"][0]["coding"][0]["code"] == "ATND"
    assert prac["period"] == {"start": "2025-03-15T09:00:00-07:00", "end": "2025-03-15T09:30:00-07:00"}
    codes = {i["type"]["coding"][0]["code"]: i["value"] for i in a["identifier"] if "type" in i}
    assert codes == {"PLAC": "APT-PL-77", "FILL": "APT-FL-77"}


def test_reschedule_moves_the_time() -> None:
    a = appointment(_convert(load("siu_s13"), golden_settings()).bundle)
    assert a["start"] == "2025-03-16T14:00:00-07:00" and a["end"] == "2025-03-16T14:30:00-07:00"


def test_cancel_keeps_reason_and_declines_participants() -> None:
    a = appointment(_convert(load("siu_s15"), golden_settings()).bundle)
    assert a["cancelationReason"]["coding"][0]["code"] == "PATREQ"


def test_late_booking_after_cancel_ranks_lower() -> None:
    cancel = _convert(load("siu_s15"), golden_settings())
    book = _convert(load("siu_s12"), golden_settings())
    assert dict(book.guards)[KEY] < dict(cancel.guards)[KEY]
    assert APPOINTMENT_STATUS_RANK["entered-in-error"] > APPOINTMENT_STATUS_RANK["cancelled"]


def test_status_maps_are_valid_fhir() -> None:
    assert set(FILLER_STATUS.values()) <= VALID
    for code, want in [
        ("Booked", "booked"),
        ("Cancelled", "cancelled"),
        ("Deleted", "entered-in-error"),
        ("Noshow", "noshow"),
        ("Complete", "fulfilled"),
        ("Started", "checked-in"),
        ("Pending", "pending"),
        ("Waitlist", "waitlist"),
    ]:
        assert appointment(conv("S14", PID, status=code).bundle)["status"] == want


def test_trigger_overrides_sch25() -> None:
    assert appointment(conv("S15", PID, status="Booked").bundle)["status"] == "cancelled"
    assert appointment(conv("S17", PID, status="Booked").bundle)["status"] == "entered-in-error"
    assert appointment(conv("S26", PID, status="Booked").bundle)["status"] == "noshow"


def test_cancel_before_book_creates_cancelled_by_default() -> None:
    r = conv("S15", PID)
    assert appointment(r.bundle)["status"] == "cancelled"
    assert not r.requires


def test_cancel_before_book_error_mode_requires_the_booking() -> None:
    r = conv("S15", PID, cancel_before_book="error")
    key = entry_of(r.bundle, appointment(r.bundle))["request"]["url"]
    assert r.requires == (key,)
    assert key not in dict(r.guards)  # a guard here would satisfy the requirement by itself
    # a booking is unaffected
    b = conv("S12", PID, cancel_before_book="error")
    assert not b.requires


def test_dst_end_computed_in_site_zone() -> None:
    a = appointment(_convert(load("siu_s12_dst"), golden_settings()).bundle)
    # 01:30 PST + 60 min = 03:30 PDT (the 02:00-03:00 hour does not exist that day)
    assert a["start"] == "2025-03-09T01:30:00-08:00"
    assert a["end"] == "2025-03-09T03:30:00-07:00"


def test_explicit_offset_kept() -> None:
    seg = "SCH|PL1|FL1^SYNSCHED^2.16.840.1.113883.19.999.4^ISO|||||||||^^^202503150900+0530^202503150930+0530"
    r = _convert(msg(MSH.format("S12"), seg + "||||||||||||||Booked", PID), golden_settings())
    a = appointment(r.bundle)
    assert a["start"] == "2025-03-15T09:00:00+05:30" and a["end"] == "2025-03-15T09:30:00+05:30"


def test_invalid_date_is_ae_102_with_location() -> None:
    seg = "SCH|PL1|FL1^SYNSCHED^2.16.840.1.113883.19.999.4^ISO|||||||||^^^20250231090000^20250315093000"
    with pytest.raises(ConversionError) as ei:
        _convert(msg(MSH.format("S12"), seg, PID), golden_settings(strictness="strict"))
    assert ei.value.hl7_error == "102"
    assert str(ei.value.location) == "SCH-11.4"


def test_placer_used_when_no_filler() -> None:
    seg = "SCH|PL1^^2.16.840.1.113883.19.999.5^ISO||||||||||^^^20250315090000^20250315093000"
    r = _convert(msg(MSH.format("S12"), seg, PID), golden_settings())
    key = entry_of(r.bundle, appointment(r.bundle))["request"]["url"]
    assert key == "Appointment?identifier=urn:oid:2.16.840.1.113883.19.999.5|PL1"


def test_no_id_is_ae_101() -> None:
    with pytest.raises(ConversionError) as ei:
        _convert(
            msg(MSH.format("S12"), "SCH|||||||||||^^^20250315090000^20250315093000", PID), golden_settings()
        )
    assert ei.value.hl7_error == "101"


def test_unsupported_trigger_is_ar_201() -> None:
    with pytest.raises(MessageRejected) as ei:
        conv("S18", PID)
    assert ei.value.hl7_error == "201"


def test_start_without_end_is_requested_period() -> None:
    seg = "SCH|PL1|FL1^SYNSCHED^2.16.840.1.113883.19.999.4^ISO|||||||||^^^20250315090000"
    r = _convert(msg(MSH.format("S12"), seg, PID), golden_settings())
    a = appointment(r.bundle)
    assert "start" not in a and a["requestedPeriod"] == [{"start": "2025-03-15T09:00:00-07:00"}]
    validate_resources(r.bundle)


def test_duration_gives_end() -> None:
    seg = "SCH|PL1|FL1^SYNSCHED^2.16.840.1.113883.19.999.4^ISO|||||||45|MIN|^^^20250315090000"
    a = appointment(_convert(msg(MSH.format("S12"), seg, PID), golden_settings()).bundle)
    assert a["end"] == "2025-03-15T09:45:00-07:00" and a["minutesDuration"] == 45


_BASE = load("siu_s12").text


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_messages_never_raise_anything_else(data: st.DataObject) -> None:
    text = _BASE
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(text) - 1))
        ch = data.draw(st.sampled_from([*list("|^~\\&\r0123456789ABSZ .-+:"), "\\.br\\"]))
        op = data.draw(st.sampled_from(["delete", "insert", "replace"]))
        if op == "delete":
            text = text[:i] + text[i + 1 :]
        elif op == "insert":
            text = text[:i] + ch + text[i:]
        else:
            text = text[:i] + ch + text[i + 1 :]
    try:
        result = _convert(parse(text), golden_settings())
    except SluiceError:
        return
    validate_resources(result.bundle)


@hsettings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="|^~&\\0123456789ABCmin+-", max_size=30), min_size=1, max_size=12))
def test_random_ais_aip_never_raise_anything_else(fields: list[str]) -> None:
    for name in ("AIS", "AIP", "AIL", "SCH"):
        try:
            segs = [SCH.format("Booked"), PID, name + "|" + "|".join(fields)]
            if name == "SCH":
                segs = [name + "|" + "|".join(fields), PID]
            _convert(msg(MSH.format("S12"), *segs), golden_settings())
        except SluiceError:
            pass


def test_siu_patient_is_a_conditional_create() -> None:
    bundle = _convert(load("siu_s12"), golden_settings()).bundle
    [pat] = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"]
    assert pat["request"]["method"] == "POST" and pat["request"]["ifNoneExist"].startswith("identifier=")


def test_patient_group_pv1_obx_dg1() -> None:
    """IG SIU_S12 PATIENT group: PV1 → Encounter (conditional create), OBX → Observation, DG1 → Condition,
    all for the same Patient; the Appointment is unchanged by them."""
    m = msg(
        MSH.format("S12^SIU_S12"),
        SCH.format("Booked"),
        PID,
        "PV1|1|O|CLINIC1^^^SYNTH HOSP||||||||||||||||V500^^^SYNTH HOSP&2.16.840.1.113883.19.999.2&ISO^VN",
        "OBX|1|NM|29463-7^Body weight^LN||72|kg^^UCUM|||||F",
        "DG1|1||R07.9^Chest pain, unspecified^I10",
        "AIP|1||1234567893^CARDIOLOGIST^CASEY^^^DR^^^^^^^NPI|ATND^Attender^HL70443",
    )
    bundle = _convert(m, golden_settings()).bundle
    validate_resources(bundle)
    (pat,) = resources(bundle, "Patient")
    (enc,) = resources(bundle, "Encounter")
    (obs,) = resources(bundle, "Observation")
    (cond,) = resources(bundle, "Condition")
    pat_ref = next(e["fullUrl"] for e in bundle["entry"] if e["resource"] is pat)
    enc_entry = next(e for e in bundle["entry"] if e["resource"] is enc)
    assert enc_entry["request"]["method"] == "POST"  # the ADT feed owns the Encounter
    assert enc["subject"] == {"reference": pat_ref} and enc["identifier"][0]["value"] == "V500"
    assert obs["subject"] == {"reference": pat_ref} and obs["encounter"] == {
        "reference": enc_entry["fullUrl"]
    }
    assert obs["valueQuantity"]["value"] == 72 and obs["code"]["coding"][0]["code"] == "29463-7"
    assert cond["subject"] == {"reference": pat_ref} and cond["code"]["coding"][0]["code"] == "R07.9"
    assert len(resources(bundle, "Appointment")) == 1


def _sch_with_contacts(placer: str, filler: str, enterer: str) -> str:
    """SCH with SCH-12 placer contact, SCH-16 filler contact and SCH-20 entered-by person."""
    fields = SCH.format("Booked").split("|")
    fields += [""] * (26 - len(fields))
    fields[12], fields[16], fields[20] = placer, filler, enterer
    return "|".join(fields)


CONTACT = "1234567893^SCHEDULER^SAM^^^^^^^^^^NPI"
ENTERER = "E42^CLERK^CARY^^^^^^SYNTH HOSP&2.16.840.1.113883.19.999.1&ISO"


def test_sch_contacts_become_practitioner_participants() -> None:
    """IG SCH[Appointment]: SCH-12 / SCH-16 / SCH-20 → participant.actor(Practitioner) with a type; the same
    person as placer and filler contact is one participant with both types; information-only."""
    m = msg(MSH.format("S12^SIU_S12"), _sch_with_contacts(CONTACT, CONTACT, ENTERER), PID)
    bundle = _convert(m, golden_settings()).bundle
    validate_resources(bundle)
    a = appointment(bundle)
    pracs = {p["identifier"][0]["value"]: p for p in resources(bundle, "Practitioner")}
    assert set(pracs) == {"1234567893", "E42"}
    assert pracs["1234567893"]["identifier"][0]["system"] == "http://hl7.org/fhir/sid/us-npi"
    refs = {entry_of(bundle, p)["fullUrl"]: v for v, p in pracs.items()}
    contacts = [p for p in a["participant"] if p["actor"].get("reference") in refs]
    assert len(contacts) == 2
    by_id = {refs[p["actor"]["reference"]]: p for p in contacts}
    codes = [t["coding"][0]["code"] for t in by_id["1234567893"]["type"]]
    assert codes == ["placer-contact", "filler-contact"]
    (enterer_type,) = by_id["E42"]["type"]
    assert enterer_type["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
        "code": "enterer",
        "display": "Enterer",
    }
    assert all(p["required"] == "information-only" and p["status"] == "accepted" for p in contacts)
    # the patient participant is still first and still required
    assert a["participant"][0]["required"] == "required"
    # the Practitioner is a conditional create keyed by its NPI (resend never duplicates, never rewrites)
    assert entry_of(bundle, pracs["1234567893"])["request"] == {
        "method": "POST",
        "url": "Practitioner",
        "ifNoneExist": "identifier=http://hl7.org/fhir/sid/us-npi|1234567893",
    }


def test_sch_contact_phone_and_address_go_on_the_practitioner() -> None:
    """SCH-13/14 (placer contact phone/address), SCH-21 (entered-by phone) → the contact's Practitioner."""
    sch = _sch_with_contacts(CONTACT, "", ENTERER).split("|")
    sch[13] = "^WPN^PH^^1^555^5550142"
    sch[14] = "1 SYNTHETIC WAY^^SPRINGFIELD^OR^97401^USA"
    sch[21] = "^WPN^PH^^1^555^5550143"
    bundle = _convert(msg(MSH.format("S12^SIU_S12"), "|".join(sch), PID), golden_settings()).bundle
    validate_resources(bundle)
    pracs = {p["identifier"][0]["value"]: p for p in resources(bundle, "Practitioner")}
    placer, enterer = pracs["1234567893"], pracs["E42"]
    assert [(t["system"], t["use"]) for t in placer["telecom"]] == [("phone", "work")]
    assert "5550142" in placer["telecom"][0]["value"]
    assert placer["address"][0]["city"] == "SPRINGFIELD"
    assert "5550143" in enterer["telecom"][0]["value"]
    assert "address" not in enterer  # SCH-20's person has no address field


def test_pid21_mother_related_person_in_siu() -> None:
    """PID-21 → RelatedPerson (mother) in SIU as in ADT: same key, so both feeds write one resource."""
    pid = PID + "|||||||||||||MOM77^^^SYNTH HOSP&2.16.840.1.113883.19.999.1&ISO^MR"
    bundle = _convert(msg(MSH.format("S12^SIU_S12"), SCH.format("Booked"), pid), golden_settings()).bundle
    validate_resources(bundle)
    (mother,) = resources(bundle, "RelatedPerson")
    assert mother["relationship"][0]["coding"][0]["code"] == "MTH"
    assert any(i["value"] == "MOM77" for i in mother["identifier"])
    adt = msg("MSH|^~\\&|SYNTH|SYNTH HOSP|SLUICE|SLUICE|20250315090000||ADT^A08^ADT_A01|A1|P|2.5.1", pid)
    adt_bundle = _convert(adt, golden_settings()).bundle
    (adt_mother,) = resources(adt_bundle, "RelatedPerson")
    assert entry_of(adt_bundle, adt_mother)["request"] == entry_of(bundle, mother)["request"]


def test_sch_contact_without_id_is_display_only() -> None:
    m = msg(MSH.format("S12^SIU_S12"), _sch_with_contacts("^DESK^DANA", "", ""), PID)
    bundle = _convert(m, golden_settings()).bundle
    validate_resources(bundle)
    a = appointment(bundle)
    assert not resources(bundle, "Practitioner")
    (contact,) = [p for p in a["participant"] if "type" in p]
    assert contact["actor"] == {"display": "DANA DESK"}


def test_aig_becomes_typed_participant() -> None:
    """IG AIG[Appointment]: AIG-4 → participant.type, AIG-8 + AIG-11/12 → period, AIG-14 → status; no actor
    (the IG maps AIG-3 only for locations, without saying how to tell)."""
    m = msg(
        MSH.format("S12^SIU_S12"),
        SCH.format("Booked"),
        PID,
        "RGS|1|A",
        "AIG|1|A|EQ5^Video scope^L|101^Equipment^L||||20250315090000|||20|min||Booked",
        "AIG|2|A|EQ6^Cart^L|||||20250315090000",
    )
    result = _convert(m, golden_settings())
    validate_resources(result.bundle)
    a = appointment(result.bundle)
    typed = [p for p in a["participant"] if "actor" not in p]
    assert len(typed) == 1
    (p,) = typed
    assert p["type"][0]["coding"][0]["code"] == "101"
    assert p["status"] == "accepted"
    assert p["period"] == {"start": "2025-03-15T09:00:00-07:00", "end": "2025-03-15T09:20:00-07:00"}
    assert result.events.get("aig_without_type") == 1


def test_sch26_27_make_the_service_request_the_appointment_is_based_on() -> None:
    """IG SIU_S12: IF SCH-26 or SCH-27 VALUED → ServiceRequest (placer/filler order numbers), Appointment.basedOn;
    a conditional create keyed like the ORU's order, so both meet in one ServiceRequest."""
    sch = SCH.format("Booked") + "|ORD-77^SYNEHR^2.16.840.1.113883.19.999.7^ISO|FORD-77^SYNLAB"
    m = msg(
        MSH.format("S12^SIU_S12"),
        sch,
        PID,
        "RGS|1",
        "AIS|1|A|45378-8^Colonoscopy^LN|20250315090000|||30|min",
    )
    bundle = _convert(m, golden_settings()).bundle
    validate_resources(bundle)
    (sr,) = resources(bundle, "ServiceRequest")
    assert sr["status"] == "active" and sr["intent"] == "order"
    assert [(i["value"], i["type"]["coding"][0]["code"]) for i in sr["identifier"]] == [
        ("ORD-77", "PLAC"),
        ("FORD-77", "FILL"),
    ]
    assert sr["code"]["coding"][0]["code"] == "45378-8"
    (pat,) = resources(bundle, "Patient")
    assert sr["subject"]["reference"] == entry_of(bundle, pat)["fullUrl"]
    assert appointment(bundle)["basedOn"] == [{"reference": entry_of(bundle, sr)["fullUrl"]}]
    req = entry_of(bundle, sr)["request"]
    assert req["method"] == "POST"
    assert req["ifNoneExist"] == "identifier=urn:oid:2.16.840.1.113883.19.999.7|ORD-77"
    # the cancellation revokes an order it creates (a conditional create: it never changes an existing one)
    cancelled = _convert(
        msg(MSH.format("S15^SIU_S12"), sch.replace("Booked", "Cancelled"), PID), golden_settings()
    )
    (sr2,) = resources(cancelled.bundle, "ServiceRequest")
    assert sr2["status"] == "revoked"


def test_order_numbers_without_a_patient_make_no_service_request_and_say_so() -> None:
    """ServiceRequest.subject is 1..1: an SIU with SCH-26 but no PID (an AIL-only booking) keeps its Appointment,
    writes no ServiceRequest, and says why in a located warning (found by the mutation test above)."""
    sch = SCH.format("Booked") + "|ORD-77^SYNEHR^2.16.840.1.113883.19.999.7^ISO"
    m = msg(MSH.format("S12^SIU_S12"), sch, "RGS|1", "AIL|1||ROOM1^^^SYNTH HOSP")
    result = _convert(m, golden_settings())
    validate_resources(result.bundle)
    assert resources(result.bundle, "ServiceRequest") == [] and "basedOn" not in appointment(result.bundle)
    assert list(result.warning_kinds) == ["order_without_patient"]
    assert result.warnings[0].startswith("SCH-26: ")


def test_no_order_numbers_no_service_request() -> None:
    m = msg(MSH.format("S12^SIU_S12"), SCH.format("Booked"), PID, "RGS|1", "AIS|1|A|45378-8^Colonoscopy^LN")
    bundle = _convert(m, golden_settings()).bundle
    assert resources(bundle, "ServiceRequest") == [] and "basedOn" not in appointment(bundle)
