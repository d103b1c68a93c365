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
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .audit import record
from .cluster import ScratchCluster
from .crypto import Keyring
from .errors import RegalError
from .gdpr import apply_erasures, load_ledger
from .manifest import Manifest
from .pipeline import read_object, read_object_to_file
from .policy import Policy
from .repository import Repository
from .restore import restore_backup
from .sources import gitconfig, postgres, terraform
from .sources import redis as redis_source
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
    details: dict[str, Any] = field(default_factory=dict)  # kind-specific findings (Redis: the keyspace)

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
    test = {"postgres": _test_postgres, "redis": _test_redis, "terraform": _test_terraform,
            "config": _test_config}[manifest.kind]
    found = test(policy, repo, keyring, manifest, work_dir, jobs)
    found.seconds["total"] = time.monotonic() - start
    restore_failed = any(p.startswith(RESTORE_FAILED) for p in found.problems)
    tables = [{"schema": t["schema"], "name": t["name"], "rows": t["rows"],
               "matches": not restore_failed
               and not any(f"table {t['schema']}.{t['name']} " in p for p in found.problems)}
              for t in manifest.source.get("tables", [])]
    result = RestoreTestResult(
        manifest.backup_id, manifest.target, manifest.retention_class, tested_at,
        (tested_at - manifest.finished_at).total_seconds(), found.seconds,
        policy.rto_for(manifest.target).total_seconds(), tables, found.problems, trigger or {},
        found.erasures, found.load_breakdown, found.details)
    repo.put_bytes(result_key(result), json.dumps(result.to_json(), indent=2, ensure_ascii=False).encode())
    record(policy, repo, "restore_test", manifest.backup_id,
           "success" if result.validation_passed and result.rto_within_target else "failure",
           {"target": manifest.target, "rto_seconds": round(result.rto_seconds, 3),
            "rto_target_seconds": result.rto_target_seconds, "backup_age_seconds": round(result.backup_age_seconds, 3),
            "validation_passed": result.validation_passed, "problems": result.problems[:5],
            "erasures": result.erasures}, trigger)
    return result


@dataclass
class _Found:
    seconds: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    erasures: dict[str, Any] = field(default_factory=dict)
    load_breakdown: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


def _test_postgres(policy: Policy, repo: Repository, keyring: Keyring, manifest: Manifest, work_dir: Path | None,
                   jobs: int) -> _Found:
    found = _Found()
    start = time.monotonic()
    with ScratchCluster(base_dir=work_dir, tuned_for_restore=True) as cluster:
        found.seconds["cluster"] = time.monotonic() - start
        dsn = cluster.dsn(RESTORE_TEST_DATABASE)
        try:
            report = restore_backup(repo, keyring, manifest, dsn, jobs=jobs, validation="full")
        except RegalError as exc:  # the backup does not restore: that is the finding, recorded as such
            found.problems.append(f"{RESTORE_FAILED}: {exc.message}")
            return found
        found.seconds.update({k: v for k, v in report.seconds.items() if k != "total"})
        found.load_breakdown = report.load_breakdown
        found.problems += report.validation_problems
        phase = time.monotonic()
        if expected_counts := manifest.source.get("schema_objects"):
            found.problems += postgres.compare_schema_counts(expected_counts, postgres.restored_schema_counts(dsn))
        found.problems += _amcheck(dsn, jobs)
        found.seconds["amcheck"] = time.monotonic() - phase
        erasures = apply_erasures(policy, load_ledger(repo, keyring), manifest.target, dsn)
        found.erasures = erasures.to_json()
        found.problems += [f"{count} row(s) of erased subjects still in {table} after re-applying the erasures"
                           for table, count in erasures.still_present.items() if count]
    return found


def _test_terraform(policy: Policy, repo: Repository, keyring: Keyring, manifest: Manifest,
                    work_dir: Path | None, jobs: int) -> _Found:
    """The state read back and parsed: serial, lineage and resource count as recorded."""
    found = _Found()
    phase = time.monotonic()
    try:
        state = read_object(repo, keyring, manifest, terraform.STATE_OBJECT)
    except RegalError as exc:
        found.problems.append(f"{RESTORE_FAILED}: {exc.message}")
        return found
    found.seconds["fetch_decrypt"] = time.monotonic() - phase
    found.details = terraform.state_facts(state)
    expected = manifest.source["state"]
    found.problems += [f"the restored state has {key} {found.details.get(key)!r}, the backup recorded {expected.get(key)!r}"
                       for key in ("serial", "lineage", "resources", "parse_error") if found.details.get(key) != expected.get(key)]
    return found


def _test_config(policy: Policy, repo: Repository, keyring: Keyring, manifest: Manifest,
                 work_dir: Path | None, jobs: int) -> _Found:
    """A clone from the bundle: every ref and HEAD as recorded."""
    found = _Found()
    phase = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="regal-config-test-", dir=work_dir) as tmp:
        try:
            bundle = read_object_to_file(repo, keyring, manifest, gitconfig.BUNDLE_OBJECT,
                                         Path(tmp) / gitconfig.BUNDLE_OBJECT)
            found.seconds["fetch_decrypt"] = time.monotonic() - phase
            phase = time.monotonic()
            cloned = gitconfig.clone(bundle, Path(tmp) / "clone")
            found.seconds["clone"] = time.monotonic() - phase
        except RegalError as exc:
            found.problems.append(f"{RESTORE_FAILED}: {exc.message}")
            return found
    found.details = cloned
    expected_refs = manifest.source["refs"]
    found.problems += [f"ref {name} is {cloned['refs'].get(name)} in the clone, {commit} in the backup"
                       for name, commit in sorted(expected_refs.items()) if cloned["refs"].get(name) != commit]
    found.problems += [f"the clone has {name}, which the backup did not record"
                       for name in sorted(set(cloned["refs"]) - set(expected_refs))]
    if cloned["head"] != manifest.source["head"]:
        found.problems.append(f"HEAD is {cloned['head']} in the clone, {manifest.source['head']} in the backup")
    return found


def _test_redis(policy: Policy, repo: Repository, keyring: Keyring, manifest: Manifest, work_dir: Path | None,
                jobs: int) -> _Found:
    """The RDB into a scratch redis-server: key counts, TTL counts and the key sample compared."""
    found = _Found()
    phase = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="regal-redis-test-", dir=work_dir) as tmp:
        try:
            read_object_to_file(repo, keyring, manifest, redis_source.RDB_OBJECT, Path(tmp) / redis_source.RDB_OBJECT)
            found.seconds["fetch_decrypt"] = time.monotonic() - phase
            phase = time.monotonic()
            scratch = redis_source.ScratchRedis(Path(tmp))
            with scratch:
                found.seconds["load"] = time.monotonic() - phase
                phase = time.monotonic()
                found.details, problems = redis_source.compare_restored(scratch.url, manifest.source)
                found.problems += problems
                found.seconds["validate"] = time.monotonic() - phase
        except RegalError as exc:
            found.problems.append(f"{RESTORE_FAILED}: {exc.message}")
    return found


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
