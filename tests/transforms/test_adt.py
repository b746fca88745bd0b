"""ADT golden tests (HL7 in, reviewed FHIR JSON out) plus explicit checks of the mapping rules."""

from __future__ import annotations

import json
import os

import orjson
import pytest

from engine.errors import ConversionError, MessageRejected
from transforms.convert import convert, convert_report

from .conftest import EXPECTED, MESSAGES, golden_settings, load, msg, resources, validate_resources

GOLDEN = sorted(p.stem for p in MESSAGES.glob("adt_*.hl7"))
MRN_SYS = "urn:oid:2.16.840.1.113883.19.5"
PATIENT_KEY = f"Patient?identifier={MRN_SYS}|MRN10001"


def test_every_required_trigger_has_a_golden_file() -> None:
    want = {"a01", "a02", "a03", "a04", "a05", "a06", "a07", "a08", "a11", "a12", "a13", "a28", "a31", "a40"}
    assert {n.removeprefix("adt_") for n in GOLDEN} >= want
    for n in GOLDEN:
        assert (EXPECTED / f"{n}.json").is_file()


@pytest.mark.parametrize("name", GOLDEN)
def test_golden(name: str) -> None:
    bundle = convert(load(name), golden_settings())
    validate_resources(bundle)
    path = EXPECTED / f"{name}.json"
    if os.environ.get("SLUICE_REGEN_GOLDEN") == "1":
        path.write_text(json.dumps(bundle, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    expected = json.loads(path.read_text(encoding="utf-8"))
    assert bundle == expected


@pytest.mark.parametrize("name", GOLDEN)
def test_deterministic_and_idempotent(name: str) -> None:
    """Same message twice → byte-identical bundle; every entry is a conditional update/create."""
    a = orjson.dumps(convert(load(name), golden_settings()))
    b = orjson.dumps(convert(load(name), golden_settings()))
    assert a == b
    bundle = orjson.loads(a)
    assert bundle["type"] == "transaction"
    urls = [
        e["request"]["url"]
        if e["request"]["method"] == "PUT"
        else e["request"]["url"] + "?" + e["request"]["ifNoneExist"]
        for e in bundle["entry"]
    ]
    assert len(urls) == len(set(urls)), "one entry per resource"
    for e in bundle["entry"]:
        req = e["request"]
        if req["method"] == "PUT":
            assert "?identifier=" in req["url"]
        elif req["url"] == "Practitioner":  # named in passing: created when absent, never rewritten
            assert req["method"] == "POST" and req["ifNoneExist"].startswith("identifier=")
        else:
            assert req["url"] in ("Provenance", "Linkage") and req["ifNoneExist"].startswith("_tag=")


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("adt_a01", "in-progress"),
        ("adt_a02", "in-progress"),
        ("adt_a03", "finished"),
        ("adt_a04", "in-progress"),
        ("adt_a05", "planned"),
        ("adt_a06", "in-progress"),
        ("adt_a07", "in-progress"),
        ("adt_a08", "in-progress"),
        ("adt_a11", "cancelled"),
        ("adt_a12", "in-progress"),
        ("adt_a13", "in-progress"),
    ],
)
def test_encounter_status_by_trigger(name: str, status: str) -> None:
    (enc,) = resources(convert(load(name), golden_settings()), "Encounter")
    assert enc["status"] == status
    assert enc["identifier"][0]["value"] in ("V100", "V200", "V300")


