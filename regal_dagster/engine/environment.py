"""What child processes see of this process's environment: only what they need, never a secret.

Client programs (pg_dump, pg_restore, psql, pg_amcheck, initdb, redis-server, git) get a short allowlist
plus what the caller adds (a DSN's PG* variables); an operator's hook commands get the operator's
environment without the secrets the policy names (policy.hook_environment, above the policy: this module
sits below it, under every client program).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

_ALLOWED = {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP",
            "SSL_CERT_FILE", "SSL_CERT_DIR", "SYSTEMROOT"}


def child_environment(**extra: str) -> dict[str, str]:
    """The environment of a client program: the allowlist (and LC_*), and `extra`."""
    env = {k: v for k, v in os.environ.items() if k in _ALLOWED or k.startswith("LC_")}
    return {**env, **extra}


def die_with_parent() -> None:
    """A child's preexec_fn: SIGTERM when its parent dies, even by SIGKILL (PR_SET_PDEATHSIG), so that no tool
    goes on writing where the next run starts again."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
