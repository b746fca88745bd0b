"""Unit tests of the field-level scorer (synthetic bundles only)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from conformance.score import RULES, Score, compare_dates, norm_system, score_bundles


def _entry(resource: dict[str, Any], n: int) -> dict[str, Any]:
    rid = f"id-{n}"
    return {
        "fullUrl": f"urn:uuid:00000000-0000-0000-0000-{n:012d}",
        "resource": {**resource, "id": rid},
        "request": {"method": "PUT", "url": f"{resource['resourceType']}/{rid}"},
    }


PATIENT = {
    "resourceType": "Patient",
    "identifier": [{"system": "urn:oid:1.2.3.4", "value": "MRN001"}],
    "name": [{"family": "TESTPERSON", "given": ["ALEX", "Q"]}],
    "birthDate": "1980-02-03",
    "gender": "female",
    "address": [{"line": ["1 Example Way"], "city": "Springfield", "state": "ZZ", "postalCode": "00000"}],
    "telecom": [{"system": "phone", "value": "(555) 010-0000", "use": "home"}],
}


def _obs(code: str, value: float, when: str, status: str = "final") -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": status,
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "valueQuantity": {"value": value, "unit": "mg/dL"},
        "effectiveDateTime": when,
    }


def bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [_entry(r, n) for n, r in enumerate(resources)],
    }


def sample() -> dict[str, Any]:
    return bundle(
        PATIENT,
        {
            "resourceType": "Encounter",
            "status": "in-progress",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
            "identifier": [{"value": "V100"}],
            "period": {"start": "2024-01-01T10:00:00-08:00"},
        },
        _obs("1111-1", 5.5, "2024-01-01T10:00:00-08:00"),
        _obs("2222-2", 7, "2024-01-01T10:05:00-08:00", "preliminary"),
    )


def test_identical_bundles_agree_fully() -> None:
    b = sample()
    s = score_bundles(b, copy.deepcopy(b))
    assert s.compared > 20
    assert s.agreeing == s.compared
    assert s.percent == 100.0
    assert s.diffs == []
    for cat in (
        "identifiers",
        "names",
        "birthDate",
        "gender",
        "addresses",
        "telecom",
        "periods",
        "codes",
        "values",
        "statuses",
    ):
        assert s.by_category[cat][0] >= 1, cat


def test_changed_gender_and_birthdate_are_caught() -> None:
    expected = sample()
    ours = copy.deepcopy(expected)
    ours["entry"][0]["resource"]["gender"] = "male"
    ours["entry"][0]["resource"]["birthDate"] = "1980-02-04"
    s = score_bundles(ours, expected)
    assert s.compared - s.agreeing == 2
    paths = {d.path: d for d in s.diffs}
    assert paths["Patient[MRN001].gender"].ours == "male"
    assert paths["Patient[MRN001].gender"].expected == "female"
    assert paths["Patient[MRN001].birthDate"].ours == "1980-02-04"
    assert all(not d.explanation for d in s.diffs)
    assert s.percent is not None and s.percent < 100


def test_ids_and_fullurls_are_ignored() -> None:
    expected = sample()
    ours = copy.deepcopy(expected)
    for n, e in enumerate(ours["entry"]):
        e["fullUrl"] = f"urn:uuid:ffffffff-0000-0000-0000-{n:012d}"
        e["resource"]["id"] = f"other-{n}"
        e["request"] = {"method": "PUT", "url": f"{e['resource']['resourceType']}?identifier=x|{n}"}
    ours["type"] = "batch"
    s = score_bundles(ours, expected)
    assert s.agreeing == s.compared


def test_resources_are_matched_by_identity_not_position() -> None:
    expected = sample()
    ours = copy.deepcopy(expected)
    ours["entry"].reverse()
    s = score_bundles(ours, expected)
    assert s.agreeing == s.compared
    # swapping the two observations' values is caught although both positions hold an Observation
    ours["entry"][0]["resource"]["valueQuantity"]["value"] = 5.5
    ours["entry"][1]["resource"]["valueQuantity"]["value"] = 7
    s = score_bundles(ours, expected)
    assert {d.path for d in s.diffs} == {
        "Observation[1111-1@2024-01-01T10:00:00-08:00].valueQuantity.value",
        "Observation[2222-2@2024-01-01T10:05:00-08:00].valueQuantity.value",
    }


def test_missing_resource_counts_against_us() -> None:
    expected = sample()
    ours = copy.deepcopy(expected)
    del ours["entry"][3]
    s = score_bundles(ours, expected)
    assert s.unmatched == ["Observation[2222-2@2024-01-01T10:05:00-08:00]"]
    assert s.compared > s.agreeing
    assert any(d.category == "resource" for d in s.diffs)


def test_extra_fields_and_resources_of_ours_are_not_penalised() -> None:
    expected = sample()
    ours = copy.deepcopy(expected)
    ours["entry"][0]["resource"]["identifier"].append({"system": "urn:sluice:key", "value": "k"})
    ours["entry"][0]["resource"]["maritalStatus"] = {"coding": [{"code": "M"}]}
    ours["entry"].append(_entry({"resourceType": "Practitioner", "name": [{"family": "DOC"}]}, 99))
    s = score_bundles(ours, expected)
    assert s.agreeing == s.compared


def test_normalisation_of_dates_systems_and_phones() -> None:
    expected = sample()
    ours = copy.deepcopy(expected)
    obs = ours["entry"][2]["resource"]
    obs["effectiveDateTime"] = "2024-01-01T18:00:00Z"  # the same instant as 10:00-08:00
    obs["code"]["coding"][0]["system"] = "urn:oid:2.16.840.1.113883.6.1"  # LOINC by OID
    ours["entry"][0]["resource"]["telecom"][0]["value"] = "555-010-0000"
    ours["entry"][0]["resource"]["identifier"][0]["system"] = "URN:OID:1.2.3.4"
    s = score_bundles(ours, expected)
    assert s.agreeing == s.compared, s.diffs


ICD9CM = "http://hl7.org/fhir/sid/icd-9-cm"
V2_0131 = "http://terminology.hl7.org/CodeSystem/v2-0131"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
MSH_LINE = "MSH|^~\\&|A|B|C|D|20250101||ADT^A01|1|P|2.5\r"


def test_ms_placeholder_system_is_explained_only_with_its_authority_in_the_source() -> None:
    expected = sample()
    expected["entry"][0]["resource"]["identifier"][0]["system"] = (
        "http://example.com/v2-to-fhir-converter/Identifier/HOSP"
    )
    ours = copy.deepcopy(sample())
    ours["entry"][0]["resource"]["identifier"][0]["system"] = "urn:sluice:authority:HOSP"
    src = MSH_LINE + "PID|1||MRN001^^^HOSP^MR||TESTPERSON^ALEX\r"
    s = score_bundles(ours, expected, source=src)
    assert s.explained == 1
    assert s.agreeing == s.compared - 1
    assert s.percent == 100.0
    assert s.raw_percent is not None and s.raw_percent < 100
    (diff,) = s.diffs
    assert diff.path == "Patient[MRN001].identifier[MRN001].system"
    assert diff.rule == "ms-placeholder" and "PID-3" in diff.explanation
    assert s.explained_by == {"ms-placeholder": 1}
    # no evidence: no source; the authority named only in another field than the identifier's
    for source in (None, MSH_LINE + "PID|1||MRN001^^^OTHER^MR|X9^^^HOSP|TESTPERSON^ALEX\r"):
        s = score_bundles(ours, expected, source=source)
        assert s.explained == 0 and s.compared - s.agreeing == 1, source
        assert s.diffs[0].rule == "" and s.diffs[0].explanation == ""


def test_ms_field_placeholder_needs_the_value_in_that_field() -> None:
    """``.../sid/us-medicaid`` is named after IN2-8 (Medicaid Case Number), not after a name in the message."""
    medicaid = {"system": "http://hl7.org/fhir/sid/us-medicaid", "value": "MC-8"}
    ours = bundle({"resourceType": "Patient", "identifier": [{"value": "M1"}, medicaid]})
    ref = bundle(
        {
            "resourceType": "Patient",
            "identifier": [
                {"value": "M1"},
                {"system": "http://example.com/v2-to-fhir-converter/sid/us-medicaid", "value": "MC-8"},
            ],
        }
    )
    head = MSH_LINE + "PID|1||M1^^^H^MR||DOE^ANN\r"
    s = score_bundles(ours, ref, source=head + "IN1|1|P1\rIN2|1|||||||MC-8\r")
    assert s.explained_by == {"ms-placeholder": 1} and "IN2-8" in s.diffs[0].explanation
    s = score_bundles(ours, ref, source=head + "IN1|1|P1\rIN2|1||||||||MC-8\r")  # IN2-9, not IN2-8
    assert s.explained == 0 and len(s.diffs) == 1


def test_compare_dates() -> None:
    assert compare_dates("2014-10-06T09:29:00+07:00", "2014-10-06T07:59:00+05:30")
    assert compare_dates("2014-10-06T09:29:00+07:00", "2014-10-06T09:29+07:00")
    assert compare_dates("1988-08-18", "1988-08-18")
    assert not compare_dates("1988-08-18", "1988-08-18T10:00:00+00:00")  # precision differs
    assert not compare_dates("2014-10-06T09:29:00+07:00", "2014-10-06T09:30:00+07:00")
    assert not compare_dates("2020-01-01T10:00:00-08:00", "2020-01-01T10:00:00+05:30")


def test_same_wall_clock_at_another_offset_is_an_unexplained_difference() -> None:
    """No rule excuses a time with the MS build host's +05:30 (there is none: it excused nothing)."""
    expected = sample()
    expected["entry"][1]["resource"]["period"]["start"] = "2024-01-01T10:00:00+05:30"
    src = MSH_LINE + "PID|1||MRN001^^^H^MR||TESTPERSON^ALEX\rPV1|1|I\r"
    s = score_bundles(sample(), expected, source=src)
    (diff,) = s.diffs
    assert diff.path.endswith(".period.start") and diff.explanation == "" and s.explained == 0


def test_norm_system_is_case_insensitive_and_aliases_oids() -> None:
    assert norm_system("HTTP://LOINC.ORG/") == norm_system("http://loinc.org")
    assert norm_system("urn:oid:2.16.840.1.113883.6.96") == "http://snomed.info/sct"


def test_values_only_in_ig_unmapped_segments_are_explained() -> None:
    from conformance.score import score_bundles as sb

    src = "MSH|^~\\&|A|B|C|D|20250101||ADT^A01|1|P|2.5\rPID|1||MRN1^^^H||DOE^JANE\rGT1|1|G-77^^^H|ROE^RICK\r"
    ours = {
        "resourceType": "Bundle",
        "entry": [{"resource": {"resourceType": "Patient", "identifier": [{"value": "MRN1"}]}}],
    }
    ref = {
        "resourceType": "Bundle",
        "entry": [
            {
                "resource": {
                    "resourceType": "Patient",
                    "identifier": [{"value": "MRN1"}, {"value": "G-77"}, {"value": "X-1"}],
                }
            }
        ],
    }
    s = sb(ours, ref, source=src)
    assert s.compared == 3 and s.agreeing == 1 and s.explained == 1  # G-77 is GT1-only; X-1 is not explained
    assert [d.expected for d in s.diffs if not d.explanation] == ["X-1"]


