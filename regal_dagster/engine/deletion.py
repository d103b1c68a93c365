"""Deleting one backup by hand (`regal-backup delete BACKUP_ID`), with retention's own crash-safe deletion.

Refused, each saying why and what to do: the newest good backup of its target (the one a restore --latest takes),
a backup under S3 Object Lock (nothing can delete it before its date), a backup an incremental is built on (the
incremental would be unrestorable), a backup under a legal hold (`unpin` it first). Audited as `backup_deleted`
with the operator's reason; the off-site copy goes too (one under Object Lock there stays until its date).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from .audit import audited
from .catalog import list_backups, load_manifest
from .checks import good_newest_first
from .crypto import Keyring
from .errors import ObjectLockedError, RegalError, UsageError
from .holds import load_holds
from .layout import backup_prefix
from .policy import Policy
from .record_sequence import forget_backups
from .retention import delete_backup
from .storage import Repository, open_offsite


@dataclass
class Deleted:
    backup_id: str
    target: str
    reason: str
    offsite: str | None  # "deleted", "locked until its date", "absent", an error; None without an off-site copy


def deletion_refusal(policy: Policy, repo: Repository, keyring: Keyring, backup_id: str,
                     now: datetime) -> str | None:
    """Why this backup may not be deleted by hand (None: it may)."""
    manifest = load_manifest(repo, keyring, backup_id)
    target = manifest.target
    if (pin := load_holds(policy, repo, keyring, target).pin_of(backup_id, now)) is not None:
        return f"{backup_id} is under a legal hold ({pin.reason}): run `regal-backup unpin {backup_id}` first"
    if manifest.locked_until is not None and now < manifest.locked_until:
        return (f"{backup_id} is under S3 Object Lock until {manifest.locked_until:%Y-%m-%d %H:%M} UTC: nothing can "
                "delete it before then (prune removes it after that date)")
    children = sorted(m.backup_id for m in list_backups(repo, keyring, target)[0]
                      if backup_id in m.source.get("chain", ()))
    if children:
        return (f"{backup_id} is the base of the incremental backup(s) {', '.join(children)}: they cannot be "
                "restored without it; delete them first")
    newest = next(good_newest_first(repo, keyring, target), None)
    if newest is not None and newest.backup_id == backup_id:
        return (f"{backup_id} is the newest good backup of '{target}' (the one `restore --latest` takes): take a "
                "newer backup first")
    return None


def delete_by_hand(policy: Policy, repo: Repository, keyring: Keyring, backup_id: str, reason: str,
                   trigger: dict[str, str]) -> Deleted:
    now = datetime.now(UTC)
    if refusal := deletion_refusal(policy, repo, keyring, backup_id, now):
        raise UsageError(f"not deleted: {refusal}", "nothing was changed")
    target = load_manifest(repo, keyring, backup_id).target
    with audited(policy, repo, "backup_deleted", backup_id, trigger) as details:
        details["reason"] = f"deleted by hand: {reason}"
        delete_backup(repo, keyring, target, backup_id, now, details["reason"])
    forget_backups(repo, keyring, target, [backup_id])
    secondary = open_offsite(policy)
    offsite = None
    if secondary is not None:
        try:
            present = any(True for _ in secondary.list(backup_prefix(target, backup_id)))
            if present:
                delete_backup(secondary, keyring, target, backup_id, now, details["reason"])
            offsite = "deleted" if present else "absent"
        except ObjectLockedError:
            offsite = "locked until its date there (prune removes it then)"
        except RegalError as exc:
            offsite = f"not deleted: {exc.message} (the next prune retries)"
    return Deleted(backup_id, target, reason, offsite)
