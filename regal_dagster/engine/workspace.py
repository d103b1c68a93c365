"""Private working directories: decrypted files and scratch servers live only in one, and one whose owner
died (SIGKILL, a power cut) is swept by the next command that makes one.

A working directory is `regal-<purpose>-<random>` (mode 0700) under the base directory (the policy's
`restore_tests.work_dir`, or the temp directory), with `.regal-owner` naming the process that made it
(pid and start time: a pid reused by another process does not count as the owner). Sweeping a dead
owner's directory first stops any PostgreSQL server still running from it, then removes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil

from .postgresql.watchdog import stop_orphan_servers

OWNER_FILE = ".regal-owner"
PREFIX = "regal-"


def owner_record() -> dict[str, object]:
    """What an owner file says of this process."""
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
    if owner.get("host") != socket.gethostname():
        return True  # another host's, on a shared filesystem
    try:
        return bool(psutil.Process(int(owner["pid"])).create_time() == owner["started"])
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, ValueError, TypeError):
        return False


def sweep(base: Path | None = None) -> list[Path]:
    """Remove what dead owners left under `base`: their scratch servers stopped, their files deleted."""
    removed = []
    root = base or Path(tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for directory in root.iterdir():
            if directory.name.startswith(PREFIX) and directory.is_dir() and not owner_alive(directory):
                stop_orphan_servers(directory)
                shutil.rmtree(directory, ignore_errors=True)
                removed.append(directory)
    return removed


def make_private_directory(purpose: str, base: Path | None = None) -> Path:
    """A new private directory owned by this process (after sweeping dead owners' ones). The caller removes it."""
    sweep(base)
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{purpose}-", dir=base))  # mode 0700
    (path / OWNER_FILE).write_text(json.dumps(owner_record()))
    return path


@contextlib.contextmanager
def private_directory(purpose: str, base: Path | None = None) -> Iterator[Path]:
    path = make_private_directory(purpose, base)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
