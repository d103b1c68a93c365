"""`offsite sync` (copy, read back, and name a damaged primary copy) and `offsite repair` (mend the primary copy
from a good off-site one, then verify it)."""

from __future__ import annotations

import argparse
from typing import Any

from ..engine import catalog
from ..engine.audit import audited
from ..engine.checks import run_checks
from ..engine.errors import UsageError
from ..engine.storage import Repository, open_offsite
from .context import open_repository_of
from .output import Output
from .verifying import verification_verdict, verify_exit


def _secondary(policy: Any) -> Repository:
    secondary = open_offsite(policy)
    if secondary is None:
        raise UsageError("the policy has no off-site repository", "add `offsite:` (like `repository:`) to the policy")
    return secondary


def cmd_offsite_sync(args: argparse.Namespace, out: Output) -> int:
    from ..engine.offsite import copy_is_good, primary_damage, sync_backup, sync_repository_documents

    policy, repo, keyring = open_repository_of(args)
    secondary = _secondary(policy)
    rows: list[dict[str, Any]] = []
    with out.activity(f"off-site sync to {secondary.location}"):
        sync_repository_documents(repo, secondary)
        for target in sorted(policy.targets):
            for manifest in catalog.list_backups(repo, keyring, target)[0]:
                damage = primary_damage(repo, manifest)  # never copy damage over a good copy
                problems = [] if damage else sync_backup(repo, secondary, manifest)
                rows.append({"backup_id": manifest.backup_id, "in_step": not problems and not damage,
                             "problems": [f"{p.key}: {p.problem}" for p in problems],
                             "primary_damaged": [f"{p.key}: {p.problem}" for p in damage],
                             "repairable": bool(damage) and copy_is_good(secondary, manifest,
                                                                         [p.key for p in damage])})
    bad = [r for r in rows if r["problems"]]
    damaged = [r for r in rows if r["primary_damaged"]]
    copied = len(rows) - len(bad) - len(damaged)
    lines = [f"{copied} of {len(rows)} backups copied and read back in {secondary.location}"]
    lines += [f"NOT IN STEP {r['backup_id']}: {'; '.join(r['problems'])}" for r in bad]
    lines += [f"PRIMARY COPY DAMAGED {r['backup_id']}: {'; '.join(r['primary_damaged'])}\n  "
              + (f"the off-site copy is good: run `regal-backup offsite repair {r['backup_id']}`" if r["repairable"]
                 else "the off-site copy is damaged or missing too: this backup cannot be repaired from it")
              for r in damaged]
    out.result({"offsite": secondary.location, "backups": rows}, "\n".join(lines))
    return 3 if damaged else 1 if bad else 0


def cmd_offsite_repair(args: argparse.Namespace, out: Output) -> int:
    from ..engine.offsite import repair_primary

    policy, repo, keyring = open_repository_of(args)
    secondary = _secondary(policy)
    manifest = catalog.load_manifest(repo, keyring, args.backup_id)
    with audited(policy, repo, "offsite_repair", manifest.backup_id, {"cli": "offsite repair"}) as details, \
            out.activity(f"repairing {manifest.backup_id} from {secondary.location}"):
        repaired = repair_primary(repo, secondary, manifest)
        details["repaired"] = repaired
    if not repaired:
        out.result({"backup_id": manifest.backup_id, "repaired": [], "verification": None},
                   f"{manifest.backup_id}: the primary copy is intact (every object matches its manifest): nothing "
                   "to repair")
        return 0
    with out.progress(f"verify {manifest.backup_id}", manifest.plaintext_bytes) as progress:
        record = run_checks(policy, repo, keyring, manifest.backup_id, trigger={"cli": "offsite repair"},
                            progress=progress)
    verdict, around = verification_verdict(record)
    out.result({"backup_id": manifest.backup_id, "repaired": repaired,
                "verification": {"passed": record.passed, "checked_at": record.checked_at.isoformat(),
                                 "failed": [f"{o.name}: {o.description}" for o in record.outcomes if not o.passed]}},
               f"{manifest.backup_id}: {len(repaired)} object(s) put back from {secondary.location} "
               f"({', '.join(repaired)}), then {verdict}")
    return verify_exit(record, around)
