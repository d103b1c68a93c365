"""The GDPR erasure ledger (Art. 17): erasures survive restores.

Restoring an old backup brings back data subjects who asked to be erased. The ledger records every
erasure request (the subject's identifier, salted and hashed, with the request date) outside the
database, in the repository, encrypted with the backup keys like a backup object. After every restore
and restore test the erasures are applied again to the restored database, as the policy says per target
(delete the rows, or overwrite the personal columns), and counted; a restore test fails if an erased
subject is still present afterwards.

The hash is SHA-256 of a random per-ledger salt and the trimmed, lower-cased identifier; PostgreSQL
computes the same hash with its built-in `sha256()`, so matching happens in the server and identifiers
never leave it.
"""

from __future__ import annotations

import contextlib
import itertools
from datetime import UTC, datetime
from typing import Any

from .audit import AuditTrail, record
from .catalog import newest_first
from .crypto import Keyring
from .erasure_ledger import Erasure, ErasureLedger, ErasureResult, load_ledger, save_ledger
from .errors import IntegrityError, RegalError, UsageError
from .layout import GDPR_LEDGER, LEDGER_LOCK
from .manifest import Manifest
from .offsite import sync_repository_documents
from .policy import Policy
from .sources.base import Source
from .storage import Repository, open_offsite


def record_erasure(policy: Policy, repo: Repository, keyring: Keyring, target: str, identifier: str, *,
                   requested_at: datetime, reference: str = "") -> Erasure:
    """Add an erasure request to the ledger (once per subject and target)."""
    policy.target(target)  # an unknown target is a clear error
    if not policy.gdpr.subjects.get(target):
        raise UsageError(f"the policy says nothing about data subjects in target '{target}'",
                         f"add gdpr.subjects.{target} (table, match_column, action) to the policy")
    if not identifier.strip():
        raise UsageError("the subject identifier is empty", "give the identifier the request names, e.g. the e-mail")
    with repo.lock(LEDGER_LOCK):
        ledger = load_ledger(repo, keyring)
        subject_hash = ledger.hash(identifier)
        existing = next((e for e in ledger.for_target(target) if e.subject_hash == subject_hash), None)
        if existing:
            return existing
        erasure = Erasure(subject_hash, target, requested_at.astimezone(UTC).isoformat(),
                          datetime.now(UTC).isoformat(timespec="seconds"), reference)
        ledger.erasures.append(erasure)
        ledger.revision += 1
        save_ledger(repo, keyring, ledger)
        if (secondary := open_offsite(policy)) is not None:  # a restore from the copy needs it too
            with contextlib.suppress(RegalError):  # else the next backup's off-site copy brings it
                sync_repository_documents(repo, secondary)
    record(policy, repo, "gdpr_erasure", f"{target}/{subject_hash[:16]}", "success",
           {"target": target, "subject_hash": subject_hash, "requested_at": erasure.requested_at,
            "reference": reference})
    return erasure


class LedgerRollbackError(IntegrityError):
    """The erasure ledger is older than what the repository or the audit trail knows."""


def current_ledger(policy: Policy, repo: Repository, keyring: Keyring, manifest: Manifest) -> ErasureLedger:
    """The ledger, once it is shown not to have gone back: at least the revision the newest backup of every
    target saw (and the one being restored), and every erasure the audit trail recorded. Otherwise
    LedgerRollbackError names what could be missing, before anything is restored."""
    ledger = load_ledger(repo, keyring)
    seen = [manifest, *(m for target in sorted(policy.targets) for m in itertools.islice(
        newest_first(repo, keyring, target), 1))]
    newest = max(seen, key=lambda m: m.ledger_revision)
    problems = []
    if ledger.revision < newest.ledger_revision:
        problems.append(f"it is at revision {ledger.revision}, but backup {newest.backup_id} saw revision "
                        f"{newest.ledger_revision}: {newest.ledger_revision - ledger.revision} change(s) may be "
                        "missing")
    recorded = {(e.target, e.subject_hash) for e in ledger.erasures}
    missing = [e for e in audited_erasures(policy, repo) if (e["target"], e["subject_hash"]) not in recorded]
    problems += [f"the audit trail records the erasure of subject {e['subject_hash'][:12]}… of {e['target']} "
                 f"(reference {e.get('reference') or 'none'}, requested {e.get('requested_at')}), the ledger does not"
                 for e in missing]
    if problems:
        raise LedgerRollbackError(f"the GDPR erasure ledger {GDPR_LEDGER} was rolled back or replaced: "
                                  + "; ".join(problems[:5]),
                                  "restore the ledger from the off-site copy and restore again; nothing was "
                                  "restored (--accept-ledger-rollback goes on anyway, recorded in the audit trail)")
    return ledger


def audited_erasures(policy: Policy, repo: Repository) -> list[dict[str, Any]]:
    """Every erasure the audit trail recorded (none when there is no trail or it cannot be reached: the
    manifests' ledger revisions still guard against a rollback)."""
    if policy.audit is None:
        return []
    try:
        return AuditTrail(policy, repo).details_of("gdpr_erasure")
    except RegalError:
        return []


def reapply_erasures(policy: Policy, ledger: ErasureLedger, target: str, source: Source,
                      destination: str) -> ErasureResult:
    """The target's recorded erasures applied again at a restore's destination, as the policy says."""
    erasures, subjects = ledger.for_target(target), policy.gdpr.subjects.get(target, [])
    if not erasures or not subjects:
        return ErasureResult(len(erasures), {}, {})
    return source.apply_erasures(destination, ledger, target, subjects)
