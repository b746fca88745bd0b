"""Writing HL7 v2: segments from values (escaped), and FHIR datatypes in reverse (pure).

The reverse of ``transforms/datatypes.py``: FHIR instant → DTM in the site zone, Identifier → CX/EI
(system → assigning authority), CodeableConcept → CWE (system → coding-system name), HumanName → XPN.
A value is escaped once, where it becomes a component (``engine.hl7.escape``), so a ``|`` or ``^`` in a
name or a note never breaks the message.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import unquote

from engine.hl7 import DEFAULT_DELIMITERS, escape
from transforms.datatypes import CODE_SYSTEMS, LOCAL_CODE_SYSTEM_PREFIX, V2_TABLE
from transforms.fhir_to_v2.settings import WritebackSettings

JSON = dict[str, Any]

_DATE = re.compile(r"^\d{4}(-\d{2}(-\d{2})?)?$")

# FHIR system → preferred HL7 coding-system name (the first name CODE_SYSTEMS lists for it)
SYSTEM_NAMES: dict[str, str] = {}
for _name, _uri in CODE_SYSTEMS.items():
    SYSTEM_NAMES.setdefault(_uri, _name)


def esc(value: str) -> str:
    return escape(value, DEFAULT_DELIMITERS)


def comps(*values: str) -> str:
    """Components (already escaped) joined with ``^``, trailing empties dropped."""
    parts = list(values)
    while parts and not parts[-1]:
        parts.pop()
    return "^".join(parts)


def segment(name: str, fields: list[str]) -> str:
    """``NAME|f1|f2...`` with trailing empty fields dropped (values already escaped)."""
    parts = list(fields)
    while parts and not parts[-1]:
        parts.pop()
    return "|".join([name, *parts])


def dtm(value: str | None, settings: WritebackSettings) -> str:
    """FHIR date/dateTime/instant → HL7 DTM: a time is converted to the site zone (DST-correct) and written
    with its offset (``time_offsets: false``: site local time without one); a date stays a date."""
    if not value:
        return ""
    v = value.strip()
    if "T" not in v:
        if not _DATE.match(v):
            raise ValueError("not a FHIR date")
        return v.replace("-", "")
    t = datetime.fromisoformat(v.replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=settings.zone)
    t = t.astimezone(settings.zone)
    out = t.strftime("%Y%m%d%H%M%S")
    if settings.time_offsets:
        out += t.strftime("%z")
    return out


def system_name(system: str, names: Mapping[str, str] | None = None) -> str:
    """FHIR code system URI → HL7 coding-system name (CWE-3); an unknown URI is written as itself.

    ``names``: the channel's own names (``WritebackSettings.system_names``), before the shipped ones."""
    if not system:
        return ""
    if names:
        hit = names.get(system)
        if hit is not None:
            return hit
    if system.startswith(V2_TABLE):
        return "HL7" + system[len(V2_TABLE) :]
    if system.startswith(LOCAL_CODE_SYSTEM_PREFIX):
        return unquote(system[len(LOCAL_CODE_SYSTEM_PREFIX) :])
    return SYSTEM_NAMES.get(system, system)


def cwe(cc: JSON | None, names: Mapping[str, str] | None = None) -> str:
    """CodeableConcept → CWE ``code^display^system`` (+ the alternate triplet for a second coding, CWE-9 text).

    ``names``: system URI → CWE-3 name of the channel (:func:`system_name`)."""
    if not cc:
        return ""
    codings = [c for c in cc.get("coding", ()) or () if isinstance(c, dict) and c.get("code")]
    text = str(cc.get("text") or "")
    triplets: list[str] = []
    for c in codings[:2]:
        triplets += [
            esc(str(c["code"])),
            esc(str(c.get("display") or "")),
            esc(system_name(str(c.get("system") or ""), names)),
        ]
    if not triplets:
        return comps("", esc(text)) if text else ""
    while len(triplets) < 6:
        triplets.append("")
    if text and text != (codings[0].get("display") or ""):
        return comps(*triplets, "", "", esc(text))
    return comps(*triplets)


