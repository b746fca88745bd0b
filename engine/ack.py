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


# (second, MSH-7 for it, control id prefix for it): formatted once per second
_ts_cache: tuple[int, str, str] = (0, "", "")


def _second() -> tuple[int, str, str]:
    global _ts_cache
    sec = int(time.time())
    cached = _ts_cache
    if cached[0] != sec:
        cached = _ts_cache = (
            sec,
            datetime.fromtimestamp(sec, UTC).strftime("%Y%m%d%H%M%S%z"),
            f"{sec:x}{_PREFIX}",
        )
    return cached


def _timestamp() -> str:
    """MSH-7 for an ACK (UTC with offset), formatted once per second."""
    return _second()[1]


def next_control_id() -> str:
    """A unique control id for an outbound ACK (time + pid + counter)."""
    return f"{_second()[2]}{next(_counter) % 1_000_000:06d}"


# _version_ge(version, (2, 5)) per MSH-12 seen: a feed sends one or two versions; bounded against junk
_V25: dict[str, bool] = {}


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
    if now is None:
        sec = _second()
        ts = sec[1]
        cid = control_id or f"{sec[2]}{next(_counter) % 1_000_000:06d}"
    else:
        ts = now.strftime("%Y%m%d%H%M%S%z")
        cid = control_id or next_control_id()
    if message is not None and error is None:
        fast = _build_plain(message, code, ts, cid, version)
        if fast is not None:
            return fast
    return _build_general(message, code, error, ts, cid, inbound_control_id, version)


def _build_general(
    message: Message | None,
    code: str,
    error: SluiceError | None,
    ts: str,
    cid: str,
    inbound_control_id: str,
    version: str,
) -> str:
    """:func:`build` for any message, error and header (MSH-7 ``ts`` and MSH-10 ``cid`` decided)."""
    d: Delimiters = message.delimiters if message is not None else DEFAULT_DELIMITERS
    fs, cs = d.field, d.component
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


def _build_plain(message: Message, code: str, ts: str, cid: str, version: str) -> str | None:
    """:func:`build` without an error for a header whose MSH-9 and MSH-12 hold no escape, repetition or
    subcomponent character (every feed we know): the same bytes in one join from the MSH fields in hand
    (no unescape of MSH-9.2/MSH-12.1 and no escape of the trigger: there is nothing to undo or redo).
    None: use the general path."""
    d = message.delimiters
    f = message.msh.fields
    n = len(f)
    if n < 13:
        f = f + [""] * (13 - n)
    typ = f[9]
    ver_field = f[12]
    fs, cs = d.field, d.component
    # (a separator MSH-2 left out is the field separator, which no field holds: the test is then false)
    for ch in (d.escape, d.repetition, d.subcomponent, "\n"):
        if ch in typ or ch in ver_field:
            return None
    ver = ver_field.split(cs, 1)[0] or version
    ver_out = ver_field or ver
    v25 = _V25.get(ver)
    if v25 is None:
        v25 = _version_ge(ver, (2, 5))
        if len(_V25) < 64:
            _V25[ver] = v25
    comps = typ.split(cs, 2)
    trigger = comps[1] if len(comps) > 1 else ""
    if trigger:
        mtype = "ACK" + cs + trigger + cs + "ACK" if v25 else "ACK" + cs + trigger
    else:
        mtype = "ACK" + cs + "ACK" if v25 else "ACK"
    return (
        fs.join(
            (
                "MSH",
                d.encoding_characters,
                f[5],
                f[6],
                f[3],
                f[4],
                ts,
                "",
                mtype,
                cid,
                f[11],
                ver_out,
                # MSA on the same join: the segment terminator ends MSH-12's field
            )
        )
        + "\rMSA"
        + fs
        + code
        + fs
        + f[10]
        + "\r"
    )
