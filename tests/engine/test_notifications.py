"""Subscription notifications without resources (pure): what each asks for, and which focus URLs the
engine will read (only under fetch.base_url); the ``fetch:`` section of an http source's config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from engine import config as config_mod
from engine.errors import ConfigError
from engine.sources import notifications
from engine.sources.notifications import ForeignFocus, Notification, focus, read
from tests.support.engine import write_config

BASE = "http://127.0.0.1:8089/fhir"


def status(kind: str, *focus_refs: str) -> dict[str, Any]:
    """An R4B/R5 SubscriptionStatus."""
    return {
        "resourceType": "SubscriptionStatus",
        "status": "active",
        "type": kind,
        "notificationEvent": [{"eventNumber": "1", "focus": {"reference": r}} for r in focus_refs],
    }


def backport(kind: str, *focus_refs: str) -> dict[str, Any]:
    """The R4 Subscriptions Backport IG's status: a Parameters resource."""
    return {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "type", "valueCode": kind},
            *(
                {
                    "name": "notification-event",
                    "part": [
                        {"name": "event-number", "valueString": "1"},
                        {"name": "focus", "valueReference": {"reference": r}},
                    ],
                }
                for r in focus_refs
            ),
        ],
    }


def bundle(first: dict[str, Any], *entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "history", "entry": [{"resource": first}, *entries]}


@pytest.mark.parametrize("kind", ["handshake", "heartbeat", "query-status", "query-event"])
@pytest.mark.parametrize("make", [status, backport], ids=["R4B-R5", "R4-backport"])
def test_quiet_notifications_ask_for_nothing(kind: str, make: Any) -> None:
    assert read(bundle(make(kind))) == Notification(kind)


def test_id_only_r4b_entries_and_focus_references_together_once() -> None:
    note = read(
        bundle(
            status("event-notification", f"{BASE}/Appointment/a1/_history/2"),
            {
                "fullUrl": f"{BASE}/Appointment/a1/_history/2",
                "request": {"method": "PUT", "url": "Appointment/a1"},
            },
            {"fullUrl": "Appointment/a2"},
        )
    )
    assert note == Notification("id-only", (f"{BASE}/Appointment/a1/_history/2", "Appointment/a2"))


def test_id_only_r4_backport_focus_parts() -> None:
    note = read(bundle(backport("event-notification", "Appointment/a7")))
    assert note == Notification("id-only", ("Appointment/a7",))


@pytest.mark.parametrize("make", [status, backport], ids=["R4B-R5", "R4-backport"])
def test_an_event_without_focus_is_empty(make: Any) -> None:
    assert read(bundle(make("event-notification"))) == Notification("empty")


def test_a_bundle_that_is_no_notification() -> None:
    assert read({"resourceType": "Bundle", "type": "transaction", "entry": []}).kind == ""
    assert read({"resourceType": "Bundle", "type": "collection"}).kind == ""


@pytest.mark.parametrize(
    ("ref", "url", "version"),
    [
        ("Appointment/a1", f"{BASE}/Appointment/a1", ""),
        ("Appointment/a1/_history/3", f"{BASE}/Appointment/a1/_history/3", "3"),
        (f"{BASE}/Appointment/a1", f"{BASE}/Appointment/a1", ""),
        ("HTTP://127.0.0.1:8089/fhir/Appointment/a1/_history/2", f"{BASE}/Appointment/a1/_history/2", "2"),
    ],
)
def test_focus_under_the_base(ref: str, url: str, version: str) -> None:
    f = focus(ref, BASE)
    assert (f.url, f.resource_type, f.id, f.version, f.ref) == (
        url,
        "Appointment",
        "a1",
        version,
        "Appointment/a1",
    )


