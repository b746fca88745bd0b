"""The console in a real headless Chromium (Debian's `chromium`, driven by Playwright; never a downloaded
browser) against a real engine: log in, live counters, search, PHI reveal and its audit, replay.

Set SLUICE_SCREENSHOTS=docs to write the README's screenshots (docs/console-*.png) while they run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.ci import service_unavailable
from tests.web.conftest import API, Admin, adt, send_in_thread, wait_for

CHROMIUM = ("chromium", "chromium-browser")  # Debian's package; .ci/run installs it
VIEWPORT = {"width": 1366, "height": 860}  # a laptop screen
WAIT = 60.0  # how long to wait for the engine (generous: a loaded CI machine is slow, never a timing test)
WAIT_MS = int(WAIT * 1000)


def chromium() -> str | None:
    explicit = os.environ.get("SLUICE_CHROMIUM")
    if explicit:
        return explicit
    for name in CHROMIUM:
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        service_unavailable("Playwright is not installed: pip install -e '.[dev]'")
    exe = chromium()
    if exe is None:
        service_unavailable(
            "Chromium is not installed: apt-get install chromium (the tests never download one)"
        )
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True)
        yield b
        b.close()


@pytest.fixture()
def shots(tmp_path: Path) -> Path:
    """Where screenshots go: SLUICE_SCREENSHOTS (e.g. docs) when set, else the test's tmp directory."""
    where = os.environ.get("SLUICE_SCREENSHOTS")
    return Path(where) if where else tmp_path


