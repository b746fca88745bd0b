"""Converter edge cases of issue #12, each shown on the message that once broke it: a number past 64 bits
is never an internal error (a FHIR decimal with the digits as sent, or a located error past 4,300 digits),
and control characters FHIR forbids are taken out of FHIR strings with a counted warning."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine import exactjson, hl7
from engine.errors import ConversionError, InternalConversionError, Location
from tests.transforms.conftest import validate_resources
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


FHIR_DECIMAL = re.compile(rb"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")  # FHIR R4 decimal


def number_tokens(body: bytes, key: bytes = b'"value":') -> list[bytes]:
    """The raw JSON number tokens after ``"value":`` in an encoded bundle."""
    return re.findall(re.escape(key) + rb"(-?[0-9][0-9.eE+-]*)", body)


def encoded(raw: bytes) -> tuple[Any, bytes]:
    result = convert_report(hl7.parse_bytes(raw), SETTINGS)  # no internal error (it was a TypeError)
    validate_resources(result.bundle)  # fhir.resources takes the Decimal values as FHIR decimals
    body = exactjson.dumps(result.bundle)  # what the hl7-to-fhir step writes
    assert number_tokens(fhir_step_payload(raw)) == number_tokens(
        body
    )  # the hl7-to-fhir step writes the same
    return result, body


def fhir_step_payload(raw: bytes) -> bytes:
    from engine.pipeline import StageContext, Work
    from transforms.fhir_step import make

    step = make({"derive_unknown_systems": True}, StageContext("lab", Path("."), "channels/lab.yaml"))
    return step(Work(hl7.parse_bytes(raw), raw, raw, "x-application/hl7-v2+er7")).payload


@pytest.mark.parametrize(
    "big",
    [
        "99999999999999999999",
        "18446744073709551616",
        "-9223372036854775809",
        "123456789012345678901234567890.123456789",
        "0.100000000000000000000000000001",
        "1.2345678901234560",  # 17 significant digits: a float would round, the trailing zero is precision
        "9" * 300 + ".5",  # a float would round
        "0." + "0" * 400 + "1",  # a float would be 0
    ],
)
def test_obx_nm_past_what_a_float_or_64_bits_carry_is_a_fhir_decimal_with_the_digits_as_sent(
    big: str,
) -> None:
    result, body = encoded(oru(big))
    (obs,) = resources(result.bundle, "Observation")
    assert "valueString" not in obs
    assert obs["valueQuantity"]["value"] == Decimal(big) and obs["valueQuantity"]["code"] == "mg/dL"
    (token,) = number_tokens(body)
    assert token == big.encode() and FHIR_DECIMAL.fullmatch(token)  # nothing rounded, nothing lost
    assert orjson.loads(body)  # any JSON reader takes it
    assert "obx_value_not_numeric" not in result.events


@pytest.mark.parametrize(
    ("sent", "written"),
    [
        ("+00099999999999999999999", b"99999999999999999999"),
        ("-.1000000000000000000001", b"-0.1000000000000000000001"),
    ],
)
def test_a_long_number_is_written_in_fhir_decimal_form(sent: str, written: bytes) -> None:
    _, body = encoded(oru(sent))
    assert number_tokens(body) == [written]


def test_obx_nm_within_range_is_still_a_plain_json_number() -> None:
    result = convert_report(hl7.parse_bytes(oru("9223372036854775807")), SETTINGS)
    (obs,) = resources(result.bundle, "Observation")
    assert obs["valueQuantity"]["value"] == 9223372036854775807
    assert type(obs["valueQuantity"]["value"]) is int
    result = convert_report(hl7.parse_bytes(oru("12.5")), SETTINGS)
    assert type(resources(result.bundle, "Observation")[0]["valueQuantity"]["value"]) is float


def test_sn_nr_and_reference_range_keep_long_digits() -> None:
    big, big2 = "18446744073709551616", "1.00000000000000000001"
    raw = oru(f">^{big}").replace(b"|NM|", b"|SN|").replace(b"|mg/dL||", f"|mg/dL|{big2}-{big}|".encode())
    result, body = encoded(raw)
    (obs,) = resources(result.bundle, "Observation")
    assert obs["valueQuantity"]["comparator"] == ">" and obs["valueQuantity"]["value"] == Decimal(big)
    (rr,) = obs["referenceRange"]
    assert rr["low"]["value"] == Decimal(big2) and rr["high"]["value"] == Decimal(big)
    assert number_tokens(body) == [big.encode(), big2.encode(), big.encode()]

    raw = oru(f"1^{big}").replace(b"|NM|", b"|NR|")
    result, body = encoded(raw)
    (obs,) = resources(result.bundle, "Observation")
    assert obs["valueRange"]["high"]["value"] == Decimal(big) and number_tokens(body) == [b"1", big.encode()]

    raw = oru(f"^{big}^:^{big2}").replace(b"|NM|", b"|SN|")
    result, body = encoded(raw)
    (obs,) = resources(result.bundle, "Observation")
    assert obs["valueRatio"]["denominator"]["value"] == Decimal(big2)
    assert number_tokens(body) == [big.encode(), big2.encode()]


TOO_LONG = "9" * (dt.MAX_NUMBER_DIGITS + 1)


@pytest.mark.parametrize(
    ("obx", "vtype"),
    [
        (TOO_LONG, "NM"),
        (">^" + TOO_LONG, "SN"),
        ("1^" + TOO_LONG, "NR"),
        ("<0." + TOO_LONG, "NM"),
        ("1" + "0" * 308 + ".0", "NM"),  # 1e308: JSON readers take it as infinite
    ],
)
def test_a_number_of_absurd_length_is_a_located_error(obx: str, vtype: str) -> None:
    raw = oru(obx).replace(b"|NM|", f"|{vtype}|".encode())
    with pytest.raises(ConversionError) as exc:
        convert_report(hl7.parse_bytes(raw), SETTINGS)
    assert not isinstance(exc.value, InternalConversionError)
    assert exc.value.hl7_error == "102" and exc.value.location == Location("OBX", 1, 5)
    assert "out of range (more than 4,300 digits, or 1e308 or more)" in str(exc.value)
    assert "999" not in str(exc.value) and "000" not in str(exc.value)


def test_a_reference_range_bound_of_absurd_length_is_dropped_with_a_located_warning() -> None:
    raw = oru("5").replace(b"|mg/dL||", f"|mg/dL|1-{TOO_LONG}|".encode())
    result, _ = encoded(raw)
    (obs,) = resources(result.bundle, "Observation")
    (rr,) = obs["referenceRange"]
    assert rr["low"]["value"] == 1 and "high" not in rr and rr["text"] == f"1-{TOO_LONG}"
    assert result.events.get("reference_range_bound_dropped") == 1
    (warning,) = result.warnings
    assert warning.startswith("OBX-7") and "referenceRange.high dropped" in warning


def test_nm_datatype() -> None:
    loc = Location("OBX", 1, 5)
    assert dt.nm("12.5", loc) == 12.5 and dt.nm("-7", loc) == -7
    assert dt.nm("99999999999999999999", loc) == Decimal("99999999999999999999")
    for bad in ("12a", TOO_LONG):
        with pytest.raises(ConversionError) as exc:
            dt.nm(bad, loc)
        assert not isinstance(exc.value, InternalConversionError)
        assert exc.value.hl7_error == "102" and exc.value.location == loc


def test_control_characters_leave_fhir_strings_with_a_counted_warning() -> None:
    raw = oru("182", name="Doe\x00Nul^Ja\x1bne").replace(b"Cholesterol^LN||", b"Chole\\X00\\sterol^LN||", 1)
    result = convert_report(hl7.parse_bytes(raw), SETTINGS)
    (patient,) = resources(result.bundle, "Patient")
    assert patient["name"][0]["family"] == "DoeNul" and patient["name"][0]["given"] == ["Jane"]
    body = orjson.dumps(result.bundle)
    assert b"\\u0000" not in body and b"\\u001b" not in body
    assert result.events.get("control_characters_removed") == 1  # counted once per message
