"""Safe text out of the engine: escaped for terminals, and header values quoted only once validated.

Two rules (issue #12):

* :func:`printable`: every value the CLI prints in a table, or the console log renders, has its
  control characters escaped (``\\x1b``, ``\\n``...), so a stored control id can neither start a
  fake row nor send a terminal escape sequence.
* Reasons, ACK error text and log fields quote a header value only when it is a known code: a message
  type from HL7 table 0076 (or the channel's accepted types), a trigger event from table 0003, a
  processing id from table 0103, a version from table 0104, a character set from table 0211.  Anything
  else is described as ``invalid (N characters)``: a sender who puts a patient's name in MSH-9 or
  MSH-18 never gets it into the store's reason column, the ACK's ERR segment or the log.
"""

from __future__ import annotations

import re
from collections.abc import Collection

# HL7 table 0076 (message type), every version 2.1 to 2.8.2.
_TABLE_0076 = """
    ACK ADR ADT ARD BAR BPS BRP BRT BTS CCF CCI CCM CCQ CCU CQU CRM CSU DBC DBU DEL DEO DER DFT DOC
    DPR DRC DSR EAC EAN EAR EDR EHC EQQ ERP ESR ESU INR INU LSR LSU MCF MDM MFD MFK MFN MFQ MFR NMD
    NMQ NMR OMB OMD OMG OMI OML OMN OMP OMQ OMS OPL OPR OPU ORA ORB ORD ORF ORG ORI ORL ORM ORN ORP
    ORR ORS ORU ORX OSM OSQ OSR OSU OUL PEX PGL PIN PMU PPG PPP PPR PPT PPV PRR PTR QBP QCK QCN QRY
    QSB QSX QVR RAR RAS RCI RCL RDE RDR RDS RDY REF RER RGR RGV ROR RPA RPI RPL RPR RQA RQC RQI RQP
    RQQ RRA RRD RRE RRG RRI RSP RTB SCN SDN SDR SIU SLN SLR SMD SPQ SQM SQR SRM SRR SSR SSU STC STI
    SUR TBR TCR TCU UDM VQQ VXQ VXR VXU VXX
"""
MESSAGE_TYPES = frozenset(_TABLE_0076.split())

# HL7 table 0003 (event type), every version 2.1 to 2.8.2.
_TABLE_0003 = """
    A01 A02 A03 A04 A05 A06 A07 A08 A09 A10 A11 A12 A13 A14 A15 A16 A17 A18 A19 A20 A21 A22 A23 A24
    A25 A26 A27 A28 A29 A30 A31 A32 A33 A34 A35 A36 A37 A38 A39 A40 A41 A42 A43 A44 A45 A46 A47 A48
    A49 A50 A51 A52 A53 A54 A55 A60 A61 A62 B01 B02 B03 B04 B05 B06 B07 B08 C01 C02 C03 C04 C05 C06
    C07 C08 C09 C10 C11 C12 CNQ E01 E02 E03 E04 E10 E12 E13 E15 E20 E21 E22 E24 E30 E31 I01 I02 I03
    I04 I05 I06 I07 I08 I09 I10 I11 I12 I13 I14 I15 I16 I17 I18 I19 I20 I21 I22 J01 J02 K11 K13 K15
    K21 K22 K23 K24 K25 K31 K32 K33 K34 M01 M02 M03 M04 M05 M06 M07 M08 M09 M10 M11 M12 M13 M14 M15
    M16 M17 M18 N01 N02 O01 O02 O03 O04 O05 O06 O07 O08 O09 O10 O11 O12 O13 O14 O15 O16 O17 O18 O19
    O20 O21 O22 O23 O24 O25 O26 O27 O28 O29 O30 O31 O32 O33 O34 O35 O36 O37 O38 O39 O40 O41 O42 O43
    O44 O45 O46 O47 O48 P01 P02 P03 P04 P05 P06 P07 P08 P09 P10 P11 P12 PC1 PC2 PC3 PC4 PC5 PC6 PC7
    PC8 PC9 PCA PCB PCC PCD PCE PCF PCG PCH PCJ PCK PCL Q01 Q02 Q03 Q04 Q05 Q06 Q07 Q08 Q09 Q11 Q13
    Q15 Q16 Q17 Q21 Q22 Q23 Q24 Q25 Q26 Q27 Q28 Q29 Q30 Q31 Q32 Q33 Q34 R01 R02 R03 R04 R05 R06 R07
    R08 R09 R0R R21 R22 R23 R24 R25 R26 R30 R31 R32 R33 R40 R41 RAR RDR RER RGR ROR S01 S02 S03 S04
    S05 S06 S07 S08 S09 S10 S11 S12 S13 S14 S15 S16 S17 S18 S19 S20 S21 S22 S23 S24 S25 S26 S27 S28
    S29 S30 S31 S32 S33 S34 S35 S36 S37 T01 T02 T03 T04 T05 T06 T07 T08 T09 T10 T11 T12 U01 U02 U03
    U04 U05 U06 U07 U08 U09 U10 U11 U12 U13 V01 V02 V03 V04 W01 W02 Z73 Z74 Z75 Z76 Z77 Z78 Z79 Z80
    Z81 Z82 Z83 Z84 Z85 Z86 Z87 Z88 Z89 Z90 Z91 Z92 Z93 Z94 Z95 Z96 Z97 Z98 Z99
"""
TRIGGERS = frozenset(_TABLE_0003.split())

