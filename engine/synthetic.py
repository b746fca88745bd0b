"""Synthetic HL7 v2 messages: ``sluice generate --type ADT^A01 --count N [--patients P] [--seed S]``.

Made-up people only (invented surnames such as ``Testperson``, ``555-01xx`` phone numbers reserved for
fiction, ``Example`` streets), valid for the converter: every type here converts to FHIR without an error
(tests/engine/test_synthetic.py converts each).  Deterministic: the same seed, type, count and patients
give the same bytes, because every value, time stamps included, comes from a seeded ``random.Random`` and
a fixed base date, never from the clock.

``--patients P`` draws the messages from P people (MRNs ``SYN000001``...), so a load test can send many
messages for few patients (one ordered lane per patient) or one each.  Each message has its own control
id (MSH-10) and, for ADT, its own visit; ORU and SIU messages get their own order and appointment ids.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

# Message type → triggers this module makes (all converted by transforms/).
TRIGGERS: dict[str, tuple[str, ...]] = {
    "ADT": ("A01", "A02", "A03", "A04", "A05", "A06", "A07", "A08", "A11", "A13", "A28", "A31"),
    "ORU": ("R01",),
    "SIU": ("S12", "S13", "S14", "S15", "S16", "S17", "S26"),
}
_STRUCTURE = {
    "A01": "ADT_A01", "A02": "ADT_A02", "A03": "ADT_A03", "A04": "ADT_A01", "A05": "ADT_A05",
    "A06": "ADT_A06", "A07": "ADT_A06", "A08": "ADT_A01", "A11": "ADT_A09", "A13": "ADT_A01",
    "A28": "ADT_A05", "A31": "ADT_A05", "R01": "ORU_R01",
}  # fmt: skip
_SIU_STATUS = {"S15": "Cancelled", "S16": "Cancelled", "S17": "Deleted", "S26": "Noshow"}

FAMILY = (
    "Testperson",
    "Sampleton",
    "Synthetica",
    "Mockwell",
    "Fakely",
    "Dummond",
    "Placeholder",
    "Exampleton",
)
GIVEN_F = ("Alex", "Jordan", "Riley", "Morgan", "Casey", "Avery", "Quinn", "Rowan")
GIVEN_M = ("Sam", "Taylor", "Jamie", "Drew", "Parker", "Reese", "Skyler", "Emery")
STREETS = ("Example Way", "Sample Street", "Test Lane", "Fiction Road", "Synthetic Avenue", "Mock Court")
CITIES = (("Springfield", "OR", "97477"), ("Eugene", "OR", "97401"), ("Salem", "OR", "97301"))
_PROVIDERS = (
    ("1234567893", "Carer", "Casey"),
    ("1245319599", "Healer", "Harper"),
    ("1356209087", "Doctor", "Dana"),
)
_UNITS = ("4N^401^A^NORTH", "4N^402^B^NORTH", "3W^310^A^WEST", "ICU^01^A^EAST")
# (LOINC, display, unit, low, high): a basic metabolic panel's analytes
_ANALYTES = (
    ("2345-7", "Glucose", "mg/dL", 70, 99),
    ("2160-0", "Creatinine", "mg/dL", 0.6, 1.3),
    ("2951-2", "Sodium", "mmol/L", 136, 145),
    ("2823-3", "Potassium", "mmol/L", 3.5, 5.1),
)
BASE = datetime(2025, 1, 6, 8, 0, 0)  # fixed: no clock in the output


@dataclass(frozen=True)
class Person:
    mrn: str
    family: str
    given: str
    middle: str
    dob: str
    sex: str
    street: str
    city: tuple[str, str, str]
    phone: str


def people(count: int, rng: random.Random) -> list[Person]:
    out = []
    for n in range(1, count + 1):
        sex = rng.choice("FM")
        out.append(
            Person(
                mrn=f"SYN{n:06d}",
                family=rng.choice(FAMILY),
                given=rng.choice(GIVEN_F if sex == "F" else GIVEN_M),
                middle=rng.choice("ABCDEFGHJKLMNPRSTW"),
                dob=f"{rng.randint(1935, 2020)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}",
                sex=sex,
                street=f"{rng.randint(1, 999)} {rng.choice(STREETS)}",
                city=rng.choice(CITIES),
                phone=f"55501{rng.randint(0, 99):02d}",
            )
        )
    return out


def parse_type(text: str) -> tuple[str, str]:
    """``ADT^A01`` → (``ADT``, ``A01``); a ``ValueError`` says what is supported."""
    mtype, _, trigger = text.strip().upper().partition("^")
    if mtype not in TRIGGERS or trigger not in TRIGGERS[mtype]:
        raise ValueError(f"cannot generate {text!r}; supported: {', '.join(supported())}")
    return mtype, trigger


def supported() -> list[str]:
    return [f"{t}^{tr}" for t, trs in TRIGGERS.items() for tr in trs]


def generate(
    message_type: str, count: int, patients: int | None = None, seed: int = 0, facility: str = "SYNTHCLINIC"
) -> Iterator[str]:
    """``count`` messages of ``message_type`` (``ADT^A01``...), each a string with CR segment ends."""
    mtype, trigger = parse_type(message_type)
    rng = random.Random(f"{seed}|{mtype}^{trigger}")
    cohort = people(max(1, patients or count), random.Random(f"{seed}|people"))
    for n in range(count):
        person = cohort[n % len(cohort)]
        when = BASE + timedelta(minutes=17 * n + rng.randint(0, 16))
        maker = {"ADT": _adt, "ORU": _oru, "SIU": _siu}[mtype]
        yield "\r".join(maker(trigger, n, person, when, rng, facility)) + "\r"


def _ts(dt: datetime) -> str:
    return dt.strftime("%Y%m%d%H%M%S")


def _msh(mtype: str, trigger: str, structure: str, when: datetime, n: int, facility: str) -> str:
    return (
        f"MSH|^~\\&|SLUICEGEN|{facility}|SLUICE|HOSP|{_ts(when)}||{mtype}^{trigger}^{structure}|"
        f"GEN{mtype}{trigger}{n + 1:07d}|P|2.5.1"
    )


def _pid(p: Person, facility: str) -> str:
    city, state, zip_ = p.city
    return (
        f"PID|1||{p.mrn}^^^{facility}^MR||{p.family}^{p.given}^{p.middle}||{p.dob}|{p.sex}|||"
        f"{p.street}^^{city}^{state}^{zip_}^USA^H||^PRN^PH^^1^541^{p.phone}"
    )


def _provider(rng: random.Random) -> str:
    npi, family, given = rng.choice(_PROVIDERS)
    return f"{npi}^{family}^{given}^^^Dr^^^NPI"


def _adt(trigger: str, n: int, p: Person, when: datetime, rng: random.Random, facility: str) -> list[str]:
    admit = when - timedelta(days=rng.randint(0, 5), minutes=rng.randint(5, 600))
    klass = "O" if trigger in ("A04", "A05", "A28", "A31") else "I"
    pv1_45 = f"|{_ts(when - timedelta(minutes=rng.randint(1, 30)))}" if trigger == "A03" else ""
    disposition = "01" if trigger == "A03" else ""
    location = rng.choice(_UNITS) if klass == "I" else f"CLINIC^^^{facility}"
    pv1 = (
        f"PV1|1|{klass}|{location}||||{_provider(rng)}|||MED|||||||||"
        f"V{n + 1:07d}^^^{facility}^VN|||||||||||||||||{disposition}||||||||{_ts(admit)}{pv1_45}"
    )
    segs = [
        _msh("ADT", trigger, _STRUCTURE[trigger], when, n, facility),
        f"EVN|{trigger}|{_ts(when)}",
        _pid(p, facility),
    ]
    segs.append(pv1)
    if trigger == "A01" and rng.random() < 0.5:
        segs.append(f"DG1|1|I10|R07.9^Chest pain, unspecified^I10||{_ts(admit)}|A")
    return segs


def _oru(trigger: str, n: int, p: Person, when: datetime, rng: random.Random, facility: str) -> list[str]:
    collected = when - timedelta(hours=rng.randint(1, 6))
    segs = [
        _msh("ORU", trigger, "ORU_R01", when, n, facility),
        _pid(p, facility),
        f"OBR|1|ORD{n + 1:07d}^{facility}|FIL{n + 1:07d}^{facility}LAB|51990-0^Basic metabolic panel^LN|||"
        f"{_ts(collected)}|||||||||||||||{_ts(when)}|||F",
    ]
    for i, (code, name, unit, low, high) in enumerate(_ANALYTES, 1):
        span = float(high) - float(low)
        value = round(float(low) + span * rng.uniform(-0.3, 1.3), 1)
        flag = "H" if value > high else "L" if value < low else "N"
        segs.append(
            f"OBX|{i}|NM|{code}^{name}^LN||{value:g}|{unit}^{unit}^UCUM|{low}-{high}|{flag}|||F|||{_ts(collected)}"
        )
    return segs


def _siu(trigger: str, n: int, p: Person, when: datetime, rng: random.Random, facility: str) -> list[str]:
    start = (when + timedelta(days=rng.randint(1, 30))).replace(minute=rng.choice((0, 15, 30, 45)), second=0)
    minutes = rng.choice((15, 20, 30, 45))
    end = start + timedelta(minutes=minutes)
    status = _SIU_STATUS.get(trigger, "Booked")
    appt = f"APT{n + 1:07d}^{facility}"
    reason = "PATREQ^Patient request^L" if trigger in ("S15", "S16", "S17") else ""
    return [
        _msh("SIU", trigger, "SIU_S12", when, n, facility),
        f"SCH|{appt}|{appt}||||{reason}|ROUTINE^Routine visit|FOLLOWUP|{minutes}|MIN|"
        f"^^{minutes}^{_ts(start)}^{_ts(end)}||||||||||||||{status}",
        _pid(p, facility),
        "RGS|1|A",
        f"AIS|1|A|99213^Office visit^CPT|{_ts(start)}|||{minutes}|MIN",
        f"AIP|1|A|{_provider(rng)}|ATTENDING",
        f"AIL|1|A|EXAM{rng.randint(1, 6)}^^^{facility}|",
    ]
