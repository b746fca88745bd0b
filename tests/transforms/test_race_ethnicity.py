"""PID-10 race and PID-22 ethnic group → the US Core race / ethnicity extensions on Patient (transforms/adt.py
``_race_ethnicity``; docs/mapping.md "ADT specifics").  Synthetic data only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.errors import ConfigError
from engine.hl7 import Message
from transforms.convert import convert, convert_report
from transforms.settings import ConvertSettings

from .conftest import golden_settings, msg, resources, validate_resources

RACE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
ETHNICITY = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity"
CDC = "urn:oid:2.16.840.1.113883.6.238"
NULL_FLAVOR = "http://terminology.hl7.org/CodeSystem/v3-NullFlavor"

MSH = "MSH|^~\\&|SYNTH-ADT|GOODHOSP|SLUICE|SLUICE|20250316090000||{t}|CTRL-{n}|P|2.5.1"
PV1 = "PV1|1|I|||||||||||||||||V{n}^^^VISITS^VN"


def pid(race: str = "", ethnicity: str = "", n: int = 1) -> str:
    f = [""] * 23
    f[0], f[1], f[3], f[5], f[7], f[8] = "PID", "1", f"MRN{n}^^^HOSP^MR", "TESTPATIENT^ALEX", "19800229", "F"
    f[10], f[22] = race, ethnicity
    return "|".join(f)


def admit(race: str = "", ethnicity: str = "", n: int = 1) -> Message:
    return msg(
        MSH.format(t="ADT^A01^ADT_A01", n=n),
        "EVN|A01|20250316090000",
        pid(race, ethnicity, n),
        PV1.format(n=n),
    )


def patient_of(bundle: dict[str, Any]) -> dict[str, Any]:
    (patient,) = resources(bundle, "Patient")
    return patient


def ext(bundle: dict[str, Any], url: str) -> dict[str, Any] | None:
    found = [e for e in patient_of(bundle).get("extension", ()) if e["url"] == url]
    assert len(found) <= 1
    return found[0] if found else None


def subs(extension: dict[str, Any] | None, name: str) -> list[Any]:
    """The values of the sub-extensions ``name`` (valueCoding, or valueString for ``text``)."""
    assert extension is not None
    key = "valueString" if name == "text" else "valueCoding"
    return [s[key] for s in extension["extension"] if s["url"] == name]


def cdc(code: str, display: str) -> dict[str, str]:
    return {"system": CDC, "code": code, "display": display}


def converted(m: Message, **settings: Any) -> tuple[dict[str, Any], dict[str, int]]:
    r = convert_report(m, golden_settings(**settings))
    assert not r.warnings  # an unmapped race is counted, never a warning
    validate_resources(r.bundle)  # every extension made here is valid FHIR R4 (fhir.resources)
    return r.bundle, dict(r.events)


def test_omb_races_and_ethnicity_as_ms_converter_corpus_sends_them() -> None:
    """The FHIR-Converter samples' PID-10/22: two OMB races of table 0005 (the CDC codes) and a 0189 letter."""
    b, events = converted(
        admit("2106-3^White^HL70005~2028-9^Asian^HL70005", "N^NOT HISPANIC OR LATINO^HL70189")
    )
    race, eth = ext(b, RACE), ext(b, ETHNICITY)
    assert race == {
        "url": RACE,
        "extension": [
            {"url": "ombCategory", "valueCoding": cdc("2106-3", "White")},
            {"url": "ombCategory", "valueCoding": cdc("2028-9", "Asian")},
            {"url": "text", "valueString": "White+Asian"},  # one text, joined as MS joins it
        ],
    }
    assert subs(eth, "ombCategory") == [cdc("2186-5", "Not Hispanic or Latino")]
    assert subs(eth, "text") == ["NOT HISPANIC OR LATINO"]  # the sender's text
    assert not any("race" in k or "ethnicity" in k for k in events)


