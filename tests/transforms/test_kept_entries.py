"""Entries kept across a channel's messages (transforms/bundle.py ``ConvertContext.reuse``, datatypes ``xcn`` / ``pl``).

A feed names the same practitioners and locations message after message: their entries are built once per
channel (``ConvertSettings.entity_memo``) and shared by later bundles.  The rules: a later message's Bundle is
exactly what a fresh conversion gives, and nothing one message does to its Bundle reaches another's."""

from __future__ import annotations

import copy
from typing import Any

from engine.hl7 import Message
from transforms.convert import convert, convert_report
from transforms.settings import ConvertSettings

from .conftest import golden_settings, load, msg, resources

H = "MSH|^~\\&|SYNTH-ADT|{fac}|SLUICE|SLUICE|20250316090000||ADT^{t}|CTRL-{n}|P|2.5.1"
PID = "PID|1||MRN{n}^^^HOSP^MR||TESTPATIENT^ALEX||19800229|F"
BED = "4WEST^401^A^GOODHOSP"


def pv1(n: int, temporary: str = "") -> str:
    """PV1-3 the bed, PV1-7/8 attending and referring doctor (no authority), PV1-10 service, PV1-11 a
    temporary location, PV1-19 the visit number."""
    f = [""] * 20
    f[0], f[1], f[2], f[3] = "PV1", "1", "I", BED
    f[7], f[8] = "DR0001^PHYSICIAN^TEST^A^^^MD^^^^L", "DR0002^REFERRER^TEST"
    f[10], f[11], f[19] = "MED", temporary, f"V{n}^^^VISITS^VN"
    return "|".join(f)


def admit(n: int, fac: str = "GOODHOSP", temporary: str = "") -> Message:
    return msg(H.format(fac=fac, t="A01", n=n), "EVN|A01|20250316090000", PID.format(n=n), pv1(n, temporary))


def fresh(m: Message) -> dict[str, Any]:
    """What a channel that never saw another message makes of ``m``."""
    return convert(m, golden_settings())


def test_later_messages_get_what_a_fresh_conversion_gives() -> None:
    s = golden_settings()
    for n in range(1, 5):
        assert convert(admit(n), s) == fresh(admit(n))
    assert s.entity_memo, "the practitioners and locations are kept"


def test_the_sending_facility_scopes_a_practitioner_without_an_authority() -> None:
    s = golden_settings()
    a, b = convert(admit(1, "GOODHOSP"), s), convert(admit(2, "OTHERHOSP"), s)
    assert b == fresh(admit(2, "OTHERHOSP"))
    pa, pb = resources(a, "Practitioner")[0], resources(b, "Practitioner")[0]
    assert pa["identifier"] != pb["identifier"]  # DR0001 of one facility is not DR0001 of another


def test_a_bed_status_update_does_not_reach_the_next_message() -> None:
    """A20 changes its Location (operationalStatus) after ``pl`` made it: on its own copy only."""
    s = golden_settings()
    before = convert(admit(1), s)
    kept_before = copy.deepcopy(s.entity_memo)
    a20 = convert(load("adt_a20"), s)  # NPU-1 is the bed of PV1-3 above
    assert a20 == fresh(load("adt_a20"))
    assert [loc.get("operationalStatus", {}).get("code") for loc in resources(a20, "Location")][-1] == "H"
    assert s.entity_memo == kept_before
    after = convert(admit(1), s)
    assert after == before == fresh(admit(1))
    assert not any("operationalStatus" in loc for loc in resources(after, "Location"))


def test_bundles_of_a_channel_share_kept_entries() -> None:
    """Kept entries are shared, read-only: the engine serializes a Bundle at once and never edits one in place
    (the fhir-edits step edits its own parsed copy).  Stated here so that changing that rule is a conscious act."""
    s = golden_settings()
    convert(admit(1), s)
    b = convert(admit(2), s)
    c = convert(admit(3), s)
    loc_b = resources(b, "Location")[0]
    loc_c = resources(c, "Location")[0]
    assert loc_b is loc_c  # shared, read-only


def test_merging_into_a_kept_entry_copies_it_first() -> None:
    """The same location named twice in one message, once with a description (PL-9): first wins, the second
    fills in what the first lacks, on this message's copy."""
    s: ConvertSettings = golden_settings()
    convert(admit(1), s)  # keeps the bed without a description
    m = admit(2, temporary=BED + "^^^^^Corner bed")
    got = convert(m, s)
    assert any(loc.get("description") == "Corner bed" for loc in resources(got, "Location"))
    assert got == fresh(m)
    assert convert(admit(3), s) == fresh(admit(3))
    assert not any("description" in loc for loc in resources(convert(admit(4), s), "Location"))


