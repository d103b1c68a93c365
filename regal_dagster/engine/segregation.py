"""Where a restore test ran, against where its source lives: so that "restored on systems segregated from the
source" (DORA Art. 12(3)) is shown, not claimed.

Recorded with every restore test: this host's id (a digest of /etc/machine-id, else of its name), the OS
account, the network namespace, the identity the repository was read with (the OS account for a file
system, the access key's digest or profile for S3; never a secret), and the source's connections as the
policy gives them. A restore test on the source's own host (every connection of the source local) is not
segregated."""

from __future__ import annotations

import getpass
import hashlib
import os
import platform
from pathlib import Path
from typing import Any

from .policy import Policy


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def host_id() -> str:
    try:
        return "machine-id " + _digest(Path("/etc/machine-id").read_text().strip())
    except OSError:
        return "host name " + _digest(platform.node())


def network_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return "unknown (no /proc)"


def repository_identity(policy: Policy) -> str:
    if policy.repository.url.startswith("s3://"):
        if key := os.environ.get("AWS_ACCESS_KEY_ID"):
            return f"S3 access key {_digest(key)} (digest)"
        return f"S3 profile {os.environ.get('AWS_PROFILE', 'default')}"
    return f"OS account {getpass.getuser()} (uid {os.getuid()}) on {policy.repository.failure_domain(policy.base_dir)}"


def segregation_evidence(policy: Policy, target: str) -> dict[str, Any]:
    """Where this process restores, and whether that is the source's host."""
    sources = policy.target(target).transports(target)
    same_host = all(t.protection == "local" for t in sources)
    return {"host_id": host_id(), "host": platform.node(), "os_user": getpass.getuser(),
            "network_namespace": network_namespace(), "repository_identity": repository_identity(policy),
            "source": "; ".join(t.connection for t in sources) or "local files of this host",
            "same_host_as_source": same_host}
