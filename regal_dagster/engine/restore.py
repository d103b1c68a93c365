"""Restoring a backup, whatever its kind: the one path every restore takes (the CLI, restore tests, drills).

The kind puts the backup back at the destination and validates it against the manifest (its Source's
`restore`). Around it, the same for every kind: the operator's hooks (`pre_hook` just before the
destination is first changed, `post_hook` after a validated restore), the GDPR erasures re-applied at
the destination before anyone can use it, and one audit event. The result is a dataclass the CLI and
Dagster only render.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .approval import approval_for, needs_approval
from .audit import audited, record
from .crypto import Keyring
from .errors import RegalError, UsageError
from .gdpr import (
    ErasureLedger,
    ErasureResult,
    LedgerRollbackError,
    current_ledger,
    load_ledger,
    reapply_erasures,
)
from .layout import valid_backup_id
from .manifest import Manifest
from .pipeline import StoredBackup
from .policy import Policy, hook_environment
from .selection import Selected, choose_backup
from .sources.base import RestoreRequest
from .sources.registry import source_for
from .storage import Repository


@dataclass
class RestoreResult:
    backup_id: str
    target: str  # the backed-up target
    kind: str
    destination: str  # where it went, for people: no credentials
    summary: str
    problems: list[str] = field(default_factory=list)  # empty: validated against the manifest
    seconds: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # kind-specific facts
    next_steps: str = ""
    erasures: ErasureResult | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """What `restore --json` prints (docs/cli-json.md); a point-in-time restore adds `preview` (pitr.PitrResult)."""
        return {"backup_id": self.backup_id, "target": self.target, "kind": self.kind,
                "destination": self.destination, "passed": self.ok, "problems": self.problems,
                "seconds": self.seconds, "details": self.details,
                "erasures": self.erasures.to_json() if self.erasures else None}


def choose_restore(policy: Policy, repo: Repository, keyring: Keyring, named: str | None, target: str | None, *,
                   latest: bool = False, before: datetime | None = None,
                   trigger: dict[str, str] | None = None) -> Selected:
    """The backup a restore starts from: `named` (a backup id), or the newest good backup of `target` (`latest`, or
    started `before` a time). `restore TARGET --latest` names the target in place of the backup id."""
    if named in policy.targets and not target and not valid_backup_id(named):
        target, named = named, None
    if not named and not target:
        raise UsageError("say which backup to restore", "give a BACKUP_ID, or TARGET with --latest or --before")
    if not named and not (latest or before):
        raise UsageError("say which backup of the target to restore", "add --latest, or --before TIME")
    return choose_backup(policy, repo, keyring, target or "", backup_id=named, before=before, trigger=trigger)


def restore_backup(policy: Policy, repo: Repository, keyring: Keyring, manifest: Manifest, request: RestoreRequest,
                   *, pre_hook: str | None = None, post_hook: str | None = None,
                   trigger: dict[str, str] | None = None) -> RestoreResult:
    """Restore one backup to `request.to` as an operator asked: recorded in the audit trail."""
    with audited(policy, repo, "restore", manifest.backup_id, trigger) as audit:
        describe = source_for(manifest.kind).describe_destination
        audit["to"] = describe(request.to)
        if needs_approval(policy, manifest.target, request.to, describe):
            audit["approval"] = approval_for(policy, repo, manifest.backup_id)  # refused without one
        result = restore_to(policy, repo, keyring, manifest, request, pre_hook=pre_hook, post_hook=post_hook)
        if not result.ok:
            audit.update(outcome="failure", problems=result.problems[:5])
    return result


def restore_to(policy: Policy, repo: Repository, keyring: Keyring, manifest: Manifest, request: RestoreRequest, *,
               pre_hook: str | None = None, post_hook: str | None = None) -> RestoreResult:
    """Restore one backup to `request.to`, validated, erasures re-applied (restore tests call this directly:
    they record their own event)."""
    source = source_for(manifest.kind)
    started = time.monotonic()
    ledger = _erasure_ledger(policy, repo, keyring, manifest, request.accept_ledger_rollback)
    before = request.before_writing

    def before_writing() -> None:
        run_hook("pre-hook", pre_hook, policy)
        if before:
            before()

    erased: list[ErasureResult] = []

    def before_publishing(where: str) -> None:  # the erasures, before anyone can see the restored data
        if ledger is not None:
            erased.append(reapply_erasures(policy, ledger, manifest.target, source, where))

    restored = source.restore(StoredBackup(repo, keyring, manifest),
                              dataclasses.replace(request, before_writing=before_writing,
                                                  before_publishing=before_publishing))
    result = RestoreResult(manifest.backup_id, manifest.target, manifest.kind, restored.destination, restored.summary,
                           list(restored.problems), dict(restored.seconds), restored.details, restored.next_steps)
    if result.ok and erased:
        result.erasures = erased[0]
    elif result.ok and restored.erasable is not None and ledger is not None:  # a kind that publishes at once
        result.erasures = reapply_erasures(policy, ledger, manifest.target, source, restored.erasable)
    if result.erasures is not None:
        result.problems += [f"{count} row(s) of erased subjects still in {table} after re-applying the erasures"
                            for table, count in result.erasures.still_present.items() if count]
    result.seconds["total"] = time.monotonic() - started
    if result.ok:
        run_hook("post-hook", post_hook, policy)
    return result


def _erasure_ledger(policy: Policy, repo: Repository, keyring: Keyring, manifest: Manifest,
                    accept_rollback: bool) -> ErasureLedger | None:
    """The ledger whose erasures the restore re-applies (None: the target holds no data subjects), shown
    current before anything is restored; a rollback goes on only when the operator accepts it, recorded."""
    if not policy.gdpr.subjects.get(manifest.target):
        return None
    try:
        return current_ledger(policy, repo, keyring, manifest)
    except LedgerRollbackError as exc:
        if not accept_rollback:
            raise
        record(policy, repo, "gdpr_ledger_rollback_accepted", manifest.backup_id, "failure", {"finding": exc.message})
        return load_ledger(repo, keyring)


def run_hook(name: str, command: str | None, policy: Policy) -> None:
    """An operator's command (e.g. stop or start the application), without the policy's secrets in its
    environment; a failure stops the restore."""
    if not command:
        return
    print(f"running --{name}: {command}", file=sys.stderr, flush=True)
    done = subprocess.run(command, shell=True, check=False, env=hook_environment(policy))
    if done.returncode != 0:
        raise RegalError(f"--{name} failed with exit code {done.returncode}",
                         "fix it and run the restore again" if name == "pre-hook" else
                         "the restore is done and validated; start the application by hand")
