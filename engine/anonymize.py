"""De-identifying HL7 v2 messages for test use: ``sluice anonymize FILE... --out DIR``.

What changes (everything else is kept byte for byte, separators and escapes included):

* **names** (PID-5/6/9, NK1-2/30, GT1-3, IN1-16, MRG-7, ...) → invented names (engine/synthetic.py's
  lists); the same original name gets the same surrogate everywhere;
* **identifiers** (PID-2/3/4/18/19/20/21, PV1-19/50, MRG-1..6, NK1-33, GT1-2/12, IN1-36/49, order, filler
  and appointment numbers) → a surrogate of the same shape (a digit for a digit, a letter for a letter),
  the assigning authority and type kept: the same MRN gives the same surrogate in every file;
* **addresses** → invented street and city, the ZIP reduced to its first three digits; state and
  country kept; **phones and e-mails** → 555-01xx numbers and ``@example.org`` addresses;
* **dates** → shifted by a whole number of days per patient (PID-3's first identifier), the same shift
  in every message of that patient, so intervals (admit → discharge, booked → seen) are kept;
* **free text** → ``[redacted]``: NTE-3, OBX-5 when OBX-2 is TX, FT or ED, and other comment fields.

Surrogates are keyed with a secret (``--key`` / ``SLUICE_ANONYMIZE_KEY``; a random one per run when
absent), so nobody holding the output and this code can recompute an MRN's surrogate.  Then the **leak
check**: every original value that was replaced is looked for (case-insensitive) in every output file;
each hit is reported by where it was found and which field it came from, never by its value.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from engine import hl7, synthetic

REDACTED = "[redacted]"

# (segment, field) → kind.  Kinds: name, id (CX: component 1), idval (whole first component), addr, phone,
# date, tq (TQ/TQ1 timing: components 4 and 5 are dates), text (free text, redacted).
FIELDS: dict[str, dict[int, str]] = {
    "MSH": {7: "date"},
    "EVN": {2: "date", 3: "date", 6: "date"},
    "PID": {
        2: "id", 3: "id", 4: "id", 5: "name", 6: "name", 7: "date", 9: "name", 11: "addr", 13: "phone",
        14: "phone", 18: "id", 19: "idval", 20: "id", 21: "id", 23: "text", 29: "date", 33: "date",
    },
    "PD1": {},
    "NK1": {
        2: "name", 4: "addr", 5: "phone", 6: "phone", 8: "date", 9: "date", 16: "date", 30: "name",
        31: "phone", 32: "addr", 33: "id", 37: "idval",
    },
    "PV1": {19: "id", 44: "date", 45: "date", 50: "id"},
    "PV2": {8: "date", 9: "date", 12: "text"},
    "MRG": {1: "id", 2: "id", 3: "id", 4: "id", 5: "id", 6: "id", 7: "name"},
    "GT1": {2: "id", 3: "name", 5: "addr", 6: "phone", 7: "phone", 8: "date", 12: "idval", 16: "name"},
    "IN1": {12: "date", 13: "date", 16: "name", 18: "date", 19: "addr", 36: "idval", 49: "id"},
    "IN2": {1: "idval", 2: "idval", 8: "idval"},
    "DG1": {5: "date", 19: "date"},
    "PR1": {5: "date"},
    "AL1": {6: "date"},
    "ORC": {2: "id", 3: "id", 4: "id", 9: "date", 15: "date"},
    "OBR": {
        2: "id", 3: "id", 6: "date", 7: "date", 8: "date", 13: "text", 14: "date", 22: "date", 27: "tq",
        36: "date",
    },
    "OBX": {12: "date", 14: "date", 19: "date"},
    "NTE": {3: "text"},
    "SPM": {2: "id", 17: "date", 18: "date"},
    "TQ1": {7: "date", 8: "date"},
    "SCH": {1: "id", 2: "id", 11: "tq"},
    "AIS": {4: "date"},
    "AIG": {8: "date"},
    "AIL": {6: "date"},
    "AIP": {6: "date"},
    "TXA": {4: "date", 6: "date", 7: "date", 8: "date", 12: "id"},
    "RXA": {3: "date", 4: "date"},
}  # fmt: skip
_FREE_TEXT_OBX = ("TX", "FT", "ED")
_DATE_OBX = ("DT", "DTM", "TS")
_DTM = re.compile(r"^(\d{8})(\d{0,6}(?:\.\d{1,4})?)([+-]\d{4})?$")
_BIRTH_DATES = ("PID-7", "NK1-16", "GT1-8", "IN1-18")  # also looked for by the leak check
_INITIALS = tuple("ABCDEFGHJKLMNPRSTW")
_MIN_LEAK_LEN = 3
_MIN_TEXT_LEN = 12  # free text shorter than this ("See note") is not looked for  # shorter originals (a middle initial, a sex code) match everywhere and mean nothing


@dataclass(frozen=True)
class Leak:
    """An original value found in the output: where it was found and what field it came from."""

    output: str  # file name and message number
    found_in: str  # the segment line number it was found on, e.g. "segment 3 (OBX)"
    came_from: str  # e.g. "PID-5 of input a.hl7#1"


@dataclass
class Originals:
    """The values replaced (unescaped), each with where it came from first."""

    values: dict[str, str] = field(default_factory=dict)  # lower-cased value → "PID-5 of a.hl7#1"

    def add(self, value: str, where: str) -> None:
        v = value.strip()
        if len(v) >= _MIN_LEAK_LEN and not (v.isdigit() and len(v) < 4):
            self.values.setdefault(v.lower(), where)


class Anonymizer:
    """Surrogates keyed with ``key``: consistent across every file given to one instance."""

    def __init__(self, key: bytes):
        self.key = key
        self.originals = Originals()
        self._shift: dict[str, int] = {}

    # -- surrogates ---------------------------------------------------------------------------------
    def _h(self, kind: str, value: str) -> int:
        digest = hmac.new(self.key, f"{kind}\x00{value}".encode(), hashlib.sha256).digest()
        return int.from_bytes(digest[:8], "big")

    def shaped(self, kind: str, value: str) -> str:
        """A surrogate of ``value``'s shape: each digit a digit, each letter a letter of the same case."""
        h = hmac.new(self.key, f"{kind}\x00{value}".encode(), hashlib.sha256).digest() * 4
        out = []
        for i, ch in enumerate(value):
            b = h[i % len(h)]
            if ch.isdigit():
                out.append(str(b % 10))
            elif "a" <= ch <= "z":
                out.append(chr(97 + b % 26))
            elif "A" <= ch <= "Z":
                out.append(chr(65 + b % 26))
            else:
                out.append(ch)
        s = "".join(out)
        return s if s != value or not any(c.isalnum() for c in value) else self.shaped(kind + "'", value)

    def pick(self, kind: str, value: str, choices: tuple[str, ...]) -> str:
        """One of ``choices`` for ``value``: never ``value`` itself nor any other original value seen
        (:meth:`learn`), whatever its case, so a surrogate is never mistaken for a leak."""
        i = self._h(kind, value.upper()) % len(choices)
        for k in range(len(choices)):
            c = choices[(i + k) % len(choices)]
            if c.upper() != value.strip().upper() and c.lower() not in self.originals.values:
                return c
        return self.shaped(kind, value)

    def learn(self, text: str, label: str) -> None:
        """A first pass over a message: its original values become known, so no surrogate picked later
        (in any file) equals one of them."""
        self.message(text, label)

    def shift_days(self, patient: str) -> int:
        """The patient's date shift: 30 to 395 days back, fixed per patient for this key."""
        if patient not in self._shift:
            self._shift[patient] = -(30 + self._h("shift", patient) % 366)
        return self._shift[patient]

    # -- a message ----------------------------------------------------------------------------------
    def message(self, text: str, label: str) -> str:
        """One message (segments separated by CR) → its de-identified form.  An FHS/BHS batch: each of its
        messages on its own (its own patient's shift), the batch header and trailer lines kept."""
        text = hl7.normalise_newlines(text)
        if text.startswith(("FHS", "BHS")):
            out: list[str] = []
            current: list[str] = []
            n = 0
            for line in text.strip("\r\n").split("\r"):
                if line.startswith("MSH") or line[:3] in ("BHS", "BTS", "FTS", "FHS"):
                    if current:
                        n += 1
                        out.append(self._one("\r".join(current), f"{label} (batch message {n})").rstrip("\r"))
                        current = []
                    if not line.startswith("MSH"):
                        out.append(line)
                        continue
                current.append(line)
            if current:
                n += 1
                out.append(self._one("\r".join(current), f"{label} (batch message {n})").rstrip("\r"))
            return "\r".join(out) + "\r"
        return self._one(text, label)

    def _one(self, text: str, label: str) -> str:
        msg = hl7.parse(text)  # the repo's parser: delimiters, and an AR-style error for junk
        d = msg.delimiters
        pid = msg.first("PID")
        patient = pid.rep(3).c(1) + "|" + pid.rep(3).c(4) if pid is not None else ""
        days = self.shift_days(patient or label)
        lines = hl7.normalise_newlines(text).strip("\r\n").split("\r")
        out = []
        for line in lines:
            out.append(self._segment(line, d, days, label))
        return "\r".join(out) + "\r"

    def _segment(self, line: str, d: hl7.Delimiters, days: int, label: str) -> str:
        if not line:
            return line
        fields = line.split(d.field)
        name = fields[0].strip()
        header = name in hl7.HEADER_SEGMENTS
        kinds = dict(FIELDS.get(name, {}))
        value_type = fields[2].split(d.component)[0].strip() if name == "OBX" and len(fields) > 2 else ""
        if value_type in _FREE_TEXT_OBX:
            kinds[5] = "text"
        elif value_type in _DATE_OBX:
            kinds[5] = "date"
        for n, kind in kinds.items():
            i = n - 1 if header else n  # MSH-1 is the separator itself: MSH-n is fields[n - 1]
            if i <= 0 or i >= len(fields) or not fields[i]:
                continue
            where = f"{name}-{n} of {label}"
            fields[i] = self._field(fields[i], kind, d, days, where)
        return d.field.join(fields)

    def _field(self, raw: str, kind: str, d: hl7.Delimiters, days: int, where: str) -> str:
        if kind == "text":
            self._remember(raw, d, where)
            return REDACTED
        reps = raw.split(d.repetition) if not (kind == "date" and d.repetition not in raw) else [raw]
        return d.repetition.join(self._rep(r, kind, d, days, where) for r in reps)

    def _remember(self, raw: str, d: hl7.Delimiters, where: str) -> None:
        """Free text: each repetition's whole text is looked for (its single words would match everywhere);
        an encapsulated document (ED, components) is not."""
        for rep in raw.split(d.repetition):
            if d.component not in rep and len(rep) >= _MIN_TEXT_LEN:
                self.originals.add(hl7.unescape(rep, d), where)

    def _rep(self, rep: str, kind: str, d: hl7.Delimiters, days: int, where: str) -> str:
        if not rep:
            return rep
        comps = rep.split(d.component)

        def sub(i: int, fn: Callable[[str], str], remember: bool = True) -> None:
            """Replace component ``i`` (1-based) subcomponent by subcomponent."""
            if i > len(comps) or not comps[i - 1]:
                return
            parts = comps[i - 1].split(d.subcomponent)
            for k, p in enumerate(parts):
                if p:
                    plain = hl7.unescape(p, d)
                    if remember:
                        self.originals.add(plain, where)
                    parts[k] = fn(plain) if k == 0 or kind == "name" else p
            comps[i - 1] = d.subcomponent.join(parts)

        if kind == "date":
            if where.split(" ", 1)[0] in _BIRTH_DATES:
                self.originals.add(rep[:8], where)
            return self._date(rep, days)
        if kind == "tq":
            for i in (4, 5):
                if i <= len(comps):
                    comps[i - 1] = self._date(comps[i - 1], days)
        elif kind in ("id", "idval"):
            sub(1, lambda v: self.shaped("id", v))
        elif kind == "name":
            sub(1, lambda v: self.pick("family", v, synthetic.FAMILY))
            # given and middle names are replaced but not looked for alone: "Casey" the neighbour and
            # "Casey" the cardiologist would be one leak too many (the family name is looked for)
            given = synthetic.GIVEN_F + synthetic.GIVEN_M
            sub(2, lambda v: self.pick("given", v, given), remember=False)
            sub(3, lambda v: self.pick("given", v, given) if len(v) > 1 else self.pick("middle", v, _INITIALS),
                remember=False)  # fmt: skip
        elif kind == "addr":
            original_city = hl7.unescape(comps[2], d) if len(comps) > 2 else ""
            city = next(
                c
                for c in synthetic.CITIES[self._h("city", rep) % len(synthetic.CITIES) :] + synthetic.CITIES
                if c[0].upper() != original_city.strip().upper()
            )
            sub(1, lambda v: f"{self._h('street', v) % 999 + 1} {self.pick('street', v, synthetic.STREETS)}")
            sub(2, lambda v: f"Unit {self._h('unit', v) % 99 + 1}")
            # the city is replaced but not looked for: many people (and the lab) share one
            sub(3, lambda v: city[0], remember=False)
            # ZIP: the first three digits stay (HIPAA safe harbor), so it is not looked for as a leak
            sub(5, lambda v: v[:3] + "00" if v[:3].isdigit() else city[2], remember=False)
            sub(8, lambda v: REDACTED)  # other designation (free text)
        elif kind == "phone":
            local = f"55501{self._h('phone', rep) % 100:02d}"
            sub(1, lambda v: f"(555) {local[:3]}-{local[3:]}")
            sub(4, lambda v: f"person{self._h('email', v) % 100000:05d}@example.org")
            sub(6, lambda v: "555", remember=False)
            sub(7, lambda v: local)
            sub(12, lambda v: f"+1555{local}")
        return d.component.join(comps)

    @staticmethod
    def _date(value: str, days: int) -> str:
        m = _DTM.match(value.strip())
        if m is None:
            return value  # not a full date (YYYY, YYYYMM or junk): left as it is
        try:
            day = datetime.strptime(m.group(1), "%Y%m%d")
        except ValueError:
            return value
        return (day + timedelta(days=days)).strftime("%Y%m%d") + m.group(2) + (m.group(3) or "")

    # -- the leak check -----------------------------------------------------------------------------
    def leaks(self, outputs: Iterable[tuple[str, str]]) -> list[Leak]:
        """Every original value found in the outputs ((label, message text) pairs), by place."""
        if not self.originals.values:
            return []
        alternatives = "|".join(re.escape(v) for v in sorted(self.originals.values, key=len, reverse=True))
        # whole words only: an original "Sam" is not found inside "Sample"
        pattern = re.compile(f"(?<![A-Za-z0-9])(?:{alternatives})(?![A-Za-z0-9])", re.IGNORECASE)
        found: list[Leak] = []
        for label, text in outputs:
            for n, line in enumerate(hl7.normalise_newlines(text).split("\r"), 1):
                candidates = {line}
                if "\\" in line:
                    candidates.add(hl7.unescape(line))
                for cand in candidates:
                    for m in pattern.finditer(cand):
                        came_from = self.originals.values.get(m.group(0).lower(), "?")
                        found.append(Leak(label, f"segment {n} ({line[:3]})", came_from))
        return found
