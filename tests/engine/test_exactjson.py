"""engine.exactjson: long FHIR decimals keep their digits through encoding and a destination's read-and-write."""

from __future__ import annotations

from decimal import Decimal

import orjson
import pytest

from engine import exactjson

LONG = [
    b"99999999999999999999",
    b"-9223372036854775809",
    b"123456789012345678901234567890.1230",
    b"0.100000000000000000000000000001",
    b"1.2345678901234560e-7",
    b"1E+400",
]


@pytest.mark.parametrize("token", LONG)
def test_a_long_number_is_read_and_written_back_unchanged(token: bytes) -> None:
    doc = b'{"resourceType":"Observation","valueQuantity":{"value":' + token + b',"unit":"mg"},"n":[1,2.5]}'
    got = exactjson.loads(doc)
    assert got["n"] == [1, 2.5] and got["valueQuantity"]["unit"] == "mg"
    assert orjson.dumps(got) == doc and exactjson.dumps(got) == doc  # either writer: the same bytes


def test_short_numbers_take_the_orjson_path_and_stay_numbers() -> None:
    doc = b'{"a":123456789012345,"b":1.5,"c":"urn:oid:2.16.840.1.113883.19.5","d":[-7,0.1]}'
    assert exactjson.loads(doc) == orjson.loads(doc)
    # a long digit run inside a string only takes the exact path: same values
    doc = b'{"t":"x,12345678901234567890]","n":[1.5,3]}'
    assert exactjson.loads(doc) == {"t": "x,12345678901234567890]", "n": [1.5, 3]}


def test_decimals_are_written_with_their_digits_in_fixed_point() -> None:
    doc = {"a": Decimal("99999999999999999999"), "b": Decimal("-0.00000001000"), "c": Decimal("1.50"), "d": 2}
    assert exactjson.dumps(doc) == b'{"a":99999999999999999999,"b":-0.00000001000,"c":1.50,"d":2}'
    with pytest.raises(TypeError):
        exactjson.dumps({"x": Decimal("NaN")})
    with pytest.raises(TypeError):
        exactjson.dumps({"x": object()})


@pytest.mark.parametrize(
    "bad", [b'{"a":12345678901234567890', b'{"a":12345678901234567890,"b":NaN}', b"\xff,1234567890123456789"]
)
def test_invalid_json_is_an_orjson_decode_error_on_either_path(bad: bytes) -> None:
    with pytest.raises(orjson.JSONDecodeError):
        exactjson.loads(bad)
