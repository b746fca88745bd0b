"""The admin API over real HTTP against a real engine process: auth matrix, counters, search, PHI audit,
pause/resume and replay."""

from __future__ import annotations

import pytest

from tests.support.adminengine import Admin, adt, sluice, wait_for

API = "/api/v1"


def test_health_and_ready_need_no_token(admin: Admin) -> None:
    assert admin.get("/healthz").json() == {"status": "ok"}
    r = admin.get("/readyz")
    assert r.status_code == 200
    body = r.json()
    assert body["ready"] is True
    assert body["checks"]["store"] is True
    assert body["checks"]["listener:adt"] is True


def test_no_token_or_a_bad_one_is_401_with_advice(admin: Admin) -> None:
    r = admin.get(f"{API}/channels")
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert "sluice token create" in r.json()["error"]["message"]
    r = admin.get(f"{API}/channels", token="slc_not-a-real-token")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"
    r = admin.get(f"{API}/channels", token="garbage")
    assert r.status_code == 401


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", f"{API}/channels", {"viewer", "operator", "admin", "phi-operator"}),
        ("GET", f"{API}/destinations", {"viewer", "operator", "admin", "phi-operator"}),
        ("GET", f"{API}/messages", {"viewer", "operator", "admin", "phi-operator"}),
        ("GET", f"{API}/dead-letters", {"viewer", "operator", "admin", "phi-operator"}),
        ("POST", f"{API}/replay", {"operator", "admin", "phi-operator"}),
        ("GET", f"{API}/audit", {"admin"}),
        ("GET", f"{API}/tokens", {"admin"}),
        ("GET", f"{API}/messages/1/content", {"phi-operator"}),
    ],
)
def test_role_matrix(admin: Admin, method: str, path: str, allowed: set[str]) -> None:
    admin.send(adt("MATRIX1", "MRN-M1"))
    for who in ("viewer", "operator", "admin", "phi-operator"):
        if method == "GET":
            r = admin.get(path, token=who)
        else:  # a dry run changes nothing
            r = admin.post(path, token=who, json={"ids": [1], "dry_run": True})
        if who in allowed:
            assert r.status_code == 200, (who, path, r.text)
        else:
            assert r.status_code == 403, (who, path, r.text)
            assert "this needs" in r.json()["error"]["message"]


def test_counters_move_with_traffic(admin: Admin) -> None:
    def channel() -> dict:
        return next(c for c in admin.get(f"{API}/channels", token="viewer").json() if c["name"] == "adt")

    before = channel()["counters"]
    assert admin.send(adt("COUNT1", "MRN-C1"), adt("COUNT2", "MRN-C2"), adt("COUNT3", "MRN-C3")) == ["AA"] * 3
    after = wait_for(lambda: (c := channel())["counters"]["received"] >= before["received"] + 3 and c)
    assert after["counters"]["AA"] >= before["AA"] + 3
    assert after["listening"] is True
    assert after["last_message_at"] is not None

    def delivered() -> int:
        d = next(x for x in admin.get(f"{API}/destinations", token="viewer").json() if x["name"] == "out")
        return int(d["counters"]["delivered"])

    wait_for(lambda: delivered() >= 3, what="deliveries counted")
    refused = adt("COUNT-BAD", "MRN-C4").replace(b"ADT^A08^ADT_A01", b"ZZZ^Z01")
    assert admin.send(refused) == ["AR"]
    now = wait_for(lambda: (c := channel())["counters"]["AR"] >= before["AR"] + 1 and c, what="AR counted")
    assert now["counters"]["errored"] >= before["errored"] + 1
    metrics = admin.get("/metrics").text
    assert 'sluice_messages_received_total{channel="adt"}' in metrics


def test_search_by_control_id_patient_and_pages(admin: Admin) -> None:
    admin.send(adt("FIND-ME-1", "MRN-SEARCH-7"), adt("OTHER-1", "MRN-ELSE"), adt("FIND-ME-2", "MRN-SEARCH-7"))
    r = admin.get(f"{API}/messages", token="viewer", params={"control_id": "FIND-ME-1"})
    items = r.json()["items"]
    assert [i["control_id"] for i in items] == ["FIND-ME-1"]
    assert items[0]["type"] == "ADT" and items[0]["trigger"] == "A08"
    assert "raw" not in items[0] and "patient" not in str(items[0]).lower()
    by_patient = admin.get(f"{API}/messages", token="viewer", params={"patient": "MRN-SEARCH-7"}).json()[
        "items"
    ]
    assert sorted(i["control_id"] for i in by_patient) == ["FIND-ME-1", "FIND-ME-2"]
    # The identifier is not in the answer, nor stored plain in the database.
    assert "MRN-SEARCH-7" not in str(by_patient)
    import sqlite3

    with sqlite3.connect(admin.tmp / "sluice.db") as conn:
        keys = [r[0] for r in conn.execute("SELECT patient_key FROM messages")]
    assert all("MRN" not in k for k in keys) and any(len(k) == 32 for k in keys)
    # keyset pages: newest first, no overlap, the cursor ends
    page1 = admin.get(f"{API}/messages", token="viewer", params={"limit": 2}).json()
    assert len(page1["items"]) == 2 and page1["next_cursor"] is not None
    page2 = admin.get(
        f"{API}/messages", token="viewer", params={"limit": 2, "cursor": page1["next_cursor"]}
    ).json()
    ids1, ids2 = [i["id"] for i in page1["items"]], [i["id"] for i in page2["items"]]
    assert ids1 == sorted(ids1, reverse=True) and max(ids2) < min(ids1)
    r = admin.get(f"{API}/messages", token="viewer", params={"since": "not a time"})
    assert r.status_code == 422 and "since" in r.json()["error"]["message"]