def log_in(browser: Any, admin: Admin, who: str) -> Any:
    """A fresh browser context logged in as ``who`` through the form, with the keyboard only."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.goto(admin.url + "/")
    assert page.url.startswith(admin.url + "/login")
    assert page.evaluate("document.activeElement.name") == "token"  # the field has the focus
    page.keyboard.type(admin.tokens[who])
    page.keyboard.press("Enter")
    page.wait_for_url(admin.url + "/")
    assert page.locator(".who .name").inner_text() == who
    return page


def message_id(admin: Admin, control: str) -> int:
    items = wait_for(
        lambda: admin.get(f"{API}/messages", token="viewer", params={"control_id": control}).json()["items"],
        WAIT,
        f"message {control}",
    )
    return int(items[0]["id"])


def fits_the_screen(page: Any) -> bool:
    return bool(page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"))


def test_viewer_sees_the_channel_and_its_counters_move(console_engine: Admin, browser: Any) -> None:
    page = log_in(browser, console_engine, "viewer")
    cookie = next(c for c in page.context.cookies() if c["name"] == "sluice_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert console_engine.tokens["viewer"] not in cookie["value"]
    assert page.evaluate("document.cookie") == ""  # nothing a script could read
    assert page.locator("#channel-row-adt").is_visible()

    def cell(key: str) -> int:
        return int(page.locator(f'[data-k="{key}"]').inner_text())

    received, delivered = cell("c-adt-received"), cell("d-out-delivered")
    page.evaluate("window.__sameDocument = true")
    assert send_in_thread(console_engine, *(adt(f"LIVE-{i}", f"MRN-L{i}") for i in range(3))) == ["AA"] * 3
    page.wait_for_function(
        "n => parseInt(document.querySelector('[data-k=\"c-adt-received\"]').textContent) >= n",
        arg=received + 3,
        timeout=WAIT_MS,
    )
    page.wait_for_function(
        "n => parseInt(document.querySelector('[data-k=\"d-out-delivered\"]').textContent) >= n",
        arg=delivered + 3,
        timeout=WAIT_MS,
    )
    assert page.evaluate("window.__sameDocument") is True  # updated in place, never reloaded
    assert cell("c-adt-AA") >= 3
    assert page.locator('[data-k="c-adt-last"]').inner_text().endswith("ago")
    assert "Updated" in page.locator("#live-status").inner_text()
    assert fits_the_screen(page)
    # a viewer is shown no operator or admin controls
    assert page.locator('nav a[href="/audit"]').count() == 0
    page.goto(console_engine.url + "/channels")
    assert page.locator("#channel-adt").is_visible()
    assert page.locator("button", has_text="Pause").count() == 0
    page.context.close()


def test_find_a_message_by_control_id(console_engine: Admin, browser: Any) -> None:
    send_in_thread(console_engine, adt("FIND-UI-1", "MRN-F1"), adt("FIND-UI-2", "MRN-F2"))
    message_id(console_engine, "FIND-UI-2")
    page = log_in(browser, console_engine, "viewer")
    page.get_by_role("link", name="Messages").click()
    page.get_by_label("Control id (MSH-10)").fill("FIND-UI-1")
    page.get_by_label("Control id (MSH-10)").press("Enter")
    page.wait_for_url(console_engine.url + "/messages?control_id=FIND-UI-1")  # a bookmarkable search
    rows = page.locator("#messages-table tbody tr")
    assert rows.count() == 1 and "FIND-UI-1" in rows.first.inner_text()
    assert fits_the_screen(page)
    rows.first.get_by_role("link", name="FIND-UI-1").click()
    assert page.locator("h1").inner_text().startswith("Message ")
    assert page.locator("#control-id").inner_text() == "FIND-UI-1"

    def destinations() -> list[str]:
        page.reload()
        return sorted(
            page.locator("#deliveries-table tbody tr[data-destination]").evaluate_all(
                "rows => rows.map(r => r.dataset.destination)"
            )
        )

    wait_for(lambda: destinations() == ["out", "picky"], WAIT, "both deliveries on the page")
    assert "MRN-F1" not in page.content()
    page.context.close()


def test_a_viewer_cannot_reveal_phi(console_engine: Admin, browser: Any) -> None:
    send_in_thread(console_engine, adt("NOPHI-UI-1", "MRN-NP1"))
    mid = message_id(console_engine, "NOPHI-UI-1")
    page = log_in(browser, console_engine, "viewer")
    page.goto(f"{console_engine.url}/messages/{mid}")
    assert page.locator("#no-phi").is_visible()
    assert page.get_by_role("button", name="Reveal PHI").count() == 0
    assert "MRN-NP1" not in page.content()
    # the server refuses it too, even with the session's CSRF token
    status = page.evaluate(
        """async (mid) => {
            const csrf = document.querySelector('input[name=csrf]').value;
            const r = await fetch(`/messages/${mid}/reveal`, {method: 'POST',
                headers: {'Content-Type': 'application/x-www-form-urlencoded'},
                body: new URLSearchParams({csrf, reason: 'just looking'})});
            return [r.status, await r.text()];
        }""",
        mid,
    )
    assert status[0] == 403 and "MRN-NP1" not in status[1]
    rows = console_engine.get(f"{API}/audit", token="admin", params={"target": f"message:{mid}"}).json()
    assert rows["items"] == []
    page.context.close()


def test_phi_operator_reveals_and_the_audit_page_shows_it(
    console_engine: Admin, browser: Any, shots: Path
) -> None:
    send_in_thread(console_engine, adt("REVEAL-UI-1", "MRN-RV1"))
    mid = message_id(console_engine, "REVEAL-UI-1")
    page = log_in(browser, console_engine, "phi-operator")
    page.goto(f"{console_engine.url}/messages/{mid}")
    wait_for(
        lambda: page.reload() and page.locator("#deliveries-table tr[data-destination]").count() == 2, WAIT
    )
    assert "MRN-RV1" not in page.content()
    page.get_by_role("button", name="Reveal PHI").click()  # no reason: the form does not go
    assert page.url == f"{console_engine.url}/messages/{mid}" and "MRN-RV1" not in page.content()
    page.get_by_label("Why do you need to see it?").fill("INC-4711 chart check")
    with page.expect_navigation() as nav:
        page.get_by_role("button", name="Reveal PHI").click()
    assert nav.value.headers["cache-control"] == "no-store"
    raw = page.locator("#raw-hl7")
    assert raw.locator(".segment").count() == 3
    lines = raw.inner_text().strip().splitlines()
    assert [line[:3] for line in lines] == ["MSH", "PID", "PV1"]  # one segment a line
    assert "MRN-RV1" in lines[1]
    assert raw.locator('.f[title="PID-3"]').inner_text().startswith("MRN-RV1")  # fields marked
    assert '"resourceType": "Patient"' in page.locator("pre.output").first.inner_text()  # the FHIR produced
    assert "INC-4711 chart check" in page.locator("#reveal-notice").inner_text()
    page.screenshot(path=str(shots / "console-message.png"))
    page.context.close()

    admin = log_in(browser, console_engine, "admin")
    admin.get_by_role("link", name="Audit").click()
    admin.get_by_label("Action").select_option("phi.view")
    admin.get_by_role("button", name="Filter").click()
    admin.wait_for_url(f"{console_engine.url}/audit?action=phi.view")
    row = admin.locator("#audit-table tbody tr", has_text=f"message:{mid}")
    assert row.count() == 1
    text = row.inner_text()
    assert "phi-operator" in text and "INC-4711 chart check" in text and "console from 127.0.0.1" in text
    assert "MRN-RV1" not in admin.content()
    admin.context.close()


def test_replay_a_dead_letter_from_the_ui(console_engine: Admin, browser: Any, shots: Path) -> None:
    blocker = console_engine.tmp / "picky" / "DEAD-UI-1"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where the destination wants a directory")
    send_in_thread(console_engine, adt("DEAD-UI-1", "MRN-DU1"))
    mid = message_id(console_engine, "DEAD-UI-1")

    def dead() -> list[dict]:
        return [
            d
            for d in console_engine.get(f"{API}/dead-letters", token="viewer").json()
            if d["control_id"] == "DEAD-UI-1"
        ]

    wait_for(dead, WAIT, "dead letter")
    page = log_in(browser, console_engine, "operator")
    page.get_by_role("link", name="Dead letters").click()
    page.get_by_label(f"select message {mid} (DEAD-UI-1 to picky)").check()
    page.get_by_role("button", name="Preview replay of the selected (dry run)").click()
    assert "1 message would be sent" in page.locator("#preview-summary").inner_text()
    assert page.locator("#replay-table tbody tr").inner_text().split() == [str(mid), "picky"]
    assert dead()  # a dry run changes nothing
    blocker.unlink()  # the cause is fixed
    page.get_by_label("Why replay? (recorded in the audit trail)").fill("picky disk fixed")
    page.get_by_role("button", name="Replay 1 message").click()
    assert page.locator("h1").inner_text() == "Replayed 1 message"
    assert "picky disk fixed" in page.locator("#replay-result").inner_text()
    page.locator("#replay-table").get_by_role("link", name=str(mid)).click()

    def picky() -> list[str]:
        page.reload()
        return page.locator('#deliveries-table tr[data-destination="picky"] .badge').all_inner_texts()

    wait_for(lambda: picky() == ["superseded", "delivered"], WAIT, "the replayed dead letter delivered")
    assert not dead()
    replays = console_engine.get(f"{API}/audit", token="admin", params={"action": "replay"}).json()["items"]
    assert replays[0]["actor"] == "operator" and replays[0]["reason"] == "picky disk fixed"
    # the dashboard counted the dead letter and the failed attempt's reason class
    page.get_by_role("link", name="Dashboard").click()
    assert int(page.locator('[data-k="d-picky-dead"]').inner_text()) >= 1
    failed = page.locator('#rejections-table [data-k$="-total"]').all_inner_texts()
    assert sum(int(n) for n in failed) >= 1
    page.wait_for_selector("#live[data-refreshed]", timeout=WAIT_MS)  # shows when it last refreshed
    page.screenshot(path=str(shots / "console-dashboard.png"))
    page.context.close()
