"""One schedule per retention class and cron: each tick is one run per target (run key `class:tick:target`),
tagged for the run queue (defs/fleet.py), so a slow, hung or failed target holds no other. A target (or its
tier) may give a class its own cron: it is then ticked by a schedule of its own (`hourly_backups__tier_store`,
`daily_backups__target_pos`). When two classes fall on the same minute for a target, the higher class runs and
the lower one skips it, so one backup is taken, not two (monthly > weekly > daily > hourly)."""

from __future__ import annotations

from dagster import (
    DefaultScheduleStatus,
    RunRequest,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    SkipReason,
    schedule,
)

from ...engine.policy import Policy
from ...engine.retention_classes import RetentionClass
from ...engine.settings import ScheduleConfig, describe_cron
from ..fleet import fleet_tags
from .assets import RETENTION_CLASS_TAG, backup_asset_key


def dagster_cron(cron: str, first_in_month: bool) -> str:
    """The cron Dagster ticks on. A first-in-month rule on one weekday is written `DOW#1` (croniter's n-th weekday):
    Dagster ticks only on that day, and its UI reads "on the first Sunday of the month" where `0 1 * * 0` read as
    weekly. Other forms stay as they are: the schedule skips the other ticks, and its description says so."""
    parts = cron.split()
    if first_in_month and len(parts) == 5 and parts[2] == parts[3] == "*" and parts[4].isdigit():
        return " ".join([*parts[:4], f"{parts[4]}#1"])
    return cron


def schedule_name(retention_class: str, origin: str) -> str:
    """`hourly_backups` for the policy's cron; `hourly_backups__tier_store` / `__target_pos` for an override."""
    return f"{retention_class}_backups" + ("" if origin == "policy" else "__" + origin.replace(":", "_"))


def class_schedule_groups(policy: Policy) -> dict[tuple[RetentionClass, str], tuple[ScheduleConfig, list[str]]]:
    """(class, origin) -> the cron and the targets it ticks (origin: `policy`, `tier:<name>`, `target:<name>`)."""
    groups: dict[tuple[RetentionClass, str], tuple[ScheduleConfig, list[str]]] = {}
    for target in sorted(policy.targets):
        for cls, (origin, config) in policy.schedules_for(target).items():
            key = (cls, f"target:{target}" if origin == "target" else origin)
            groups.setdefault(key, (config, []))[1].append(target)
    return groups


def build_class_schedules(policy: Policy, job_name: str) -> list[ScheduleDefinition]:
    return [build_class_schedule(policy, cls, job_name, origin, config, targets)
            for (cls, origin), (config, targets) in sorted(class_schedule_groups(policy).items())]


def build_class_schedule(policy: Policy, retention_class: RetentionClass, job_name: str, origin: str,
                         config: ScheduleConfig, targets: list[str]) -> ScheduleDefinition:
    keys = {t: backup_asset_key(policy.target(t).kind, t) for t in targets}
    whose = "every target" if origin == "policy" and len(targets) == len(policy.targets) else \
        f"{', '.join(targets)}" + (f" (tier {origin.split(':', 1)[1]})" if origin.startswith("tier:") else "")

    @schedule(
        name=schedule_name(retention_class, origin),
        cron_schedule=dagster_cron(config.cron, config.first_in_month),
        job_name=job_name,
        execution_timezone="UTC",
        default_status=DefaultScheduleStatus.RUNNING,
        description=f"{retention_class.capitalize()} backups of {whose}: "
                    f"{describe_cron(config.cron, config.first_in_month)}; one run per target; "
                    "when a higher class is scheduled at the same minute, that one runs instead.",
    )
    def _schedule(context: ScheduleEvaluationContext) -> list[RunRequest] | SkipReason:
        tick = context.scheduled_execution_time
        requests, skipped = [], set()
        for target in targets:
            owner = policy.retention_class_for_tick(tick, target)
            if owner != retention_class:
                skipped.add(f"the {owner} backup runs at this time" if owner else "not the first such day of the month")
                continue
            requests.append(RunRequest(
                run_key=f"{retention_class}:{tick.isoformat()}:{target}", asset_selection=[keys[target]],
                asset_check_keys=[],  # the checks follow in verify_job (check_new_backups), not in the backup run
                tags={RETENTION_CLASS_TAG: retention_class, **fleet_tags(policy, target, retention_class)}))
        return requests or SkipReason(f"{tick.isoformat()}: {'; '.join(sorted(skipped))}")

    return _schedule
