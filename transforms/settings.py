"""Per-channel conversion settings (frozen), built and validated from a channel's options.

A channel's ``hl7-to-fhir`` step options map 1:1 onto :class:`ConvertSettings` fields.
``ConvertSettings.from_options`` checks every key and value and raises
:class:`engine.errors.ConfigError` naming the file, the key and what to do.

Code maps (``code_maps``) are loaded from CSV or YAML files (paths relative to the
channel's base directory, then to ``transforms/maps/``).  See ``docs/mapping.md``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from engine.errors import ConfigError
from engine.suggest import did_you_mean

S = TypeVar("S")

MAPS_DIR = Path(__file__).resolve().parent / "maps"

# A code map: local code -> (system, code, display)
CodeMap = Mapping[str, tuple[str, str, str]]

DERIVED_SYSTEM_PREFIX = "urn:sluice:authority:"
"""Prefix of the derived identifier system for an assigning authority without a configured URI."""

_CHOICES: dict[str, tuple[str, ...]] = {
    "unmapped_codes": ("keep", "reject"),
    "unknown_prior_patient": ("error", "accept"),
    "cancel_before_book": ("create", "error"),
    "code_table_errors": ("warn", "reject"),
    "strictness": ("lenient", "strict"),
}


@dataclass(frozen=True)
class ConvertSettings:
    """How one channel converts HL7 v2 to FHIR.  Defaults are strict about identity."""

    site_tz: str = "America/Los_Angeles"
    # CX-4 assigning authority (HD-1 namespace id, or HD-2 universal id) -> identifier system URI
    identifier_systems: Mapping[str, str] = field(default_factory=dict)
    # System used for a patient identifier that has no (mappable) authority; None = error
    default_identifier_system: str | None = None
    # True: an authority without a URI maps to urn:sluice:authority:<authority> (demo channel)
    derive_unknown_systems: bool = False
    # strptime format for senders that do not send HL7 DTM (e.g. "%m/%d/%Y %H:%M")
    date_format: str | None = None
    # map name -> local code -> (system, code, display); name is a field ("OBX-3") or a CWE-3 system
    code_maps: Mapping[str, CodeMap] = field(default_factory=dict)
    # local unit (OBX-6.1; exact and upper-cased) -> UCUM code, over the shipped transforms/maps/units.csv
    unit_map: Mapping[str, str] = field(default_factory=dict)
    unmapped_codes: str = "keep"
    strip_html: bool = True
    note_max_length: int | None = None
    validate: bool = False
    unknown_prior_patient: str = "error"
    cancel_before_book: str = "create"
    code_table_errors: str = "warn"
    # Emit a Provenance resource for the message (MSH) in every bundle
    provenance: bool = True
    # The channel's ``strictness``: "lenient" drops a bad value in a non-key field with a located warning
    # (transforms.convert: one decision for every mapper); "strict" rejects the message (AE) as before
    strictness: str = "lenient"
    # PID-10 race / PID-22 ethnic group → the US Core race and ethnicity extensions on Patient (US realm);
    # false for a feed of another realm: the two fields are then not mapped
    us_core_race_ethnicity: bool = True
    # CWE-3 coding-system name (any case) -> FHIR system URI, over the shipped names (transforms.datatypes
    # CODE_SYSTEMS): a local system's real URI (99LAB -> http://lab.example.org/codes), or another reading of a
    # shipped name (I10 -> http://hl7.org/fhir/sid/icd-10 for a feed that sends WHO ICD-10 under it)
    coding_systems: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_zone", site_zone(self.site_tz))
        if (
            self.coding_systems
        ):  # looked up by the CWE-3 name stripped and upper-cased (datatypes.code_system)
            object.__setattr__(
                self, "coding_systems", {k.strip().upper(): v for k, v in self.coding_systems.items()}
            )

    @property
    def hd_cache(self) -> dict[tuple[str, str, str], tuple[str | None, str]]:
        """Assigning authority (HD-1, HD-2, HD-3) → (system, how): filled by ``transforms.datatypes.hd_system``
        (a pure function of these settings), so each authority of a feed is resolved once."""
        cache: dict[tuple[str, str, str], tuple[str | None, str]] | None = self.__dict__.get("_hd_cache")
        if cache is None:
            cache = {}
            object.__setattr__(self, "_hd_cache", cache)
        return cache

    @property
    def shared_memo(self) -> dict[Any, Any]:
        """Mapper results that are a pure function of a segment's text, the delimiters and these settings
        (``transforms.adt._nk1``), kept for the next messages of the channel; each mapper bounds its entries
        and hands out copies only."""
        memo: dict[Any, Any] | None = self.__dict__.get("_shared_memo")
        if memo is None:
            memo = {}
            object.__setattr__(self, "_shared_memo", memo)
        return memo

    @property
    def entity_memo(self) -> dict[Any, Any]:
        """Entries for recurring practitioners and locations (``transforms.datatypes.xcn`` / ``pl``), keyed by
        the raw field text and the delimiters, kept for the next messages of the channel and shared by their
        bundles (``ConvertContext.reuse``; never changed in place)."""
        memo: dict[Any, Any] | None = self.__dict__.get("_entity_memo")
        if memo is None:
            memo = {}
            object.__setattr__(self, "_entity_memo", memo)
        return memo

    @property
    def zone(self) -> ZoneInfo:
        """The site time zone as a ZoneInfo (never the host's zone)."""
        z: ZoneInfo = self._zone  # type: ignore[attr-defined]
        return z

    # ------------------------------------------------------------------
    @classmethod
    def from_options(
        cls, options: Mapping[str, Any], base_dir: Path, config_file: str, key: str = "options"
    ) -> ConvertSettings:
        """Build settings from a channel's step options; ``ConfigError`` on anything invalid, located at
        ``<key>.<option>`` (the step passes its own path, ``transform[n].hl7-to-fhir``)."""
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise ConfigError(
                "hl7-to-fhir options must be a mapping",
                file=config_file,
                key=key,
                hint="write the options as key: value pairs",
            )
        return build_settings(
            cls,
            options,
            "hl7-to-fhir",
            config_file,
            key,
            lambda name, value, where: _check(name, value, base_dir, config_file, where),
        )


def site_zone(name: str) -> ZoneInfo:
    """The IANA zone ``name`` (a settings' ``site_tz``); ``ConfigError`` at key ``site_tz`` when unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"unknown time zone {name!r}",
            key="site_tz",
            hint="use an IANA zone name such as America/Los_Angeles or Europe/Berlin",
        ) from exc


def build_settings(
    cls: Callable[..., S],
    options: Mapping[str, Any],
    step: str,
    config_file: str,
    prefix: str,
    check: Callable[[str, Any, str], Any],
) -> S:
    """A frozen settings dataclass from a step's options: every key a field of ``cls`` (else ``ConfigError``
    listing the valid ones), every value through ``check(name, value, where)``; errors located at
    ``<prefix>.<name>`` in ``config_file``."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for name, value in options.items():
        where = f"{prefix}.{name}"
        if name not in known:
            guess = did_you_mean(str(name), known)
            raise ConfigError(
                f"unknown {step} option {name!r}" + (f" ({guess})" if guess else ""),
                file=config_file,
                key=where,
                hint="valid options: " + ", ".join(sorted(known)),
            )
        kwargs[name] = check(name, value, where)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(exc.message, file=config_file, key=f"{prefix}.{exc.key}", hint=exc.hint) from None


