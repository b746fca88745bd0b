"""Store files private (issue #12): the engine creates its store, WAL, SHM, output directories and files
0600/0700 whatever the umask it was started with; ``sluice check`` warns about ones others can read."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

from click.testing import CliRunner

from engine.cli import main
from engine.client import MLLPClient, parse_ack
from tests.support.engine import EngineProcess, basic_channel, free_port, write_config
from tests.support.polling import wait_for


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def adt(cid: str) -> bytes:
    return (
        f"MSH|^~\\&|EHR|NORTH|SL|HOSP|20250101120000||ADT^A08^ADT_A01|{cid}|P|2.5.1\r"
        "PID|1||P1^^^NORTH^MR||Testpatient^Alex\r"
    ).encode()


def test_engine_creates_its_files_private_under_a_permissive_umask(tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "out"
    db = tmp_path / "var" / "sluice.db"
    cfg = write_config(
        tmp_path,
        channels={"c": basic_channel(port)},
        destinations={"out": {"kind": "file", "directory": str(out)}},
        store=f"sqlite:///{db}",
    )
    old = os.umask(0o002)  # the engine process inherits a umask that would make everything group-writable
    try:
        engine = EngineProcess(cfg, port).start()
    finally:
        os.umask(old)
    try:

        async def send() -> str:
            c = MLLPClient("127.0.0.1", port)
            try:
                return parse_ack(await c.send(adt("PF1"))).code
            finally:
                await c.close()

        assert asyncio.run(send()) == "AA"
        files = wait_for(lambda: [p for p in out.rglob("*") if p.is_file()], what="the delivered file")
        assert mode(db.parent) == 0o700
        for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            assert mode(p) == 0o600, p
        assert mode(out) == 0o700 and all(mode(d) == 0o700 for d in out.rglob("*") if d.is_dir())
        assert all(mode(f) == 0o600 for f in files)
    finally:
        engine.stop()
    res = CliRunner().invoke(main, ["check", "--config", str(cfg)])
    assert res.exit_code == 0 and "warning" not in res.output, res.output


def test_check_warns_about_a_store_and_key_file_others_can_read(tmp_path: Path) -> None:
    db = tmp_path / "sluice.db"
    cfg = write_config(
        tmp_path,
        channels={"c": basic_channel(free_port())},
        destinations={"out": {"kind": "file", "directory": str(tmp_path / "out")}},
        store=f"sqlite:///{db}",
    )
    runner = CliRunner()
    keys = tmp_path / "store.keys"
    assert runner.invoke(main, ["keys", "create", "--out", str(keys)]).exit_code == 0
    cfg.write_text(cfg.read_text() + f"store_encryption: {{key_file: {keys}}}\n")
    old = os.umask(0o022)
    try:  # a command that opens the store creates it 0600 whatever the umask
        assert runner.invoke(main, ["messages", "list", "--config", str(cfg)]).exit_code == 0
    finally:
        os.umask(old)
    assert mode(db) == 0o600
    quiet = runner.invoke(main, ["check", "--config", str(cfg)])
    assert quiet.exit_code == 0 and "warning" not in quiet.output, quiet.output
    assert "store encryption: on" in quiet.output
    db.chmod(0o644)
    keys.chmod(0o640)
    tmp_path.chmod(0o755)
    try:
        loud = runner.invoke(main, ["check", "--config", str(cfg)])
    finally:
        tmp_path.chmod(0o700)
    assert loud.exit_code == 0, loud.output  # a warning, not an error
    assert f"warning: store {db} is open to group and others (mode 0644): chmod 600 {db}" in loud.output
    assert f"warning: key file {keys} is open to its group (mode 0640): chmod 600 {keys}" in loud.output
    assert f"warning: store directory {tmp_path} is open to group and others (mode 0755)" in loud.output
