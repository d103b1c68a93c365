"""The compliance report in Dagster: the `compliance/report` asset, monthly and after every drill.

- `monthly_compliance_report` (the 1st, 07:00 UTC) reports on the month before;
- `report_after_drill` reports on the drill's quarter as soon as `dr_drill_job` ends, passed or failed;
- on demand: materialize the asset with a `period` (or `regal-backup report --period YYYY-MM`); the current
  period gives an interim report, a future one fails the run with the reason.
Defined when the policy has an audit trail (`audit.dsn`): the report is built from it.
"""

from datetime import UTC, datetime

from dagster import (
    AssetExecutionContext,
    AssetKey,
    Config,
    DagsterRunStatus,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    Definitions,
    JobDefinition,
    MaterializeResult,
    MetadataValue,
    RunRequest,
    RunStatusSensorContext,
    ScheduleDefinition,
    TableColumn,
    TableRecord,
    TableSchema,
    asset,
    define_asset_job,
    run_status_sensor,
)

from ...engine.policy import Policy
from ...engine.report import Period, build_report
from ..resources import RegalEngine

REPORT_KEY = AssetKey(["compliance", "report"])
REPORT_JOB = "compliance_report_job"


class ReportConfig(Config):
    period: str = ""  # YYYY-MM or YYYY-Qn; empty: the month before


def _run_config(period: str) -> dict[str, object]:
    return {"ops": {"__".join(REPORT_KEY.path): {"config": {"period": period}}}}


@asset(key=REPORT_KEY, group_name="compliance", kinds={"pdf"},
       description="The PDF compliance report (PCI DSS 4.0.1, SOX ITGC, GDPR) of a period, built from the audit "
                   "trail, stored in the repository with its SHA-256.")
def compliance_report(context: AssetExecutionContext, config: ReportConfig, regal: RegalEngine) -> MaterializeResult:
    period = Period.parse(config.period) if config.period else Period.previous_month(datetime.now(UTC))
    result = build_report(regal.policy(), period, repo=regal.repository(),
                          trigger={"dagster_run_id": context.run.run_id})
    failed = [c.control_id for c in result.controls if c.result == "FAIL"]
    context.log.info(f"report {result.report_id}{' (interim)' if result.interim else ''}: {len(failed)} "
                     f"control(s) failed, {len(result.exceptions)} exception(s)"
                     + ("" if result.chain_ok else "; THE AUDIT TRAIL IS BROKEN"))
    return MaterializeResult(metadata={
        "report_id": result.report_id, "period": result.period, "interim": result.interim,
        "repository_key": result.key, "oscal_key": result.oscal_key,
        "sha256": result.sha256, "evidence_sha256": result.evidence_sha256, "audit_chain_ok": result.chain_ok,
        "exceptions": len(result.exceptions),
        "frameworks": MetadataValue.json(result.frameworks),
        "controls": MetadataValue.table(
            records=[TableRecord({"control": c.control_id, "mapping": "; ".join(c.mapping), "result": c.result})
                     for c in result.controls],
            schema=TableSchema(columns=[TableColumn("control", "string"), TableColumn("mapping", "string"),
                                        TableColumn("result", "string")])),
    })


def compliance_definitions(policy: Policy, drill_job: JobDefinition) -> Definitions:
    """The report asset, its job, the monthly schedule and the reports after each drill (passed or failed)."""
    report_job = define_asset_job(REPORT_JOB, selection=[REPORT_KEY], description="Build the compliance report.")
    monthly = ScheduleDefinition(name="monthly_compliance_report", job=report_job, cron_schedule=policy.reports.cron,
                                 execution_timezone="UTC", default_status=DefaultScheduleStatus.RUNNING,
                                 run_config=_run_config(""),
                                 description=f"The compliance report of the month before ({policy.reports.cron} UTC).")
    sensors = []
    for status in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE):
        @run_status_sensor(name=f"report_after_drill_{status.value.lower()}", run_status=status,
                           monitored_jobs=[drill_job], request_job=report_job,
                           default_status=DefaultSensorStatus.RUNNING,
                           description="The compliance report of the drill's quarter, right after the drill.")
        def _after_drill(context: RunStatusSensorContext) -> RunRequest:
            quarter = Period.quarter_of(datetime.now(UTC))  # the sensor runs right after the drill
            return RunRequest(run_key=f"after-drill-{context.dagster_run.run_id}",
                              run_config=_run_config(quarter.label))

        sensors.append(_after_drill)
    return Definitions(assets=[compliance_report], jobs=[report_job], schedules=[monthly], sensors=sensors)
