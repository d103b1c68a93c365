"""Private working directories: decrypted files and scratch servers live only in one, and one whose owner
died (SIGKILL, a power cut) is swept by the next command that makes one.

All of this user's working state lives under one base directory per user, `regal-backup-<uid>` in the temp
directory (or in the policy's `restore_tests.work_dir`): created mode 0700 and checked with `lstat` before
every use (a real directory, not a symlink, owned by this uid, no access for others: 0710 when the scratch
PostgreSQL servers' account may pass through it). Anyone else's directory or symlink there is refused with
a RegalError saying what to do; nothing elsewhere in the temp directory is ever looked at.

A working directory is `regal-<purpose>-<random>` (mode 0700) in that base, with `.regal-owner` naming the
process that made it (pid and start time: a pid reused by another process does not count as the owner).
The sweep acts only on directories whose owner file this uid wrote and whose owner is dead: it stops the
servers recorded there (only a live process whose start time matches the record and that runs from that
directory: watchdog.stop_orphan_servers), then removes the directory. Anything it does not recognise is left
alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import RegalError

logger = logging.getLogger(__name__)

OWNER_FILE = ".regal-owner"
PREFIX = "regal-"
BASE_PREFIX = "regal-backup-"
"""The per-user base directory is `regal-backup-<uid>`."""

_ALLOWED_BASE_BITS = 0o710  # rwx for us; x for the scratch servers' group (let_group_traverse); nothing else


def base_directory(parent: Path | None = None) -> Path:
    """The path of this user's base directory in `parent` (default: the temp directory); not checked."""
    return Path(parent or tempfile.gettempdir()).absolute() / f"{BASE_PREFIX}{os.geteuid()}"


def _refuse(path: Path, why: str) -> RegalError:
    return RegalError(f"refusing to keep private working files in {path}: {why}",
                      f"remove {path} (after looking at who made it and why), or set TMPDIR (or the policy's "
                      "restore_tests.work_dir) to a directory only you can write to")


def _checked(path: Path) -> Path:
    """`path`, a base directory that exists: a directory of our own that nobody else can enter or change."""
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        raise _refuse(path, "it is a symbolic link")
    if not stat.S_ISDIR(info.st_mode):
        raise _refuse(path, "it is not a directory")
    if info.st_uid != os.geteuid():
        raise _refuse(path, f"it belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()})")
    if stat.S_IMODE(info.st_mode) & ~_ALLOWED_BASE_BITS:
        raise _refuse(path, f"its mode is {stat.S_IMODE(info.st_mode):04o}; it must be 0700")
    return path


def _check_parent(parent: Path) -> None:
    """Nobody else may rename or replace what we create in `parent`: no write for group or others unless the
    sticky bit is set (the temp directory's 1777 is fine)."""
    info = parent.stat()
    if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        raise RegalError(f"refusing to keep private working files in {parent}: others can write to it and it "
                         "has no sticky bit", f"chmod go-w {parent} (or +t), or choose a directory only you can "
                         "write to")


def private_base(parent: Path | None = None) -> Path:
    """This user's base directory in `parent` (made 0700 when missing), checked; RegalError when it is not
    ours alone."""
    path = base_directory(parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    _check_parent(path.parent)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    return _checked(path)


def private_subdirectory(name: str, parent: Path | None = None) -> Path:
    """`name` in this user's base directory (made 0700 when missing), checked as the base is: ours alone, not a
    symbolic link (the `wal daemon` socket lives there)."""
    path = private_base(parent) / name
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    return _checked(path)


def is_private_base(path: Path) -> bool:
    """Whether `path` is this user's base directory (by its name; _checked says whether it may be used)."""
    return path.name == f"{BASE_PREFIX}{os.geteuid()}"


def let_group_traverse(directory: Path, gid: int) -> None:
    """Let group `gid` (the scratch servers' account), and nobody else, pass through our base directory or a
    private directory of ours in it: group `gid`, mode 0710 (a directory already given to that account is
    left as it is)."""
    info = directory.lstat()
    if is_private_base(directory):
        _checked(directory)
    elif stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        return
    if info.st_gid != gid:
        os.chown(directory, -1, gid, follow_symlinks=False)
    directory.chmod(0o710)


def owner_record() -> dict[str, object]:
    """What an owner file says of this process."""
    import psutil  # here: a command with nothing to sweep starts without it
    return {"pid": os.getpid(), "started": psutil.Process().create_time(), "host": socket.gethostname()}


def owner_alive(directory: Path) -> bool:
    """Whether the process that made `directory` still runs (a directory without an owner file: yes, it
    is not ours to judge)."""
    return recorded_owner_alive(directory / OWNER_FILE)


def recorded_owner_alive(owner_file: Path) -> bool:
    """Whether the process an owner file (owner_record) names still runs (no such file: yes)."""
    try:
        owner = json.loads(owner_file.read_text())
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False
    return isinstance(owner, dict) and _alive(owner)


def _alive(owner: dict[str, Any]) -> bool:
    import psutil

    if owner.get("host") != socket.gethostname():
        return True  # another host's, on a shared filesystem
    try:
        process = psutil.Process(int(owner["pid"]))
        return abs(process.create_time() - float(owner["started"])) < 0.01
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, ValueError, TypeError):
        return False


