"""The source kinds, as the verbs use them: which kinds there are, each one's policy settings, and its
`Source` (discovery.py finds them: every package under engine/sources/ with a `TARGET` and a `load()`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .discovery import kinds, load_source, target_models

if TYPE_CHECKING:
    from .base import Source

__all__ = ["kinds", "source_for", "target_models"]


def source_for(kind: str) -> Source:
    """The kind's Source; RegalError naming the kinds this regal-backup knows when there is no such kind."""
    source: Source = load_source(kind)
    return source