def test_message_detail_and_phi_view_is_audited(admin: Admin) -> None:
    admin.send(adt("PHI-1", "MRN-PHI-1"))
    mid = wait_for(
        lambda: admin.get(f"{API}/messages", token="viewer", params={"control_id": "PHI-1"}).json()["items"]
    )[0]["id"]
    detail = wait_for(
        lambda: (d := admin.get(f"{API}/messages/{mid}", token="viewer").json())["deliveries"] and d,
        what="deliveries",
    )
    assert {d["destination"] for d in detail["deliveries"]} == {"out", "picky"}
    assert "MRN-PHI-1" not in str(detail)
    r = admin.get(f"{API}/messages/{mid}/content", token="operator")
    assert r.status_code == 403 and "phi" in r.json()["error"]["message"]
    r = admin.get(f"{API}/messages/{mid}/content", token="phi-operator", params={"reason": "ticket 4711"})
    assert r.status_code == 200
    assert r.headers["cache-control"] == "no-store"
    assert "MRN-PHI-1" in r.json()["raw"]
    audit = admin.get(f"{API}/audit", token="admin", params={"action": "phi.view"}).json()["items"]
    row = next(a for a in audit if a["target"] == f"message:{mid}")
    assert row["actor"] == "phi-operator" and row["actor_kind"] == "token" and row["reason"] == "ticket 4711"
    # the message page shows its own audit trail
    trail = admin.get(f"{API}/messages/{mid}", token="viewer").json()["audit"]
    assert [a["action"] for a in trail] == ["phi.view"]
    assert admin.get(f"{API}/messages/999999", token="viewer").status_code == 404


def test_cli_show_phi_is_audited_with_the_os_user(admin: Admin) -> None:
    import getpass

    admin.send(adt("PHI-CLI", "MRN-PHI-2"))
    mid = wait_for(
        lambda: admin.get(f"{API}/messages", token="viewer", params={"control_id": "PHI-CLI"}).json()["items"]
    )[0]["id"]
    res = sluice(admin.config, "messages", "show", str(mid), "--show-phi", "--reason", "chart check")
    assert res.returncode == 0, res.stderr
    assert "MRN-PHI-2" in res.stdout
    res = sluice(admin.config, "audit", "list", "--action", "phi.view", "--json")
    assert res.returncode == 0, res.stderr
    assert f'"target": "message:{mid}"' in res.stdout
    assert f'"actor": "{getpass.getuser()}"' in res.stdout and '"actor_kind": "os"' in res.stdout


def test_pause_and_resume_a_destination(admin: Admin) -> None:
    r = admin.post(f"{API}/destinations/out/pause", token="operator", params={"reason": "downstream upgrade"})
    assert r.status_code == 200 and r.json() == {
        "kind": "destination",
        "name": "out",
        "paused": True,
        "changed": True,
    }
    assert admin.send(adt("PAUSED-1", "MRN-P1")) == ["AA"]

    def out() -> dict:
        return next(x for x in admin.get(f"{API}/destinations", token="viewer").json() if x["name"] == "out")

    wait_for(lambda: out()["queue_depth"] >= 1, what="queued while paused")
    assert out()["paused"] is True and out()["status"] == "paused"
    r = admin.post(f"{API}/destinations/out/resume", token="operator")
    assert r.json()["changed"] is True
    wait_for(lambda: out()["queue_depth"] == 0, what="delivered after resume")
    actions = [
        a["action"]
        for a in admin.get(f"{API}/audit", token="admin", params={"target": "destination:out"}).json()[
            "items"
        ]
    ]
    assert actions[:2] == ["resume", "pause"]
    assert admin.post(f"{API}/destinations/nope/pause", token="operator").status_code == 404


def test_pause_a_channel_holds_processing_not_intake(admin: Admin) -> None:
    assert admin.post(f"{API}/channels/adt/pause", token="admin").status_code == 200
    try:
        assert admin.send(adt("CHPAUSE-1", "MRN-CP")) == ["AA"]  # still stored and acknowledged
        item = admin.get(f"{API}/messages", token="viewer", params={"control_id": "CHPAUSE-1"}).json()[
            "items"
        ][0]
        assert item["status"] == "received"
        chans = admin.get(f"{API}/channels", token="viewer").json()
        assert next(c for c in chans if c["name"] == "adt")["paused"] is True
    finally:
        admin.post(f"{API}/channels/adt/resume", token="admin")
    wait_for(
        lambda: (
            admin.get(f"{API}/messages", token="viewer", params={"control_id": "CHPAUSE-1"}).json()["items"][
                0
            ]["status"]
            == "processed"
        ),
        what="processed after resume",
    )


