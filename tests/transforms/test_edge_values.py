"""Converter edge cases of issue #12, each shown on the message that once broke it: a number past 64 bits
is never an internal error (an exact FHIR value, the text kept with a counted warning, or a located error),
and control characters FHIR forbids are taken out of FHIR strings with a counted warning."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from engine import hl7
from engine.errors import ConversionError, InternalConversionError, Location
from transforms import datatypes as dt
from transforms.convert import convert_report
from transforms.settings import ConvertSettings

SETTINGS = ConvertSettings(derive_unknown_systems=True)


def oru(obx5: str, name: str = "Doe^Jane") -> bytes:
    return (
        "MSH|^~\\&|LAB|NORTH|EHR|HOSP|20250101120000||ORU^R01^ORU_R01|C1|P|2.5.1\r"
        f"PID|1||MRN1^^^NORTH^MR||{name}||19800101|F\r"
        "OBR|1|PL1|FL1^LAB|2093-3^Cholesterol^LN|||20250101110000\r"
        f"OBX|1|NM|2093-3^Cholesterol^LN||{obx5}|mg/dL|||||F\r"
    ).encode("latin-1")


def resources(bundle: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


@pytest.mark.parametrize("big", ["99999999999999999999", "18446744073709551616", "-9223372036854775809"])
def test_obx_nm_past_64_bits_keeps_its_exact_digits_with_a_counted_warning(big: str) -> None:
    result = convert_report(hl7.parse_bytes(oru(big)), SETTINGS)  # no internal error (it was a TypeError)
    body = orjson.dumps(result.bundle)  # and the bundle encodes
    (obs,) = resources(result.bundle, "Observation")
    assert "valueQuantity" not in obs and obs["valueString"] == big  # nothing rounded, nothing lost
    assert result.events.get("obx_value_not_numeric") == 1
    assert big.encode() in body


def test_obx_nm_within_range_is_still_a_number() -> None:
    result = convert_report(hl7.parse_bytes(oru("9223372036854775807")), SETTINGS)
    (obs,) = resources(result.bundle, "Observation")
    assert obs["valueQuantity"]["value"] == 9223372036854775807


def test_nm_datatype_past_what_json_carries_is_a_located_error() -> None:
    loc = Location("OBX", 1, 5)
    with pytest.raises(ConversionError) as exc:
        dt.nm("99999999999999999999", loc)
    assert not isinstance(exc.value, InternalConversionError)
    assert exc.value.hl7_error == "102" and exc.value.location == loc
    assert dt.nm("12.5", loc) == 12.5 and dt.nm("-7", loc) == -7


def test_control_characters_leave_fhir_strings_with_a_counted_warning() -> None:
    raw = oru("182", name="Doe\x00Nul^Ja\x1bne").replace(b"Cholesterol^LN||", b"Chole\\X00\\sterol^LN||", 1)
    result = convert_report(hl7.parse_bytes(raw), SETTINGS)
    (patient,) = resources(result.bundle, "Patient")
    assert patient["name"][0]["family"] == "DoeNul" and patient["name"][0]["given"] == ["Jane"]
    body = orjson.dumps(result.bundle)
    assert b"\\u0000" not in body and b"\\u001b" not in body
    assert result.events.get("control_characters_removed") == 1  # counted once per message
