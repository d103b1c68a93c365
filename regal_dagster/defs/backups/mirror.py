"""`backups_outside_dagster`: what happened to a target's backups outside Dagster, mirrored on its asset within
one sensor interval, failures as well as successes.

- A new good backup taken outside Dagster (the CLI, another host) is a runless materialization of its asset,
  with its check results, so the asset's freshness and history and the `rpo_watch` sensor read the same
  backups. A backup already older than the RPO when it is found is an observation instead: it must not make a
  stale asset look fresh.
- Every check record written outside a Dagster check run (`regal-backup verify`, `verify --unchecked`,
  `backup` running its checks, the daily verification's sweep of older unchecked backups) is an asset check
  evaluation for that backup (`backup_id` in its metadata): a failure always, so a backup the CLI just failed
  turns the check red; a pass when it is about the backup the asset shows, or clears a failure shown for that
  backup (a pass on an older backup must not hide a failure of the newest). The records are found through the
  target's sealed record state (one read a tick; engine/record_sequence.py), whose sequence only grows.
- What the target can be recovered to is the recoverability model's (engine/recoverability.py), read when a
  backup or a check record is new: the new good backup reported is the model's newest good one, and when the
  model's recovery point changes (a new backup, a failure that took it away) or what it finds unrecoverable does
  (a WAL segment a check found unreadable: "every point past <segment> is unrecoverable"), an observation carries
  it (`recoverability_metadata`): `newest_good_backup` (the backup the newest recoverable point starts from, or
  "none"), `recoverable_to`, `unrecoverable`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetCheckSeverity,
    AssetKey,
    AssetMaterialization,
    AssetObservation,
    DefaultSensorStatus,
    MetadataValue,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)
from dagster._core.instance import DagsterInstance

from ...engine.catalog import load_manifest, newest_first
from ...engine.checks import CheckRecord, check_names, check_status
from ...engine.errors import RegalError
from ...engine.manifest import Manifest
from ...engine.policy import Policy
from ...engine.record_sequence import KnownRecords, known_records
from ...engine.recoverability import Recoverability
from ..resources import RegalEngine
from .assets import NO_GOOD_BACKUP, backup_asset_key, backup_metadata, recoverability_metadata

SYNC_EVERY_SECONDS = 30
# One evaluation stops taking up targets after this long (Dagster gives a sensor 60 s): mirroring a fleet's whole
# history the first time (500 targets with months of backups) takes several evaluations, each one finished.
EVALUATION_BUDGET_SECONDS = 20

AssetEvent = AssetMaterialization | AssetObservation | AssetCheckEvaluation


@dataclass
class MirrorCursor:
    """Per target: the newest good backup reported (its end), the record sequence read up to, and the newest good
    backup's id last reported."""

    backups: dict[str, str] = field(default_factory=dict)
    records: dict[str, int] = field(default_factory=dict)
    newest_good: dict[str, str] = field(default_factory=dict)  # the model last reported (_recovery_seen)
    probes: dict[str, str] = field(default_factory=dict)  # the newest backup and record sequence the model was read at

    @classmethod
    def parse(cls, text: str | None) -> MirrorCursor:
        body = json.loads(text) if text else {}
        if body and "backups" not in body:  # the cursor before records were mirrored: {target: finished_at}
            return cls(backups=body)
        return cls(body.get("backups", {}), body.get("records", {}), body.get("newest_good", {}),
                   body.get("probes", {}))

    def dump(self) -> str:
        return json.dumps({"backups": self.backups, "records": self.records, "newest_good": self.newest_good,
                           "probes": self.probes}, sort_keys=True)


