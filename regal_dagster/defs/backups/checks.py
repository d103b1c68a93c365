"""Asset checks on every backup asset: manifest, integrity, encryption (ERROR, blocking), size (WARN),
the key's cryptoperiod (WARN, ERROR once past) and the off-site copy (ERROR, not blocking).

They run in `verify_job`, always on the asset's newest materialization: right after every successful
backup run (the `check_new_backups` sensor), daily (`daily_verification`) and from the UI. The daily run
first checks every other backup of the target that no check record vouches for yet (a CLI backup taken with
--no-verify, one whose check run never came), as `regal-backup verify --unchecked` does: their results are
in the repository and the run's log, and `backups_outside_dagster` shows a failure among them on the asset. They are not
planned in the backup run itself: a backup that never happened has no checks to fail (Dagster shows the
checks planned in a failed run as failed). With no backup yet, the checks are skipped. The engine writes
the outcome next to the manifest (checks.json), so the CLI, the RPO watch, retention and restore tests all
see which backups are good. The first check's metadata (and that of a failed check that bounds recovery, WAL
continuity) carries the target's recoverability model as the checks left it (`recoverability_metadata`): what it
can be recovered to, and what is unrecoverable, naming the segment.
"""


import secrets

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckKey,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetCheckSeverity,
    AssetCheckSpec,
    DefaultScheduleStatus,
    MetadataValue,
    RunRequest,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    multi_asset_check,
    schedule,
)

from ...engine.checks import check_names, unchecked_backups
from ...engine.outcomes import bounds_recovery, check_spec
from ...engine.policy import Policy
from ...engine.verify import ReadSample
from ..fleet import fleet_tags, zone_op_tags
from ..resources import RegalEngine
from .assets import backup_asset_key, recoverability_metadata, retention_metadata

WAL_REREAD_TAG = "regal/wal_reread"  # "all": wal_continuity reads every proved WAL segment again
UNCHECKED_TAG = "regal/unchecked"  # "all": every unchecked backup of the target is checked first


def build_verification_schedule(policy: Policy, verify_job) -> ScheduleDefinition:
    """The daily verification, one run per target; on Sundays (UTC) it reads all the proved WAL of postgres_cluster
    targets again (the other days, a share: docs/pitr.md)."""
    cron = policy.checks.verify_cron
    checks = {target: [AssetCheckKey(backup_asset_key(config.kind, target), name)
                       for name in check_names(config.kind, offsite=policy.offsite is not None)]
              for target, config in sorted(policy.targets.items())}

    @schedule(name="daily_verification", job=verify_job, cron_schedule=cron, execution_timezone="UTC",
              default_status=DefaultScheduleStatus.RUNNING,
              description=f"Every target's newest backup read back and checked again ({cron} UTC, one run per "
                          "target): storage bit rot or tampering is found within a day; every unchecked backup "
                          "checked too (as `verify --latest --unchecked`). The proved WAL: a share each day, all on "
                          "Sundays.")
    def _verification(context: ScheduleEvaluationContext) -> list[RunRequest]:
        tick = context.scheduled_execution_time
        weekly = tick.weekday() == 6
        return [RunRequest(run_key=f"verify:{tick.isoformat()}:{target}", asset_check_keys=keys,
                           tags={UNCHECKED_TAG: "all", **({WAL_REREAD_TAG: "all"} if weekly else {}),
                                 **fleet_tags(policy, target, "verify")})
                for target, keys in checks.items()]

    return _verification


def build_backup_checks(policy: Policy, target: str) -> AssetChecksDefinition:
    key = backup_asset_key(policy.target(target).kind, target)
    names = check_names(policy.target(target).kind, offsite=policy.offsite is not None)
    specs = [AssetCheckSpec(name, asset=key, blocking=check_spec(name).decides_good,
                            description=check_spec(name).description) for name in names]

    # op_tags: with fleet.executor: celery a backup run launched with its checks (the UI's "Materialize" plans them)
    # sends the check step to Celery too; it goes to the zone's queue, as the backup step does (no worker serves
    # dagster-celery's default queue, so the run would hang there). In verify_job (in process) the tag is unused.
    @multi_asset_check(name=f"{target}_backup_checks", specs=specs, can_subset=True,
                       op_tags=zone_op_tags(policy, target),
                       description=f"The checks of the newest backup of '{target}' (recorded next to its manifest).")
    def _checks(context: AssetCheckExecutionContext, regal: RegalEngine):
        event = context.instance.get_latest_materialization_event(key)
        materialization = event.asset_materialization if event else None
        backup_id = materialization.metadata.get("backup_id") if materialization else None
        reread = {"wal": "all"} if context.run.tags.get(WAL_REREAD_TAG) == "all" else {}
        if context.run.tags.get(UNCHECKED_TAG) == "all":
            for manifest in unchecked_backups(regal.repository(), regal.keyring(), target):
                if backup_id is None or manifest.backup_id != str(backup_id.value):  # that one is checked below
                    swept = regal.check(manifest.backup_id, trigger={"dagster_run_id": context.run.run_id, **reread})
                    failed = "; ".join(f"{o.name}: {o.description}" for o in swept.outcomes if not o.passed)
                    (context.log.warning if failed else context.log.info)(
                        f"unchecked backup {swept.backup_id}: " + (f"FAILED: {failed}" if failed else "good"))
        if backup_id is None:  # nothing to check: every check is skipped, none failed
            context.log.info(f"no backup of '{target}' yet: its checks are skipped")
            return
        percent = regal.policy().checks.daily_sample_percent
        daily = context.run.tags.get(UNCHECKED_TAG) == "all"  # the daily verification: a sample may do
        sample = ReadSample(percent, secrets.token_hex(8)) if daily and percent else None
        record = regal.check(str(backup_id.value), trigger={"dagster_run_id": context.run.run_id, **reread},
                             sample=sample)
        selected = {k.name for k in context.selected_asset_check_keys}
        retention = retention_metadata(regal.retention(target, record.backup_id))  # as the checks left it
        recovery = recoverability_metadata(regal.recoverability(target))  # the model, as the checks left it
        for outcome in record.outcomes:
            if outcome.name not in selected:
                continue
            metadata = {"backup_id": record.backup_id, "finding": outcome.description, **outcome.metadata,
                        **(retention if outcome is record.outcomes[0] else {}),
                        **(recovery if outcome is record.outcomes[0] or bounds_recovery(outcome.name) else {})}
            if outcome.failing_object:
                metadata["failing_object"] = outcome.failing_object
            yield AssetCheckResult(asset_key=key, check_name=outcome.name, passed=outcome.passed,
                                   severity=AssetCheckSeverity(outcome.severity), description=outcome.description,
                                   metadata={k: MetadataValue.json(v) if isinstance(v, list | dict) else v
                                             for k, v in metadata.items()})
        context.log.info(f"checks of {record.backup_id}: {'good' if record.passed else 'FAILED'}")

    return _checks
