"""The object store interface every backend implements, in the spirit of restic's backend.

The interface (restic's verbs on the left):

save    `writer(key, retain_until)` streams a large object: committed on success, nothing visible on
        failure or while unfinished; `put_bytes(key, data)` writes a small document (manifest, record)
load    `reader(key)` (a stream), `get_bytes(key)`, `read_range(key, start, length)` (fewer bytes at the
        end of the object, none past it); a missing object is a RegalError naming its key
stat    `size(key)` (None: no such object), `locked_until(key)`, `server_side_encryption(key)`
list    `list(prefix)`: every committed object under a prefix, with its size ("backups/a/" lists
        nothing of "backups/ab/"); `usage_bytes()`, `free_bytes()`
remove  `delete(key)`: every version of it, and nothing to do when it is gone (idempotent);
        ObjectLockedError while S3 Object Lock holds it
lock    `lock(name)`: one holder per name across processes and hosts (backups of a target, key
        changes); a second holder gets LockedError naming host and pid; a holder that dies releases it
        (at once on a file system, after `repository.lock_lease` on S3)
and     `check_ready()` (the store can hold the repository as configured), `abandoned_uploads(before)` and
        `discard_upload(upload)` (what a crash mid-object left), `encrypts_at_rest`, `backend`

Keys are '/'-separated paths relative to the repository root (engine/layout.py names them all); a key
that would leave the root ("../x", "/x") is refused.

Backends: one module per store under storage/ (local.py: a directory; s3.py: a bucket), each with a
module-level `BACKEND` (a `Backend`: its kind, URL schemes, its repository settings model (on
settings.RepositorySettings: the policy picks it by the URL's scheme, and refuses another backend's
settings), and how to open one). registry.py finds them, picks one by the URL's scheme ("file" also
serves a plain path) and layers the wrappers around what it opens, once:

    retry.Retrying( logged.Logged( <backend> ) )

Logged   every operation at DEBUG on the logger "regal_backup.storage": op, key, bytes, milliseconds
         (and the repository's location, which never holds credentials); failures with their error
Retrying operations that are idempotent requests (get_bytes, read_range, size, list, put_bytes,
         delete, locked_until, server_side_encryption, usage_bytes, free_bytes, check_ready,
         abandoned_uploads, discard_upload, opening a reader, taking a lock) are tried again after a
         `TransientStorageError` (connection refused or dropped, timeouts, HTTP 5xx, SlowDown,
         throttling), with exponential backoff and jitter (`repository.retry`); after the last attempt
         the operator gets one StorageUnavailableError naming the repository, the key and what to do.
         A writer's stream is never replayed: a backend retries only whole requests inside it (an S3
         part upload) with the same `retry.call` and policy. Bytes already read from a reader's
         stream are not re-read.
Both wrappers keep the whole interface; anything else a backend offers (`client`, `versioned`, ...)
is reached through them unchanged, and `repo.backend` is the store itself.

A new backend is one new module here with a `BACKEND` that passes tests/test_storage_conformance.py
(add its fixture there); nothing else changes.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Self

from ..errors import LockedError, RegalError
from ..layout import KEYS_LOCK, LEDGER_LOCK
from ..settings import RepositorySettings
from ..transport import LOCAL, Transport


class ObjectMissingError(RegalError):
    """There is no object under that key (the store itself answered)."""


class TransientStorageError(RegalError):
    """A failure that may pass if the same request is made again: the connection was refused, dropped or
    timed out; the store answered 5xx, SlowDown or throttling. Backends raise it; the retry wrapper tries
    again, and after its last attempt raises StorageUnavailableError."""


class StorageUnavailableError(RegalError):
    """A storage operation still failed with transient errors after its last attempt."""


def check_key(key: str, location: str) -> str:
    """`key` when it stays inside the repository; RegalError naming it otherwise."""
    if key.startswith("/") or ".." in key.split("/"):
        raise key_outside(key, location)
    return key


def key_outside(key: str, location: str) -> RegalError:
    return RegalError(f"key {key!r} leaves the repository {location}",
                      "repository keys are relative paths; this one came from a damaged or forged document")


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    # what changes whenever the object is written again (a file's mtime and inode, an S3 ETag); "" when the backend
    # cannot tell: a reader's cache (catalog.ManifestCache) never serves such an object
    version: str = field(default="", compare=False)


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

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class Repository(ABC):
    """The object store interface the engine uses."""

    location: str  # for people: no credentials in it
    encrypts_at_rest = False  # the store encrypts every object itself (S3 server-side encryption) and says so
    locks_objects = False  # the store can keep objects immutable until a date (S3 Object Lock)

    @property
    def backend(self) -> Repository:
        """The store itself, under any wrappers."""
        return self

    @contextlib.contextmanager
    def batched_durability(self) -> Iterator[None]:
        """Objects written inside the block may be made durable all at once when it ends (before it
        returns): many small objects without a disk flush each. Nothing may refer to them before."""
        yield

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
    def list(self, prefix: str) -> Iterator[StoredObject]:
        """Committed objects whose keys start with `prefix` ("" or a folder ending in '/')."""

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
    def abandoned_uploads(self, before: datetime) -> builtins.list[str]:
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

    def check_ready(self) -> None:
        """The store can hold the repository as the policy configures it (S3: Object Lock on the bucket).
        The repository's own marker is the engine's (engine/repository_format.py): it is sealed."""


@dataclass(frozen=True)
class Backend:
    """What the registry knows of one backend module: its `BACKEND`."""

    kind: str  # the store's name for people and for Dagster's asset kinds: "filesystem", "s3"
    schemes: tuple[str, ...]  # URL schemes it serves; "file" serves plain paths too
    example: str  # how its URL is written, for error messages: "s3://bucket/prefix"
    repository: type[Repository]  # says what the store can do (`encrypts_at_rest`, `locks_objects`)
    config: type[RepositorySettings]  # its settings in the policy (it checks the URL: ValueError saying what is wrong)
    # opens the repository its settings describe; relative paths resolve against the policy file's directory
    open: Callable[[RepositorySettings, Path], Repository]
    # how backup data travels to the store, for the report's encryption in transit (default: files here)
    transport: Callable[[RepositorySettings, str], Transport] = (
        lambda config, label: Transport(f"{label} (local file system)", LOCAL, "files on this host"))

    @property
    def encrypts_at_rest(self) -> bool:
        return self.repository.encrypts_at_rest

    @property
    def locks_objects(self) -> bool:
        return self.repository.locks_objects


def lock_owner() -> dict[str, object]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.now(UTC).isoformat(timespec="seconds")}


def describe_lock_owner(raw: bytes | str) -> str:
    """Who holds a lock, for the refusal: host, pid, since when, and when an S3 lease ends."""
    try:
        owner = json.loads(raw)
        held = f"process {owner['pid']} on {owner['host']} since {owner['since']}"
    except (ValueError, KeyError, TypeError):
        return "another process"
    if isinstance(owner.get("expires"), int | float):
        ends = datetime.fromtimestamp(owner["expires"], UTC)
        held += f"; its lease ends at {ends:%Y-%m-%d %H:%M:%S} UTC unless it renews it (a dead holder's does)"
    return held


def lock_refusal(name: str, raw: bytes | str) -> LockedError:
    what = {KEYS_LOCK: "a key rotation or retirement is running", LEDGER_LOCK: "an erasure is being recorded"}.get(
        name, f"another backup of '{name}' is running")
    return LockedError(f"{what} ({describe_lock_owner(raw)})",
                       "wait for it to finish, or wait for the lock: --wait DURATION, or repository.lock_wait")

