"""Live reload over real sockets (issue #16): `sluice reload` (SIGHUP), POST /api/v1/reload, a failed
reload, a changed port; one sender keeps its connection open throughout."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from engine import store as st
from engine.admin import audit
from tests.support.engine import ROOT, EngineProcess, basic_channel, free_port, write_config
from tests.support.polling import wait_for

SB, EB = b"\x0b", b"\x1c\r"


def adt(control: str) -> bytes:
    return (
        f"MSH|^~\\&|EHR|NORTH|SL|HOSP|20250101120000||ADT^A08^ADT_A01|{control}|P|2.5.1\r"
        "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex||19800101|F\r"
        "PV1|1|O\r"
    ).encode()


def oru(control: str) -> bytes:
    return (
        f"MSH|^~\\&|LAB|NORTH|SL|HOSP|20250101120000||ORU^R01^ORU_R01|{control}|P|2.5.1\r"
        "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex||19800101|F\r"
        "OBR|1||F1|GLU^Glucose^L\r"
        "OBX|1|NM|GLU^Glucose^L||5.5|mmol/L|||||F\r"
    ).encode()


class Sender:
    """One MLLP connection, kept open: each call sends a frame and reads its ACK (MSA-1 returned)."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def send(self, payload: bytes) -> str:
        self.sock.sendall(SB + payload + EB)
        while EB not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the engine closed the connection")
            self.buf += chunk
        frame, self.buf = self.buf.split(EB, 1)
        msa = next(s for s in frame.lstrip(SB).split(b"\r") if s.startswith(b"MSA"))
        return msa.split(b"|")[1].decode()

    def close(self) -> None:
        self.sock.close()


def _channel_file(cfg: Path, name: str) -> Path:
    return cfg.parent / "channels" / f"{name}.yaml"


def _edit_channel(cfg: Path, name: str, **changes: Any) -> None:
    path = _channel_file(cfg, name)
    data = yaml.safe_load(path.read_text())
    data.update(changes)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _sluice(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ),
    )


def _file_dest(out: Path) -> dict[str, Any]:
    return {"kind": "file", "directory": str(out), "pattern": "{control_id}.{ext}", "fsync": False}


def test_reload_while_a_sender_keeps_sending(tmp_path: Path) -> None:
    """Accepted types and the transform change mid-stream: no drop, no loss, the next message sees it."""
    port = free_port()
    out = tmp_path / "out"
    cfg = write_config(
        tmp_path,
        channels={"c": basic_channel(port, accept={"types": ["ADT"]})},
        destinations={"out": _file_dest(out)},
        processing={"workers": 1},  # a worker process: it must get the new pipeline too
    )
    results: list[tuple[str, str, float, float]] = []  # (control id, ACK code, sent at, answered at)
    stop = threading.Event()
    failure: list[BaseException] = []

    def keep_sending(sender: Sender) -> None:
        i = 0
        try:
            while not stop.is_set():
                i += 1
                control = f"{'A' if i % 2 else 'R'}{i:04d}"
                sent = time.monotonic()
                code = sender.send(adt(control) if i % 2 else oru(control))
                results.append((control, code, sent, time.monotonic()))
                time.sleep(0.01)
        except BaseException as exc:
            failure.append(exc)

    with EngineProcess(cfg, port) as engine:
        sender = Sender(port)
        thread = threading.Thread(target=keep_sending, args=(sender,))
        thread.start()
        try:
            wait_for(lambda: len(results) >= 30, what="messages before the reload")
            _edit_channel(cfg, "c", accept={"types": ["ADT", "ORU"]}, transform=["hl7-to-json"])
            started = time.monotonic()
            res = _sluice("reload", "--config", str(cfg))
            applied = time.monotonic()
            assert res.returncode == 0, res.stdout + res.stderr
            assert "reloaded: channels changed: c" in res.stdout
            n = len(results)
            wait_for(lambda: len(results) >= n + 30, what="messages after the reload")
        finally:
            stop.set()
            thread.join(20)
            sender.close()
        assert not failure, f"the sender's connection failed: {failure!r}"
        # every ADT accepted; ORUs refused before the reload started, accepted once it was applied
        assert all(code == "AA" for c, code, _, _ in results if c.startswith("A"))
        before = [code for c, code, _, done in results if c.startswith("R") and done < started]
        after = [code for c, code, sent, _ in results if c.startswith("R") and sent > applied]
        assert before and set(before) == {"AR"}
        assert after and set(after) == {"AA"}
        accepted = {c for c, code, _, _ in results if code == "AA"}
        # no message lost: every accepted one is stored and delivered; after the reload as JSON (the
        # worker process's new pipeline), before it as HL7
        wait_for(lambda: len(list(out.iterdir())) >= len(accepted), what="every delivery")
        delivered = {p.stem: p.suffix for p in out.iterdir()}
        assert set(delivered) == accepted
        assert delivered[next(c for c, _, s, _ in results if c.startswith("R") and s > applied)] == ".json"
        assert delivered[results[0][0]] == ".hl7"
        assert engine.proc is not None and engine.proc.poll() is None
    s = st.Store(f"sqlite:///{tmp_path}/sluice.db")
    try:
        stored = {r.control_id: r.status for r in s.list_messages(limit=10000)}
        assert {c for c, status in stored.items() if status == st.PROCESSED} == accepted
        (entry,) = audit.entries(s, action=audit.CONFIG_RELOAD)
        assert entry.detail["ok"] is True and entry.detail["channels_changed"] == ["c"]
        assert entry.source == "signal SIGHUP"
    finally:
        s.close()


