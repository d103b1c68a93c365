"""`regal-backup check`: before the first backup (and whenever something changed), whether everything the
policy relies on is in place — in the manner of `pgbackrest check` and `barman check`. Each finding says
what was checked, what was found, and the fix. Nothing is backed up; the only write is a probe object in the
repository's lock area, deleted at once.

The repository, the keys, the audit trail and the off-site copy are checked here; each target by its kind
(`Source.preflight`: connectivity, privileges, WAL settings and slot, the server's clock, ...).
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .errors import RegalError
from .findings import Finding, finding, first_line

if TYPE_CHECKING:
    from .policy import Policy

def run_preflight(policy: Policy, targets: list[str]) -> list[Finding]:
    """Every finding for the repository, keys, audit trail, off-site copy and `targets` (names in the policy)."""
    from .sources.registry import source_for

    findings = _repository_and_keys(policy)
    findings += _audit(policy)
    for name in targets:
        settings = policy.target(name)
        findings += source_for(settings.kind).preflight(f"target {name}", settings)
    return findings


def _repository_and_keys(policy: Policy) -> list[Finding]:
    from .checks import check_cryptoperiod
    from .crypto import load_keyring
    from .layout import lock_key
    from .repository_format import open_repository_format
    from .storage import open_offsite, open_repository

    findings: list[Finding] = []
    state: dict[str, Any] = {}

    def keys() -> str:
        state["keyring"] = keyring = load_keyring(policy)
        return f"the keyset opens with the master key ({len(keyring.all_keys())} key(s))"

    findings.append(finding("keys", "keyset and master key", keys,
                            "set the master key where the policy says (encryption.master_key) and keep the keyset"))
    if "keyring" in state:
        outcome = check_cryptoperiod(policy, state["keyring"], datetime.now(UTC))
        findings.append(Finding("keys", "cryptoperiod", outcome.passed, outcome.description,
                                "" if outcome.passed else "run `regal-backup keys rotate`"))

    def reachable() -> str:
        state["repo"] = repo = open_repository(policy)
        repo.check_ready()
        if "keyring" in state:
            info = open_repository_format(repo, state["keyring"])
            return f"{repo.location} holds a repository of format {info.version} that authenticates with these keys"
        return f"{repo.location} is reachable"

    findings.append(finding("repository", "reachable", reachable,
                            "check repository.url and the credentials; `regal-backup init` creates a repository"))
    if "repo" in state:
        repo = state["repo"]

        def writable() -> str:
            probe = lock_key("preflight", f"-{secrets.token_hex(6)}")
            repo.put_bytes(probe, b"regal-backup check: a probe, deleted at once\n")
            try:
                if repo.get_bytes(probe) != b"regal-backup check: a probe, deleted at once\n":
                    raise RegalError(f"a probe written to {repo.location} read back differently",
                                     "check the storage: it does not return what was written")
            finally:
                repo.delete(probe)
            return f"a probe object was written, read back and deleted in {repo.location}"

        findings.append(finding("repository", "writable", writable,
                                "give this user (or the bucket policy) write and delete access to the repository"))
        if (space := repo.free_bytes()) is not None:
            free, total = space
            low = total and free / total < 0.1
            findings.append(Finding("repository", "space", not low, f"{free / 2**30:.1f} GiB free of "
                                    f"{total / 2**30:.1f} GiB", "free space or prune" if low else ""))
    if policy.offsite is not None:
        def offsite() -> str:
            secondary = open_offsite(policy)
            assert secondary is not None
            secondary.check_ready()
            return f"{secondary.location} is reachable"

        findings.append(finding("off-site copy", "reachable", offsite,
                                "check offsite.url and its credentials (they are separate from the primary's)"))
    return findings


def _audit(policy: Policy) -> list[Finding]:
    audit = policy.audit
    if audit is None:
        return [Finding("audit trail", "configured", False, "the policy has no audit trail: reports will have no "
                        "evidence", "add `audit: {dsn: ...}` to the policy (docs/policy.md)", required=False)]

    def reachable() -> str:
        import psycopg

        try:
            with psycopg.connect(audit.resolved_dsn(), connect_timeout=10) as conn:
                found = conn.execute("SELECT to_regclass('regal_audit.events') IS NOT NULL").fetchone()
        except psycopg.Error as exc:
            raise RegalError(f"the audit database refused: {first_line(exc)}",
                             "check audit.dsn, the role's password and pg_hba.conf") from None
        if not (found and found[0]):
            return "the audit database is reachable; its schema is created by the first event"
        return "the audit database is reachable and holds regal_audit.events"

    return [finding("audit trail", "reachable", reachable, "check audit.dsn")]
