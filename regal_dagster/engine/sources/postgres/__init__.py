"""`postgres`: one PostgreSQL database, backed up logically from one exported snapshot (a schema archive
and the tables' rows, small tables packed several to an object), restored in parallel and validated table by table."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .target import PostgresTarget as TARGET

if TYPE_CHECKING:
    from ..base import Source

__all__ = ["TARGET", "load"]


def load() -> Source:
    from .source import PostgresSource

    return PostgresSource()
