"""One recoverability model per target: can we recover it, to which point, and how do we know.

Every face reads it, none computes its own: `status`, `list`, `show`, `wal status`, the metrics and the RPO alerts.

- **The newest recoverable point.** A target without a continuous archive (a logical dump, Redis, Terraform state):
  its newest backup whose checks passed and whose check record is not rolled back (engine/checks.py). A target
  with one (a PostgreSQL server's WAL, sources/capabilities.py `ContinuousArchive`): the newest point a good base
  backup reaches through the archive (`ContinuousArchive.reach`): its newest stored position, unless a segment is
  missing (a gap) or the newest check of the archive found one unreadable (a check whose spec `bounds_recovery`,
  WAL continuity), which stops every recovery that would pass it; a base backup the archive does not reach the end of
  is "not recoverable beyond its end".
- **The evidence.** The check record of the point's backup (when, which checks), the newest check of the archive
  (which backup's record, when, what it found) and the newest restore test.
- **The state against the RPO.** The age of the point's data (a point at the archive's newest position: 0 while the
  archive has caught up with the source, else the age of its newest stored change) and whether it breaches the RPO.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from .catalog import list_backups
from .check_record import CheckRecord, CheckStatus, check_status
from .crypto import Keyring
from .documents import read_document
from .errors import IntegrityError
from .holds import Holds, load_holds
from .layout import RESTORE_TEST_KIND, restore_test_prefix
from .manifest import Manifest
from .policy import Policy
from .record_sequence import KnownRecords, known_records
from .sources.capabilities import ArchiveState, ContinuousArchive
from .sources.registry import source_for
from .storage import Repository


@dataclass
class BackupRecovery:
    """What one backup recovers."""

    backup_id: str
    status: str  # its checks: good | failed | unchecked | rolled_back
    status_note: str | None  # why unchecked or rolled back (check_status' problem)
    recoverable: bool
    position: str | None  # the newest position a recovery from it reaches through the archive (None: none, or no
    # archive: the backup itself)
    note: str  # for people: how far it recovers, or why not (naming what stops it)
    position_number: int | None = None  # the position as a number that orders them

    def to_json(self) -> dict[str, Any]:
        return {"recoverable": self.recoverable, "position": self.position, "note": self.note}


@dataclass
class RecoveryPoint:
    """The newest point a restore of the target reaches."""

    backup_id: str  # the backup a restore starts from
    position: str | None  # the archive's position (a WAL position); None: the backup itself
    position_number: int | None  # the same as a number (a WAL position's byte offset)
    at: datetime  # when the newest data it holds was current (a point stopped by a gap: at least the backup's end)

    def to_json(self) -> dict[str, Any]:
        return {"backup_id": self.backup_id, "position": self.position, "at": self.at.isoformat()}


@dataclass
class Recoverability:
    target: str
    kind: str
    rpo_seconds: float
    point: RecoveryPoint | None
    age_seconds: float | None  # the age of the point's data; None: nothing is recoverable
    backups: dict[str, BackupRecovery]  # by backup id, oldest first
    unrecoverable: str | None  # what makes recovery points unrecoverable now, naming it (None: nothing)
    verification: dict[str, Any] | None  # the newest check record of the target
    point_checks: dict[str, Any] | None  # the check record of the point's backup
    archive_check: dict[str, Any] | None  # the newest check of the archive (a record holding a bounds_recovery check)
    restore_test: dict[str, Any] | None
    archive: ArchiveState | None = None  # None: the kind has no continuous archive
    archive_noun: str | None = None
    statuses: list[tuple[Manifest, CheckStatus]] = field(default_factory=list)  # every backup, oldest first
    known: KnownRecords | None = None
    holds: Holds | None = None  # the legal holds (pins) and annotations of its backups (engine/holds.py)

    def legal_holds(self, now: datetime) -> list[dict[str, Any]]:
        """The pins in force, oldest backup first: what list, show, status and the report show."""
        holds = self.holds
        return [] if holds is None else [{"backup_id": b, **p.to_json()} for b in self.backups
                                         if (p := holds.pin_of(b, now)) is not None]

    @property
    def rpo_breached(self) -> bool:
        return self.age_seconds is None or self.age_seconds > self.rpo_seconds

    @property
    def summary(self) -> str:
        """One line for people: the newest recoverable point, or why there is none."""
        if self.point is None:
            newest_good = next((b for b in reversed(self.backups.values()) if b.status == "good"), None)
            return ("NOTHING RECOVERABLE" + (f": {newest_good.backup_id} is {newest_good.note}" if newest_good else
                                             ": no backup has passed its checks"))
        where = f"{self.point.position} from {self.point.backup_id}" if self.point.position else self.point.backup_id
        return f"recoverable to {where}, data of {self.point.at:%Y-%m-%d %H:%M:%S} UTC"

    def to_json(self) -> dict[str, Any]:
        archive = self.archive
        return {"point": self.point.to_json() if self.point else None, "summary": self.summary,
                "age_seconds": None if self.age_seconds is None else round(self.age_seconds, 3),
                "rpo_seconds": self.rpo_seconds, "rpo_breached": self.rpo_breached,
                "unrecoverable": self.unrecoverable,
                "evidence": {"point_checks": self.point_checks, "archive_check": self.archive_check,
                             "restore_test": self.restore_test},
                "archive": None if archive is None else {
                    "newest_position": archive.newest_position,
                    "newest_stored_at": archive.newest_stored_at.isoformat() if archive.newest_stored_at else None,
                    "newest_commit_at": archive.newest_commit_at.isoformat() if archive.newest_commit_at else None,
                    "behind_bytes": archive.behind, "gaps": archive.gaps, "fed": archive.fed,
                    "lost": archive.lost}}


def _check_facts(record: CheckRecord) -> dict[str, Any]:
    """A check record as evidence: which backup, when, whether it passed (every check deciding good, and none
    naming what recovery cannot pass) and which checks failed."""
    return {"backup_id": record.backup_id, "checked_at": record.checked_at.isoformat(),
            "passed": record.passed and record.recovery_bound is None,
            "failed_checks": [o.name for o in record.outcomes if not o.passed]}


def _archive_check(record: CheckRecord) -> dict[str, Any]:
    bound = record.recovery_bound
    return {**_check_facts(record), "unreadable": bound.failing_object if bound else None,
            "finding": bound.description if bound else None}


def target_recoverability(policy: Policy, repo: Repository, keyring: Keyring, target: str, now: datetime,
                          completed: Collection[str] = ()) -> Recoverability:
    """The model of `target` now (reads its manifests, check records, restore tests and its archive's state). A
    target the policy no longer has (its backups still listed) is modelled by its backups alone, at the policy's
    default RPO."""
    manifests, _damaged = list_backups(repo, keyring, target, completed=completed)
    in_policy = target in policy.targets
    kind = policy.targets[target].kind if in_policy else (manifests[-1].kind if manifests else "unknown")
    known = known_records(policy, repo, keyring, target)
    holds = load_holds(policy, repo, keyring, target)
    statuses = [(m, check_status(repo, keyring, m, known)) for m in manifests]
    records = [s.record for _, s in statuses if s.record is not None and s.problem is None]
    newest_record = max(records, key=lambda r: r.checked_at, default=None)
    archive_record = max((r for r in records if r.checks_recovery), key=lambda r: r.checked_at, default=None)
    bound = archive_record.recovery_bound if archive_record else None
    archive = source_for(kind).continuous_archive() if in_policy else None
    state = archive.state(policy, repo, keyring, target, now) if archive is not None else None
    if state is not None and bound is not None and bound.failing_object and bound.failing_object not in state.gaps:
        state = replace(state, gaps=[*state.gaps, bound.failing_object])  # found unreadable: restores cannot pass it
    backups = {m.backup_id: _backup_recovery(m, s, archive, state, bound.failing_object if bound else None)
               for m, s in statuses}
    point: RecoveryPoint | None = None
    age: float | None = None
    for manifest, _status in reversed(statuses):
        reached = backups[manifest.backup_id]
        if not reached.recoverable:
            continue
        at = manifest.finished_at
        if state is not None and reached.position == state.newest_position and (newest := state.newest_data_at(now)):
            at = newest
        candidate = RecoveryPoint(manifest.backup_id, reached.position, reached.position_number, at)
        if point is None or (candidate.position_number or 0) > (point.position_number or 0):
            point = candidate
        if state is None or reached.position == state.newest_position:
            break  # nothing older reaches further
    if point is not None:
        age = max(0.0, (now - point.at).total_seconds())
    unrecoverable = None
    if bound is not None:
        unrecoverable = (f"every point past {bound.failing_object or 'what it names'} is unrecoverable: "
                         f"{bound.description}")
    elif state is not None and state.gaps:
        assert archive is not None
        unrecoverable = (f"the {archive.noun} archive lacks {state.gaps[0]}"
                         + (f" and {len(state.gaps) - 1} more" if len(state.gaps) > 1 else "")
                         + ": restores cannot pass it")
    point_record = next((s.record for m, s in statuses if point and m.backup_id == point.backup_id), None)
    return Recoverability(
        target, kind, (policy.rpo_for(target) if in_policy else policy.rpo).total_seconds(), point, age, backups,
        unrecoverable,
        _check_facts(newest_record) if newest_record else None,
        _check_facts(point_record) if point_record else None,
        _archive_check(archive_record) if archive_record else None,
        last_restore_test(repo, keyring, target, known), state, archive.noun if archive else None, statuses, known,
        holds)


def _backup_recovery(manifest: Manifest, status: CheckStatus, archive: ContinuousArchive | None,
                     state: ArchiveState | None, broken: str | None) -> BackupRecovery:
    def made(recoverable: bool, position: str | None, note: str, number: int | None = None) -> BackupRecovery:
        return BackupRecovery(manifest.backup_id, status.status, status.problem, recoverable, position, note, number)

    if not status.good:
        why = {"failed": "its checks failed", "unchecked": "unchecked: not known to be recoverable until verified",
               "rolled_back": "its check record is rolled back: not trusted"}.get(status.status, status.status)
        return made(False, None, f"not recoverable: {why}")
    if archive is None or state is None:
        return made(True, None, "recoverable: its checks passed")
    reach = archive.reach(manifest, state, broken)
    return made(reach.recoverable, reach.position, reach.note, reach.position_number)


def last_restore_test(repo: Repository, keyring: Keyring, target: str,
                      known: KnownRecords | None = None) -> dict[str, Any] | None:
    """The newest restore test of a target (a record that does not authenticate is reported as such, and the
    newest one the witnesses know, when it is gone, as rolled back)."""
    keys = sorted(o.key for o in repo.list(restore_test_prefix(target)) if o.key.endswith(".json"))
    known = known if known is not None else known_records(None, repo, keyring, target)
    if rolled_back := known.restore_test_rollback(keys):
        return {"key": known.restore_test.key if known.restore_test else None, "rolled_back": rolled_back,
                "passed": False}
    if not keys:
        return None
    try:
        body = read_document(repo, keyring, RESTORE_TEST_KIND, keys[-1])
    except IntegrityError as exc:
        return {"key": keys[-1], "refused": exc.message, "passed": False}
    return {"backup_id": body["backup_id"], "tested_at": body["tested_at"],
            "passed": bool(body["validation_passed"] and body["rto_within_target"]),
            "validation_passed": body["validation_passed"], "rto_seconds": round(body["rto_seconds"], 3),
            "rto_target_seconds": body["rto_target_seconds"], "rto_within_target": body["rto_within_target"],
            "problems": body["problems"][:5]}
