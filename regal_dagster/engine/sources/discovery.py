"""Finding the source kinds: every package under engine/sources/ that names its policy settings (`TARGET`)
and how to load its Source (`load()`). Settings are read when the policy is; a Source (and the client
libraries it needs) only when a kind is used. This module knows no Source type (registry.py gives the typed
view), so that what lies below the Source interface (engine/outcomes.py: the checks each kind adds) can
ask it without a circle."""

from __future__ import annotations

import functools
import importlib
import pkgutil
import sys
from types import ModuleType
from typing import Any

from ..errors import RegalError
from ..settings import TargetSettings


@functools.cache
def kind_packages() -> dict[str, ModuleType]:
    found = {}
    package = sys.modules[__package__]  # engine/sources, and any folder added to its __path__
    for info in pkgutil.iter_modules(package.__path__):
        if info.ispkg:
            module = importlib.import_module(f"{__package__}.{info.name}")
            if hasattr(module, "TARGET") and hasattr(module, "load"):
                found[module.TARGET.model_fields["kind"].annotation.__args__[0]] = module
    return dict(sorted(found.items()))


def kinds() -> list[str]:
    return list(kind_packages())


def target_models() -> list[type[TargetSettings]]:
    """Each kind's policy settings (a discriminated union on `kind` in the policy)."""
    return [module.TARGET for module in kind_packages().values()]


@functools.cache
def load_source(kind: str) -> Any:
    """The kind's Source (one per process), as its package's `load()` makes it."""
    module = kind_packages().get(kind)
    if module is None:
        raise RegalError(f"this regal-backup knows no source kind '{kind}' (it knows {', '.join(kinds())})",
                         "upgrade regal-backup to the version that wrote this backup")
    return module.load()