def test_called_by_appended_to_given_is_explained_only_with_xpn15_in_the_source() -> None:
    """MS appends XPN-15 to given; Sluice puts it in a nickname name (IG): explained when the message's
    XPN carries that XPN-15, counted otherwise."""
    ours = {
        "resourceType": "Patient",
        "identifier": [{"value": "1"}],
        "name": [{"family": "DOE", "given": ["ANN"]}, {"use": "nickname", "given": ["Annie"]}],
    }
    ref = {
        "resourceType": "Patient",
        "identifier": [{"value": "1"}],
        "name": [{"family": "DOE", "given": ["ANN", "Annie"]}],
    }
    pid = MSH_LINE + "PID|1||1^^^H^MR||DOE^ANN" + "^" * 13 + "{}\r"
    score = score_bundles(bundle(ours), bundle(ref), source=pid.format("Annie"))
    assert score.explained == 1 and score.percent == 100.0
    diff = next(d for d in score.diffs if d.explanation)
    assert diff.rule == "xpn15-nickname" and "PID-5" in diff.explanation
    # no evidence: no source, an XPN-15 that is not the nickname, the nickname in another component
    for source in (None, pid.format("Bea"), MSH_LINE + "PID|1||1^^^H^MR||DOE^ANN^Annie\r"):
        score = score_bundles(bundle(ours), bundle(ref), source=source)
        assert score.explained == 0 and score.compared - score.agreeing == 1, source


def _phone_pair(use: str) -> tuple[dict[str, Any], dict[str, Any]]:
    ours = {
        "resourceType": "Patient",
        "identifier": [{"value": "1"}],
        "telecom": [{"system": "phone", "value": "555-0100", "use": "mobile"}],
    }
    ref = {
        "resourceType": "Patient",
        "identifier": [{"value": "1"}],
        "telecom": [{"system": "phone", "value": "(555) 0100", "use": use}],
    }
    return bundle(ours), bundle(ref)


def test_mobile_use_is_explained_only_when_xtn3_is_cp() -> None:
    ours, ref = _phone_pair("home")
    pid = MSH_LINE + "PID|1||1^^^H^MR||DOE^ANN||||||||{}\r"
    s = score_bundles(ours, ref, source=pid.format("555-0100^PRN^CP"))
    (diff,) = s.diffs
    assert diff.path == "Patient[1].telecom[(555) 0100].use" and diff.rule == "xtn-cp-mobile"
    assert "PID-13" in diff.explanation and s.percent == 100.0
    assert score_bundles(ours, ref, source=pid.format("^PRN^CP^^^555^0100")).explained == 1  # XTN-6/7
    # no evidence: no source, the number with XTN-3 PH, CP on another number
    for source in (
        None,
        pid.format("555-0100^PRN^PH"),
        pid.format("555-0199^PRN^CP~555-0100^PRN^PH"),
        MSH_LINE + "PID|1||1^^^H^MR||DOE^ANN\r",
    ):
        s = score_bundles(ours, ref, source=source)
        assert s.explained == 0 and [d.path for d in s.diffs] == ["Patient[1].telecom[(555) 0100].use"], (
            source
        )


def test_element_leaves_are_judged_by_their_element_label() -> None:
    """A telecom (name, address) element whose label occurs only in an IG-unmapped segment: its leaves
    are explained too; one from a mapped segment is not."""
    src = (
        "MSH|^~\\&|A|B|C|D|20250101||ADT^A01|1|P|2.5\rPID|1||MRN1^^^H||DOE^JANE||||||||555-0100\r"
        "GT1|1||ROE^RICK||||8484^^Internet\r"
    )
    ours = {
        "resourceType": "Bundle",
        "entry": [
            {
                "resource": {
                    "resourceType": "Patient",
                    "identifier": [{"value": "MRN1"}],
                    "telecom": [{"value": "555-0100"}],
                }
            }
        ],
    }
    ref = {
        "resourceType": "Bundle",
        "entry": [
            {
                "resource": {
                    "resourceType": "Patient",
                    "identifier": [{"value": "MRN1"}],
                    "telecom": [
                        {"value": "555-0100", "system": "phone"},
                        {"value": "8484", "system": "email"},
                    ],
                }
            }
        ],
    }
    s = score_bundles(ours, ref, source=src)
    unexplained = sorted(d.path for d in s.diffs if not d.explanation)
    explained = sorted(d.path for d in s.diffs if d.explanation)
    assert unexplained == ["Patient[MRN1].telecom[555-0100].system"]
    assert explained == ["Patient[MRN1].telecom[8484].system", "Patient[MRN1].telecom[8484].value"]


def test_ms_observations_synthesised_from_pda_acc_are_explained_only_with_the_segment() -> None:
    """MS makes Observation[death-certificate] etc. from PDA (IG: no target); without a PDA in the
    message the same unproduced resource counts against us."""
    obs = {
        "resourceType": "Observation",
        "status": "final",
        "code": {
            "coding": [
                {
                    "system": "http://example.com/v2-to-fhir-converter/CodeSystem/observation-code",
                    "code": "death-certificate",
                }
            ]
        },
        "valueCodeableConcept": {"coding": [{"code": "Y"}]},
    }
    ours: dict[str, Any] = {"resourceType": "Bundle", "entry": []}
    ref = {"resourceType": "Bundle", "entry": [{"resource": obs}]}
    head = "MSH|^~\\&|A|B|C|D|20250101||ADT^A01|1|P|2.5\rPID|1||MRN1^^^H||DOE^JANE\r"
    with_pda = score_bundles(ours, ref, source=head + "PDA|||Y\r")  # PDA-3: death certificate signed
    assert with_pda.compared == with_pda.explained > 0
    assert with_pda.diffs[0].rule == "ms-segment-observation" and "PDA-3" in with_pda.diffs[0].explanation
    # no evidence: no PDA, PDA-3 says otherwise, only PDA-6 (autopsy) valued, no source at all
    for source in (head, head + "PDA|||N\r", head + "PDA||||||Y\r", None):
        without = score_bundles(ours, ref, source=source)
        assert without.explained == 0 and without.compared == with_pda.compared, source
        assert without.unmatched == ["Observation[death-certificate]"]


