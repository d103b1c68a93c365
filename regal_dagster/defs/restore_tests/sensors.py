"""Every new good backup of the policy's classes restore-tested once (the run key is the backup id)."""

import itertools

from dagster import (
    DefaultSensorStatus,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SkipReason,
    sensor,
)

from ...engine.checks import good_newest_first
from ...engine.policy import Policy
from ..fleet import fleet_tags
from ..resources import RegalEngine
from .assets import restore_test_key, restore_test_run_config


def build_new_backup_sensor(policy: Policy, restore_job_name: str) -> SensorDefinition:
    classes = set(policy.restore_tests.classes)

    @sensor(name="restore_test_new_backups", job_name=restore_job_name, minimum_interval_seconds=120,
            default_status=DefaultSensorStatus.RUNNING,
            description=f"Restore-tests every new good backup of the classes {sorted(classes)}, once.")
    def _sensor(context: SensorEvaluationContext, regal: RegalEngine) -> list[RunRequest] | SkipReason:
        since = context.cursor or ""
        requests, newest = [], since
        repo, keyring = regal.repository(), regal.keyring()  # once per evaluation, not per target
        for target, config in sorted(regal.policy().targets.items()):
            # newest first, down to the cursor: a tick reads the new backups, not the whole history
            fresh = itertools.takewhile(lambda m: m.finished_at.isoformat() > since,
                                        good_newest_first(repo, keyring, target))
            for manifest in reversed([m for m in fresh if m.retention_class in classes]):
                newest = max(newest, manifest.finished_at.isoformat())
                requests.append(RunRequest(run_key=manifest.backup_id,
                                           asset_selection=[restore_test_key(config.kind, target)],
                                           run_config=restore_test_run_config(policy, target, manifest.backup_id),
                                           tags={"regal/backup_id": manifest.backup_id,
                                                 **fleet_tags(policy, target, "restore_test")}))
        context.update_cursor(newest)
        return requests or SkipReason("no new good backup to restore-test")

    return _sensor


