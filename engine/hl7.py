"""HL7 v2 parsing: delimiters, segments, escapes, charsets and a field accessor.

Pure and fast: a message is split into segments and fields with ``str.split``
once; components, repetitions and subcomponents are split only when asked for.
Measured on the shared corpus (``bench/parse_bench.py``, pure-Python build,
``bench/results/parse.json``): python-hl7's ``hl7.parse``, which builds the
whole tree eagerly, costs ~100x this parse (2.6 ms against 24 µs for a 2.7 KB
message) and still ~4.5x a parse that splits and unescapes every field here;
hl7apy's parser costs ~2,000x, so it serves only the optional structure check
(``engine/validation.py``, its definitions, not its parser).  This parser and
python-hl7 read the same values on the whole corpus, apart from documented escape
renderings (``tests/engine/test_hl7_differential.py``).

Access paths look like ``PID-3``, ``PID-3.1``, ``PID-3(2).1.2``, ``OBX(2)-5``:
``SEG(occurrence)-field(repetition).component.subcomponent``, all 1-based.
Values come back unescaped; an absent value is ``""``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field as dc_field
from functools import lru_cache
from typing import Final

from engine import redact
from engine.errors import Location, MessageContentError, MessageRejected

CR: Final = "\r"


@dataclass(frozen=True, slots=True)
class Delimiters:
    """The separators MSH-1/MSH-2 declare.  A separator MSH-2 leaves out (``^~\\`` without ``&``) is the field
    separator itself: a field value never holds that, so nothing is ever split or unescaped on it (the
    missing character is data, as the sender meant), and :attr:`encoding_characters` leaves it out."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str = ""
    # what an empty repetition may consist of (component and subcomponent separators, spaces): derived
    blank: str = dc_field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "blank", self.component + self.subcomponent + " ")

    @property
    def encoding_characters(self) -> str:
        """MSH-2 as declared (an ACK repeats it): the separators MSH-2 left out stay out."""
        fs = self.field
        if self.repetition != fs and self.escape != fs and self.subcomponent != fs:
            return self.component + self.repetition + self.escape + self.subcomponent + self.truncation
        out = ""
        for ch in (self.component, self.repetition, self.escape, self.subcomponent):
            if ch == fs:
                break  # MSH-2 is positional: nothing after a missing character was declared
            out += ch
        return out


DEFAULT_DELIMITERS: Final = Delimiters()

# MSH-18 (HL7 table 0211) → Python codec.  "" means ASCII with the channel's fallback.  Table 0211 names
# Python decodes as HL7 means them, then the IANA names of the same charsets (what a sender configured with
# its platform's name writes).  Not here: ISO IR14/IR87/IR159 (JIS, 7-bit ISO 2022 escape sequences),
# CNS 11643-1992 (no codec), UNICODE UTF-16/UTF-32 (not ASCII-based: MSH itself would not be ASCII).
CHARSETS: Final[dict[str, str]] = {
    "": "ascii",
    "ASCII": "ascii",
    "ISO IR6": "ascii",  # ISO 646: the ASCII graphic characters
    "8859/1": "latin-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc-kr",  # KS X 1001 in its 8-bit (EUC) form, as HAPI and NHapi read it
    "BIG-5": "big5",
    "UNICODE": "utf-8",
    "UNICODE UTF-8": "utf-8",
    # IANA names
    "US-ASCII": "ascii",
    "ISO-8859-1": "latin-1",
    "ISO-8859-2": "iso8859-2",
    "ISO-8859-3": "iso8859-3",
    "ISO-8859-4": "iso8859-4",
    "ISO-8859-5": "iso8859-5",
    "ISO-8859-6": "iso8859-6",
    "ISO-8859-7": "iso8859-7",
    "ISO-8859-8": "iso8859-8",
    "ISO-8859-9": "iso8859-9",
    "ISO-8859-15": "iso8859-15",
    "GB18030": "gb18030",
    "EUC-KR": "euc-kr",
    "BIG5": "big5",
    "UTF-8": "utf-8",
    "WINDOWS-1252": "cp1252",
    "CP1252": "cp1252",
}


