"""The disaster-recovery drill: everything but the repository and the keys is gone; rebuild every target.

Run in a fresh process (`regal-backup drill`) that reads nothing but the policy, the keyset and master
key, and the repository: no Dagster state, no check records trusted. For each target, the newest backup
taken before the simulated loss is restored into a scratch PostgreSQL and validated; if it does not
restore, the next older one is tried. Measured against the policy:
- RTO: the wall time from the loss to the last target restored and validated (targets in sequence, as
  one on-call engineer would do it);
- RPO per target: the age, at the moment of the loss, of the newest data that restored (a `postgres_cluster`:
  its newest commit recovered from the WAL; the drill never connects to the server, so creates no restore point).
The record goes to `drills/<drill id>.json` in the repository.
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import audit
from .catalog import list_backups
from .crypto import Keyring
from .documents import write_document
from .layout import DRILL_KIND, drill_key
from .pipeline import Progress
from .policy import Policy
from .restore_test import run_restore_test
from .storage import Repository


def run_drill(policy: Policy, repo: Repository, keyring: Keyring, *, work_dir: Path | None = None,
              jobs: int | None = None, progress: Progress | None = None) -> dict[str, Any]:
    loss_at = datetime.now(UTC)
    drill_id = f"{loss_at:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    start = time.monotonic()
    targets = []
    for target in sorted(policy.targets):
        backups, _damaged = list_backups(repo, keyring, target)
        entry: dict[str, Any] = {"target": target, "rpo_target_seconds": policy.rpo_for(target).total_seconds(),
                                 "tried": [], "restored": None}
        for manifest in reversed([m for m in backups if m.finished_at <= loss_at]):
            result = run_restore_test(policy, repo, keyring, manifest, work_dir=work_dir, jobs=jobs,
                                      trigger={"drill_id": drill_id}, progress=progress, touch_source=False)
            if result.validation_passed:
                newest_data = datetime.fromisoformat(result.details.get("newest_data_at")
                                                     or manifest.finished_at.isoformat())
                entry["restored"] = {"backup_id": manifest.backup_id, "finished_at": manifest.finished_at.isoformat(),
                                     "restore_seconds": result.rto_seconds, "newest_data_at": newest_data.isoformat()}
                if "recoveries" in result.details:
                    entry["restored"]["recoveries"] = [{k: r.get(k) for k in ("point", "goal", "rto_seconds")}
                                                       for r in result.details["recoveries"]]
                entry["rpo_seconds"] = max(0.0, (loss_at - newest_data).total_seconds())
                break
            entry["tried"].append({"backup_id": manifest.backup_id, "problems": result.problems})
        entry["recovered"] = entry["restored"] is not None
        entry["rpo_within_target"] = entry["recovered"] and entry["rpo_seconds"] <= entry["rpo_target_seconds"]
        targets.append(entry)
    rto_seconds = time.monotonic() - start
    rto_target = min(policy.rto_for(t).total_seconds() for t in policy.targets)
    record = {
        "format": "regal-backup-drill", "version": 1, "drill_id": drill_id, "loss_at": loss_at.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(), "targets": targets, "rto_seconds": rto_seconds,
        "rto_target_seconds": rto_target,
        "rpo_seconds": None if any(not t["recovered"] for t in targets)  # worst RPO; None: a target was lost
        else max((t["rpo_seconds"] for t in targets), default=0.0),
        "rpo_target_seconds": min(t["rpo_target_seconds"] for t in targets),
        "rto_within_target": rto_seconds <= rto_target,
    }
    record["passed"] = record["rto_within_target"] and all(t["rpo_within_target"] for t in targets)
    write_document(repo, keyring, DRILL_KIND, drill_key(drill_id), record)
    audit.record(policy, repo, "dr_drill", drill_id, "success" if record["passed"] else "failure",
                 {"rto_seconds": round(rto_seconds, 3), "rto_target_seconds": rto_target,
                  "rpo_seconds": record["rpo_seconds"], "rpo_target_seconds": record["rpo_target_seconds"],
                  "targets": {t["target"]: t["recovered"] for t in targets}})
    return record
