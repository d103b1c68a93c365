"""The local filesystem backend: a directory, objects as files written atomically, flock locks.

Served for `file:///path` and plain paths (relative ones from the policy file's directory). A local
disk has no transient errors worth a retry: it works or it fails.

Nothing of regal-backup writes a symbolic link in a repository: one found inside it (planted by whoever can
write there) is never followed. Listings leave it out and say so (a warning, once per link and process);
deleting a key that is a link removes the link, never what it points to.
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import BinaryIO, cast

from ..errors import RegalError
from ..layout import PARTIAL_SUFFIX, backup_prefix, lock_key, split_backup_key
from ..settings import RepositorySettings, resolve_policy_path
from .base import (
    Backend,
    ObjectMissingError,
    ObjectWriter,
    Repository,
    StoredObject,
    check_key,
    key_outside,
    lock_owner,
    lock_refusal,
)

logger = logging.getLogger(__name__)


class FileRepositoryConfig(RepositorySettings):
    """A repository in a directory of this host's file system: `url` is file:///absolute/path or a path
    (a relative one from the policy file's directory). It has only the settings every repository has."""

    def root(self, base_dir: Path) -> Path:
        """The repository's directory, relative paths resolved from the policy file's directory `base_dir`."""
        return resolve_policy_path(base_dir, self.url.removeprefix("file://"))

    def failure_domain(self, base_dir: Path) -> str:
        """The file system holding the repository (its device number): two repositories on one file system
        go down with it."""
        path = self.root(base_dir)
        while not path.exists() and path != path.parent:
            path = path.parent
        return f"file system (device {path.stat().st_dev})"


class _LocalWriter(ObjectWriter):
    def __init__(self, path: Path, location: str, batch: _SyncBatch | None = None):
        self.path, self.location, self.batch = path, location, batch
        self.bytes_written = 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.partial = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
            self.file = open(self.partial, "xb")  # noqa: SIM115 - closed by commit() or abort()
        except OSError as exc:
            raise self._failed(exc) from None

    def write(self, data: bytes) -> int:
        try:
            self.file.write(data)
        except OSError as exc:
            raise self._failed(exc) from None
        self.bytes_written += len(data)
        return len(data)

    def commit(self) -> None:
        try:
            self.file.flush()
            if self.batch is None:
                os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.partial, self.path)
            if self.batch is None:
                _fsync_dir(self.path.parent)
            else:
                self.batch.add(self.path)
        except OSError as exc:
            self.abort()
            raise self._failed(exc) from None

    def abort(self) -> None:
        with contextlib.suppress(OSError):  # a full disk may refuse even the close: the unlink frees it
            self.file.close()
        self.partial.unlink(missing_ok=True)

    def _failed(self, exc: OSError) -> RegalError:
        """What a failed write means for the operator: what, where, how much, what to do."""
        written = f"{self.bytes_written / 1048576:.1f} MiB"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(next(p for p in (self.path, *self.path.parents) if p.exists())).free
            return RegalError(f"the repository {self.location} is full: writing {self.path.name} failed after "
                              f"{written} with {free / 1048576:.1f} MiB left on its filesystem",
                              "free space or prune old backups (`regal-backup prune`), then run the command "
                              "again; what was written was discarded")
        return RegalError(f"writing {self.path.name} to {self.location} failed after {written}: "
                          f"{exc.strerror or type(exc).__name__}",
                          "check the repository's filesystem (permissions, read-only, hardware errors); what was "
                          "written was discarded")


class _SyncBatch:
    """Files written without their own fsync, made durable together by `flush`: one syncfs(2) of their
    filesystem where Linux has it (a single journal commit), else an fsync of each file and directory."""

    def __init__(self) -> None:
        self.paths: list[Path] = []
        self._lock = threading.Lock()

    def add(self, path: Path) -> None:
        with self._lock:
            self.paths.append(path)

    def flush(self) -> None:
        with self._lock:
            paths, self.paths = self.paths, []
        if not paths:
            return
        if _syncfs(paths[0].parent):
            return
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for directory in dict.fromkeys(p.parent for p in paths):
            _fsync_dir(directory)


