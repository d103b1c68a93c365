"""The state of the protection at a glance, read from the repository alone (works when Dagster is down).

Per target: its recoverability (engine/recoverability.py: the newest recoverable point, its evidence, its age
against the RPO, what is unrecoverable), the newest good backup, the newest backup of any status, the last
verification, the last restore test and its RTO, and per retention class the newest good backup (for
metrics). For the repository: the last drill, the bytes it holds, and the alerts open now: the conditions
the alert sensors evaluate (engine/alerts.py), evaluated here the same way, so `regal-backup status` and
the sensors agree (failed Dagster runs are the sensors' own: the CLI cannot see them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .alerts import (
    capacity_conditions,
    check_conditions,
    damaged_conditions,
    restore_test_conditions,
    rpo_conditions,
)
from .audit import completed_backups
from .capacity import CapacityForecast, forecast
from .catalog import list_backups
from .crypto import Keyring
from .documents import read_document
from .errors import IntegrityError
from .layout import DRILL_KIND, DRILLS
from .manifest import Manifest
from .policy import RETENTION_CLASSES, Policy
from .recoverability import Recoverability, target_recoverability
from .storage import Repository


@dataclass
class BackupFacts:
    backup_id: str
    retention_class: str
    status: str  # good | failed | unchecked | rolled_back
    started_at: datetime
    finished_at: datetime
    duration_seconds: float
    bytes_read: int
    bytes_stored: int

    @classmethod
    def of(cls, manifest: Manifest, status: str) -> BackupFacts:
        return cls(manifest.backup_id, manifest.retention_class, status, manifest.started_at, manifest.finished_at,
                   manifest.duration_seconds, manifest.plaintext_bytes, manifest.stored_bytes)

    def to_json(self) -> dict[str, Any]:
        return {"backup_id": self.backup_id, "retention_class": self.retention_class, "status": self.status,
                "started_at": self.started_at.isoformat(), "finished_at": self.finished_at.isoformat(),
                "duration_seconds": round(self.duration_seconds, 3), "bytes_read": self.bytes_read,
                "bytes_stored": self.bytes_stored}


@dataclass
class TargetStatus:
    target: str
    kind: str
    rpo_seconds: float
    rto_seconds: float
    newest_good: BackupFacts | None
    newest: BackupFacts | None  # of any status
    rpo_age_seconds: float | None  # age of the newest good backup's data (a server's: of its newest stored WAL
    # while the server writes more); None: there is none
    last_verification: dict[str, Any] | None
    last_restore_test: dict[str, Any] | None
    newest_good_by_class: dict[str, BackupFacts] = field(default_factory=dict)
    backups: int = 0
    bytes_stored: int = 0
    rolled_back: list[str] = field(default_factory=list)  # records put back or deleted, each named
    record_protection: str = ""  # what compares the records (record_sequence.KnownRecords.protection)
    recoverability: Recoverability | None = None  # the model all the above is read from
    legal_holds: list[dict[str, Any]] = field(default_factory=list)  # the pins in force (engine/holds.py)

    @property
    def rpo_breached(self) -> bool:
        return self.rpo_age_seconds is None or self.rpo_age_seconds > self.rpo_seconds

    @property
    def unrecoverable(self) -> str | None:
        return self.recoverability.unrecoverable if self.recoverability else None

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "kind": self.kind, "rpo_seconds": self.rpo_seconds,
                "rto_seconds": self.rto_seconds, "rpo_age_seconds": _round(self.rpo_age_seconds),
                "rpo_breached": self.rpo_breached,
                "newest_good_backup": self.newest_good.to_json() if self.newest_good else None,
                "newest_backup": self.newest.to_json() if self.newest else None,
                "last_verification": self.last_verification, "last_restore_test": self.last_restore_test,
                "newest_good_by_class": {c: b.to_json() for c, b in self.newest_good_by_class.items()},
                "backups": self.backups, "bytes_stored": self.bytes_stored, "rolled_back": self.rolled_back,
                "record_protection": self.record_protection, "legal_holds": self.legal_holds,
                "recoverability": self.recoverability.to_json() if self.recoverability else None}


@dataclass
class RepositoryStatus:
    at: datetime
    repository: str
    targets: list[TargetStatus]
    last_drill: dict[str, Any] | None
    open_alerts: list[dict[str, Any]]
    repository_bytes: int
    damaged: int
    capacity: CapacityForecast | None = None

    @property
    def rpo_breached(self) -> list[str]:
        return [t.target for t in self.targets if t.rpo_breached]

    @property
    def rolled_back(self) -> list[str]:
        return [problem for t in self.targets for problem in t.rolled_back]

    @property
    def unrecoverable(self) -> list[str]:
        """What makes recovery points of a target unrecoverable, one per target, named."""
        return [f"{t.target}: {t.unrecoverable}" for t in self.targets if t.unrecoverable]

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at.isoformat(), "repository": self.repository,
                "targets": [t.to_json() for t in self.targets], "last_drill": self.last_drill,
                "open_alerts": self.open_alerts, "repository_bytes": self.repository_bytes,
                "damaged_backups": self.damaged, "rpo_breached": self.rpo_breached, "rolled_back": self.rolled_back,
                "unrecoverable": self.unrecoverable,
                "capacity": self.capacity.to_json() if self.capacity else None}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def last_drill(repo: Repository, keyring: Keyring) -> dict[str, Any] | None:
    keys = sorted(o.key for o in repo.list(DRILLS) if o.key.endswith(".json"))
    if not keys:
        return None
    try:
        body = read_document(repo, keyring, DRILL_KIND, keys[-1])
    except IntegrityError as exc:
        return {"key": keys[-1], "refused": exc.message, "passed": False}
    return {"drill_id": body["drill_id"], "at": body["loss_at"], "passed": body["passed"],
            "rto_seconds": round(body["rto_seconds"], 3), "rto_target_seconds": body["rto_target_seconds"],
            "rpo_seconds": body["rpo_seconds"],
            "not_recovered": [t["target"] for t in body["targets"] if not t["recovered"]]}


def target_status(policy: Policy, repo: Repository, keyring: Keyring, target: str, now: datetime,
                  completed: set[str]) -> TargetStatus:
    model = target_recoverability(policy, repo, keyring, target, now, completed)
    statuses = model.statuses
    good = [m for m, s in statuses if s.good]
    newest_good = BackupFacts.of(good[-1], "good") if good else None
    newest = BackupFacts.of(statuses[-1][0], statuses[-1][1].status) if statuses else None
    by_class: dict[str, BackupFacts] = {}
    for retention_class in RETENTION_CLASSES:
        of_class = [m for m in good if m.retention_class == retention_class]
        if of_class:
            by_class[retention_class] = BackupFacts.of(of_class[-1], "good")
    restore_test = model.restore_test
    rolled_back = [str(s.problem) for _, s in statuses if s.status == "rolled_back"]
    rolled_back += [restore_test["rolled_back"]] if restore_test and "rolled_back" in restore_test else []
    return TargetStatus(
        target, model.kind, model.rpo_seconds, policy.rto_for(target).total_seconds(), newest_good, newest,
        model.age_seconds, model.verification, restore_test, by_class, len(statuses),
        sum(m.stored_bytes for m, _ in statuses), rolled_back, model.known.protection if model.known else "", model,
        model.legal_holds(now))


def open_alerts(policy: Policy, repo: Repository, keyring: Keyring, now: datetime,
                models: dict[str, Recoverability] | None = None,
                capacity: CapacityForecast | None = None) -> list[dict[str, Any]]:
    """What the alert sensors would hold open now (besides failed Dagster runs); `models`: the targets' models when
    the caller has them."""
    conditions = [*rpo_conditions(policy, repo, keyring, now, models), *check_conditions(policy, repo, keyring),
                  *restore_test_conditions(policy, repo, keyring), *damaged_conditions(policy, repo, keyring),
                  *capacity_conditions(policy, repo, keyring, now, capacity)]
    return [{"key": c.key, "event": c.event, "target": c.target, "what": c.what,
             "since": c.since.isoformat() if c.since else None, "first_step": c.first_step} for c in conditions]


def repository_status(policy: Policy, repo: Repository, keyring: Keyring, now: datetime,
                      target: str | None = None) -> RepositoryStatus:
    names = [target] if target else sorted(policy.targets)
    for name in names:
        policy.target(name)  # a clear error for an unknown target
    completed = completed_backups(policy, repo)
    targets = [target_status(policy, repo, keyring, name, now, completed) for name in names]
    models = {t.target: t.recoverability for t in targets if t.recoverability is not None}
    room = forecast(policy, repo, keyring, now)
    alerts = [a for a in open_alerts(policy, repo, keyring, now, models, room)
              if target is None or a["target"] in (target, "repository")]
    damaged = len(list_backups(repo, keyring, target, completed=completed)[1])
    return RepositoryStatus(now, repo.location, targets, last_drill(repo, keyring), alerts, room.used_bytes,
                            damaged, room)