def test_a01_patient_fields() -> None:
    bundle = convert(load("adt_a01"), golden_settings())
    (pat,) = resources(bundle, "Patient")
    assert pat["identifier"][0] == {
        "type": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                    "code": "MR",
                    "display": "Medical record number",
                }
            ]
        },
        "system": MRN_SYS,
        "value": "MRN10001",
    }
    assert pat["name"][0]["family"] == "TESTPATIENT" and pat["name"][0]["given"] == ["ALEX", "Q"]
    # a single component "Last, First" is split
    assert pat["name"][1] == {"use": "nickname", "family": "Testpatient", "given": ["Al"]}
    assert pat["birthDate"] == "1980-02-29" and pat["gender"] == "female"
    assert {"system": "email", "value": "alex.test@example.org", "use": "home"} in pat["telecom"]
    (enc,) = resources(bundle, "Encounter")
    assert enc["period"]["start"] == "2025-03-15T12:00:00-07:00"  # PDT, from the site zone
    assert enc["subject"]["reference"] == next(
        e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"
    )
    # NK1: spouse → RelatedPerson; emergency contact only → Patient.contact
    assert len(resources(bundle, "RelatedPerson")) == 1
    assert len(pat["contact"]) == 2
    (cov,) = resources(bundle, "Coverage")
    assert cov["beneficiary"] == cov["subscriber"]


def test_a03_discharge_period() -> None:
    (enc,) = resources(convert(load("adt_a03"), golden_settings()), "Encounter")
    assert enc["period"] == {"start": "2025-03-15T12:00:00-07:00", "end": "2025-03-20T10:45:00-07:00"}
    assert enc["hospitalization"]["dischargeDisposition"]["coding"][0]["code"] == "01"
    assert all(loc["status"] == "completed" for loc in enc["location"][:1])


def test_a40_merge_links_and_requires() -> None:
    result = convert_report(load("adt_a40"), golden_settings())
    validate_resources(result.bundle)
    survivor, old = resources(result.bundle, "Patient")
    urls = {
        e["resource"]["identifier"][0]["value"]: e["fullUrl"]
        for e in result.bundle["entry"]
        if e["resource"]["resourceType"] == "Patient"
    }
    assert survivor["link"] == [{"other": {"reference": urls["MRN09999"]}, "type": "replaces"}]
    assert old["active"] is False
    assert old["link"] == [{"other": {"reference": urls["MRN10001"]}, "type": "replaced-by"}]
    assert result.requires == (f"Patient?identifier={MRN_SYS}|MRN09999",)
    assert not resources(result.bundle, "Encounter")


def test_a40_accept_unknown_prior_patient() -> None:
    result = convert_report(load("adt_a40"), golden_settings(unknown_prior_patient="accept"))
    assert result.requires == ()
    assert result.events.get("prior_patient_unverified") == 1


def test_a40_without_mrg_is_error() -> None:
    m = msg("MSH|^~\\&|A|B|C|D|20250101||ADT^A40^ADT_A39|1|P|2.5.1", "PID|1||MRN1^^^HOSP^MR||X^Y")
    with pytest.raises(ConversionError) as ei:
        convert(m, golden_settings())
    assert ei.value.hl7_error == "100"


def test_a28_without_visit_has_no_encounter() -> None:
    bundle = convert(load("adt_a28"), golden_settings())
    assert not resources(bundle, "Encounter")
    assert len(resources(bundle, "Patient")) == 1


# -- patient match rule ------------------------------------------------------
BASE = "MSH|^~\\&|SYNTH|FAC|C|D|20250101120000||ADT^A04^ADT_A01|77|P|2.5.1"


def test_unknown_authority_is_204_with_location() -> None:
    m = msg(BASE, "PID|1||ABC123^^^NOWHERE^MR||DOE^JO")
    with pytest.raises(ConversionError) as ei:
        convert_report(m, golden_settings())
    assert ei.value.hl7_error == "204"
    assert ei.value.location is not None and ei.value.location.hl7() == "PID^1^3"
    assert "ABC123" not in str(ei.value)  # no identifiers in error texts
    assert "identifier_systems" in str(ei.value) and "then replay" in str(ei.value)  # says what to do


def test_empty_pid3_is_101() -> None:
    m = msg(BASE, "PID|1||||DOE^JO")
    with pytest.raises(ConversionError) as ei:
        convert(m, golden_settings())
    assert ei.value.hl7_error == "101"
    assert ei.value.location is not None and ei.value.location.hl7() == "PID^1^3"