def read_delimiters(text: str) -> Delimiters:
    """Delimiters from the start of an MSH/FHS/BHS segment.  AR 101 if there are none."""
    # They depend on the first 10 characters only (MSH-1, then at most 5 encoding characters and
    # what ends them): a sender repeats the same few, so cache on those.
    return _read_delimiters(text[:10])


@lru_cache(maxsize=256)
def _read_delimiters(text: str) -> Delimiters:
    if len(text) < 5 or text[3] in "\r\n":
        raise MessageRejected(
            "MSH has no field separator or encoding characters", code="101", location=Location("MSH", 1, 1)
        )
    fs = text[3]
    end = text.find(fs, 4)
    stop = len(text) if end < 0 else end
    enc = text[4:stop]
    for nl in "\r\n":
        cut = enc.find(nl)
        if cut >= 0:
            enc = enc[:cut]
    if len(enc) < 1 or len(enc) > 5 or fs in enc or fs.isalnum():
        raise MessageRejected(
            "MSH-2 encoding characters are missing or invalid", code="101", location=Location("MSH", 1, 2)
        )
    # MSH-2 declaring fewer than four characters: the missing ones are not separators (``^~\\`` without ``&``:
    # an ``&`` in a value is data).  They become the field separator, which no field value holds.
    comp = enc[0]
    rep = enc[1] if len(enc) > 1 else fs
    esc = enc[2] if len(enc) > 2 else fs
    sub = enc[3] if len(enc) > 3 else fs
    trunc = enc[4] if len(enc) > 4 else ""
    return Delimiters(fs, comp, rep, esc, sub, trunc)


def sniff_charset(raw: bytes) -> str:
    """MSH-18 read straight from the bytes (MSH itself is ASCII)."""
    start = raw.find(b"MSH")
    if start < 0 or len(raw) < start + 4:
        return ""
    fs = raw[start + 3 : start + 4]
    # the MSH line ends at the first CR or LF (searched within it: no scan of the whole message for an LF)
    end = raw.find(b"\r", start)
    if end < 0:
        end = len(raw)
    lf = raw.find(b"\n", start, end)
    if lf >= 0:
        end = lf
    fields = raw[start:end].split(fs)
    if len(fields) < 18:
        return ""
    value = fields[17]
    # MSH-18 may repeat; the first repetition names the default charset.
    if len(fields[1]) > 1:
        value = value.split(fields[1][1:2])[0]
    return value.decode("ascii", "replace").strip().upper()


# MSH-18 values declaring a single-byte charset under which valid multi-byte UTF-8 is a mislabel (a common one:
# a UTF-8 sender that fills MSH-18 with 8859/1, or leaves it empty): ASCII and Latin-1 by any of their names.
# An MSH-18 Sluice does not know is one too (decode).
UTF8_MISLABELS: Final = frozenset(name for name, codec in CHARSETS.items() if codec in ("ascii", "latin-1"))

# ESC: ISO 2022 text (JIS, ISO IR87) is 7-bit, its escape sequences switch character sets; never read as ASCII
_ESC: Final = b"\x1b"


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def utf8_mislabelled(raw: bytes) -> bool:
    """Are ``raw``'s bytes valid UTF-8 with multi-byte sequences under a declared single-byte charset (MSH-18
    ``8859/1``, ``ASCII`` or none, by any of their names) or one Sluice does not know?  Pure-ASCII bytes never
    are (decoded the same either way)."""
    if raw.isascii():
        return False
    charset = sniff_charset(raw)
    if charset not in UTF8_MISLABELS and charset in CHARSETS:
        return False
    return _is_utf8(raw)


def _declares(charset: str) -> str:
    """What MSH-18 declares, for a warning: a name Sluice decodes or a table 0211 name is quoted, anything
    else redacted (``engine.redact``: it may be what a sender misplaced there)."""
    if not charset:
        return "declares no character set (ASCII)"
    if charset in CHARSETS:
        return f"declares {charset}"
    return f"declares a character set Sluice does not decode ({redact.charset(charset)})"


