"""`check_new_backups`: after every successful backup run, the checks of the backups it took (in `verify_job`;
the backup run does not plan them, so a backup that failed leaves no failed checks). What happens outside
Dagster is mirrored by `backups_outside_dagster` (mirror.py)."""

from typing import TYPE_CHECKING

from dagster import (
    AssetCheckKey,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRequest,
    RunStatusSensorContext,
    SensorDefinition,
    run_status_sensor,
)

from ...engine.checks import check_names
from ...engine.policy import Policy
from ..fleet import TARGET_TAG, fleet_tags
from .assets import backup_asset_key

if TYPE_CHECKING:  # what define_asset_job returns; dagster does not export its name
    from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition


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
        backed_up = context.dagster_run.tags.get(TARGET_TAG)
        queue = fleet_tags(policy, backed_up if backed_up in policy.targets else None, "verify")
        return RunRequest(run_key=f"checks-{context.dagster_run.run_id}", asset_check_keys=keys,
                          tags={"regal/backup_run": context.dagster_run.run_id, **queue})

    return _after_backup