def test_failed_reload_changes_nothing(tmp_path: Path) -> None:
    """An invalid config: the CLI exits 1 with the loader's message, the API answers 422, both audited
    by the engine when it was asked; the running channel keeps its rules and its connections."""
    port, admin_port = free_port(), free_port()
    cfg = write_config(
        tmp_path,
        channels={"c": basic_channel(port, accept={"types": ["ADT"]})},
        destinations={"out": _file_dest(tmp_path / "out")},
    )
    created = _sluice("token", "create", "--name", "ops", "--role", "admin", "--config", str(cfg))
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    with EngineProcess(cfg, port, env={"SLUICE_ADMIN_PORT": str(admin_port)}):
        sender = Sender(port)
        try:
            assert sender.send(oru("R1")) == "AR"
            _edit_channel(cfg, "c", accept={"types": ["ADT", "ORU"]}, routes=[{"destination": "nowhere"}])
            # the CLI validates first and does not ask the engine
            res = _sluice("reload", "--config", str(cfg))
            assert res.returncode == 1
            assert "unknown destination 'nowhere'" in res.stderr and "routes[0].destination" in res.stderr
            # the engine validates too: asked directly, it refuses with the same message
            url = f"http://127.0.0.1:{admin_port}/api/v1/reload"
            resp = httpx.post(url, headers={"Authorization": f"Bearer {secret}"}, timeout=30)
            assert resp.status_code == 422, resp.text
            body = resp.json()["error"]
            assert body["code"] == "invalid_config"
            assert (
                "unknown destination 'nowhere'" in body["message"]
                and "nothing was changed" in body["message"]
            )
            assert httpx.post(url, timeout=30).status_code == 401
            # the running rules are untouched and the connection still works
            assert sender.send(oru("R2")) == "AR"
            assert sender.send(adt("A1")) == "AA"
            # a change that needs a restart is refused too, saying so
            _edit_channel(cfg, "c", routes=[{"destination": "out"}])
            routes = yaml.safe_load(cfg.read_text())
            routes["node_id"] = "node-2"
            cfg.write_text(yaml.safe_dump(routes))
            resp = httpx.post(url, headers={"Authorization": f"Bearer {secret}"}, timeout=30)
            assert resp.status_code == 422
            assert (
                "node_id changed" in resp.json()["error"]["message"]
                and "restart" in resp.json()["error"]["message"]
            )
            # undo it: the reload through the API applies, for the next message on the same connection
            routes["node_id"] = "node-1"
            cfg.write_text(yaml.safe_dump(routes))
            res = _sluice(
                "reload", "--config", str(cfg), "--token", secret, "--url", f"http://127.0.0.1:{admin_port}"
            )
            assert res.returncode == 0, res.stderr
            assert "channels changed: c" in res.stdout
            assert sender.send(oru("R3")) == "AA"
        finally:
            sender.close()
    s = st.Store(f"sqlite:///{tmp_path}/sluice.db")
    try:
        rows = audit.entries(s, action=audit.CONFIG_RELOAD)
        assert [r.detail["ok"] for r in reversed(rows)] == [False, False, True]
        assert all(r.actor == "ops" and r.actor_kind == "token" for r in rows)
        assert "unknown destination" in rows[-1].detail["error"]
    finally:
        s.close()


def test_port_change_rebinds_and_keeps_open_connections(tmp_path: Path) -> None:
    """The listener moves to the new port; a connection on the old one is served until it closes; a new
    connection to the old port is refused; a channel added by the reload listens on its own port; a changed
    destination delivers what comes after the reload."""
    port, new_port, added_port = free_port(), free_port(), free_port()
    out, out2 = tmp_path / "out", tmp_path / "out2"
    cfg = write_config(tmp_path, channels={"c": basic_channel(port)}, destinations={"out": _file_dest(out)})
    with EngineProcess(cfg, port):
        old = Sender(port)
        try:
            assert old.send(adt("A1")) == "AA"
            wait_for(lambda: (out / "A1.hl7").exists(), what="the delivery before the reload")
            src = yaml.safe_load(_channel_file(cfg, "c").read_text())["source"]
            _edit_channel(cfg, "c", source={**src, "port": new_port})
            (cfg.parent / "channels" / "d.yaml").write_text(
                yaml.safe_dump({"name": "d", **basic_channel(added_port)})
            )
            routes = yaml.safe_load(cfg.read_text())  # and the destination writes elsewhere from now on
            routes["destinations"]["out"]["directory"] = str(out2)
            cfg.write_text(yaml.safe_dump(routes))
            res = _sluice("reload", "--config", str(cfg))
            assert res.returncode == 0, res.stdout + res.stderr
            assert "channels added: d" in res.stdout and "channels rebound: c" in res.stdout
            assert "destinations changed: out" in res.stdout
            assert old.send(adt("A2")) == "AA"  # still served on the old port
            new = Sender(new_port)
            assert new.send(adt("A3")) == "AA"
            new.close()
            added = Sender(added_port)
            assert added.send(adt("D1")) == "AA"
            added.close()
            try:
                refused = socket.create_connection(("127.0.0.1", port), timeout=2)
            except OSError:
                pass
            else:
                refused.close()
                raise AssertionError("the old port still accepts new connections")
            assert old.send(adt("A4")) == "AA"
        finally:
            old.close()
        wait_for(lambda: (out / "A1.hl7").exists(), what="the delivery before the reload")
        wait_for(
            lambda: {p.stem for p in out2.iterdir()} >= {"A2", "A3", "A4", "D1"}, what="deliveries after it"
        )
        assert {p.stem for p in out.iterdir()} == {"A1"}  # the old destination took nothing after the reload
