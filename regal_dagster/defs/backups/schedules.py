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


def dagster_cron(cron: str, first_in_month: bool) -> str:
    """The cron Dagster ticks on. A first-in-month rule on one weekday is written `DOW#1` (croniter's n-th weekday):
    Dagster ticks only on that day, and its UI reads "on the first Sunday of the month" where `0 1 * * 0` read as
    weekly. Other forms stay as they are: the schedule skips the other ticks, and its description says so."""
    parts = cron.split()
    if first_in_month and len(parts) == 5 and parts[2] == parts[3] == "*" and parts[4].isdigit():
        return " ".join([*parts[:4], f"{parts[4]}#1"])
    return cron


def build_class_schedule(policy: Policy, retention_class: str, job_name: str) -> ScheduleDefinition:
    cron = policy.schedules[retention_class].cron  # type: ignore[index]

    @schedule(
        name=f"{retention_class}_backups",
        cron_schedule=dagster_cron(cron, policy.schedules[retention_class].first_in_month),  # type: ignore[index]
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
