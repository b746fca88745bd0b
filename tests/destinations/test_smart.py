"""SMART Backend Services auth (issue #13): the client assertion (engine/destinations/smart.py), ``sluice keys
jwks``, and the fhir destination's ``auth: {type: smart-backend}`` against a token endpoint on 127.0.0.1 that
verifies the assertion's signature (with the JWKS the CLI printed), audience, expiry and jti uniqueness.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from engine.destinations import smart
from engine.destinations.base import DestinationContext
from engine.destinations.fhir import FhirDestination
from engine.errors import ConfigError, PermanentDeliveryError
from engine.smartkeys import jwks as jwks_command
from tests.destinations.conftest import make_item
from tests.support.smartserver import ASSERTION_TYPE, SmartServer

CLIENT_ID = "sluice-synthetic-client"
SCOPE = "system/Patient.write system/Encounter.write system/Observation.write"


def pem(key: Any, password: bytes | None = None) -> bytes:
    enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc))


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def bundle() -> bytes:
    return orjson.dumps(
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "fullUrl": "urn:uuid:5a1f0c9e-0000-4000-8000-000000000001",
                    "resource": {
                        "resourceType": "Patient",
                        "identifier": [{"system": "urn:synth:mrn", "value": "SMART0001"}],
                    },
                    "request": {"method": "PUT", "url": "Patient?identifier=urn:synth:mrn|SMART0001"},
                }
            ],
        }
    )


# ------------------------------------------------------------------------------------- pure: smart.py


def test_thumbprint_is_rfc7638() -> None:
    # RFC 7638 section 3.1: the example RSA key and its SHA-256 thumbprint.
    jwk = {
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert smart.thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


@pytest.mark.parametrize("which", ["rsa", "ec"])
def test_assertion_claims_header_and_signature(
    which: str, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    key: smart.SigningKey = rsa_key if which == "rsa" else ec_key
    loaded = smart.load_private_key(pem(key).decode().strip())  # as a {file:} secret reads it: stripped
    client = smart.Client.make(
        client_id=CLIENT_ID, token_url="https://ehr.example.org/oauth2/token", key=loaded, scope=SCOPE
    )
    alg = "RS384" if which == "rsa" else "ES384"
    assert client.alg == alg
    now = time.time()
    token = client.assertion(now)
    header = jwt.get_unverified_header(token)
    jwk = smart.public_jwk(loaded)
    assert header == {"alg": alg, "kid": jwk["kid"], "typ": "JWT"}
    assert jwk["kid"] == smart.thumbprint(jwk) and jwk["alg"] == alg and jwk["use"] == "sig"
    assert "d" not in jwk and "p" not in jwk  # public half only
    claims = jwt.decode(
        token,
        jwt.PyJWK(jwk).key,
        algorithms=[alg],
        audience="https://ehr.example.org/oauth2/token",
        issuer=CLIENT_ID,
    )
    assert claims["sub"] == CLIENT_ID
    assert 0 < claims["exp"] - now <= 300 and claims["exp"] == int(now + smart.ASSERTION_LIFETIME)
    # another key does not verify it
    other = smart.public_jwk(smart.load_private_key(pem(ec.generate_private_key(ec.SECP384R1()))))
    if which == "ec":
        with pytest.raises(jwt.InvalidSignatureError):
            jwt.decode(token, jwt.PyJWK(other).key, algorithms=[alg], audience=client.token_url)
    # a unique jti each time, and the token form carries a fresh assertion
    jtis = {jwt.decode(client.assertion(now), options={"verify_signature": False})["jti"] for _ in range(200)}
    assert len(jtis) == 200
    form = client.token_form(now)
    assert form["grant_type"] == "client_credentials"
    assert form["client_assertion_type"] == ASSERTION_TYPE == smart.ASSERTION_TYPE
    assert form["scope"] == SCOPE
    assert jwt.decode(form["client_assertion"], options={"verify_signature": False})["jti"] not in jtis
    with pytest.raises(ValueError, match="at most 300"):
        client.assertion(now, lifetime=301)


def test_explicit_kid_and_alg(ec_key: ec.EllipticCurvePrivateKey) -> None:
    client = smart.Client.make(
        client_id="c", token_url="https://t", key=ec_key, scope="s", alg="ES384", kid="ehr-2025-01"
    )
    assert jwt.get_unverified_header(client.assertion(time.time()))["kid"] == "ehr-2025-01"
    with pytest.raises(smart.SmartKeyError, match="does not fit an EC P-384 key"):
        smart.Client.make(client_id="c", token_url="https://t", key=ec_key, scope="s", alg="RS384")


def test_keys_refused(tmp_path: Path) -> None:
    with pytest.raises(smart.SmartKeyError, match="2048 bits or more"):
        smart.load_private_key(pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)))
    with pytest.raises(smart.SmartKeyError, match="needs P-384"):
        smart.load_private_key(pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(smart.SmartKeyError, match="RSA \\(RS384\\) or EC P-384"):
        smart.load_private_key(pem(ed25519.Ed25519PrivateKey.generate()))
    with pytest.raises(smart.SmartKeyError, match="encrypted"):
        smart.load_private_key(pem(ec.generate_private_key(ec.SECP384R1()), password=b"synthetic"))
    with pytest.raises(smart.SmartKeyError, match="not a PEM private key"):
        smart.load_private_key(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")


# ------------------------------------------------------------------------------------ sluice keys jwks


def test_keys_jwks_cli(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    (tmp_path / "rsa.pem").write_bytes(pem(rsa_key))
    (tmp_path / "ec.pem").write_bytes(pem(ec_key))
    runner = CliRunner()
    res = runner.invoke(jwks_command, [str(tmp_path / "rsa.pem"), str(tmp_path / "ec.pem")])
    assert res.exit_code == 0, res.output
    keys = json.loads(res.stdout)["keys"]
    assert [k["kty"] for k in keys] == ["RSA", "EC"]
    assert [k["alg"] for k in keys] == ["RS384", "ES384"]
    assert keys == [smart.public_jwk(rsa_key), smart.public_jwk(ec_key)]
    assert all(not {"d", "p", "q", "dp", "dq", "qi"} & set(k) for k in keys)
    assert keys[1]["crv"] == "P-384" and len(keys[1]["x"]) == len(keys[1]["y"]) == 64  # 48 bytes each

    res = runner.invoke(jwks_command, ["--kid", "ehr-2025-01", "--alg", "ES384", str(tmp_path / "ec.pem")])
    assert res.exit_code == 0, res.output
    assert [k["kid"] for k in json.loads(res.stdout)["keys"]] == ["ehr-2025-01"]

    res = runner.invoke(jwks_command, ["--alg", "RS384", str(tmp_path / "ec.pem")])
    assert res.exit_code != 0 and "alg RS384 does not fit an EC P-384 key" in res.output
    res = runner.invoke(jwks_command, ["--kid", "k", str(tmp_path / "ec.pem"), str(tmp_path / "rsa.pem")])
    assert res.exit_code != 0 and "single PRIVATE_KEY" in res.output
    res = runner.invoke(jwks_command, [str(tmp_path / "missing.pem")])
    assert res.exit_code != 0 and "cannot read" in res.output
    (tmp_path / "p256.pem").write_bytes(pem(ec.generate_private_key(ec.SECP256R1())))
    res = runner.invoke(jwks_command, [str(tmp_path / "p256.pem")])
    assert res.exit_code != 0 and "needs P-384" in res.output


def jwks_from_cli(*paths: Path) -> dict[str, Any]:
    res = CliRunner().invoke(jwks_command, [*map(str, paths)])
    assert res.exit_code == 0, res.output
    return dict(json.loads(res.stdout))


# ------------------------------------------------------------------------- the token endpoint's checks


@pytest.fixture
def ec_pem(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> Path:
    path = tmp_path / "smart-ec.pem"
    path.write_bytes(pem(ec_key))
    path.chmod(0o600)
    return path


@pytest.fixture
def server(ec_pem: Path) -> Iterator[SmartServer]:
    srv = SmartServer(client_id=CLIENT_ID, jwks=jwks_from_cli(ec_pem)).start()
    yield srv
    srv.close()


def test_token_endpoint_verifies_signature_audience_expiry_and_jti(
    server: SmartServer, ec_key: ec.EllipticCurvePrivateKey, rsa_key: rsa.RSAPrivateKey
) -> None:
    """The endpoint the destination tests rely on does refuse each kind of bad assertion."""
    good = smart.Client.make(client_id=CLIENT_ID, token_url=server.token_url, key=ec_key, scope=SCOPE)
    form = good.token_form(time.time())
    assert server.check_token_request(form)[0] == 200
    status, body = server.check_token_request(form)  # the same assertion again
    assert (status, body["error"], server.refusals[-1]) == (400, "invalid_client", "jti reused")

    def refused(form: dict[str, str]) -> str:
        status, body = server.check_token_request(form)
        assert (status, body["error"]) == (400, "invalid_client"), body
        return server.refusals[-1]

    wrong_aud = smart.Client.make(
        client_id=CLIENT_ID, token_url="https://other/token", key=ec_key, scope=SCOPE
    )
    assert "InvalidAudienceError" in refused(wrong_aud.token_form(time.time()))
    assert "ExpiredSignatureError" in refused(good.token_form(time.time() - 600))
    # signed by a key whose public half was never registered, under the registered kid
    forged = smart.Client.make(
        client_id=CLIENT_ID,
        token_url=server.token_url,
        key=ec.generate_private_key(ec.SECP384R1()),
        scope=SCOPE,
        kid=good.kid,
    )
    assert "InvalidSignatureError" in refused(forged.token_form(time.time()))
    unregistered = smart.Client.make(
        client_id=CLIENT_ID, token_url=server.token_url, key=rsa_key, scope=SCOPE
    )
    assert "no registered key" in refused(unregistered.token_form(time.time()))
    other_client = smart.Client.make(
        client_id="someone-else", token_url=server.token_url, key=ec_key, scope=SCOPE
    )
    assert "InvalidIssuerError" in refused(other_client.token_form(time.time()))
    too_long = {
        **form,
        "client_assertion": jwt.encode(
            {
                "iss": CLIENT_ID,
                "sub": CLIENT_ID,
                "aud": server.token_url,
                "exp": int(time.time()) + 3600,
                "jti": "x1",
            },
            ec_key,
            algorithm="ES384",
            headers={"kid": good.kid},
        ),
    }
    assert refused(too_long) == "exp more than five minutes ahead"


# ------------------------------------------------------------------------------ the fhir destination


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def smart_dest(ctx: DestinationContext, server: SmartServer, key_file: Path, **auth: Any) -> FhirDestination:
    spec = {
        "type": "smart-backend",
        "token_url": server.token_url,
        "client_id": CLIENT_ID,
        "private_key": {"file": str(key_file)},
        "scope": SCOPE,
        **auth,
    }
    return FhirDestination("ehr", {"base_url": server.fhir_url, "auth": spec}, ctx)


def test_destination_gets_caches_and_refreshes_the_token(
    server: SmartServer, ctx: DestinationContext, ec_pem: Path
) -> None:
    d = smart_dest(ctx, server, ec_pem, alg="ES384")

    async def go() -> None:
        await d.start()
        for _ in range(3):
            assert (await d.deliver(make_item(bundle()))).startswith("transaction HTTP 200")
        assert server.issued == ["smart-tok-1"]  # one token for three deliveries
        server.valid.clear()  # the server revokes it: a 401, one new token, delivered
        await d.deliver(make_item(bundle()))
        assert server.issued == ["smart-tok-1", "smart-tok-2"]
        # A 100 s token is refreshed 10 s (a tenth of its lifetime, under refresh_margin 60) before it
        # expires; the cache reads a clock the test moves, the assertion the real time the server checks.
        server.expires_in = 100
        now = [5000.0]
        d.auth.clock = lambda: now[0]
        d.auth.invalidate()
        await d.deliver(make_item(bundle()))
        assert len(server.issued) == 3
        now[0] = 5089.5
        await d.deliver(make_item(bundle()))
        assert len(server.issued) == 3  # still cached
        now[0] = 5090.0
        await d.deliver(make_item(bundle()))
        assert server.issued[3:] == ["smart-tok-4"]  # refreshed before the old one expired
        assert server.fhir_auth[-1] == "Bearer smart-tok-4"
        await d.close()

    run(go())
    assert server.refusals == []  # every assertion verified: signature, aud, exp, fresh jti
    assert len({a["claims"]["jti"] for a in server.assertions}) == 4
    for a in server.assertions:
        assert a["header"]["alg"] == "ES384" and a["header"]["kid"] == server.jwks["keys"][0]["kid"]
        assert a["claims"]["iss"] == a["claims"]["sub"] == CLIENT_ID
        assert a["claims"]["aud"] == server.token_url
    for form in server.forms:
        assert form["grant_type"] == "client_credentials" and form["scope"] == SCOPE
        assert form["client_assertion_type"] == ASSERTION_TYPE
        assert "client_secret" not in form and "client_id" not in form
    # every FHIR request carried a token the server had issued
    assert all(a.startswith("Bearer smart-tok-") for a in server.fhir_auth)


def test_unregistered_key_is_a_permanent_auth_error(
    server: SmartServer, ctx: DestinationContext, tmp_path: Path
) -> None:
    other = tmp_path / "other.pem"
    other.write_bytes(pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    d = smart_dest(ctx, server, other)

    async def go() -> None:
        await d.start()
        try:
            await d.deliver(make_item(bundle()))
        finally:
            await d.close()

    with pytest.raises(
        PermanentDeliveryError, match=r"HTTP 400.*check auth.client_id, the key registered"
    ) as exc:
        run(go())
    assert exc.value.category == "auth"
    assert server.fhir_auth == []  # nothing reached the FHIR endpoint


def test_config_errors(ctx: DestinationContext, ec_pem: Path, tmp_path: Path) -> None:
    base = {
        "type": "smart-backend",
        "token_url": "https://ehr.example.org/oauth2/token",
        "client_id": CLIENT_ID,
        "private_key": {"file": str(ec_pem)},
        "scope": SCOPE,
    }

    def make(**changes: Any) -> FhirDestination:
        spec = {k: v for k, v in {**base, **changes}.items() if v is not None}
        return FhirDestination("ehr", {"base_url": "https://ehr.example.org/fhir", "auth": spec}, ctx)

    d = make()
    assert d.auth.smart is not None and d.auth.smart.alg == "ES384"
    with pytest.raises(ConfigError, match="must come from the environment or a file") as e:
        make(private_key=ec_pem.read_text())
    assert e.value.key == "destinations.ehr.auth.private_key"
    with pytest.raises(ConfigError, match="needs scope") as e:
        make(scope=None)
    assert e.value.key == "destinations.ehr.auth.scope"
    with pytest.raises(ConfigError, match="needs private_key"):
        make(private_key=None)
    with pytest.raises(ConfigError, match="alg RS384 does not fit an EC P-384 key") as e:
        make(alg="RS384")
    assert e.value.key == "destinations.ehr.auth.alg"
    with pytest.raises(ConfigError, match="not one of"):
        make(alg="RS256")
    with pytest.raises(ConfigError, match=r"unknown option.*client_secret"):
        make(client_secret={"env": "X"})
    with pytest.raises(ConfigError, match="token endpoint"):
        make(token_url="ehr.example.org/token")
    (tmp_path / "p256.pem").write_bytes(pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(ConfigError, match="private_key: EC key on curve secp256r1") as e:
        make(private_key={"file": str(tmp_path / "p256.pem")})
    assert e.value.key == "destinations.ehr.auth.private_key"
    with pytest.raises(ConfigError, match="cannot read secret file"):
        make(private_key={"file": str(tmp_path / "missing.pem")})
