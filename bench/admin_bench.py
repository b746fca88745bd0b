"""Admin API benchmarks (issue #10): intake with the admin app on vs off, and message search at scale.

* ``intake``: the engine (SQLite, commit before ACK, passthrough → file) driven by ``mllp_load.py`` at 1 and
  50 connections, alternating admin on / admin off runs (ABAB...) so drift on a shared machine hits both.
  "On" also polls ``/api/v1/channels`` and ``/metrics`` once a second during the run, as a dashboard would.
* ``search``: 1,000,000 synthetic messages (no real data) in a fresh SQLite file and a fresh PostgreSQL
  database, then the indexed searches of ``GET /api/v1/messages`` (the same ``engine.admin.search``
  function), each timed as the median and max of repeated calls.

    python bench/admin_bench.py                        # both
    python bench/admin_bench.py --only search --rows 1000000
    python bench/admin_bench.py --only intake --seconds 10 --rounds 3

Figures go to bench/results/admin.json.  Nothing here is a test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import yaml  # noqa: E402

from engine.admin import search  # noqa: E402
from engine.store import Store  # noqa: E402
from tests.support.engine import EngineProcess, basic_channel, free_port, write_config  # noqa: E402

RESULTS = ROOT / "bench" / "results"
LOAD = [sys.executable, str(ROOT / "bench" / "mllp_load.py")]
TOKEN_CREATE = [sys.executable, "-m", "engine.cli", "token", "create", "--name", "bench", "--role", "viewer"]
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


# ---------------------------------------------------------------------------------------------- intake


def _load(port: int, connections: int, seconds: float, rate: float | None) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        out = tmp.name
    cmd = [*LOAD, "--port", str(port), "--connections", str(connections), "--seconds", str(seconds)]
    if rate:
        cmd += ["--rate", str(rate)]
    subprocess.run([*cmd, "--warmup", "0", "--json", out], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    data: dict[str, Any] = json.loads(Path(out).read_text())["results"][0]
    os.unlink(out)
    return data


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _poller(url: str, token: str, stop: threading.Event, count: list[int]) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(timeout=5) as client:
        while not stop.wait(1.0):
            client.get(url + "/api/v1/channels", headers=headers).raise_for_status()
            client.get(url + "/metrics").raise_for_status()
            count[0] += 2


def intake_once(admin_on: bool, connections: int, seconds: float, rate: float | None) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="sluice-admin-bench-"))
    port, admin_port = free_port(), free_port()
    cfg = write_config(
        work,
        channels={"bench": basic_channel(port)},
        destinations={"out": {"kind": "file", "directory": str(work / "out"), "fsync": True}},
        processing={"workers": 0},  # one process: its CPU is the whole cost per message
    )
    routes = yaml.safe_load(cfg.read_text())
    routes["admin"] = {"enabled": admin_on, "port": admin_port}
    cfg.write_text(yaml.safe_dump(routes))
    eng = EngineProcess(cfg, port, env={"SLUICE_ADMIN_PORT": str(admin_port)}).start()
    assert eng.proc is not None
    stop, polls = threading.Event(), [0]
    poller = None
    try:
        if admin_on:
            url = f"http://127.0.0.1:{admin_port}"
            for _ in range(100):
                try:
                    httpx.get(url + "/healthz", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            token = subprocess.run(
                [*TOKEN_CREATE, "--config", str(cfg)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            poller = threading.Thread(target=_poller, args=(url, token, stop, polls), daemon=True)
            poller.start()
        cpu0 = _cpu_seconds(eng.proc.pid)
        data = _load(port, connections, seconds, rate)
        cpu = _cpu_seconds(eng.proc.pid) - cpu0
    finally:
        stop.set()
        if poller is not None:
            poller.join(5)
        eng.stop()
    return {
        "admin": admin_on,
        "connections": connections,
        "rate": rate,
        "msg_per_s": data["msg_per_s"],
        "sent": data["sent"],
        "engine_cpu_ms_per_msg": round(cpu * 1000 / max(1, data["sent"]), 4),
        "latency_ms": data["latency_ms"],
        "api_requests": polls[0],
    }


def intake(seconds: float, rounds: int) -> dict[str, Any]:
    """ABAB: admin on and off alternate, each scenario ``rounds`` times; medians compared."""
    scenarios = [(50, None), (10, 500.0)]
    runs: list[dict[str, Any]] = []
    for _ in range(rounds):
        for connections, rate in scenarios:
            for admin_on in (True, False):
                r = intake_once(admin_on, connections, seconds, rate)
                print(
                    f"intake admin={'on ' if admin_on else 'off'} c={connections} rate={rate}: "
                    f"{r['msg_per_s']:.0f} msg/s, engine {r['engine_cpu_ms_per_msg']:.3f} ms CPU/msg"
                )
                runs.append(r)
    summary = {}
    for connections, rate in scenarios:
        name = f"{connections}_connections" + (f"_at_{rate:g}_per_s" if rate else "")
        mine = [r for r in runs if r["connections"] == connections and r["rate"] == rate]
        on = [r for r in mine if r["admin"]]
        off = [r for r in mine if not r["admin"]]
        summary[name] = {
            "msg_per_s_on": statistics.median(r["msg_per_s"] for r in on),
            "msg_per_s_off": statistics.median(r["msg_per_s"] for r in off),
            "cpu_ms_per_msg_on": statistics.median(r["engine_cpu_ms_per_msg"] for r in on),
            "cpu_ms_per_msg_off": statistics.median(r["engine_cpu_ms_per_msg"] for r in off),
        }
    return {"runs": runs, "summary": summary}


# ---------------------------------------------------------------------------------------------- search

CHANNELS = ("allscripts", "lab", "sched")
TYPES = (("ADT", "A08"), ("ADT", "A01"), ("ORU", "R01"), ("SIU", "S12"))
STATUSES = ("processed",) * 18 + ("filtered", "error")


def fill(store: Store, rows: int, key: bytes, batch: int = 20_000) -> tuple[float, list[str], list[str]]:
    """Insert ``rows`` synthetic messages; return (seconds, some control ids, some patient ids)."""
    rnd = random.Random(7)
    t0 = time.time() - rows * 0.05  # 20 messages a second of history
    probes_ctl: list[str] = []
    probes_mrn: list[str] = []
    cols = (
        "channel, received_at, peer, raw, size, control_id, sending_app, sending_facility, message_type, trigger, "
        "version, patient_key, order_key, content_hash, dedupe_key, status, reason, ack_code, lease_owner, "
        "lease_until, processed_at, override_guards"
    )
    n_cols = cols.count(",") + 1
    ph = "?" if store.is_sqlite else "%s"
    sql = f"INSERT INTO messages ({cols}) VALUES ({', '.join([ph] * n_cols)})"
    started = time.perf_counter()
    # Bulk load: the message indexes are dropped first and built once at the end (what is measured is
    # the searches, not the load), and SQLite skips its fsyncs while loading.
    from engine.store import M

    for index in M.indexes:
        index.drop(store.engine, checkfirst=True)
    raw = store.engine.raw_connection()
    try:
        cur = raw.cursor()
        if store.is_sqlite:
            cur.execute("PRAGMA synchronous=OFF")
        for start in range(0, rows, batch):
            params = []
            for i in range(start, min(rows, start + batch)):
                ctl = f"CTL{i:09d}"
                mrn = f"MRN{rnd.randrange(200_000):07d}"
                mtype, trig = TYPES[i % len(TYPES)]
                if i % 50_000 == 0:
                    probes_ctl.append(ctl)
                    probes_mrn.append(mrn)
                params.append(
                    (
                        CHANNELS[i % 3],
                        t0 + i * 0.05,
                        "127.0.0.1:1",
                        b"MSH|^~\\&|synthetic",
                        400,
                        ctl,
                        "EHR",
                        "NORTH",
                        mtype,
                        trig,
                        "2.5.1",
                        search.patient_hash(key, mrn),
                        "",
                        hashlib.blake2b(ctl.encode(), digest_size=16).hexdigest(),
                        f"EHR|NORTH|{ctl}",
                        STATUSES[i % len(STATUSES)],
                        "",
                        "AA",
                        "",
                        0.0,
                        t0 + i * 0.05 + 0.01,
                        False,
                    )
                )
            cur.executemany(sql, params)
            raw.commit()
        cur.close()
    finally:
        raw.close()
    for index in M.indexes:
        index.create(store.engine, checkfirst=True)
    return time.perf_counter() - started, probes_ctl, probes_mrn


def timed(fn: Any, repeat: int = 15) -> dict[str, float]:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return {"median_ms": round(statistics.median(times), 2), "max_ms": round(max(times), 2)}


def search_suite(store: Store, rows: int) -> dict[str, Any]:
    key = search.installation_key(store)
    secs, ctls, mrns = fill(store, rows, key)
    if store.is_sqlite:
        store._raw_sql("ANALYZE")
    else:
        with store.engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE messages")
    newest = time.time()
    q = search.MessageQuery
    first_page, cursor = search.search(store, q(limit=50))
    deep_cursor = rows // 2
    cases: dict[str, Any] = {
        "control_id": lambda: search.search(store, q(control_id=random.choice(ctls))),
        "patient": lambda: search.search(
            store, q(patient_hash=search.patient_hash(key, random.choice(mrns)))
        ),
        "newest page": lambda: search.search(store, q(limit=50)),
        "next page (cursor)": lambda: search.search(store, q(limit=50, cursor=cursor)),
        "deep page (cursor at half)": lambda: search.search(store, q(limit=50, cursor=deep_cursor)),
        "channel + status=error": lambda: search.search(store, q(channel="lab", status="error", limit=50)),
        "type + trigger": lambda: search.search(store, q(type="ORU", trigger="R01", limit=50)),
        "last hour": lambda: search.search(store, q(since=newest - 3600, limit=50)),
        "a day a week ago": lambda: search.search(
            store, q(since=newest - 8 * 86400, until=newest - 7 * 86400, limit=50)
        ),
    }
    queries: dict[str, dict[str, float]] = {}
    for name, fn in cases.items():
        fn()  # warm
        queries[name] = timed(fn)
        print(f"  {name:30s} {queries[name]}")
    assert first_page
    return {"rows": rows, "fill_seconds": round(secs, 1), "queries": queries}


def search_bench(rows: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="sluice-search-bench-"))
    print(f"SQLite, {rows:,} messages")
    store = Store(f"sqlite:///{work}/search.db")
    res["sqlite"] = search_suite(store, rows)
    store.close()
    from sqlalchemy import create_engine, text

    name = f"sluice_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        print(f"PostgreSQL, {rows:,} messages")
        store = Store(PG_ADMIN.rsplit("/", 1)[0] + f"/{name}")
        res["postgresql"] = search_suite(store, rows)
        store.close()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["intake", "search"])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rows", type=int, default=1_000_000)
    args = ap.parse_args()
    out: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()},
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if args.only in (None, "search"):
        out["search"] = search_bench(args.rows)
    if args.only in (None, "intake"):
        out["intake"] = intake(args.seconds, args.rounds)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "admin.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update(out)
    path.write_text(json.dumps(old, indent=2) + "\n")
    print(f"figures: {path}")


if __name__ == "__main__":
    main()