def _syncfs(path: Path) -> bool:
    """syncfs(2) of the filesystem holding `path`; False where it is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syncfs = libc.syncfs
    except (OSError, AttributeError):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        return bool(syncfs(fd) == 0)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalRepository(Repository):
    def __init__(self, root: Path, lock_wait: timedelta = timedelta(0)):
        self.root = root
        self.location = f"file://{root}"
        self.lock_wait = lock_wait
        self._batch: _SyncBatch | None = None
        self._resolved_root: Path | None = None
        self._reported_links: set[str] = set()

    def _real_root(self) -> Path:
        """The root with its symbolic links resolved, once it exists (resolving it for every object cost as
        much as writing a small table's object)."""
        if self._resolved_root is not None:
            return self._resolved_root
        resolved = self.root.resolve()
        if self.root.exists():
            self._resolved_root = resolved
        return resolved

    def _path(self, key: str) -> Path:
        path, root = (self.root / check_key(key, self.location)).resolve(), self._real_root()
        if path != root and root not in path.parents:  # through a symbolic link
            raise key_outside(key, self.location)
        return path

    def writer(self, key: str, retain_until: datetime | None = None) -> ObjectWriter:
        return _LocalWriter(self._path(key), self.location, self._batch)

    @contextlib.contextmanager
    def batched_durability(self) -> Iterator[None]:
        if self._batch is not None:  # already inside one
            yield
            return
        self._batch = batch = _SyncBatch()
        try:
            yield
        finally:
            self._batch = None
        batch.flush()  # only when the block succeeded: a failed backup's objects are garbage anyway

    def reader(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise ObjectMissingError(f"object {key} is missing from {self.location}",
                             "the backup is damaged: verify it and use another one") from None

    def put_bytes(self, key: str, data: bytes, retain_until: datetime | None = None) -> None:
        with self.writer(key) as w:
            w.write(data)

    def get_bytes(self, key: str) -> bytes:
        with self.reader(key) as f:
            return f.read()

    def _linked(self, path: Path) -> bool:
        """Whether `path` or a directory between the root and it is a symbolic link (then reported)."""
        for here in (path, *path.parents):
            if here == self.root or self.root not in here.parents:
                return False
            if here.is_symlink():
                self._report_link(here)
                return True
        return False

    def _report_link(self, path: Path) -> None:
        key = path.relative_to(self.root).as_posix()
        if key not in self._reported_links:
            self._reported_links.add(key)
            logger.warning("%s in the repository %s is a symbolic link, which regal-backup never writes: not "
                           "followed, ignored (remove it)", key, self.location)

    def list(self, prefix: str) -> Iterator[StoredObject]:
        base = self.root / check_key(prefix, self.location) if prefix else self.root
        if self._linked(base) or not base.is_dir():
            return
        relative = base.relative_to(self.root).as_posix()
        yield from self._scan(str(base), "" if relative == "." else relative + "/")

    def _scan(self, directory: str, key_prefix: str) -> Iterator[StoredObject]:
        """The objects under `directory` (whose key starts with `key_prefix`), its files before its subdirectories'
        (as os.walk); never into a linked directory, and a link is never listed (reported instead). One scandir
        per directory: listing the repository took longer than writing a small table's object."""
        try:
            with os.scandir(directory) as scanned:
                entries = list(scanned)
        except OSError:  # removed meanwhile (os.walk ignores it too)
            return
        subdirectories = []
        for entry in entries:
            if entry.is_symlink():
                self._report_link(Path(entry.path))
            elif entry.is_dir(follow_symlinks=False):
                subdirectories.append(entry)
            elif not entry.name.endswith(PARTIAL_SUFFIX):
                try:
                    stat = entry.stat(follow_symlinks=False)
                except FileNotFoundError:  # deleted meanwhile
                    continue
                yield StoredObject(key_prefix + entry.name, stat.st_size, f"{stat.st_mtime_ns}-{stat.st_ino}")
        for entry in subdirectories:
            yield from self._scan(entry.path, key_prefix + entry.name + "/")

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def read_range(self, key: str, start: int, length: int) -> bytes:
        with self.reader(key) as f:
            f.seek(start)
            return f.read(length)

    def free_bytes(self) -> tuple[int, int] | None:
        existing = next(p for p in (self.root, *self.root.parents) if p.exists())  # before the first backup
        usage = shutil.disk_usage(existing)
        return usage.free, usage.total

    def delete(self, key: str) -> None:
        self._unlink(key)

    def _unlink(self, key: str) -> None:
        """Remove the file (a symbolic link: only the link, never what it points to), and the directories of a
        backup it leaves empty (up to the backup's own)."""
        linked = self.root / check_key(key, self.location)
        if linked.is_symlink() and not self._linked(linked.parent):
            self._report_link(linked)
            linked.unlink(missing_ok=True)
            return
        path = self._path(key)
        path.unlink(missing_ok=True)
        if (parts := split_backup_key(key)) is not None:
            top = self._path(backup_prefix(parts[0], parts[1]))
            directory = path.parent
            while directory == top or top in directory.parents:
                try:
                    directory.rmdir()  # only an empty one: a file written meanwhile keeps it
                except OSError:
                    break
                directory = directory.parent

    def abandoned_uploads(self, before: datetime) -> builtins.list[str]:
        found = []
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                full = Path(dirpath) / name
                if not name.endswith(PARTIAL_SUFFIX) or full.is_symlink():
                    continue
                with contextlib.suppress(FileNotFoundError):  # finished or discarded meanwhile
                    if full.lstat().st_mtime < before.timestamp():
                        found.append(full.relative_to(self.root).as_posix())
        return sorted(found)

    def discard_upload(self, upload: str) -> None:
        self._unlink(upload)

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """An flock on locks/NAME.lock: the kernel releases it if the process dies."""
        path = self._path(lock_key(name, ".lock"))
        path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.lock_wait.total_seconds()
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0)
                os.close(fd)
                if time.monotonic() >= deadline:
                    raise lock_refusal(name, holder) from None
                time.sleep(0.2)
                continue
            # The holder before us may have removed the file after we opened it: lock the live file only.
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(lock_owner()).encode(), 0)
            yield
        finally:
            path.unlink(missing_ok=True)
            os.close(fd)


def _open(config: RepositorySettings, base_dir: Path) -> Repository:
    return LocalRepository(cast(FileRepositoryConfig, config).root(base_dir), lock_wait=config.lock_wait)


BACKEND = Backend(kind="filesystem", schemes=("file",), example="file:///path or a plain path",
                  repository=LocalRepository, config=FileRepositoryConfig, open=_open)