def _operator_pair(*, referenced_by_encounter: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """A reference with an EVN-5 operator Practitioner that only its Provenance refers to."""
    patient = {"resourceType": "Patient", "identifier": [{"value": "MRN1"}]}
    operator = {
        "resourceType": "Practitioner",
        "identifier": [{"value": "OP1"}],
        "name": [{"family": "OPERATOR", "given": ["OLGA"]}],
    }
    provenance = {"resourceType": "Provenance", "agent": [{"who": {"reference": "Practitioner/id-1"}}]}
    ref = [patient, operator, provenance]
    if referenced_by_encounter:
        ref.append(
            {
                "resourceType": "Encounter",
                "identifier": [{"value": "V1"}],
                "participant": [{"individual": {"reference": "Practitioner/id-1"}}],
            }
        )
    ours = [patient] + (
        [{"resourceType": "Encounter", "identifier": [{"value": "V1"}]}] if len(ref) > 3 else []
    )
    return bundle(*ours), bundle(*ref)


def test_reference_practitioners_count_in_the_raw_figure() -> None:
    """A Practitioner Sluice did not produce is compared (all its fields disagree) even when no scored
    resource refers to it; without the source's evidence it is not explained either."""
    ours, ref = _operator_pair()
    s = score_bundles(ours, ref)
    assert s.unmatched == ["Practitioner[OP1]"]
    assert s.compared == 1 + 3 and s.agreeing == 1 and s.explained == 0
    assert s.raw_percent == 25.0 and s.percent == 25.0
    (diff,) = s.diffs
    assert diff.category == "resource" and diff.fields == 3 and diff.rule == ""


def test_unscored_practitioner_is_explained_only_with_its_evidence() -> None:
    src = MSH_LINE + "EVN|A01|20250101|||OP1^OPERATOR^OLGA\rPID|1||MRN1^^^H^MR||DOE^ANN\r"
    ours, ref = _operator_pair()
    s = score_bundles(ours, ref, source=src)
    assert s.compared == 4 and s.explained == 3 and s.raw_percent == 25.0 and s.percent == 100.0
    (diff,) = s.diffs
    assert diff.rule == "unscored-practitioner" and "EVN-5" in diff.explanation
    assert s.explained_by == {"unscored-practitioner": 3}
    # a ROL of the PROCEDURE group has no IG target either; a ROL after PV1 does
    rol = MSH_LINE + "PID|1||MRN1^^^H^MR||DOE^ANN\r{}\rROL|1|AD|AT^^HL70443|OP1^OPERATOR^OLGA\r"
    assert score_bundles(ours, ref, source=rol.format("PR1|1||1^X^L")).explained == 3
    assert score_bundles(ours, ref, source=rol.format("PV1|1|I")).explained == 0
    # the same XCN also in a mapped field (PV1-7 → Encounter.participant): counted
    also_pv1 = src + "PV1|1|I|||||OP1^OPERATOR^OLGA\r"
    assert score_bundles(ours, ref, source=also_pv1).explained == 0
    # a scored resource refers to it: counted, whatever the source says
    ours, ref = _operator_pair(referenced_by_encounter=True)
    s = score_bundles(ours, ref, source=src)
    assert s.explained == 0 and s.unmatched == ["Practitioner[OP1]"]


def _every_quirk() -> tuple[dict[str, Any], dict[str, Any], str]:
    """Bundles with one difference per explanation rule, and the message holding every rule's evidence."""
    ours = {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:sluice:authority:HOSP", "value": "MRN1"}],
        "name": [{"family": "DOE", "given": ["ANN"]}, {"use": "nickname", "given": ["Annie"]}],
        "telecom": [{"system": "phone", "value": "555-0100", "use": "mobile"}],
    }
    ref = {
        "resourceType": "Patient",
        "identifier": [
            {"system": "http://example.com/v2-to-fhir-converter/Identifier/HOSP", "value": "MRN1"},
            {"value": "G-77"},
        ],
        "name": [{"family": "DOE", "given": ["ANN", "Annie"]}],
        "telecom": [{"system": "phone", "value": "555-0100", "use": "home"}],
    }
    operator = {"resourceType": "Practitioner", "identifier": [{"value": "OP1"}]}
    death = {
        "resourceType": "Observation",
        "code": {
            "coding": [
                {
                    "system": "http://example.com/v2-to-fhir-converter/CodeSystem/observation-code",
                    "code": "death-certificate",
                }
            ]
        },
        "valueCodeableConcept": {"coding": [{"code": "Y"}]},
    }
    src = (
        MSH_LINE
        + "EVN|A01|20250101|||OP1^OPERATOR^OLGA\r"
        + "PID|1||MRN1^^^HOSP^MR||DOE^ANN"
        + "^" * 13
        + "Annie||||||||555-0100^PRN^CP\r"
        + "GT1|1|G-77^^^H|ROE^RICK\rPDA|||Y|||20250101120000\r"
        + "TXA|1|DS|TX||||||||||DOC1\rOBX|1|TX|NOTE1^Note line^L||Synthetic note text||||||F\r"
    )
    # an MDM's OBX after TXA: MS makes an Observation, the IG puts it into DocumentReference.content
    note = {
        "resourceType": "Observation",
        "code": {"coding": [{"code": "NOTE1"}]},
        "valueString": "Synthetic note text",
    }
    # an SIU whose SCH has no SCH-26/27: MS makes a ServiceRequest from the AIS, the IG makes none
    order = {"resourceType": "ServiceRequest", "status": "active", "code": {"coding": [{"code": "SVC1"}]}}
    src += "SCH|PL1|FL1\rAIS|1|A|SVC1^Service^L\r"
    # OBX-11 S (the IG's concept map gives it no FHIR status): MS says unknown, Sluice preliminary
    src += "OBX|2|NM|3333-3^Partial^LN||5|mg|||||S\r"
    ours_obs = _obs("3333-3", 5, "2024-01-01T10:00:00-08:00", "preliminary")
    ref_obs = _obs("3333-3", 5, "2024-01-01T10:00:00-08:00", "unknown")
    # PID-21 mother MOM1: MS adds her identifier and MTH to the NK1's RelatedPerson, Sluice makes her her own
    src = src.replace("PID|1||MRN1", "PID|1||MRN1", 1) + "NK1|1|ROE^RITA|C^Child^HL70131\r"
    src = src.replace("555-0100^PRN^CP\r", "555-0100^PRN^CP" + "|" * 8 + "MOM1^^^HOSP\r", 1)
    rel = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0131", "code": "C"}]}
    mth = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode", "code": "MTH"}]}
    ours_nk1 = {
        "resourceType": "RelatedPerson",
        "identifier": [{"value": "NK-1"}, {"value": "NK-2"}],
        "relationship": [rel],
    }
    ours_mother = {"resourceType": "RelatedPerson", "identifier": [{"value": "MOM1"}], "relationship": [mth]}
    ref_rp = {
        "resourceType": "RelatedPerson",
        "identifier": [{"value": "NK-1"}, {"value": "NK-2"}, {"value": "MOM1"}],
        "relationship": [mth],
    }
    # PDA-6 death certificate signed: MS makes a Procedure of its own code system from it (issue #14)
    certified = {
        "resourceType": "Procedure",
        "status": "completed",
        "code": {
            "coding": [
                {
                    "system": "http://example.com/v2-to-fhir-converter/CodeSystem/procedure-code",
                    "code": "death-certification",
                }
            ]
        },
        "performedDateTime": "2025-01-01T12:00:00Z",
    }
    # PR1 (issue #14): MS's performer-role code for PR1-8 (Sluice: the IG's SNOMED function), the Practitioner of the
    # ROL after PR1 that MS's Procedure refers to (the IG maps that ROL nowhere), and MS's Procedure of PR1-25
    src += "PR1|1||76164006^Biopsy^SCT||20250101||D|AN1^GAS^ANA" + "|" * 11 + "PRC1" + "|" * 6 + "PRC0\r"
    src += "ROL|1|AD|PP^Primary Care Provider^HL70443|ROLP1^ROLE^RITA\r"
    sct = "http://snomed.info/sct"
    ours_proc = {
        "resourceType": "Procedure",
        "identifier": [{"value": "PRC1"}],
        "status": "unknown",
        "code": {"coding": [{"system": sct, "code": "76164006"}]},
        "performer": [
            {"function": {"coding": [{"system": sct, "code": "88189002"}]}, "actor": {"display": "x"}}
        ],
        "partOf": [{"identifier": {"value": "PRC0"}}],
    }
    role = "http://example.com/v2-to-fhir-converter/CodeSystem/performer-role"
    ref_proc = {
        "resourceType": "Procedure",
        "identifier": [{"value": "PRC1"}],
        "status": "unknown",
        "code": {"coding": [{"system": sct, "code": "76164006"}]},
        "performer": [
            {"function": {"coding": [{"system": role, "code": "anesthesiologist"}]}},
            {"actor": {"reference": "Practitioner/id-8"}},
        ],
    }
    rol_practitioner = {"resourceType": "Practitioner", "identifier": [{"value": "ROLP1"}]}
    parent = {"resourceType": "Procedure", "identifier": [{"value": "PRC0"}], "status": "unknown"}
    # an order whose ORC-5 is empty: Sluice follows the IG's map for ORC-1 NW (active), MS says unknown
    src += "ORC|NW|ORD5\rOBR|1|ORD5||SVC5^Service five^L\r"
    ours_sr5 = {"resourceType": "ServiceRequest", "identifier": [{"value": "ORD5"}], "status": "active"}
    ref_sr5 = {**ours_sr5, "status": "unknown"}
    # an OBR without ORC (nor OBR-25): Sluice says unknown for the order and derives the report's status
    src += "OBR|2|ORD6||SVC6^Service six^L\rOBX|1|NM|4444-4^Result^LN||5|mg|||||F\r"
    ours_sr6 = {"resourceType": "ServiceRequest", "identifier": [{"value": "ORD6"}], "status": "unknown"}
    ref_sr6 = {**ours_sr6, "status": "active"}
    ours_dr6 = {"resourceType": "DiagnosticReport", "identifier": [{"value": "ORD6"}], "status": "final"}
    ref_dr6 = {**ours_dr6, "status": "unknown"}
    # ORC-4 as subcomponents (EIP): MS keeps the '&' in the identifier's value
    src += "ORC|SC|||GRP7&L^FGRP7&L\r"
    ref_dr6["identifier"] = [{"value": "ORD6"}, {"value": "GRP7&L"}]
    # a table-bound code the message sends with a coding system of its own (SPM-4 in SCT): MS says the table's
    src += "SPM|1|||119297000^Blood^SCT\r"
    ours_dr6["category"] = [{"coding": [{"system": "http://snomed.info/sct", "code": "119297000"}]}]
    ref_dr6["category"] = [
        {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0487", "code": "119297000"}]}
    ]
    # an OBX of type RP: MS makes a DiagnosticReport of it, the IG an Observation (valueAttachment)
    src += "OBX|2|RP|IMG1^Image^L||http://example.org/img1^^IM^JPEG||||||F\r"
    ref_img = {"resourceType": "DiagnosticReport", "status": "final", "code": {"coding": [{"code": "IMG1"}]}}
    # FT1: MS's ChargeItem status is its constant unknown (Sluice billable), its identifier system named after
    # FT1-13.3 (the department code's coding system)
    # and MS makes a MedicationDispense of the FT1-29 NDC, which Sluice keeps as the ChargeItem's product
    src += (
        "FT1|1|TXN-9||20250101|20250101|CG|99213^Visit^CPT|||1|||RAD^Radiology^L"
        + "|" * 16
        + "0009-01^Drug^NDC\r"
    )
    ndc = {"coding": [{"system": "http://hl7.org/fhir/sid/ndc", "code": "0009-01"}]}
    ours_charge = {
        "resourceType": "ChargeItem",
        "identifier": [{"value": "TXN-9"}],
        "status": "billable",
        "productCodeableConcept": ndc,
    }
    ref_dispense = {
        "resourceType": "MedicationDispense",
        "status": "unknown",
        "medicationCodeableConcept": ndc,
    }
    ref_charge = {
        "resourceType": "ChargeItem",
        "identifier": [{"value": "TXN-9", "system": "http://example.com/v2-to-fhir-converter/Identifier/L"}],
        "status": "unknown",
    }
    # PV2-9 expected discharge: MS writes it as Encounter.period.end, the IG as the plannedEndDate extension
    # and PV1-8 holding only delimiters: MS makes a REF participant of nobody
    src += "PV1|1|I||||||^^^^" + "|" * 11 + "V9\rPV2" + "|" * 9 + "20250105120000+0000\r"
    ours_enc = {"resourceType": "Encounter", "identifier": [{"value": "V9"}]}
    ref_enc = {
        **ours_enc,
        "period": {"end": "2025-01-05T12:00:00Z"},
        "participant": [{"type": [{"coding": [{"system": PARTICIPATION, "code": "REF"}]}]}],
    }
    # DG1-3 under the name I9: MS's name table says sid/icd-9 (not a FHIR system), Sluice sid/icd-9-cm
    src += "DG1|1|I9|71596^OSTEOARTHROSIS^I9\r"
    # PV1-8 without an id: MS makes a Practitioner of the name, Sluice refers to the name alone
    src += "PV1|1|O|||||^DOG^DUCKHUNT\r"
    ours_dx = {"resourceType": "Condition", "code": {"coding": [{"system": ICD9CM, "code": "71596"}]}}
    ours_dx["recorder"] = {"display": "DUCKHUNT DOG"}
    ref_dog = {"resourceType": "Practitioner", "name": [{"family": "DOG", "given": ["DUCKHUNT"]}]}
    # NK1-7 EMC: Sluice's contact relationship through the IG's Relationship map (v2-0131 C), MS keeps EMC
    src += "NK1|2|ROE^ROB|||||EMC\r"
    ours["contact"] = [{"relationship": [{"coding": [{"system": V2_0131, "code": "C"}]}]}]
    ref["contact"] = [{"relationship": [{"coding": [{"code": "EMC"}]}]}]
    # an HD-2 that is no OID: MS writes urn:oid:r2.3, Sluice names the authority by HD-1
    src += "PV1|1|I" + "|" * 49 + "V50^^^T123&r2.3&ISO\r"
    ours["identifier"] = [*ours["identifier"], {"system": "urn:sluice:authority:T123", "value": "V50"}]
    ref["identifier"] = [*ref["identifier"], {"system": "urn:oid:r2.3", "value": "V50"}]
    ref_dx = {"resourceType": "Condition", "code": {"coding": [{"system": ICD9CM[:-3], "code": "71596"}]}}
    # a PRT after PID with PRT-4 AD: MS makes its person the Patient's generalPractitioner, the IG a CareTeam member
    src = src.replace("\rGT1|1|", "\rPRT|1|AD||AD^Admitting Provider^HL70912|PRT9^ADMIT^ALAN\rGT1|1|", 1)
    ref_gp = {
        "resourceType": "Practitioner",
        "identifier": [{"value": "PRT9"}],
        "name": [{"family": "ADMIT"}],
    }
    # one id, two names (PV1-7 ALPHA, PV1-8 BETA): MS makes a Practitioner per name, Sluice one per identifier
    src += "PV1|2|O|||||DOC9^ALPHA^ANN|DOC9^BETA^BOB\r"
    ours_doc = {
        "resourceType": "Practitioner",
        "identifier": [{"value": "DOC9"}],
        "name": [{"family": "ALPHA"}],
    }
    ref_doc = {**ours_doc, "name": [{"family": "BETA", "given": ["BOB"]}]}
    # the OBR's Specimen (IG OBR[Specimen]: OBR-2 → accessionIdentifier); MS adds OBR-3 as an identifier
    ours_sp6 = {"resourceType": "Specimen", "accessionIdentifier": {"value": "ORD6"}}
    ref_sp6 = {"resourceType": "Specimen", "identifier": [{"value": "ORD6"}, {"value": "FIL6"}]}
    src = src.replace("OBR|2|ORD6||", "OBR|2|ORD6|FIL6|")
    # ORC-4 (EI) as an identifier, OBR-24 as a locationCode, an ORC-8 parent as a ServiceRequest: MS only
    src = src.replace("ORC|NW|ORD5\r", "ORC|NW|ORD5||GRP5||||PAR5\r").replace(
        "OBR|1|ORD5||SVC5^Service five^L\r", "OBR|1|ORD5||SVC5^Service five^L" + "|" * 20 + "LAB\r"
    )
    ref_sr5["identifier"] = [{"value": "ORD5"}, {"value": "GRP5"}]
    # an order's PRT whose role the IG maps nowhere (RCT): MS makes a Practitioner of it
    src = src.replace("|LAB\r", "|LAB\rPRT|1|AD||RCT^Results Copies To^HL70443|RCT9^COPY^CARL\r")
    ref_rct = {
        "resourceType": "Practitioner",
        "identifier": [{"value": "RCT9"}],
        "name": [{"family": "COPY"}],
    }
    ref_sr5["locationCode"] = [
        {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "LAB"}]}
    ]
    return (
        bundle(
            ours,
            ours_obs,
            ours_nk1,
            ours_mother,
            ours_proc,
            ours_sr5,
            ours_sr6,
            ours_dr6,
            ours_charge,
            ours_enc,
            ours_dx,
            ours_doc,
            ours_sp6,
        ),
        bundle(
            ref,
            operator,
            death,
            note,
            order,
            ref_obs,
            ref_rp,
            certified,
            rol_practitioner,
            ref_proc,
            parent,
            ref_sr5,
            ref_sr6,
            ref_dr6,
            ref_img,
            ref_charge,
            ref_dispense,
            ref_enc,
            ref_dx,
            ref_dog,
            ref_gp,
            ref_doc,
            ref_sp6,
            ref_rct,
        ),
        src,
    )


