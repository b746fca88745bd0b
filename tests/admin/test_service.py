"""The admin section of routes.yaml, and the API's listener: off, port taken, TLS."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from engine import config as cfgmod
from engine.errors import ConfigError
from tests.support.adminengine import wait_for
from tests.support.engine import ROOT, EngineProcess, basic_channel, free_port, write_config


def _config(tmp: Path, admin: object, port: int | None = None) -> Path:
    cfg = write_config(
        tmp,
        channels={"adt": basic_channel(port or free_port())},
        destinations={"out": {"kind": "file", "directory": str(tmp / "out")}},
    )
    routes = yaml.safe_load(cfg.read_text())
    routes["admin"] = admin
    cfg.write_text(yaml.safe_dump(routes))
    return cfg


def test_defaults_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLUICE_ADMIN_PORT", raising=False)
    cfg = cfgmod.load(_config(tmp_path, None))
    assert (cfg.admin.enabled, cfg.admin.host, cfg.admin.port, cfg.admin.metrics_auth) == (
        True,
        "127.0.0.1",
        8080,
        False,
    )
    monkeypatch.setenv("SLUICE_ADMIN_PORT", "9191")
    assert cfgmod.load(_config(tmp_path, {"port": 9000})).admin.port == 9191
    assert cfgmod.load(_config(tmp_path, {"port": 9000}), {"admin_port": 9292}).admin.port == 9292
    assert cfgmod.load(_config(tmp_path, {"enabled": False})).admin.enabled is False


@pytest.mark.parametrize(
    ("admin", "key", "hint"),
    [
        ({"prot": 1}, "admin.prot", "allowed here"),
        ({"oidc": {"issuer": "https://x", "audience": "a"}}, "admin.oidc.jwks_url", ""),
        ({"tls": {"cert": "c.pem"}}, "admin.tls", ""),
        ({"port": 70000}, "admin.port", ""),
        (
            {"oidc": {"issuer": "i", "audience": "a", "jwks_url": "u", "role_map": {"g": "boss"}}},
            "admin.oidc.role_map.g",
            "viewer, operator, admin or phi",
        ),
    ],
)
def test_bad_admin_config_names_the_key(
    tmp_path: Path, admin: object, key: str, hint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SLUICE_ADMIN_PORT", raising=False)
    with pytest.raises(ConfigError) as err:
        cfgmod.load(_config(tmp_path, admin))
    assert err.value.key == key
    assert hint in str(err.value)


def test_disabled_serves_nothing(tmp_path: Path) -> None:
    port, admin_port = free_port(), free_port()
    cfg = _config(tmp_path, {"enabled": False, "port": admin_port}, port)
    with EngineProcess(cfg, port, env={"SLUICE_ADMIN_PORT": ""}):
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", admin_port), timeout=1):
            pass
        assert "admin_listening" not in (tmp_path / "engine.log").read_text()


def test_port_in_use_is_a_clear_start_up_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        cfg = _config(tmp_path, {"port": busy})
        res = subprocess.run(
            [sys.executable, "-m", "engine.cli", "run", "--config", str(cfg), "--admin-port", str(busy)],
            cwd=str(ROOT),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert res.returncode != 0
    assert f"admin API cannot listen on 127.0.0.1:{busy}" in res.stderr
    assert "admin.port" in res.stderr and "enabled: false" in res.stderr


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "admin.crt", tmp / "admin.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_tls(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    port, admin_port = free_port(), free_port()
    cfg = _config(tmp_path, {"tls": {"cert": str(cert), "key": str(key)}}, port)
    with EngineProcess(cfg, port, env={"SLUICE_ADMIN_PORT": str(admin_port)}):
        url = f"https://127.0.0.1:{admin_port}/healthz"
        trust = ssl.create_default_context(cafile=str(cert))
        r = wait_for(lambda: _get(url, verify=trust), what="https admin API")
        assert r.json() == {"status": "ok"}
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{admin_port}/healthz", timeout=2)


def _get(url: str, verify: ssl.SSLContext) -> httpx.Response | None:
    try:
        return httpx.get(url, verify=verify, timeout=2)
    except httpx.HTTPError:
        return None
