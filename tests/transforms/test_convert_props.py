"""Property tests: random and mutated messages never raise anything but the documented errors.

They call ``transforms.convert._convert`` (the conversion *without* the safety net that turns an
unexpected exception into ConversionError 207), so a mapping bug shows up as a failure here.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import ConversionError, MessageRejected, SluiceError
from engine.hl7 import parse
from transforms.convert import _convert

from .conftest import MESSAGES, golden_settings, validate_resources

SEEDS = [(MESSAGES / p.name).read_text(encoding="utf-8") for p in sorted(MESSAGES.glob("adt_*.hl7"))]
SETTINGS = [
    golden_settings(),
    golden_settings(derive_unknown_systems=True, code_table_errors="reject"),
    golden_settings(default_identifier_system="urn:oid:1.2.3", date_format="%m/%d/%Y"),
]
ALLOWED_CODES = {"100", "101", "102", "103", "200", "201", "204"}
ALPHABET = st.sampled_from(list("|^~\\&\r0123456789ABCMPRSZ+-.:/ ,<>é\x00\n\t"))


def _check(text: str, which: int) -> None:
    try:
        message = parse(text)
    except MessageRejected:
        return
    try:
        result = _convert(message, SETTINGS[which])
    except (ConversionError, MessageRejected) as exc:
        assert exc.hl7_error in ALLOWED_CODES, exc
        return
    except SluiceError as exc:  # pragma: no cover - any other Sluice error is a contract break
        raise AssertionError(f"unexpected {type(exc).__name__}: {exc}") from exc
    _validate(result.bundle)


def _validate(bundle: dict[str, Any]) -> None:
    validate_resources(bundle)


@st.composite
def mutated(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["insert", "delete", "replace", "field"]))
        if not text:
            break
        i = draw(st.integers(0, len(text) - 1))
        if op == "insert":
            text = text[:i] + draw(st.text(ALPHABET, min_size=1, max_size=8)) + text[i:]
        elif op == "delete":
            text = text[:i] + text[i + draw(st.integers(1, 12)) :]
        elif op == "replace":
            text = text[:i] + draw(ALPHABET) + text[i + 1 :]
        else:
            # replace the content of one field with random digits/punctuation (dates, codes, ids)
            j = text.find("|", i)
            k = text.find("|", j + 1) if j >= 0 else -1
            if j >= 0 and k > j:
                text = text[: j + 1] + draw(st.text(ALPHABET, max_size=16)) + text[k:]
    return text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(), st.integers(0, len(SETTINGS) - 1))
def test_mutated_messages(text: str, which: int) -> None:
    _check(text, which)


SEGMENTS = st.sampled_from(["PID", "PV1", "PV2", "NK1", "AL1", "DG1", "IN1", "MRG", "PD1", "EVN", "ZZZ"])


@st.composite
def random_adt(draw: st.DrawFn) -> str:
    trigger = draw(
        st.sampled_from(["A01", "A02", "A03", "A04", "A08", "A11", "A12", "A28", "A31", "A40", "A99", ""])
    )
    lines = [f"MSH|^~\\&|APP|FAC|C|D|{draw(st.text('0123456789+-', max_size=19))}||ADT^{trigger}|1|P|2.5.1"]
    for _ in range(draw(st.integers(0, 8))):
        name = draw(SEGMENTS)
        fields = draw(st.lists(st.text(ALPHABET.filter(lambda c: c not in "\r\n"), max_size=12), max_size=46))
        lines.append("|".join([name, *fields]))
    return "\r".join(lines)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_adt(), st.integers(0, len(SETTINGS) - 1))
def test_random_messages(text: str, which: int) -> None:
    _check(text, which)


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(codec="utf-8"), max_size=40))
def test_random_field_values_in_pid(value: str) -> None:
    for field in (3, 5, 7, 8, 11, 13, 16, 29):
        fields = ["PID", "1", "", "MRN1^^^HOSP^MR", "", "DOE^JO", "", "", ""]
        while len(fields) <= field:
            fields.append("")
        fields[field] = value.replace("\r", "").replace("\n", "") if field != 3 else value + "^^^HOSP^MR"
        text = (
            "MSH|^~\\&|APP|FAC|C|D|20250101||ADT^A08|1|P|2.5.1\r"
            + "|".join(fields)
            + "\rPV1|1|I|W^1^2||||||||||||||||V1^^^VISITS"
        )
        _check(text, 0)