def charset_fallback_warning(raw: bytes) -> tuple[str, str]:
    """The (kind, text) warning kept with a message :func:`decode` read as UTF-8 under ``utf8_fallback``
    although MSH-18 declares a single-byte charset or one Sluice does not know (:func:`utf8_mislabelled`)."""
    return (
        "charset_fallback",
        f"MSH-18: the message {_declares(sniff_charset(raw))} but its bytes are UTF-8 (multi-byte sequences); "
        "decoded as UTF-8 (turn off with the channel's source.utf8_fallback: false)",
    )


def charset_unknown_warning(raw: bytes) -> tuple[str, str]:
    """The (kind, text) warning kept with a message :func:`decode` read as ASCII because MSH-18 names a
    charset Sluice does not know and every byte is ASCII (which every ASCII-based charset reads alike)."""
    return (
        "charset_unknown",
        f"MSH-18: the message {_declares(sniff_charset(raw))} but its bytes are all ASCII, which every "
        "ASCII-based character set reads alike; decoded as ASCII",
    )


def decode_warning(raw: bytes, utf8_fallback: bool) -> tuple[str, str] | None:
    """The (kind, text) warning kept with a message :func:`decode` did not read as MSH-18 declares
    (``charset_fallback`` or ``charset_unknown``), or None.  ``raw`` must be a message ``decode`` read."""
    charset = sniff_charset(raw)
    known = charset in CHARSETS
    if known and not (utf8_fallback and charset in UTF8_MISLABELS):
        return None  # read as declared (the usual case: one look at MSH)
    if raw.isascii():
        return None if known else charset_unknown_warning(raw)
    if utf8_fallback and _is_utf8(raw):
        return charset_fallback_warning(raw)
    return None


def decode(raw: bytes, fallback: str = "latin-1", utf8_fallback: bool = False) -> str:
    """Decode message bytes by MSH-18; the raw bytes stay untouched in the store.

    Empty MSH-18 means ASCII; bytes >= 0x80 then use the channel's fallback charset.  Bytes invalid under
    the declared charset are AE 102.  An MSH-18 Sluice does not know (not in :data:`CHARSETS`): bytes that
    are all ASCII (no ESC, which would start ISO 2022 escape sequences) are decoded as ASCII, as every
    ASCII-based charset would (processing records a ``charset_unknown`` warning); other bytes are AE 103,
    unless ``utf8_fallback`` applies.
    ``utf8_fallback`` (the channel's ``source.utf8_fallback``): bytes that are valid UTF-8 with multi-byte
    sequences under MSH-18 ``8859/1``, ``ASCII``, none or an unknown name are decoded as UTF-8
    (:func:`utf8_mislabelled`; processing records the ``charset_fallback`` warning).  Pure-ASCII messages
    pay one ``isascii`` scan for it.  :func:`decode_warning` says which warning a decoded message gets.
    """
    charset = sniff_charset(raw)
    codec = CHARSETS.get(charset)
    if codec is None:
        return _decode_unknown(raw, charset, utf8_fallback)
    if utf8_fallback and charset in UTF8_MISLABELS and not raw.isascii():
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            pass  # not UTF-8: read as declared below
    if codec == "ascii":
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            if charset:
                raise MessageContentError(
                    "bytes outside ASCII although MSH-18 declares ASCII",
                    code="102",
                    location=Location("MSH", 1, 18),
                ) from None
            return raw.decode(fallback, "replace")
    try:
        return raw.decode(codec)
    except UnicodeDecodeError:
        raise MessageContentError(
            f"message bytes are not valid {charset}", code="102", location=Location("MSH", 1, 18)
        ) from None


def _decode_unknown(raw: bytes, charset: str, utf8_fallback: bool) -> str:
    """:func:`decode` under an MSH-18 that is not in :data:`CHARSETS`."""
    why = ""
    if raw.isascii():
        if _ESC not in raw:
            return raw.decode("ascii")
        why = " (its bytes hold ISO 2022 escape sequences)"
    elif utf8_fallback:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            pass
    raise MessageContentError(
        # a name from table 0211 is quoted; anything else may be what a sender misplaced there (engine.redact)
        f"unsupported character set in MSH-18: {redact.charset(charset)}{why}",
        code="103",
        location=Location("MSH", 1, 18),
    )


def normalise_newlines(text: str) -> str:
    """Segment terminators CR, LF or CRLF (mixed too) all become CR."""
    if "\n" in text:
        text = text.replace("\r\n", "\r").replace("\n", "\r")
    return text


