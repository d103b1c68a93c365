"""Backups in Dagster beyond the backup runs themselves.

- `check_new_backups`: after every successful backup run, the checks of the backups it took (in
  `verify_job`; the backup run does not plan them, so a backup that failed leaves no failed checks).
- `backups_outside_dagster`: backups taken by the CLI or on another host appear as runless
  materializations of their asset (with their check results), so the asset's freshness and history and
  the `rpo_watch` sensor read the same backups. A backup already older than the RPO when it is found is
  reported as an observation instead: it must not make a stale asset look fresh.
"""

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetCheckSeverity,
    AssetKey,
    AssetMaterialization,
    AssetObservation,
    DagsterRunStatus,
    DefaultSensorStatus,
    MetadataValue,
    RunRequest,
    RunStatusSensorContext,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    run_status_sensor,
    sensor,
)

from ...engine.checks import check_names, check_status, good_newest_first
from ...engine.manifest import Manifest
from ...engine.policy import Policy
from ..resources import RegalEngine
from .assets import backup_asset_key, backup_metadata

if TYPE_CHECKING:  # what define_asset_job returns; dagster does not export its name
    from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

SYNC_EVERY_SECONDS = 30


def build_check_sensor(policy: Policy, backup_job: "UnresolvedAssetJobDefinition",
                       verify_job: "UnresolvedAssetJobDefinition") -> SensorDefinition:
    targets = {backup_asset_key(config.kind, name): (name, config.kind) for name, config in policy.targets.items()}

    @run_status_sensor(name="check_new_backups", run_status=DagsterRunStatus.SUCCESS, monitored_jobs=[backup_job],
                       request_job=verify_job, default_status=DefaultSensorStatus.RUNNING,
                       description="After every successful backup run: the checks of the backups it took "
                                   "(manifest, integrity, encryption, size, key, off-site copy) in verify_job.")
    def _after_backup(context: RunStatusSensorContext) -> RunRequest:
        selected = context.dagster_run.asset_selection or set(targets)
        keys = [AssetCheckKey(key, name) for key in sorted(selected, key=str) if key in targets
                for name in check_names(targets[key][1], offsite=policy.offsite is not None)]
        return RunRequest(run_key=f"checks-{context.dagster_run.run_id}", asset_check_keys=keys,
                          tags={"regal/backup_run": context.dagster_run.run_id})

    return _after_backup


def build_outside_sensor(policy: Policy) -> SensorDefinition:
    @sensor(name="backups_outside_dagster", minimum_interval_seconds=SYNC_EVERY_SECONDS,
            default_status=DefaultSensorStatus.RUNNING,
            description="Reports good backups taken outside Dagster (the CLI, other hosts) as materializations "
                        "of their asset, with their checks, so freshness and rpo_watch agree.")
    def _sync(context: SensorEvaluationContext, regal: RegalEngine) -> SensorResult:
        seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
        events: list[AssetMaterialization | AssetObservation | AssetCheckEvaluation] = []
        repo, keyring, now = regal.repository(), regal.keyring(), datetime.now(UTC)
        for target, config in sorted(regal.policy().targets.items()):
            key = backup_asset_key(config.kind, target)
            newest = next(good_newest_first(repo, keyring, target), None)
            if newest is None or seen.get(target, "") >= newest.finished_at.isoformat():
                continue
            seen[target] = newest.finished_at.isoformat()
            if newest.trigger.get("dagster_run_id") or _materialized(context, key, newest.backup_id):
                continue  # a Dagster run took it: its run reported it
            events += _events_for(regal, key, newest, now, policy.rpo_for(target).total_seconds())
        return SensorResult(asset_events=events, cursor=json.dumps(seen, sort_keys=True))

    return _sync


def _materialized(context: SensorEvaluationContext, key: AssetKey, backup_id: str) -> bool:
    event = context.instance.get_latest_materialization_event(key)
    metadata = event.asset_materialization.metadata if event and event.asset_materialization else {}
    return bool(metadata.get("backup_id") and metadata["backup_id"].value == backup_id)


def _events_for(regal: RegalEngine, key: AssetKey, manifest: Manifest, now: datetime,
                rpo_seconds: float) -> list[AssetMaterialization | AssetObservation | AssetCheckEvaluation]:
    metadata = backup_metadata(manifest, regal.repository().location,
                               regal.retention(manifest.target, manifest.backup_id))
    taken_by = ", ".join(f"{k} {v}" for k, v in manifest.trigger.items()) or "unknown"
    metadata["taken_outside_dagster"] = taken_by
    metadata["dagster/last_updated_timestamp"] = MetadataValue.timestamp(manifest.finished_at)
    age = (now - manifest.finished_at).total_seconds()
    if age >= rpo_seconds:  # found late: history, not freshness
        metadata["reported_late"] = f"found {age:.0f}s after it finished, past the RPO: an observation"
        return [AssetObservation(asset_key=key, description=f"backup {manifest.backup_id} taken outside Dagster "
                                                            "(found late)", metadata=metadata)]
    events: list[AssetMaterialization | AssetObservation | AssetCheckEvaluation] = [
        AssetMaterialization(asset_key=key, description=f"backup {manifest.backup_id} taken outside "
                                                        f"Dagster ({taken_by})", metadata=metadata)]
    status = check_status(regal.repository(), regal.keyring(), manifest)
    if status.record is not None:
        for outcome in status.record.outcomes:
            events.append(AssetCheckEvaluation(
                asset_key=key, check_name=outcome.name, passed=outcome.passed,
                severity=AssetCheckSeverity(outcome.severity), description=outcome.description,
                metadata={"backup_id": manifest.backup_id, "finding": outcome.description}))
    return events