PROCESSING_IDS = frozenset({"P", "T", "D"})  # table 0103
VERSIONS = frozenset(
    {"2.0", "2.0D", "2.1", "2.2", "2.3", "2.3.1", "2.3.2", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8",
     "2.8.1", "2.8.2", "2.9"}
)  # table 0104  # fmt: skip
CHARSETS = frozenset(
    {"ASCII", "8859/1", "8859/2", "8859/3", "8859/4", "8859/5", "8859/6", "8859/7", "8859/8", "8859/9",
     "8859/15", "ISO IR6", "ISO IR14", "ISO IR87", "ISO IR159", "GB 18030-2000", "KS X 1001",
     "CNS 11643-1992", "BIG-5", "UNICODE", "UNICODE UTF-8", "UNICODE UTF-16", "UNICODE UTF-32",
     "WINDOWS-1252", "CP1252", "UTF-8", "US-ASCII", "ISO-8859-1", "ISO-8859-2", "ISO-8859-3", "ISO-8859-4",
     "ISO-8859-5", "ISO-8859-6", "ISO-8859-7", "ISO-8859-8", "ISO-8859-9", "ISO-8859-15", "GB18030", "EUC-KR",
     "BIG5"}
)  # table 0211, plus the names engine/hl7.py accepts (tests/engine/test_hl7.py checks)  # fmt: skip

# C0 and C1 controls, DEL, and the Unicode line/paragraph separators and bidirectional controls
# (text that reorders what a terminal shows).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match[str]) -> str:
    ch = m.group()
    named = _NAMED.get(ch)
    if named is not None:
        return named
    n = ord(ch)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


def printable(value: object, keep: str = "") -> str:
    """``value`` as text with every control character escaped (except those in ``keep``, e.g. ``"\\n"``)."""
    text = value if isinstance(value, str) else str(value)
    if not _UNSAFE.search(text):
        return text
    if keep:
        return "".join(ch if ch in keep else _UNSAFE.sub(_escape, ch) for ch in text)
    return _UNSAFE.sub(_escape, text)


def invalid(value: str) -> str:
    """How a value that is not a known code is described: its length, never its content."""
    return f"invalid ({len(value)} characters)"


def code(value: str, known: Collection[str], *extra: Collection[str]) -> str:
    """``value`` itself when it is a known code (in ``known`` or one of ``extra``), else :func:`invalid`."""
    if value in known or any(value in e for e in extra):
        return value
    return invalid(value)


def message_type(value: str, *accepted: Collection[str]) -> str:
    """MSH-9.1 for a reason or a log field (table 0076, or a type the channel accepts)."""
    return code(value, MESSAGE_TYPES, *accepted)


def trigger(value: str, *accepted: Collection[str]) -> str:
    """MSH-9.2 for a reason or a log field (table 0003, or a trigger the channel accepts)."""
    return code(value, TRIGGERS, *accepted)


def type_and_trigger(mtype: str, trig: str) -> str:
    """``ADT^A01`` for a log field; each part validated (an empty part stays empty)."""
    t = message_type(mtype) if mtype else ""
    g = trigger(trig) if trig else ""
    return f"{t}^{g}"


def charset(value: str) -> str:
    """MSH-18 for a reason (table 0211 names)."""
    return code(value, CHARSETS)


_CONTROL_ID = re.compile(r"^[\x20-\x7e]{1,199}$")


def control_id(value: str) -> str:
    """MSH-10 for a log field: printable ASCII, at most 199 characters (HL7's limit), else :func:`invalid`."""
    return value if _CONTROL_ID.match(value) else invalid(value)