@pytest.mark.parametrize(
    ("race", "omb", "detailed", "text"),
    [
        pytest.param("2106-3", ["2106-3"], [], "White", id="code-alone-text-is-its-display"),
        pytest.param("2106-3^WHITE^HL7000", ["2106-3"], [], "WHITE", id="truncated-table-name"),
        pytest.param("2054-5^Black^CDCREC", ["2054-5"], [], "Black", id="cdcrec"),
        pytest.param(
            "2076-8^^urn:oid:2.16.840.1.113883.6.238",
            ["2076-8"],
            [],
            "Native Hawaiian or Other Pacific Islander",
            id="oid-system",
        ),
        pytest.param("2108-9^European^CDCREC", [], ["2108-9"], "European", id="detailed"),
        pytest.param(
            "2500-7^Other Pacific Islander^CDCREC",
            [],
            ["2500-7"],
            "Other Pacific Islander",
            id="detailed-outside-the-main-range",
        ),
        pytest.param("2131-1^Other Race^HL70005", [], ["2131-1"], "Other Race", id="other-race-is-detailed"),
        pytest.param(
            "2108-9^European^CDCREC~2106-3^White^CDCREC",
            ["2106-3"],
            ["2108-9"],
            "European+White",
            id="omb-and-detailed",
        ),
        pytest.param(
            "W^White^L^2106-3^White^CDCREC", ["2106-3"], [], "White", id="local-code-with-cdc-alternate"
        ),
        pytest.param(
            "2106-3^White^HL70005^^^^^^White (self-reported)",
            ["2106-3"],
            [],
            "White (self-reported)",
            id="original-text-cwe-9",
        ),
        pytest.param("2106-3~2106-3^White", ["2106-3"], [], "White", id="same-race-twice"),
    ],
)
def test_race_codes(race: str, omb: list[str], detailed: list[str], text: str) -> None:
    b, events = converted(admit(race))
    r = ext(b, RACE)
    assert [c["code"] for c in subs(r, "ombCategory")] == omb
    assert [c["code"] for c in subs(r, "detailed")] == detailed
    assert all(c["system"] == CDC for c in subs(r, "ombCategory") + subs(r, "detailed"))
    assert subs(r, "text") == [text]
    assert "race_code_unmapped" not in events
    assert ext(b, ETHNICITY) is None


@pytest.mark.parametrize(
    ("letter", "omb", "detailed", "text"),
    [
        pytest.param("W", [cdc("2106-3", "White")], [], "White", id="W"),
        pytest.param(
            "B", [cdc("2054-5", "Black or African American")], [], "Black or African American", id="B"
        ),
        pytest.param("A^Asian^HL70005", [cdc("2028-9", "Asian")], [], "Asian", id="A"),
        pytest.param(
            "I",
            [cdc("1002-5", "American Indian or Alaska Native")],
            [],
            "American Indian or Alaska Native",
            id="I",
        ),
        pytest.param("O^Other", [], [cdc("2131-1", "Other Race")], "Other", id="O"),
        pytest.param(
            "U", [{"system": NULL_FLAVOR, "code": "UNK", "display": "unknown"}], [], "unknown", id="U"
        ),
        pytest.param(
            "ASKU^Declined",
            [{"system": NULL_FLAVOR, "code": "ASKU", "display": "asked but unknown"}],
            [],
            "Declined",
            id="ASKU",
        ),
        pytest.param(
            "W~U", [cdc("2106-3", "White")], [], "White+unknown", id="null-flavor-only-without-a-race"
        ),
    ],
)
def test_older_table_0005_letters(letter: str, omb: list[Any], detailed: list[Any], text: str) -> None:
    b, events = converted(admit(letter))
    r = ext(b, RACE)
    assert subs(r, "ombCategory") == omb
    assert subs(r, "detailed") == detailed
    assert subs(r, "text") == [text]
    assert "race_code_unmapped" not in events