ORU_H = "MSH|^~\\&|SYNTH-LAB|GOODHOSP|SLUICE|SLUICE|20250316090000||ORU^R01^ORU_R01|LAB-{n}|P|2.5.1"


def result(n: int, flag: str = "ZZ") -> Message:
    """An ORU whose OBX pieces recur: code, units, reference range, and an interpretation flag outside
    table 0078 (counted code_table_miss each time)."""
    return msg(
        ORU_H.format(n=n),
        f"PID|1||MRN{n}^^^HOSP^MR||TESTPATIENT^ALEX||19800229|F",
        f"OBR|1|PL-{n}|FL-{n}|24323-8^Comprehensive metabolic panel^LN|||20250316080000||||||||||||||||||F",
        f"OBX|1|NM|2345-7^Glucose^LN||9{n}|mg/dL^^UCUM|70-99|{flag}|||F",
        f"OBX|2|NM|2951-2^Sodium^LN||14{n}|mmol/L^^UCUM|135-145|N|||F",
    )


def test_kept_result_pieces_give_the_same_bundle_and_events() -> None:
    """An OBX's code, interpretation and reference range are kept per channel: a later result shares them,
    and the events computing them counted (code_table_miss) are counted again."""
    s = golden_settings()
    for n in range(1, 4):
        got, want = convert_report(result(n), s), convert_report(result(n), golden_settings())
        assert got.bundle == want.bundle
        assert got.events == want.events and got.events.get("code_table_miss") == 1
    a, b = resources(convert(result(5), s), "Observation"), resources(convert(result(6), s), "Observation")
    assert a[0]["referenceRange"] is b[0]["referenceRange"]  # shared, read-only


def test_what_the_first_message_does_to_its_piece_is_not_kept() -> None:
    """The kept piece is a copy made when it was computed: the first bundle's own may change after."""
    s = golden_settings()
    first = resources(convert(result(1), s), "Observation")
    first[0]["referenceRange"][0]["low"]["value"] = -1
    assert convert(result(2), s) == fresh(result(2))


IN1 = "IN1|1|PLAN001^Synthetic Health Plan|INS0001^^^{auth}|SYNTHETIC INSURANCE CO|PO BOX 1^^SPRINGFIELD^OR^97401"


def insured(n: int, auth: str = "HOSP", fac: str = "GOODHOSP") -> Message:
    return msg(
        H.format(fac=fac, t="A01", n=n),
        "EVN|A01|20250316090000",
        PID.format(n=n),
        pv1(n),
        IN1.format(auth=auth) + f"|||||||||||||||||||||||||||||||POL{n}",
    )


def test_the_payor_organization_is_kept_with_its_events() -> None:
    """IN1-3..5 → the payor Organization, kept per channel; an authority Sluice derives a system for
    (derive_unknown_systems) counts identifier_system_derived every time, kept or not."""
    for kw in ({}, {"derive_unknown_systems": True}):
        s = golden_settings(**kw)
        for n, auth, fac in (
            (1, "HOSP", "GOODHOSP"),
            (2, "HOSP", "GOODHOSP"),
            (3, "LOCALINS", "A"),
            (4, "LOCALINS", "B"),
        ):
            got = convert_report(insured(n, auth, fac), s)
            want = convert_report(insured(n, auth, fac), golden_settings(**kw))
            assert got.bundle == want.bundle and got.events == want.events
            assert resources(got.bundle, "Organization")


def _golden_names() -> list[str]:
    from .conftest import MESSAGES

    return sorted(p.stem for p in MESSAGES.glob("*.hl7"))


def _fresh_or_error(m: Message, **kw: Any) -> tuple[str, Any]:
    try:
        r = convert_report(m, golden_settings(**kw))
    except Exception as exc:  # the same rejection is expected with kept entries
        return ("error", (type(exc).__name__, str(exc)))
    return ("ok", (r.bundle, r.events, r.warnings))


def test_every_golden_message_after_all_the_others_converts_as_when_fresh() -> None:
    """Every test message converted after all the others through one channel's settings (forwards, then
    backwards, then forwards again: kept entries and pieces of every message type meet every other) gives
    exactly the Bundle, events and warnings a fresh channel gives."""
    names = _golden_names()
    assert len(names) > 40
    for kw in ({}, {"derive_unknown_systems": True}):
        want = {n: _fresh_or_error(load(n), **kw) for n in names}
        s = golden_settings(**kw)
        for order in (names, names[::-1], names):
            for n in order:
                try:
                    r = convert_report(load(n), s)
                    got: tuple[str, Any] = ("ok", (r.bundle, r.events, r.warnings))
                except Exception as exc:
                    got = ("error", (type(exc).__name__, str(exc)))
                assert got == want[n], n
