"""SMART Backend Services client authentication (pure): the signed JWT client assertion and the token request.

Per the SMART App Launch "Backend Services" profile (RFC 7523 ``private_key_jwt``): the client signs a JWT with
its private key (``RS384`` with an RSA key of 2048 bits or more, or ``ES384`` with an EC P-384 key); header
``alg``, ``kid``, ``typ: JWT``; claims ``iss`` = ``sub`` = the client id, ``aud`` = the token URL, ``exp`` at
most five minutes ahead, a ``jti`` never used before.  It POSTs that assertion to the token URL as a form with
``grant_type=client_credentials``, ``client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer``
and the requested ``scope``.  The server checks the signature against the public key set (JWKS) the client
registered, which :func:`jwks` produces from the same private key (``sluice keys jwks``).

No I/O here: the destination (engine/destinations/fhir.py) sends the request and caches the token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

ALGS = ("RS384", "ES384")
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# The spec allows at most 300 s; a minute less leaves room for our clock running ahead of the server's.
ASSERTION_LIFETIME = 240.0
MAX_ASSERTION_LIFETIME = 300.0
MIN_RSA_BITS = 2048


class SmartKeyError(ValueError):
    """A private key that cannot sign SMART client assertions; the text says what to do."""


SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def load_private_key(pem: bytes | str, *, password: bytes | None = None) -> SigningKey:
    """A PEM private key (PKCS#8 or traditional) that is RSA (≥ 2048 bits) or EC P-384."""
    data = pem.encode() if isinstance(pem, str) else pem
    if not data.endswith(b"\n"):
        data += b"\n"
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except TypeError as exc:  # encrypted key without a password, or a password for a plain key
        raise SmartKeyError(
            "the private key is encrypted: give a PEM key without a passphrase, kept in a file readable only "
            "by sluice (mode 0600)"
        ) from exc
    except ValueError as exc:
        raise SmartKeyError(
            f"not a PEM private key ({exc}); make one with e.g. "
            "`openssl ecparam -name secp384r1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt`"
        ) from exc
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise SmartKeyError(f"RSA key of {key.key_size} bits: SMART needs {MIN_RSA_BITS} bits or more")
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP384R1):
            raise SmartKeyError(f"EC key on curve {key.curve.name}: ES384 needs P-384 (secp384r1)")
        return key
    raise SmartKeyError(
        f"a {type(key).__name__.lstrip('_')} key: SMART needs an RSA (RS384) or EC P-384 (ES384) key"
    )


def alg_for(key: SigningKey, alg: str | None = None) -> str:
    """The algorithm for ``key``: ``alg`` if given and it fits the key, else the key's own (RS384 / ES384)."""
    own = "RS384" if isinstance(key, rsa.RSAPrivateKey) else "ES384"
    if alg is None or alg == "":
        return own
    if alg not in ALGS:
        raise SmartKeyError(f"alg {alg!r} is not one of {', '.join(ALGS)}")
    if alg != own:
        kind = "an RSA" if own == "RS384" else "an EC P-384"
        raise SmartKeyError(f"alg {alg} does not fit {kind} key (use {own}, or a key made for {alg})")
    return alg


def _b64(n: int) -> str:
    raw = n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _b64_fixed(n: int, size: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes(size, "big")).rstrip(b"=").decode()


def _public_members(key: SigningKey) -> dict[str, str]:
    """The JWK members that RFC 7638 hashes, in its order (lexicographic)."""
    if isinstance(key, rsa.RSAPrivateKey):
        pub = key.public_key().public_numbers()
        return {"e": _b64(pub.e), "kty": "RSA", "n": _b64(pub.n)}
    epub = key.public_key().public_numbers()
    return {"crv": "P-384", "kty": "EC", "x": _b64_fixed(epub.x, 48), "y": _b64_fixed(epub.y, 48)}


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url): the default ``kid``."""
    required = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y")}[str(jwk["kty"])]
    canon = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canon.encode()).digest()).rstrip(b"=").decode()


def public_jwk(key: SigningKey, *, kid: str | None = None, alg: str | None = None) -> dict[str, Any]:
    """The public half of ``key`` as a JWK with ``kid`` (default: its thumbprint), ``alg`` and ``use: sig``."""
    members = _public_members(key)
    return {
        **members,
        "kid": kid or thumbprint(members),
        "alg": alg_for(key, alg),
        "use": "sig",
    }


def jwks(keys: Iterable[tuple[SigningKey, str | None, str | None]]) -> dict[str, Any]:
    """``{"keys": [...]}`` for (key, kid, alg) triples: the set to register with the EHR (old and new keys
    side by side while rotating)."""
    return {"keys": [public_jwk(k, kid=kid, alg=alg) for k, kid, alg in keys]}


@dataclass(frozen=True)
class Client:
    """A SMART backend client: who it is, where it asks for tokens, and its signing key."""

    client_id: str
    token_url: str
    key: SigningKey
    alg: str
    kid: str
    scope: str

    @classmethod
    def make(
        cls,
        *,
        client_id: str,
        token_url: str,
        key: SigningKey,
        scope: str,
        alg: str | None = None,
        kid: str | None = None,
    ) -> Client:
        alg = alg_for(key, alg)
        return cls(client_id, token_url, key, alg, kid or thumbprint(_public_members(key)), scope)

    def assertion(self, now: float, *, lifetime: float = ASSERTION_LIFETIME, jti: str | None = None) -> str:
        """A signed client assertion valid from ``now`` (Unix seconds) for ``lifetime`` s (≤ 300)."""
        if not 0 < lifetime <= MAX_ASSERTION_LIFETIME:
            raise ValueError(f"assertion lifetime {lifetime} s: SMART allows at most 300 s")
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.token_url,
            "iat": int(now),
            "exp": int(now + lifetime),
            "jti": jti or secrets.token_urlsafe(24),
        }
        return jwt.encode(claims, self.key, algorithm=self.alg, headers={"kid": self.kid, "typ": "JWT"})

    def token_form(self, now: float) -> dict[str, str]:
        """The form body of the token request, with a fresh assertion (a new ``jti`` every call)."""
        form = {
            "grant_type": "client_credentials",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": self.assertion(now),
        }
        if self.scope:
            form["scope"] = self.scope
        return form
