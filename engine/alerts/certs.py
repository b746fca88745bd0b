"""When does a certificate file expire?  (PEM or DER, first certificate = the leaf; no extra dependency.)

X.509 (RFC 5280): Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
serialNumber INTEGER, signature AlgorithmIdentifier, issuer Name, validity SEQUENCE { notBefore Time,
notAfter Time }, ... }, ... }; a Time is a UTCTime (YYMMDDHHMMSSZ) or a GeneralizedTime (YYYYMMDDHHMMSSZ).
"""

from __future__ import annotations

import base64
import re
from calendar import timegm
from pathlib import Path

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)


class CertError(ValueError):
    pass


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of the value, end of the value) of the DER element at ``pos``."""
    if pos + 2 > len(data):
        raise CertError("truncated certificate")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise CertError("bad length in certificate")
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise CertError("truncated certificate")
    return tag, pos, pos + length


def _time(tag: int, raw: bytes) -> float:
    text = raw.decode("ascii", "replace")
    if tag == 0x17 and re.fullmatch(r"\d{12}Z", text):  # UTCTime: 50-99 → 19xx
        year = int(text[:2])
        year += 1900 if year >= 50 else 2000
        rest = text[2:]
    elif tag == 0x18 and re.fullmatch(r"\d{14}Z", text):
        year, rest = int(text[:4]), text[4:]
    else:
        raise CertError(f"unreadable validity time {text!r}")
    mo, d, h, mi, s = (int(rest[i : i + 2]) for i in range(0, 10, 2))
    return float(timegm((year, mo, d, h, mi, s, 0, 0, 0)))


def not_after(der: bytes) -> float:
    """The notAfter of a DER certificate, as epoch seconds."""
    tag, start, _ = _tlv(der, 0)
    if tag != 0x30:
        raise CertError("not a certificate")
    tag, pos, tbs_end = _tlv(der, start)  # tbsCertificate
    if tag != 0x30:
        raise CertError("not a certificate")
    tag, _, end = _tlv(der, pos)
    if tag == 0xA0:  # explicit version
        pos = end
    for _ in range(3):  # serialNumber, signature, issuer
        _, _, pos = _tlv(der, pos)
    tag, vpos, _ = _tlv(der, pos)  # validity
    if tag != 0x30 or pos >= tbs_end:
        raise CertError("no validity in certificate")
    _, _, after = _tlv(der, vpos)  # notBefore
    tag, s, e = _tlv(der, after)
    return _time(tag, der[s:e])


def file_not_after(path: str | Path) -> float:
    """The notAfter of the first certificate in a PEM or DER file."""
    data = Path(path).read_bytes()
    m = _PEM.search(data)
    if m:
        try:
            der = base64.b64decode(b"".join(m.group(1).split()), validate=True)
        except ValueError as exc:
            raise CertError("bad base64 in PEM certificate") from exc
    elif b"-----BEGIN" in data:
        raise CertError("no CERTIFICATE block in the file")
    else:
        der = data
    return not_after(der)
