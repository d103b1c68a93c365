"""The source kinds: every package under engine/sources/ that names its policy settings (`TARGET`) and
how to load its Source (`load()`). Settings are read when the policy is; a Source (and the client
libraries it needs) only when a kind is used."""

from __future__ import annotations

import functools
import importlib
import pkgutil
from types import ModuleType
from typing import TYPE_CHECKING

from ..errors import RegalError
from ..settings import TargetSettings

if TYPE_CHECKING:
    from .base import Source


@functools.cache
def _kinds() -> dict[str, ModuleType]:
    from .. import sources

    found = {}
    for info in pkgutil.iter_modules(sources.__path__):
        if info.ispkg:
            module = importlib.import_module(f"{sources.__name__}.{info.name}")
            if hasattr(module, "TARGET") and hasattr(module, "load"):
                found[module.TARGET.model_fields["kind"].annotation.__args__[0]] = module
    return dict(sorted(found.items()))


def kinds() -> list[str]:
    return list(_kinds())


def target_models() -> list[type[TargetSettings]]:
    """Each kind's policy settings (a discriminated union on `kind` in the policy)."""
    return [module.TARGET for module in _kinds().values()]


@functools.cache
def source_for(kind: str) -> Source:
    module = _kinds().get(kind)
    if module is None:
        raise RegalError(f"this regal-backup knows no source kind '{kind}' (it knows {', '.join(kinds())})",
                         "upgrade regal-backup to the version that wrote this backup")
    source: Source = module.load()
    return source
