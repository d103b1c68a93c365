"""Restore tests in Dagster: one restore-test asset per target, launched three ways.

- the `restore_test_new_backups` sensor restore-tests each new good backup of the policy's classes, once;
- the `monthly_restore_sample` schedule draws backups at random across targets and ages, and records the
  seed and the candidates in the repository, so an auditor can redraw the same sample;
- `dr_drill_job` (quarterly) runs `regal-backup drill` in a fresh process.
"""

from __future__ import annotations

from dagster import AssetSelection, Definitions, JobDefinition, define_asset_job

from ...engine.policy import Policy
from .assets import build_restore_test_asset
from .drill import build_drill_job
from .schedules import build_monthly_sample_schedule
from .sensors import build_new_backup_sensor

RESTORE_TEST_JOB = "restore_test_job"


def restore_test_definitions(policy: Policy, policy_path: str) -> tuple[Definitions, JobDefinition]:
    """The domain's definitions, and the drill job (the compliance report follows each drill)."""
    tests = [build_restore_test_asset(policy, name) for name in sorted(policy.targets)]
    restore_job = define_asset_job(RESTORE_TEST_JOB, selection=AssetSelection.assets(*tests),
                                   description="Restore-test backups in scratch destinations.")
    drill_job, drill_schedule = build_drill_job(policy, policy_path)
    return Definitions(
        assets=tests,
        jobs=[restore_job, drill_job],
        schedules=[build_monthly_sample_schedule(policy, RESTORE_TEST_JOB), drill_schedule],
        sensors=[build_new_backup_sensor(policy, RESTORE_TEST_JOB)],
    ), drill_job