STRUCTURE_RULES = frozenset({"ig-dg1-context", "keyless-encounter"})
"""Rules whose evidence is the message's structure, so that the ADT message of :func:`_every_quirk` cannot hold it:
:func:`_siu_quirk` does."""


def _siu_quirk() -> tuple[dict[str, Any], dict[str, Any], str]:
    """An SIU whose DG1 MS puts on Encounter.diagnosis (the IG's SIU_S12 map makes it a Condition only)."""
    enc = {"resourceType": "Encounter", "identifier": [{"value": "V1"}], "status": "planned"}
    role = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/diagnosis-role", "code": "AD"}]}
    ref_enc = {**enc, "diagnosis": [{"condition": {"reference": "Condition/c1"}, "use": role}]}
    src = (
        "MSH|^~\\&|A|B|C|D|20250101||SIU^S12^SIU_S12|1|P|2.5\rSCH|PL1|FL1\rPID|1||MRN1^^^H^MR||DOE^ANN\r"
        "PV1|1|O" + "|" * 17 + "V1\rDG1|1||R51^Headache^I10|||A\r"
    )
    return bundle(enc), bundle(ref_enc), src


def _oru_quirk() -> tuple[dict[str, Any], dict[str, Any], str]:
    """An ORU whose PV1 has neither PV1-19 nor PV1-44: MS makes an Encounter of it, Sluice none (no key)."""
    ref_enc = {
        "resourceType": "Encounter",
        "status": "in-progress",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
    }
    src = "MSH|^~\\&|A|B|C|D|20250101||ORU^R01^ORU_R01|1|P|2.5\rPID|1||MRN1^^^H^MR||DOE^ANN\rPV1|1|O\r"
    return bundle(), bundle(ref_enc), src


def test_every_rule_fires_with_its_evidence_and_none_without_a_source() -> None:
    ours, ref, src = _every_quirk()
    s = score_bundles(ours, ref, source=src)
    assert set(s.explained_by) == set(RULES) - STRUCTURE_RULES, s.diffs
    assert sum(s.explained_by.values()) == s.explained
    assert s.explained == sum(e for _c, _a, e in s.by_category.values())
    assert all(d.rule in RULES and d.explanation for d in s.diffs), [d for d in s.diffs if not d.rule]
    bare = score_bundles(ours, ref)
    assert bare.compared == s.compared and bare.agreeing == s.agreeing
    assert bare.explained == 0 and not bare.explained_by
    assert all(not d.rule and not d.explanation for d in bare.diffs)
    assert bare.raw_percent == s.raw_percent and bare.percent == bare.raw_percent
    siu = score_bundles(*_siu_quirk()[:2], source=_siu_quirk()[2])
    oru = score_bundles(*_oru_quirk()[:2], source=_oru_quirk()[2])
    assert set(siu.explained_by) | set(oru.explained_by) == STRUCTURE_RULES
    assert siu.explained == siu.compared - siu.agreeing and oru.explained == oru.compared - oru.agreeing > 0
    assert not score_bundles(*_siu_quirk()[:2]).explained and not score_bundles(*_oru_quirk()[:2]).explained


def test_dg1_context_needs_a_structure_whose_map_has_no_dg1_encounter() -> None:
    """An ADT (DG1[Encounter] in its IG map) or a DFT (no IG map; Sluice fills Encounter.diagnosis there) keeps the
    difference; so does an SIU without DG1."""
    ours, ref, src = _siu_quirk()
    for other in ("ADT^A01^ADT_A01", "DFT^P03^DFT_P03"):
        assert not score_bundles(ours, ref, source=src.replace("SIU^S12^SIU_S12", other)).explained
    no_dg1 = src.replace("DG1|1||R51^Headache^I10|||A\r", "")
    assert not score_bundles(ours, ref, source=no_dg1).explained
    assert score_bundles(ours, ref, source=src.replace("SIU^S12^SIU_S12", "ORM^O01^ORM_O01")).explained == 1


def test_totals_keep_the_per_rule_counts() -> None:
    ours, ref, src = _every_quirk()
    one = score_bundles(ours, ref, source=src)
    total = Score()
    total.add(one, "a.hl7")
    total.add(one, "b.hl7")
    assert total.explained_by == {k: 2 * v for k, v in one.explained_by.items()}
    assert total.compared == 2 * one.compared and total.explained == 2 * one.explained
    assert {d.file for d in total.diffs} == {"a.hl7", "b.hl7"}


def test_document_obx_is_explained_only_after_a_txa() -> None:
    """An Observation MS makes from an OBX of a document message is explained only when the message has a TXA
    before that OBX (the IG's MDM maps put it into DocumentReference.content); in a result message it counts."""
    ref = bundle({"resourceType": "Observation", "code": {"coding": [{"code": "NOTE1"}]}, "valueString": "x"})
    ours = bundle()
    obx = "OBX|1|TX|NOTE1^Note line^L||x||||||F\r"
    pid = "PID|1||MRN1^^^H^MR||DOE^ANN\r"
    doc = score_bundles(ours, ref, source=MSH_LINE + pid + "TXA|1|DS|TX||||||||||DOC1\r" + obx)
    assert doc.explained == doc.compared - doc.agreeing > 0 and doc.explained_by == {
        "ig-document-obx": doc.explained
    }
    assert score_bundles(ours, ref, source=MSH_LINE + pid + obx).explained == 0
    assert (
        score_bundles(ours, ref, source=MSH_LINE + pid + obx + "TXA|1|DS|TX||||||||||DOC1\r").explained == 0
    )


def test_new_rules_need_their_evidence() -> None:
    """ig-condition, ig-unmapped-code and ms-merged-mother each excuse nothing without their evidence."""
    ours, ref, src = _every_quirk()
    full = score_bundles(ours, ref, source=src).explained_by
    assert full["ig-condition"] and full["ig-unmapped-code"] and full["ms-merged-mother"]
    # SCH-26 valued: the IG's condition holds, a missing ServiceRequest counts against us
    with_order = src.replace("SCH|PL1|FL1\r", "SCH|PL1|FL1" + "|" * 24 + "ORD1\r")
    assert "ig-condition" not in score_bundles(ours, ref, source=with_order).explained_by
    # OBX-11 F is mapped by the IG: MS's "unknown" is not excused
    final = src.replace("mg|||||S\r", "mg|||||F\r")
    assert "ig-unmapped-code" not in score_bundles(ours, ref, source=final).explained_by
    # no PID-21 in the message: the mother's identifier on the NK1's RelatedPerson is not excused
    no_mother = src.replace("|MOM1^^^HOSP\r", "|\r")
    assert "ms-merged-mother" not in score_bundles(ours, ref, source=no_mother).explained_by


SPECIMEN = {
    "resourceType": "Specimen",
    "identifier": [{"value": "SP-100"}],
    "type": {"coding": [{"system": "http://snomed.info/sct", "code": "119364003"}]},
    "receivedTime": "2025-04-02T09:00:00-07:00",
    "collection": {"collectedDateTime": "2025-04-02T08:15:00-07:00"},
}


def test_specimen_facts_are_scored() -> None:
    """Specimen (issue #14): identifiers, type, received and collection time, compared both ways alike."""
    expected = bundle(PATIENT, SPECIMEN)
    s = score_bundles(bundle(PATIENT, copy.deepcopy(SPECIMEN)), expected)
    assert s.compared == s.agreeing and not s.diffs
    changed = copy.deepcopy(SPECIMEN)
    changed["collection"]["collectedDateTime"] = "2025-04-02T08:45:00-07:00"
    changed["type"]["coding"][0]["code"] = "122555007"
    s = score_bundles(bundle(PATIENT, changed), expected)
    paths = {d.path for d in s.diffs}
    assert any("collection.collectedDateTime" in p for p in paths) and any(p.endswith(".type") for p in paths)


def test_specimen_without_identifier_is_matched_by_collection_time() -> None:
    """The IG's OBR[Specimen] carries no identifier: the collection time pairs the two sides."""
    bare = {"resourceType": "Specimen", "collection": {"collectedDateTime": "2025-04-02T08:15:00-07:00"}}
    other = {
        "resourceType": "Specimen",
        "identifier": [{"value": "X"}],
        "collection": {"collectedDateTime": "2025-04-03T08:15:00-07:00"},
    }
    s = score_bundles(
        bundle(PATIENT, other, dict(bare, receivedTime="2025-04-02T09:00:00-07:00")), bundle(PATIENT, bare)
    )
    assert s.compared == s.agreeing


def test_pda_procedure_is_explained_only_with_its_pda_field() -> None:
    """ms-segment-procedure (issue #14): MS's death-certification Procedure is excused only when PDA-6 is valued."""
    ours, ref, src = _every_quirk()
    assert (
        score_bundles(ours, ref, source=src).explained_by["ms-segment-procedure"] == 3
    )  # status, code, time
    without = src.replace("PDA|||Y|||20250101120000\r", "PDA|||Y\r")
    assert "ms-segment-procedure" not in score_bundles(ours, ref, source=without).explained_by


