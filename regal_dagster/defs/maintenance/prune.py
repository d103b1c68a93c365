"""Repository maintenance in Dagster: the prune job (daily) and the quarterly retention proof.

Both run the engine's `run_prune`: the daily schedule deletes what retention no longer keeps and the
leftovers of interrupted backups (recorded in the repository under prune/); the quarterly schedule runs
it as a check that deletes nothing and fails when any backup is past its retention (PCI DSS 3.2.1).
"""

from datetime import UTC, datetime

from dagster import (
    Config,
    DefaultScheduleStatus,
    Definitions,
    Failure,
    MetadataValue,
    OpExecutionContext,
    ScheduleDefinition,
    job,
    op,
)

from ...engine.policy import Policy
from ...engine.retention import run_prune
from ..resources import RegalEngine

PRUNE_JOB = "prune_job"


class PruneConfig(Config):
    check_only: bool = False  # the quarterly proof: delete nothing, fail if anything is past retention


def maintenance_definitions(policy: Policy) -> Definitions:
    @op(description="Deletes what retention no longer keeps and the leftovers of interrupted backups.")
    def prune(context: OpExecutionContext, config: PruneConfig, regal: RegalEngine) -> None:
        report = run_prune(regal.policy(), regal.repository(), datetime.now(UTC), dry_run=config.check_only,
                           keyring=regal.keyring())
        kept = sum(d.keep for ds in report.decisions.values() for d in ds)
        context.log.info(f"kept {kept} backups; deleted {len(report.deleted)}; removed {len(report.leftovers)} "
                         f"objects no backup needs{' (check only)' if config.check_only else ''}")
        if report.locked:
            context.log.info(f"{len(report.locked)} leftover object(s) stay under Object Lock until their date")
        if config.check_only and report.past_retention:
            raise Failure(f"{len(report.past_retention)} backup(s) are past their retention",
                          metadata={"past_retention": MetadataValue.json(report.past_retention)})

    @job(name=PRUNE_JOB, description="Retention: prune the repository, or prove nothing is past retention.")
    def prune_job() -> None:
        prune()

    daily = ScheduleDefinition(name="daily_prune", job=prune_job, cron_schedule=policy.prune.cron,
                               execution_timezone="UTC", default_status=DefaultScheduleStatus.RUNNING,
                               description=f"Delete what retention no longer keeps ({policy.prune.cron} UTC).")
    check = ScheduleDefinition(name="quarterly_retention_check", job=prune_job,
                               cron_schedule=policy.prune.retention_check_cron, execution_timezone="UTC",
                               default_status=DefaultScheduleStatus.RUNNING,
                               run_config={"ops": {"prune": {"config": {"check_only": True}}}},
                               description="Prove nothing is kept past its retention (PCI DSS 3.2.1; "
                                           f"{policy.prune.retention_check_cron} UTC): deletes nothing.")
    return Definitions(jobs=[prune_job], schedules=[daily, check])
