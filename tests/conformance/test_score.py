"""Unit tests of the field-level scorer (synthetic bundles only)."""

from __future__ import annotations

import copy
from typing import Any

from conformance.score import compare_dates, norm_system, score_bundles


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


def test_ms_placeholder_system_is_an_explained_difference() -> None:
    expected = sample()
    expected["entry"][0]["resource"]["identifier"][0]["system"] = (
        "http://example.com/v2-to-fhir-converter/Identifier/HOSP"
    )
    ours = copy.deepcopy(sample())
    ours["entry"][0]["resource"]["identifier"][0]["system"] = "urn:sluice:authority:HOSP"
    s = score_bundles(ours, expected)
    assert s.explained == 1
    assert s.agreeing == s.compared - 1
    assert s.percent == 100.0
    assert s.raw_percent is not None and s.raw_percent < 100
    (diff,) = s.diffs
    assert diff.path == "Patient[MRN001].identifier[MRN001].system"
    assert "placeholder" in diff.explanation


def test_compare_dates() -> None:
    assert compare_dates("2014-10-06T09:29:00+07:00", "2014-10-06T07:59:00+05:30") == (True, "")
    assert compare_dates("2014-10-06T09:29:00+07:00", "2014-10-06T09:29+07:00")[0]
    assert compare_dates("1988-08-18", "1988-08-18")[0]
    assert not compare_dates("1988-08-18", "1988-08-18T10:00:00+00:00")[0]  # precision differs
    assert not compare_dates("2014-10-06T09:29:00+07:00", "2014-10-06T09:30:00+07:00")[0]
    ok, why = compare_dates("2020-01-01T10:00:00-08:00", "2020-01-01T10:00:00+05:30")
    assert not ok and "site zone" in why


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


def test_called_by_appended_to_given_is_explained() -> None:
    """MS appends XPN-15 to given; Sluice puts it in a nickname name (IG): explained, not counted."""
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
    score = score_bundles(bundle(ours), bundle(ref))
    assert score.explained == 1 and score.percent == 100.0
    assert "XPN-15" in next(d for d in score.diffs if d.explanation).explanation


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
    with_pda = score_bundles(ours, ref, source=head + "PDA||||||Y\r")
    assert with_pda.compared == with_pda.explained > 0
    assert "PDA" in with_pda.diffs[0].explanation
    without = score_bundles(ours, ref, source=head)
    assert without.explained == 0 and without.compared > 0
