"""`postgres_cluster`: one PostgreSQL server with all its databases, protected physically: base backups
taken with pg_basebackup (one tar stream through the pipeline, with PostgreSQL's own backup manifest) plus
the server's WAL in the repository (`regal-backup wal push` as archive_command, or `wal stream`), restored
to any point in time."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .target import PostgresClusterTarget as TARGET

if TYPE_CHECKING:
    from ..base import Source

__all__ = ["TARGET", "load"]


def load() -> Source:
    from .source import PostgresClusterSource

    return PostgresClusterSource()
