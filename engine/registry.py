"""Stages and destinations by name.

Built-ins register themselves exactly like user plugins do, so there is one
path for both (datasette's ``DEFAULT_PLUGINS``; Benthos' ``MustRegister...``).
A channel refers to a filter, transform step or destination kind by its
registered name, or to a user callable by ``module:function``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from engine.errors import ConfigError
from engine.suggest import did_you_mean

T = TypeVar("T")

# name -> factory(options: dict, context: StageContext) -> step callable
TRANSFORMS: dict[str, Callable[..., Any]] = {}
# name -> factory(argument, context: StageContext) -> predicate callable (engine.stages.build_filter)
FILTERS: dict[str, Callable[..., Any]] = {}
# kind -> Destination class (see engine.destinations.base.Destination)
DESTINATIONS: dict[str, type[Any]] = {}

BUILTIN_MODULES = (
    "engine.stages",
    "engine.destinations.file",
    "engine.destinations.mllp",
    "engine.destinations.fhir",
    "engine.destinations.rabbitmq",
    "engine.destinations.http",
    "transforms.fhir_step",
    "transforms.fhir_to_v2.step",
    "transforms.edits",
)


def transform(name: str) -> Callable[[T], T]:
    """Decorator: register a transform step factory under ``name``."""

    def deco(factory: T) -> T:
        TRANSFORMS[name] = factory  # type: ignore[assignment]
        return factory

    return deco


def filter_(name: str) -> Callable[[T], T]:
    """Decorator: register a filter factory under ``name`` (a channel writes ``{name: argument}``)."""

    def deco(factory: T) -> T:
        FILTERS[name] = factory  # type: ignore[assignment]
        return factory

    return deco


def destination(kind: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: register a destination class under ``kind``."""

    def deco(cls: type[T]) -> type[T]:
        DESTINATIONS[kind] = cls
        return cls

    return deco


_loaded = False


def load_builtins() -> None:
    """Import the built-in modules once so they register themselves."""
    global _loaded
    if _loaded:
        return
    for mod in BUILTIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            # A built-in whose module is not there yet (or whose optional dependency
            # is missing) simply does not register; using it is then a config error.
            if exc.name not in (mod, *mod.split(".")[:1]) and not mod.startswith(exc.name or "\0"):
                raise
    _loaded = True


def load_plugins(
    paths: tuple[Path, ...] | list[Path], modules: tuple[str, ...] | list[str], base_dir: Path
) -> None:
    """Import the user's plugin modules (from routes.yaml ``plugins:``); they register themselves
    with the same decorators the built-ins use (``@registry.destination("kind")``...)."""
    load_builtins()
    for p in [base_dir, base_dir / "transforms", *paths]:
        sp = str(p)
        if sp not in sys.path:
            sys.path.insert(0, sp)
    for mod in modules:
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            raise ConfigError(
                f"cannot import plugin module {mod!r}: {exc}",
                key="plugins",
                hint="put the module under a folder listed in plugin_paths (or next to routes.yaml)",
            ) from exc


def import_from_string(ref: str, search_paths: list[Path] | None = None) -> Any:
    """``"package.module:attr"`` → the object.  ``search_paths`` are added to sys.path first."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"{ref!r} is not a 'module:function' reference", hint="write it as package.module:function"
        )
    for p in search_paths or []:
        sp = str(p)
        if sp not in sys.path:
            sys.path.insert(0, sp)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"cannot import module {module_name!r} for {ref!r}: {exc}",
            hint="check the module path; user modules go under transforms/ or a path listed in routes.yaml plugin_paths",
        ) from exc
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None))]
        near = did_you_mean(attr, names)
        raise ConfigError(
            f"module {module_name!r} has no attribute {attr!r}" + (f" ({near})" if near else ""),
            hint=f"write {module_name}:<function> with a function defined in "
            f"{getattr(module, '__file__', None) or module_name}",
        ) from exc
    return obj
