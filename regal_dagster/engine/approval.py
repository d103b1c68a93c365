"""Approval of restores into production: with `restore_approval` in the policy, a restore of a backup of a
listed target into that target's own location is refused (audited as a refusal that protected data) unless
an approval was recorded first: `regal-backup approve BACKUP_ID --requester USER --by NAME`, one audited
`restore_approval` event, by someone other than the requester (the OS account that runs the restore). An
approval is used once, within `restore_approval.valid_for`. Self-approval is refused, and audited."""

from __future__ import annotations

import getpass
import json
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from .audit import AuditTrail, record
from .errors import UsageError
from .layout import target_of
from .policy import Policy
from .storage import Repository


class ApprovalRequiredError(UsageError):
    """A restore into production without an approval: nothing was touched."""

    protective = True


@dataclass(frozen=True)
class Approval:
    backup_id: str
    requester: str
    by: str
    note: str
    valid_until: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def os_account() -> str:
    return os.environ.get("SUDO_USER") or getpass.getuser()


def approve_restore(policy: Policy, repo: Repository, backup_id: str, requester: str, by: str, note: str = "",
                    trigger: dict[str, str] | None = None, now: datetime | None = None) -> Approval:
    now = now or datetime.now(UTC)
    details: dict[str, Any] = {"backup_id": backup_id, "requester": requester, "by": by, "note": note}

    def refuse(message: str, hint: str) -> UsageError:
        record(policy, repo, "restore_approval", backup_id, "failure", {**details, "refused": True, "error": message},
               trigger)
        return UsageError(message, hint)

    if policy.restore_approval is None:
        raise UsageError("the policy asks no approval for restores", "add restore_approval to the policy first")
    if not requester.strip() or not by.strip():
        raise refuse("an approval names the requester (--requester) and the approver (--by)", "give both")
    if by.strip().lower() == requester.strip().lower() or os_account() == requester.strip():
        raise refuse(f"{requester} cannot approve their own restore (self-approval)",
                     "ask someone else, from their own account, to approve it")
    if target_of(backup_id) not in policy.targets:
        raise refuse(f"'{backup_id}' is not a backup of this policy's targets",
                     "give a backup id (`regal-backup list TARGET`)")
    approval = Approval(backup_id, requester.strip(), by.strip(), note,
                        (now + policy.restore_approval.valid_for).isoformat())
    record(policy, repo, "restore_approval", backup_id, "success", approval.to_json(), trigger)
    return approval


def needs_approval(policy: Policy, target: str, destination: str, describe: Any) -> bool:
    """A restore of `target`'s backup to `destination` is one into production that the policy guards."""
    guarded = policy.restore_approval
    if guarded is None or target not in guarded.targets:
        return False
    return policy.target(target).restores_onto_itself(destination, describe)


def approval_for(policy: Policy, repo: Repository, backup_id: str, now: datetime | None = None) -> int:
    """The entry of an unused, unexpired approval of restoring `backup_id`, requested by this OS account;
    refused (ApprovalRequiredError) when there is none."""
    now = now or datetime.now(UTC)
    trail = AuditTrail(policy, repo)
    trail.ensure_schema()
    me = os_account()
    events = trail.events()
    used = {json.loads(e.details).get("approval") for e in events if e.event_type == "restore"}
    for e in reversed(events):
        if e.event_type != "restore_approval" or e.outcome != "success" or e.resource != backup_id:
            continue
        d = json.loads(e.details)
        if d.get("requester") == me and datetime.fromisoformat(d["valid_until"]) > now and e.seq not in used:
            return e.seq
    raise ApprovalRequiredError(
        f"restoring {backup_id} into production target {target_of(backup_id)} needs an approval by someone else "
        f"(restore_approval in the policy), and {me} has no unused one",
        f"ask an approver to run `regal-backup approve {backup_id} --requester {me} --by NAME`, then restore again")
