"""Restore tests in Dagster: one restore-test asset per target, launched three ways.

- the `restore_test_new_backups` sensor restore-tests each new good backup of the policy's classes, once
  (the run key is the backup id);
- the `monthly_restore_sample` schedule draws backups at random across targets and ages, and records the
  seed and the candidates in the repository, so an auditor can redraw the same sample;
- `dr_drill_job` (quarterly) runs `regal-backup drill` in a fresh process that uses nothing but the
  policy, the keys and the repository.
"""

import itertools
import json
import subprocess
import sys
from datetime import UTC, datetime

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    Config,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    Failure,
    JobDefinition,
    MaterializeResult,
    MetadataValue,
    OpExecutionContext,
    RunRequest,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    SensorDefinition,
    SensorEvaluationContext,
    SkipReason,
    TableColumn,
    TableRecord,
    TableSchema,
    asset,
    job,
    op,
    schedule,
    sensor,
)
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from .assets import backup_asset_key
from .engine.catalog import load_manifest
from .engine.checks import good_newest_first
from .engine.policy import Policy
from .engine.restore_test import RestoreTestResult
from .engine.sampling import draw_restore_sample
from .resources import RegalEngine

RESTORE_TEST_GROUP = "restore_tests"


def restore_test_key(kind: str, target: str) -> AssetKey:
    return AssetKey([kind, target, "restore_test"])


class RestoreTestConfig(Config):  # type: ignore[misc]
    backup_id: str = ""  # empty: the target's newest good backup


def restore_test_metadata(result: RestoreTestResult) -> dict[str, object]:
    return {
        "backup_id": result.backup_id,
        "retention_class": result.retention_class,
        "backup_age_hours": MetadataValue.float(round(result.backup_age_seconds / 3600, 3)),
        "rto_seconds": MetadataValue.float(round(result.rto_seconds, 2)),
        "rto_target_seconds": MetadataValue.float(result.rto_target_seconds),
        "phase_seconds": MetadataValue.json({k: round(v, 3) for k, v in result.seconds.items()}),
        "load_breakdown_seconds": MetadataValue.json({k: round(v, 3) for k, v in result.load_breakdown.items()}),
        "problems": MetadataValue.json(result.problems),
        "validation": MetadataValue.table(
            records=[TableRecord({"table": f"{t['schema']}.{t['name']}", "rows": t["rows"], "matches": t["matches"]})
                     for t in result.tables],
            schema=TableSchema(columns=[TableColumn("table", "string"), TableColumn("rows", "int"),
                                        TableColumn("matches", "bool")])),
    }


def build_restore_test_asset(policy: Policy, target: str) -> AssetsDefinition:
    kind = policy.target(target).kind
    key = restore_test_key(kind, target)
    rto = policy.rto_for(target)

    @asset(key=key, deps=[backup_asset_key(kind, target)], group_name=RESTORE_TEST_GROUP, kinds={kind},
           description=f"Restore test of a backup of '{target}' in a scratch PostgreSQL: validated, RTO measured "
                       f"against {rto}.",
           check_specs=[AssetCheckSpec("validation_passed", asset=key,
                                       description="Row counts, content SHA-256, schema objects and pg_amcheck."),
                        AssetCheckSpec("rto_within_target", asset=key, description=f"Measured RTO within {rto}.")],
           tags={"regal/target": target})
    def _restore_test(context: AssetExecutionContext, config: RestoreTestConfig,
                      regal: RegalEngine) -> MaterializeResult:
        repo = regal.repository()
        if config.backup_id:
            manifest = load_manifest(repo, config.backup_id)
        else:
            newest = next(good_newest_first(repo, target), None)
            if newest is None:
                raise Failure(f"no good backup of {target} to restore-test yet")
            manifest = newest
        result = regal.restore_test(manifest, trigger={"dagster_run_id": context.run.run_id})
        context.log.info(f"restore test of {result.backup_id}: RTO {result.rto_seconds:.1f}s, "
                         f"{'valid' if result.validation_passed else 'INVALID: ' + '; '.join(result.problems)}")
        return MaterializeResult(metadata=restore_test_metadata(result), check_results=[
            AssetCheckResult(check_name="validation_passed", passed=result.validation_passed,
                             severity=AssetCheckSeverity.ERROR,
                             description="; ".join(result.problems) or "every check of the restored data passed",
                             metadata={"backup_id": result.backup_id}),
            AssetCheckResult(check_name="rto_within_target", passed=result.rto_within_target,
                             severity=AssetCheckSeverity.ERROR,
                             description=f"{result.rto_seconds:.1f}s against {result.rto_target_seconds:.0f}s",
                             metadata={"rto_seconds": result.rto_seconds}),
        ])

    return _restore_test


