"""Builds the Definitions object of the code location from a policy file."""

from __future__ import annotations

import os

from dagster import AssetSelection, DefaultScheduleStatus, Definitions, ScheduleDefinition, define_asset_job

from .assets import BACKUP_GROUP, build_backup_asset
from .checks import build_backup_checks
from .compliance import build_report_definitions
from .engine.policy import DEFAULT_POLICY_FILE, POLICY_ENV, load_policy
from .maintenance import build_prune_job
from .resources import engine_resource
from .restore_tests import (
    RESTORE_TEST_GROUP,
    build_drill_job,
    build_monthly_sample_schedule,
    build_new_backup_sensor,
    build_restore_test_asset,
)
from .schedules import build_class_schedule
from .sensors import build_alert_sensors

BACKUP_JOB = "backup_job"
RESTORE_TEST_JOB = "restore_test_job"
VERIFY_JOB = "verify_job"
VERIFY_CRON = "30 3 * * *"  # daily, after the 02:00 backup: re-reads the newest backups (storage bit rot)


def build_definitions(policy_path: str | None = None) -> Definitions:
    path = policy_path or os.environ.get(POLICY_ENV) or DEFAULT_POLICY_FILE
    policy = load_policy(path)
    backups = [build_backup_asset(policy, name) for name in sorted(policy.targets)]
    restore_tests = [build_restore_test_asset(policy, name) for name in sorted(policy.targets)]
    checks = [build_backup_checks(policy, name) for name in sorted(policy.targets)]
    job = define_asset_job(BACKUP_JOB, selection=AssetSelection.groups(BACKUP_GROUP),
                           description="Back up every target, then check each backup.")
    verify_job = define_asset_job(VERIFY_JOB, selection=AssetSelection.checks_for_assets(*backups),
                                  description="Check the newest backup of every target again.")
    schedules = [build_class_schedule(policy, cls, job) for cls in policy.schedules]
    schedules.append(ScheduleDefinition(name="daily_verification", job=verify_job, cron_schedule=VERIFY_CRON,
                                        execution_timezone="UTC", default_status=DefaultScheduleStatus.RUNNING))
    restore_job = define_asset_job(RESTORE_TEST_JOB, selection=AssetSelection.groups(RESTORE_TEST_GROUP),
                                   description="Restore-test backups in scratch PostgreSQL servers.")
    drill_job, drill_schedule = build_drill_job(policy, os.path.abspath(path))
    prune_job, prune_schedules = build_prune_job(policy)
    schedules += [build_monthly_sample_schedule(policy, restore_job), drill_schedule, *prune_schedules]
    assets, jobs = [*backups, *restore_tests], [job, verify_job, restore_job, drill_job, prune_job]
    sensors = [*build_alert_sensors(policy), build_new_backup_sensor(policy, restore_job)]
    if policy.audit is not None:  # the report is built from the audit trail
        report_assets, report_job, monthly_report, report_sensors = build_report_definitions(policy, drill_job)
        assets += report_assets
        jobs.append(report_job)
        schedules.append(monthly_report)
        sensors += report_sensors
    return Definitions(assets=assets, asset_checks=checks, jobs=jobs, schedules=schedules, sensors=sensors,
                       resources={"regal": engine_resource(os.path.abspath(path), policy)})



