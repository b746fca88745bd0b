"""Console login with an OIDC access token (a JWKS served by the test itself): the session carries the
user's role and ends when the token's exp passes; a bad token or a user without a role gets nothing."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.admin.test_oidc import _JWKS, AUDIENCE, ISSUER, _token
from tests.support.adminengine import _up, wait_for
from tests.support.engine import EngineProcess, basic_channel, free_port, write_config

NONCE = re.compile(r'name="login_csrf" value="([^"]+)"')


@pytest.fixture(scope="module")
def oidc_console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any, Any]]:
    """(console URL, the provider's signing key, another key) for an engine that accepts OIDC tokens."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", use="sig", alg="RS256")
    _JWKS.body = json.dumps({"keys": [jwk]}).encode()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _JWKS)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    tmp: Path = tmp_path_factory.mktemp("oidc-console")
    port, admin_port = free_port(), free_port()
    cfg = write_config(
        tmp,
        channels={"adt": basic_channel(port)},
        destinations={"out": {"kind": "file", "directory": str(tmp / "out")}},
    )
    routes = yaml.safe_load(cfg.read_text())
    routes["admin"] = {
        "oidc": {
            "issuer": ISSUER,
            "audience": AUDIENCE,
            "jwks_url": f"http://127.0.0.1:{server.server_address[1]}/jwks.json",
            "roles_claim": "groups",
            "role_map": {"interface-team": "operator"},
        }
    }
    cfg.write_text(yaml.safe_dump(routes))
    url = f"http://127.0.0.1:{admin_port}"
    try:
        with EngineProcess(cfg, port, env={"SLUICE_ADMIN_PORT": str(admin_port)}):
            wait_for(lambda: _up(url), 60, "admin API")
            yield url, key, other
    finally:
        server.shutdown()


def form_login(url: str, token: str) -> tuple[httpx.Client, httpx.Response]:
    c = httpx.Client(base_url=url, timeout=10)
    nonce = NONCE.search(c.get("/login").text).group(1)  # type: ignore[union-attr]
    return c, c.post("/login", data={"token": token, "login_csrf": nonce})


def test_an_oidc_user_logs_in_with_the_role_the_claim_gives(oidc_console: tuple[str, Any, Any]) -> None:
    url, key, _ = oidc_console
    assert "or an OIDC access token" in httpx.get(url + "/login").text
    c, r = form_login(url, _token(key, preferred_username="sam", groups=["interface-team"]))
    assert r.status_code == 303
    page = c.get("/channels")
    assert page.status_code == 200 and ">sam<" in page.text and "/channels/adt/pause" in page.text
    assert c.get("/audit").status_code == 403  # an operator, not an admin


def test_the_session_ends_when_the_oidc_token_expires(oidc_console: tuple[str, Any, Any]) -> None:
    url, key, _ = oidc_console
    token = _token(key, preferred_username="kim", groups=["interface-team"], exp=int(time.time()) + 3)
    c, r = form_login(url, token)
    assert r.status_code == 303 and c.get("/").status_code == 200
    wait_for(lambda: c.get("/").status_code == 303, 60, "session ended at the token's exp")


def test_a_bad_oidc_token_or_no_role_gets_nothing(oidc_console: tuple[str, Any, Any]) -> None:
    url, key, other = oidc_console
    for bad in (_token(other, groups=["interface-team"]), _token(key, groups=["x"], aud="another-app")):
        c, r = form_login(url, bad)
        assert r.status_code == 401 and "sluice_session" not in r.headers.get("set-cookie", "")
    c, r = form_login(url, _token(key, preferred_username="cafe", groups=["cafeteria"]))
    assert r.status_code == 303  # authenticated, but no role: every page is refused
    page = c.get("/")
    assert page.status_code == 403 and "this needs a viewer" in page.text and "no role" in page.text
