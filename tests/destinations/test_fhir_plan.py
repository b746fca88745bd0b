"""The FHIR delivery plan (engine/destinations/fhir_plan.py), pure: dependency order, chunking under a size
cap, reference rewriting and two-phase cycle breaking, on the converter's real bundles (no sockets)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from engine.destinations import fhir_plan as fp

EXPECTED = Path(__file__).resolve().parents[1] / "transforms" / "expected"


def golden(name: str) -> list[dict[str, Any]]:
    data = json.loads((EXPECTED / f"{name}.json").read_text())
    entries: list[dict[str, Any]] = (data.get("bundle") or data)["entry"]
    return entries


def e(url: str, rtype: str, **fields: Any) -> dict[str, Any]:
    return {
        "fullUrl": f"urn:uuid:{url}",
        "resource": {"resourceType": rtype, **fields},
        "request": {"method": "PUT", "url": f"{rtype}?identifier=s|{url}"},
    }


def ref(url: str) -> dict[str, str]:
    return {"reference": f"urn:uuid:{url}"}


def sent_before(plan: fp.Plan) -> dict[str, int]:
    """fullUrl → the step that writes it (phase 1)."""
    return {
        str(plan.writes[k].entry["fullUrl"]): s
        for s, step in enumerate(plan.steps)
        for k in step
        if plan.writes[k].phase == fp.PHASE_WRITE
    }


def check_order(plan: fp.Plan, entries: list[dict[str, Any]], *, same_step_ok: bool) -> None:
    """Every phase-1 write only references entries written in an earlier step (or its own step when the
    step is one transaction); every entry is written exactly once; updates come last."""
    at = sent_before(plan)
    written = [plan.writes[k].index for step in plan.steps for k in step if plan.writes[k].phase == 1]
    assert sorted(written) == list(range(len(entries)))
    local = {str(x["fullUrl"]) for x in entries}
    for s, step in enumerate(plan.steps):
        for k in step:
            w = plan.writes[k]
            if w.phase == fp.PHASE_UPDATE:
                assert all(at[r] < s for r in fp.references(w.entry["resource"]) if r in at)
                continue
            for r in fp.references(w.entry.get("resource")):
                if r in local and r not in plan.fixed:
                    assert at[r] < s or (same_step_ok and at[r] == s), (
                        w.entry["resource"]["resourceType"],
                        r,
                    )


@pytest.mark.parametrize("name", ["adt_a01", "adt_a03", "adt_a04", "adt_a08", "siu_s12", "oru_r01_multi"])
@pytest.mark.parametrize("cap", [2, 3, 8, 50])
def test_transaction_chunks_respect_cap_and_order(name: str, cap: int) -> None:
    entries = golden(name)
    plan = fp.build(entries, "transaction", cap)
    assert all(len(step) <= cap for step in plan.steps)
    check_order(plan, entries, same_step_ok=True)
    if len(entries) <= cap:
        assert len(plan.steps) == 1 and plan.updates == 0


def test_full_a01_in_two_chunks_of_eight_keeps_the_cycle_whole() -> None:
    entries = golden("adt_a01")
    assert len(entries) == 16
    plan = fp.build(entries, "transaction", 8)
    assert [len(s) for s in plan.steps] == [8, 8]
    assert plan.updates == 0  # Encounter ↔ Condition sit in the same chunk
    types = [plan.writes[k].entry["resource"]["resourceType"] for k in plan.steps[1]]
    assert types.index("Encounter") < types.index("Condition")


@pytest.mark.parametrize("mode", ["per-resource", "batch"])
def test_cycle_is_written_in_two_phases(mode: str) -> None:
    entries = golden("adt_a01")
    plan = fp.build(entries, mode)
    check_order(plan, entries, same_step_ok=False)
    (upd,) = [w for w in plan.writes if w.phase == fp.PHASE_UPDATE]
    (first,) = [w for w in plan.writes if w.deferred]
    assert upd.index == first.index
    # The Encounter goes first without its diagnosis list item (Encounter.diagnosis is a list; the
    # Condition's single 'encounter' element stays), and is updated with it afterwards.
    assert first.entry["resource"]["resourceType"] == "Encounter"
    assert "diagnosis" not in first.entry["resource"]
    assert "diagnosis" in upd.entry["resource"]
    assert plan.steps[-1] == [plan.writes.index(upd)]


def test_update_is_put_by_id_with_every_reference_resolved() -> None:
    entries = [
        e("enc", "Encounter", diagnosis=[{"condition": ref("cond"), "rank": 1}], subject=ref("pat")),
        e("cond", "Condition", encounter=ref("enc"), subject=ref("pat")),
        e("pat", "Patient"),
    ]
    plan = fp.build(entries, "per-resource")
    order = [plan.writes[k].entry["resource"]["resourceType"] for s in plan.steps for k in s]
    assert order == ["Patient", "Encounter", "Condition", "Encounter"]
    refs = {"urn:uuid:pat": "Patient/p1", "urn:uuid:enc": "Encounter/e1", "urn:uuid:cond": "Condition/c1"}
    upd = fp.request_entry(plan.writes[plan.steps[-1][0]], refs)
    assert upd["request"] == {"method": "PUT", "url": "Encounter/e1"}
    assert upd["resource"]["id"] == "e1"
    assert upd["resource"]["diagnosis"] == [{"condition": {"reference": "Condition/c1"}, "rank": 1}]
    assert upd["resource"]["subject"] == {"reference": "Patient/p1"}
    first = fp.request_entry(plan.writes[plan.steps[1][0]], refs)
    assert "diagnosis" not in first["resource"] and first["request"]["url"].startswith("Encounter?")


def test_cycle_without_lists_drops_a_single_element() -> None:
    entries = [e("a", "A", x=ref("b")), e("b", "B", y=ref("a"), keep=1)]
    plan = fp.build(entries, "batch")
    assert [len(s) for s in plan.steps] == [1, 1, 1]
    first = plan.writes[plan.steps[0][0]]
    assert first.entry["resource"] in ({"resourceType": "A"}, {"resourceType": "B", "keep": 1})


def test_self_reference_and_three_cycle() -> None:
    entries = [
        e("a", "A", part=[ref("b")]),
        e("b", "B", part=[ref("c")]),
        e("c", "C", part=[ref("a"), ref("c")]),
    ]
    for mode in ("per-resource", "batch"):
        plan = fp.build(entries, mode)
        check_order(plan, entries, same_step_ok=False)
        assert plan.updates >= 1
    plan = fp.build(entries, "transaction", 2)  # the cycle of 3 does not fit: broken
    assert all(len(s) <= 2 for s in plan.steps) and plan.updates >= 1
    check_order(plan, entries, same_step_ok=True)
    plan = fp.build(entries, "transaction", 3)  # fits: one chunk, no update
    assert plan.steps == [[0, 1, 2]] and plan.updates == 0


def test_deletes_first_and_fixed_ids_are_not_dependencies() -> None:
    fixed = {
        "fullUrl": "urn:uuid:p",
        "resource": {"resourceType": "Patient", "id": "p9"},
        "request": {"method": "PUT", "url": "Patient/p9"},
    }
    dele = {"request": {"method": "DELETE", "url": "Flag?identifier=s|x"}}
    entries = [e("o", "Observation", subject=ref("p")), fixed, dele]
    plan = fp.build(entries, "batch")
    assert plan.fixed == {"urn:uuid:p": "Patient/p9"}
    assert [[plan.writes[k].index for k in s] for s in plan.steps] == [[2], [0, 1]]
    sent = fp.request_entry(plan.writes[plan.steps[1][0]], plan.fixed)
    assert sent["resource"]["subject"] == {"reference": "Patient/p9"}


def test_strip_references_keeps_siblings() -> None:
    res = {
        "resourceType": "Provenance",
        "target": [ref("a"), ref("b")],
        "agent": [{"who": ref("a"), "type": {"text": "x"}}, {"who": ref("z")}],
        "location": ref("a"),
    }
    out = fp.strip_references(res, frozenset({"urn:uuid:a"}))
    assert out == {"resourceType": "Provenance", "target": [ref("b")], "agent": [{"who": ref("z")}]}


def test_ref_from_location() -> None:
    assert fp.ref_from_location("Patient/1/_history/2") == "Patient/1"
    assert fp.ref_from_location("http://h/fhir/Encounter/x") == "Encounter/x"
    assert fp.ref_from_location("x") is None


def test_progress_state_round_trips_only_for_the_same_plan() -> None:
    prog = fp.Progress(done={0, 2}, refs={"urn:uuid:a": "Patient/1"}, outcomes=["1: HTTP 201"])
    state = prog.state("transaction/8/16/http://x/ab")
    assert fp.Progress.from_state(state, "transaction/8/16/http://x/ab", 16) == prog
    # another plan (payload, mode, chunk size or server changed): start over
    assert fp.Progress.from_state(state, "transaction/4/16/http://x/ab", 16) is None
    assert fp.Progress.from_state(None, "p", 16) is None
    for bad in (
        {**state, "v": 0},
        {**state, "done": [0, 16]},  # a position outside the plan
        {**state, "done": "0"},
        {**state, "refs": {"urn:uuid:a": 1}},
        {**state, "outcomes": [1]},
    ):
        assert fp.Progress.from_state(bad, "transaction/8/16/http://x/ab", 16) is None