def test_default_system_fallback() -> None:
    m = msg(BASE, "PID|1||ABC123^^^NOWHERE^MR||DOE^JO")
    r = convert_report(m, golden_settings(default_identifier_system="urn:oid:1.2.3.4"))
    (pat,) = resources(r.bundle, "Patient")
    assert r.bundle["entry"][0]["request"]["url"] == "Patient?identifier=urn:oid:1.2.3.4|ABC123"
    assert pat["identifier"][0]["system"] == "urn:oid:1.2.3.4"
    assert r.events["identifier_system_default"] == 1


@pytest.mark.parametrize(
    ("religion", "expected"),
    [
        pytest.param(
            "CHR", {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0006", "code": "CHR"}]}
        ),
        pytest.param(
            "AME^American Church^HL70006",
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0006",
                        "code": "AME",
                        "display": "American Church",
                    }
                ]
            },
        ),
        pytest.param("Christian", {"coding": [{"code": "Christian"}]}, id="text"),
    ],
)
def test_religion_and_birth_place_are_patient_extensions(religion: str, expected: dict[str, object]) -> None:
    """IG PID[Patient]: PID-17 → patient-religion, PID-23 → patient-birthPlace (address text; an ST sent with
    components is their text)."""
    pid = f"PID|1||ABC123^^^NOWHERE^MR||DOE^JO||19800101|F|||||||||{religion}||||||Springfield^IL"
    r = convert_report(msg(BASE, pid), golden_settings(default_identifier_system="urn:oid:1.2.3.4"))
    validate_resources(r.bundle)
    (pat,) = resources(r.bundle, "Patient")
    ext = {e["url"].rsplit("/", 1)[1]: e for e in pat["extension"]}
    assert ext["patient-religion"]["valueCodeableConcept"] == expected
    assert ext["patient-birthPlace"]["valueAddress"] == {"text": "Springfield IL"}


def test_derived_system_demo_mode() -> None:
    m = msg(BASE, "PID|1||ABC123^^^NOWHERE^MR||DOE^JO")
    r = convert_report(m, golden_settings(derive_unknown_systems=True))
    assert r.bundle["entry"][0]["request"]["url"] == "Patient?identifier=urn:sluice:authority:NOWHERE|ABC123"
    assert r.events["identifier_system_derived"] >= 1
    # no authority at all: the sender (MSH-4) is the authority
    m2 = msg(BASE, "PID|1||ABC123^^^^MR||DOE^JO")
    r2 = convert_report(m2, golden_settings(derive_unknown_systems=True))
    assert r2.bundle["entry"][0]["request"]["url"] == "Patient?identifier=urn:sluice:authority:FAC|ABC123"


def test_mapped_authority_beats_oid_and_ssn_never_key() -> None:
    m = msg(BASE, "PID|1||111^^^SSA^SS~222^^^OTHER&1.2.840.99&ISO^MR~333^^^HOSP^MR||DOE^JO")
    r = convert_report(m, golden_settings())
    assert r.bundle["entry"][0]["request"]["url"] == f"Patient?identifier={MRN_SYS}|333"
    m = msg(BASE, "PID|1||222^^^OTHER&1.2.840.99&ISO^MR||DOE^JO")
    r = convert_report(m, golden_settings())
    assert r.bundle["entry"][0]["request"]["url"] == "Patient?identifier=urn:oid:1.2.840.99|222"


def test_invalid_birth_date_is_102_when_strict() -> None:
    m = msg(BASE, "PID|1||333^^^HOSP^MR||DOE^JO||20250230")
    with pytest.raises(ConversionError) as ei:
        convert(m, golden_settings(strictness="strict"))
    assert ei.value.hl7_error == "102"
    assert ei.value.location is not None and ei.value.location.hl7() == "PID^1^7"


