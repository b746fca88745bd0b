"""OIDC bearer tokens against a JWKS served by the test itself, through a real engine's admin API;
and the claim → role mapping as a pure function."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa

from engine.admin.oidc import principal_from_claims
from engine.config import OIDCConfig
from tests.support.adminengine import wait_for
from tests.support.engine import EngineProcess, basic_channel, free_port, write_config

ISSUER = "https://idp.example.test/realms/hospital"
AUDIENCE = "sluice-admin"


def test_roles_from_claims() -> None:
    cfg = OIDCConfig(
        ISSUER, AUDIENCE, "http://x", roles_claim="realm_access.roles", role_map={"it-ops": "operator"}
    )
    who = principal_from_claims(
        cfg, {"sub": "u1", "preferred_username": "pat", "realm_access": {"roles": ["it-ops"]}}
    )
    assert (who.name, who.kind, who.role, who.phi) == ("pat", "oidc", "operator", False)
    both = principal_from_claims(cfg, {"sub": "u2", "realm_access": {"roles": ["viewer", "admin", "phi"]}})
    assert both.role == "admin" and both.phi is True
    nobody = principal_from_claims(cfg, {"sub": "u3"})
    assert nobody.role is None and not nobody.can("read")


class _JWKS(BaseHTTPRequestHandler):
    body = b"{}"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def idp() -> Iterator[tuple[str, Any, Any]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", use="sig", alg="RS256")
    _JWKS.body = json.dumps({"keys": [jwk]}).encode()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _JWKS)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json", key, other
    finally:
        server.shutdown()


def _token(key: Any, *, kid: str = "k1", **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "iat": now, "exp": now + 300, **claims}
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": kid})


def test_oidc_tokens_through_the_engine(tmp_path: Path, idp: tuple[str, Any, Any]) -> None:
    jwks_url, key, other = idp
    port, admin_port = free_port(), free_port()
    cfg = write_config(
        tmp_path,
        channels={"adt": basic_channel(port)},
        destinations={"out": {"kind": "file", "directory": str(tmp_path / "out")}},
    )
    routes = yaml.safe_load(cfg.read_text())
    routes["admin"] = {
        "oidc": {
            "issuer": ISSUER,
            "audience": AUDIENCE,
            "jwks_url": jwks_url,
            "roles_claim": "groups",
            "role_map": {"interface-team": "operator", "privacy-office": "phi"},
        }
    }
    cfg.write_text(yaml.safe_dump(routes))
    url = f"http://127.0.0.1:{admin_port}"
    with EngineProcess(cfg, port, env={"SLUICE_ADMIN_PORT": str(admin_port)}):
        wait_for(lambda: _up(url), what="admin API")

        def call(token: str, path: str = "/api/v1/whoami") -> httpx.Response:
            return httpx.get(url + path, headers={"Authorization": f"Bearer {token}"}, timeout=10)

        ok = call(_token(key, preferred_username="sam", groups=["interface-team"]))
        assert ok.status_code == 200, ok.text
        assert ok.json() == {"name": "sam", "kind": "oidc", "role": "operator", "phi": False}
        assert call(_token(key, groups=["interface-team"]), "/api/v1/channels").status_code == 200
        # an operator without the phi group cannot read content; with it, can
        assert call(_token(key, groups=["interface-team"]), "/api/v1/messages/1/content").status_code == 403
        phi = call(_token(key, groups=["interface-team", "privacy-office"]))
        assert phi.json()["phi"] is True
        # no role at all: authenticated, but forbidden
        assert call(_token(key, groups=["cafeteria"]), "/api/v1/channels").status_code == 403
        for bad, why in (
            (_token(key, groups=["viewer"], exp=int(time.time()) - 3600), "expired"),
            (_token(key, groups=["viewer"], aud="another-app"), "audience"),
            (_token(key, groups=["viewer"], iss="https://evil.example.test"), "issuer"),
            (_token(other, groups=["viewer"]), "signature"),
            (_token(key, kid="unknown", groups=["viewer"]), "key"),
        ):
            r = call(bad)
            assert r.status_code == 401, (why, r.text)
            assert r.json()["error"]["code"] == "unauthorized"
        unsigned = jwt.encode(
            {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": int(time.time()) + 60, "groups": ["admin"]},
            None,
            algorithm="none",
        )
        assert call(unsigned).status_code == 401


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
