"""The restore-test asset of a target: materializing it restores a backup into a scratch destination,
validates it and measures the RTO; its checks are the validation and the RTO against the target."""

from typing import Any

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    TableColumn,
    TableRecord,
    TableSchema,
    asset,
)

from ...engine.errors import RegalError
from ...engine.policy import Policy
from ...engine.restore_test import RestoreTestResult
from ...engine.selection import choose_backup
from ...engine.sources.registry import source_for
from ..backups.assets import backup_asset_key
from ..fleet import asset_group
from ..resources import RegalEngine

SCRATCH_POOL = "regal_scratch_servers"  # a pool of the run queue (defs/instance.py): scratch servers here
RESTORE_TEST_DOMAIN = "restore_tests"  # the groups are `restore_tests_<zone>_<kind>` (defs/fleet.py)


def restore_test_key(kind: str, target: str) -> AssetKey:
    return AssetKey([kind, target, "restore_test"])


class RestoreTestConfig(Config):
    backup_id: str = ""  # empty: the target's newest good backup


def restore_test_metadata(result: RestoreTestResult) -> dict[str, Any]:
    return {**_recovery_metadata(result),
        "backup_id": result.backup_id,
        "passed": result.passed,
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


def _recovery_metadata(result: RestoreTestResult) -> dict[str, Any]:
    """A cluster's point-in-time recoveries: each one's target, where it stopped, RTO and RPO, and the facts checked."""
    recoveries = result.details.get("recoveries")
    if recoveries is None:
        return {}
    point = result.details.get("restore_point") or {}
    found: dict[str, Any] = {
        "recoveries": MetadataValue.table(
            records=[TableRecord({"point": r["point"], "goal": r["goal"],
                                  "replayed_to_lsn": r.get("replayed_to_lsn") or "",
                                  "newest_commit": r.get("newest_commit") or "",
                                  "rto_seconds": round(r.get("rto_seconds") or 0.0, 2),
                                  "facts_checked": r.get("facts_checked") or 0, "passed": not r["problems"]})
                     for r in recoveries],
            schema=TableSchema(columns=[TableColumn("point", "string"), TableColumn("goal", "string"),
                                        TableColumn("replayed_to_lsn", "string"),
                                        TableColumn("newest_commit", "string"),
                                        TableColumn("rto_seconds", "float"), TableColumn("facts_checked", "int"),
                                        TableColumn("passed", "bool")])),
        "restore_point": MetadataValue.json({k: point.get(k) for k in ("name", "lsn", "note")}),
    }
    if result.details.get("rpo_seconds") is not None:
        found["rpo_seconds"] = MetadataValue.float(round(result.details["rpo_seconds"], 3))
    return found


def build_restore_test_asset(policy: Policy, target: str) -> AssetsDefinition:
    kind = policy.target(target).kind
    source = source_for(kind)
    key = restore_test_key(kind, target)
    rto = policy.rto_for(target)

    # No dependency edge on the backup asset: Dagster marks an asset "Unsynced" whenever an upstream asset has
    # materialized since (a new data version), and most backups (the hourly ones) are never restore-tested by
    # design; a restore test is of the backup it names (`backup_id`), not of the newest one.
    @asset(key=key, group_name=asset_group(RESTORE_TEST_DOMAIN, policy, target, kind), kinds={kind},
           metadata={"regal/backups_of": backup_asset_key(kind, target).to_user_string()},
           description=f"Restore test of a backup of the {source.label} '{target}' (asset "
                       f"{backup_asset_key(kind, target).to_user_string()}; the backup tested is in its metadata) in "
                       f"a scratch destination: validated, RTO measured against {rto}. Launched by "
                       "restore_test_new_backups and monthly_restore_sample, not by every backup: it is not "
                       "marked Unsynced when a backup lands.",
           check_specs=[AssetCheckSpec("validation_passed", asset=key,
                                       description=f"The restore matches the backup: {source.restore_test_proves}."),
                        AssetCheckSpec("rto_within_target", asset=key, description=f"Measured RTO within {rto}.")],
           tags={"regal/target": target}, pool=SCRATCH_POOL, owners=policy.owners_for(target))
    def _restore_test(context: AssetExecutionContext, config: RestoreTestConfig,
                      regal: RegalEngine) -> MaterializeResult:
        trigger = {"dagster_run_id": context.run.run_id}
        try:
            selected = choose_backup(regal.policy(), regal.repository(), regal.keyring(), target,
                                     backup_id=config.backup_id or None, trigger=trigger)
        except RegalError as exc:
            raise Failure(str(exc)) from None
        for note in selected.notes:
            context.log.warning(note)
        result = regal.restore_test(selected.manifest, trigger=trigger)
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


def restore_test_run_config(policy: Policy, target: str, backup_id: str) -> dict[str, Any]:
    op_name = "__".join(restore_test_key(policy.target(target).kind, target).path)
    return {"ops": {op_name: {"config": {"backup_id": backup_id}}}}