def _run_config(policy: Policy, target: str, backup_id: str) -> dict[str, object]:
    op_name = "__".join(restore_test_key(policy.target(target).kind, target).path)
    return {"ops": {op_name: {"config": {"backup_id": backup_id}}}}


def build_new_backup_sensor(policy: Policy, restore_job: UnresolvedAssetJobDefinition) -> SensorDefinition:
    classes = set(policy.restore_tests.classes)

    @sensor(name="restore_test_new_backups", job=restore_job, minimum_interval_seconds=120,
            default_status=DefaultSensorStatus.RUNNING,
            description=f"Restore-tests every new good backup of the classes {sorted(classes)}, once.")
    def _sensor(context: SensorEvaluationContext, regal: RegalEngine) -> list[RunRequest] | SkipReason:
        since = context.cursor or ""
        requests, newest = [], since
        for target, config in sorted(regal.policy().targets.items()):
            # newest first, down to the cursor: a tick reads the new backups, not the whole history
            fresh = itertools.takewhile(lambda m: m.finished_at.isoformat() > since,
                                        good_newest_first(regal.repository(), target))
            for manifest in reversed([m for m in fresh if m.retention_class in classes]):
                newest = max(newest, manifest.finished_at.isoformat())
                requests.append(RunRequest(run_key=manifest.backup_id,
                                           asset_selection=[restore_test_key(config.kind, target)],
                                           run_config=_run_config(policy, target, manifest.backup_id),
                                           tags={"regal/backup_id": manifest.backup_id}))
        context.update_cursor(newest)
        return requests or SkipReason("no new good backup to restore-test")

    return _sensor


def build_monthly_sample_schedule(policy: Policy, restore_job: UnresolvedAssetJobDefinition) -> ScheduleDefinition:
    settings = policy.restore_tests

    @schedule(name="monthly_restore_sample", cron_schedule=settings.monthly_cron, job=restore_job,
              execution_timezone="UTC", default_status=DefaultScheduleStatus.RUNNING,
              description=f"{settings.monthly_sample} backups drawn at random across targets and ages, "
                          "restore-tested; the draw is recorded for auditors.")
    def _schedule(context: ScheduleEvaluationContext, regal: RegalEngine) -> list[RunRequest] | SkipReason:
        tick = context.scheduled_execution_time or datetime.now(UTC)
        sample = draw_restore_sample(regal.policy(), regal.repository(), tick)
        if not sample.chosen:
            return SkipReason("no good backups to draw from")
        return [RunRequest(run_key=f"sample-{sample.seed}-{backup_id}",
                           asset_selection=[restore_test_key(policy.target(target).kind, target)],
                           run_config=_run_config(policy, target, backup_id),
                           tags={"regal/backup_id": backup_id, "regal/sample_seed": sample.seed})
                for target, backup_id in sample.chosen]

    return _schedule


def build_drill_job(policy: Policy, policy_path: str) -> tuple[JobDefinition, ScheduleDefinition]:
    @op(description="Runs `regal-backup drill` in a fresh process: nothing but the policy, keys and repository.")
    def dr_drill(context: OpExecutionContext) -> None:
        done = subprocess.run([sys.executable, "-m", "regal_dagster.cli", "drill", "--json", "--policy", policy_path],
                              capture_output=True, text=True, check=False)
        if done.returncode not in (0, 3) or not done.stdout.strip():
            raise Failure(f"the drill could not run: {done.stderr.strip()[-1500:]}")
        record = json.loads(done.stdout)
        context.log.info(f"drill {record['drill_id']}: RTO {record['rto_seconds']:.1f}s (target "
                         f"{record['rto_target_seconds']:.0f}s), worst RPO {record['rpo_seconds']} s (target "
                         f"{record['rpo_target_seconds']:.0f}s): {'PASSED' if record['passed'] else 'FAILED'}")
        if not record["passed"]:
            raise Failure("the disaster-recovery drill missed its targets", metadata={
                "drill": MetadataValue.json(record)})

    @job(name="dr_drill_job", description="Quarterly disaster-recovery drill: every target rebuilt from the "
                                          "repository alone, RTO and RPO measured.")
    def dr_drill_job() -> None:
        dr_drill()

    drill_schedule = ScheduleDefinition(name="quarterly_dr_drill", job=dr_drill_job,
                                        cron_schedule=policy.restore_tests.drill_cron, execution_timezone="UTC",
                                        default_status=DefaultScheduleStatus.RUNNING)
    return dr_drill_job, drill_schedule
