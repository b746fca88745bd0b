"""A real engine process whose admin app serves the console, tokens made with `sluice token create`, and
helpers to log in over HTTP (httpx) the way the login form does."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.adminengine import Admin, admin_engine, adt, file_destinations, make_token, wait_for

__all__ = ["API", "Admin", "adt", "console_engine", "login", "send_in_thread", "wait_for"]

API = "/api/v1"
HOOK_SECRET = "hook-secret-value-do-not-show"


def start_console_engine(tmp: Path) -> Iterator[Admin]:
    """An HL7 → FHIR channel 'adt' routed to 'out' and 'picky' (file destinations; a regular file named like
    a control id under picky/ makes that message a dead letter), plus an unrouted 'hook' (http) whose
    secrets the config page must mask."""
    (tmp / "hook.key").write_text("signing-key-do-not-show\n")

    def channel(port: int) -> dict[str, Any]:
        return {
            "source": {"host": "127.0.0.1", "port": port, "idle_timeout": 30, "frame_timeout": 5},
            "accept": {"types": {"ADT": "*"}},
            "site_tz": "America/Los_Angeles",
            "transform": [{"hl7-to-fhir": {"derive_unknown_systems": True}}],
            "routes": [{"destination": "out"}, {"destination": "picky"}],
        }

    destinations = file_destinations(tmp)
    destinations["hook"] = {
        "kind": "http",
        "url": "http://127.0.0.1:9/hook",
        "payload": "fhir",
        "signing_secret": {"file": "hook.key"},
        "headers": {"X-Tenant": "north", "Authorization": {"env": "SLUICE_TEST_HOOK_AUTH"}},
    }
    with admin_engine(
        tmp, channel, destinations, env={"SLUICE_TEST_HOOK_AUTH": f"Bearer {HOOK_SECRET}"}
    ) as a:
        a.tokens["admin"] = make_token(a.config, "admin", "admin")  # the CLI makes the first one...
        for name, role, phi in (
            ("viewer", "viewer", False),
            ("operator", "operator", False),
            ("phi-operator", "operator", True),
        ):
            r = a.post(
                "/api/v1/tokens", "admin", json={"name": name, "role": role, "phi": phi}
            )  # ...the API the rest
            assert r.status_code == 201, r.text
            a.tokens[name] = r.json()["token"]
        yield a


@pytest.fixture(scope="package")
def console_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Admin]:
    yield from start_console_engine(tmp_path_factory.mktemp("console"))


def send_in_thread(admin: Admin, *messages: bytes) -> list[str]:
    """Send over MLLP from a thread of its own (Playwright's sync API owns this thread's event loop)."""
    out: list[str] = []
    errors: list[BaseException] = []

    def go() -> None:
        try:
            out.extend(admin.send(*messages))
        except BaseException as exc:  # handed to the caller
            errors.append(exc)

    t = threading.Thread(target=go)
    t.start()
    t.join(30)
    if errors:
        raise errors[0]
    return out


CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def login(admin: Admin, who: str) -> tuple[httpx.Client, str]:
    """A client logged in through the form as ``who``; returns it and the session's CSRF token."""
    client = httpx.Client(base_url=admin.url, timeout=10, follow_redirects=False)
    form = client.get("/login")
    nonce = re.search(r'name="login_csrf" value="([^"]+)"', form.text)
    assert nonce, form.text
    r = client.post("/login", data={"token": admin.tokens[who], "login_csrf": nonce.group(1), "next": "/"})
    assert r.status_code == 303, r.text
    page = client.get("/")
    assert page.status_code == 200, page.text
    m = CSRF.search(page.text)
    assert m, page.text
    return client, m.group(1)