def test_invalid_birth_date_is_dropped_with_a_warning_when_lenient() -> None:
    m = msg(BASE, "PID|1||333^^^HOSP^MR||DOE^JO||20250230")
    r = convert_report(m, golden_settings())  # lenient is the default
    (patient,) = [e["resource"] for e in r.bundle["entry"] if e["resource"]["resourceType"] == "Patient"]
    assert "birthDate" not in patient and patient["name"]
    assert r.warning_kinds == ("field_dropped",)
    assert r.warnings == (
        "PID-7: is not a valid HL7 date/time (no such date); PID-7 was left out (channel strictness: lenient)",
    )
    assert r.events["field_dropped"] == 1


def test_unsupported_type_and_trigger() -> None:
    with pytest.raises(MessageRejected) as ei:
        convert(msg("MSH|^~\\&|A|B|C|D|20250101||QRY^Q01|1|P|2.5.1", "PID|1||1^^^HOSP"), golden_settings())
    assert ei.value.hl7_error == "200"
    with pytest.raises(MessageRejected) as ei:
        convert(msg("MSH|^~\\&|A|B|C|D|20250101||ADT^A43|1|P|2.5.1", "PID|1||1^^^HOSP"), golden_settings())
    assert ei.value.hl7_error == "201"


def test_code_table_reject() -> None:
    m = msg(BASE, "PID|1||333^^^HOSP^MR||DOE^JO||19800101|Q")
    r = convert_report(m, golden_settings())
    assert r.events["code_table_miss"] == 1
    assert "gender" not in resources(r.bundle, "Patient")[0]
    with pytest.raises(ConversionError) as ei:
        convert(m, golden_settings(code_table_errors="reject"))
    assert ei.value.hl7_error == "103"


def test_validate_option_runs_models() -> None:
    r = convert_report(load("adt_a01"), golden_settings(validate=True))
    assert r.bundle["entry"]


