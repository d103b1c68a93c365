"""Builds the Definitions object of the code location from a policy file."""

from __future__ import annotations

import os

from dagster import AssetSelection, Definitions, define_asset_job

from .assets import BACKUP_GROUP, build_backup_asset
from .engine.policy import DEFAULT_POLICY_FILE, POLICY_ENV, load_policy
from .resources import engine_resource
from .schedules import build_class_schedule

BACKUP_JOB = "backup_job"


def build_definitions(policy_path: str | None = None) -> Definitions:
    path = policy_path or os.environ.get(POLICY_ENV) or DEFAULT_POLICY_FILE
    policy = load_policy(path)
    assets = [build_backup_asset(policy, name) for name in sorted(policy.targets)]
    job = define_asset_job(BACKUP_JOB, selection=AssetSelection.groups(BACKUP_GROUP),
                           description="Back up every target.")
    schedules = [build_class_schedule(policy, cls, job) for cls in policy.schedules]
    return Definitions(assets=assets, jobs=[job], schedules=schedules,
                       resources={"regal": engine_resource(os.path.abspath(path), policy)})