def authority(system: str, settings: WritebackSettings) -> tuple[str, str, str]:
    """Identifier system → HD (namespace, universal id, type): a configured authority name, else the
    system itself as universal id (``urn:oid:`` → ISO, other URIs → URI), so the receiver (and Sluice's
    inbound converter) gets the same system back."""
    if not system:
        return "", "", ""
    if system in settings.authorities:
        return settings.authorities[system], "", ""
    if system.startswith("urn:oid:"):
        return "", system[8:], "ISO"
    if system.startswith("urn:uuid:"):
        return "", system[9:], "UUID"
    return "", system, "URI"


def ei(value: str, system: str, settings: WritebackSettings, namespace: str = "") -> str:
    """Identifier → EI ``value^namespace^universal id^type``."""
    if not value:
        return ""
    ns, uid, kind = authority(system, settings)
    return comps(esc(value), esc(ns or namespace), esc(uid), esc(kind))


def cx(value: str, system: str, settings: WritebackSettings, type_code: str = "", namespace: str = "") -> str:
    """Identifier → CX ``value^^^authority(HD)^type``."""
    if not value:
        return ""
    ns, uid, kind = authority(system, settings)
    hd = "&".join(p for p in (esc(ns or namespace), esc(uid), esc(kind))) if (ns or uid or namespace) else ""
    hd = hd.rstrip("&")
    return comps(esc(value), "", "", hd, esc(type_code))


def split_display(display: str) -> tuple[str, str]:
    """A display text → (family, given): ``Family, Given`` or ``Given [Middle] Family``."""
    d = " ".join(display.split())
    if "," in d:
        family, _, given = d.partition(",")
        return family.strip(), given.strip()
    if " " in d:
        given, _, family = d.rpartition(" ")
        return family, given
    return d, ""


def xpn(name: JSON) -> str:
    """HumanName → XPN ``family^given^middle^suffix^prefix^^type``."""
    family = str(name.get("family") or "")
    given = [str(g) for g in name.get("given", ()) or ()]
    prefix = " ".join(str(p) for p in name.get("prefix", ()) or ())
    suffix = " ".join(str(p) for p in name.get("suffix", ()) or ())
    use = {"official": "L", "usual": "D", "maiden": "M", "nickname": "N", "old": "BAD", "anonymous": "S"}.get(
        str(name.get("use") or ""), ""
    )
    if not family and not given and name.get("text"):
        family, g = split_display(str(name["text"]))
        given = [g] if g else []
    return comps(
        esc(family),
        esc(given[0] if given else ""),
        esc(" ".join(given[1:])),
        esc(suffix),
        esc(prefix),
        "",
        use,
    )


def control_id(*parts: str) -> str:
    """MSH-10: a stable id (20 characters) from what the message says, so a re-send of the same content
    carries the same control id (a receiver that dedupes by MSH-10 sees a retry as one message)."""
    h = hashlib.blake2b("\x1f".join(parts).encode("utf-8", "surrogateescape"), digest_size=10).hexdigest()
    return h.upper()


def digest(*parts: str) -> str:
    """An (unkeyed) digest of what a message carries; the store keys it again before writing (engine)."""
    return hashlib.blake2b("\x1f".join(parts).encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()


def msh(settings: WritebackSettings, when: str, message_type: str, control: str) -> str:
    """The MSH segment (original acknowledgement mode: MSH-15/16 empty)."""
    s = settings
    fields = [
        "^~\\&",
        esc(s.sending_application),
        esc(s.sending_facility),
        esc(s.receiving_application),
        esc(s.receiving_facility),
        when,
        "",
        message_type,
        control,
        s.processing_id,
        s.version,
        "",
        "",
        "",
        "",
        "",
        s.charset,
    ]
    return segment("MSH", fields)


def encode(segments: list[str], settings: WritebackSettings) -> bytes:
    """Segments → message bytes (CR-terminated) in the configured charset (MSH-18).  A character the
    charset lacks raises ``UnicodeEncodeError`` (the caller says which charset would carry it)."""
    text = "\r".join(segments) + "\r"
    return text.encode(settings.codec)