@pytest.mark.parametrize(
    ("ethnicity", "omb", "detailed", "text"),
    [
        pytest.param(
            "H^Hispanic or Latino^HL70189",
            [cdc("2135-2", "Hispanic or Latino")],
            [],
            "Hispanic or Latino",
            id="H",
        ),
        pytest.param("N", [cdc("2186-5", "Not Hispanic or Latino")], [], "Not Hispanic or Latino", id="N"),
        pytest.param(
            "2186-5^non Hispanic or Latino^CDCREC",
            [cdc("2186-5", "Not Hispanic or Latino")],
            [],
            "non Hispanic or Latino",
            id="cdcrec",
        ),
        pytest.param("2148-5^Mexican^CDCREC", [], [cdc("2148-5", "Mexican")], "Mexican", id="detailed"),
        # US Core 3.1.1 has no null flavor for ethnicity: the text alone, not counted (the code is understood)
        pytest.param("U^Unknown^HL70189", [], [], "Unknown", id="U"),
        pytest.param("UNK", [], [], "unknown", id="UNK"),
        pytest.param(
            "H~N",
            [cdc("2135-2", "Hispanic or Latino")],
            [],
            "Hispanic or Latino+Not Hispanic or Latino",
            id="one-omb-category",
        ),
        pytest.param(
            "N^Not Hispanic or Latino^HL70189^NH^Non hispanic^L~U^Unknown^HL70189",
            [cdc("2186-5", "Not Hispanic or Latino")],
            [],
            "Not Hispanic or Latino+Unknown",
            id="repetitions",
        ),
    ],
)
def test_ethnicity_codes(ethnicity: str, omb: list[Any], detailed: list[Any], text: str) -> None:
    b, events = converted(admit("", ethnicity))
    e = ext(b, ETHNICITY)
    assert subs(e, "ombCategory") == omb
    assert subs(e, "detailed") == detailed
    assert subs(e, "text") == [text]
    assert "ethnicity_code_unmapped" not in events
    assert ext(b, RACE) is None


@pytest.mark.parametrize(
    ("race", "ethnicity", "race_text", "eth_text", "race_events", "eth_events"),
    [
        pytest.param(
            "C^Caucasian^L", "A^White - British", "Caucasian", "White - British", 1, 1, id="local-codes"
        ),
        pytest.param("1", "", "1", None, 1, 0, id="a-bare-local-code-is-its-own-text"),
        pytest.param(
            "2186-5^Not Hispanic^CDCREC",
            "2106-3^White^CDCREC",
            "Not Hispanic",
            "White",
            1,
            1,
            id="a-code-of-the-other-field",
        ),
        pytest.param("2106-4^White^HL70005", "", "White", None, 1, 0, id="bad-check-digit"),
        pytest.param("W^White^99LOCAL", "", "White", None, 1, 0, id="a-letter-of-a-local-system"),
        pytest.param("2106-3^White~XX^Martian", "", "White+Martian", None, 1, 0, id="one-repetition-unknown"),
    ],
)
def test_unknown_codes_keep_their_text_and_are_counted(
    race: str, ethnicity: str, race_text: str, eth_text: str | None, race_events: int, eth_events: int
) -> None:
    b, events = converted(admit(race, ethnicity))
    r = ext(b, RACE)
    assert subs(r, "text") == [race_text]
    assert events.get("race_code_unmapped", 0) == race_events
    assert events.get("ethnicity_code_unmapped", 0) == eth_events
    if race_text != "White+Martian":
        assert subs(r, "ombCategory") == subs(r, "detailed") == []  # text alone (US Core requires it)
    e = ext(b, ETHNICITY)
    if eth_text is None:
        assert e is None
    else:
        assert e == {"url": ETHNICITY, "extension": [{"url": "text", "valueString": eth_text}]}


def test_unknown_codes_are_never_rejected() -> None:
    """A race the converter does not know is no code-map miss: ``unmapped_codes: reject`` and
    ``code_table_errors: reject`` leave it alone."""
    b, events = converted(admit("Z^Zzz", "Q"), unmapped_codes="reject", code_table_errors="reject")
    assert subs(ext(b, RACE), "text") == ["Zzz"]
    assert events["race_code_unmapped"] == events["ethnicity_code_unmapped"] == 1


@pytest.mark.parametrize(
    ("race", "ethnicity"),
    [
        pytest.param('""', '""', id="explicit-null"),
        pytest.param("^^HL70005", "^^HL70189", id="no-code-no-text"),
    ],
)
def test_no_value_no_extension(race: str, ethnicity: str) -> None:
    b, _ = converted(admit(race, ethnicity))
    assert ext(b, RACE) is None and ext(b, ETHNICITY) is None


def test_an_explicit_null_repetition_is_left_out() -> None:
    b, _ = converted(admit('2106-3^White^HL70005~""', 'N~""'))
    assert subs(ext(b, RACE), "text") == ["White"]
    assert subs(ext(b, ETHNICITY), "text") == ["Not Hispanic or Latino"]


