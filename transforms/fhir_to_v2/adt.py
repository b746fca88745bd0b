"""Patient → ADT A28 (add person information) / A31 (update person information) / A29 (delete person
information: the Patient was deleted on the server, a tombstone from the fhir-poll source).

The IG's PID[Patient] map in reverse: identifiers → PID-3 (system → assigning authority, type → CX-5),
names → PID-5, birthDate → PID-7, gender → PID-8, address → PID-11, telecom → PID-13/14.
"""

from __future__ import annotations

from typing import Any

from transforms.fhir_to_v2.outbound import ACTIVE, Outbound, candidates, is_deleted
from transforms.fhir_to_v2.settings import WritebackSettings
from transforms.fhir_to_v2.writer import comps, control_id, cx, digest, dtm, encode, esc, msh, segment, xpn

JSON = dict[str, Any]

GENDER = {"female": "F", "male": "M", "other": "O", "unknown": "U"}
_ADDRESS_USE = {"home": "H", "work": "B", "temp": "C", "old": "BAD", "billing": "BI"}


def _xad(a: JSON) -> str:
    lines = [str(x) for x in a.get("line", ()) or ()]
    return comps(
        esc(lines[0] if lines else ""),
        esc(" ".join(lines[1:])),
        esc(str(a.get("city") or "")),
        esc(str(a.get("state") or "")),
        esc(str(a.get("postalCode") or "")),
        esc(str(a.get("country") or "")),
        _ADDRESS_USE.get(str(a.get("use") or ""), ""),
    )


def _xtn(t: JSON) -> str:
    use = "NET" if t.get("system") == "email" else "PRN"
    equip = {"email": "Internet", "fax": "FX", "pager": "BP"}.get(str(t.get("system") or ""), "PH")
    value = esc(str(t.get("value") or ""))
    if t.get("system") == "email":
        return comps("", use, equip, value)
    return comps(value, use, equip)


def pid(res: JSON, settings: WritebackSettings) -> str:
    idents: list[str] = []
    for ident in res.get("identifier", ()) or ():
        if not isinstance(ident, dict) or not ident.get("value"):
            continue
        code = ""
        for c in (ident.get("type") or {}).get("coding", ()) or ():
            code = str(c.get("code") or "")
        idents.append(cx(str(ident["value"]), str(ident.get("system") or ""), settings, code))
    if not idents and res.get("id"):
        idents.append(cx(str(res["id"]), "", settings, "PI", settings.sending_facility))
    names = "~".join(xpn(n) for n in res.get("name", ()) or () if isinstance(n, dict))
    addresses = "~".join(_xad(a) for a in res.get("address", ()) or () if isinstance(a, dict))
    telecom = [t for t in res.get("telecom", ()) or () if isinstance(t, dict) and t.get("value")]
    home = "~".join(_xtn(t) for t in telecom if t.get("use") != "work")
    work = "~".join(_xtn(t) for t in telecom if t.get("use") == "work")
    deceased = res.get("deceasedDateTime") or ""
    fields = [
        "1",
        "",
        "~".join(idents),
        "",
        names,
        "",
        dtm(res.get("birthDate"), settings),
        GENDER.get(str(res.get("gender") or ""), ""),
        "",
        "",
        addresses,
        "",
        home,
        work,
        *[""] * 14,
        dtm(str(deceased), settings) if deceased else "",
        "Y" if deceased or res.get("deceasedBoolean") is True else "",
    ]
    return segment("PID", fields)


# Message structure per trigger (HL7 v2.5.1 table 0354): A28/A31 ADT_A05, A29 ADT_A21
STRUCTURE = {"A28": "ADT_A05", "A31": "ADT_A05", "A29": "ADT_A21"}


def convert(res: JSON, settings: WritebackSettings, now: str) -> Outbound:
    """A Patient → its candidate A28 / A31 messages (a deleted one's: A29)."""
    state = "deleted" if is_deleted(res) else ACTIVE
    body = [pid(res, settings)]
    key = f"Patient|{res.get('id') or ''}"
    content = digest(*body)
    when = dtm(str((res.get("meta") or {}).get("lastUpdated") or "") or now, settings)
    variants: dict[str, bytes] = {}
    for trigger in candidates("Patient", state):
        header = msh(settings, when, f"ADT^{trigger}^{STRUCTURE[trigger]}", control_id(key, content, trigger))
        evn = segment("EVN", [trigger, when])
        variants[trigger] = encode([header, evn, *body, segment("PV1", ["1", "N"])], settings)
    return Outbound("Patient", key, state, content, "", variants)
