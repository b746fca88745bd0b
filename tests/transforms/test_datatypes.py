"""Datatype functions: dates/zones, names, addresses, telecom, identifiers, codes, numbers, text."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import ConfigError, ConversionError, Location
from engine.hl7 import DEFAULT_DELIMITERS, Rep
from transforms import datatypes as dt
from transforms.bundle import ConvertContext
from transforms.settings import ConvertSettings, load_code_map

from .conftest import msg

LA = ConvertSettings()
LOC = Location("PID", 1, 7)


def rep(raw: str) -> Rep:
    return Rep(raw, DEFAULT_DELIMITERS)


def ctx(**kw: object) -> ConvertContext:
    return ConvertContext(msg("MSH|^~\\&|APP|FAC|C|D|20250101||ADT^A01|1|P|2.5.1"), ConvertSettings(**kw))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "kind", "out"),
    [
        ("2025", "dateTime", "2025"),
        ("202503", "dateTime", "2025-03"),
        ("20250315", "dateTime", "2025-03-15"),
        ("20250315", "date", "2025-03-15"),
        ("2025031514", "dateTime", "2025-03-15T14:00:00-07:00"),  # PDT (DST began 2025-03-09)
        ("20250115143000", "dateTime", "2025-01-15T14:30:00-08:00"),  # PST
        ("20250315143015.1234", "dateTime", "2025-03-15T14:30:15.1234-07:00"),
        ("20250315143015+0215", "dateTime", "2025-03-15T14:30:15+02:15"),
        ("20250315143015-0500", "date", "2025-03-15"),
        ("20250315", "instant", "2025-03-15T00:00:00-07:00"),
        ("19800229", "date", "1980-02-29"),
    ],
)
def test_dtm(value: str, kind: str, out: str) -> None:
    assert dt.dtm(value, LA, LOC, kind=kind) == out


def test_dtm_site_zone_not_host() -> None:
    berlin = ConvertSettings(site_tz="Europe/Berlin")
    assert dt.dtm("20250715120000", berlin) == "2025-07-15T12:00:00+02:00"
    assert dt.dtm("20250115120000", berlin) == "2025-01-15T12:00:00+01:00"
    assert dt.dtm("20250715120000", ConvertSettings(site_tz="UTC")) == "2025-07-15T12:00:00+00:00"


@pytest.mark.parametrize(
    "value",
    ["20250230", "20251301", "2025031525", "202503151260", "abc", "20250315+2500", "0000", "2025-03-15"],
)
def test_dtm_invalid_is_102(value: str) -> None:
    with pytest.raises(ConversionError) as ei:
        dt.dtm(value, LA, LOC)
    assert ei.value.hl7_error == "102"
    assert ei.value.location == LOC


def test_custom_date_format() -> None:
    s = ConvertSettings(date_format="%m/%d/%Y %H:%M")
    assert dt.dtm("03/15/2025 14:30", s) == "2025-03-15T14:30:00-07:00"
    assert dt.dtm("03/15/2025", s, kind="date") == "2025-03-15"
    assert dt.dtm("20250315", s) == "2025-03-15"  # HL7 format still accepted
    with pytest.raises(ConversionError):
        dt.dtm("15.03.2025", s)


def test_xpn() -> None:
    assert dt.xpn(rep("DOE^JANE^Q^JR^DR^^L")) == {
        "use": "official",
        "family": "DOE",
        "given": ["JANE", "Q"],
        "prefix": ["DR"],
        "suffix": ["JR"],
    }
    assert dt.xpn(rep("Doe, Jane Quinn")) == {"family": "Doe", "given": ["Jane", "Quinn"]}
    assert dt.xpn(rep("")) is None


def test_xad() -> None:
    a = dt.xad(rep("1 MAIN ST^STE 2^TOWN^OR^97000^USA^H^^LANE"))
    assert a == {
        "use": "home",
        "line": ["1 MAIN ST", "STE 2"],
        "city": "TOWN",
        "district": "LANE",
        "state": "OR",
        "postalCode": "97000",
        "country": "USA",
    }
    assert dt.xad(rep("^^^^^^M")) is None


def test_xtn() -> None:
    assert dt.xtn(rep("(555)555-0100^PRN^PH")) == {"system": "phone", "value": "(555)555-0100", "use": "home"}
    assert dt.xtn(rep("^NET^Internet^a@example.org")) == {"system": "email", "value": "a@example.org"}
    assert dt.xtn(rep("^^CP^^1^555^5550101")) == {
        "system": "phone",
        "value": "+1 (555) 5550101",
        "use": "mobile",
    }
    assert dt.xtn(rep("^WPN^FX^^^555^5550102^9")) == {
        "system": "fax",
        "value": "(555) 5550102 ext. 9",
        "use": "work",
    }


def test_cx_systems() -> None:
    c = ctx(identifier_systems={"HOSP": "urn:oid:1.2.3"})
    assert dt.cx(rep("1^^^HOSP^MR"), c)["system"] == "urn:oid:1.2.3"  # type: ignore[index]
    assert dt.cx(rep("1^^^X&2.16.840.1&ISO"), c)["system"] == "urn:oid:2.16.840.1"  # type: ignore[index]
    assert "system" not in dt.cx(rep("1^^^UNKNOWN"), c)  # type: ignore[operator]
    c2 = ctx(derive_unknown_systems=True)
    assert dt.cx(rep("1^^^UNKNOWN"), c2)["system"] == "urn:sluice:authority:UNKNOWN"  # type: ignore[index]
    assert c2.events["identifier_system_derived"] == 1


def test_cwe_systems_and_maps(tmp_path: Path) -> None:
    c = ctx()
    assert dt.cwe(rep("718-7^Hemoglobin^LN"), c) == {
        "coding": [{"system": "http://loinc.org", "code": "718-7", "display": "Hemoglobin"}]
    }
    for name, system in [
        ("SCT", "http://snomed.info/sct"),
        ("I10", "http://hl7.org/fhir/sid/icd-10-cm"),
        ("I9CM", "http://hl7.org/fhir/sid/icd-9-cm"),
        ("RXNORM", "http://www.nlm.nih.gov/research/umls/rxnorm"),
        ("HL70001", "http://terminology.hl7.org/CodeSystem/v2-0001"),
        ("99LAB", "urn:sluice:codesystem:99LAB"),
    ]:
        assert dt.cwe(rep(f"X^x^{name}"), c)["coding"][0]["system"] == system  # type: ignore[index]
    assert dt.cwe(rep("^free text only"), c) == {"text": "free text only"}
    cmap = load_code_map("demo-lab-codes.csv", tmp_path)
    c = ctx(code_maps={"OBX-3": cmap})
    cc = dt.cwe(rep("GLU^Glucose^L"), c, field="OBX-3")
    assert cc["coding"][0] == {
        "system": "http://loinc.org",
        "code": "2345-7",  # type: ignore[index]
        "display": "Glucose [Mass/volume] in Serum or Plasma",
    }
    assert cc["coding"][1]["code"] == "GLU"  # type: ignore[index]  # local coding kept
    dt.cwe(rep("ZZZ^Unknown^L"), c, field="OBX-3")
    assert c.events["unmapped_code"] == 1
    c = ctx(code_maps={"OBX-3": cmap}, unmapped_codes="reject")
    with pytest.raises(ConversionError) as ei:
        dt.cwe(rep("ZZZ^Unknown^L"), c, Location("OBX", 1, 3), field="OBX-3")
    assert ei.value.hl7_error == "103"
    assert "ZZZ" not in str(ei.value) and "add a row for it to the map file" in str(ei.value)  # what to do


def test_yaml_map_and_bad_map(tmp_path: Path) -> None:
    m = load_code_map("demo-locations.yaml", tmp_path)
    assert m["CLINIC1"][1] == "clinic-1"
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError):
        load_code_map("bad.csv", tmp_path)
    with pytest.raises(ConfigError):
        load_code_map("missing.csv", tmp_path)


def test_from_options(tmp_path: Path) -> None:
    s = ConvertSettings.from_options(
        {"site_tz": "Europe/Berlin", "code_maps": {"OBX-3": "demo-lab-codes.csv"}, "note_max_length": 100},
        tmp_path,
        "channels/x.yaml",
    )
    assert s.code_maps["OBX-3"]["GLU"][1] == "2345-7"
    for bad in (
        {"unmapped_codes": "drop"},
        {"validate": "yes"},
        {"note_max_length": 5},
        {"identifier_systems": {"A": "not a uri"}},
        {"nope": 1},
    ):
        with pytest.raises(ConfigError) as ei:
            ConvertSettings.from_options(bad, tmp_path, "channels/x.yaml")
        assert ei.value.file == "channels/x.yaml" and ei.value.key and ei.value.key.startswith("options.")


def test_numbers() -> None:
    assert dt.nm("12") == 12 and dt.nm("-1.50") == -1.5 and dt.nm("") is None
    with pytest.raises(ConversionError):
        dt.nm("1,5", Location("OBX", 1, 5))
    assert dt.sn(rep("<^5")) == ("valueQuantity", {"value": 5, "comparator": "<"})
    assert dt.sn(rep("^1^-^5")) == ("valueRange", {"low": {"value": 1}, "high": {"value": 5}})
    assert dt.sn(rep("^1^:^128")) == (
        "valueRatio",
        {"numerator": {"value": 1}, "denominator": {"value": 128}},
    )
    assert dt.quantity("7.2", rep("mg/dL^^UCUM")) == {
        "value": 7.2,
        "unit": "mg/dL",
        "system": "http://unitsofmeasure.org",
        "code": "mg/dL",
    }


def test_text_cleanup() -> None:
    c = ctx(note_max_length=30)
    assert dt.clean_text(c, "<b>Bold</b> &amp; more<br>line two") == "Bold & more\nline two"
    out = dt.clean_text(c, "x" * 100)
    assert len(out) == 30 and out.endswith(dt.TRUNCATION_MARKER)
    assert c.events["text_truncated"] == 1


def test_xcn_and_pl() -> None:
    c = ctx()
    ref = dt.xcn(rep("1234567890^DOC^ANA^^^DR^^^NPI^L^^^NPI"), c)
    assert ref is not None and ref["reference"].startswith("urn:uuid:")
    # a conditional create: created when absent, never rewritten by a message that names the person
    assert c.entries[0]["request"] == {
        "method": "POST",
        "url": "Practitioner",
        "ifNoneExist": "identifier=http://hl7.org/fhir/sid/us-npi|1234567890",
    }
    assert dt.xcn(rep("^NONAME^ONLY"), c) == {"display": "ONLY NONAME"}
    ref2 = dt.pl(rep("4W^401^A^FAC"), c)
    assert ref2 is not None and ref2["display"] == "4W 401 A"
    assert [e["resource"]["name"] for e in c.entries if e["resource"]["resourceType"] == "Location"] == [
        "FAC",
        "4W",
        "401",
        "A",
    ]


# --- conformance fixes (IG datatype tables) -------------------------------------------------
def test_xad_street_keeps_all_sad_subcomponents_and_addressee() -> None:
    a = dt.xad(rep("1000&Hospital Lane^Ste. 123^Ann Arbor^MI^99999^USA" + "^" * 13 + "Near Highway"))
    assert a is not None and a["line"] == ["1000 Hospital Lane", "Ste. 123", "Near Highway"]


def test_xtn_12_unformatted_number_wins() -> None:
    t = dt.xtn(rep("78788788^PRN^PH^^^^^^^^^2222"))
    assert t is not None and t["value"] == "2222"
    t = dt.xtn(rep("(555)555-0100^WPN^PH^^1^555^5550100"))
    assert t is not None and t["value"] == "+1 (555) 5550100"


@pytest.mark.parametrize(("code", "tag"), [("ara", "ar"), ("eng", "en"), ("en-US", "en-US"), ("ger", "de")])
def test_language_is_bcp47(code: str, tag: str) -> None:
    cc = dt.language(rep(f"{code}^Some language^HL70296"), ctx())
    assert cc is not None and cc["coding"][0] == {"system": dt.BCP47, "code": tag, "display": "Some language"}


def test_language_not_a_tag_keeps_its_coding() -> None:
    c = ctx()
    cc = dt.language(rep("ENGLISH 1^English^99LANG"), c)
    assert cc is not None and cc["coding"][0]["system"] == "urn:sluice:codesystem:99LANG"
    assert c.events["language_not_bcp47"] == 1


def test_hd_universal_id_oid_whatever_the_type() -> None:
    ident = dt.ei(rep("DI20^Diagnosis^1.3.6.1.4.1.44750.1.2.2^CLIP"), ctx(derive_unknown_systems=True))
    assert ident == {"system": "urn:oid:1.3.6.1.4.1.44750.1.2.2", "value": "DI20"}


def test_snomed_international_name_is_snomed_ct() -> None:
    """Table 0396 SNM3 (SNOMED International): senders send SNOMED CT concept ids under it (ADT^A60's IAM-3)."""
    assert dt.code_system("SNM3") == dt.code_system("SCT") == "http://snomed.info/sct"


def test_icdo_code_system() -> None:
    assert dt.code_system("ICDO") == "http://terminology.hl7.org/CodeSystem/icd-o"


@pytest.mark.parametrize(
    ("name", "system"),
    [
        ("MVX", "http://hl7.org/fhir/sid/mvx"),
        ("NCIT", "http://ncicb.nci.nih.gov/xml/owl/EVS/Thesaurus.owl"),
        ("MDC", "urn:iso:std:iso:11073:10101"),
        ("CDCPHINVS", "urn:oid:2.16.840.1.114222.4.5.274"),
        ("PHINQUESTION", "urn:oid:2.16.840.1.114222.4.5.232"),
        ("I9CDX", "http://hl7.org/fhir/sid/icd-9-cm"),
        ("ICD-10", "http://hl7.org/fhir/sid/icd-10"),
        ("I9CP", "http://www.cms.gov/Medicare/Coding/ICD9"),
        ("NULLFL", "http://terminology.hl7.org/CodeSystem/v3-NullFlavor"),
        ("ncit", "http://ncicb.nci.nih.gov/xml/owl/EVS/Thesaurus.owl"),  # any case, as every shipped name
        ("NIP001", "urn:sluice:codesystem:NIP001"),  # no published FHIR system: a local one
    ],
)
def test_table_0396_names_with_a_published_system(name: str, system: str) -> None:
    assert dt.code_system(name) == system


def test_cx_authority_with_universal_id_only() -> None:
    ident = dt.cx(rep("HMO-12345^^^&2.16.840.1.113883.1.3&ISO^NI"), ctx())
    assert ident is not None and ident["system"] == "urn:oid:2.16.840.1.113883.1.3"


def test_xpn15_called_by_is_a_second_nickname_name() -> None:
    """IG XPN[HumanName]: XPN-15 → name[2].given with use nickname (where several names are allowed)."""
    from engine.hl7 import parse as _parse
    from transforms.datatypes import xpns

    m = _parse(
        "MSH|^~\\&|A|B|C|D|20250101||ADT^A01|1|P|2.5.1\r"
        "PID|1||X^^^H||EVERYWOMAN^EVE^E^^^^L^^^^^^^^Evie~ALIAS^EVE\r"
    )
    names = xpns(m.first("PID"), 5)  # type: ignore[arg-type]
    assert names == [
        {"use": "official", "family": "EVERYWOMAN", "given": ["EVE", "E"]},
        {"use": "nickname", "given": ["Evie"]},
        {"family": "ALIAS", "given": ["EVE"]},
    ]


def test_identifier_type_is_a_valid_fhir_code() -> None:
    """An escaped line break inside CX-5 / XCN-13 must not produce an invalid FHIR code."""
    from transforms.datatypes import identifier_type

    assert identifier_type("N\n\nPI") == {
        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "N PI"}]
    }
    assert identifier_type(" MR ") == {
        "coding": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                "code": "MR",
                "display": "Medical record number",
            }
        ]
    }
