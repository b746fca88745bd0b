"""ADT identity events (transforms/adt_events.py): merges, moves, identifier changes, links, A20, A29, IAM.

The golden files (adt_a17 ... adt_a60) are checked by test_adt.py; these tests state the rules."""

from __future__ import annotations

from typing import Any

import pytest

from engine.errors import ConversionError, MessageRejected
from transforms.convert import convert, convert_report

from .conftest import golden_settings, load, msg, resources, validate_resources

MRN = "urn:oid:2.16.840.1.113883.19.5"
VISITS = "urn:oid:2.16.840.1.113883.19.6"
H = "MSH|^~\\&|SYNTH-ADT|GOODHOSP|SLUICE|SLUICE|20250316090000||ADT^{t}|CTRL-{t}|P|2.5.1"
PID1 = "PID|1||MRN10001^^^HOSP^MR||TESTPATIENT^ALEX||19800229|F||||||||||ACC500^^^HOSP^AN"
PID2 = "PID|2||MRN10002^^^HOSP^MR||SAMPLE^JORDAN||19750101|M"
PV1 = "PV1|1|I|4WEST^401^A^GOODHOSP||||||||MED||||||||V100^^^VISITS^VN"


def urls(bundle: dict[str, Any]) -> list[str]:
    return [e["request"]["url"] for e in bundle["entry"]]


def test_identifier_change_updates_the_record_known_by_the_old_identifier() -> None:
    r = convert_report(load("adt_a47"), golden_settings())
    validate_resources(r.bundle)
    (entry,) = [e for e in r.bundle["entry"] if e["resource"]["resourceType"] == "Patient"]
    # the PUT addresses the old identifier: the same resource (its encounters, results) gets the new one
    assert entry["request"] == {"method": "PUT", "url": f"Patient?identifier={MRN}|MRN09999"}
    idents = {(i.get("system"), i["value"], i.get("use")) for i in entry["resource"]["identifier"]}
    assert (MRN, "MRN10001", None) in idents
    assert (MRN, "MRN09999", "old") in idents
    assert r.requires == (f"Patient?identifier={MRN}|MRN09999",)
    # a resend addresses the same resource (the old identifier stays on it)
    assert convert(load("adt_a47"), golden_settings()) == r.bundle


def test_identifier_change_to_the_same_identifier_is_located() -> None:
    with pytest.raises(ConversionError) as ei:
        convert(msg(H.format(t="A47"), PID1, "MRG|MRN10001^^^HOSP^MR"), golden_settings())
    assert ei.value.hl7_error == "204" and ei.value.location is not None
    assert ei.value.location.hl7() == "MRG^1^1"


@pytest.mark.parametrize("trigger", ["A18", "A30", "A34", "A39", "A40"])
def test_patient_merges(trigger: str) -> None:
    b = convert(msg(H.format(t=trigger), PID1, "MRG|MRN09999^^^HOSP^MR"), golden_settings())
    validate_resources(b)
    survivor, prior = resources(b, "Patient")
    assert survivor["link"][0]["type"] == "replaces"
    assert prior["active"] is False and prior["link"][0]["type"] == "replaced-by"


def test_merge_without_mrg_is_located() -> None:
    with pytest.raises(ConversionError) as ei:
        convert(msg(H.format(t="A34"), PID1), golden_settings())
    assert ei.value.hl7_error == "100" and ei.value.location is not None


def test_a39_groups_each_merge_and_a_pid_without_mrg_is_an_update_with_a_warning() -> None:
    m = msg(H.format(t="A39"), PID1, "MRG|MRN09999^^^HOSP^MR", PID2)
    r = convert_report(m, golden_settings())
    assert r.events["merge_group_without_mrg"] == 1
    assert any("PID" in w for w in r.warnings)
    assert len(resources(r.bundle, "Patient")) == 3


def test_account_merge_keeps_both_accounts_and_links_them() -> None:
    r = convert_report(load("adt_a41"), golden_settings())
    validate_resources(r.bundle)
    survivor, prior = resources(r.bundle, "Account")
    assert survivor["status"] == "active" and prior["status"] == "inactive"
    (linkage,) = resources(r.bundle, "Linkage")
    kinds = [i["type"] for i in linkage["item"]]
    assert kinds == ["source", "alternate"]
    assert r.requires == (f"Account?identifier={MRN}|ACC499",)


