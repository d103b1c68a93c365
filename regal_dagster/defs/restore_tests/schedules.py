"""The monthly restore-test sample: backups drawn at random across targets and ages, the draw recorded
in the repository so an auditor can redraw it."""

from datetime import UTC, datetime

from dagster import (
    RunRequest,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    SkipReason,
    schedule,
)

from ...engine.policy import Policy
from ...engine.sampling import draw_restore_sample
from ..fleet import fleet_tags
from ..resources import RegalEngine, drill_schedule_status
from .assets import restore_test_key, restore_test_run_config


def build_monthly_sample_schedule(policy: Policy, restore_job_name: str) -> ScheduleDefinition:
    settings = policy.restore_tests

    @schedule(name="monthly_restore_sample", cron_schedule=settings.monthly_cron, job_name=restore_job_name,
              execution_timezone="UTC", default_status=drill_schedule_status(policy),
              description=f"{settings.monthly_sample} backups drawn at random across targets and ages, "
                          "restore-tested; the draw is recorded for auditors.")
    def _schedule(context: ScheduleEvaluationContext, regal: RegalEngine) -> list[RunRequest] | SkipReason:
        tick = context.scheduled_execution_time or datetime.now(UTC)
        sample = draw_restore_sample(regal.policy(), regal.repository(), regal.keyring(), tick)
        if not sample.chosen:
            return SkipReason("no good backups to draw from")
        return [RunRequest(run_key=f"sample-{sample.seed}-{backup_id}",
                           asset_selection=[restore_test_key(policy.target(target).kind, target)],
                           run_config=restore_test_run_config(policy, target, backup_id),
                           tags={"regal/backup_id": backup_id, "regal/sample_seed": sample.seed,
                                 **fleet_tags(policy, target, "restore_test")})
                for target, backup_id in sample.chosen]

    return _schedule


