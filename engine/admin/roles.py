"""Roles, permissions and who is asking (pure).

``viewer`` reads counters and metadata; ``operator`` also pauses, resumes and replays;
``admin`` also manages tokens, reads the audit trail and reloads config.  ``phi`` is a
separate permission any role can be granted: it alone lets a caller read message content.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("viewer", "operator", "admin")

READ = "read"
OPERATE = "operate"
ADMIN = "admin"
PHI = "phi"

_GRANTS: dict[str, frozenset[str]] = {
    "viewer": frozenset({READ}),
    "operator": frozenset({READ, OPERATE}),
    "admin": frozenset({READ, OPERATE, ADMIN}),
}

WHAT_NEEDS = {
    READ: "a viewer, operator or admin token",
    OPERATE: "an operator or admin token",
    ADMIN: "an admin token",
    PHI: "a token with the phi permission (sluice token create ... --phi)",
}


@dataclass(frozen=True)
class Principal:
    """Who is calling: a token's name, an OIDC subject or the OS user of a CLI command."""

    name: str
    kind: str  # token | oidc | os | anonymous
    role: str | None  # None: authenticated but no role (an OIDC user whose claim names none)
    phi: bool = False

    def can(self, permission: str) -> bool:
        if permission == PHI:
            return self.phi
        return self.role is not None and permission in _GRANTS.get(self.role, frozenset())


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    return role


def highest(roles: list[str]) -> str | None:
    """The most capable of several role names (an OIDC claim may carry more than one)."""
    known = [r for r in roles if r in ROLES]
    return max(known, key=ROLES.index) if known else None