@pytest.mark.parametrize("strictness", ["lenient", "strict"])
def test_account_merge_without_the_prior_account_is_rejected_in_both_modes(strictness: str) -> None:
    """MRG-3 is the key of an account merge (v2.8 3.3.41: MRG-3 merged into PID-18): an A41 whose MRG has only
    MRG-1 is AE 101 at MRG-3 even under strictness lenient; its Patient/Encounter are not written without it
    (docs/mapping.md)."""
    m = msg(H.format(t="A41"), PID1, "MRG|MRN09999^^^HOSP^MR", PV1)
    with pytest.raises(ConversionError) as ei:
        convert(m, golden_settings(strictness=strictness))
    assert ei.value.hl7_error == "101" and str(ei.value.location) == "MRG-3"
    assert "send the account being merged" in str(ei.value)


def test_visit_merge_marks_the_prior_visit_a_duplicate_of_the_survivor() -> None:
    b = convert(load("adt_a42"), golden_settings())
    validate_resources(b)
    by_url = {e["request"]["url"]: e for e in b["entry"]}
    survivor = by_url[f"Encounter?identifier={VISITS}|V100"]
    prior = by_url[f"Encounter?identifier={VISITS}|V099"]["resource"]
    assert prior["status"] == "entered-in-error"
    assert prior["partOf"] == {"reference": survivor["fullUrl"]}


def test_visit_number_change_updates_the_prior_encounter() -> None:
    r = convert_report(load("adt_a50"), golden_settings())
    assert f"Encounter?identifier={VISITS}|V099" in urls(r.bundle)
    assert f"Encounter?identifier={VISITS}|V100" not in urls(r.bundle)
    (enc,) = resources(r.bundle, "Encounter")
    assert {i["value"] for i in enc["identifier"]} >= {"V100", "V099"}
    assert r.requires == (f"Encounter?identifier={VISITS}|V099",)


def test_moves_rewrite_the_subject() -> None:
    b = convert(load("adt_a45"), golden_settings())
    (patient,) = [e for e in b["entry"] if e["resource"]["resourceType"] == "Patient"]
    (enc,) = resources(b, "Encounter")
    assert enc["subject"] == {"reference": patient["fullUrl"]}
    assert patient["request"]["url"].endswith("|MRN10002")
    b = convert(load("adt_a44"), golden_settings())
    (account,) = resources(b, "Account")
    assert account["subject"][0]["reference"] == b["entry"][0]["fullUrl"]


def test_link_and_unlink() -> None:
    b = convert(load("adt_a24"), golden_settings())
    a, c = [e for e in b["entry"] if e["resource"]["resourceType"] == "Patient"]
    assert a["resource"]["link"] == [{"other": {"reference": c["fullUrl"]}, "type": "seealso"}]
    assert c["resource"]["link"] == [{"other": {"reference": a["fullUrl"]}, "type": "seealso"}]
    b = convert(msg(H.format(t="A37"), PID1, PID2), golden_settings())
    assert all("link" not in p for p in resources(b, "Patient"))
    with pytest.raises(ConversionError):
        convert(msg(H.format(t="A24"), PID1), golden_settings())


def test_delete_person_writes_an_inactive_patient_and_what_its_segments_carry() -> None:
    """A29 (structure ADT_A21, the segments of the IG's ADT_A09 map): the Patient is inactive; PID-18, a PV1
    with a visit and OBX convert as in the other ADT_A21 events; a placeholder PV1 (``PV1|1|N``) has no visit."""
    b = convert(load("adt_a29"), golden_settings())
    validate_resources(b)
    (p,) = resources(b, "Patient")
    assert p["active"] is False
    assert not resources(b, "Encounter")
    assert [a["status"] for a in resources(b, "Account")] == ["active"]
    obx = "OBX|1|NM|8867-4^Heart rate^LN||60|/min^^UCUM|||||F|||20250316080000"
    b = convert(msg(H.format(t="A29"), PID1, PV1, obx), golden_settings())
    validate_resources(b)
    (p,) = resources(b, "Patient")
    (enc,) = resources(b, "Encounter")
    (ob,) = resources(b, "Observation")
    assert p["active"] is False and enc["subject"] == ob["subject"]


