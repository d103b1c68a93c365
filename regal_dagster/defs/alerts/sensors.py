"""Alert sensors, on by default: the RPO watch, and alerts for failed runs, failed checks and capacity.

Open-source Dagster shows freshness but sends nothing, so these evaluate what is wrong every minute and
tell people through the policy's channels (engine/alerts.py: once, a reminder, and "resolved"). Each
sensor keeps its alert book (what it has told, and messages still to deliver) in its cursor.
"""

from collections.abc import Callable
from datetime import UTC, datetime

from dagster import (
    DagsterRunStatus,
    DefaultSensorStatus,
    RunsFilter,
    SensorDefinition,
    SensorEvaluationContext,
    SkipReason,
    sensor,
)

from ...engine.alerts import (
    FIRST_STEPS,
    AlertBook,
    Condition,
    capacity_conditions,
    check_conditions,
    damaged_conditions,
    evaluate_and_notify,
    restore_test_conditions,
    rpo_conditions,
)
from ...engine.policy import Policy
from ..resources import RegalEngine

EVALUATE_EVERY_SECONDS = 60

Evaluation = Callable[[SensorEvaluationContext, RegalEngine, datetime], list[Condition]]


def _alert_sensor(name: str, description: str, conditions: Evaluation) -> SensorDefinition:
    @sensor(name=name, minimum_interval_seconds=EVALUATE_EVERY_SECONDS, default_status=DefaultSensorStatus.RUNNING,
            description=description)
    def _sensor(context: SensorEvaluationContext, regal: RegalEngine) -> SkipReason:
        now = datetime.now(UTC)
        book = AlertBook.from_json(context.cursor)
        found = conditions(context, regal, now)
        failures = evaluate_and_notify(regal.policy(), book, found, now)
        context.update_cursor(book.to_json())
        for failure in failures:
            context.log.warning(f"alert not delivered (retried next time): {failure}")
        open_now = ", ".join(sorted(book.open)) or "none"
        return SkipReason(f"open alerts: {open_now}; undelivered messages: {len(book.outbox)}")

    return _sensor


# job -> (event, what the run does); what to do first is FIRST_STEPS[event]
WATCHED_JOBS = {
    "backup_job": ("backup_failed", "backup"),
    "restore_test_job": ("restore_test_failed", "restore test"),
    "dr_drill_job": ("drill_failed", "disaster-recovery drill"),
    "prune_job": ("prune_failed", "prune / retention check"),
    "compliance_report_job": ("report_failed", "compliance report"),
}


def _failed_runs(policy: Policy, context: SensorEvaluationContext) -> list[Condition]:
    conditions = []
    for job_name in WATCHED_JOBS:
        conditions += _failed_run(policy, context, job_name)
    return conditions


def _failed_run(policy: Policy, context: SensorEvaluationContext, job_name: str) -> list[Condition]:
    """The job's newest finished run, when it failed (cleared by the next one that succeeds)."""
    records = context.instance.get_run_records(
        filters=RunsFilter(job_name=job_name, statuses=[DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE]),
        limit=1)
    if not records or records[0].dagster_run.status != DagsterRunStatus.FAILURE:
        return []
    record = records[0]
    run = record.dagster_run
    targets = sorted({k.path[1] for k in run.asset_selection or [] if len(k.path) == 3}) or sorted(policy.targets)
    ended = datetime.fromtimestamp(record.end_time, UTC) if record.end_time else None
    event, label = WATCHED_JOBS[job_name]
    return [Condition(f"run:{job_name}", event, ", ".join(targets),
                      f"{label} run {run.run_id[:8]} of {', '.join(targets)} failed",
                      f"{policy.dagster.base_url.rstrip('/')}/runs/{run.run_id}", FIRST_STEPS[event], ended,
                      {"run_id": run.run_id})]


def build_alert_sensors(policy: Policy) -> list[SensorDefinition]:
    rpo_watch = _alert_sensor(
        "rpo_watch",
        "Per target, the age of the newest backup that passed its checks; alerts when it passes the RPO.",
        lambda _context, regal, now: rpo_conditions(regal.policy(), regal.repository(), regal.keyring(), now))
    backup_alerts = _alert_sensor(
        "backup_alerts",
        "Alerts for failed runs (backup, restore test, drill), a failed ERROR check or verification, a failed "
        "restore test, and repository capacity.",
        lambda context, regal, _now: _repository_and_run_conditions(context, regal))
    return [rpo_watch, backup_alerts]


def _repository_and_run_conditions(context: SensorEvaluationContext, regal: RegalEngine) -> list[Condition]:
    policy, repo = regal.policy(), regal.repository()  # one repository client for the whole evaluation
    keyring = regal.keyring()
    return [*_failed_runs(policy, context), *check_conditions(policy, repo, keyring),
            *restore_test_conditions(policy, repo, keyring), *damaged_conditions(policy, repo, keyring),
            *capacity_conditions(policy, repo, keyring, datetime.now(UTC))]
