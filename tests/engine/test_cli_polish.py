"""What a new user found (issue #16): header rows, empty lists said so, readable types, spelling
suggestions everywhere, a port in use reported before the store file exists."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from engine import config
from engine.cli import MESSAGE_COLUMNS, main
from engine.errors import ConfigError
from engine.store import NewMessage, Store
from tests.support.engine import ROOT, basic_channel, free_port, write_config


def _cfg(tmp_path: Path) -> Path:
    return write_config(
        tmp_path,
        channels={"adt": basic_channel(free_port())},
        destinations={"out": {"kind": "file", "directory": str(tmp_path / "out")}},
    )


def test_empty_lists_say_so_and_messages_list_has_a_header(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    runner = CliRunner()
    res = runner.invoke(main, ["dead-letter", "list", "--config", str(cfg)])
    assert res.exit_code == 0 and "no dead letters: the queue is empty" in res.output
    res = runner.invoke(main, ["dead-letter", "list", "--channel", "adt", "--config", str(cfg)])
    assert "no dead letters for channel adt: the queue is empty" in res.output
    res = runner.invoke(main, ["messages", "list", "--config", str(cfg)])
    assert res.exit_code == 0 and "no messages match" in res.output
    store = Store(config.load(cfg).store_url)
    try:
        with store.write() as conn:
            # a junk frame: nothing of MSH-9 could be read
            store.insert_messages(
                conn, [NewMessage(channel="adt", received_at=1.0, peer="p", raw=b"junk", status="rejected")]
            )
    finally:
        store.close()
    res = runner.invoke(main, ["messages", "list", "--config", str(cfg)])
    header, row = res.output.splitlines()
    assert header.split("\t") == list(MESSAGE_COLUMNS)
    assert len(row.split("\t")) == len(MESSAGE_COLUMNS)
    assert row.split("\t")[3] == "(unreadable)"
    res = runner.invoke(main, ["messages", "list", "--no-header", "--config", str(cfg)])
    assert len(res.output.splitlines()) == 1
    res = runner.invoke(main, ["messages", "show", row.split("\t")[0], "--config", str(cfg)])
    assert (
        "type:        (unreadable)" in res.output and "^" not in res.output.split("type:")[1].splitlines()[0]
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(["messages", "list", "--chanel", "x"], "Did you mean '--channel'?", id="option"),
        pytest.param(["replay", "--stat", "dead"], "Did you mean '--status'?", id="option-2"),
        pytest.param(["send", "--tp", "h:1", "f"], "Did you mean '--to'?", id="option-3"),
        pytest.param(["mesages", "list"], "Did you mean 'messages'?", id="command"),
        pytest.param(["dead-letter", "lst"], "Did you mean 'list'?", id="subcommand"),
        pytest.param(["replay", "--channel", "c", "--status", "deaad"], "did you mean 'dead'?", id="choice"),
        pytest.param(
            ["token", "create", "--name", "x", "--role", "admn"], "did you mean 'admin'?", id="choice-2"
        ),
        pytest.param(
            ["audit", "list", "--action", "config.relod"], "did you mean 'config.reload'?", id="choice-3"
        ),
        pytest.param(["keys", "rotat"], "Did you mean 'rotate'?", id="subcommand-2"),
    ],
)
def test_spelling_suggestions(args: list[str], expected: str) -> None:
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and expected in res.output, res.output


def test_replay_options_have_help() -> None:
    res = CliRunner().invoke(main, ["replay", "--help"])
    text = " ".join(res.output.split())
    assert "--channel TEXT Replay messages of this channel (with --status)." in text
    assert "dead (redo dead deliveries)" in text


def test_config_errors_suggest_the_key_and_the_channel(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    data = yaml.safe_load(cfg.read_text())
    data["node_idd"] = "x"
    cfg.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="did you mean 'node_id'"):
        config.load(cfg)
    del data["node_idd"]
    cfg.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="did you mean 'adt'"):
        config.load(cfg).channel("atd")


def test_port_in_use_is_reported_before_the_store_is_created(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        cfg = write_config(
            tmp_path,
            channels={"adt": basic_channel(port)},
            destinations={"out": {"kind": "file", "directory": str(tmp_path / "out")}},
        )
        res = subprocess.run(
            [sys.executable, "-m", "engine.cli", "run", "--config", str(cfg)],
            cwd=str(ROOT),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert res.returncode == 1
    assert f"channel adt cannot listen on 127.0.0.1:{port}" in res.stderr
    assert "--port" in res.stderr and "source.port" in res.stderr
    assert not (tmp_path / "sluice.db").exists()


def test_messages_show_says_the_next_step_of_a_status_that_needs_one() -> None:
    from engine.cli import next_step

    assert next_step("error", 12).endswith("sluice reload, then sluice replay --id 12")
    assert "applies it anyway" in next_step("review", 3)
    for status in ("filtered", "quarantined", "rejected"):
        assert "sluice replay --id 5" in next_step(status, 5)
    assert next_step("processed", 1) == "" and next_step("received", 1) == ""