_HEX: Final = re.compile(r"^[0-9A-Fa-f]+$")


def unescape(value: str, d: Delimiters = DEFAULT_DELIMITERS) -> str:
    """Resolve HL7 escape sequences.  Malformed escapes are kept literally."""
    esc = d.escape
    if not esc or esc not in value:
        return value
    out: list[str] = []
    i = 0
    n = len(value)
    while i < n:
        ch = value[i]
        if ch != esc:
            j = value.find(esc, i)
            if j < 0:
                out.append(value[i:])
                break
            out.append(value[i:j])
            i = j
            continue
        end = value.find(esc, i + 1)
        if end < 0:
            out.append(value[i:])
            break
        seq = value[i + 1 : end]
        rep = _escape_value(seq, d)
        if rep is None:
            # Not an escape we know: keep the escape char literally and rescan after it.
            out.append(ch)
            i += 1
            continue
        out.append(rep)
        i = end + 1
    return "".join(out)


def _escape_value(seq: str, d: Delimiters) -> str | None:
    if seq == "F":
        return d.field
    if seq in ("T", "R") and (d.subcomponent if seq == "T" else d.repetition) == d.field:
        return None  # a separator MSH-2 did not declare: kept literally
    if seq == "S":
        return d.component
    if seq == "T":
        return d.subcomponent
    if seq == "R":
        return d.repetition
    if seq == "E":
        return d.escape
    if seq == "P" and d.truncation:
        return d.truncation
    if seq in ("H", "N"):
        return ""
    if seq.startswith("X") and len(seq) >= 3 and len(seq) % 2 == 1 and _HEX.match(seq[1:]):
        data = bytes.fromhex(seq[1:])
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("latin-1")
    if seq.startswith("."):
        cmd = seq[1:3]
        if cmd in ("br", "sp"):
            return "\n"
        if cmd in ("in", "ti", "sk", "ce", "fi", "nf"):
            return ""
    return None


def escape(value: str, d: Delimiters = DEFAULT_DELIMITERS) -> str:
    """Escape delimiter characters for writing a value into a field."""
    if not value:
        return value
    specials = (d.escape, d.field, d.component, d.repetition, d.subcomponent)
    if not any(c in value for c in specials) and "\n" not in value:
        return value
    e = d.escape
    if e == d.field:  # MSH-2 declares no escape character: a delimiter in the value cannot be escaped
        out = value
        for ch in (d.field, d.component, d.repetition, d.subcomponent):
            out = out.replace(ch, " ")
        return out.replace("\n", " ")
    out = value.replace(e, f"{e}E{e}")
    out = out.replace(d.field, f"{e}F{e}").replace(d.component, f"{e}S{e}")
    out = out.replace(d.repetition, f"{e}R{e}").replace(d.subcomponent, f"{e}T{e}")
    return out.replace("\n", f"{e}.br{e}")


