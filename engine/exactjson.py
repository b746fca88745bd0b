"""JSON whose numbers keep their digits: FHIR decimals past what a float or a 64-bit integer carries.

A FHIR decimal keeps its precision, and a sender may send more digits than a float holds (or an integer
past 64 bits, which orjson refuses to write).  The converter gives such a value as a ``decimal.Decimal``
(``transforms.datatypes.exact_number``); :func:`dumps` writes it as a JSON number token with the digits as
sent.  orjson also *reads* such a number as a float, rounding it, so a destination that reads a payload
and writes it again (a FHIR transaction split in chunks, an HTTP envelope) uses :func:`loads`: it keeps
every long number token as it was (an ``orjson.Fragment``, which orjson writes back unchanged).  Payloads
without a long number, nearly all of them, take orjson's path on both sides.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

import orjson

# A number token of 16 or more digits and points after ``:``, ``[`` or ``,``; (a string that happens to
# contain one only costs the slower exact read)
_LONG_NUMBER = re.compile(rb"[:\[,]\s*-?[0-9][0-9.]{15,}")
_SHORT_INT = 18  # digits: always within 64 bits


def _default(obj: Any) -> Any:
    if isinstance(obj, Decimal) and obj.is_finite():
        return orjson.Fragment(format(obj, "f"))  # fixed point: the digits as sent, never an exponent
    raise TypeError(f"Type is not JSON serializable: {type(obj).__name__}")


def dumps(obj: Any, option: int | None = None) -> bytes:
    """``orjson.dumps`` that also writes ``Decimal`` values as exact JSON numbers."""
    return orjson.dumps(obj, default=_default, option=option)


def _int(token: str) -> Any:
    return int(token) if len(token.lstrip("-")) <= _SHORT_INT else orjson.Fragment(token)


def _float(token: str) -> Any:
    mantissa = token.lstrip("-").split("e")[0].split("E")[0]
    if len(mantissa.replace(".", "").strip("0")) <= 15:  # a float carries it exactly
        value = float(token)
        if value - value == 0:  # finite (orjson would write an infinite float as null)
            return value
    return orjson.Fragment(token)


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads(data: bytes) -> Any:
    """``orjson.loads``, except that a number a float or a 64-bit integer would not carry exactly is kept
    as its JSON token (written back unchanged by :func:`dumps` and ``orjson.dumps``).  Invalid JSON raises
    ``orjson.JSONDecodeError`` either way."""
    if _LONG_NUMBER.search(data) is None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            if "number" not in str(exc):  # not a number orjson refuses (1E+400 is infinite as a double)
                raise
    try:
        return json.loads(data, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except json.JSONDecodeError as exc:
        raise orjson.JSONDecodeError(exc.msg, exc.doc, exc.pos) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise orjson.JSONDecodeError(str(exc), "", 0) from None
