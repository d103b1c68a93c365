"""`regal-backup list`: every backup with its status, how far it recovers and the date retention deletes it.
A module of its own, so that `list` loads only what it reads (issue 30)."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from ..engine import catalog
from ..engine.audit import completed_backups
from ..engine.layout import target_of
from ..engine.recoverability import target_recoverability
from ..engine.retention import retention_verdicts
from .context import open_repository_of
from .output import Output, backup_line, manifest_summary, size


def cmd_list(args: argparse.Namespace, out: Output) -> int:
    policy, repo, keyring = open_repository_of(args)
    completed = completed_backups(policy, repo)
    backups, damaged = catalog.list_backups(repo, keyring, args.target, completed=completed)
    unfinished = catalog.unfinished_backups(repo, args.target, completed=completed)
    now = datetime.now(UTC)
    verdicts = retention_verdicts(policy, repo, keyring, now, args.target)
    models = {t: target_recoverability(policy, repo, keyring, t, now, completed)
              for t in sorted({m.target for m in backups})}
    rows = []
    for manifest in backups:
        recovery = models[manifest.target].backups[manifest.backup_id]
        verdict = verdicts.get(manifest.backup_id)
        holds = models[manifest.target].holds
        pin = holds.pin_of(manifest.backup_id, now) if holds else None
        rows.append({**manifest_summary(manifest), "status": recovery.status, "status_note": recovery.status_note,
                     "recovery": recovery.to_json(), "retention": verdict.to_json() if verdict else None,
                     "legal_hold": pin.to_json() if pin else None,
                     "annotation": holds.notes.get(manifest.backup_id) if holds else None})
    lines = [(f"{'TARGET':12} {'BACKUP':40} {'CLASS':8} {'STARTED (UTC)':20} {'DB SIZE':>10} {'STORED':>10}  "
              f"{'STATUS':9} RETENTION")]
    lines += [backup_line(r, verdicts[r['backup_id']].summary if r['backup_id'] in verdicts else "?",
                          r["recovery"]["note"] if _says_how_far(r) else None) for r in rows]
    lines += [f"{name}: UNRECOVERABLE: {model.unrecoverable}" for name, model in models.items() if model.unrecoverable]
    lines += [f"{target_of(d.backup_id):12} {d.backup_id:40} {'?':8} {'?':20} {'?':>10} {size(d.stored_bytes):>10}  "
              f"DAMAGED: {d.problem}" for d in damaged]
    if unfinished:
        lines.append(f"({len(unfinished)} unfinished backup(s), interrupted or running, "
                     f"{size(sum(u.stored_bytes for u in unfinished))}: not backups; prune removes them after "
                     f"{policy.prune.orphan_grace})")
    out.result({"backups": rows, "damaged": [d.__dict__ for d in damaged],
                "unfinished": [u.__dict__ for u in unfinished],
                "recoverability": {name: model.to_json() for name, model in models.items()}},
               "\n".join(lines) if rows or damaged or unfinished else "no backups yet")
    unrecoverable = any(m.unrecoverable for m in models.values())
    return 3 if any(r["status"] == "rolled_back" for r in rows) or unrecoverable else 1 if damaged else 0


def _says_how_far(row: dict[str, Any]) -> bool:
    """A good backup's line says how far it recovers when an archive decides it (a base backup's WAL)."""
    recovery = row["recovery"]
    return bool(row["status"] == "good" and (recovery["position"] is not None or not recovery["recoverable"]))
