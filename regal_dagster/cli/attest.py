"""Attestations by people: management sign-off of restore tests and drills."""

from __future__ import annotations

import argparse

from .context import open_repository_of
from .output import Output


def cmd_signoff(args: argparse.Namespace, out: Output) -> int:
    from ..engine.signoff import SIGNABLE, sign_off

    policy, repo, _ = open_repository_of(args)
    signed = sign_off(policy, repo, args.result_id, args.by, args.role, args.note or "", trigger={"cli": "signoff"})
    out.result(signed.to_json(), f"{SIGNABLE[signed.result_type]} entry {signed.result_id} ({signed.result_resource}, "
                                 f"{signed.result_at[:16]}) signed off by {signed.by} ({signed.role}); recorded in "
                                 "the audit trail")
    return 0


def cmd_approve(args: argparse.Namespace, out: Output) -> int:
    from ..engine.approval import approve_restore

    policy, repo, _ = open_repository_of(args)
    approval = approve_restore(policy, repo, args.backup_id, args.requester, args.by, args.note or "",
                               trigger={"cli": "approve"})
    out.result(approval.to_json(), f"restore of {approval.backup_id} approved by {approval.by} for {approval.requester}"
                                   f" (once, until {approval.valid_until[:16]} UTC); recorded in the audit trail")
    return 0