CHARGE = {
    "resourceType": "ChargeItem",
    "identifier": [{"value": "TXN-1"}],
    "status": "billable",
    "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "99213"}]},
    "occurrenceDateTime": "2025-03-20T09:30:00-07:00",
    "enteredDate": "2025-03-20T10:10:00-07:00",
    "quantity": {"value": 2},
    "priceOverride": {"value": 120, "currency": "USD"},
}


def test_issue_14_types_are_scored_both_ways_alike() -> None:
    """ChargeItem, Procedure, MedicationRequest/Dispense, Goal, Account: their codes, times, statuses and the
    charged / dispensed quantities are facts; the same resource on both sides agrees fully."""
    procedure = {
        "resourceType": "Procedure",
        "identifier": [{"value": "P-1"}],
        "status": "completed",
        "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "36415"}]},
        "performedDateTime": "2025-03-20T09:45:00-07:00",
    }
    dispense = {
        "resourceType": "MedicationDispense",
        "status": "completed",
        "quantity": {"value": 21, "unit": "capsule"},
        "whenHandedOver": "2025-03-20T09:30:00-07:00",
        "medicationCodeableConcept": {
            "coding": [{"system": "http://hl7.org/fhir/sid/ndc", "code": "0182-1061-05"}]
        },
    }
    request = {
        "resourceType": "MedicationRequest",
        "identifier": [{"value": "RX-1"}],
        "status": "active",
        "intent": "order",
        "authoredOn": "2025-03-20T08:55:00-07:00",
    }
    goal = {"resourceType": "Goal", "identifier": [{"value": "G-1"}], "lifecycleStatus": "active",
            "startDate": "2025-04-01", "description": {"text": "A1c below 7"}}  # fmt: skip
    account = {"resourceType": "Account", "identifier": [{"value": "ACC-1"}], "status": "active"}
    expected = bundle(PATIENT, CHARGE, procedure, dispense, request, goal, account)
    s = score_bundles(copy.deepcopy(expected), expected)
    assert s.compared == s.agreeing and not s.diffs
    assert s.compared >= 25
    changed = copy.deepcopy(expected)
    res = {e["resource"]["resourceType"]: e["resource"] for e in changed["entry"]}
    res["ChargeItem"]["priceOverride"]["value"] = 100
    res["ChargeItem"]["quantity"]["value"] = 1
    res["Procedure"]["performedDateTime"] = "2025-03-21T09:45:00-07:00"
    res["MedicationDispense"]["quantity"]["value"] = 20
    res["MedicationRequest"]["authoredOn"] = "2025-03-21T08:55:00-07:00"
    res["Account"]["status"] = "inactive"
    paths = {d.path for d in score_bundles(changed, expected).diffs}
    for want in ("priceOverride.value", "ChargeItem[TXN-1].quantity.value", "performedDateTime",
                 "MedicationDispense", "authoredOn", "Account[ACC-1].status"):  # fmt: skip
        assert any(want in p for p in paths), (want, paths)


def test_account_outside_adt_needs_a_non_adt_message_and_pid18() -> None:
    """An Account MS makes from PID-18 of an ORU is excused (only the IG's ADT maps have PID[Account]); of an
    ADT, or with a value not in PID-18, it counts against us."""
    ref = bundle({"resourceType": "Account", "identifier": [{"value": "ACC77"}], "status": "active"})
    pid = "PID|1||MRN1^^^H^MR||DOE^ANN" + "|" * 13 + "ACC77\r"
    oru = "MSH|^~\\&|A|B|C|D|20250101||ORU^R01|1|P|2.5\r"
    s = score_bundles(bundle(), ref, source=oru + pid)
    assert s.explained == s.compared - s.agreeing > 0 and s.explained_by == {"ig-condition": s.explained}
    assert score_bundles(bundle(), ref, source=MSH_LINE + pid).explained == 0
    assert score_bundles(bundle(), ref, source=oru + pid.replace("ACC77", "OTHER")).explained == 0


def test_ig_unmapped_segments_are_judged_per_message_structure() -> None:
    """FT1 has no target in the IG's ORM_O01 and ORU_R01 maps, so a ChargeItem MS makes from an ORM's FT1 is
    excused; a DFT (no IG map: the default set, without FT1) is about its FT1s, so the same ChargeItem counts
    against us there.  IN2 goes the other way: ORM_O01 folds it into the Coverage, ADT_A01 leaves it unmapped."""
    from conformance import igmaps

    ft1 = "FT1|1|TXN-1||20250320093000|20250320101000|CG|99213^Office visit^CPT\r"
    pid = "PID|1||MRN1^^^H^MR||DOE^ANN\r"
    ref = bundle(CHARGE)
    for mtype in ("ORM^O01^ORM_O01", "ORU^R01^ORU_R01", "OML^O21^OML_O21", "ORM^O01"):
        src = f"MSH|^~\\&|A|B|C|D|20250101||{mtype}|1|P|2.5\r{pid}{ft1}"
        s = score_bundles(bundle(), ref, source=src)
        assert s.explained == s.compared > 0, mtype
        assert s.explained_by == {"ig-unmapped-segment": s.compared}
        assert "only in FT1" in s.diffs[0].explanation
    dft = f"MSH|^~\\&|A|B|C|D|20250101||DFT^P03^DFT_P03|1|P|2.5\r{pid}{ft1}"
    assert score_bundles(bundle(), ref, source=dft).explained == 0

    in2 = "IN1|1|PLAN1\rIN2|1|123-45-6789\r"
    patient = {"resourceType": "Patient", "identifier": [{"value": "MRN1"}, {"value": "123-45-6789"}]}
    ours = bundle({"resourceType": "Patient", "identifier": [{"value": "MRN1"}]})
    for mtype, explained in (("ADT^A01^ADT_A01", 1), ("ADT^A04^ADT_A01", 1), ("ORM^O01^ORM_O01", 0)):
        src = f"MSH|^~\\&|A|B|C|D|20250101||{mtype}|1|P|2.5\r{pid}{in2}"
        assert score_bundles(ours, bundle(patient), source=src).explained == explained, mtype

    # which map a message is judged by
    assert igmaps.structure("ADT", "A04", "ADT_A01") == "ADT_A01"
    assert igmaps.structure("ADT", "A04", "") == "ADT_A01"  # v2.3: no MSH-9.3, table 0354
    assert igmaps.structure("ADT", "A11", "ADT_A09") == "ADT_A11"  # the IG has a map for the event itself
    assert igmaps.structure("SIU", "S14", "SIU_S12") == "SIU_S12"
    assert igmaps.structure("MDM", "T01", "MDM_T01") == "MDM_T02"
    assert igmaps.structure("DFT", "P03", "DFT_P03") == ""
    assert igmaps.unmapped_segments("DFT", "P03", "DFT_P03") == igmaps.DEFAULT
    assert "FT1" not in igmaps.DEFAULT and "FT1" in igmaps.unmapped_segments("ORU", "R01", "")
    # Sluice's documented mappings beyond an IG map are never excused
    assert "IAM" in igmaps.UNMAPPED["ADT_A01"] and "IAM" not in igmaps.unmapped_segments("ADT", "A01", "")


