"""ACK/NACK building (pure).

Follows HAPI's convention (see ../shared/HL7-REFERENCE.md): MSH-3/4 and MSH-5/6
swapped, MSH-1/2/11/12 copied, new MSH-7/MSH-10, MSH-9 ``ACK^<trigger>`` with a
third component ``ACK`` from v2.5, MSA-2 = inbound MSH-10.  Errors go in ERR-2/3/4
from v2.5, in MSA-3 and ERR-1 before.  Which ACKs go back at all (original vs
enhanced mode) is :func:`plan`.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from engine.errors import HL7_ERROR_TEXT, Location, SluiceError
from engine.hl7 import DEFAULT_DELIMITERS, Delimiters, Message, escape

_COMMIT = {"AA": "CA", "AE": "CE", "AR": "CR"}
_counter = itertools.count(1)
_PREFIX = f"{os.getpid() % 10000:04d}"


_ts_cache: tuple[int, str] = (0, "")


def _timestamp() -> str:
    """MSH-7 for an ACK (UTC with offset), formatted once per second."""
    global _ts_cache
    sec = int(time.time())
    if _ts_cache[0] != sec:
        _ts_cache = (sec, datetime.fromtimestamp(sec, UTC).strftime("%Y%m%d%H%M%S%z"))
    return _ts_cache[1]


def next_control_id() -> str:
    """A unique control id for an outbound ACK (time + pid + counter)."""
    return f"{int(time.time()):x}{_PREFIX}{next(_counter) % 1_000_000:06d}"


@dataclass(frozen=True)
class Outcome:
    """What intake decided: original-mode code plus the error, if any."""

    code: str  # AA / AE / AR
    error: SluiceError | None = None

    @property
    def ok(self) -> bool:
        return self.code == "AA"


ACCEPTED = Outcome("AA")


def _want(condition: str, ok: bool) -> bool:
    if condition == "AL":
        return True
    if condition == "NE":
        return False
    if condition == "SU":
        return ok
    if condition == "ER":
        return not ok
    return True  # unknown value: be safe and answer


def plan(message: Message | None, outcome: Outcome) -> list[str]:
    """The MSA-1 codes to send back, in order: [] (nothing), one app ACK, or commit then app ACK."""
    if message is None:
        return [outcome.code]
    if message.message_type == "ACK":
        return []  # never acknowledge an acknowledgement
    accept = message.accept_ack_type
    app = message.app_ack_type
    if not accept and not app:
        return [outcome.code]  # original mode
    codes: list[str] = []
    if _want(accept or "AL", outcome.ok):
        codes.append(_COMMIT[outcome.code])
    if _want(app or "AL", outcome.ok) and app:
        codes.append(outcome.code)
    return codes


def _version_ge(version: str, target: tuple[int, ...]) -> bool:
    parts: list[int] = []
    for p in version.split("."):
        if not (p.isascii() and p.isdigit()):
            break
        parts.append(int(p))
    return tuple(parts) >= target if parts else True


def build(
    message: Message | None,
    code: str,
    error: SluiceError | None = None,
    *,
    now: datetime | None = None,
    control_id: str | None = None,
    inbound_control_id: str = "",
    version: str = "2.5.1",
) -> str:
    """An ACK message as text with CR segment terminators."""
    d: Delimiters = message.delimiters if message is not None else DEFAULT_DELIMITERS
    fs, cs = d.field, d.component
    ts = _timestamp() if now is None else now.strftime("%Y%m%d%H%M%S%z")
    cid = control_id or next_control_id()
    if message is not None:
        h = message.msh
        trigger = h.get(9, 2)
        ver = h.get(12, 1) or version
        msh = [
            "MSH",
            d.encoding_characters,
            h[5],
            h[6],
            h[3],
            h[4],
            ts,
            "",
            "ACK"
            + (cs + escape(trigger, d) if trigger else "")
            + (cs + "ACK" if _version_ge(ver, (2, 5)) else ""),
            cid,
            h[11],
            h[12] or ver,
        ]
        msa2 = h[10]
    else:
        ver = version
        msh = ["MSH", d.encoding_characters, "", "", "", "", ts, "", f"ACK{cs}{cs}ACK", cid, "P", ver]
        msa2 = escape(inbound_control_id, d)
    segments = [fs.join(msh)]
    msa = ["MSA", code, msa2]
    err_seg: str | None = None
    if error is not None:
        hl7_code = str(error.hl7_error)
        text = escape(HL7_ERROR_TEXT.get(hl7_code, "Error"), d)
        detail = escape(error.message, d)
        loc: Location | None = error.location
        if _version_ge(ver, (2, 5)):
            severity = "E"
            err = [
                "ERR",
                "",
                loc.hl7(cs) if loc is not None else "",
                f"{hl7_code}{cs}{text}{cs}HL70357",
                severity,
                "",
                "",
                "",
                detail,
            ]
            err_seg = fs.join(err).rstrip(fs)
        else:
            msa.append(detail)
            ss = d.subcomponent if d.subcomponent != fs else cs  # (MSH-2 without a subcomponent separator)
            where = ""
            if loc is not None:
                where = cs.join([loc.segment, str(loc.sequence), str(loc.field or ""), ""])
            else:
                where = cs * 3
            err_seg = fs.join(["ERR", f"{where}{hl7_code}{ss}{text}{ss}HL70357"])
    segments.append(fs.join(msa))
    if err_seg:
        segments.append(err_seg)
    return "\r".join(segments) + "\r"