def test_dead_letter_replay_through_the_api(admin: Admin) -> None:
    blocker = admin.tmp / "picky" / "DEAD-1"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where the destination wants a directory")
    admin.send(adt("DEAD-1", "MRN-D1"))

    def dead() -> list[dict]:
        return [
            d for d in admin.get(f"{API}/dead-letters", token="viewer").json() if d["control_id"] == "DEAD-1"
        ]

    letters = wait_for(dead, what="dead letter")
    assert letters[0]["destination"] == "picky" and "DEAD-1" in letters[0]["reason"]
    mid = letters[0]["message_id"]
    preview = admin.post(
        f"{API}/replay", token="operator", json={"ids": [mid], "status": "dead", "dry_run": True}
    ).json()
    assert preview == {
        "dry_run": True,
        "selected": 1,
        "replayed": 0,
        "items": [{"message_id": mid, "destinations": ["picky"]}],
    }
    assert dead()  # a dry run changes nothing
    blocker.unlink()
    done = admin.post(
        f"{API}/replay", token="operator", json={"channel": "adt", "status": "dead", "why": "picky fixed"}
    ).json()
    assert done["replayed"] >= 1
    assert not dead()

    def picky_status() -> list[str]:
        d = admin.get(f"{API}/messages/{mid}", token="viewer").json()["deliveries"]
        return [x["status"] for x in d if x["destination"] == "picky"]

    wait_for(lambda: picky_status() == ["superseded", "delivered"], what="replayed dead letter delivered")
    assert len(list((admin.tmp / "picky" / "DEAD-1").iterdir())) == 1
    replays = admin.get(f"{API}/audit", token="admin", params={"action": "replay"}).json()["items"]
    assert replays[0]["actor"] == "operator" and replays[0]["reason"] == "picky fixed"
    r = admin.post(f"{API}/replay", token="operator", json={"status": "dead"})
    assert r.status_code == 400 and "channel" in r.json()["error"]["message"]


def test_tokens_via_api_and_revocation(admin: Admin) -> None:
    r = admin.post(
        f"{API}/tokens", token="admin", json={"name": "short-lived", "role": "viewer", "expires": "1h"}
    )
    assert r.status_code == 201
    secret = r.json()["token"]
    assert admin.get(f"{API}/whoami", token=secret).json() == {
        "name": "short-lived",
        "kind": "token",
        "role": "viewer",
        "phi": False,
    }
    listed = {t["name"]: t for t in admin.get(f"{API}/tokens", token="admin").json()}
    assert listed["short-lived"]["active"] is True and "token" not in listed["short-lived"]
    res = sluice(admin.config, "token", "list", "--json")
    assert '"name": "short-lived"' in res.stdout and secret not in res.stdout
    res = sluice(admin.config, "token", "revoke", "short-lived")
    assert res.returncode == 0, res.stderr
    wait_for(lambda: admin.get(f"{API}/whoami", token=secret).status_code == 401, what="revocation applied")
    dup = admin.post(f"{API}/tokens", token="admin", json={"name": "viewer", "role": "viewer"})
    assert dup.status_code == 409 and "revoke it first" in dup.json()["error"]["message"]


def test_unknown_endpoint_and_bad_parameters_are_json(admin: Admin) -> None:
    r = admin.get("/api/v1/nothing-here", token="viewer")
    assert r.status_code == 404 and "openapi.json" in r.json()["error"]["message"]
    r = admin.get(f"{API}/messages", token="viewer", params={"limit": "many"})
    assert r.status_code == 422 and "limit" in r.json()["error"]["message"]
    assert admin.get("/openapi.json").json()["info"]["title"] == "Sluice admin API"


def test_dashboard_and_alert_rules_use_only_live_metric_names(admin: Admin) -> None:
    """Every metric the Grafana dashboard and the Prometheus rules query is in the live GET /metrics."""
    import re
    from pathlib import Path

    from prometheus_client.parser import text_string_to_metric_families

    admin.send(adt("DASH-1", "MRN-DASH"))
    wait_for(
        lambda: "sluice_ack_latency_seconds_bucket" in admin.get("/metrics").text, what="a histogram sample"
    )
    live = {
        sample.name
        for family in text_string_to_metric_families(admin.get("/metrics").text)
        for sample in family.samples
    }
    deploy = Path(__file__).resolve().parents[2] / "deploy"
    for used in (deploy / "grafana" / "sluice.json", deploy / "prometheus" / "sluice-alerts.yml"):
        names = set(re.findall(r"\bsluice_[a-z_]+\b", used.read_text()))
        assert names, used
        missing = sorted(n for n in names if n not in live)
        assert not missing, f"{used.name} queries metrics the engine does not export: {missing}"
