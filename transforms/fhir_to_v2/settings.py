"""Settings of the ``fhir-to-hl7`` step (frozen), built and validated from a channel's options.

Every option of the channel's step maps 1:1 onto a :class:`WritebackSettings` field; an unknown key or
a bad value is a :class:`engine.errors.ConfigError` naming the file, the key and what to do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from engine.errors import ConfigError
from engine.hl7 import CHARSETS
from engine.suggest import did_you_mean
from transforms.settings import build_settings, check_coding_systems, site_zone

VERSIONS = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8")
# What a ServiceRequest becomes (transforms/fhir_to_v2/orm.py)
ORDER_MESSAGES = ("ORM^O01", "OML^O21")


@dataclass(frozen=True)
class WritebackSettings:
    """How one channel writes FHIR resources as HL7 v2 (MSH header values, identifiers, time zone)."""

    sending_application: str = "SLUICE"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    # Identifier system of the Appointment (ServiceRequest) whose value becomes SCH-1 (ORC-2); else the id
    placer_system: str | None = None
    # Identifier system of the Patient (or the participant's logical reference) whose value becomes PID-3
    patient_system: str | None = None
    # identifier system URI -> HL7 assigning authority (namespace) written in CX-4 / EI-2
    authorities: Mapping[str, str] = field(default_factory=dict)
    version: str = "2.5.1"
    charset: str = ""  # MSH-18 (table 0211); empty = ASCII
    processing_id: str = "P"
    site_tz: str = "America/Los_Angeles"
    # Times carry the site zone's offset (20261210090000-0800); false = local site time without offset
    time_offsets: bool = True
    # The message a ServiceRequest becomes: ORM^O01 or OML^O21 (one of ORDER_MESSAGES); empty: ORM^O01,
    # or OML^O21 from v2.7 on (HL7 withdrew ORM there): see ``order``
    order_message: str = ""
    # CWE-3 coding-system name -> FHIR system URI, the shape of the hl7-to-fhir option of the same name (one
    # block serves both directions): a coding in that system is written with that name in CWE-3 (first
    # name listed wins when two share a URI), before the shipped names (transforms.datatypes CODE_SYSTEMS)
    coding_systems: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_zone", site_zone(self.site_tz))
        names: dict[str, str] = {}
        for name, uri in self.coding_systems.items():
            names.setdefault(uri, name.strip())
        object.__setattr__(self, "_system_names", names)
        version = _version_tuple(self.version)
        if self.order_message == "OML^O21" and version < (2, 4):
            raise ConfigError(
                f"OML^O21 does not exist in HL7 v{self.version} (it is defined from v2.4 on)",
                key="order_message",
                hint="set version: 2.5.1 (or 2.4 and later), or order_message: ORM^O01",
            )
        if self.order_message == "ORM^O01" and version >= (2, 7):
            raise ConfigError(
                f"ORM^O01 does not exist in HL7 v{self.version} (HL7 withdrew it in v2.7 for OML^O21)",
                key="order_message",
                hint="write order_message: OML^O21 (the default from v2.7 on), or a version before 2.7",
            )

    @property
    def order(self) -> str:
        """The order message a ServiceRequest becomes: ``order_message``, else ORM^O01 before v2.7 and
        OML^O21 from v2.7 on (where ORM^O01 is withdrawn)."""
        if self.order_message:
            return self.order_message
        return "OML^O21" if _version_tuple(self.version) >= (2, 7) else "ORM^O01"

    @property
    def zone(self) -> ZoneInfo:
        z: ZoneInfo = self._zone  # type: ignore[attr-defined]
        return z

    @property
    def system_names(self) -> Mapping[str, str]:
        """FHIR system URI → the CWE-3 name ``coding_systems`` gives it (``coding_systems`` reversed)."""
        names: Mapping[str, str] = self._system_names  # type: ignore[attr-defined]
        return names

    @property
    def codec(self) -> str:
        """The Python codec of ``charset``."""
        return CHARSETS[self.charset.upper()]

    @property
    def has_tq1(self) -> bool:
        """TQ1 exists from v2.5 on (before it, SCH-11 alone carries the times)."""
        return _version_tuple(self.version) >= (2, 5)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None, config_file: str, key: str) -> WritebackSettings:
        return build_settings(
            cls,
            dict(options or {}),
            "fhir-to-hl7",
            config_file,
            key,
            lambda name, value, where: _check(name, value, config_file, where),
        )


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def _check(name: str, value: Any, config_file: str, where: str) -> Any:
    def bad(msg: str, hint: str) -> ConfigError:
        return ConfigError(msg, file=config_file, key=where, hint=hint)

    if name == "time_offsets":
        if not isinstance(value, bool):
            raise bad(f"{value!r} is not true/false", "write true or false")
        return value
    if name == "version":
        value = str(value)
        if value not in VERSIONS:
            raise bad(f"HL7 version {value!r} is not supported", "use one of: " + ", ".join(VERSIONS))
        return value
    if name == "order_message":
        if value not in ORDER_MESSAGES:
            guess = did_you_mean(str(value), ORDER_MESSAGES)
            raise bad(
                f"{value!r} is not an order message fhir-to-hl7 writes" + (f" ({guess})" if guess else ""),
                "use one of: " + ", ".join(ORDER_MESSAGES),
            )
        return value
    if name == "charset":
        if not isinstance(value, str) or value.upper() not in CHARSETS:
            names = ", ".join(sorted(n for n in CHARSETS if n))
            raise bad(f"{value!r} is not a character set Sluice can write", f"use one of: {names}")
        return value.upper()
    if name in ("placer_system", "patient_system"):
        if value is not None and (not isinstance(value, str) or ":" not in value):
            raise bad(f"{value!r} is not an identifier system URI", 'write e.g. "urn:portal:appointment"')
        return value
    if name == "authorities":
        if not isinstance(value, Mapping):
            raise bad("authorities must be a mapping", "write system-uri: AUTHORITY pairs")
        out: dict[str, str] = {}
        for uri, auth in value.items():
            if not isinstance(auth, str) or not auth or "|" in auth or "^" in auth:
                raise bad(f"authority for {uri!r} is not a plain name: {auth!r}", "write e.g. HOSP")
            out[str(uri)] = auth
        return out
    if name == "coding_systems":
        return check_coding_systems(value, bad)
    if (
        not isinstance(value, str)
        or "|" in value
        or "^" in value
        or "~" in value
        or "\\" in value
        or "&" in value
    ):
        raise bad(f"{value!r} is not a plain HL7 header value", "write text without | ^ ~ \\ &")
    return value
