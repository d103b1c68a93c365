"""What child processes see of this process's environment: only what they need, never a secret.

Client programs (pg_dump, pg_restore, psql, pg_amcheck, initdb, redis-server, git) get a short allowlist
plus what the caller adds (a DSN's PG* variables); an operator's hook commands get the operator's
environment without the secrets the policy names (the master key's variable and every ${VAR} of the
policy file, the SMTP password and webhook variables).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .policy import Policy

_ALLOWED = {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP",
            "SSL_CERT_FILE", "SSL_CERT_DIR", "SYSTEMROOT"}


def child_environment(**extra: str) -> dict[str, str]:
    """The environment of a client program: the allowlist (and LC_*), and `extra`."""
    env = {k: v for k, v in os.environ.items() if k in _ALLOWED or k.startswith("LC_")}
    return {**env, **extra}


def hook_environment(policy: Policy) -> dict[str, str]:
    """The environment of an operator's hook command: theirs, without the policy's secrets."""
    return {k: v for k, v in os.environ.items() if k not in secret_names(policy)}


def secret_names(policy: Policy) -> set[str]:
    """Every environment variable the policy reads a secret from."""
    names = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", policy.model_dump_json()))
    if policy.encryption.master_key.env:
        names.add(policy.encryption.master_key.env)
    for channel in policy.alerts.channels:
        names.update(v for k, v in channel.model_dump().items() if k.endswith("_env") and isinstance(v, str))
    if policy.reports.signing and policy.reports.signing.passphrase_env:
        names.add(policy.reports.signing.passphrase_env)
    return names


def die_with_parent() -> None:
    """A child's preexec_fn: SIGTERM when its parent dies, even by SIGKILL (PR_SET_PDEATHSIG), so that no tool
    goes on writing where the next run starts again."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
