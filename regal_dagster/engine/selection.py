"""Choosing the backup a restore, a restore test or a drill starts from: only backups whose checks passed.

By id, the operator's choice stands (with a note when its checks failed or never ran). Otherwise the newest
backup (started before a time, if given) whose checks passed: a failed one is passed over, and one never
checked (or whose check record is refused) is checked first, now, so a backup nobody verified is never
restored blind; nor is one whose check record was rolled back (engine/record_sequence.py): checked again now,
which resolves the rollback. The notes say what was passed over and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from .audit import completed_backups
from .catalog import list_backups, load_manifest, newest_first
from .checks import check_status, run_checks
from .crypto import Keyring
from .errors import RegalError
from .layout import started_of
from .manifest import Manifest
from .outcomes import check_spec
from .policy import Policy
from .record_sequence import known_records
from .storage import Repository


@dataclass
class Selected:
    manifest: Manifest
    notes: list[str] = field(default_factory=list)  # backups passed over, and why


def choose_backup(policy: Policy, repo: Repository, keyring: Keyring, target: str, *, backup_id: str | None = None,
                  before: datetime | None = None, trigger: dict[str, str] | None = None) -> Selected:
    if backup_id:
        manifest = load_manifest(repo, keyring, backup_id)
        status = check_status(repo, keyring, manifest, known_records(policy, repo, keyring, manifest.target))
        notes = [] if status.good else [f"{backup_id} is {status.status}" + (f" ({status.problem})"
                                                                              if status.problem else "")]
        return Selected(manifest, notes)
    policy.target(target)  # a clear error for an unknown target
    completed = completed_backups(policy, repo)
    notes = [f"{d.backup_id} cannot be trusted ({d.problem}): passed over"
             for d in reversed(list_backups(repo, keyring, target, completed=completed)[1])
             if before is None or (started_of(d.backup_id) or before) < before]
    known = known_records(policy, repo, keyring, target)
    for manifest in newest_first(repo, keyring, target):
        if before is not None and manifest.started_at >= before:
            continue
        status = check_status(repo, keyring, manifest, known)
        if status.status in ("unchecked", "rolled_back"):  # checked now: a fresh record resolves a rollback
            checked = run_checks(policy, repo, keyring, manifest.backup_id, trigger=trigger)
            passed = checked.passed
            failed = next((o for o in checked.outcomes if not o.passed and check_spec(o.name).decides_good), None)
            state = "is rolled back" if status.status == "rolled_back" else "was not checked"
            notes.append(f"{manifest.backup_id} {state}" + (f" ({status.problem})" if status.problem else "")
                         + (": checked it now, it passed" if passed else ": checked it now, it FAILED"
                            + (f" ({failed.name}: {failed.description})" if failed else "")))
            if passed:
                return Selected(manifest, notes)
        elif status.good:
            return Selected(manifest, notes)
        else:
            notes.append(f"{manifest.backup_id} failed its checks: passed over")
    when = f" started before {before.isoformat()}" if before else ""
    raise RegalError(f"no backup of '{target}'{when} passed its checks in {repo.location}"
                     + (f" ({'; '.join(notes)})" if notes else ""),
                     "run `regal-backup list` to see the backups and their status; name one by id to restore it anyway")