@pytest.mark.parametrize(
    "ref",
    [
        "http://evil.example/fhir/Appointment/a1",  # another host
        "http://127.0.0.1:8090/fhir/Appointment/a1",  # another port
        "https://127.0.0.1:8089/fhir/Appointment/a1",  # another scheme
        "http://127.0.0.1:8089/fhirx/Appointment/a1",  # a sibling path
        "http://127.0.0.1:8089/other/Appointment/a1",
        "http://127.0.0.1:8089/fhir/Appointment/a1?_format=xml",  # a query
        "Appointment/../../admin/x",  # not a resource URL
        "urn:uuid:5f1a9e0c-1111-4e55-9b2a-0d0c8f6f7a10",
        "Appointment",
        "http://127.0.0.1:8089@evil.example/fhir/Appointment/a1",
    ],
)
def test_focus_elsewhere_is_refused(ref: str) -> None:
    with pytest.raises(ForeignFocus):
        focus(ref, BASE)


CHANNEL: dict[str, Any] = {
    "name": "push",
    "source": {"kind": "http", "port": 0, "resources": ["Appointment"]},
    "transform": [{"fhir-to-hl7": {}}],
    "routes": [{"destination": "out"}],
}


def load(tmp_path: Path, source: dict[str, Any]) -> config_mod.ChannelConfig:
    routes = write_config(
        tmp_path, channels={}, destinations={"out": {"kind": "file", "directory": str(tmp_path)}}
    )
    (tmp_path / "channels" / "push.yaml").write_text(yaml.safe_dump({**CHANNEL, "source": source}))
    (ch,) = config_mod.load(routes).channels
    return ch


def test_fetch_section_defaults_to_the_sources_resources(tmp_path: Path) -> None:
    ch = load(
        tmp_path,
        {**CHANNEL["source"], "fetch": {"base_url": BASE + "/", "auth": {"type": "bearer", "token": "x"}}},
    )
    assert ch.source.http is not None and ch.source.http.fetch is not None
    fetch = ch.source.http.fetch
    assert (fetch.base_url, fetch.resources, dict(fetch.auth)["type"]) == (BASE, ("Appointment",), "bearer")
    assert load(tmp_path, CHANNEL["source"]).source.http.fetch is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("fetch", "key", "says"),
    [
        ({"resources": ["Appointment"]}, "source.fetch.base_url", "needs base_url"),
        ({"base_url": "ftp://x"}, "source.fetch.base_url", "needs base_url"),
        ({"base_url": BASE, "interval": 5}, "source.fetch.interval", "unknown key"),
        ({"base_url": BASE, "params": {"_sort": "x"}}, "source.fetch.params", "other than _lastUpdated"),
    ],
)
def test_fetch_mistakes_name_the_key(tmp_path: Path, fetch: dict[str, Any], key: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, {**CHANNEL["source"], "fetch": fetch})
    assert err.value.key == key and says in str(err.value)


def test_fetch_without_any_resource_types_says_what_to_list(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, {"kind": "http", "port": 0, "fetch": {"base_url": BASE}})
    assert err.value.key == "source.fetch.resources" and "empty notification" in str(err.value)


def test_status_types_are_the_ones_the_http_source_skips() -> None:
    from engine.sources import http

    assert http.NOTIFICATION_META == notifications.STATUS_TYPES


def test_focus_carried_in_full_is_not_read_again() -> None:
    full = {"resourceType": "Appointment", "id": "a1", "meta": {"versionId": "2"}}
    gone = f"{BASE}/Appointment/a2"
    carried_only = bundle(
        status("event-notification", f"{BASE}/Appointment/a1/_history/2"),
        {"fullUrl": f"{BASE}/Appointment/a1", "resource": full},
    )
    assert read(carried_only).kind == ""
    mixed = bundle(
        status("event-notification", f"{BASE}/Appointment/a1/_history/2", gone),
        {"fullUrl": f"{BASE}/Appointment/a1", "resource": full},
        {"fullUrl": gone, "request": {"method": "DELETE", "url": "Appointment/a2"}},  # R5: a deletion
    )
    assert read(mixed) == Notification("id-only", (gone,))
