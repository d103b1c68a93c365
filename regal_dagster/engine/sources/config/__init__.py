"""`config`: application configuration kept in git, as a bundle of all refs plus the dependency lock files."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .target import ConfigTarget as TARGET

if TYPE_CHECKING:
    from ..base import Source

__all__ = ["TARGET", "load"]


def load() -> Source:
    from .source import ConfigSource

    return ConfigSource()
