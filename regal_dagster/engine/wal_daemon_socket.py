"""Where `regal-backup wal daemon` listens and how `wal push` / `wal get` talk to it: the client side stays in the
standard library (plus psutil-free workspace checks), so that PostgreSQL's archive_command and restore_command
start in a blink when a daemon serves them.

The socket is `<temp dir>/regal-backup-<uid>/wal-daemon/<policy hash>-<target>.sock`: in this user's private base
directory (0700, ours alone, checked as engine/workspace.py checks it), so only this uid (the account PostgreSQL
runs as, which must also run the daemon) can connect. Beside it, `<...>.lock` is held (flock) by the running
daemon and names its pid: a second daemon for the same policy and target refuses, naming it.

One request per connection, one JSON line each way. A push is answered only once the WAL file is sealed in the
repository (or refused); a connection that closes without an answer means nothing was acknowledged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
from pathlib import Path
from typing import Any

from .workspace import private_subdirectory

DIRECTORY = "wal-daemon"
REPLY_SECONDS = 900.0  # a push or a get that takes longer than this is given up (PostgreSQL tries again)
MAX_SOCKET_PATH = 107  # sockaddr_un.sun_path, less its terminating zero


def daemon_directory() -> Path:
    """This user's private directory of daemon sockets (created when missing, checked: RegalError otherwise)."""
    return private_subdirectory(DIRECTORY)


def _policy_key(policy: Path) -> str:
    return hashlib.sha256(str(policy.resolve()).encode()).hexdigest()[:16]


def socket_path(directory: Path, policy: Path, target: str) -> Path:
    return directory / f"{_policy_key(policy)}-{target}.sock"


def lock_path(directory: Path, policy: Path, target: str) -> Path:
    return directory / f"{_policy_key(policy)}-{target}.lock"


def spool_path(directory: Path, policy: Path, target: str) -> Path:
    """Where the daemon keeps the WAL it fetched ahead (authenticated) for `wal get`."""
    return directory / f"{_policy_key(policy)}-{target}.prefetched"


def find_socket(policy: Path, target: str | None) -> Path | None:
    """The socket of the daemon serving `target` of `policy` (no target: the one daemon of this policy, which
    checks that it serves the policy's only postgres_cluster target), when one is there."""
    try:
        directory = daemon_directory()
    except Exception:  # noqa: BLE001 - no private directory: no daemon; the synchronous path says why
        return None
    if target:
        path = socket_path(directory, policy, target)
        return path if path.exists() else None
    found = sorted(directory.glob(f"{_policy_key(policy)}-*.sock"))
    return found[0] if len(found) == 1 else None


def send_message(connection: socket.socket, message: dict[str, Any]) -> None:
    connection.sendall(json.dumps(message).encode() + b"\n")


def read_message(connection: socket.socket, limit: int = 1 << 20) -> dict[str, Any] | None:
    """One JSON line; None when the other side closed first (or sent something else)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = connection.recv(65536)
        if not chunk or len(data) > limit:
            return None
        data += chunk
    try:
        message = json.loads(data)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


class DaemonAbsent(Exception):
    """No daemon answered: the caller does the work itself (and says so)."""


def ask_daemon(path: Path, request: dict[str, Any], timeout: float = REPLY_SECONDS) -> dict[str, Any]:
    """The daemon's answer to `request`; DaemonAbsent (with why) when none answers."""
    if len(str(path)) > MAX_SOCKET_PATH:
        raise DaemonAbsent(f"its socket path {path} is too long for a UNIX socket")
    with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as connection:
        connection.settimeout(timeout)
        try:
            connection.connect(str(path))
        except OSError as exc:
            raise DaemonAbsent(f"nothing listens on {path} ({exc.strerror or exc})") from None
        try:
            send_message(connection, request)
            reply = read_message(connection)
        except OSError as exc:
            raise DaemonAbsent(f"the daemon on {path} went away before it answered ({exc.strerror or exc})") from None
    if reply is None:
        raise DaemonAbsent(f"the daemon on {path} went away before it answered")
    return reply
