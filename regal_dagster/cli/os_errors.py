"""What an operating-system error means for the operator (used by the CLI's entry point and by commands that
explain a failure themselves, e.g. `wal get` while serving recovery)."""

from __future__ import annotations

import errno


def describe_os_error(exc: OSError) -> tuple[str, str]:
    """What an operating-system error means for the operator: what failed, where, and what to do."""
    where = f" ({exc.filename})" if exc.filename else ""
    message = f"{exc.strerror or type(exc).__name__}{where}"
    hints = {
        errno.ENOSPC: "free space on that filesystem (or prune old backups), then run the command again: "
                      "nothing partial was kept",
        errno.EDQUOT: "raise the quota or free space, then run the command again",
        errno.EACCES: "run as the user that owns it, or fix its permissions",
        errno.EPERM: "run as the user that owns it, or fix its permissions",
        errno.EROFS: "the filesystem is read-only: remount it read-write or choose another place",
        errno.ENOENT: "check the path",
    }
    return message, hints.get(exc.errno or 0, "check the path and the filesystem, then run the command again")
