"""Issue #14, quiet errors in converted output: HL7's explicit null, Encounters without a visit number,
periods that end before they start (synthetic messages only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.errors import ConfigError, ConversionError
from engine.hl7 import parse
from tests.transforms.conftest import golden_settings, resources, validate_resources
from transforms.convert import Conversion, convert_report
from transforms.settings import ConvertSettings

SETTINGS = ConvertSettings(derive_unknown_systems=True, site_tz="America/Los_Angeles")
MSH = "MSH|^~\\&|REG|NORTH|EHR|HOSP|20250314083000||ADT^{trigger}|{control}|P|2.5.1"


def adt(*segments: str, trigger: str = "A01", control: str = "C1") -> Conversion:
    text = "\r".join(
        [MSH.format(trigger=trigger, control=control), f"EVN|{trigger}|20250314083000", *segments]
    )
    result = convert_report(parse(text + "\r"), SETTINGS)
    validate_resources(result.bundle)
    return result


def pv1(**fields: str) -> str:
    f = [""] * 53
    f[0] = "PV1"
    f[1] = "1"
    for k, v in fields.items():
        f[int(k[1:])] = v
    return "|".join(f).rstrip("|")


PID = "PID|1||MRN1^^^NORTH^MR||Sample^Jo||19800101|F|||1 Way^^City^OR^97477||^PRN^PH^^1^541^5550100"


def one(bundle: dict[str, Any], rtype: str) -> dict[str, Any]:
    (res,) = resources(bundle, rtype)
    return res


# ---------------------------------------------------------------------------
# "" (explicit null)
# ---------------------------------------------------------------------------
def test_explicit_null_never_reaches_fhir_and_clears_the_element_on_update() -> None:
    full = adt(PID, pv1(f2="I", f19="V1^^^NORTH^VN"), trigger="A08")
    nulls = adt(
        'PID|1||MRN1^^^NORTH^MR~""||Sample^Jo||""|F|||""~1 Way^""^City||""~^PRN^PH^^1^541^5550100',
        pv1(f2="I", f19="V1^^^NORTH^VN", f44='""', f45='""'),
        trigger="A08",
    )
    assert b'""' not in orjson.dumps(nulls.bundle)
    patient = one(nulls.bundle, "Patient")
    before = one(full.bundle, "Patient")
    # "" in an optional date: absent, not rejected
    assert "birthDate" in before and "birthDate" not in patient
    assert [i["value"] for i in patient["identifier"]] == ["MRN1"]
    assert patient["address"] == [{"line": ["1 Way"], "city": "City"}]
    assert [t["value"] for t in patient["telecom"]] == ["+1 (541) 5550100"]
    # the update is a full conditional PUT: leaving the element out clears it on the server
    [put] = [e["request"] for e in nulls.bundle["entry"] if e["resource"]["resourceType"] == "Patient"]
    assert put["method"] == "PUT"
    assert "period" not in one(nulls.bundle, "Encounter")
    assert nulls.events.get("explicit_null") == 7  # PID-3~, -7, -11~, -11.2, -13~, PV1-44, -45


def test_explicit_null_in_the_patient_key_is_a_missing_key() -> None:
    with pytest.raises(ConversionError) as err:
        adt('PID|1||""||Sample^Jo', pv1(f2="I", f19="V1"))
    assert err.value.hl7_error == "101" and str(err.value.location) == "PID-3"


# ---------------------------------------------------------------------------
# Encounter without a visit number
# ---------------------------------------------------------------------------
def test_pv1_without_visit_number_or_admit_time_still_gets_an_encounter_keyed_by_the_message() -> None:
    seg = pv1(f2="I", f3="4N^401^A^NORTH", f7="1234567893^Carer^Casey^^^Dr^^^NPI")
    first = adt(PID, seg, control="C1")
    enc = one(first.bundle, "Encounter")
    assert enc["class"]["code"] == "IMP" and enc["participant"][0]["type"][0]["coding"][0]["code"] == "ATND"
    assert enc["location"] and enc["subject"]["reference"].startswith("urn:uuid:")
    assert first.events.get("encounter_keyed_by_message") == 1
    assert first.warnings == (
        "PV1-19: no visit number (PV1-19) and no admit date/time (PV1-44): the Encounter is keyed by the "
        "patient and this message's control id (MSH-10), so later messages about the visit cannot update it",
    )
    url = [e["request"]["url"] for e in first.bundle["entry"] if e["resource"]["resourceType"] == "Encounter"]
    # a resend of the same message writes the same Encounter; another message another one
    again = adt(PID, seg, control="C1")
    assert [
        e["request"]["url"] for e in again.bundle["entry"] if e["resource"]["resourceType"] == "Encounter"
    ] == url
    other = adt(PID, seg, control="C2")
    assert [
        e["request"]["url"] for e in other.bundle["entry"] if e["resource"]["resourceType"] == "Encounter"
    ] != url


def test_admit_time_keys_the_encounter_across_messages_when_pv1_19_is_empty() -> None:
    seg = pv1(f2="I", f44="20250314082500")
    a = adt(PID, seg, control="C1")
    b = adt(PID, seg, trigger="A08", control="C2")
    urls = [
        [e["request"]["url"] for e in r.bundle["entry"] if e["resource"]["resourceType"] == "Encounter"]
        for r in (a, b)
    ]
    assert urls[0] == urls[1] and len(urls[0]) == 1 and not a.warnings


def test_placeholder_pv1_of_a_person_event_makes_no_encounter() -> None:
    for trigger in ("A28", "A31", "A08"):
        result = adt(PID, "PV1|1|N", trigger=trigger)
        assert resources(result.bundle, "Encounter") == [] and not result.warnings


# ---------------------------------------------------------------------------
# Encounter.period ending before it starts
# ---------------------------------------------------------------------------
def test_discharge_before_admit_drops_the_end_with_a_located_warning() -> None:
    result = adt(
        PID, pv1(f2="I", f19="V1^^^NORTH^VN", f44="20250314082500", f45="20250313120000"), trigger="A03"
    )
    enc = one(result.bundle, "Encounter")
    assert enc["period"] == {"start": "2025-03-14T08:25:00-07:00"}
    assert result.events.get("encounter_end_before_start") == 1
    assert result.warnings == (
        "PV1-45: discharge date/time is before the admit date/time (PV1-44); Encounter.period.end dropped",
    )
    ok = adt(PID, pv1(f2="I", f19="V1^^^NORTH^VN", f44="20250314082500", f45="20250315120000"), trigger="A03")
    assert one(ok.bundle, "Encounter")["period"] == {
        "start": "2025-03-14T08:25:00-07:00",
        "end": "2025-03-15T12:00:00-07:00",
    }
    assert not ok.warnings


# ---------------------------------------------------------------------------
# Units: the UCUM system only for valid UCUM
# ---------------------------------------------------------------------------
def oru(*obx: str, settings: ConvertSettings = SETTINGS) -> Conversion:
    text = "\r".join(
        [
            "MSH|^~\\&|LAB|NORTH|EHR|HOSP|20250314083000||ORU^R01^ORU_R01|L1|P|2.5.1",
            "PID|1||MRN1^^^NORTH^MR||Sample^Jo||19800101|F",
            "OBR|1|PL1|FL1^LAB|24331-1^Lipid panel^LN|||20250314080000",
            *obx,
        ]
    )
    result = convert_report(parse(text + "\r"), settings)
    validate_resources(result.bundle)
    return result


@pytest.mark.parametrize(
    ("sent", "ucum"),
    [
        ("mmHg", "mm[Hg]"),
        ("gm/dl", "g/dL"),
        ("MMOLL", "mmol/L"),
        ("UMOLL", "umol/L"),
        ("MLMIN", "mL/min"),
        ("tril/L", "10*12/L"),
        ("giga.l-1", "10*9/L"),
        ("tera.l-1", "10*12/L"),
        (
            "K/uL",
            "10*3/uL",
        ),  # valid UCUM grammar (kelvin per microlitre) but meant as thousands: the map wins
        ("mg/dL", "mg/dL"),  # valid UCUM as sent
        ("mL/min/{1.73_m2}", "mL/min/{1.73_m2}"),
        ("mmHg^^UCUM", "mm[Hg]"),  # labelled UCUM by the sender, but not UCUM: mapped
    ],
)
def test_units_are_ucum_only_when_valid_or_mapped(sent: str, ucum: str) -> None:
    obs = one(oru(f"OBX|1|NM|2093-3^Cholesterol^LN||5.2|{sent}|||||F").bundle, "Observation")
    q = obs["valueQuantity"]
    assert q["system"] == "http://unitsofmeasure.org" and q["code"] == ucum
    assert q["unit"] == sent.split("^")[0]  # the unit text as sent


# the last one is labelled UCUM by the sender, but is neither UCUM nor in the map
@pytest.mark.parametrize("sent", ["furlongs", "mmHgx", "cells per field", "per cent^^UCUM"])
def test_a_unit_that_is_not_ucum_keeps_its_text_without_a_system(sent: str) -> None:
    obs = one(oru(f"OBX|1|NM|2093-3^Cholesterol^LN||5.2|{sent}|||||F").bundle, "Observation")
    assert obs["valueQuantity"] == {"value": 5.2, "unit": sent.split("^")[0]}


@pytest.mark.parametrize(
    ("sent", "ucum"),
    [
        ("MG", "mg"),  # case-sensitive UCUM would read megagram
        ("G", "g"),  # gauss
        ("MG/DL", "mg/dL"),
        ("10*3/UL", "10*3/uL"),
        ("NG/ML", "ng/mL"),
        ("S", "s"),  # siemens
        ("M[IU]/L", "m[IU]/L"),
        ("MCG", "ug"),  # not UCUM in either case: the shipped map
        ("L", "L"),
    ],
)
def test_an_upper_case_unit_is_read_as_case_insensitive_ucum(sent: str, ucum: str) -> None:
    """Senders limited to upper case write UCUM's case-insensitive form: MG is milligrams, not the megagram its
    case-sensitive spelling names."""
    obs = one(oru(f"OBX|1|NM|2093-3^Cholesterol^LN||5.2|{sent}|||||F").bundle, "Observation")
    assert obs["valueQuantity"] == {
        "value": 5.2,
        "unit": sent,
        "system": "http://unitsofmeasure.org",
        "code": ucum,
    }


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ("^^^mg/dL^^UCUM", {"unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"}),
        ("^^^mm Hg^^99LAB", {"unit": "mm Hg", "system": "urn:sluice:codesystem:99LAB", "code": "mm Hg"}),
        ("^^^mmHg", {"unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}),
    ],
)
def test_units_sent_only_as_the_alternate_triplet_are_kept(sent: str, expected: dict[str, Any]) -> None:
    """OBX-6 with CWE-1..3 empty and the unit in CWE-4..6 (a lab system's habit): the alternate unit is the
    unit, not dropped."""
    obs = one(oru(f"OBX|1|NM|2093-3^Cholesterol^LN||5.2|{sent}|||||F").bundle, "Observation")
    assert obs["valueQuantity"] == {"value": 5.2, **expected}


@pytest.mark.parametrize(
    "sent", ["EA", "TAB", "YR"]
)  # valid case-sensitive UCUM (exa-ampere, ...), no c/i UCUM
def test_an_upper_case_unit_that_is_no_case_insensitive_ucum_has_no_system(sent: str) -> None:
    obs = one(oru(f"OBX|1|NM|2093-3^Cholesterol^LN||5.2|{sent}|||||F").bundle, "Observation")
    assert obs["valueQuantity"] == {"value": 5.2, "unit": sent}


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        # a sender's numeric unit code: UCUM's grammar reads "43" as the factor 43, so the text decides
        ("43^mg/hr", {"value": 5.2, "unit": "mg/hr", "system": "http://unitsofmeasure.org", "code": "mg/h"}),
        ("12^mg/dL", {"value": 5.2, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"}),
        ("43^per bag", {"value": 5.2, "unit": "per bag"}),
        ("43", {"value": 5.2, "unit": "43"}),
        ("1", {"value": 5.2, "unit": "1", "system": "http://unitsofmeasure.org", "code": "1"}),  # unity
    ],
)
def test_a_numeric_unit_code_is_not_labelled_ucum(sent: str, expected: dict[str, Any]) -> None:
    obs = one(oru(f"OBX|1|NM|2093-3^Cholesterol^LN||5.2|{sent}|||||F").bundle, "Observation")
    assert obs["valueQuantity"] == expected


def test_a_channel_extends_the_unit_map() -> None:
    settings = ConvertSettings.from_options(
        {"derive_unknown_systems": True, "unit_map": {"furlongs": "[fur_us]", "MMOLL": "mmol/L"}},
        Path("."),
        "c.yaml",
    )
    obs = one(
        oru("OBX|1|NM|2093-3^Cholesterol^LN||5.2|FURLONGS|||||F", settings=settings).bundle, "Observation"
    )
    assert obs["valueQuantity"]["code"] == "[fur_us]" and obs["valueQuantity"]["unit"] == "FURLONGS"
    with pytest.raises(ConfigError) as err:
        ConvertSettings.from_options({"unit_map": {"furlongs": "furlongs"}}, Path("."), "c.yaml")
    assert "not valid UCUM" in str(err.value) and err.value.key == "options.unit_map"


def test_the_shipped_unit_map_targets_are_valid_ucum() -> None:
    from transforms.datatypes import UNIT_MAP, valid_ucum

    assert len(UNIT_MAP) > 40
    assert [(k, v) for k, v in UNIT_MAP.items() if not valid_ucum(v)] == []
    assert valid_ucum("mm[Hg]") and not valid_ucum("mmHg") and not valid_ucum("gm/dl")


# ---------------------------------------------------------------------------
# Fallbacks: v2.3 patient identifiers, narrative OBX without OBX-3
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("pid", "field"),
    [
        ("PID|1|EXT77^^^NORTH|||Sample^Jo||19800101|F", 2),
        ("PID|1|||ALT5^^^NORTH^PI~|Sample^Jo||19800101|F", 4),
        ('PID|1|EXT77^^^NORTH|""|ALT5^^^NORTH|Sample^Jo||19800101|F', 2),  # PID-2 before PID-4
    ],
)
def test_patient_keyed_by_pid_2_or_pid_4_when_pid_3_is_empty(pid: str, field: int) -> None:
    result = adt(pid, pv1(f2="O", f19="V1^^^NORTH^VN"), trigger="A04")
    value = "EXT77" if field == 2 else "ALT5"
    [entry] = [e for e in result.bundle["entry"] if e["resource"]["resourceType"] == "Patient"]
    assert entry["request"]["url"] == f"Patient?identifier=urn:sluice:authority:NORTH|{value}"
    assert {"system": "urn:sluice:authority:NORTH", "value": value}.items() <= entry["resource"][
        "identifier"
    ][0].items()
    assert result.warnings == (
        f"PID-{field}: PID-3 is empty: the patient is matched on PID-{field} (a pre-v2.5 identifier field)",
    )
    assert result.events.get(f"patient_key_from_pid_{field}") == 1


def test_no_identifier_in_pid_2_3_or_4_is_still_rejected_at_pid_3() -> None:
    with pytest.raises(ConversionError) as err:
        adt("PID|1||||Sample^Jo", pv1(f2="O", f19="V1"), trigger="A04")
    assert err.value.hl7_error == "101" and str(err.value.location) == "PID-3"


def test_text_obx_without_obx_3_becomes_the_report_conclusion() -> None:
    result = oru(
        "OBX|1|NM|2093-3^Cholesterol^LN||5.2|mmol/L|||||F",
        "OBX|2|TX|||Impression: synthetic narrative line one.||||||F",
        "OBX|3|TX|||Line two of the narrative.||||||F",
    )
    report = one(result.bundle, "DiagnosticReport")
    assert report["conclusion"] == "Impression: synthetic narrative line one.\nLine two of the narrative."
    assert len(report["result"]) == 1 and len(resources(result.bundle, "Observation")) == 1
    assert result.warnings == (
        "OBX(2)-3: OBX-3 is empty on a text OBX: its text goes to DiagnosticReport.conclusion",
    )


# ---------------------------------------------------------------------------
# Typed values: RP, numeric reference ranges
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("vtype", "value", "text"),
    [
        ("DLN", "D1234567^OR^20300101", "D1234567 OR 20300101"),  # driver's licence: number, state, expiry
        ("CX", "MRN77^^^NORTH&1.2.3&ISO^MR", "MRN77 NORTH 1.2.3 ISO MR"),
        ("FN", "^Sample", "Sample"),  # an empty first component
        ("ZZ", "A\\S\\B", "A^B"),  # one component: an escaped separator is data, kept as sent
    ],
)
def test_a_composite_value_without_a_mapping_is_text_not_the_encoded_string(
    vtype: str, value: str, text: str
) -> None:
    obs = one(oru(f"OBX|1|{vtype}|99999-9^Other^LN||{value}||||||F").bundle, "Observation")
    assert obs["valueString"] == text


def test_an_nm_value_with_extra_components_is_its_first_component_with_a_warning() -> None:
    """A sender's NM with components (``85^^Enzymatic^false``: the number, then method and flag)."""
    result = oru("OBX|1|NM|2345-7^Glucose^LN||85^^Enzymatic^false|mg/dL|||||F")
    assert one(result.bundle, "Observation")["valueQuantity"]["value"] == 85
    assert list(result.warning_kinds) == ["value_components_dropped"]
    assert result.warnings[0].startswith("OBX-5: ")
    # not a number in component 1 either: the text, without the encoding
    obs = one(oru("OBX|1|NM|2345-7^Glucose^LN||see note^^Enzymatic|mg/dL|||||F").bundle, "Observation")
    assert obs["valueString"] == "see note Enzymatic"


@pytest.mark.parametrize(
    ("obx", "text", "appended"),
    [
        pytest.param(
            "OBX|1|ST|6690-2^WBC^LN||5.8|10*3/uL^THOU/uL|4.0-10.0||||F", "5.8 THOU/uL", True, id="st-number"
        ),
        pytest.param(
            "OBX|1|NM|85354-9^BP^LN||120/80|mm[Hg]|||||F", "120/80 mm[Hg]", True, id="nm-not-one-number"
        ),
        pytest.param("OBX|1|ST|5905-5^Titer^LN||<1:40|{titer}|||||F", "<1:40 {titer}", True, id="st-titer"),
        pytest.param(
            "OBX|1|ST|5778-6^Color^LN||Yellow|mg/dL|||||F", "Yellow", False, id="text-not-a-measurement"
        ),
        pytest.param("OBX|1|TX|5778-6^Comment^LN||42|mg/dL|||||F", "42", False, id="tx-narrative-untouched"),
        pytest.param(
            "OBX|1|ST|6690-2^WBC^LN||5.8 THOU/uL|THOU/uL|||||F", "5.8 THOU/uL", False, id="already-there"
        ),
    ],
)
def test_units_of_a_measurement_kept_as_text_follow_the_text(obx: str, text: str, appended: bool) -> None:
    """ST (or NM that is not one number) has no Quantity for OBX-6: a measurement's units are appended to its
    valueString (the IG's SN text rule) instead of being lost; other text is left as sent."""
    result = oru(obx)
    obs = one(result.bundle, "Observation")
    assert obs["valueString"] == text
    assert "valueQuantity" not in obs
    assert result.events.get("obx_units_in_text", 0) == int(appended)
    validate_resources(result.bundle)


def test_rp_value_is_an_attachment_not_the_encoded_string() -> None:
    result = oru(
        "OBX|1|RP|18748-4^Diagnostic imaging study^LN||https://images.example.org/study/1^^IM^JPEG||||||F"
        "|||20250314081500"
    )
    obs = one(result.bundle, "Observation")
    assert "valueString" not in obs and "^" not in orjson.dumps(obs).decode()
    assert obs["extension"] == [
        {
            "url": "http://hl7.org/fhir/5.0/StructureDefinition/extension-Observation.valueAttachment",
            "valueAttachment": {
                "contentType": "image/jpeg",
                "url": "https://images.example.org/study/1",
                "title": "Diagnostic imaging study",
                "creation": "2025-03-14T08:15:00-07:00",
            },
        }
    ]


@pytest.mark.parametrize(
    ("pointer", "url", "counted"),
    [
        # a UNC path (escaped backslashes, as a document system sends it) → the file: URL of the same file
        ("\\E\\\\E\\docsrv\\E\\scans\\E\\rep 1.pdf", "file://docsrv/scans/rep%201.pdf", 1),
        ("C:\\E\\reports\\E\\r1.pdf", "file://localhost/C:/reports/r1.pdf", 1),
        ("https://images.example.org/study 1", "https://images.example.org/study%201", 0),
        ("studies/1.dcm", "studies/1.dcm", 0),
    ],
)
def test_rp_pointer_becomes_a_valid_url(pointer: str, url: str, counted: int) -> None:
    """Attachment.url is a URI: a Windows file path becomes its file: URL (RFC 8089), blanks are
    percent-encoded; a URL or relative reference is kept."""
    result = oru(f"OBX|1|RP|11502-2^Report^LN||{pointer}^^application^pdf||||||F")
    obs = one(result.bundle, "Observation")
    assert obs["extension"][0]["valueAttachment"]["url"] == url
    assert result.events.get("attachment_path_as_file_url", 0) == counted
    validate_resources(result.bundle)


@pytest.mark.parametrize(
    ("text", "low", "high"),
    [
        ("4.3-6.2", 4.3, 6.2),
        ("4.3 to 6.2", 4.3, 6.2),
        ("4.3 - 6.2", 4.3, 6.2),
        ("<5", None, 5),
        (">=1.5", 1.5, None),
    ],
)
def test_numeric_reference_range_has_low_high_and_text(
    text: str, low: float | None, high: float | None
) -> None:
    obs = one(oru(f"OBX|1|NM|2093-3^Cholesterol^LN||5.2|mmol/L|{text}||||F").bundle, "Observation")
    [rr] = obs["referenceRange"]
    assert rr["text"] == text
    unit = {"unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"}
    assert rr.get("low") == (None if low is None else {"value": low, **unit})
    assert rr.get("high") == (None if high is None else {"value": high, **unit})


# ---------------------------------------------------------------------------
# strictness: lenient | strict (issue #14): a bad value in a non-key field is dropped with a located warning
# ---------------------------------------------------------------------------
_ADT = "MSH|^~\\&|SYNTH|FAC|C|D|20250101120000||ADT^A01^ADT_A01|LEN1|P|2.5.1"
_PID = "PID|1||LEN333^^^HOSP^MR||DOE^JO||19800101|F"
_SIU = "MSH|^~\\&|SYNSCHED|SYNTH HOSP|SLUICE|SLUICE|20250301100000||SIU^S12|LEN2|P|2.5.1"
_SCH = "SCH|PL1|FL1^SYNSCHED^2.16.840.1.113883.19.999.4^ISO|||||||||^^^20250315090000^20250315093000|||||||||||||Booked"


def _types(bundle: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


@pytest.mark.parametrize(
    ("segments", "where", "resource", "kept"),
    [
        pytest.param(
            (
                _ADT,
                _PID,
                "|".join(
                    ["PV1", "1", "I", "W1^101^A", "", "", "", "DOC1^WHO^AL"]
                    + [""] * 11
                    + ["V100^^^VISITS"]
                    + [""] * 24
                    + ["20250230^"]
                ),
            ),
            "PV1-44",
            "Encounter",
            "class",
            id="PV1-44 no such date",
        ),
        pytest.param(
            (
                _ADT,
                _PID,
                "|".join(["PV1", "1", "I"] + [""] * 16 + ["V101^^^VISITS"]),
                "AL1|1|DA|PCN^Penicillin^L|SV|hives|MI",
            ),
            "AL1-6",
            "AllergyIntolerance",
            "code",
            id="AL1-6 MI",
        ),
        pytest.param(
            (_SIU, _SCH, _PID, "AIG|1|A|EQ5^Video scope^L|101^Equipment^L|||||20250315091500|min|20|min"),
            "AIG-9",
            "Appointment",
            "start",
            id="AIG-9 timestamp in a number",
        ),
    ],
)
def test_lenient_drops_a_bad_non_key_value_with_a_located_warning(
    segments: tuple[str, ...], where: str, resource: str, kept: str
) -> None:
    m = parse("\r".join(segments))
    with pytest.raises(ConversionError) as ei:
        convert_report(m, golden_settings(strictness="strict"))
    assert ei.value.hl7_error == "102" and str(ei.value.location).startswith(where)
    r = convert_report(m, golden_settings())  # lenient: the default
    (res, *_) = _types(r.bundle, resource)
    assert kept in res
    assert r.warning_kinds == ("field_dropped",)
    assert (
        r.warnings[0].startswith(where)
        and f"{where} was left out (channel strictness: lenient)" in r.warnings[0]
    )
    for seg in segments:  # no value of the message in the warning
        for value in seg.split("|")[1:]:
            if len(value) > 3:
                assert value not in r.warnings[0]


def test_keys_stay_strict_in_lenient_mode() -> None:
    from engine.errors import Location
    from transforms.convert import droppable

    lenient = golden_settings()
    for seg, field in [
        ("PID", 3),
        ("PV1", 19),
        ("ORC", 2),
        ("OBR", 3),
        ("SCH", 1),
        ("MSH", 9),
        ("MSH", 10),
        ("OBX", 5),
        # the keys of the order, pharmacy, problem and financial messages
        ("PID", 18),
        ("FT1", 2),
        ("PRB", 4),
        ("GOL", 4),
        ("RXE", 15),
        ("RXD", 1),
        ("IAM", 7),
        ("PR1", 19),
        ("SPM", 2),
    ]:
        err = ConversionError("bad", code="102", location=Location(seg, 1, field))
        assert droppable(err, lenient) is None, (seg, field)
    assert droppable(
        ConversionError("bad", code="102", location=Location("PV1", 1, 44)), lenient
    ) == Location("PV1", 1, 44)
    # only bad values (102): a required field missing or a code the channel rejects stays a rejection
    assert droppable(ConversionError("missing", code="101", location=Location("OBX", 1, 3)), lenient) is None
    assert droppable(ConversionError("unmapped", code="103", location=Location("OBX", 1, 3)), lenient) is None
    assert droppable(ConversionError("bad", code="102"), lenient) is None  # unlocated
    strict = golden_settings(strictness="strict")
    assert droppable(ConversionError("bad", code="102", location=Location("PV1", 1, 44)), strict) is None


def test_a_bad_message_time_is_dropped_when_lenient_and_rejected_when_strict() -> None:
    """MSH-7 is no key (only Provenance.recorded reads it): a lenient channel leaves out a value HL7 does not
    allow (an impossible month; milliseconds without their dot, as Mirth's test data sends) with a located
    warning; a strict one rejects the message at MSH-7."""
    for bad in ("20251341", "20110613122406637"):
        m = parse("\r".join([_ADT.replace("20250101120000", bad), _PID]))
        with pytest.raises(ConversionError) as ei:
            convert_report(m, golden_settings(strictness="strict"))
        assert str(ei.value.location) == "MSH-7"
        r = convert_report(m, golden_settings())
        assert r.warning_kinds == ("field_dropped",) and r.warnings[0].startswith("MSH-7")
        (prov,) = _types(r.bundle, "Provenance")
        assert prov["recorded"]  # the time of conversion
        assert _types(r.bundle, "Patient")


def test_msh2_without_a_subcomponent_separator_converts_with_the_ampersand_as_data() -> None:
    m = parse(
        "MSH|^~\\|SYNTH|FAC|C|D|20250101120000||ADT^A08^ADT_A01|ENC3|P|2.5.1\r"
        "PID|1||AMP333^^^HOSP^MR||SMITH & JONES^ANN||19800101|F\r"
    )
    r = convert_report(m, golden_settings())
    (patient,) = _types(r.bundle, "Patient")
    assert patient["name"][0]["family"] == "SMITH & JONES" and patient["name"][0]["given"] == ["ANN"]
    validate_resources(r.bundle)