class Rep:
    """One repetition of a field: components of subcomponents, unescaped on access.

    The first access splits the repetition once into its components (subcomponent 1 of each,
    unescaped) and keeps that list, so mappers reading many components pay for one split."""

    __slots__ = ("_d", "_plain", "_raw", "_split", "_u")

    def __init__(self, raw: str, d: Delimiters, comps: list[str] | None = None):
        self._raw = raw
        self._d = d
        # ``comps``: the caller already split a value it knows has no subcomponents or escapes
        self._split: list[str] | None = comps
        self._u: list[str] | None = comps
        self._plain = comps is not None

    @property
    def raw(self) -> str:
        return self._raw

    def _comps(self) -> list[str]:
        if self._split is None:
            d = self._d
            raw = self._raw
            self._split = raw.split(d.component)
            # no subcomponents and nothing to unescape: components are returned as they are
            self._plain = d.subcomponent not in raw and (not d.escape or d.escape not in raw)
        return self._split

    def _unescaped(self) -> list[str]:
        """Components 1..n (subcomponent 1 of each, unescaped), computed once."""
        u = self._u
        if u is None:
            comps = self._split
            if comps is None:  # self._comps() inlined: this is the hot path of c/cs/hd
                d = self._d
                raw = self._raw
                comps = self._split = raw.split(d.component)
                self._plain = d.subcomponent not in raw and (not d.escape or d.escape not in raw)
            if self._plain:
                u = comps
            else:
                d = self._d
                sub = d.subcomponent
                u = [unescape(x.split(sub, 1)[0] if sub in x else x, d) for x in comps]
            self._u = u
        return u

    def c(self, i: int = 1, s: int = 1) -> str:
        """Component ``i``, subcomponent ``s`` (1-based), unescaped; "" when absent."""
        if s == 1:
            u = self._u
            if u is None:
                u = self._unescaped()
            return u[i - 1] if 0 < i <= len(u) else ""
        comps = self._split
        if comps is None:
            comps = self._comps()
        if self._plain or not 0 < i <= len(comps):
            return ""
        comp = comps[i - 1]
        if self._d.subcomponent in comp:
            subs = comp.split(self._d.subcomponent)
            if s > len(subs):
                return ""
            return unescape(subs[s - 1], self._d)
        return ""

    def cs(self, n: int) -> list[str]:
        """Components 1..``n`` at least (subcomponent 1 of each, unescaped), padded with "" — for
        mappers that read many components of one value: one call instead of ``n`` calls of :meth:`c`.
        The list may be longer than ``n``; treat it as read-only."""
        u = self._u
        if u is None:
            u = self._unescaped()
        k = len(u)
        if k >= n:
            return u
        u = self._u = u + [""] * (n - k)
        return u

    def hd(self, i: int) -> tuple[str, str, str]:
        """Subcomponents 1-3 of component ``i`` (an HD: namespace, universal id, universal id type),
        unescaped; "" when absent.  Same as ``(c(i, 1), c(i, 2), c(i, 3))`` in one call."""
        u = self._u
        if u is None:
            u = self._unescaped()
        first = u[i - 1] if 0 < i <= len(u) else ""
        if self._plain:
            return first, "", ""
        comps = self._split
        if comps is None or not 0 < i <= len(comps) or self._d.subcomponent not in comps[i - 1]:
            return first, "", ""
        return first, self.c(i, 2), self.c(i, 3)

    def subs(self, i: int) -> list[str]:
        """All subcomponents of component ``i``, unescaped."""
        comps = self._comps()
        if i > len(comps):
            return []
        return [unescape(x, self._d) for x in comps[i - 1].split(self._d.subcomponent)]

    def __len__(self) -> int:
        return len(self._comps())

    def __bool__(self) -> bool:
        raw = self._raw
        if not raw:
            return False
        return bool(raw.strip(self._d.blank))

    @property
    def text(self) -> str:
        """The whole repetition unescaped (components still joined by their separator)."""
        if self._plain:  # known to hold no escape character
            return self._raw
        return unescape(self._raw, self._d)

    def __repr__(self) -> str:
        return f"Rep({self._raw!r})"


_NO_REPS: Final[list[Rep]] = []

_LOCS: Final[dict[tuple[str, int, int | None, int | None], Location]] = {}
_LOCS_MAX: Final = 8192