def check_coding_systems(value: Any, bad: Callable[[str, str], ConfigError]) -> dict[str, str]:
    """The ``coding_systems`` option of ``hl7-to-fhir`` and ``fhir-to-hl7`` (one block serves both directions):
    CWE-3 coding-system names (plain: no HL7 delimiter) → absolute system URIs.  ``bad(message, hint)`` makes
    the step's located ConfigError."""
    if not isinstance(value, Mapping):
        raise bad(
            "coding_systems must be a mapping",
            "write CWE-3-name: system-uri pairs, e.g. 99LAB: http://lab.example.org/codes",
        )
    systems: dict[str, str] = {}
    for name, uri in value.items():
        if not isinstance(name, str) or not name.strip() or any(c in name for c in "|^~\\&"):
            raise bad(
                f"coding system name {name!r} is not a plain name",
                "write the name senders put in CWE-3, e.g. 99LAB (no | ^ ~ \\ &)",
            )
        if not isinstance(uri, str) or not uri.startswith(("http://", "https://", "urn:")):
            raise bad(
                f"system for coding system {name!r} is not a URI: {uri!r}",
                "use an absolute URI (http://, https:// or urn:)",
            )
        systems[name] = uri
    return systems


def _check(key: str, value: Any, base_dir: Path, config_file: str, where: str) -> Any:
    def bad(msg: str, hint: str) -> ConfigError:
        return ConfigError(msg, file=config_file, key=where, hint=hint)

    if key in _CHOICES:
        if value not in _CHOICES[key]:
            raise bad(f"{value!r} is not a valid value", "choose one of: " + ", ".join(_CHOICES[key]))
        return value
    if key in ("derive_unknown_systems", "strip_html", "validate", "provenance", "us_core_race_ethnicity"):
        if not isinstance(value, bool):
            raise bad(f"{value!r} is not true/false", "write true or false")
        return value
    if key == "site_tz":
        if not isinstance(value, str) or not value:
            raise bad(
                f"{value!r} is not a time zone name", "use an IANA zone name such as America/Los_Angeles"
            )
        return value
    if key == "default_identifier_system":
        if value is not None and (not isinstance(value, str) or ":" not in value):
            raise bad(f"{value!r} is not a URI", "use an absolute URI, e.g. urn:oid:2.16.840.1.113883.19.5")
        return value
    if key == "date_format":
        if value is not None and (not isinstance(value, str) or "%" not in value):
            raise bad(f"{value!r} is not a strptime format", 'write e.g. "%m/%d/%Y %H:%M"')
        return value
    if key == "note_max_length":
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 20):
            raise bad(f"{value!r} is not a length", "use an integer >= 20, or leave it out for no limit")
        return value
    if key == "identifier_systems":
        if not isinstance(value, Mapping):
            raise bad("identifier_systems must be a mapping", "write AUTHORITY: system-uri pairs")
        out: dict[str, str] = {}
        for auth, uri in value.items():
            if not isinstance(uri, str) or ":" not in uri:
                raise bad(f"system for authority {auth!r} is not a URI: {uri!r}", "use an absolute URI")
            out[str(auth)] = uri
        return out
    if key == "coding_systems":
        return check_coding_systems(value, bad)
    if key == "code_maps":
        if not isinstance(value, Mapping):
            raise bad("code_maps must be a mapping", "write map-name: path/to/file.csv pairs")
        maps: dict[str, CodeMap] = {}
        for name, ref in value.items():
            if isinstance(ref, Mapping):
                maps[str(name)] = _inline_map(ref, config_file, f"{where}.{name}")
            elif isinstance(ref, str):
                maps[str(name)] = load_code_map(ref, base_dir, config_file, f"{where}.{name}")
            else:
                raise bad(
                    f"code map {name!r} must be a file path", "give a CSV or YAML path under transforms/maps/"
                )
        return maps
    if key == "unit_map":
        if isinstance(value, str):
            units = load_unit_map(value, base_dir, config_file, where)
        elif isinstance(value, Mapping):
            units = _unit_entries(((str(k), str(v)) for k, v in value.items()), config_file, where)
        else:
            raise bad(
                "unit_map must be a file path or a mapping", "write local-unit: UCUM pairs, or a CSV path"
            )
        from transforms.datatypes import valid_ucum

        for local, ucum in units.items():
            if not valid_ucum(ucum):
                raise bad(
                    f"unit_map maps {local!r} to {ucum!r}, which is not valid UCUM",
                    "use a UCUM code (case-sensitive), e.g. mm[Hg], g/dL, 10*9/L, [IU]/L",
                )
        return units
    return value  # pragma: no cover - every field is handled above


