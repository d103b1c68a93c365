"""Alert sensors, on by default: the RPO watch, and alerts for failed runs, failed checks and capacity.

Open-source Dagster shows freshness but sends nothing, so these evaluate what is wrong every minute and
tell people through the policy's channels (engine/alerts.py: once, a reminder, and "resolved"). Each
sensor keeps its alert book (what it has told, and messages still to deliver) in its cursor.
"""

from collections.abc import Callable
from datetime import UTC, datetime

from dagster import (
    DagsterEventType,
    DagsterRun,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRecord,
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
from ..fleet import HOST_TAG, TARGET_TAG
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


PER_TARGET_JOBS = {"backup_job", "restore_test_job"}  # one run per target: an alert per target
RECENT_RUNS = 200  # at least this many of a job's newest finished runs are read, 4 per target with more targets


def _failed_runs(policy: Policy, context: SensorEvaluationContext) -> list[Condition]:
    book = AlertBook.from_json(context.cursor)
    conditions = []
    for job_name in WATCHED_JOBS:
        if job_name in PER_TARGET_JOBS:
            conditions += _failed_target_runs(policy, context, job_name, book)
        else:
            records = context.instance.get_run_records(filters=RunsFilter(job_name=job_name, statuses=_FINISHED),
                                                       limit=1)
            if records and records[0].dagster_run.status == DagsterRunStatus.FAILURE:
                conditions.append(_run_condition(policy, context, job_name, records[0], None))
    return conditions


_FINISHED = [DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE]


def _run_targets(policy: Policy, run: DagsterRun) -> list[str]:
    """The targets a run worked on: its `regal/target`, else its selected assets' (an ad-hoc run), else all."""
    if (tagged := run.tags.get(TARGET_TAG)) in policy.targets:
        return [tagged]
    return sorted({k.path[1] for k in run.asset_selection or [] if len(k.path) == 3} & set(policy.targets)) or \
        sorted(policy.targets)


def _failed_target_runs(policy: Policy, context: SensorEvaluationContext, job_name: str,
                        book: AlertBook) -> list[Condition]:
    """Per target, its newest finished run of the job, when it failed (cleared by its next run that succeeds). One
    query for the job's recent runs; a target with an open alert whose runs are older than those: one more each."""
    recent = context.instance.get_run_records(filters=RunsFilter(job_name=job_name, statuses=_FINISHED),
                                              limit=max(RECENT_RUNS, 4 * len(policy.targets)))
    newest: dict[str, RunRecord] = {}
    for record in recent:
        for target in _run_targets(policy, record.dagster_run):
            newest.setdefault(target, record)
    prefix = f"run:{job_name}:"
    for key in book.open:
        target = key.removeprefix(prefix)
        if key.startswith(prefix) and target in policy.targets and target not in newest:
            own = context.instance.get_run_records(
                filters=RunsFilter(job_name=job_name, statuses=_FINISHED, tags={TARGET_TAG: target}), limit=1)
            if own:
                newest[target] = own[0]
    return [_run_condition(policy, context, job_name, record, target) for target, record in sorted(newest.items())
            if record.dagster_run.status == DagsterRunStatus.FAILURE]


def _run_condition(policy: Policy, context: SensorEvaluationContext, job_name: str, record: RunRecord,
                   target: str | None) -> Condition:
    run = record.dagster_run
    targets = [target] if target else _run_targets(policy, run)
    ended = datetime.fromtimestamp(record.end_time, UTC) if record.end_time else None
    event, label = WATCHED_JOBS[job_name]
    reason = _failure_message(context, run.run_id)
    return Condition(f"run:{job_name}" + (f":{target}" if target else ""), event, ", ".join(targets),
                     f"{label} run {run.run_id[:8]} of {', '.join(targets)} failed" + (f": {reason}" if reason else ""),
                     f"{policy.dagster.base_url.rstrip('/')}/runs/{run.run_id}", FIRST_STEPS[event], ended,
                     {"run_id": run.run_id, **({"host": run.tags[HOST_TAG]} if HOST_TAG in run.tags else {})})


def _failure_message(context: SensorEvaluationContext, run_id: str) -> str:
    """Why Dagster failed the run, when it says so itself (run monitoring: "Exceeded maximum runtime of 3600
    seconds."); a step's error is in the run's log."""
    failures = context.instance.all_logs(run_id, of_type=DagsterEventType.RUN_FAILURE)
    message = failures[-1].dagster_event.message if failures and failures[-1].dagster_event else None
    return (message or "").strip().splitlines()[0][:300] if message and "maximum runtime" in message else ""


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
