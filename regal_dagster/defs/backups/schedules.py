"""One schedule per retention class. When two classes fall on the same minute, the higher class runs
and the lower one skips the tick, so one backup is taken, not two (monthly > weekly > daily > hourly)."""


from dagster import (
    DefaultScheduleStatus,
    RunRequest,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    SkipReason,
    schedule,
)

from ...engine.policy import Policy
from ...engine.settings import describe_cron
from .assets import RETENTION_CLASS_TAG


def build_class_schedule(policy: Policy, retention_class: str, job_name: str) -> ScheduleDefinition:
    cron = policy.schedules[retention_class].cron  # type: ignore[index]

    @schedule(
        name=f"{retention_class}_backups",
        cron_schedule=cron,
        job_name=job_name,
        execution_timezone="UTC",
        default_status=DefaultScheduleStatus.RUNNING,
        description=f"{retention_class.capitalize()} backups of every target: "
                    f"{describe_cron(cron, policy.schedules[retention_class].first_in_month)}; "  # type: ignore[index]
                    "when a higher class is scheduled at the same minute, that one runs instead.",
    )
    def _schedule(context: ScheduleEvaluationContext) -> RunRequest | SkipReason:
        tick = context.scheduled_execution_time
        owner = policy.retention_class_for_tick(tick)
        if owner != retention_class:
            reason = f"the {owner} backup runs at this time" if owner else "not the first such day of the month"
            return SkipReason(f"{tick.isoformat()}: {reason}")
        return RunRequest(run_key=f"{retention_class}-{tick.isoformat()}",
                          tags={RETENTION_CLASS_TAG: retention_class})

    return _schedule
