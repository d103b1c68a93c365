"""`files`: files and directories (TLS certificates, configuration outside git) as one tar stream with each
file's SHA-256 in the manifest; restored under a directory and compared file by file."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .target import FilesTarget as TARGET

if TYPE_CHECKING:
    from ..base import Source

__all__ = ["TARGET", "load"]


def load() -> Source:
    from .source import FilesSource

    return FilesSource()
