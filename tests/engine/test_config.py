"""Config loading: errors name the file, the key path and what to do; `sluice check`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from engine import config
from engine.cli import main
from engine.errors import ConfigError
from tests.support.engine import basic_channel, write_config

ROOT = Path(__file__).resolve().parents[2]
FILE_DEST = {"out": {"kind": "file", "directory": "out"}}


def test_demo_config_loads() -> None:
    cfg = config.load(ROOT / "routes.yaml")
    # routes.yaml also loads portal-appointments
    ch = next(c for c in cfg.channels if c.name == "allscripts")
    assert ch.name == "allscripts" and ch.source.port == 2575 and ch.source.host == "127.0.0.1"
    assert ch.source.max_connections >= 200
    assert set(ch.types) >= {"ADT", "ORU", "SIU", "PPR"}
    assert "A47" in ch.types["ADT"] and "PC3" in ch.types["PPR"]
    assert cfg.store_url.endswith("var/sluice.db")


def test_unknown_key_names_file_and_path(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, channels={"a": basic_channel(1234, dedupe={"window_dayz": 3})}, destinations=FILE_DEST
    )
    with pytest.raises(ConfigError) as ei:
        config.load(path)
    msg = str(ei.value)
    assert "a.yaml" in msg and "dedupe.window_dayz" in msg and "allowed here" in msg


def test_unknown_destination(tmp_path: Path) -> None:
    ch = basic_channel(1234, routes=[{"destination": "nowhere"}])
    path = write_config(tmp_path, channels={"a": ch}, destinations=FILE_DEST)
    with pytest.raises(ConfigError, match="unknown destination 'nowhere'"):
        config.load(path)


def test_bad_time_zone(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, channels={"a": basic_channel(1234, site_tz="Mars/Olympus")}, destinations=FILE_DEST
    )
    with pytest.raises(ConfigError, match="IANA"):
        config.load(path)


def test_invalid_yaml_says_where(tmp_path: Path) -> None:
    path = write_config(tmp_path, channels={"a": basic_channel(1234)}, destinations=FILE_DEST)
    (tmp_path / "channels" / "a.yaml").write_text("name: a\nsource: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        config.load(path)


def test_bad_indent_says_the_line_and_what_to_do(tmp_path: Path) -> None:
    path = write_config(tmp_path, channels={"a": basic_channel(1234)}, destinations=FILE_DEST)
    (tmp_path / "channels" / "a.yaml").write_text("name: a\nsource:\n  host: 127.0.0.1\n   port: 2575\n")
    with pytest.raises(ConfigError) as ei:
        config.load(path)
    msg = str(ei.value)
    assert "line 4" in msg and "'   port: 2575'" in msg and "indentation" in msg


def test_a_tab_in_yaml_says_so(tmp_path: Path) -> None:
    path = write_config(tmp_path, channels={"a": basic_channel(1234)}, destinations=FILE_DEST)
    (tmp_path / "channels" / "a.yaml").write_text("name: a\nsource:\n\tport: 2575\n")
    with pytest.raises(ConfigError, match=r"line 3.*no tabs"):
        config.load(path)


def test_port_out_of_range_says_the_range(tmp_path: Path) -> None:
    ch = basic_channel(1234)
    ch["source"]["port"] = 25750000
    path = write_config(tmp_path, channels={"a": ch}, destinations=FILE_DEST)
    with pytest.raises(
        ConfigError, match=r"source.port: port 25750000 is out of range \(use a port from 1 to 65535"
    ):
        config.load(path)


def test_missing_tls_file_fails_the_check_not_the_start(tmp_path: Path) -> None:
    (tmp_path / "server.crt").write_text("pem")
    ch = basic_channel(1234)
    ch["source"]["tls"] = {"cert": str(tmp_path / "server.crt"), "key": str(tmp_path / "nowhere.key")}
    path = write_config(tmp_path, channels={"a": ch}, destinations=FILE_DEST)
    with pytest.raises(ConfigError) as ei:
        config.load(path)
    msg = str(ei.value)
    assert "a.yaml" in msg and "source.tls.key" in msg and "nowhere.key" in msg and "not found" in msg
    (tmp_path / "nowhere.key").write_text("pem")
    assert next(c for c in config.load(path).channels if c.name == "a").source.tls is not None


def test_start_failure_names_the_file_or_the_port() -> None:
    import errno

    from engine.cli import start_failure

    missing = FileNotFoundError(errno.ENOENT, "No such file or directory", "/etc/sluice/x.crt")
    assert start_failure(missing) == (
        "cannot start: No such file or directory: '/etc/sluice/x.crt' "
        "(check the path and the engine account's access to it)"
    )
    assert "another process uses the port" in start_failure(
        OSError(errno.EADDRINUSE, "Address already in use")
    )
    assert "port" not in start_failure(OSError(errno.EACCES, "Permission denied"))


def test_env_and_flag_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path, channels={"a": basic_channel(1234)}, destinations=FILE_DEST)
    monkeypatch.setenv("SLUICE_PORT", "2999")
    assert config.load(path).channels[0].source.port == 2999
    assert config.load(path, {"port": 3001}).channels[0].source.port == 3001
    monkeypatch.setenv("SLUICE_STORE", "sqlite:///elsewhere.db")
    assert config.load(path).store_url == f"sqlite:///{tmp_path / 'elsewhere.db'}"


def test_check_command_ok_and_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    path = write_config(tmp_path, channels={"a": basic_channel(1234)}, destinations=FILE_DEST)
    res = runner.invoke(main, ["check", "--config", str(path)])
    assert res.exit_code == 0, res.output
    assert "channel a" in res.output
    bad = yaml.safe_load((tmp_path / "channels" / "a.yaml").read_text())
    bad["transform"] = ["no-such-step"]
    (tmp_path / "channels" / "a.yaml").write_text(yaml.safe_dump(bad))
    res = runner.invoke(main, ["check", "--config", str(path)])
    assert res.exit_code != 0 and "unknown transform step 'no-such-step'" in res.output


def test_check_unknown_destination_kind(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, channels={"a": basic_channel(1234)}, destinations={"out": {"kind": "carrier-pigeon"}}
    )
    res = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert res.exit_code != 0 and "unknown destination kind 'carrier-pigeon'" in res.output


def test_check_demo_config() -> None:
    res = CliRunner().invoke(main, ["check", "--config", str(ROOT / "routes.yaml")])
    assert res.exit_code == 0, res.output


def test_help_lists_commands() -> None:
    res = CliRunner().invoke(main, ["--help"])
    for cmd in ("run", "send", "check", "messages", "dead-letter", "replay", "convert", "conformance"):
        assert cmd in res.output


def test_replay_of_an_id_that_does_not_exist_says_so_and_fails(tmp_path: Path) -> None:
    path = write_config(tmp_path, channels={"a": basic_channel(1234)}, destinations=FILE_DEST)
    res = CliRunner().invoke(main, ["replay", "--config", str(path), "--id", "99999"])
    assert res.exit_code == 1
    assert "message 99999: no such message" in res.output and "nothing to replay" in res.output


def test_a_misspelt_code_map_file_suggests_the_shipped_one(tmp_path: Path) -> None:
    ch = basic_channel(1234, transform=[{"hl7-to-fhir": {"code_maps": {"OBX-3": "demo-lab-code.csv"}}}])
    path = write_config(tmp_path, channels={"a": ch}, destinations=FILE_DEST)
    res = CliRunner().invoke(main, ["check", "--config", str(path)])
    msg = res.output
    assert res.exit_code == 1
    assert "code map file 'demo-lab-code.csv' not found (did you mean 'demo-lab-codes.csv'?)" in msg
    assert "code_maps.OBX-3" in msg and "transforms/maps/" in msg


def _accept(types: object, transform: list[object]) -> config.ChannelConfig:
    return config.ChannelConfig(
        name="lab",
        file="channels/lab.yaml",
        source=config.SourceConfig(),
        types=config._types(types, "channels/lab.yaml", "accept.types"),
        transform=tuple(transform),
    )


def test_accept_warnings_name_unknown_triggers_and_types() -> None:
    """accept.types is never rejected for a code HL7 or the converter does not know (senders use local
    triggers), but `sluice check` warns, naming the trigger and the type."""
    types = {"ADT": ["A01", "A0l", "X99"], "ADX": "*", "ORU": ["R01"]}
    warnings = config.accept_warnings(_accept(types, ["passthrough"]))
    assert warnings == [
        "channels/lab.yaml: accept.types.ADT: trigger 'A0L' of ADT is not an HL7 trigger event (table 0003) "
        "(did you mean 'A01'?); messages with it are accepted as written",
        "channels/lab.yaml: accept.types.ADT: trigger 'X99' of ADT is not an HL7 trigger event (table 0003); "
        "messages with it are accepted as written",
        "channels/lab.yaml: accept.types.ADX: message type 'ADX' is not an HL7 message type (table 0076) "
        "(did you mean 'ADT'?); messages of that type are accepted as written",
    ]


def test_accept_warnings_on_a_converting_channel_name_what_the_converter_does_not_map() -> None:
    types = {"ADT": ["A01", "A19"], "QRY": "*", "SIU": ["S12"]}
    warnings = config.accept_warnings(_accept(types, [{"hl7-to-fhir": {}}]))
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith(
        "channels/lab.yaml: accept.types.ADT: the hl7-to-fhir step has no mapping for ADT^A19, so such "
        "messages fail it (it converts ADT A01, A02,"
    )
    assert warnings[1].startswith(
        "channels/lab.yaml: accept.types.QRY: the hl7-to-fhir step has no mapping for message type 'QRY'"
    )
    # the same codes on a channel that does not convert: HL7 codes, nothing to say
    assert config.accept_warnings(_accept(types, ["passthrough"])) == []
    # the defaults (no accept.types) are the converter's own list
    assert config.accept_warnings(_accept(None, ["hl7-to-fhir"])) == []


def test_check_warns_about_accept_types_and_still_passes(tmp_path: Path) -> None:
    ch = basic_channel(1234, accept={"types": {"ADT": ["A01", "A0l"]}})
    path = write_config(tmp_path, channels={"a": ch}, destinations=FILE_DEST)
    res = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert res.exit_code == 0, res.output
    assert (
        f"warning: {tmp_path / 'channels' / 'a.yaml'}: accept.types.ADT: trigger 'A0L' of ADT is not an HL7 "
        "trigger event (table 0003) (did you mean 'A01'?)" in res.stderr
    )
    assert config.load(path).channels[0].types["ADT"] == ("A01", "A0L")  # accepted as written at load
    # with an error elsewhere the warning is still printed beside it
    ch["dedupe"] = {"window_dayz": 3}
    path = write_config(tmp_path, channels={"a": ch}, destinations=FILE_DEST)
    res = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert res.exit_code == 1 and "trigger 'A0L' of ADT" in res.stderr and "window_dayz" in res.stderr


def test_two_channels_on_one_port_are_reported_once(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        channels={"a": basic_channel(1234), "b": basic_channel(1234), "c": basic_channel(1234)},
        destinations=FILE_DEST,
    )
    with pytest.raises(ConfigError) as ei:
        config.load(path)
    assert str(ei.value).count("two channels listen on 127.0.0.1:1234") == 1
