"""The object store interface every backend implements, in the spirit of restic's backend.

save    `writer(key)` streams a large object (commit on success, nothing visible on failure);
        `put_bytes(key, data)` writes a small document (manifest, check record, lease)
load    `reader(key)`, `get_bytes(key)`, `read_range(key, start, length)`
stat    `size(key)` (None: no such object), `locked_until`, `server_side_encryption`
list    `list(prefix)`: every committed object under a prefix
remove  `delete(key)`: every version of it; ObjectLockedError while S3 Object Lock holds it
lock    `lock(name)`: one holder per name across processes and hosts (backups of a target, key changes)

Keys are '/'-separated paths relative to the repository root (engine/layout.py names them all).
One module per backend (local.py, s3.py); registry.py opens the one a URL names, wrapped once in the
retry and logging layers. Every backend passes tests/test_storage_conformance.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO, Self

from ..layout import REPOSITORY_MARKER


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int


class ObjectWriter(ABC):
    """A write-only stream into one object. Use as a context manager: commit on success, abort on error."""

    bytes_written = 0

    @abstractmethod
    def write(self, data: bytes) -> int: ...

    @abstractmethod
    def commit(self) -> None: ...

    @abstractmethod
    def abort(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class Repository(ABC):
    """The object store interface the engine uses."""

    location: str  # for people: no credentials in it
    encrypts_at_rest = False  # the store encrypts every object itself (S3 server-side encryption) and says so

    @abstractmethod
    def writer(self, key: str, retain_until: datetime | None = None) -> ObjectWriter:
        """`retain_until`: where the repository locks objects (S3 Object Lock), immutable until then."""

    @abstractmethod
    def reader(self, key: str) -> BinaryIO: ...

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, retain_until: datetime | None = None) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def list(self, prefix: str) -> Iterator[StoredObject]: ...

    @abstractmethod
    def size(self, key: str) -> int | None:
        """Size in bytes, or None when the object does not exist."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object for good (every version of it); ObjectLockedError while it is locked."""

    def locked_until(self, key: str) -> datetime | None:
        """The Object Lock retention date of an object, where the store locks objects."""
        return None

    @abstractmethod
    def abandoned_uploads(self, before: datetime) -> list[str]:
        """Unfinished writes (a crash mid-object) started before `before`: partial files, multipart uploads."""

    @abstractmethod
    def discard_upload(self, upload: str) -> None:
        """Remove one of `abandoned_uploads`."""

    @abstractmethod
    def lock(self, name: str) -> contextlib.AbstractContextManager[None]: ...

    def server_side_encryption(self, key: str) -> str | None:
        """The store's own encryption of an object at rest, where the store reports one."""
        return None

    @abstractmethod
    def read_range(self, key: str, start: int, length: int) -> bytes:
        """`length` bytes from offset `start` (fewer at the end of the object)."""

    def usage_bytes(self) -> int:
        """Bytes the repository's objects take."""
        return sum(o.size for o in self.list(""))

    def free_bytes(self) -> tuple[int, int] | None:
        """(free, total) bytes of the storage under the repository, where the store has such a limit."""
        return None

    def ensure_initialized(self) -> None:
        """Write the repository marker if it is missing (a new repository)."""
        if self.size(REPOSITORY_MARKER) is None:
            marker = {"format": "regal-backup-repository", "version": 1,
                      "created_at": datetime.now(UTC).isoformat(timespec="seconds")}
            self.put_bytes(REPOSITORY_MARKER, json.dumps(marker, indent=2).encode())


def lock_owner() -> dict[str, object]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.now(UTC).isoformat(timespec="seconds")}


def describe_lock_owner(raw: bytes | str) -> str:
    try:
        owner = json.loads(raw)
        return f"process {owner['pid']} on {owner['host']} since {owner['since']}"
    except (ValueError, KeyError, TypeError):
        return "another process"