def test_ig_message_maps_read_from_the_csv(tmp_path: Path) -> None:
    """A segment is IG-unmapped in a structure when none of its rows has a Primary Target or a Segment Map;
    group rows and headers are not segments."""
    from conformance.igmaps import unmapped_by_structure

    rows = [
        "i,,,,,,Condition (IF True),,,HL7 FHIR,,,,Comments",
        "Sort Order,Identifier,Syntax,Name,Min,Max,ANTLR,FHIRPath,Narrative,Primary Target,Segment Map,Refs,,",
        "1,ORM_O01.MSH,MSH,Message Header,1,1,,,,Bundle,MSH[Bundle],,,",
        "3,ORM_O01.PATIENT,[ ,PATIENT begin,0,1,,,,,,,,",
        "3.5.2,ORM_O01.PATIENT.INSURANCE.IN2,[ IN2 ],Insurance,0,1,,,,Coverage[1],,,,",
        "3.6,ORM_O01.PATIENT.GT1,[ GT1 ],Guarantor,0,1,,,,,,,,",
        "4.2.2,ORM_O01.ORDER_DETAIL.NTE,[{ NTE }],Notes,0,-1,,,,ServiceRequest[1].note,NTE[ServiceRequest],,,",
        "2,ORM_O01.NTE,[{ NTE }],Notes (header),0,-1,,,,,,,,",
        "4.3,ORM_O01.ORDER.FT1,[{ FT1 }],Financial Transaction,0,-1,,,,,,,,",
    ]
    (tmp_path / "HL7 Message - FHIR R4_ ORM_O01 - Sheet1.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "notes.csv").write_text("not,a,map\n")
    assert unmapped_by_structure(tmp_path) == {"ORM_O01": frozenset({"GT1", "FT1"})}


def test_builtin_ig_maps_match_the_corpus_csvs() -> None:
    """igmaps.BUILTIN (used where the corpus is absent) is what the IG's CSVs in the shared corpus say."""
    from conformance import igmaps
    from tests.support.ci import service_unavailable

    directory = igmaps.corpus_dir() / igmaps.MESSAGE_MAPS
    if not directory.is_dir():
        service_unavailable(f"the IG's message maps are not at {directory} (set SLUICE_CORPUS)")
    assert igmaps.unmapped_by_structure(directory) == igmaps.BUILTIN
    assert igmaps.UNMAPPED == igmaps.BUILTIN
    assert igmaps.structures_with(directory, "DG1[Encounter]") == igmaps.ENCOUNTER_DIAGNOSIS_BUILTIN
    assert igmaps.ENCOUNTER_DIAGNOSIS == igmaps.ENCOUNTER_DIAGNOSIS_BUILTIN


def test_pr1_rules_need_their_evidence() -> None:
    """ms-performer-role, ig-unmapped-rol and ms-parent-procedure (issue #14) excuse nothing without their evidence:
    PR1-8 valued and the IG's SNOMED function on Sluice's side; the Practitioner's id only in a ROL after PR1; the
    parent id in PR1-25 and Sluice's Procedure partOf it."""
    ours, ref, src = _every_quirk()
    full = score_bundles(ours, ref, source=src).explained_by
    assert (
        full["ms-performer-role"] == 1 and full["ig-unmapped-rol"] == 1 and full["ms-parent-procedure"] == 2
    )
    no_anesthesiologist = src.replace("|AN1^GAS^ANA", "|")
    assert "ms-performer-role" not in score_bundles(ours, ref, source=no_anesthesiologist).explained_by
    no_snomed = copy.deepcopy(ours)
    for e in no_snomed["entry"]:
        if e["resource"]["resourceType"] == "Procedure":
            e["resource"]["performer"] = [{"actor": {"display": "x"}}]
    assert "ms-performer-role" not in score_bundles(no_snomed, ref, source=src).explained_by
    after_pv1 = src.replace("ROL|1|AD|", "PV1|1|I\rROL|1|AD|")
    assert "ig-unmapped-rol" not in score_bundles(ours, ref, source=after_pv1).explained_by
    no_parent = src.replace("|PRC0\r", "|\r")
    assert "ms-parent-procedure" not in score_bundles(ours, ref, source=no_parent).explained_by
    no_part_of = copy.deepcopy(ours)
    for e in no_part_of["entry"]:
        e["resource"].pop("partOf", None)
    assert "ms-parent-procedure" not in score_bundles(no_part_of, ref, source=src).explained_by


def test_order_and_report_status_rules_need_their_evidence() -> None:
    """derived-report-status, order-status-unstated and ig-order-control excuse nothing without their evidence."""
    ours, ref, src = _every_quirk()
    full = score_bundles(ours, ref, source=src).explained_by
    assert full["derived-report-status"] == full["order-status-unstated"] == full["ig-order-control"] == 1
    # OBR-25 valued: the IG maps the report's status from it, MS's "unknown" for it is not excused
    stated = src.replace("SVC6^Service six^L\r", "SVC6^Service six^L" + "|" * 21 + "F\r")
    assert "derived-report-status" not in score_bundles(ours, ref, source=stated).explained_by
    # an ORC before the OBR: its ORC-1/ORC-5 state the order's status, Sluice's "unknown" counts
    ordered = src.replace("OBR|2|ORD6", "ORC|NW|ORD6\rOBR|2|ORD6")
    assert "order-status-unstated" not in score_bundles(ours, ref, source=ordered).explained_by
    # ORC-5 valued: the IG takes the status from ORC-5, not from ORC-1
    with_status = src.replace("ORC|NW|ORD5", "ORC|NW|ORD5|||CM")
    assert "ig-order-control" not in score_bundles(ours, ref, source=with_status).explained_by
    # ORC-1 a code the IG's map gives no status: nothing to follow
    unmapped = src.replace("ORC|NW|ORD5", "ORC|XO|ORD5")
    assert "ig-order-control" not in score_bundles(ours, ref, source=unmapped).explained_by


def test_parent_order_status_is_unstated() -> None:
    """A parent order named in OBR-29 that Sluice only makes sure exists (status unknown): MS's status for it is
    excused only with that OBR-29 in the message."""
    ours = bundle({"resourceType": "ServiceRequest", "identifier": [{"value": "PAR1"}], "status": "unknown"})
    ref = bundle({"resourceType": "ServiceRequest", "identifier": [{"value": "PAR1"}], "status": "active"})
    obr = "ORC|NW|ORD7\rOBR|1|ORD7||SVC7^Svc^L" + "|" * 25 + "PAR1^FIL1\r"
    s = score_bundles(ours, ref, source=MSH_LINE + obr)
    assert s.explained_by == {"order-status-unstated": 1}
    assert score_bundles(ours, ref, source=MSH_LINE + obr.replace("PAR1^", "OTHER^")).explained == 0


def test_attachment_report_needs_an_rp_or_ed_obx_no_obr_orders() -> None:
    """A DiagnosticReport MS makes from an RP/ED OBX is excused; one whose code an OBR-4 orders, or made from an
    OBX of another type, counts against us."""
    ref = bundle(
        {"resourceType": "DiagnosticReport", "status": "final", "code": {"coding": [{"code": "IMG1"}]}}
    )
    obx = "OBX|1|ED|IMG1^Image^L||^IM^JPEG^Base64^AAAA||||||F\r"
    s = score_bundles(bundle(), ref, source=MSH_LINE + obx)
    assert s.explained == s.compared - s.agreeing > 0 and s.explained_by == {
        "ms-attachment-report": s.explained
    }
    assert score_bundles(bundle(), ref, source=MSH_LINE + obx.replace("|ED|", "|ST|")).explained == 0
    ordered = MSH_LINE + "OBR|1|O1||IMG1^Image^L\r" + obx
    assert score_bundles(bundle(), ref, source=ordered).explained == 0


def test_specimen_from_obr_outside_the_ig_map_is_ig_condition() -> None:
    """A Specimen MS makes from the OBR of an MDM (the IG's MDM_T02 map makes none) is excused; of an ORU (the IG
    maps OBR[Specimen]), or with an identifier an SPM carries, it counts against us."""
    ref = bundle({"resourceType": "Specimen", "identifier": [{"value": "ORD8"}, {"value": "FIL8"}]})
    body = "PID|1||MRN1^^^H^MR||DOE^ANN\rORC|NW|ORD8|FIL8\rOBR|1|ORD8|FIL8|SVC8^Svc^L|||20250101\r"
    mdm = "MSH|^~\\&|A|B|C|D|20250101||MDM^T02|1|P|2.5\r"
    oru = "MSH|^~\\&|A|B|C|D|20250101||ORU^R01|1|P|2.5\r"
    s = score_bundles(bundle(), ref, source=mdm + body)
    assert s.explained == s.compared - s.agreeing > 0 and s.explained_by == {"ig-condition": s.explained}
    assert score_bundles(bundle(), ref, source=oru + body).explained == 0
    assert score_bundles(bundle(), ref, source=mdm + body + "SPM|1|FIL8\r").explained == 0


def test_language_codes_need_their_evidence() -> None:
    """A table-0296 code MS keeps under its HL70296 placeholder is explained where the message names it HL70296 and
    Sluice has its BCP-47 tag; an insured RelatedPerson's language MS takes from IN2 (IG-unmapped) is explained only
    when the RelatedPerson is no NK1's and an IN2 repetition gives the code."""
    bcp = "urn:ietf:bcp:47"
    ms = "http://example.com/v2-to-fhir-converter/CodeSystem/HL70296"

    def person(rtype: str, ident: str, lang: dict[str, Any] | None) -> dict[str, Any]:
        res: dict[str, Any] = {"resourceType": rtype, "identifier": [{"value": ident}]}
        if lang:
            res["communication"] = [{"language": {"coding": [lang]}}]
        return res

    ours = bundle(
        person("Patient", "MRN1", {"system": bcp, "code": "en"}), person("RelatedPerson", "INS1", None)
    )
    ref = bundle(
        person("Patient", "MRN1", {"system": ms, "code": "EN"}),
        person("RelatedPerson", "INS1", {"system": bcp, "code": "en"}),
    )
    pid = "PID|1||MRN1^^^H^MR||DOE^ANN|||||||||EN^English^HL70296\r"
    in1 = "IN1|1|PLAN1" + "|" * 47 + "INS1\r"
    in2 = "IN2|1" + "|" * 35 + "eng^English\r"
    s = score_bundles(ours, ref, source=MSH_LINE + pid + in1 + in2)
    assert s.explained_by == {"ms-placeholder": 1, "ig-unmapped-segment": 1}, s.diffs
    # PID-15 without the HL70296 name, the tag not Sluice's, no IN2, or an NK1's RelatedPerson: not explained
    assert not score_bundles(ours, ref, source=MSH_LINE + pid.replace("HL70296", "L") + in1).explained_by
    assert not score_bundles(
        ours, ref, source=MSH_LINE + pid.replace("EN^", "FR^") + in1 + "IN2|1\r"
    ).explained_by
    nk1 = "NK1|1|ROE^RITA|SPO|||||||||INS1\r"
    assert (
        "ig-unmapped-segment" not in score_bundles(ours, ref, source=MSH_LINE + pid + nk1 + in2).explained_by
    )


def test_implementer_status_needs_the_resource_in_its_segment_and_sluices_documented_choice() -> None:
    """Procedure.status / ChargeItem.status: MS's constant unknown against Sluice's documented choice is excused
    only when the message carries the procedure (PR1-3/-19, FT1-25) or the charge (FT1-2/-7), and only for the
    documented value."""
    proc = {"resourceType": "Procedure", "code": {"coding": [{"code": "71045"}]}, "status": "completed"}
    charge = {"resourceType": "ChargeItem", "identifier": [{"value": "TXN-1"}], "status": "billable"}
    ours = bundle(proc, charge)
    ref = bundle({**proc, "status": "unknown"}, {**charge, "status": "unknown"})
    dft = "MSH|^~\\&|A|B|C|D|20250101||DFT^P03^DFT_P03|1|P|2.5\rPID|1||MRN1^^^H^MR||DOE^ANN\r"
    with_both = dft + "FT1|1|TXN-1||20250101||CG|99213^Visit^CPT\rPR1|1||71045^Xray^C4||20250101\r"
    s = score_bundles(ours, ref, source=with_both)
    assert s.explained_by == {"ig-implementer-status": 2}, s.diffs
    billed = dft + "FT1|1|TXN-1||20250101||CG|99213^Visit^CPT" + "|" * 18 + "71045^Xray^C4\r"
    assert score_bundles(ours, ref, source=billed).explained_by == {"ig-implementer-status": 2}
    # the procedure nowhere in PR1/FT1-25, the charge nowhere in FT1: nothing excused
    elsewhere = dft + "OBR|1|||71045^Xray^C4\rNTE|1||TXN-1\r"
    assert score_bundles(ours, ref, source=elsewhere).explained == 0
    # a status that is not Sluice's documented choice is not excused
    other = bundle({**proc, "status": "in-progress"}, {**charge, "status": "billed"})
    assert score_bundles(other, ref, source=with_both).explained == 0


def test_ft1_identifier_placeholder_needs_ft1_13_3_of_the_same_ft1() -> None:
    ours = bundle({"resourceType": "ChargeItem", "identifier": [{"value": "TXN-1"}]})
    placeholder = "http://example.com/v2-to-fhir-converter/Identifier/L"
    ref = bundle({"resourceType": "ChargeItem", "identifier": [{"value": "TXN-1", "system": placeholder}]})
    dft = "MSH|^~\\&|A|B|C|D|20250101||DFT^P03^DFT_P03|1|P|2.5\rPID|1||MRN1^^^H^MR||DOE^ANN\r"
    ft1 = "FT1|1|TXN-1||20250101||CG|99213^Visit^CPT|||1|||RAD^Radiology^{}\r"
    s = score_bundles(ours, ref, source=dft + ft1.format("L"))
    assert s.explained_by == {"ms-placeholder": 1} and "FT1-13.3" in s.diffs[0].explanation
    assert score_bundles(ours, ref, source=dft + ft1.format("X")).explained == 0
    # L in FT1-13.3 of another FT1 is no evidence
    two = dft + ft1.format("X") + ft1.replace("TXN-1", "TXN-2").format("L")
    assert score_bundles(ours, ref, source=two).explained == 0


def test_planned_period_needs_pv2_and_the_actual_stay() -> None:
    """ig-planned-period: MS's Encounter.period from PV2-8/PV2-9 is explained only where the expected value is that
    field's and Sluice's side is the actual stay (PV1-44 start; no end while PV1-45 is empty)."""
    ours = bundle(
        {
            "resourceType": "Encounter",
            "identifier": [{"value": "V1"}],
            "period": {"start": "2015-02-08T11:34:20+01:10"},
        }
    )
    ref = bundle(
        {
            "resourceType": "Encounter",
            "identifier": [{"value": "V1"}],
            "period": {"start": "2015-02-08T15:54:19+05:30", "end": "2015-02-09T15:54:19+05:30"},
        }
    )
    pv1 = "PV1|1|I" + "|" * 17 + "V1" + "|" * 25 + "20150208113420+0110\r"
    pv2 = "PV2" + "|" * 8 + "20150208113419+0110|20150209113419+0110\r"
    s = score_bundles(ours, ref, source=MSH_LINE + pv1 + pv2)
    assert s.explained_by == {"ig-planned-period": 2}, s.diffs
    assert not score_bundles(ours, ref, source=MSH_LINE + pv1).explained_by  # no PV2
    other = pv2.replace("20150209113419", "20150209120000")
    assert score_bundles(ours, ref, source=MSH_LINE + pv1 + other).explained_by == {"ig-planned-period": 1}
    discharged = pv1.replace("+0110\r", "+0110|20150209113419+0110\r")
    assert score_bundles(ours, ref, source=MSH_LINE + discharged + pv2).explained_by == {
        "ig-planned-period": 1
    }


def test_system_name_needs_the_name_and_sluices_documented_system() -> None:
    """ms-system-name: MS's URI for a coding-system name (I9 → sid/icd-9) is explained only where the message gives
    the code with that name and Sluice writes its documented system for it."""
    ours = bundle({"resourceType": "Condition", "code": {"coding": [{"system": ICD9CM, "code": "71596"}]}})
    ref = bundle(
        {"resourceType": "Condition", "code": {"coding": [{"system": ICD9CM[:-3], "code": "71596"}]}}
    )
    dg1 = "DG1|1|I9|71596^OSTEOARTHROSIS^I9\r"
    assert score_bundles(ours, ref, source=MSH_LINE + dg1).explained_by == {"ms-system-name": 1}
    assert not score_bundles(ours, ref, source=MSH_LINE + dg1.replace("^I9", "^L")).explained_by
    other = bundle({"resourceType": "Condition", "code": {"coding": [{"system": "urn:x", "code": "71596"}]}})
    assert not score_bundles(other, ref, source=MSH_LINE + dg1).explained_by


def test_the_only_resource_of_its_type_is_not_paired_with_another_entity() -> None:
    """Two Practitioners that share neither an identifier nor a family name are two people, even when each is the
    only one of its type in its bundle (the PD1-4 doctor against the EVN-5 operator); without names they pair."""
    doctor = {"resourceType": "Practitioner", "identifier": [{"value": "88"}], "name": [{"family": "HIPPO"}]}
    operator = {
        "resourceType": "Practitioner",
        "identifier": [{"value": "C08"}],
        "name": [{"family": "WOOLFSON"}],
    }
    s = score_bundles(bundle(doctor), bundle(operator))
    assert s.unmatched == ["Practitioner[C08]"]
    bare = {"resourceType": "Practitioner", "identifier": [{"value": "C08"}]}
    assert not score_bundles(bundle(doctor), bundle(bare)).unmatched


def test_charge_resources_need_the_ft1_and_sluices_counterpart() -> None:
    """MS's MedicationDispense of an FT1-29 NDC and its second Procedure of an FT1-25 code beside the PR1 of the
    same FINANCIAL group: in a DFT excused only where Sluice has the NDC as a ChargeItem's product (the PR1's
    Procedure); in an ORM/ORU (FT1 IG-unmapped) as ig-unmapped-segment."""
    ndc = {"coding": [{"system": "http://hl7.org/fhir/sid/ndc", "code": "0009-01"}]}
    cpt = {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "71045"}]}
    dispense = {"resourceType": "MedicationDispense", "status": "unknown", "medicationCodeableConcept": ndc}
    proc_pr1 = {
        "resourceType": "Procedure",
        "status": "unknown",
        "code": cpt,
        "performedDateTime": "2025-01-01",
    }
    proc_ft1 = {"resourceType": "Procedure", "status": "unknown", "code": cpt}
    ref = bundle(dispense, proc_pr1, proc_ft1)
    charge = {"resourceType": "ChargeItem", "identifier": [{"value": "TXN-1"}], "productCodeableConcept": ndc}
    ours = bundle(charge, {"resourceType": "Procedure", "code": cpt, "performedDateTime": "2025-01-01"})
    ft1 = (
        "FT1|1|TXN-1||20250101||CG|71045^Xray^C4"
        + "|" * 18
        + "71045^Xray^C4"
        + "|" * 4
        + "0009-01^Drug^NDC\r"
    )
    pr1 = "PR1|1||71045^Xray^C4||20250101\r"
    pid = "PID|1||MRN1^^^H^MR||DOE^ANN\r"
    dft = f"MSH|^~\\&|A|B|C|D|20250101||DFT^P03^DFT_P03|1|P|2.5\r{pid}"
    s = score_bundles(ours, ref, source=dft + ft1 + pr1)
    unproduced = {d.path: d.rule for d in s.diffs if d.category == "resource"}
    assert unproduced == {
        "MedicationDispense": "ms-charge-resource",
        "Procedure[71045]": "ms-charge-resource",
    }
    # no ChargeItem with the NDC on Sluice's side, or the PR1 outside the FT1's group: nothing excused
    no_product = bundle({**charge, "productCodeableConcept": {"text": "x"}}, ours["entry"][1]["resource"])
    assert "MedicationDispense" not in {
        d.path for d in score_bundles(no_product, ref, source=dft + ft1 + pr1).diffs if d.rule
    }
    apart = dft + ft1 + "DG1|1||R51^Headache^I10\r" + pr1
    assert not any(
        d.path.startswith("Procedure") and d.rule for d in score_bundles(ours, ref, source=apart).diffs
    )
    # an ORM: FT1 has no target in the IG's ORM_O01 map
    orm = f"MSH|^~\\&|A|B|C|D|20250101||ORM^O01^ORM_O01|1|P|2.5\r{pid}ORC|NW|P1\r{ft1}"
    s = score_bundles(bundle(), bundle(dispense), source=orm)
    assert s.explained_by == {"ig-unmapped-segment": s.compared}