def build_outside_sensor(policy: Policy) -> SensorDefinition:
    @sensor(name="backups_outside_dagster", minimum_interval_seconds=SYNC_EVERY_SECONDS,
            default_status=DefaultSensorStatus.RUNNING,
            description="Mirrors on each backup asset what happened outside Dagster: good backups taken by the CLI or "
                        "other hosts as materializations, every check result written outside a Dagster check run "
                        "(CLI verify, backup, the daily sweep of unchecked backups) as a check evaluation for that "
                        "backup, failures included, and the newest good backup as an observation.")
    def _sync(context: SensorEvaluationContext, regal: RegalEngine) -> SensorResult:
        cursor = MirrorCursor.parse(context.cursor)
        events: list[AssetEvent] = []
        began, left, done = time.monotonic(), [], 0
        # targets never mirrored yet first (a new fleet, a new target), then the others; at least one each time
        for target in sorted(regal.policy().targets, key=lambda t: (t in cursor.records, t)):
            if done and time.monotonic() - began > EVALUATION_BUDGET_SECONDS:
                left.append(target)  # the next evaluation goes on from them: their cursor did not move
                continue
            events += _target_events(context.instance, regal, target, cursor)
            done += 1
        if left:
            named = ", ".join(left[:10]) + (" ..." if len(left) > 10 else "")
            context.log.info(f"{len(left)} targets left for the next evaluation (this one took its "
                             f"{EVALUATION_BUDGET_SECONDS} s): {named}")
        return SensorResult(asset_events=events, cursor=cursor.dump())

    return _sync


def _target_events(instance: DagsterInstance, regal: RegalEngine, target: str,
                   cursor: MirrorCursor) -> list[AssetEvent]:
    policy, repo, keyring = regal.policy(), regal.repository(), regal.keyring()
    kind = policy.target(target).kind
    key = backup_asset_key(kind, target)
    checks = set(check_names(kind, offsite=policy.offsite is not None))
    known = known_records(None, repo, keyring, target)  # the sealed record state: one read
    newest = next(newest_first(repo, keyring, target), None)  # one listing, one manifest read
    probe = f"{newest.backup_id if newest else ''}@{known.sequence}"
    # the model (every manifest and record of the target) is read only when a backup or a record is new
    model = regal.recoverability(target) if cursor.probes.get(target) != probe else None
    cursor.probes[target] = probe
    events: list[AssetEvent] = []
    reported: set[str] = set()
    good = next((m for m, s in reversed(model.statuses) if s.good), None) if model else None
    if good is not None and cursor.backups.get(target, "") < good.finished_at.isoformat():
        cursor.backups[target] = good.finished_at.isoformat()
        if not good.trigger.get("dagster_run_id") and _shown_backup(instance, key) != good.backup_id:
            events += _new_backup_events(regal, key, good, checks, policy.rpo_for(target).total_seconds())
            reported.add(good.backup_id)
    since = cursor.records.get(target, 0)
    for backup_id, entry in sorted(known.checks.items(), key=lambda item: item[1].sequence):
        if entry.sequence <= since or backup_id in reported:
            continue
        record = _record(regal, backup_id, known)
        if record is not None and _to_mirror(instance, key, record):
            events += _evaluations(key, record, checks)
    cursor.records[target] = max(since, known.sequence)
    if model is not None and cursor.newest_good.get(target) != (seen := _recovery_seen(model)):
        cursor.newest_good[target] = seen
        events.append(_recoverability_event(key, model))
    return events


def _record(regal: RegalEngine, backup_id: str, known: KnownRecords) -> CheckRecord | None:
    """The backup's check record as the repository has it now (None: the backup or its record is gone)."""
    try:
        manifest = load_manifest(regal.repository(), regal.keyring(), backup_id)
    except RegalError:  # pruned since, or damaged: `list` names it
        return None
    return check_status(regal.repository(), regal.keyring(), manifest, known).record


def _shown_backup(instance: DagsterInstance, key: AssetKey) -> str | None:
    """The backup the asset's latest materialization is about."""
    event = instance.get_latest_materialization_event(key)
    metadata = event.asset_materialization.metadata if event and event.asset_materialization else {}
    return str(metadata["backup_id"].value) if "backup_id" in metadata else None


