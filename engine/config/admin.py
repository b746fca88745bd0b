"""The ``admin:`` section of routes.yaml: the admin API's address, TLS and OIDC bearer tokens."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from engine.config.model import AdminConfig, OIDCConfig
from engine.config.reader import _Section
from engine.errors import ConfigError


def _admin(sec: _Section, base: Path, port_override: Any) -> AdminConfig:
    tls_cert = tls_key = None
    if sec.data.get("tls"):
        t = sec.sub("tls")
        tls_cert, tls_key = t.text("cert"), t.text("key")
        t.done()
        if not tls_cert or not tls_key:
            raise ConfigError("admin.tls needs cert and key files", file=sec.file, key="admin.tls")
        tls_cert, tls_key = str((base / tls_cert).resolve()), str((base / tls_key).resolve())
    else:
        sec.get("tls")
    oidc = None
    if sec.data.get("oidc"):
        o = sec.sub("oidc")
        role_map = o.get("role_map") or {}
        if not isinstance(role_map, Mapping):
            raise ConfigError("expected a mapping of group → role", file=sec.file, key="admin.oidc.role_map")
        oidc = OIDCConfig(
            issuer=o.text("issuer") or "",
            audience=o.text("audience") or "",
            jwks_url=o.text("jwks_url") or "",
            roles_claim=o.text("roles_claim", "roles"),
            role_map={str(k): str(v) for k, v in role_map.items()},
            leeway=o.number("leeway", 30.0),
        )
        o.done()
        for k in ("issuer", "audience", "jwks_url"):
            if not getattr(oidc, k):
                raise ConfigError(f"admin.oidc needs {k}", file=sec.file, key=f"admin.oidc.{k}")
        for group, role in oidc.role_map.items():
            if role not in ("viewer", "operator", "admin", "phi"):
                raise ConfigError(
                    f"role_map maps {group!r} to {role!r}",
                    file=sec.file,
                    key=f"admin.oidc.role_map.{group}",
                    hint="map to viewer, operator, admin or phi",
                )
    else:
        sec.get("oidc")
    admin = AdminConfig(
        enabled=sec.flag("enabled", True),
        host=sec.text("host", "127.0.0.1"),
        port=sec.integer("port", 8080),
        tls_cert=tls_cert,
        tls_key=tls_key,
        metrics_auth=sec.flag("metrics_auth", False),
        oidc=oidc,
    )
    sec.done()
    if port_override not in (None, ""):
        try:
            admin = replace(admin, port=int(port_override))
        except ValueError:
            raise ConfigError(
                f"admin port {port_override!r} is not a number",
                key="admin.port",
                hint="check SLUICE_ADMIN_PORT",
            ) from None
    if not 0 <= admin.port <= 65535:
        raise ConfigError(
            f"port {admin.port} is out of range",
            file=sec.file,
            key="admin.port",
            hint="use a port from 1 to 65535 (0: any free port)",
        )
    return admin