def test_prt_role_and_split_practitioner_need_their_evidence() -> None:
    """ig-prt-role: the person only in PRT-5 of a PRT after PID/PD1 whose PRT-4 is not PP; ms-split-practitioner:
    the message gives the identifier two family names and Sluice's Practitioner carries the other one."""
    ref = bundle(
        {"resourceType": "Practitioner", "identifier": [{"value": "PRT9"}], "name": [{"family": "ADMIT"}]}
    )
    pid = "PID|1||MRN1^^^H^MR||DOE^ANN\r"
    prt = "PRT|1|AD||AD^Admitting Provider^HL70912|PRT9^ADMIT^ALAN\r"
    assert score_bundles(bundle(), ref, source=MSH_LINE + pid + prt).explained_by == {"ig-prt-role": 2}
    assert not score_bundles(
        bundle(), ref, source=MSH_LINE + pid + prt.replace("AD^Admitting", "PP^Primary")
    ).explained
    assert not score_bundles(
        bundle(), ref, source=MSH_LINE + pid + "PV1|1|O\r" + prt
    ).explained  # a visit's PRT
    also_pv1 = MSH_LINE + pid + prt + "PV1|1|O|||||PRT9^ADMIT^ALAN\r"
    assert not score_bundles(bundle(), ref, source=also_pv1).explained  # also the attending doctor

    ours = bundle(
        {"resourceType": "Practitioner", "identifier": [{"value": "DOC9"}], "name": [{"family": "ALPHA"}]}
    )
    ref = bundle(
        {"resourceType": "Practitioner", "identifier": [{"value": "DOC9"}], "name": [{"family": "BETA"}]}
    )
    two = MSH_LINE + pid + "PV1|1|O|||||DOC9^ALPHA^ANN|DOC9^BETA^BOB\r"
    assert score_bundles(ours, ref, source=two).explained_by == {"ms-split-practitioner": 1}
    cnn = MSH_LINE + pid + "OBR|1|||SVC^Svc^L||||||||||||DOC9^ALPHA^ANN" + "|" * 16 + "DOC9&BETA\r"
    assert score_bundles(ours, ref, source=cnn).explained_by == {"ms-split-practitioner": 1}
    one = MSH_LINE + pid + "PV1|1|O|||||DOC9^BETA^BOB\r"  # one name only: Sluice's ALPHA is its own mistake
    assert not score_bundles(ours, ref, source=one).explained
    gamma = bundle(
        {"resourceType": "Practitioner", "identifier": [{"value": "DOC9"}], "name": [{"family": "GAMMA"}]}
    )
    assert not score_bundles(gamma, ref, source=two).explained  # Sluice's name is none the message gives DOC9


def test_guarantor_person_and_a_repeated_name() -> None:
    """A RelatedPerson without identifiers whose name the message gives only in GT1 (IG-unmapped) is explained; one
    named in NK1 too is not.  A name the reference states twice (MS: one per XCN of the same practitioner) is
    compared once."""
    guarantor = {"resourceType": "RelatedPerson", "name": [{"family": "ROE", "given": ["KENT"]}]}
    src = MSH_LINE + "PID|1||MRN1^^^H^MR||ROE^ANN\rGT1|1||ROE^KENT\r"
    s = score_bundles(bundle(PATIENT), bundle(PATIENT, guarantor), source=src)
    assert s.explained_by == {"ig-unmapped-segment": 2}, s.diffs
    s = score_bundles(bundle(PATIENT), bundle(PATIENT, guarantor), source=src + "NK1|1|ROE^KENT|FTH\r")
    assert not s.explained_by
    doc = {
        "resourceType": "Practitioner",
        "identifier": [{"value": "P1"}],
        "name": [{"family": "GRANITE", "given": ["PAT"]}],
    }
    twice = {
        **doc,
        "name": [
            {"family": "GRANITE", "given": ["PAT"], "suffix": ["MD"]},
            {"family": "GRANITE", "given": ["PAT"]},
        ],
    }
    s = score_bundles(bundle(doc), bundle(twice))
    assert s.compared == s.agreeing == 3


def test_xcn_without_id_and_coverage_by_plan() -> None:
    """xcn-without-id needs the name only in XCNs without XCN-1 and Sluice's display-only reference to it; two
    Coverages without identifiers pair by their plan (class value)."""
    dog = {"resourceType": "Practitioner", "name": [{"family": "DOG", "given": ["DUCKHUNT"]}]}
    enc = {
        "resourceType": "Encounter",
        "identifier": [{"value": "V1"}],
        "participant": [{"individual": {"display": "DUCKHUNT DOG"}}],
    }
    src = MSH_LINE + "PV1|1|O|||||^DOG^DUCKHUNT" + "|" * 12 + "V1\r"
    assert score_bundles(bundle(enc), bundle(dog), source=src).explained_by == {"xcn-without-id": 2}
    assert not score_bundles(bundle(enc), bundle(dog), source=src.replace("|^DOG", "|D1^DOG")).explained_by
    assert not score_bundles(bundle({**enc, "participant": []}), bundle(dog), source=src).explained_by

    def cov(plan: str, **kw: Any) -> dict[str, Any]:
        return {"resourceType": "Coverage", "status": "active", "class": [{"value": plan}], **kw}

    ours = bundle(cov("PAR", identifier=[{"value": "PAR"}]), cov("FRI", identifier=[{"value": "FRI"}]))
    s = score_bundles(ours, bundle(cov("FRI"), cov("PAR")))
    assert not s.unmatched and s.compared == s.agreeing


