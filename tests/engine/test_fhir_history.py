"""Deletions from a FHIR server's type-level history, the pure parts (engine/sources/history.py): what a
CapabilityStatement says, what a history page says (FHIR R4 §3.1.0.4), where a next link goes, and the
stored tombstone (synthetic data)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from engine.sources import history, resources
from transforms.fhir_to_v2.outbound import DELETED_TAG, is_deleted

AT = "2026-12-04T10:00:02.000Z"


def capability(*interactions: tuple[str, list[str]]) -> dict[str, Any]:
    return {
        "resourceType": "CapabilityStatement",
        "rest": [
            {
                "mode": "server",
                "resource": [
                    {"type": t, "interaction": [{"code": c} for c in codes]} for t, codes in interactions
                ],
            }
        ],
    }


def test_history_types_from_the_capability_statement() -> None:
    cs = capability(("Appointment", ["read", "history-type"]), ("Patient", ["read", "history-instance"]))
    assert history.history_types(cs) == frozenset({"Appointment"})
    # a client-mode rest block does not say what the server does
    cs["rest"][0]["mode"] = "client"
    assert history.history_types(cs) == frozenset()
    # not a CapabilityStatement (Medplum's router answers /metadata as a search: an empty searchset)
    assert history.history_types({"resourceType": "Bundle", "type": "searchset"}) is None
    assert history.history_types(None) is None


def page(*entries: dict[str, Any], next_url: str = "") -> dict[str, Any]:
    links = [{"relation": "self", "url": "http://h/Appointment/_history"}]
    if next_url:
        links.append({"relation": "next", "url": next_url})
    return {"resourceType": "Bundle", "type": "history", "link": links, "entry": list(entries)}


def test_a_page_gives_its_deletions_its_newest_time_and_the_next_link() -> None:
    bundle = page(
        {  # a deletion as the test server (and most servers) write it
            "fullUrl": "http://h/Appointment/a1",
            "request": {"method": "DELETE", "url": "Appointment/a1"},
            "response": {"status": "410 Gone", "lastModified": AT, "etag": 'W/"3"'},
        },
        {  # a version: not a deletion, but its time counts for the cursor
            "resource": {
                "resourceType": "Appointment",
                "id": "a2",
                "meta": {"lastUpdated": "2026-12-04T10:00:05Z"},
            },
            "request": {"method": "PUT", "url": "Appointment/a2"},
            "response": {"status": "200 OK"},
        },
        {  # 410 without a method, the version in the location, the id in fullUrl only
            "fullUrl": "http://h/fhir/Appointment/a3/_history/7",
            "response": {"status": "410", "location": "Appointment/a3/_history/7"},
        },
        {  # another type's deletion on a system-level page: not this type's
            "request": {"method": "DELETE", "url": "Patient/p1"},
            "response": {"status": "204", "lastModified": AT},
        },
        next_url="http://h/Appointment/_history?_before=9",
    )
    got = history.parse_page(bundle, "Appointment")
    at = datetime(2026, 12, 4, 10, 0, 2, tzinfo=UTC)
    assert got.deletions == (
        history.Deletion("Appointment", "a1", "3", at),
        history.Deletion("Appointment", "a3", "7", None),
    )
    assert got.newest == datetime(2026, 12, 4, 10, 0, 5, tzinfo=UTC)
    assert got.next_url == "http://h/Appointment/_history?_before=9"
    assert got.entries == 4
    assert history.parse_page(page(), "Appointment") == history.HistoryPage((), None, "", 0)


def test_next_links_stay_on_the_base_origin() -> None:
    base = "https://portal.example.test/fhir"
    assert history.follow("Appointment/_history?_page=2", base) == (
        "https://portal.example.test/fhir/Appointment/_history?_page=2"
    )
    assert (
        history.follow("https://portal.example.test/fhir/x?p=1", base)
        == "https://portal.example.test/fhir/x?p=1"
    )
    # a server behind a proxy names itself by its inside address: the path and query go to the base's host
    assert history.follow("http://10.0.0.9:8080/fhir?_getpages=abc", base) == (
        "https://portal.example.test/fhir?_getpages=abc"
    )


LAST: dict[str, Any] = {
    "resourceType": "Appointment",
    "id": "a1",
    "meta": {"versionId": "2", "lastUpdated": "2026-12-04T09:00:00.000Z", "tag": [{"code": "portal"}]},
    "identifier": [{"system": "urn:portal:appointment", "value": "PA-1"}],
    "status": "booked",
}


def test_the_tombstone_is_the_last_version_taken_marked_deleted() -> None:
    d = history.Deletion("Appointment", "a1", "3", datetime(2026, 12, 4, 10, 0, 2, tzinfo=UTC))
    t = history.tombstone(d, LAST, AT)
    assert t["identifier"] == LAST["identifier"] and t["status"] == "booked"
    assert t["meta"] == {"versionId": "3", "lastUpdated": AT, "tag": [{"code": "portal"}, DELETED_TAG]}
    assert is_deleted(t) and not is_deleted(LAST)
    assert LAST["meta"]["versionId"] == "2"  # the stored version is not changed
    # stored as a message of its own: control id of the deletion's version, trigger DELETE
    raw = orjson.dumps(t)
    row = resources.message_row("portal", t, raw, source="fhir-poll", facility="h:1", received_at=0.0)
    assert (row.control_id, row.trigger, row.message_type) == (
        "Appointment/a1/_history/3",
        "DELETE",
        "Appointmnt",
    )
    assert resources.header(raw)["MSH-9"] == "Appointment^DELETE"
    # a tombstone of a tombstone carries the tag once
    again = history.tombstone(history.Deletion("Appointment", "a1", "5", None), t, "")
    assert again["meta"]["tag"].count(DELETED_TAG) == 1 and "lastUpdated" not in again["meta"]


def test_without_a_version_taken_the_tombstone_holds_type_id_and_meta() -> None:
    d = history.Deletion("Appointment", "a9", "", None)
    assert history.tombstone(d, None, "") == {
        "resourceType": "Appointment",
        "id": "a9",
        "meta": {"versionId": "deleted", "tag": [DELETED_TAG]},
    }
    # another resource's body is never used
    assert "identifier" not in history.tombstone(history.Deletion("Appointment", "a2", "4", None), LAST, AT)
    assert history.tombstone(d, None, AT)["meta"]["versionId"] == f"deleted-{AT}"
