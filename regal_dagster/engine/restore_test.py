"""Restore tests: a backup restored into a throwaway destination and proven complete, with its RTO measured.

A checksum is not a restore. A restore test, whatever the kind:
1. sets up a scratch destination (a PostgreSQL 18 server tuned for restores, a directory, ...), private
   and removed afterwards, also when the test fails or is interrupted;
2. restores the backup there the way `regal-backup restore` does (engine/restore.py), which validates it
   against the manifest (PostgreSQL: every table's row count and SHA-256) and re-applies the GDPR erasures;
3. proves more at the destination (the kind's `verify_restored`: schema object counts and pg_amcheck, a
   scratch redis-server loading the RDB, the state parsing, every ref of a clone).

The wall time from start to validated is the measured RTO of that backup. The backup of a kind with a continuous
archive is tested by recoveries through it instead (its `ContinuousArchive.test_recoveries`: for a server's WAL,
sources/postgres_cluster/recovery_test.py: the newest point, a random earlier one, a named restore point with exact
facts), each timed; the slowest is the RTO.
Results are stored in the repository under `restore-tests/<target>/` as evidence, each with its place in the
target's record sequence (engine/record_sequence.py: deleting the newest record is seen as a rollback).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .audit import record
from .crypto import Keyring
from .documents import write_document
from .errors import MissingSoftwareError, RegalError
from .layout import RESTORE_TEST_KIND, restore_test_key
from .manifest import Manifest
from .pipeline import Progress, announce_phase
from .policy import Policy
from .record_sequence import next_record
from .restore import restore_to
from .segregation import segregation_evidence
from .sources.base import RestoreRequest
from .sources.capabilities import RESTORE_FAILED, TestFindings
from .sources.registry import source_for
from .storage import Repository


@dataclass
class RestoreTestResult:
    backup_id: str
    target: str
    retention_class: str
    tested_at: datetime
    backup_age_seconds: float  # how old the backup was when tested
    seconds: dict[str, float]  # cluster, authenticate/schema/load/post_data/validate, amcheck, total (rto: see below)
    rto_target_seconds: float
    tables: list[dict[str, Any]]  # schema, name, rows expected, rows restored, content matches
    problems: list[str] = field(default_factory=list)
    trigger: dict[str, str] = field(default_factory=dict)
    erasures: dict[str, Any] = field(default_factory=dict)  # GDPR erasures re-applied (gdpr.ErasureResult)
    load_breakdown: dict[str, float] = field(default_factory=dict)  # restore.RestoreReport.load_breakdown
    details: dict[str, Any] = field(default_factory=dict)  # kind-specific findings (Redis: the keyspace)
    sequence: int = 0  # its place in its target's records (record_sequence.py); 0: written before they had one
    previous: dict[str, Any] | None = None  # the key and sequence of the target's record before it

    @property
    def rto_seconds(self) -> float:
        """The wall time to validated; a cluster's: its slowest recovery from the start of its restore to promotion."""
        return self.seconds.get("rto", self.seconds["total"])

    @property
    def validation_passed(self) -> bool:
        return not self.problems

    @property
    def rto_within_target(self) -> bool:
        return self.rto_seconds <= self.rto_target_seconds

    @property
    def passed(self) -> bool:
        """The outcome, named as every result names it (`verify`, `restore`, `check`, `drill`): the restored data
        validated and within the RTO."""
        return self.validation_passed and self.rto_within_target

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["tested_at"] = self.tested_at.isoformat()
        return {"format": "regal-backup-restore-test", "version": 2, **body, "rto_seconds": self.rto_seconds,
                "passed": self.passed, "validation_passed": self.validation_passed,
                "rto_within_target": self.rto_within_target}