def test_fhir_step(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from engine.pipeline import StageContext, Work
    from engine.registry import TRANSFORMS
    from transforms import fhir_step  # noqa: F401  (registers the step)

    make = TRANSFORMS["hl7-to-fhir"]
    step = make(
        {"identifier_systems": {"HOSP": MRN_SYS, "VISITS": "urn:oid:2.16.840.1.113883.19.6"}},
        StageContext("demo", tmp_path, "channels/demo.yaml"),
    )
    raw = (MESSAGES / "adt_a40.hl7").read_bytes()
    out = step(Work(message=load("adt_a40"), raw=raw, payload=raw, content_type="x-application/hl7-v2+er7"))
    assert out.content_type == "application/fhir+json"
    assert orjson.loads(out.payload)["type"] == "transaction"
    assert out.facts["requires"] == [f"Patient?identifier={MRN_SYS}|MRN09999"]
    assert out.meta["resource_types"] == "Patient,Provenance"


def test_fhir_step_records_only_keys_a_later_message_may_require(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An A01's Patient key becomes known (an A40 may need it); its Locations, Observations ... do not
    (nothing ever requires them, and each would be a row in the store)."""
    from engine.pipeline import StageContext, Work
    from transforms.fhir_step import make

    step = make(
        {"identifier_systems": {"HOSP": MRN_SYS, "VISITS": "urn:oid:2.16.840.1.113883.19.6"}},
        StageContext("demo", tmp_path, "channels/demo.yaml"),
    )
    raw = (MESSAGES / "adt_a01.hl7").read_bytes()
    out = step(Work(message=load("adt_a01"), raw=raw, payload=raw, content_type="x-application/hl7-v2+er7"))
    assert len(orjson.loads(out.payload)["entry"]) > 10
    assert [k.split("?")[0] for k in out.facts["keys"]] == ["Patient"]


def test_fhir_step_bad_option(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from engine.errors import ConfigError
    from engine.pipeline import StageContext
    from transforms.fhir_step import make

    with pytest.raises(ConfigError) as ei:
        make({"site_tz": "Mars/Olympus"}, StageContext("demo", tmp_path, "channels/demo.yaml"))
    assert "site_tz" in str(ei.value) and "channels/demo.yaml" in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        make({"sitetz": "UTC"}, StageContext("demo", tmp_path, "channels/demo.yaml"))
    assert "sitetz" in str(ei.value)


ADT_BASE = "MSH|^~\\&|A|GOODHOSP|C|D|20250315143000||ADT^A01^ADT_A01|1|P|2.5.1"


def test_pv2_expected_admit_and_discharge_become_planned_extensions() -> None:
    """IG PV2[Encounter]: PV2-8 / PV2-9 → extension-Encounter.plannedStartDate / plannedEndDate (R5)."""
    m = msg(
        ADT_BASE,
        "PID|1||MRN1^^^HOSP^MR||DOE^JO",
        "PV1|1|I|||||||||||||||||V1^^^VISITS^VN",
        "PV2||||||||20250401070000|20250403120000",
    )
    (enc,) = resources(convert(m, golden_settings()), "Encounter")
    assert enc["extension"] == [
        {
            "url": "http://hl7.org/fhir/5.0/StructureDefinition/extension-Encounter.plannedStartDate",
            "valueDateTime": "2025-04-01T07:00:00-07:00",
        },
        {
            "url": "http://hl7.org/fhir/5.0/StructureDefinition/extension-Encounter.plannedEndDate",
            "valueDateTime": "2025-04-03T12:00:00-07:00",
        },
    ]
    assert "period" not in enc  # an in-progress encounter's period is actual, never the plan
    m = msg(ADT_BASE, "PID|1||MRN1^^^HOSP^MR||DOE^JO", "PV1|1|I|||||||||||||||||V1^^^VISITS^VN", "PV2|||X")
    (enc,) = resources(convert(m, golden_settings()), "Encounter")
    assert "extension" not in enc


def test_nk1_7_table_0063_contact_code_goes_through_the_relationship_map() -> None:
    """NK1-7 `EMC` (a table-0063 code in the 0131 field) → v2-0131 C, like NK1-3 EMC; 0131 codes stay."""
    m = msg(ADT_BASE, "PID|1||MRN1^^^HOSP^MR||DOE^JO", "NK1|1|ROE^RITA|SPO||||EMC", "NK1|2|ROE^RAY|SPO||||N")
    bundle = convert(m, golden_settings())
    validate_resources(bundle)
    rp1, rp2 = resources(bundle, "RelatedPerson")
    assert rp1["relationship"][1] == {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/v2-0131",
                "code": "C",
                "display": "Emergency Contact",
            }
        ]
    }
    assert rp2["relationship"][1] == {
        "coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/v2-0131", "code": "N", "display": "Next-of-Kin"}
        ]
    }


def test_bad_pv2_9_is_counted_not_rejected() -> None:
    m = msg(
        ADT_BASE,
        "PID|1||MRN1^^^HOSP^MR||DOE^JO",
        "PV1|1|I|||||||||||||||||V1^^^VISITS^VN",
        "PV2|||||||||2025-04-03",
    )
    result = convert_report(m, golden_settings())
    (enc,) = resources(result.bundle, "Encounter")
    assert "extension" not in enc
    assert result.events.get("bad_planned_end") == 1


def test_in1_37_policy_deductible_becomes_cost_to_beneficiary() -> None:
    """IN1-37 (CP) → Coverage.costToBeneficiary valueMoney + price type (table 0205); a deductible that is not a
    number is dropped with a located warning, the message still converts."""
    from tests.transforms.conftest import golden_settings, msg, resources
    from transforms.convert import _convert

    base = [
        "MSH|^~\\&|SYN|SYNTH HOSP|SLUICE|SLUICE|20250301100000||ADT^A04|C1|P|2.5.1",
        "EVN|A04|20250301100000",
        "PID|1||MRN900002^^^SYNTH HOSP&2.16.840.1.113883.19.999.1&ISO^MR||TESTPERSON^SAM||19800101|M",
        "PV1|1|O|CLINIC1",
    ]
    in1 = (
        "IN1|1|PLAN7^Synthetic Plan|PAYER9^^^SYNTH&2.16.840.1.113883.19.999.9&ISO|Synthetic Payer" + "|" * 32
    )
    conv = _convert(msg(*base, in1 + "POL-1|150.50&USD^DC"), golden_settings())
    (cov,) = resources(conv.bundle, "Coverage")
    assert cov["costToBeneficiary"] == [
        {
            "valueMoney": {"value": 150.5, "currency": "USD"},
            "type": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0205",
                        "code": "DC",
                        "display": "direct unit cost",
                    }
                ]
            },
        }
    ]
    bad = _convert(msg(*base, in1 + "POL-1|lots&USD^DC"), golden_settings())
    (cov,) = resources(bad.bundle, "Coverage")
    assert "costToBeneficiary" not in cov
    assert any("IN1" in w and "deductible" in w for w in bad.warnings)


def test_pr1_procedure_per_the_ig() -> None:
    """IG PR1[Procedure] in an ADT: status unknown (the IG's "if not clear"; an ADT does not say whether a listed
    procedure was done), performer functions SNOMED 88189002 (PR1-8) / 304292004 (PR1-11) and none for PR1-12,
    PR1-25 → partOf by identifier; PR1-20 D still entered-in-error."""
    pr1 = "PR1|1||76164006^Biopsy^SCT||20250401114000|||AN1^GAS^ANA|||SU1^CUT^SAM|PP1^DOE^PAT|||||||PR-6||||||PR-1"
    m = msg(ADT_BASE, "PID|1||MRN1^^^HOSP^MR||DOE^JO", "PV1|1|I|||||||||||||||||V1^^^VISITS^VN", pr1)
    bundle = convert(m, golden_settings())
    validate_resources(bundle)
    (proc,) = resources(bundle, "Procedure")
    assert proc["status"] == "unknown"
    functions = [p.get("function", {}).get("coding", [{}])[0].get("code") for p in proc["performer"]]
    assert functions == ["88189002", "304292004", None]
    assert all(
        p["function"]["coding"][0]["system"] == "http://snomed.info/sct" for p in proc["performer"][:2]
    )
    assert proc["partOf"] == [{"identifier": {"value": "PR-1"}}]
    deleted = convert(
        msg(ADT_BASE, "PID|1||MRN1^^^HOSP^MR||DOE^JO", pr1.replace("PR-6|", "PR-6|D|")), golden_settings()
    )
    (proc,) = resources(deleted, "Procedure")
    assert proc["status"] == "entered-in-error"


def test_one_insured_named_by_two_in1_keeps_both_addresses() -> None:
    """Two IN1 segments naming the same insured (IN1-16/17) make one subscriber RelatedPerson; the second IN1's
    address and insured ids are added to it (not dropped as 'first wins')."""
    pid = "PID|1||MRN1^^^HOSP^MR||DOE^JO"
    in1 = "IN1|{n}|PLAN{n}|||" + "|" * 11 + "DOE^PAT|SPO|19700101|{addr}" + "|" * 30 + "INS{n}"
    m = msg(
        ADT_BASE,
        pid,
        in1.format(n=1, addr="1 FIRST ST^^TOWN^ZZ^00001"),
        in1.format(n=2, addr="2 SECOND ST^^TOWN^ZZ^00002"),
    )
    bundle = convert(m, golden_settings())
    validate_resources(bundle)
    (insured,) = resources(bundle, "RelatedPerson")
    assert [a["line"] for a in insured["address"]] == [["1 FIRST ST"], ["2 SECOND ST"]]
    assert {"INS1", "INS2"} <= {i["value"] for i in insured["identifier"]}
    assert len(resources(bundle, "Coverage")) == 2