class Segment:
    """One segment.  ``seg[n]`` is field ``n`` as raw text, numbered as in the standard.

    Repetitions and locations are built once per field and cached (a segment is read many times
    during a conversion); treat the lists ``reps`` returns as read-only."""

    __slots__ = ("_d", "_empty", "_fc", "_plain", "_reps", "fields", "name", "sequence")

    def __init__(self, fields: list[str], d: Delimiters, sequence: int, plain: bool = False):
        self.fields = fields
        self.name = fields[0]
        self._d = d
        self.sequence = sequence
        # plain: the segment has no escape and no subcomponent characters (the parser knows from the line),
        # so components can be split straight from the raw text
        self._plain = plain
        # built on first use: most fields are read once (or never)
        self._reps: dict[int, list[Rep]] | None = None
        self._empty: Rep | None = None
        self._fc: dict[int, list[str]] | None = None  # field -> components of its first repetition (see get)

    def __getitem__(self, n: int) -> str:
        fields = self.fields
        return fields[n] if n < len(fields) else ""

    def reps(self, n: int) -> list[Rep]:
        """Field ``n`` split into repetitions (empty list when the field is empty)."""
        cache = self._reps
        if cache is None:
            cache = self._reps = {}
        else:
            cached = cache.get(n)
            if cached is not None:
                return cached
        fields = self.fields
        value = fields[n] if 0 <= n < len(fields) else ""
        if not value:
            out: list[Rep] = _NO_REPS
        elif n < 3 and self.name in HEADER_SEGMENTS and n in (1, 2):
            out = [Rep(value, _LITERAL)]
        else:
            d = self._d
            if self._plain:
                comp = d.component
                out = (
                    [Rep(r, d, r.split(comp)) for r in value.split(d.repetition)]
                    if d.repetition in value
                    else [Rep(value, d, value.split(comp))]
                )
            else:
                out = (
                    [Rep(r, d) for r in value.split(d.repetition)]
                    if d.repetition in value
                    else [Rep(value, d)]
                )
        cache[n] = out
        return out

    def rep(self, n: int, r: int = 1) -> Rep:
        """Repetition ``r`` of field ``n``; an empty Rep when absent."""
        cache = self._reps
        reps = None if cache is None else cache.get(n)
        if reps is None:
            reps = self.reps(n)
        if 0 < r <= len(reps):
            return reps[r - 1]
        empty = self._empty
        if empty is None:
            empty = self._empty = Rep("", self._d)
        return empty

    def get(self, n: int, c: int = 1, s: int = 1, r: int = 1) -> str:
        if r == 1 and s == 1:
            fc = self._fc
            if fc is None:
                fc = self._fc = {}
                u = None
            else:
                u = fc.get(n)
            if u is None and self._plain:
                fields = self.fields
                value = fields[n] if 0 <= n < len(fields) else ""
                if not value:
                    return ""
                d = self._d
                if d.repetition in value:
                    value = value.split(d.repetition, 1)[0]
                u = fc[n] = value.split(d.component)
            elif u is None:
                reps = self.reps(n)
                u = fc[n] = reps[0]._unescaped() if reps else []
            return u[c - 1] if 0 < c <= len(u) else ""
        reps = self.reps(n)
        return reps[r - 1].c(c, s) if 0 < r <= len(reps) else ""

    def cs(self, n: int, k: int) -> list[str]:
        """Components 1..``k`` (at least) of the first repetition of field ``n``: see :meth:`Rep.cs`."""
        reps = self.reps(n)
        return reps[0].cs(k) if reps else [""] * k

    def rep_comps(self, n: int, k: int) -> list[list[str]]:
        """Components 1..``k`` (at least; padded with "", subcomponent 1 of each, unescaped) of every
        non-empty repetition of field ``n`` (a repetition is empty as :meth:`Rep.__bool__` says).

        For mappers that only read components: on a plain segment no Rep objects are built.
        Treat the lists as read-only."""
        if self._plain and (self._reps is None or n not in self._reps):
            fields = self.fields
            value = fields[n] if 0 <= n < len(fields) else ""
            if not value:
                return []
            d = self._d
            blank = d.component + d.subcomponent + " "
            comp = d.component
            out: list[list[str]] = []
            for r in value.split(d.repetition) if d.repetition in value else (value,):
                if not r or not r.strip(blank):
                    continue
                c = r.split(comp)
                if len(c) < k:
                    c += [""] * (k - len(c))
                out.append(c)
            return out
        return [r.cs(k) for r in self.reps(n) if r]

    def value(self, n: int) -> str:
        """Field ``n`` unescaped as a whole (first repetition)."""
        if self._plain:  # no escapes: the raw text of the first repetition, without building Reps
            fields = self.fields
            value = fields[n] if 0 <= n < len(fields) else ""
            rs = self._d.repetition
            return value.split(rs, 1)[0] if rs in value else value
        return self.rep(n).text

    def loc(self, field: int | None = None, component: int | None = None) -> Location:
        # Locations are frozen and equal by value: share them across segments and messages
        key = (self.name, self.sequence, field, component)
        hit = _LOCS.get(key)
        if hit is None:
            if len(_LOCS) >= _LOCS_MAX:
                _LOCS.clear()
            hit = _LOCS[key] = Location(self.name, self.sequence, field, None, component)
        return hit

    def __len__(self) -> int:
        return len(self.fields)

    def __repr__(self) -> str:
        return f"Segment({self.name}, {len(self.fields) - 1} fields)"