@pytest.mark.parametrize(
    ("trigger", "status"),
    [
        ("A21", "onleave"),
        ("A22", "in-progress"),
        ("A23", "entered-in-error"),
        ("A32", "in-progress"),
        ("A33", "in-progress"),
        ("A38", "cancelled"),
    ],
)
def test_visit_events(trigger: str, status: str) -> None:
    b = convert(msg(H.format(t=trigger), PID1, PV1), golden_settings())
    validate_resources(b)
    (enc,) = resources(b, "Encounter")
    assert enc["status"] == status


def test_swap_writes_both_visits() -> None:
    b = convert(load("adt_a17"), golden_settings())
    encs = resources(b, "Encounter")
    assert len(encs) == 2
    patients = [e["fullUrl"] for e in b["entry"] if e["resource"]["resourceType"] == "Patient"]
    assert [e["subject"]["reference"] for e in encs] == patients


def test_bed_status() -> None:
    b = convert(load("adt_a20"), golden_settings())
    statuses = [loc["operationalStatus"] for loc in resources(b, "Location") if "operationalStatus" in loc]
    assert statuses == [
        {"system": "http://terminology.hl7.org/CodeSystem/v2-0116", "code": "H", "display": "Housekeeping"}
    ]
    with pytest.raises(ConversionError) as ei:
        convert(msg(H.format(t="A20")), golden_settings())
    assert ei.value.location is not None


def test_iam_allergies_and_their_deletion() -> None:
    b = convert(load("adt_a60"), golden_settings())
    validate_resources(b)
    added, deleted = resources(b, "AllergyIntolerance")
    assert added["verificationStatus"]["coding"][0]["code"] == "confirmed"
    assert added["clinicalStatus"]["coding"][0]["code"] == "active"
    assert added["criticality"] == "high" and added["type"] == "allergy"
    assert [m["text"] for m in added["reaction"][0]["manifestation"]] == ["Hives", "Wheezing"]
    assert added["reaction"][1]["manifestation"][0]["coding"][0]["code"] == "271807003"
    assert added["note"] == [{"text": "Reaction observed in clinic."}]
    # IAM-6 D: the same allergy (IAM-7) entered in error, without clinicalStatus (FHIR ait-2)
    assert deleted["verificationStatus"]["coding"][0]["code"] == "entered-in-error"
    assert "clinicalStatus" not in deleted
    iam_add = "IAM|1|FA|91935009^Peanut^SCT|MI||A|ALG-78^^2.16.840.1.113883.19.9^ISO"
    iam_del = "IAM|1|FA|91935009^Peanut^SCT|MI||D|ALG-78^^2.16.840.1.113883.19.9^ISO"
    first = convert(msg(H.format(t="A60"), PID1, iam_add), golden_settings())
    second = convert(msg(H.format(t="A60"), PID1, iam_del), golden_settings())
    assert [e["request"]["url"] for e in first["entry"] if "Allergy" in e["request"]["url"]] == [
        e["request"]["url"] for e in second["entry"] if "Allergy" in e["request"]["url"]
    ]


def test_move_by_identifier_list_is_rejected_with_what_to_do() -> None:
    with pytest.raises(MessageRejected) as ei:
        convert(msg(H.format(t="A43"), PID1, "MRG|MRN09999^^^HOSP^MR"), golden_settings())
    assert ei.value.hl7_error == "201"
    assert "A40" in str(ei.value)


def test_adt_writes_the_account_and_procedures_of_the_ig_adt_map() -> None:
    """IG ADT_A01: PID-18 → Account (subject the Patient), each PR1 → Procedure of the visit."""
    pr1 = "PR1|1||0DTJ4ZZ^Appendectomy^ICD10PCS|Appendectomy|20250315120000|D^Diagnostic^HL70230"
    b = convert(msg(H.format(t="A01"), PID1, PV1, pr1), golden_settings())
    validate_resources(b)
    by_type = {e["resource"]["resourceType"]: e for e in b["entry"]}
    account = by_type["Account"]
    assert account["request"]["url"] == f"Account?identifier={MRN}|ACC500"
    assert account["resource"]["subject"] == [{"reference": by_type["Patient"]["fullUrl"]}]
    proc = by_type["Procedure"]["resource"]
    assert proc["encounter"] == {"reference": by_type["Encounter"]["fullUrl"]}
    # IG PR1[Procedure]: status by message context, "unknown" if not clear (an ADT does not say)
    assert proc["code"]["coding"][0]["code"] == "0DTJ4ZZ" and proc["status"] == "unknown"
    assert proc["category"]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/v2-0230",
        "code": "D",
        "display": "Diagnostic",
    }
    # no PID-18, no PR1: neither
    b = convert(msg(H.format(t="A01"), PID2, PV1), golden_settings())
    assert not resources(b, "Account") and not resources(b, "Procedure")