def run_restore_test(policy: Policy, repo: Repository, keyring: Keyring, manifest: Manifest, *,
                     work_dir: Path | None = None, jobs: int | None = None,
                     trigger: dict[str, str] | None = None, progress: Progress | None = None,
                     touch_source: bool = True) -> RestoreTestResult:
    """Restore `manifest`'s backup into a scratch destination, validate it, tear it down, store the result
    (`progress`: the bytes restored, for a display; `touch_source` False: never connect to the backed-up source,
    as in a drill)."""
    jobs = jobs or policy.jobs_for(manifest.target)
    tested_at = datetime.now(UTC)
    start = time.monotonic()
    archive = source_for(manifest.kind).continuous_archive()
    if archive is not None:
        found = archive.test_recoveries(policy, repo, keyring, manifest, tested_at=tested_at, work_dir=work_dir,
                                        jobs=jobs, progress=progress, touch_source=touch_source)
    else:
        found = _restore_and_verify(policy, repo, keyring, manifest, work_dir, jobs, progress)
    found.seconds["total"] = time.monotonic() - start
    restore_failed = any(p.startswith(RESTORE_FAILED) for p in found.problems)
    tables = [{"schema": t["schema"], "name": t["name"], "rows": t["rows"],
               "matches": not restore_failed
               and not any(f"table {t['schema']}.{t['name']} " in p for p in found.problems)}
              for t in manifest.source.get("tables", [])] if found.tables is None else found.tables
    result = RestoreTestResult(
        manifest.backup_id, manifest.target, manifest.retention_class, tested_at,
        (tested_at - manifest.finished_at).total_seconds(), found.seconds,
        policy.rto_for(manifest.target).total_seconds(), tables, found.problems, trigger or {},
        found.erasures, found.load_breakdown, found.details)
    key = restore_test_key(result.target, result.tested_at, result.backup_id)
    passed = result.passed
    with next_record(policy, repo, keyring, result.target, key, None) as slot:
        result.sequence, result.previous = slot.sequence, slot.previous
        write_document(repo, keyring, RESTORE_TEST_KIND, key, result.to_json())
        slot.passed = passed
        record(policy, repo, "restore_test", manifest.backup_id, "success" if passed else "failure",
               {"target": manifest.target, "rto_seconds": round(result.rto_seconds, 3),
                "rto_target_seconds": result.rto_target_seconds,
                "backup_age_seconds": round(result.backup_age_seconds, 3),
                "validation_passed": result.validation_passed, "problems": result.problems[:5],
                "erasures": result.erasures, **recovery_evidence(result.details), **slot.audit_details,
                "segregation": segregation_evidence(policy, manifest.target)}, trigger)
    return result


def recovery_evidence(details: dict[str, Any]) -> dict[str, Any]:
    """A cluster's recoveries, briefly, for the audit trail (and so the compliance report's restore-test table)."""
    if "recoveries" not in details:
        return {}
    point = details.get("restore_point") or {}
    return {"rpo_seconds": details.get("rpo_seconds"), "restore_point": point.get("name") if point.get("lsn") else None,
            "restore_point_facts": bool(point.get("facts")),
            "recoveries": [{k: r.get(k) for k in ("point", "goal", "replayed_to_lsn", "newest_commit", "rto_seconds",
                                                  "rpo_seconds", "facts_checked")} | {"passed": not r["problems"]}
                           for r in details["recoveries"]]}


def _restore_and_verify(policy: Policy, repo: Repository, keyring: Keyring, manifest: Manifest,
                        work_dir: Path | None, jobs: int, progress: Progress | None = None) -> TestFindings:
    source = source_for(manifest.kind)
    found = TestFindings()
    phase = time.monotonic()
    try:
        announce_phase(progress, "starting a scratch destination")
        with source.scratch_destination(work_dir, manifest) as destination:
            found.seconds[source.scratch_phase] = time.monotonic() - phase
            announce_phase(progress, "restoring")
            restored = restore_to(policy, repo, keyring, manifest,
                                  RestoreRequest(destination, jobs=jobs, progress=progress, scratch=True))
            found.seconds.update({k: v for k, v in restored.seconds.items() if k != "total"})
            found.problems += restored.problems
            found.erasures = restored.erasures.to_json() if restored.erasures else {}
            found.load_breakdown = restored.details.pop("load_breakdown", {})
            announce_phase(progress, "checking the restored copy")
            verified = source.verify_restored(destination, manifest, keyring, jobs)
            found.problems += verified.problems
            found.seconds.update(verified.seconds)
            found.details = {**restored.details, **verified.details}
    except MissingSoftwareError:  # this machine cannot run the test: nothing is known about the backup
        raise
    except RegalError as exc:  # the backup does not restore: that is the finding, recorded as such
        found.problems.append(f"{RESTORE_FAILED}: {exc.message}")
    return found
