"""OIDC bearer tokens: a JWT signed by the identity provider, checked against its JWKS.

``admin.oidc: {issuer, audience, jwks_url, roles_claim}``.  The roles claim (a dotted path
such as ``realm_access.roles`` is allowed) holds role names (``viewer``, ``operator``,
``admin``) and optionally ``phi``; ``role_map`` maps the provider's own group names onto
those.  Only asymmetric algorithms are accepted (never ``none`` or a shared secret).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jwt

from engine.admin.roles import PHI, ROLES, Principal, highest
from engine.config import OIDCConfig

ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]


class OIDCError(Exception):
    """Why a bearer token was refused (safe to show the caller: no token content)."""


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("ey")


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def principal_from_claims(cfg: OIDCConfig, claims: Mapping[str, Any]) -> Principal:
    raw = _claim(claims, cfg.roles_claim)
    if isinstance(raw, str):
        values = raw.replace(",", " ").split()
    elif isinstance(raw, list):
        values = [str(v) for v in raw]
    else:
        values = []
    mapped = [cfg.role_map.get(v, v) for v in values]
    role = highest([v for v in mapped if v in ROLES])
    subject = str(claims.get("preferred_username") or claims.get("email") or claims.get("sub") or "?")
    return Principal(subject[:200], "oidc", role, PHI in mapped)


class OIDCVerifier:
    def __init__(self, cfg: OIDCConfig):
        self.cfg = cfg
        # PyJWKClient caches the key set and refetches when it meets an unknown key id (rotation).
        self._jwks = jwt.PyJWKClient(cfg.jwks_url, cache_keys=True, lifespan=300, timeout=10)

    def verify(self, token: str) -> Principal:
        """The caller for a valid token; raises OIDCError otherwise (blocking: run in a thread)."""
        try:
            key = self._jwks.get_signing_key_from_jwt(token)
        except jwt.PyJWKClientConnectionError as exc:
            raise OIDCError(
                f"cannot fetch the identity provider's keys from admin.oidc.jwks_url: {exc}"
            ) from None
        except jwt.PyJWKClientError as exc:
            raise OIDCError(f"the token's signing key is not in the provider's key set: {exc}") from None
        except jwt.PyJWTError as exc:
            raise OIDCError(f"unreadable bearer token: {exc}") from None
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=ALGORITHMS,
                audience=self.cfg.audience,
                issuer=self.cfg.issuer,
                leeway=self.cfg.leeway,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise OIDCError("the bearer token has expired: sign in again") from None
        except jwt.InvalidAudienceError:
            raise OIDCError(
                f"the bearer token is not for this audience (expected {self.cfg.audience!r})"
            ) from None
        except jwt.InvalidIssuerError:
            raise OIDCError(
                f"the bearer token is from another issuer (expected {self.cfg.issuer!r})"
            ) from None
        except jwt.PyJWTError as exc:
            raise OIDCError(f"invalid bearer token: {exc}") from None
        return principal_from_claims(self.cfg, claims)
