"""`redis`: a Redis server's dataset as an RDB taken over the replication protocol (and its append-only
files when readable), checked with redis-check-rdb, restore-tested in a scratch redis-server."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .target import RedisTarget as TARGET

if TYPE_CHECKING:
    from ..base import Source

__all__ = ["TARGET", "load"]


def load() -> Source:
    from .source import RedisSource

    return RedisSource()