def test_other_extensions_stay_in_place() -> None:
    """PID-6, -10, -17, -22, -23: the extensions in field order, the existing ones unchanged."""
    f = pid("W", "N").split("|")
    f[6], f[17] = "MAIDEN", "CHR"
    f.append("SPRINGFIELD")  # PID-23 birth place
    b, _ = converted(
        msg(MSH.format(t="ADT^A01^ADT_A01", n=1), "EVN|A01|20250316090000", "|".join(f), PV1.format(n=1))
    )
    assert [e["url"].rsplit("/", 1)[-1] for e in patient_of(b)["extension"]] == [
        "patient-mothersMaidenName",
        "us-core-race",
        "patient-religion",
        "us-core-ethnicity",
        "patient-birthPlace",
    ]


def test_the_option_turns_it_off_for_another_realm() -> None:
    b, events = converted(admit("C^Caucasian^L", "A^White - British"), us_core_race_ethnicity=False)
    assert "extension" not in patient_of(b)
    assert "race_code_unmapped" not in events and "ethnicity_code_unmapped" not in events


def test_every_message_type_with_a_pid_gets_it() -> None:
    """ORU (and SIU, VXU, ...) write the Patient through the same mapper, as a conditional create."""
    oru = msg(
        MSH.format(t="ORU^R01^ORU_R01", n=2),
        pid("2106-3^White^HL70005", "H", n=2),
        "OBR|1|PL1|FL1|2345-7^Glucose^LN|||20250316080000",
        "OBX|1|NM|2345-7^Glucose^LN||95|mg/dL|||||F",
    )
    b, _ = converted(oru)
    assert subs(ext(b, RACE), "ombCategory") == [cdc("2106-3", "White")]
    assert subs(ext(b, ETHNICITY), "ombCategory") == [cdc("2135-2", "Hispanic or Latino")]


def test_kept_per_channel_and_shared() -> None:
    """The extension of a field's text is made once per channel (datatypes.kept_piece): a later message gets
    what a fresh conversion gives, with the unmapped events counted again, and shares the kept value."""
    race, eth = "2106-3^White^HL70005~XX^Martian", "N^Not Hispanic^HL70189"
    s = golden_settings()
    first = convert_report(admit(race, eth, n=1), s)
    assert ("PID-10", "|^~\\&", race, "") in s.entity_memo and ("PID-22", "|^~\\&", eth, "") in s.entity_memo
    second = convert_report(admit(race, eth, n=2), s)
    third = convert_report(admit(race, eth, n=3), s)
    fresh = convert_report(admit(race, eth, n=2), golden_settings())
    assert second.bundle == fresh.bundle
    assert second.events == fresh.events == first.events
    assert second.events["race_code_unmapped"] == 1
    assert ext(second.bundle, RACE) is ext(third.bundle, RACE)  # shared, read-only
    assert ext(first.bundle, RACE) == ext(second.bundle, RACE)


def test_empty_fields_keep_nothing() -> None:
    s = golden_settings()
    convert(admit(), s)
    assert not any(isinstance(k, tuple) and k and k[0] in ("PID-10", "PID-22") for k in s.entity_memo)


@pytest.mark.parametrize(
    ("options", "key", "text"),
    [
        pytest.param(
            {"us_core_race_ethnicity": "no"},
            "options.us_core_race_ethnicity",
            "is not true/false",
            id="not-a-boolean",
        ),
        pytest.param(
            {"us-core-race-ethnicity": False},
            "options.us-core-race-ethnicity",
            "did you mean 'us_core_race_ethnicity'?",
            id="hyphenated-name",
        ),
    ],
)
def test_option_errors_are_located(options: dict[str, Any], key: str, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        ConvertSettings.from_options(options, Path("."), "channels/c.yaml")
    assert info.value.file == "channels/c.yaml" and info.value.key == key
    assert text in str(info.value)
    assert ConvertSettings.from_options({}, Path("."), "c.yaml").us_core_race_ethnicity is True
    assert (
        ConvertSettings.from_options(
            {"us_core_race_ethnicity": False}, Path("."), "c.yaml"
        ).us_core_race_ethnicity
        is False
    )