def _unit_entries(pairs: Any, config_file: str, key: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for local, ucum in pairs:
        local, ucum = local.strip(), ucum.strip()
        if not local:
            continue
        if not ucum:
            raise ConfigError(f"unit {local!r} has no UCUM code", file=config_file, key=key)
        out.setdefault(local, ucum)
        out.setdefault(local.upper(), ucum)
    return out


def load_unit_map(ref: str, base_dir: Path, config_file: str = "", key: str = "unit_map") -> dict[str, str]:
    """Load a unit map: CSV with the header ``local_unit,ucum`` (lines starting with ``#`` are comments).
    Keys are kept as written and upper-cased, so the lookup is case-insensitive on the local side."""
    path = resolve_map_path(ref, base_dir)
    if path is None:
        raise ConfigError(
            f"unit map file {ref!r} not found",
            file=config_file,
            key=key,
            hint=f"put it under {base_dir}/transforms/maps/ or give a path relative to {base_dir}",
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read unit map {path}: {exc}", file=config_file, key=key) from exc
    reader = csv.DictReader(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    if reader.fieldnames is None or not {"local_unit", "ucum"} <= set(reader.fieldnames):
        raise ConfigError(
            f"unit map {path} must have the header local_unit,ucum",
            file=config_file,
            key=key,
            hint="first line: local_unit,ucum",
        )
    return _unit_entries(
        ((row.get("local_unit") or "", row.get("ucum") or "") for row in reader), str(path), key
    )


def _inline_map(ref: Mapping[str, Any], config_file: str, key: str) -> CodeMap:
    out: dict[str, tuple[str, str, str]] = {}
    for local, target in ref.items():
        out[str(local)] = _target(target, config_file, key)
    return out


def _target(target: Any, config_file: str, key: str) -> tuple[str, str, str]:
    if isinstance(target, Mapping):
        system, code, display = target.get("system"), target.get("code"), target.get("display", "")
    elif isinstance(target, list | tuple) and len(target) in (2, 3):
        system, code = target[0], target[1]
        display = target[2] if len(target) == 3 else ""
    else:
        system = code = None
        display = ""
    if not system or not code:
        raise ConfigError(
            f"code map entry {target!r} needs a system and a code",
            file=config_file,
            key=key,
            hint="write {system: http://loinc.org, code: 2345-7, display: Glucose}",
        )
    return (str(system), str(code), str(display or ""))


def resolve_map_path(ref: str, base_dir: Path) -> Path | None:
    """A map file: absolute, relative to the channel base dir, or relative to transforms/maps/."""
    p = Path(ref)
    candidates = (
        [p] if p.is_absolute() else [base_dir / p, base_dir / "transforms" / "maps" / p, MAPS_DIR / p]
    )
    for c in candidates:
        if c.is_file():
            return c
    return None


def _map_names(base_dir: Path) -> list[str]:
    """The map files a bare name can reach (for "did you mean" when one is misspelt)."""
    names: set[str] = set()
    for d in (base_dir / "transforms" / "maps", MAPS_DIR):
        if d.is_dir():
            names.update(p.name for p in d.iterdir() if p.suffix.lower() in (".csv", ".yaml", ".yml"))
    return sorted(names)


def load_code_map(ref: str, base_dir: Path, config_file: str = "", key: str = "code_maps") -> CodeMap:
    """Load a CSV (header ``local_code,system,code,display``) or YAML (``local: {system, code, display}``)."""
    path = resolve_map_path(ref, base_dir)
    if path is None:
        near = did_you_mean(ref, _map_names(base_dir))
        raise ConfigError(
            f"code map file {ref!r} not found" + (f" ({near})" if near else ""),
            file=config_file,
            key=key,
            hint=f"put it under {base_dir}/transforms/maps/ or give a path relative to {base_dir}",
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read code map {path}: {exc}", file=config_file, key=key) from exc
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"code map {path} is not valid YAML: {exc}", file=config_file, key=key) from exc
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"code map {path} must be a mapping",
                file=config_file,
                key=key,
                hint="write local-code: {system: ..., code: ..., display: ...}",
            )
        return _inline_map(data, str(path), key)
    out: dict[str, tuple[str, str, str]] = {}
    reader = csv.DictReader(text.splitlines())
    need = {"local_code", "system", "code"}
    if reader.fieldnames is None or not need <= set(reader.fieldnames):
        raise ConfigError(
            f"code map {path} must have a header with local_code,system,code[,display]",
            file=config_file,
            key=key,
            hint="first line: local_code,system,code,display",
        )
    for n, row in enumerate(reader, start=2):
        local, system, code = (
            (row.get("local_code") or "").strip(),
            (row.get("system") or "").strip(),
            (row.get("code") or "").strip(),
        )
        if not local:
            continue
        if not system or not code:
            raise ConfigError(
                f"{path}:{n}: entry {local!r} needs a system and a code", file=config_file, key=key
            )
        out[local] = (system, code, (row.get("display") or "").strip())
    return out


DEMO_SETTINGS = ConvertSettings(derive_unknown_systems=True)
"""What the demo channel uses: site zone America/Los_Angeles, derived systems on."""
