"""The one extension pattern: a plug-in is a module (or a package) inside a plug-in package — storage/,
sources/, channels/, compliance/frameworks/ — that names what it brings at module level (`BACKEND`,
`TARGET` + `load()`, `CHANNEL` + `send()`, `FRAMEWORK`). Each registry asks this module for those and keeps
what it recognises; adding a plug-in is adding a module, with no edit elsewhere."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Iterator
from types import ModuleType


def plugin_modules(package_name: str, *, packages: bool = False) -> Iterator[ModuleType]:
    """The modules of the package `package_name` (already imported), imported, in name order: the sub-packages
    when `packages`, else the plain modules. The package's `__path__` is searched, so a folder added to it is
    searched too."""
    package = sys.modules[package_name]
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda info: info.name):
        if info.ispkg == packages:
            yield importlib.import_module(f"{package_name}.{info.name}")