_LITERAL: Final = Delimiters("\x00", "\x01", "\x02", "\x03", "\x04", "")

_PATH: Final = re.compile(
    r"^(?P<seg>[A-Z][A-Z0-9]{2})(?:\((?P<occ>\d+)\))?"
    r"(?:-(?P<field>\d+)(?:\((?P<rep>\d+)\))?(?:\.(?P<comp>\d+)(?:\.(?P<sub>\d+))?)?)?$"
)


@lru_cache(maxsize=1024)
def parse_path(path: str) -> tuple[str, int, int | None, int, int | None, int | None]:
    """``"OBX(2)-5(1).3.1"`` → (segment, occurrence, field, repetition, component, subcomponent)."""
    m = _PATH.match(path.strip())
    if m is None:
        raise ValueError(
            f"bad HL7 path {path!r}: expected SEG[(n)]-field[(rep)][.component[.subcomponent]], e.g. PID-3.1"
        )
    g = m.groupdict()
    return (
        g["seg"],
        int(g["occ"] or 1),
        int(g["field"]) if g["field"] else None,
        int(g["rep"] or 1),
        int(g["comp"]) if g["comp"] else None,
        int(g["sub"]) if g["sub"] else None,
    )


def _plain_header(msg: Message) -> bool:
    """True when MSH fields 3-16 hold no escape, repetition or subcomponent characters (the usual case)."""
    d = msg.delimiters
    text = d.field.join(msg.msh.fields[3:17])
    return d.escape not in text and d.repetition not in text and d.subcomponent not in text


class Message:
    """A parsed HL7 v2 message.  Build with :func:`parse`."""

    __slots__ = ("_hdr", "_index", "delimiters", "segments", "text")

    def __init__(self, text: str, delimiters: Delimiters, segments: list[Segment]):
        self.text = text
        self.delimiters = delimiters
        self.segments = segments
        self._index: dict[str, list[Segment]] | None = None
        self._hdr: dict[str, str] | None = None

    # -- navigation -------------------------------------------------------
    def all(self, name: str) -> list[Segment]:
        """Every segment called ``name``, in order."""
        if self._index is None:
            idx: dict[str, list[Segment]] = {}
            for seg in self.segments:  # (not setdefault(name, []): that builds a list for every segment)
                same = idx.get(seg.name)
                if same is None:
                    idx[seg.name] = [seg]
                else:
                    same.append(seg)
            self._index = idx
        return self._index.get(name, [])

    def first(self, name: str) -> Segment | None:
        segs = self.all(name)
        return segs[0] if segs else None

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments)

    def __getitem__(self, path: str) -> str:
        """``msg["PID-3.1"]``: the unescaped value at a path, "" when absent."""
        seg_name, occ, field, rep, comp, sub = parse_path(path)
        segs = self.all(seg_name)
        if occ > len(segs):
            return ""
        seg = segs[occ - 1]
        if field is None:
            return seg.name
        if comp is None:
            return seg.rep(field, rep).text
        return seg.rep(field, rep).c(comp, sub or 1)

    def get(self, path: str, default: str = "") -> str:
        return self[path] or default

    # -- header shortcuts (read once, on first use: intake reads them for every message) ----
    def _header(self) -> dict[str, str]:
        hdr = self._hdr
        if hdr is None and _plain_header(self):
            f = self.msh.fields
            if len(f) < 17:  # (no nested helper: a closure is a Python-level call in the compiled build)
                f = f + [""] * (17 - len(f))
            cs = self.delimiters.component
            parts = f[9].split(cs)
            if len(parts) < 3:
                parts += [""] * (3 - len(parts))
            hdr = self._hdr = {
                "control_id": f[10].strip(),
                "type": parts[0].strip().upper(),
                "trigger": parts[1].strip().upper(),
                "structure": parts[2].strip().upper(),
                "version": f[12].split(cs, 1)[0].strip(),
                "processing_id": f[11].split(cs, 1)[0].strip().upper(),
                "accept_ack": f[15].strip().upper(),
                "app_ack": f[16].strip().upper(),
                "sending_app": f[3],
                "sending_facility": f[4],
            }
        if hdr is None:
            h = self.msh
            typ = h.rep(9)
            hdr = self._hdr = {
                "control_id": h.value(10).strip(),
                "type": typ.c(1).strip().upper(),
                "trigger": typ.c(2).strip().upper(),
                "structure": typ.c(3).strip().upper(),
                "version": h.get(12, 1).strip(),
                "processing_id": h.get(11, 1).strip().upper(),
                "accept_ack": h.get(15).strip().upper(),
                "app_ack": h.get(16).strip().upper(),
                "sending_app": h.rep(3).text,
                "sending_facility": h.rep(4).text,
            }
        return hdr

    @property
    def msh(self) -> Segment:
        return self.segments[0]

    @property
    def control_id(self) -> str:
        return self._header()["control_id"]

    @property
    def message_type(self) -> str:
        return self._header()["type"]

    @property
    def trigger(self) -> str:
        return self._header()["trigger"]

    @property
    def structure(self) -> str:
        return self._header()["structure"]

    @property
    def version(self) -> str:
        return self._header()["version"]

    @property
    def processing_id(self) -> str:
        return self._header()["processing_id"]

    @property
    def accept_ack_type(self) -> str:
        return self._header()["accept_ack"]

    @property
    def app_ack_type(self) -> str:
        return self._header()["app_ack"]

    @property
    def sending_application(self) -> str:
        return self._header()["sending_app"]

    @property
    def sending_facility(self) -> str:
        return self._header()["sending_facility"]

    def __repr__(self) -> str:
        return f"Message({self.message_type}^{self.trigger}, {len(self.segments)} segments)"


