"""The Dagster code location, grouped by domain (backups, restore tests, alerts, compliance, maintenance):
each domain builds its own assets, checks, jobs, schedules and sensors from the policy; this module merges
them with the one resource they share. Every domain only calls the engine and renders its results."""

from __future__ import annotations

import os

from dagster import Definitions

from ..engine.policy import load_policy, policy_file
from .alerts import alert_definitions
from .backups import BACKUP_JOB, VERIFY_JOB, backup_definitions
from .compliance import REPORT_JOB, compliance_definitions
from .maintenance import PRUNE_JOB, maintenance_definitions
from .monitoring import monitoring_definitions
from .resources import engine_resource
from .restore_tests import RESTORE_TEST_JOB, restore_test_definitions

__all__ = ["BACKUP_JOB", "PRUNE_JOB", "REPORT_JOB", "RESTORE_TEST_JOB", "VERIFY_JOB", "build_definitions"]


def build_definitions(policy_path: str | None = None) -> Definitions:
    path = os.path.abspath(policy_file(policy_path))
    policy = load_policy(path)
    restore_tests, drill_job = restore_test_definitions(policy, path)
    domains = [backup_definitions(policy), restore_tests, alert_definitions(policy), maintenance_definitions(policy),
               monitoring_definitions(policy)]
    if policy.audit is not None:  # the report is built from the audit trail
        domains.append(compliance_definitions(policy, drill_job))
    return Definitions.merge(*domains, Definitions(resources={"regal": engine_resource(path, policy)}))
