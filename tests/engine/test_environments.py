"""Environments (issue #16): routes.<env>.yaml overlays, channel_overrides, `check --env`, `config show`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from engine import config, overlays
from engine.cli import main
from engine.errors import ConfigError
from tests.support.engine import basic_channel, write_config


def test_deep_merge_rules() -> None:
    base = {"a": {"x": 1, "y": [1, 2], "z": {"k": 1}}, "b": 2, "c": 3}
    over = {"a": {"y": [3], "z": {"j": 2}}, "b": None, "d": 4}
    assert overlays.deep_merge(base, over) == {"a": {"x": 1, "y": [3], "z": {"k": 1, "j": 2}}, "c": 3, "d": 4}
    assert base["b"] == 2 and base["a"]["y"] == [1, 2]  # inputs untouched


def test_masked_hides_secrets_not_references() -> None:
    data = {
        "store": "postgresql+psycopg://app:hunter2@db/x",
        "destinations": {
            "f": {
                "kind": "fhir",
                "token": "abc",
                "auth": {"client_secret": "s3cret", "client_id": "sluice", "password": {"env": "PW"}},
                "headers": {"Authorization": "Bearer zzz"},
                "api_keys": ["k1", "k2"],
            }
        },
        "store_encryption": {"env": "KEYS"},
    }
    m = overlays.masked(data)
    text = yaml.safe_dump(m)
    for secret in ("hunter2", "abc", "s3cret", "zzz", "k1", "k2"):
        assert secret not in text
    assert m["store"] == "postgresql+psycopg://app:********@db/x"
    assert m["destinations"]["f"]["auth"]["client_id"] == "sluice"
    assert m["destinations"]["f"]["auth"]["password"] == {"env": "PW"}  # where it comes from, not the value
    assert m["store_encryption"] == {"env": "KEYS"}


def _project(tmp_path: Path) -> Path:
    cfg = write_config(
        tmp_path,
        channels={"adt": basic_channel(2575)},
        destinations={"out": {"kind": "file", "directory": "var/out"}},
    )
    (tmp_path / "routes.prod.yaml").write_text(
        yaml.safe_dump(
            {
                "store": "postgresql+psycopg://sluice:pw-in-url@db.prod.internal/sluice",
                "node_id": "prod-1",
                "destinations": {
                    "out": {"directory": "/data/out"},
                    "lab": {
                        "kind": "http",
                        "url": "http://127.0.0.1:9/x",
                        "headers": {"X-Api-Key": {"env": "LAB_KEY"}},
                    },
                },
                "channel_overrides": {"adt": {"source": {"host": "0.0.0.0", "port": 2600}}},
            }
        )
    )
    return cfg


def test_overlay_changes_store_destinations_and_channel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SLUICE_ENV", raising=False)
    monkeypatch.delenv("SLUICE_STORE", raising=False)
    cfg_path = _project(tmp_path)
    base = config.load(cfg_path)
    prod = config.load(cfg_path, env="prod")
    assert base.env is None and prod.env == "prod"
    assert base.store_url.startswith("sqlite:///") and prod.store_url.endswith("@db.prod.internal/sluice")
    assert prod.node_id == "prod-1"
    assert dict(prod.destinations["out"].options) == {"directory": "/data/out"}  # merged: kind kept
    assert prod.destinations["out"].kind == "file" and "lab" in prod.destinations
    assert (prod.channels[0].source.host, prod.channels[0].source.port) == ("0.0.0.0", 2600)
    assert (
        prod.channels[0].source.idle_timeout == base.channels[0].source.idle_timeout
    )  # merged, not replaced
    assert prod.channels[0].file == base.channels[0].file
    monkeypatch.setenv("SLUICE_ENV", "prod")
    assert config.load(cfg_path).node_id == "prod-1"


def test_overlay_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLUICE_ENV", raising=False)
    cfg_path = _project(tmp_path)
    with pytest.raises(ConfigError, match="no overlay file for environment 'staging'") as e:
        config.load(cfg_path, env="staging")
    assert "routes.staging.yaml" in str(e.value)
    with pytest.raises(ConfigError, match="not usable"):
        config.load(cfg_path, env="../x")
    (tmp_path / "routes.bad.yaml").write_text(
        yaml.safe_dump({"channel_overrides": {"adx": {"enabled": False}}})
    )
    with pytest.raises(ConfigError, match="channel_overrides names no channel 'adx'") as e:
        config.load(cfg_path, env="bad")
    assert "known channels: adt" in str(e.value)
    (tmp_path / "routes.typo.yaml").write_text(yaml.safe_dump({"nod_id": "x"}))
    with pytest.raises(ConfigError, match="unknown key 'nod_id'") as e:
        config.load(cfg_path, env="typo")
    assert "typo overlay" in str(e.value)


def test_check_and_config_show_with_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLUICE_ENV", raising=False)
    monkeypatch.delenv("SLUICE_STORE", raising=False)
    monkeypatch.setenv("LAB_KEY", "k-123")
    cfg_path = _project(tmp_path)
    runner = CliRunner()
    res = runner.invoke(main, ["check", "--config", str(cfg_path), "--env", "prod"])
    assert res.exit_code == 0, res.output
    assert "(environment prod)" in res.output and "channel adt: 0.0.0.0:2600" in res.output
    assert "pw-in-url" not in res.output and "k-123" not in res.output  # env-referenced value never shown
    res = runner.invoke(main, ["config", "show", "--config", str(cfg_path), "--env", "prod"])
    assert res.exit_code == 0, res.output
    shown = yaml.safe_load(res.output)
    assert shown["environment"] == "prod"
    assert shown["routes"]["store"] == "postgresql+psycopg://sluice:********@db.prod.internal/sluice"
    assert shown["routes"]["destinations"]["lab"]["headers"]["X-Api-Key"] == {"env": "LAB_KEY"}
    assert shown["channels"]["adt"]["source"]["port"] == 2600
    assert "pw-in-url" not in res.output and "k-123" not in res.output  # env-referenced value never shown
    res = runner.invoke(main, ["check", "--config", str(cfg_path), "--env", "staging"])
    assert res.exit_code == 1 and "no overlay file for environment 'staging'" in res.output