def test_iam_reported_by_is_the_asserter_per_iam_15() -> None:
    """IAM-14 reported by → asserter (the IG says recorder; Sluice keeps IAM-23 there), by IAM-15 as the IG says:
    SEL the Patient, another relationship a RelatedPerson (IAM-15 through the Relationship map; the NK1's own
    RelatedPerson when it is that NK1; a conditional create otherwise), none the name alone."""
    fields = ["IAM", "1", "FA", "12345^Peanut Allergy^L", "", "", "A", "ALG-9^^2.16.840.1.113883.19.9^ISO"]
    fields += [""] * 6 + ["DOE^ROSA", "SPO^Spouse"] + [""] * 7
    fields += ["1234567890^PRACTICE^PAT^^^DR^^^NPI^L^^^NPI"]
    assert fields[14] == "DOE^ROSA" and fields[15].startswith("SPO") and fields[23].startswith("1234567890")
    iam = "|".join(fields)
    b = convert(msg(H.format(t="A60"), PID1, iam), golden_settings())
    validate_resources(b)
    (allergy,) = resources(b, "AllergyIntolerance")
    (spouse,) = resources(b, "RelatedPerson")
    entry = next(e for e in b["entry"] if e["resource"] is spouse)
    assert allergy["asserter"] == {"reference": entry["fullUrl"], "display": "ROSA DOE"}
    assert allergy["recorder"]["display"] == "DR PAT PRACTICE"  # IAM-23
    assert entry["request"]["method"] == "POST"
    assert spouse["relationship"][0]["coding"][0]["code"] == "SPS" and spouse["name"][0]["family"] == "DOE"
    # the same person as an NK1 of the message: one RelatedPerson, the NK1's (a full update)
    b = convert(
        msg(H.format(t="A60"), PID1, "NK1|1|DOE^ROSA|SPO^Spouse|1 MAIN ST^^TOWN", iam), golden_settings()
    )
    (spouse,) = resources(b, "RelatedPerson")
    assert (
        spouse["address"]
        and next(e for e in b["entry"] if e["resource"] is spouse)["request"]["method"] == "PUT"
    )
    b = convert(msg(H.format(t="A60"), PID1, iam.replace("SPO^Spouse", "SEL")), golden_settings())
    (patient,) = [e for e in b["entry"] if e["resource"]["resourceType"] == "Patient"]
    assert resources(b, "AllergyIntolerance")[0]["asserter"] == {"reference": patient["fullUrl"]}
    assert not resources(b, "RelatedPerson")
    b = convert(msg(H.format(t="A60"), PID1, iam.replace("SPO^Spouse", "")), golden_settings())
    assert resources(b, "AllergyIntolerance")[0]["asserter"] == {"display": "ROSA DOE"}


def test_iam_clinician_code_and_initial_recording() -> None:
    """IAM-27 is a further coding of the allergen; IAM-24 (initially recorded) wins over IAM-13 (reported)."""
    fields = ["IAM", "1", "FA", "12345^Peanut Allergy^L", "", "", "A", "ALG-9^^2.16.840.1.113883.19.9^ISO"]
    fields += [""] * 5 + ["20201005"] + [""] * 9
    fields += ["1234567890^PRACTICE^PAT^^^DR^^^NPI^L^^^NPI", "20201010160000", "", "", "91935009^Peanut^SCT"]
    assert fields[13] == "20201005" and fields[23].startswith("1234567890") and fields[27].startswith("9193")
    b = convert(msg(H.format(t="A60"), PID1, "|".join(fields)), golden_settings())
    validate_resources(b)
    (allergy,) = resources(b, "AllergyIntolerance")
    assert [c["code"] for c in allergy["code"]["coding"]] == ["12345", "91935009"]
    assert allergy["recordedDate"].startswith("2020-10-10T16:00")
    assert allergy["recorder"]["reference"].startswith("urn:uuid:")
