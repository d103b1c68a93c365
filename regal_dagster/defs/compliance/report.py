"""The compliance report in Dagster: the `compliance/report` asset, monthly and after every drill.

- `monthly_compliance_report` (the 1st, 07:00 UTC) reports on the month before;
- `report_after_drill` reports on the drill's quarter as soon as `dr_drill_job` ends, passed or failed;
- on demand: materialize the asset with a `period` (or `regal-backup report --period YYYY-MM`); the current
  period gives an interim report, a future one fails the run with the reason.
- `reports_outside_dagster`: reports written by `regal-backup report` (the CLI) appear on the asset as
  runless materializations, so its history lists every report the repository holds.
Defined when the policy has an audit trail (`audit.dsn`): the report is built from it.
"""

import hashlib
import json
from datetime import UTC, datetime

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    AssetsDefinition,
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
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    TableColumn,
    TableRecord,
    TableSchema,
    asset,
    define_asset_job,
    run_status_sensor,
    sensor,
)

from ...engine.compliance.report import Period, build_report
from ...engine.layout import COMPLIANCE_REPORTS
from ...engine.policy import Policy
from ..backups.archive import archived_targets
from ..backups.assets import backup_asset_key
from ..resources import RegalEngine
from ..restore_tests.assets import restore_test_key

REPORT_KEY = AssetKey(["compliance", "report"])
REPORT_JOB = "compliance_report_job"


class ReportConfig(Config):
    period: str = ""  # YYYY-MM or YYYY-Qn; empty: the month before


def _run_config(period: str) -> dict[str, object]:
    return {"ops": {"__".join(REPORT_KEY.path): {"config": {"period": period}}}}


FRAMEWORKS_CHECK = "frameworks_pass"


def build_report_asset(policy: Policy) -> AssetsDefinition:
    """The report asset, downstream of what it judges (every target's backup, restore test and continuous
    archive), owned by the policy's `reports.owners`; each framework's verdict is metadata of its own, and
    the `frameworks_pass` check fails when one fails."""
    judged = [key for name, target in sorted(policy.targets.items())
              for key in (backup_asset_key(target.kind, name), restore_test_key(target.kind, name))]
    judged += [AssetKey(list(archive.asset(name).key)) for name, archive in archived_targets(policy).items()]

    @asset(key=REPORT_KEY, group_name="compliance", kinds={"pdf"}, deps=judged, owners=list(policy.reports.owners),
           description="The PDF compliance report (PCI DSS 4.0.1, SOX ITGC, GDPR) of a period, built from the audit "
                       "trail, stored in the repository with its SHA-256. Upstream: the backups, restore tests and "
                       "archives it judges. Each framework's verdict is in the metadata (verdict/...).",
           check_specs=[AssetCheckSpec(FRAMEWORKS_CHECK, asset=REPORT_KEY,
                                       description="Every framework's verdict is PASS (fails on a FAIL; warns on "
                                                   "NOT TESTED).")])
    def compliance_report(context: AssetExecutionContext, config: ReportConfig,
                          regal: RegalEngine) -> MaterializeResult:
        period = Period.parse(config.period) if config.period else Period.previous_month(datetime.now(UTC))
        result = build_report(regal.policy(), period, repo=regal.repository(),
                              trigger={"dagster_run_id": context.run.run_id})
        failed = [c.control_id for c in result.controls if c.result == "FAIL"]
        context.log.info(f"report {result.report_id}{' (interim)' if result.interim else ''}: {len(failed)} "
                         f"control(s) failed, {len(result.exceptions)} exception(s)"
                         + ("" if result.chain_ok else "; THE AUDIT TRAIL IS BROKEN"))
        verdicts = {f"verdict/{name}": verdict for name, verdict in result.frameworks.items()}
        not_passed = {name: verdict for name, verdict in result.frameworks.items() if verdict != "PASS"}
        check = AssetCheckResult(
            check_name=FRAMEWORKS_CHECK, passed=not not_passed,
            severity=AssetCheckSeverity.ERROR if "FAIL" in not_passed.values() else AssetCheckSeverity.WARN,
            description=("every framework passes" if not not_passed else
                         "; ".join(f"{name}: {verdict}" for name, verdict in not_passed.items())
                         + (f" (controls failed: {', '.join(failed)})" if failed else "")),
            metadata={**verdicts, "period": result.period, "report_id": result.report_id})
        return MaterializeResult(metadata={
            "report_id": result.report_id, "period": result.period, "interim": result.interim,
            "repository_key": result.key, "oscal_key": result.oscal_key,
            "sha256": result.sha256, "evidence_sha256": result.evidence_sha256, "audit_chain_ok": result.chain_ok,
            "exceptions": len(result.exceptions), **verdicts,
            "frameworks": MetadataValue.json(result.frameworks),
            "controls": MetadataValue.table(
                records=[TableRecord({"control": c.control_id, "mapping": "; ".join(c.mapping), "result": c.result})
                         for c in result.controls],
                schema=TableSchema(columns=[TableColumn("control", "string"), TableColumn("mapping", "string"),
                                            TableColumn("result", "string")])),
        }, check_results=[check])

    return compliance_report


@sensor(name="reports_outside_dagster", minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING,
        description="Reports written by `regal-backup report` (outside Dagster) appear as materializations of "
                    "compliance/report, with their period, repository key and SHA-256.")
def _reports_outside_dagster(context: SensorEvaluationContext, regal: RegalEngine) -> SensorResult:
    seen = set(json.loads(context.cursor)) if context.cursor else set()
    repo = regal.repository()
    stored = sorted(o.key for o in repo.list(COMPLIANCE_REPORTS) if o.key.endswith(".pdf"))
    new = [key for key in stored if key not in seen]
    if not new:
        return SensorResult(cursor=json.dumps(sorted(seen)))
    records = context.instance.fetch_materializations(REPORT_KEY, limit=500).records
    by_dagster = {str(r.asset_materialization.metadata["repository_key"].value) for r in records
                  if r.asset_materialization and "repository_key" in r.asset_materialization.metadata}
    events = []
    for key in new[-20:]:  # a first look at an old repository reports the newest reports, not all of them
        if key in by_dagster:
            continue
        period, report_id = key.removeprefix(COMPLIANCE_REPORTS).removesuffix(".pdf").split("/", 1)
        events.append(AssetMaterialization(
            asset_key=REPORT_KEY, description=f"report {report_id} written outside Dagster (regal-backup report)",
            metadata={"report_id": report_id, "period": period, "repository_key": key,
                      "sha256": hashlib.sha256(repo.get_bytes(key)).hexdigest(),
                      "written_by": "regal-backup report (CLI)"}))
    return SensorResult(asset_events=events, cursor=json.dumps(sorted(seen | set(new))))


def compliance_definitions(policy: Policy, drill_job: JobDefinition) -> Definitions:
    """The report asset, its job, the monthly schedule and the reports after each drill (passed or failed)."""
    report_job = define_asset_job(REPORT_JOB, selection=[REPORT_KEY], description="Build the compliance report.")
    monthly = ScheduleDefinition(name="monthly_compliance_report", job=report_job, cron_schedule=policy.reports.cron,
                                 execution_timezone="UTC", default_status=DefaultScheduleStatus.RUNNING,
                                 run_config=_run_config(""),
                                 description=f"The compliance report of the month before ({policy.reports.cron} UTC).")
    sensors: list[SensorDefinition] = []
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
    sensors.append(_reports_outside_dagster)
    return Definitions(assets=[build_report_asset(policy)], jobs=[report_job], schedules=[monthly], sensors=sensors)
