"""The console over real HTTP (httpx) against a real engine: sessions, CSRF, and roles enforced by the
server on every page and action, whatever the page shows."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.web.conftest import HOOK_SECRET, Admin, adt, login, wait_for

API = "/api/v1"
NONCE = re.compile(r'name="login_csrf" value="([^"]+)"')


def api_channel(admin: Admin, name: str = "adt") -> dict:
    return next(c for c in admin.get(f"{API}/channels", token="viewer").json() if c["name"] == name)


def message_id(admin: Admin, control: str) -> int:
    items = wait_for(
        lambda: admin.get(f"{API}/messages", token="viewer", params={"control_id": control}).json()["items"],
        60,
        f"message {control}",
    )
    return int(items[0]["id"])


def test_pages_need_a_session(console_engine: Admin) -> None:
    c = httpx.Client(base_url=console_engine.url, timeout=10)
    r = c.get("/")
    assert r.status_code == 303 and r.headers["location"] == "/login"
    r = c.get("/messages?control_id=X1")
    assert r.status_code == 303 and r.headers["location"] == "/login?next=%2Fmessages%3Fcontrol_id%3DX1"
    r = c.get("/live", headers={"X-Requested-With": "fetch"})
    assert r.status_code == 401 and "log in again" in r.json()["error"]["message"]
    r = c.post("/channels/adt/pause", data={"csrf": "x"})
    assert r.status_code == 401
    assert api_channel(console_engine)["paused"] is False
    # a bearer token is for the API: the console's pages take the session cookie only
    r = c.get("/", headers={"Authorization": f"Bearer {console_engine.tokens['admin']}"})
    assert r.status_code == 303


def test_login_sets_an_httponly_strict_cookie_that_is_not_the_token(console_engine: Admin) -> None:
    c = httpx.Client(base_url=console_engine.url, timeout=10)
    form = c.get("/login")
    assert form.status_code == 200 and 'name="token"' in form.text and '<label for="token">' in form.text
    nonce = NONCE.search(form.text).group(1)  # type: ignore[union-attr]
    token = console_engine.tokens["viewer"]
    r = c.post("/login", data={"token": token, "login_csrf": nonce, "next": "/messages"})
    assert r.status_code == 303 and r.headers["location"] == "/messages"
    cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith("sluice_session="))
    attrs = {a.strip().lower() for a in cookie.split(";")[1:]}
    assert "httponly" in attrs and "samesite=strict" in attrs and "path=/" in attrs
    value = cookie.split(";")[0].split("=", 1)[1]
    assert token not in value and len(value) >= 40
    page = c.get("/")
    assert page.status_code == 200 and "viewer" in page.text
    assert token not in page.text
    for name, value in (
        ("content-security-policy", "script-src 'self'"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
        ("cache-control", "no-store"),
    ):
        assert value in page.headers[name]


def test_login_refuses_a_bad_token_and_a_forged_form(console_engine: Admin) -> None:
    c = httpx.Client(base_url=console_engine.url, timeout=10)
    form = c.get("/login")
    nonce = NONCE.search(form.text).group(1)  # type: ignore[union-attr]
    r = c.post("/login", data={"token": "slc_not-a-real-token", "login_csrf": nonce})
    assert r.status_code == 401 and "unknown, revoked or expired token" in r.text
    assert "sluice_session" not in r.headers.get("set-cookie", "")
    old_nonce, nonce = nonce, NONCE.search(r.text).group(1)  # type: ignore[union-attr]
    assert nonce != old_nonce  # every form gets a fresh one
    r = c.post("/login", data={"token": "garbage", "login_csrf": nonce})
    assert r.status_code == 401 and "sluice token create" in r.text
    nonce = NONCE.search(r.text).group(1)  # type: ignore[union-attr]
    # a login posted from another site carries no login cookie (SameSite=Strict): refused
    other = httpx.Client(base_url=console_engine.url, timeout=10)
    r = other.post("/login", data={"token": console_engine.tokens["admin"], "login_csrf": nonce})
    assert r.status_code == 403 and "sluice_session" not in r.headers.get("set-cookie", "")
    r = c.post("/login", data={"token": console_engine.tokens["admin"], "login_csrf": old_nonce})
    assert r.status_code == 403 and "sluice_session" not in r.headers.get("set-cookie", "")


@pytest.mark.parametrize(
    ("path", "data"),
    [
        ("/channels/adt/pause", {}),
        ("/channels/adt/resume", {}),
        ("/destinations/out/pause", {"reason": "x"}),
        ("/dead-letters/preview", {"pick": "dead:1"}),
        ("/dead-letters/preview", {"mode": "filter", "channel": "adt", "status": "dead"}),
        ("/dead-letters/replay", {"pick": "dead:1", "why": "try"}),
        ("/messages/1/reveal", {"reason": "curious"}),
    ],
)
def test_a_viewer_is_refused_operator_and_phi_actions(console_engine: Admin, path: str, data: dict) -> None:
    console_engine.send(adt("VIEWER-POST-1", "MRN-VP1"))
    c, csrf = login(console_engine, "viewer")
    before = console_engine.get(f"{API}/audit", token="admin").json()["items"]
    r = c.post(path, data={"csrf": csrf, **data})
    assert r.status_code == 403, r.text
    assert "this needs" in r.text and "viewer" in r.text
    assert "MRN-VP1" not in r.text
    assert api_channel(console_engine)["paused"] is False
    assert console_engine.get(f"{API}/audit", token="admin").json()["items"] == before  # nothing done


def test_a_viewer_sees_no_controls_and_no_admin_pages(console_engine: Admin) -> None:
    c, _ = login(console_engine, "viewer")
    page = c.get("/channels").text
    assert "/pause" not in page and "needs an operator" in page
    assert 'href="/audit"' not in c.get("/").text
    for path in ("/audit", "/config"):
        r = c.get(path)
        assert r.status_code == 403 and "this needs an admin token" in r.text
    op, _ = login(console_engine, "operator")
    assert op.get("/audit").status_code == 403 and op.get("/config").status_code == 403
    assert "/channels/adt/pause" in op.get("/channels").text


def test_a_post_without_the_csrf_token_is_refused(console_engine: Admin) -> None:
    c, csrf = login(console_engine, "operator")
    for data, headers in (({}, {}), ({"csrf": "stale-or-forged"}, {}), ({}, {"X-CSRF-Token": "nope"})):
        r = c.post("/channels/adt/pause", data={"reason": "x", **data}, headers=headers)
        assert r.status_code == 403 and "CSRF" in r.text
        assert api_channel(console_engine)["paused"] is False
    # the same request with the session's token (field or header) goes through
    r = c.post("/channels/adt/pause", data={"reason": "console test"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 303 and r.headers["location"] == "/channels#channel-adt"
    try:
        assert api_channel(console_engine)["paused"] is True
        assert "Channel adt paused." in c.get("/channels").text
    finally:
        r = c.post("/channels/adt/resume", data={"csrf": csrf})
    assert r.status_code == 303 and api_channel(console_engine)["paused"] is False
    rows = console_engine.get(f"{API}/audit", token="admin", params={"target": "channel:adt"}).json()["items"]
    assert [a["action"] for a in rows[:2]] == ["resume", "pause"]
    assert rows[1]["actor"] == "operator" and rows[1]["reason"] == "console test"
    assert rows[1]["source"] == "console from 127.0.0.1"
    # a form from another site also lacks the session cookie (SameSite=Strict): 401, nothing done
    r = httpx.post(f"{console_engine.url}/channels/adt/pause", data={"csrf": csrf})
    assert r.status_code == 401 and api_channel(console_engine)["paused"] is False


def test_reveal_needs_a_reason_and_is_audited(console_engine: Admin) -> None:
    console_engine.send(adt("REVEAL-HTTP-1", "MRN-RH1"))
    mid = message_id(console_engine, "REVEAL-HTTP-1")
    c, csrf = login(console_engine, "phi-operator")
    page = c.get(f"/messages/{mid}")
    assert page.status_code == 200 and "MRN-RH1" not in page.text and "Reveal PHI" in page.text
    r = c.post(f"/messages/{mid}/reveal", data={"csrf": csrf, "reason": "  "})
    assert r.status_code == 422 and "MRN-RH1" not in r.text and "say why" in r.text
    r = c.post(f"/messages/{mid}/reveal", data={"csrf": csrf, "reason": "ticket 99"})
    assert r.status_code == 200 and "MRN-RH1" in r.text and r.headers["cache-control"] == "no-store"
    rows = console_engine.get(
        f"{API}/audit", token="admin", params={"action": "phi.view", "target": f"message:{mid}"}
    ).json()["items"]
    assert [(a["actor"], a["reason"], a["source"]) for a in rows] == [
        ("phi-operator", "ticket 99", "console from 127.0.0.1")
    ]
    assert c.get("/messages/999999").status_code == 404
    assert c.get("/messages/abc").status_code == 404


def test_search_pages_take_the_api_parameters(console_engine: Admin) -> None:
    console_engine.send(adt("SEARCH-HTTP-1", "MRN-SH1"), adt("SEARCH-HTTP-2", "MRN-SH1"))
    message_id(console_engine, "SEARCH-HTTP-2")
    c, _ = login(console_engine, "viewer")
    r = c.get("/messages", params={"control_id": "SEARCH-HTTP-1", "type": "", "status": ""})
    assert r.status_code == 303 and r.headers["location"] == "/messages?control_id=SEARCH-HTTP-1"
    page = c.get("/messages?control_id=SEARCH-HTTP-1").text
    assert page.count('href="/messages/') >= 1 and "SEARCH-HTTP-1" in page and "SEARCH-HTTP-2" not in page
    by_patient = c.get("/messages?patient=MRN-SH1").text
    assert "SEARCH-HTTP-1" in by_patient and "SEARCH-HTTP-2" in by_patient
    first = c.get("/messages?limit=1")
    nxt = re.search(r'href="(/messages\?limit=1&amp;cursor=\d+)"', first.text)
    assert nxt, first.text
    second = c.get(nxt.group(1).replace("&amp;", "&"))
    ids = [re.findall(r'aria-label="message (\d+)"', p.text) for p in (first, second)]
    assert len(ids[0]) == len(ids[1]) == 1 and int(ids[1][0]) < int(ids[0][0])
    bad = c.get("/messages?since=yesterday-ish")
    assert bad.status_code == 422 and "since: cannot read" in bad.text
    bad = c.get("/messages?until=174653661d")
    assert bad.status_code == 422 and "until: cannot read" in bad.text


def test_config_page_is_for_admins_and_masks_secrets(console_engine: Admin) -> None:
    c, _ = login(console_engine, "admin")
    r = c.get("/config")
    assert r.status_code == 200
    assert HOOK_SECRET not in r.text and "signing-key-do-not-show" not in r.text
    assert "env: SLUICE_TEST_HOOK_AUTH" in r.text and "file: hook.key" in r.text
    assert 'id="destination-hook"' in r.text and 'id="channel-adt"' in r.text
    audit_page = c.get("/audit?action=pause")
    assert audit_page.status_code == 200 and "<table" in audit_page.text


def test_logout_ends_the_session(console_engine: Admin) -> None:
    c, csrf = login(console_engine, "viewer")
    r = c.post("/logout", data={})
    assert r.status_code == 403  # logout is a state change too: it needs the CSRF token
    assert c.get("/").status_code == 200
    r = c.post("/logout", data={"csrf": csrf})
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert 'sluice_session=""' in r.headers["set-cookie"] or "Max-Age=0" in r.headers["set-cookie"]
    old = r.request.headers["cookie"]
    again = httpx.get(f"{console_engine.url}/", headers={"cookie": old})
    assert again.status_code == 303  # the old session id is gone on the server, not only in the browser


def test_a_revoked_token_ends_its_sessions(console_engine: Admin) -> None:
    r = console_engine.post(f"{API}/tokens", "admin", json={"name": "short", "role": "viewer"})
    console_engine.tokens["short"] = r.json()["token"]
    c, _ = login(console_engine, "short")
    assert (
        httpx.delete(
            f"{console_engine.url}{API}/tokens/short",
            headers={"Authorization": f"Bearer {console_engine.tokens['admin']}"},
        ).status_code
        == 204
    )
    wait_for(lambda: c.get("/").status_code == 303, timeout=60, what="session ended after revocation")


def test_the_console_is_served_by_the_engine_and_not_in_the_api_schema(console_engine: Admin) -> None:
    for asset, kind in (("/static/console.js", "javascript"), ("/static/console.css", "css")):
        r = httpx.get(console_engine.url + asset)
        assert r.status_code == 200 and kind in r.headers["content-type"]
    c, _ = login(console_engine, "admin")
    for path in ("/", "/messages", "/dead-letters", "/channels", "/audit", "/config", "/login"):
        page = c.get(path).text
        assert not re.search(r'(src|href)="(https?:)?//', page), path  # no CDN, nothing from elsewhere
    paths = httpx.get(console_engine.url + "/openapi.json").json()["paths"]
    assert all(p.startswith(("/api/", "/healthz", "/readyz", "/metrics")) for p in paths)


def test_message_page_shows_the_conversion_warnings(console_engine: Admin) -> None:
    """Issue #14: the located, PHI-free warnings stored with a message are on its page (no values)."""
    console_engine.send(adt("WARN-HTTP-1", "MRN-WH1").replace(b"19800101", b"20250230"))
    mid = message_id(console_engine, "WARN-HTTP-1")
    wait_for(
        lambda: console_engine.get(f"{API}/messages/{mid}", token="viewer").json()["status"] == "processed",
        60,
        "message processed",
    )
    c, _csrf = login(console_engine, "operator")
    page = c.get(f"/messages/{mid}").text
    assert 'id="warnings-table"' in page and "field_dropped" in page
    assert "PID-7: is not a valid HL7 date/time (no such date); PID-7 was left out" in page
    assert "20250230" not in page and "MRN-WH1" not in page