def _to_mirror(instance: DagsterInstance, key: AssetKey, record: CheckRecord) -> bool:
    """Whether this record is news for the asset's checks (see the module's docstring)."""
    latest = instance.event_log_storage.get_latest_asset_check_execution_by_key([AssetCheckKey(key, "manifest")])
    shown = latest.get(AssetCheckKey(key, "manifest"))
    evaluation = shown.evaluation if shown is not None else None
    run_id = record.trigger.get("dagster_run_id")
    if run_id and shown is not None and shown.run_id == run_id and _about(evaluation) == record.backup_id:
        return False  # a Dagster check run evaluated this very record
    if any(not o.passed for o in record.outcomes):
        return True
    clears = evaluation is not None and not evaluation.passed and _about(evaluation) == record.backup_id
    return clears or _shown_backup(instance, key) == record.backup_id


def _about(evaluation: AssetCheckEvaluation | None) -> str | None:
    value = evaluation.metadata.get("backup_id") if evaluation is not None else None
    return str(value.value) if value is not None else None


def _evaluations(key: AssetKey, record: CheckRecord, checks: set[str]) -> list[AssetEvent]:
    """The record's outcomes as check evaluations of the asset (the checks the asset defines)."""
    taken_by = ", ".join(f"{k} {v}" for k, v in record.trigger.items()) or "unknown"
    found: list[AssetEvent] = []
    for outcome in record.outcomes:
        if outcome.name not in checks:
            continue
        metadata: dict[str, Any] = {"backup_id": record.backup_id, "finding": outcome.description,
                                    "checked_at": MetadataValue.timestamp(record.checked_at),
                                    "checked_outside_dagster": taken_by}
        if outcome.failing_object:
            metadata["failing_object"] = outcome.failing_object
        found.append(AssetCheckEvaluation(asset_key=key, check_name=outcome.name, passed=outcome.passed,
                                          severity=AssetCheckSeverity(outcome.severity),
                                          description=f"{record.backup_id}: {outcome.description}",
                                          metadata=metadata))
    return found


def _new_backup_events(regal: RegalEngine, key: AssetKey, manifest: Manifest, checks: set[str],
                       rpo_seconds: float) -> list[AssetEvent]:
    metadata = backup_metadata(manifest, regal.repository().location,
                               regal.retention(manifest.target, manifest.backup_id))
    taken_by = ", ".join(f"{k} {v}" for k, v in manifest.trigger.items()) or "unknown"
    metadata["taken_outside_dagster"] = taken_by
    metadata["dagster/last_updated_timestamp"] = MetadataValue.timestamp(manifest.finished_at)
    age = (datetime.now(UTC) - manifest.finished_at).total_seconds()
    if age >= rpo_seconds:  # found late: history, not freshness
        metadata["reported_late"] = f"found {age:.0f}s after it finished, past the RPO: an observation"
        return [AssetObservation(asset_key=key, description=f"backup {manifest.backup_id} taken outside Dagster "
                                                            "(found late)", metadata=metadata)]
    events: list[AssetEvent] = [AssetMaterialization(
        asset_key=key, description=f"backup {manifest.backup_id} taken outside Dagster ({taken_by})",
        metadata=metadata)]
    record = check_status(regal.repository(), regal.keyring(), manifest).record
    return events + (_evaluations(key, record, checks) if record is not None else [])


def _recovery_seen(model: Recoverability) -> str:
    """What of the model, when it changes, is news for the asset: the point's backup and what is unrecoverable (not
    the point's time or position, which a continuous archive moves every minute)."""
    point = model.point
    return f"{point.backup_id if point else NO_GOOD_BACKUP}|{model.unrecoverable or ''}"


def _recoverability_event(key: AssetKey, model: Recoverability) -> AssetObservation:
    return AssetObservation(asset_key=key, description=model.summary + (
        f"; UNRECOVERABLE: {model.unrecoverable}" if model.unrecoverable else ""),
                            metadata=recoverability_metadata(model))
