"""The in-memory FHIR target channel tests apply Bundles to (engine/fhirtarget.py).

Unit tests of each write kind, then the proof that matters: the same lifecycle sequences, run through
the demo channel's real pipeline, leave the same final state in the in-memory target as in the Medplum
FHIR server (tests/support/fhirserver.py).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine import config
from engine.cli import split_messages
from engine.fhirtarget import FhirTarget, TargetError, split_token
from engine.processing import ChannelRuntime
from tests.support.ci import service_unavailable
from tests.support.fhirserver import FhirServer, FhirServerUnavailable

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "channels" / "samples" / "allscripts"
SYS = "urn:oid:1.2.3"


def patient(mrn: str, family: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": SYS, "value": mrn}],
        "name": [{"family": family}],
    }


def put(resource: dict[str, Any], full_url: str) -> dict[str, Any]:
    ident = resource["identifier"][0]
    url = f"{resource['resourceType']}?identifier={ident['system']}|{ident['value']}"
    return {"fullUrl": full_url, "resource": resource, "request": {"method": "PUT", "url": url}}


def tx(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}


def test_conditional_update_creates_then_replaces_keeping_the_id() -> None:
    t = FhirTarget()
    assert t.apply(tx(put(patient("1", "Old"), "urn:uuid:a"))) == ["Patient/1"]
    assert t.apply(tx(put(patient("1", "New"), "urn:uuid:a"))) == ["Patient/1"]
    (p,) = t.all()
    assert p["id"] == "1" and p["name"] == [{"family": "New"}]


def test_references_to_full_urls_become_type_and_id() -> None:
    t = FhirTarget()
    t.apply(tx(put(patient("9", "X"), "urn:uuid:other")))
    enc = {"resourceType": "Encounter", "identifier": [{"system": SYS, "value": "V1"}],
           "subject": {"reference": "urn:uuid:p"}}  # fmt: skip
    t.apply(tx(put(enc, "urn:uuid:e"), put(patient("1", "A"), "urn:uuid:p")))
    assert t.read("Encounter/1")["subject"] == {"reference": "Patient/2"}  # type: ignore[index]


def test_conditional_create_leaves_an_existing_resource_alone() -> None:
    t = FhirTarget()
    t.apply(tx(put(patient("1", "Registered"), "urn:uuid:a")))
    create = {"fullUrl": "urn:uuid:b", "resource": patient("1", "FromLab"),
              "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier={SYS}|1"}}  # fmt: skip
    assert t.apply(tx(create)) == ["Patient/1"]
    assert [p["name"][0]["family"] for p in t.all()] == ["Registered"]
    create["request"]["ifNoneExist"] = f"identifier={SYS}|2"
    assert t.apply(tx(create)) == ["Patient/2"]


def test_delete_by_id_and_by_condition() -> None:
    t = FhirTarget()
    t.apply(tx(put(patient("1", "A"), "urn:uuid:a"), put(patient("2", "B"), "urn:uuid:b")))
    t.apply(tx({"request": {"method": "DELETE", "url": "Patient/1"}}))
    t.apply(tx({"request": {"method": "DELETE", "url": f"Patient?identifier={SYS}|2"}}))
    assert list(t.all()) == []


def test_an_ambiguous_conditional_update_fails_and_changes_nothing() -> None:
    t = FhirTarget()
    t.apply(tx(put(patient("1", "A"), "urn:uuid:a")))
    t.apply(tx({"resource": patient("1", "Twin"), "request": {"method": "POST", "url": "Patient"}}))
    before = copy.deepcopy(t.resources)
    with pytest.raises(TargetError, match="matches 2 resources"):
        t.apply(tx(put(patient("7", "C"), "urn:uuid:c"), put(patient("1", "B"), "urn:uuid:b")))
    assert t.resources == before


def test_token_escapes() -> None:
    assert split_token(r"urn:a\|b|v\,1") == ("urn:a|b", "v,1")
    assert split_token("|v") == ("", "v")
    assert split_token("v") == (None, "v")


def test_unsupported_search_says_what_is_supported() -> None:
    with pytest.raises(TargetError, match="only identifier, _tag and _id"):
        FhirTarget().search("Patient", "name=X")


# -- the same final state as the Medplum server -------------------------------------------------
SEQUENCES = {
    "admit-discharge": ["a01_admit.hl7", "a03_discharge.hl7"],
    "register-update": ["a04_register.hl7", "a08_update.hl7"],
    "booked-rescheduled-cancelled": ["s12_book.hl7", "s13_reschedule.hl7", "s15_cancel.hl7"],
    "final-corrected": ["a04_register.hl7", "oru_final.hl7", "oru_corrected.hl7"],
}


@pytest.fixture(scope="module")
def medplum() -> Iterator[FhirServer]:
    srv = FhirServer()
    try:
        srv.start()
    except FhirServerUnavailable as exc:
        service_unavailable(f"FHIR test server unavailable: {exc}")
    try:
        yield srv
    finally:
        srv.stop()


def bundles(files: list[str]) -> list[dict[str, Any]]:
    cfg = config.load(ROOT / "routes.yaml")
    runtime = ChannelRuntime(cfg, cfg.channel("allscripts"), store=None)
    out = []
    for name in files:
        for n, raw in enumerate(split_messages((SAMPLES / name).read_bytes()), 1):
            result = runtime.run_raw(n, raw)
            assert result.output is not None, result.reason
            out.append(orjson.loads(result.output.payload))
    return out


def canonical(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Resources without server-chosen values: no id or meta, and each reference replaced by the
    identifiers of what it points to (the same whatever ids a server assigned)."""
    by_ref = {f"{r['resourceType']}/{r['id']}": r for r in resources}

    def key(ref: str) -> str:
        target = by_ref.get(ref)
        if target is None:
            return "missing:" + ref.split("/")[0]
        ids = target.get("identifier") or (target.get("meta") or {}).get("tag") or []
        return (
            ref.split("/")[0]
            + "|"
            + "|".join(sorted(f"{i.get('system')}={i.get('value', i.get('code'))}" for i in ids))
        )

    def walk(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: (key(x) if k == "reference" and isinstance(x, str) else walk(x))
                    for k, x in v.items() if k not in ("id", "meta")}  # fmt: skip
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v

    out = [walk(r) for r in resources]
    for r, src in zip(out, resources, strict=True):
        r["_key"] = key(f"{src['resourceType']}/{src['id']}")
    return sorted(out, key=lambda r: orjson.dumps(r, option=orjson.OPT_SORT_KEYS))


@pytest.mark.fhirserver
@pytest.mark.parametrize("sequence", list(SEQUENCES))
def test_in_memory_target_agrees_with_medplum(medplum: FhirServer, sequence: str) -> None:
    medplum.reset()
    target = FhirTarget()
    for bundle in bundles(SEQUENCES[sequence]):
        target.apply(bundle)
        medplum.request("POST", "/", bundle)
    types = sorted(target.resources)
    served: list[dict[str, Any]] = []
    for rtype in types:
        served.extend(medplum.search(f"{rtype}?_count=1000"))
    assert {r["resourceType"] for r in served} == set(types)
    assert canonical(list(target.all())) == canonical(served)