HEADER_SEGMENTS: Final = ("MSH", "FHS", "BHS")


def parse(text: str) -> Message:
    """Parse one message (text already decoded).  Raises MessageRejected (AR) when it has no usable MSH."""
    text = normalise_newlines(text).strip("\r\n\x00 \t\x0b\x1c")
    if not text:
        raise MessageRejected("empty message", code="100", location=Location("MSH", 1))
    if not text.startswith("MSH"):
        raise MessageRejected(
            "message does not start with an MSH segment", code="100", location=Location("MSH", 1)
        )
    d = read_delimiters(text)
    fs = d.field
    # a line without escape or subcomponent characters is "plain" (see Segment); a separator MSH-2 left out is
    # the field separator (never in a field value): checked as NUL then (a line holding one is just not plain)
    sub = d.subcomponent if d.subcomponent != fs else "\x00"
    esc = d.escape if d.escape != fs else sub
    segments: list[Segment] = []
    counts: dict[str, int] = {}
    for line in text.split(CR):
        if not line:
            continue
        fields = line.split(fs)
        name = fields[0]
        if not name.isalnum():
            name = name.strip()
        if len(name) != 3:
            # Garbage line: keep it under a name that never matches a real segment.
            name = name[:3].upper() if name else "???"
        fields[0] = name
        if name in HEADER_SEGMENTS:
            # MSH-1 is the field separator itself; shift so seg[n] is field n.
            fields.insert(1, fs)
        seq = counts[name] = counts.get(name, 0) + 1
        segments.append(
            Segment(fields, d, seq, sub not in line and esc not in line and name not in HEADER_SEGMENTS)
        )
    return Message(text, d, segments)


def parse_bytes(raw: bytes, fallback: str = "latin-1", utf8_fallback: bool = False) -> Message:
    """Decode by MSH-18 (:func:`decode`), then parse."""
    return parse(decode(raw, fallback, utf8_fallback))


def split_batch(text: str) -> list[str]:
    """Split an FHS/BHS batch into its messages (each starting at MSH).  A single message gives itself."""
    text = normalise_newlines(text)
    if not (text.startswith("FHS") or text.startswith("BHS")):
        return [text]
    messages: list[list[str]] = []
    for line in text.split(CR):
        if line.startswith("MSH"):
            messages.append([line])
        elif line[:3] in ("FHS", "BHS", "BTS", "FTS") or not line:
            continue
        elif messages:
            messages[-1].append(line)
    return [CR.join(m) + CR for m in messages]