def test_concept_map_code_and_invalid_oid_need_their_evidence() -> None:
    """ig-concept-map: MS's raw EMC against Sluice's mapped v2-0131 C only with EMC in NK1-3/NK1-7; ms-invalid-oid:
    MS's urn:oid: of a non-OID only when the message gives it as an HD-2."""
    contact = {"relationship": [{"coding": [{"system": V2_0131, "code": "C"}]}]}
    ours = bundle({**PATIENT, "contact": [contact]})
    ref = bundle({**PATIENT, "contact": [{"relationship": [{"coding": [{"code": "EMC"}]}]}]})
    nk1 = "NK1|1|ROE^ROB|||||EMC\r"
    assert score_bundles(ours, ref, source=MSH_LINE + nk1).explained_by == {"ig-concept-map": 1}
    assert not score_bundles(ours, ref, source=MSH_LINE + nk1.replace("EMC", "C")).explained_by
    other = bundle(
        {**PATIENT, "contact": [{"relationship": [{"coding": [{"system": V2_0131, "code": "O"}]}]}]}
    )
    assert not score_bundles(other, ref, source=MSH_LINE + nk1).explained_by
    mine = bundle({**PATIENT, "identifier": [{"system": "urn:sluice:authority:T123", "value": "MRN001"}]})
    theirs = bundle({**PATIENT, "identifier": [{"system": "urn:oid:r2.3", "value": "MRN001"}]})
    pid = "PID|1||MRN001^^^T123&r2.3&ISO^MR\r"
    assert score_bundles(mine, theirs, source=MSH_LINE + pid).explained_by == {"ms-invalid-oid": 1}
    assert not score_bundles(mine, theirs, source=MSH_LINE + pid.replace("r2.3", "2.3")).explained_by


def test_obr_specimen_identifier_needs_obr3_of_the_specimens_obr() -> None:
    """MS's OBR-3 / OBR-53 identifier on the Specimen it makes of an OBR is excused only when that OBR's OBR-2 is
    the Specimen's number and the value is its OBR-3 / OBR-53."""
    ours = bundle({"resourceType": "Specimen", "accessionIdentifier": {"value": "PLC9"}})
    ref = bundle({"resourceType": "Specimen", "identifier": [{"value": "PLC9"}, {"value": "FIL9"}]})
    obr = "OBR|1|PLC9|FIL9|SVC9^Svc^L|||20250101\r"
    s = score_bundles(ours, ref, source=MSH_LINE + obr)
    assert s.explained_by == {"ms-obr-specimen-identifier": 1}
    assert score_bundles(ours, ref, source=MSH_LINE + obr.replace("|PLC9|", "|OTHER|")).explained == 0
    assert score_bundles(ours, ref, source=MSH_LINE + obr.replace("|FIL9|", "|FIL0|")).explained == 0


def test_empty_xcn_participant_needs_a_field_of_delimiters() -> None:
    """ms-empty-xcn: MS's REF participant is explained only when PV1-8 is present and holds only delimiters."""
    ours = bundle({"resourceType": "Encounter", "identifier": [{"value": "V1"}]})
    ref = bundle(
        {
            "resourceType": "Encounter",
            "identifier": [{"value": "V1"}],
            "participant": [{"type": [{"coding": [{"system": PARTICIPATION, "code": "REF"}]}]}],
        }
    )
    pv1 = "PV1|1|I||||||{}" + "|" * 11 + "V1\r"
    assert score_bundles(ours, ref, source=MSH_LINE + pv1.format("^^^^")).explained_by == {"ms-empty-xcn": 1}
    assert not score_bundles(ours, ref, source=MSH_LINE + pv1.format("R1^REFER^RON")).explained_by
    assert not score_bundles(ours, ref, source=MSH_LINE + pv1.format("")).explained_by


def test_order_fields_need_their_evidence() -> None:
    """ms-order-field excuses an ORC-4 identifier only for an EI in ORC-4, a locationCode only for OBR-24's code in
    v2-0074, and a ServiceRequest only for identifiers of ORC-8 alone."""
    ours, ref, src = _every_quirk()
    assert score_bundles(ours, ref, source=src).explained_by["ms-order-field"] == 2
    eip = src.replace("||GRP5||", "||GRP5&NS^FGRP5||")
    assert score_bundles(ours, ref, source=eip).explained_by["ms-order-field"] == 1
    other = src.replace("|LAB\r", "|RAD\r")
    assert score_bundles(ours, ref, source=other).explained_by["ms-order-field"] == 1
    parent = bundle({"resourceType": "ServiceRequest", "identifier": [{"value": "PAR5"}], "status": "active"})
    orc = MSH_LINE + "ORC|NW|ORD5||||||PAR5\rOBR|1|ORD5||SVC5^Service five^L\r"
    s = score_bundles(bundle(), parent, source=orc)
    assert s.explained == s.compared == 2 and s.explained_by == {"ms-order-field": 2}
    assert score_bundles(bundle(), parent, source=orc.replace("OBR|1|ORD5|", "OBR|1|PAR5|")).explained == 0


def test_keyless_encounter_needs_a_non_adt_pv1_without_key() -> None:
    """keyless-encounter: only for a message that is not an ADT, whose one PV1 has neither PV1-19 nor PV1-44."""
    ours, ref, src = _oru_quirk()
    assert score_bundles(ours, ref, source=src).explained_by == {"keyless-encounter": 2}
    assert not score_bundles(ours, ref, source=src.replace("ORU^R01^ORU_R01", "ADT^A04^ADT_A01")).explained
    assert not score_bundles(ours, ref, source=src.replace("PV1|1|O", "PV1|1|O" + "|" * 17 + "V1")).explained
    assert not score_bundles(
        ours, ref, source=src.replace("PV1|1|O", "PV1|1|O" + "|" * 42 + "20250101")
    ).explained


def test_unsplit_subcomponents_need_those_subcomponents_in_the_message() -> None:
    """ms-unsplit-subcomponents: MS's identifier 'GRP7&L' is excused only where a component holds GRP7 and L as
    its subcomponents."""
    ours, ref, src = _every_quirk()
    assert score_bundles(ours, ref, source=src).explained_by["ms-unsplit-subcomponents"] == 1
    other = src.replace("GRP7&L^", "GRP7^")
    assert "ms-unsplit-subcomponents" not in score_bundles(ours, ref, source=other).explained_by


def test_table_system_needs_the_code_with_a_system_of_its_own() -> None:
    """ms-table-system: MS's v2 table system for a code is excused only where the message sends that code with a
    coding system of its own (not an HL7 table), in CWE-3 or (for an alternate code) CWE-6."""
    ours, ref, src = _every_quirk()
    assert score_bundles(ours, ref, source=src).explained_by["ms-table-system"] == 1
    bare = src.replace("119297000^Blood^SCT", "119297000^Blood")
    assert "ms-table-system" not in score_bundles(ours, ref, source=bare).explained_by
    table = src.replace("119297000^Blood^SCT", "119297000^Blood^HL70487")
    assert "ms-table-system" not in score_bundles(ours, ref, source=table).explained_by
    alternate = src.replace("119297000^Blood^SCT", "X^Other^^119297000^Blood^L")
    assert score_bundles(ours, ref, source=alternate).explained_by["ms-table-system"] == 1


def test_order_field_ei_with_a_namespace_is_still_an_ei() -> None:
    """ORC-4 sent as an EI with its namespace (``GRP^NS``) is the IG's requisition too."""
    ours, ref, src = _every_quirk()
    with_ns = src.replace("||GRP5||", "||GRP5^NS||")
    assert score_bundles(ours, ref, source=with_ns).explained_by["ms-order-field"] == 2


def test_no_target_participant_needs_an_unmapped_order_prt_role() -> None:
    """ig-no-target-participant: the person of an order's PRT is excused only when the IG maps that PRT-4 nowhere
    (an OP of HL70443 is the requester) and the message names the person nowhere else."""
    ours, ref, src = _every_quirk()
    assert score_bundles(ours, ref, source=src).explained_by["ig-no-target-participant"] == 2
    op = src.replace("RCT^Results Copies To^HL70443", "OP^Order Provider^HL70443")
    assert "ig-no-target-participant" not in score_bundles(ours, ref, source=op).explained_by
    elsewhere = src + "PV1|1|O|||||RCT9^COPY^CARL\r"
    assert "ig-no-target-participant" not in score_bundles(ours, ref, source=elsewhere).explained_by


def test_two_people_of_one_name_are_told_apart_by_birth_date() -> None:
    """A mother as next of kin and as the insured: same name, only the insured carries a birth date; the reference's
    person with that birth date is paired with Sluice's insured, whatever their order."""
    kin = {"resourceType": "RelatedPerson", "name": [{"family": "ROE", "given": ["RITA"]}]}
    insured = {**kin, "birthDate": "1975-06-27"}
    s = score_bundles(bundle(kin, insured), bundle(insured))
    assert s.compared == s.agreeing == 3


def test_contact_only_from_ctd_is_ig_unmapped() -> None:
    """A Patient.contact relationship MS takes from CTD-1 (IG-unmapped in ORU_R01) is excused when the message has
    no NK1 that could give a contact; with an NK1, or outside a structure that leaves CTD unmapped, it counts."""
    contact = {"relationship": [{"coding": [{"system": V2_0131, "code": "C"}]}]}
    ref = bundle({**PATIENT, "contact": [contact]})
    oru = "MSH|^~\\&|A|B|C|D|20250101||ORU^R01^ORU_R01|1|P|2.5\rPID|1||MRN001^^^H^MR||TESTPERSON^ALEX\r"
    ctd = "OBR|1|O1||SVC^Svc^L\rCTD|C^Emergency Contact^HL70131|ROE^RITA\r"
    s = score_bundles(bundle(PATIENT), ref, source=oru + ctd)
    assert s.explained_by == {"ig-unmapped-segment": 1}
    assert not score_bundles(bundle(PATIENT), ref, source=oru + "NK1|1|ROE^RITA|MTH\r" + ctd).explained_by


def test_specimen_without_identifiers_from_obr7_of_an_orm() -> None:
    """A Specimen without identifiers MS makes from an ORM's OBR (its collection time is that OBR-7) is ig-condition;
    of an ORU (the IG maps OBR[Specimen]) it counts."""
    ref = bundle(
        {"resourceType": "Specimen", "collection": {"collectedDateTime": "2021-10-20T15:15:00+05:30"}}
    )
    body = "PID|1||MRN1^^^H^MR||DOE^ANN\rORC|NW|O1\rOBR|1|O1||SVC^Svc^L|||202110201200+0215\r"
    orm = "MSH|^~\\&|A|B|C|D|20250101||ORM^O01^ORM_O01|1|P|2.5\r"
    s = score_bundles(bundle(), ref, source=orm + body)
    assert s.explained == s.compared == 1 and s.explained_by == {"ig-condition": 1}
    assert not score_bundles(
        bundle(), ref, source=orm.replace("ORM^O01^ORM_O01", "ORU^R01^ORU_R01") + body
    ).explained
    assert not score_bundles(
        bundle(), ref, source=orm + body.replace("202110201200", "202110201300")
    ).explained
