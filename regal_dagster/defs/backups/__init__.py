"""Backups in Dagster: one backup asset per target with the RPO as its freshness policy, its asset checks,
the backup job with a schedule per retention class, the checks after every backup run and daily, and the
backups taken outside Dagster reported on their assets."""

from __future__ import annotations

from dagster import AssetSelection, Definitions, define_asset_job, in_process_executor

from ...engine.policy import Policy
from ..fleet import backup_executor
from .archive import archived_targets, build_archive_asset, build_archive_sensors
from .assets import build_backup_asset
from .checks import build_backup_checks, build_verification_schedule
from .mirror import build_outside_sensor
from .schedules import build_class_schedules
from .sensors import build_check_sensor

BACKUP_JOB = "backup_job"
VERIFY_JOB = "verify_job"


def backup_definitions(policy: Policy) -> Definitions:
    targets = sorted(policy.targets)
    backups = [build_backup_asset(policy, name) for name in targets]
    # a scheduled run backs up one target: its one step runs in the run's process (no second process to start),
    # or with fleet.executor: celery on a worker of the target's zone (defs/fleet.py)
    backup_job = define_asset_job(BACKUP_JOB, selection=AssetSelection.assets(*backups).without_checks(),
                                  executor_def=backup_executor(policy),
                                  description="Back up the targets selected (a schedule's run: one target; the checks "
                                              "follow in verify_job, launched by the check_new_backups sensor).")
    verify_job = define_asset_job(VERIFY_JOB, selection=AssetSelection.checks_for_assets(*backups),
                                  executor_def=in_process_executor,
                                  description="Check the newest backup of every target: after each backup run, "
                                              "daily (then every unchecked backup too), and on demand.")
    schedules = build_class_schedules(policy, BACKUP_JOB)
    schedules.append(build_verification_schedule(policy, verify_job))
    sensors = [build_check_sensor(policy, backup_job, verify_job), build_outside_sensor(policy)]
    archives = [build_archive_asset(policy, name, archive) for name, archive in archived_targets(policy).items()]
    sensors += build_archive_sensors(policy)
    return Definitions(assets=[*backups, *archives],
                       asset_checks=[build_backup_checks(policy, name) for name in targets],
                       jobs=[backup_job, verify_job], schedules=schedules, sensors=sensors)
