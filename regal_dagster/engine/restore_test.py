"""Restore tests: a backup restored into a throwaway PostgreSQL and proven complete, with its RTO measured.

A checksum is not a restore. A restore test:
1. starts a scratch embedded PostgreSQL 18 in a temp directory, tuned for restores (no fsync, minimal WAL);
2. restores the backup into it the way `regal-backup restore` does (schema, tables loaded in parallel,
   post-data with parallel jobs);
3. validates: every table's row count and SHA-256 against the manifest, the schema's object counts
   (tables, indexes, constraints, sequences, views, functions, triggers) against the ones recorded at
   backup time, and `pg_amcheck` over every table and B-tree index;
4. re-applies the GDPR erasure ledger (engine/gdpr.py) and fails if an erased subject is still there;
5. always tears the server and its directory down, also when it fails or is interrupted.

The wall time from start to validated is the measured RTO of that backup. Results are stored in the
repository under `restore-tests/<target>/` as evidence.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .cluster import ScratchCluster
from .crypto import Keyring
from .errors import RegalError
from .gdpr import apply_erasures, load_ledger
from .manifest import Manifest
from .policy import Policy
from .repository import Repository
from .restore import restore_backup
from .sources import postgres
from .sources.pg_tools import find_pg_tool

RESTORE_TEST_DATABASE = "restore_test"
RESULTS_PREFIX = "restore-tests"
RESTORE_FAILED = "the restore failed"


@dataclass
class RestoreTestResult:
    backup_id: str
    target: str
    retention_class: str
    tested_at: datetime
    backup_age_seconds: float  # how old the backup was when tested
    seconds: dict[str, float]  # cluster, authenticate/schema/load/post_data/validate, amcheck, total
    rto_target_seconds: float
    tables: list[dict[str, Any]]  # schema, name, rows expected, rows restored, content matches
    problems: list[str] = field(default_factory=list)
    trigger: dict[str, str] = field(default_factory=dict)
    erasures: dict[str, Any] = field(default_factory=dict)  # GDPR erasures re-applied (gdpr.ErasureResult)
    load_breakdown: dict[str, float] = field(default_factory=dict)  # restore.RestoreReport.load_breakdown

    @property
    def rto_seconds(self) -> float:
        return self.seconds["total"]

    @property
    def validation_passed(self) -> bool:
        return not self.problems

    @property
    def rto_within_target(self) -> bool:
        return self.rto_seconds <= self.rto_target_seconds

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["tested_at"] = self.tested_at.isoformat()
        return {"format": "regal-backup-restore-test", "version": 1, **body, "rto_seconds": self.rto_seconds,
                "validation_passed": self.validation_passed, "rto_within_target": self.rto_within_target}


def run_restore_test(policy: Policy, repo: Repository, keyring: Keyring, manifest: Manifest, *,
                     work_dir: Path | None = None, jobs: int = 2,
                     trigger: dict[str, str] | None = None) -> RestoreTestResult:
    """Restore `manifest`'s backup into a scratch server, validate it, tear it down, store the result."""
    tested_at = datetime.now(UTC)
    start = time.monotonic()
    seconds: dict[str, float] = {}
    problems: list[str] = []
    erasures = None
    load_breakdown: dict[str, float] = {}
    with ScratchCluster(base_dir=work_dir, tuned_for_restore=True) as cluster:
        seconds["cluster"] = time.monotonic() - start
        dsn = cluster.dsn(RESTORE_TEST_DATABASE)
        try:
            report = restore_backup(repo, keyring, manifest, dsn, jobs=jobs, validation="full")
        except RegalError as exc:  # the backup does not restore: that is the finding, recorded as such
            problems.append(f"{RESTORE_FAILED}: {exc.message}")
        else:
            seconds.update({k: v for k, v in report.seconds.items() if k != "total"})
            load_breakdown = report.load_breakdown
            problems += report.validation_problems
            phase = time.monotonic()
            expected_counts = manifest.source.get("schema_objects")
            if expected_counts:
                problems += postgres.compare_schema_counts(expected_counts, postgres.restored_schema_counts(dsn))
            problems += _amcheck(dsn, jobs)
            seconds["amcheck"] = time.monotonic() - phase
            erasures = apply_erasures(policy, load_ledger(repo, keyring), manifest.target, dsn)
            problems += [f"{count} row(s) of erased subjects still in {table} after re-applying the erasures"
                         for table, count in erasures.still_present.items() if count]
    seconds["total"] = time.monotonic() - start
    restore_failed = any(p.startswith(RESTORE_FAILED) for p in problems)
    tables = [{"schema": t["schema"], "name": t["name"], "rows": t["rows"],
               "matches": not restore_failed and not any(f"table {t['schema']}.{t['name']} " in p for p in problems)}
              for t in manifest.source.get("tables", [])]
    result = RestoreTestResult(
        manifest.backup_id, manifest.target, manifest.retention_class, tested_at,
        (tested_at - manifest.finished_at).total_seconds(), seconds,
        policy.rto_for(manifest.target).total_seconds(), tables, problems, trigger or {},
        erasures.to_json() if erasures else {}, load_breakdown)
    repo.put_bytes(result_key(result), json.dumps(result.to_json(), indent=2, ensure_ascii=False).encode())
    return result


def result_key(result: RestoreTestResult) -> str:
    return f"{RESULTS_PREFIX}/{result.target}/{result.tested_at:%Y%m%dT%H%M%S.%fZ}-{result.backup_id}.json"


def _amcheck(dsn: str, jobs: int) -> list[str]:
    """pg_amcheck over every table and B-tree index of the restored database."""
    tool = find_pg_tool("pg_amcheck", 14)
    run = subprocess.run([str(tool.path), "--install-missing", f"--jobs={jobs}", "--no-password"],
                         capture_output=True, text=True, env=postgres.libpq_environment(dsn), check=False)
    if run.returncode == 0:
        return []
    detail = (run.stdout + run.stderr).strip().splitlines()
    return [f"pg_amcheck found corruption: {line}" for line in detail[:20]] or [
        f"pg_amcheck failed with exit code {run.returncode}"]
