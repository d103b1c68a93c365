"""One backup by hand: `delete`, `pin` / `unpin` (a legal hold retention honours), `annotate`."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from ..engine.catalog import load_manifest
from ..engine.errors import UsageError
from ..engine.holds import change_holds, load_holds, pin_details
from .context import open_repository_of, utc_time
from .output import Output


def cmd_delete(args: argparse.Namespace, out: Output) -> int:
    from ..engine.deletion import delete_by_hand

    policy, repo, keyring = open_repository_of(args)
    deleted = delete_by_hand(policy, repo, keyring, args.backup_id, args.reason or "no reason given",
                             {"cli": "delete"})
    out.result({"backup_id": deleted.backup_id, "target": deleted.target, "reason": deleted.reason,
                "offsite": deleted.offsite},
               f"deleted {deleted.backup_id} (recorded in the audit trail: {deleted.reason})"
               + (f"; off-site copy: {deleted.offsite}" if deleted.offsite else ""))
    return 0


def cmd_pin(args: argparse.Namespace, out: Output) -> int:
    policy, repo, keyring = open_repository_of(args)
    manifest = load_manifest(repo, keyring, args.backup_id)
    until = utc_time(args.until, "--until") if args.until else None
    if until is not None and until <= datetime.now(UTC):
        raise UsageError(f"--until {args.until} is in the past", "give a later date, or drop --until to hold the "
                                                                 "backup until `unpin`")
    if not args.reason.strip():
        raise UsageError("--reason is empty", "say why the backup is held, e.g. --reason 'litigation hold LH-12'")
    holds = change_holds(policy, repo, keyring, manifest.target, manifest.backup_id, "backup_pinned",
                         pin_details(args.reason.strip(), until), {"cli": "pin"})
    pin = holds.pins[manifest.backup_id]
    out.result({"backup_id": manifest.backup_id, "target": manifest.target, "legal_hold": pin.to_json()},
               f"{manifest.backup_id}: {pin.summary}; retention keeps it "
               + (f"until {until:%Y-%m-%d %H:%M} UTC" if until else f"until `regal-backup unpin {manifest.backup_id}`"))
    return 0


def cmd_unpin(args: argparse.Namespace, out: Output) -> int:
    policy, repo, keyring = open_repository_of(args)
    manifest = load_manifest(repo, keyring, args.backup_id)
    if manifest.backup_id not in load_holds(policy, repo, keyring, manifest.target).pins:
        raise UsageError(f"{manifest.backup_id} is not pinned", "run `regal-backup show BACKUP_ID` to see its holds")
    change_holds(policy, repo, keyring, manifest.target, manifest.backup_id, "backup_unpinned",
                 {"reason": args.reason or ""}, {"cli": "unpin"})
    out.result({"backup_id": manifest.backup_id, "target": manifest.target, "legal_hold": None},
               f"{manifest.backup_id}: legal hold lifted; retention decides again (`regal-backup show` says when it "
               "goes)")
    return 0


def cmd_annotate(args: argparse.Namespace, out: Output) -> int:
    policy, repo, keyring = open_repository_of(args)
    manifest = load_manifest(repo, keyring, args.backup_id)
    text = " ".join(args.text).strip()
    if len(text) > 2000:
        raise UsageError("the annotation is longer than 2,000 characters", "shorten it; link a ticket instead")
    change_holds(policy, repo, keyring, manifest.target, manifest.backup_id, "backup_annotated", {"text": text},
                 {"cli": "annotate"})
    out.result({"backup_id": manifest.backup_id, "target": manifest.target, "annotation": text or None},
               f"{manifest.backup_id}: " + (f"annotated: {text}" if text else "annotation removed"))
    return 0
