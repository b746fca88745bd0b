"""Configuration: ``routes.yaml`` plus ``channels/*.yaml`` → frozen, validated config.

Every error names the file, the key path and what to do.  Unknown keys are
errors (a typo must never silently turn a setting off).  Settings can be
overridden by ``SLUICE_*`` environment variables and CLI flags (see
:func:`load`).

A package of nouns: ``model`` (the frozen config types and defaults), ``reader`` (a section being read:
typed accessors, unknown keys, YAML files; the schema ``RECORDER``), ``sources`` (a channel's source),
``channels`` (one channel file), ``destinations``, ``admin`` and ``settings`` (routes.yaml's sections) and
``loader`` (:func:`load`).  This module re-exports their names (``from engine.config import ...``); the
schema recorder is set on ``engine.config.reader``.
"""

from __future__ import annotations

from engine.config.admin import _admin as _admin
from engine.config.channels import _FHIR_PATH as _FHIR_PATH
from engine.config.channels import _check_path as _check_path
from engine.config.channels import _types as _types
from engine.config.channels import accept_warnings, load_channel, referenced_files
from engine.config.destinations import _destination as _destination
from engine.config.destinations import _retry as _retry
from engine.config.loader import ENV_PREFIX, load
from engine.config.loader import _with_overlay as _with_overlay
from engine.config.model import (
    ACK_MODES,
    DEFAULT_TYPES,
    DEFAULT_VERSIONS,
    FAILURE_POLICIES,
    SOURCE_KINDS,
    AdminConfig,
    ChannelConfig,
    Config,
    DedupeConfig,
    DestinationConfig,
    FhirPollConfig,
    HttpSourceConfig,
    LimitsConfig,
    LogFloodConfig,
    LoggingConfig,
    OIDCConfig,
    RetentionConfig,
    RetryConfig,
    RouteConfig,
    SourceConfig,
    StoreEncryptionConfig,
    TLSConfig,
)
from engine.config.reader import _note as _note
from engine.config.reader import _read_yaml as _read_yaml
from engine.config.reader import _Section as _Section
from engine.config.reader import _size as _size
from engine.config.settings import _limits as _limits
from engine.config.settings import _log_flood as _log_flood
from engine.config.settings import _resolve_sqlite as _resolve_sqlite
from engine.config.settings import _store_encryption as _store_encryption
from engine.config.sources import _check_tls_file as _check_tls_file
from engine.config.sources import _fhir_poll as _fhir_poll
from engine.config.sources import _http_source as _http_source
from engine.config.sources import _max_frame as _max_frame
from engine.config.sources import _poll_config as _poll_config
from engine.config.sources import _source as _source

__all__ = [
    "ACK_MODES",
    "DEFAULT_TYPES",
    "DEFAULT_VERSIONS",
    "ENV_PREFIX",
    "FAILURE_POLICIES",
    "SOURCE_KINDS",
    "AdminConfig",
    "ChannelConfig",
    "Config",
    "DedupeConfig",
    "DestinationConfig",
    "FhirPollConfig",
    "HttpSourceConfig",
    "LimitsConfig",
    "LogFloodConfig",
    "LoggingConfig",
    "OIDCConfig",
    "RetentionConfig",
    "RetryConfig",
    "RouteConfig",
    "SourceConfig",
    "StoreEncryptionConfig",
    "TLSConfig",
    "accept_warnings",
    "load",
    "load_channel",
    "referenced_files",
]
