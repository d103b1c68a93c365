"""What a check found, for people and for --json: `regal-backup check` (engine/preflight.py) and each source
kind's own pre-flight checks (`Source.preflight`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from .errors import RegalError

CLOCK_SKEW_LIMIT = timedelta(seconds=60)
"""More than this between this host's clock and a server's: backup ids, PITR times and RPO ages disagree."""


@dataclass(frozen=True)
class Finding:
    subject: str  # "repository", "keys", "target main", ...
    check: str  # what was checked: "reachable", "writable", "wal_level", ...
    passed: bool
    detail: str  # what was found
    fix: str = ""  # what to do when it did not pass
    required: bool = True  # False: a failure is a warning (backups work, something the runbook wants is missing)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def finding(subject: str, check: str, probe: Callable[[], str], fix: str) -> Finding:
    """Run `probe` (it returns what it found, or raises RegalError/OSError saying what is wrong)."""
    try:
        return Finding(subject, check, True, probe())
    except RegalError as exc:
        return Finding(subject, check, False, exc.message, exc.hint or fix)
    except OSError as exc:
        return Finding(subject, check, False, f"{exc.strerror or type(exc).__name__}"
                       + (f" ({exc.filename})" if exc.filename else ""), fix)


def clock_finding(subject: str, their_now: datetime) -> Finding:
    """This host's clock against a server's `now()`."""
    skew = datetime.now(UTC) - their_now
    direction = "ahead of" if skew >= timedelta(0) else "behind"
    detail = f"this host's clock is {abs(skew.total_seconds()):.1f} s {direction} the server's"
    if abs(skew) <= CLOCK_SKEW_LIMIT:
        return Finding(subject, "clock", True, detail)
    return Finding(subject, "clock", False, detail, "synchronise both clocks (chrony or systemd-timesyncd): backup "
                   "ids, restore times and RPO ages are read against this host's clock")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (a server's refusal), never its traceback."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def readable_path(path: Path) -> str:
    """What a path is, when this user can read it (directories: list and enter); RegalError when not."""
    if not path.exists():
        raise RegalError(f"{path} does not exist", "fix the path in the policy")
    if path.is_dir():
        return readable_directory(path)
    if not os.access(path, os.R_OK):
        raise RegalError(f"{path} is not readable by this user", "run as a user that can read it")
    return f"{path}: a readable file"


def readable_directory(path: Path) -> str:
    if not path.is_dir():
        raise RegalError(f"{path} is not a directory", "fix the path in the policy")
    if not os.access(path, os.R_OK | os.X_OK):
        raise RegalError(f"{path} is not readable by this user", "run as a user that can read it")
    return f"{path}: a readable directory"