def _our_owner_record(directory: Path) -> dict[str, Any] | None:
    """The owner record of `directory` when this uid wrote it (a regular file of ours, with a pid and a start
    time), else None: not a directory the sweep may touch."""
    try:
        info = directory.lstat()
        if not stat.S_ISDIR(info.st_mode):
            return None
        owner_file = directory / OWNER_FILE
        fd = os.open(owner_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            status = os.fstat(f.fileno())
            if not stat.S_ISREG(status.st_mode) or status.st_uid != os.geteuid() or status.st_nlink != 1:
                return None
            owner = json.loads(f.read(4096))
        if not isinstance(owner, dict):
            return None
        int(owner["pid"])
        float(owner["started"])
        return owner
    except (OSError, ValueError, KeyError, TypeError):
        return None


def sweep(parent: Path | None = None) -> list[Path]:
    """Remove what dead owners of this uid left in our base directory in `parent` (default: the temp
    directory): their scratch servers stopped, their files deleted. Looks nowhere else; RegalError when the
    base directory exists but is not ours alone (then nothing is touched)."""
    path = base_directory(parent)
    try:
        base = _checked(path)
    except FileNotFoundError:
        return []
    removed = []
    with contextlib.suppress(OSError):
        for directory in base.iterdir():
            if not directory.name.startswith(PREFIX):
                continue
            owner = _our_owner_record(directory)
            if owner is None:
                logger.debug("%s: no owner record of ours, left alone", directory)
                continue
            if _alive(owner):
                continue
            from .postgresql.watchdog import stop_orphan_servers  # psutil: only for a dead owner's leftovers

            stop_orphan_servers(directory)
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
    return removed


def make_private_directory(purpose: str, base: Path | None = None) -> Path:
    """A new private directory owned by this process in our base directory in `base` (after sweeping dead
    owners' ones). The caller removes it (remove_private_directory)."""
    sweep(base)
    for attempt in range(5):
        root = private_base(base)
        try:
            path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{purpose}-", dir=root))  # mode 0700
            break
        except FileNotFoundError:  # another process removed the empty base meanwhile
            if attempt == 4:
                raise
    fd, temporary = tempfile.mkstemp(prefix=".regal-owner-", dir=path)  # written whole, then named
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(owner_record()))
    os.rename(temporary, path / OWNER_FILE)
    return path


def remove_private_directory(path: Path) -> None:
    """Delete a private directory, and its base directory when that is now empty."""
    shutil.rmtree(path, ignore_errors=True)
    remove_empty_base(path.parent)


def remove_empty_base(base: Path) -> None:
    """Remove our base directory `base` when nothing is left in it (a restored data directory or a work
    directory keeps no trace of us)."""
    if base.name == f"{BASE_PREFIX}{os.geteuid()}":
        with contextlib.suppress(OSError):
            base.rmdir()


@contextlib.contextmanager
def private_directory(purpose: str, base: Path | None = None) -> Iterator[Path]:
    path = make_private_directory(purpose, base)
    try:
        yield path
    finally:
        remove_private_directory(path)
