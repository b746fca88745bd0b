"""Console sessions on a fake clock: idle and absolute expiry, the token's own expiry, ending, CSRF."""

from __future__ import annotations

from engine.admin.roles import Principal
from engine.web.sessions import SessionStore, safe_next, same_secret

WHO = Principal("night-ops", "token", "operator")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_session_is_opaque_and_holds_no_token() -> None:
    store = SessionStore(clock=Clock())
    sid, s = store.create(WHO)
    assert len(sid) >= 40 and s.csrf and s.csrf != sid
    assert store.get(sid) is s
    assert sid not in repr(store._sessions)  # keyed by a hash of the id
    assert store.get("nope") is None and store.get("") is None and store.get(None) is None


def test_idle_and_absolute_expiry() -> None:
    clock = Clock()
    store = SessionStore(idle=60, max_age=300, clock=clock)
    sid, _ = store.create(WHO)
    for _ in range(4):  # every request moves the idle deadline on
        clock.now += 50
        assert store.get(sid) is not None
    clock.now += 101  # 301 s after login: past the absolute limit however active
    assert store.get(sid) is None
    sid, _ = store.create(WHO)
    clock.now += 61
    assert store.get(sid) is None  # idle too long
    assert len(store) == 0


def test_a_session_never_outlives_its_token() -> None:
    clock = Clock()
    store = SessionStore(idle=600, max_age=3600, clock=clock)
    sid, s = store.create(WHO, expires_at=clock.now + 30)
    assert s.expires_at == clock.now + 30
    clock.now += 31
    assert store.get(sid) is None


def test_end_one_session() -> None:
    store = SessionStore(clock=Clock())
    a, _ = store.create(WHO)
    b, _ = store.create(WHO)
    assert store.end(a) and not store.end(a)
    assert store.get(a) is None and store.get(b) is not None


def test_recheck_is_due_every_few_seconds() -> None:
    clock = Clock()
    store = SessionStore(clock=clock)
    _, s = store.create(WHO)
    assert not store.due_for_check(s)
    clock.now += 5
    assert store.due_for_check(s)
    store.checked(s)
    assert not store.due_for_check(s)


def test_csrf_comparison() -> None:
    assert same_secret("abc", "abc")
    assert not same_secret("abc", "abd")
    assert not same_secret("", "") and not same_secret("abc", "")


def test_after_login_only_same_site_paths() -> None:
    assert safe_next("/messages?control_id=X") == "/messages?control_id=X"
    for bad in (
        "https://evil.example/",
        "//evil.example/",
        "/\\evil",
        "javascript:alert(1)",
        "",
        None,
        "/a\nb",
    ):
        assert safe_next(bad) == "/"
