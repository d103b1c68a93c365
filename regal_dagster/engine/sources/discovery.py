"""Finding the source kinds: every package under engine/sources/ that names its policy settings (`TARGET`)
and how to load its Source (`load()`). Settings are read when the policy is; a Source (and the client
libraries it needs) only when a kind is used. This module knows no Source type (registry.py gives the typed
view), so that what lies below the Source interface (engine/outcomes.py: the checks each kind adds) can
ask it without a circle."""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

from ..errors import RegalError
from ..plugins import plugin_modules
from ..settings import TargetSettings


@functools.cache
def kind_packages() -> dict[str, ModuleType]:
    found = {module.TARGET.model_fields["kind"].annotation.__args__[0]: module
             for module in plugin_modules(__package__, packages=True)
             if hasattr(module, "TARGET") and hasattr(module, "load")}
    return dict(sorted(found.items()))


def kinds() -> list[str]:
    return list(kind_packages())


def target_models() -> list[type[TargetSettings]]:
    """Each kind's policy settings (a discriminated union on `kind` in the policy)."""
    return [module.TARGET for module in kind_packages().values()]


_LOADED: dict[str, Any] = {}  # the Sources made so far, by kind: one per process


def load_source(kind: str) -> Any:
    """The kind's Source (one per process), as its package's `load()` makes it."""
    if kind in _LOADED:
        return _LOADED[kind]
    module = kind_packages().get(kind)
    if module is None:
        raise RegalError(f"this regal-backup knows no source kind '{kind}' (it knows {', '.join(kinds())})",
                         "upgrade regal-backup to the version that wrote this backup")
    return _LOADED.setdefault(kind, module.load())


def loaded_sources() -> list[Any]:
    """The Sources made so far in this process (a kind's own checks are looked up there first, so that reading
    a record of checks does not load every kind's Source and its libraries)."""
    return list(_LOADED.values())
