"""One backup asset per target: materializing it takes a backup; its metadata says what was stored."""

import math
from datetime import timedelta
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    Config,
    FreshnessPolicy,
    MaterializeResult,
    MetadataValue,
    TableColumn,
    TableRecord,
    TableSchema,
    asset,
)

from ...engine.manifest import Manifest
from ...engine.policy import Policy
from ...engine.recoverability import Recoverability
from ...engine.retention import RetentionVerdict
from ...engine.sources.registry import source_for
from ...engine.storage import backend_for
from ..fleet import asset_group, worker_name, zone_op_tags
from ..resources import RegalEngine

BACKUP_DOMAIN = "backups"  # the groups are `backups_<zone>_<kind>` (defs/fleet.py, asset_group)
REPOSITORY_POOL = "regal_repository"  # a pool of the run queue (defs/instance.py): the repository's uploads
RETENTION_CLASS_TAG = "regal/retention_class"


class BackupConfig(Config):
    """Launch-time choice for an ad-hoc backup; schedules set the class through the run tag."""

    retention_class: str = "hourly"
    # postgres_cluster: True an incremental base backup, False a full one; None as the target's policy says
    incremental: bool | None = None


def backup_asset_key(kind: str, target: str) -> AssetKey:
    return AssetKey(source_for(kind).backup_asset_path(target))


def retention_metadata(verdict: RetentionVerdict | None) -> dict[str, Any]:
    """The backup's retention as `list` shows it (engine/retention.py, `retention_verdict`): what keeps it, and
    the prune run that deletes it."""
    if verdict is None:
        return {}
    return {"retention": verdict.summary,
            **({"retention_deletion_at": MetadataValue.timestamp(verdict.deletion_at)} if verdict.deletion_at else {})}


NO_GOOD_BACKUP = "none"


def recoverability_metadata(model: Recoverability) -> dict[str, Any]:
    """What the target can be recovered to, as `status` says it (engine/recoverability.py, the one model):
    `newest_good_backup` is the backup its newest recoverable point starts from (for a logical target the one a
    restore without an id uses; "none": nothing is recoverable), `recoverable_to` the model's summary,
    `unrecoverable` what stops recovery, naming it."""
    point = model.point
    return {"newest_good_backup": point.backup_id if point else NO_GOOD_BACKUP,
            **({"recovery_point_at": MetadataValue.timestamp(point.at)} if point else {}),
            **({"recovery_position": point.position} if point and point.position else {}),
            "recoverable_to": model.summary,
            **({"unrecoverable": model.unrecoverable} if model.unrecoverable else {})}


def backup_metadata(manifest: Manifest, repository: str, retention: RetentionVerdict | None = None) -> dict[str, Any]:
    seconds = max(manifest.duration_seconds, 1e-6)
    tables = manifest.source.get("tables", [])
    return {
        "backup_id": manifest.backup_id,
        "retention_class": manifest.retention_class,
        **retention_metadata(retention),
        "repository": repository,
        "bytes_read": MetadataValue.int(manifest.plaintext_bytes),
        "bytes_stored": MetadataValue.int(manifest.stored_bytes),
        "compression_ratio": MetadataValue.float(round(manifest.plaintext_bytes / max(manifest.stored_bytes, 1), 2)),
        "duration_seconds": MetadataValue.float(round(seconds, 3)),
        "throughput_mb_per_s": MetadataValue.float(round(manifest.plaintext_bytes / seconds / 1e6, 1)),
        "key_id": MetadataValue.int(manifest.objects[0].encryption.key_id),
        "tool_versions": MetadataValue.json(manifest.tool_versions),
        **({"object_lock_until": MetadataValue.timestamp(manifest.locked_until)} if manifest.locked_until else {}),
        "server_version": manifest.source.get("server_version", ""),
        "wal_lsn": manifest.source.get("wal_lsn", ""),
        "dagster/row_count": MetadataValue.int(sum(t["rows"] for t in tables)),
        **{f"source/{name}": value for name, value in source_for(manifest.kind).summary(manifest).items()
           if isinstance(value, int | str)},
        "row_counts": MetadataValue.table(
            records=[TableRecord({"table": f"{t['schema']}.{t['name']}", "rows": t["rows"]}) for t in tables],
            schema=TableSchema(columns=[TableColumn("table", "string"), TableColumn("rows", "int")]),
        ),
    }


DAGSTER_MIN_WINDOW = timedelta(minutes=1)  # Dagster refuses shorter freshness windows
# The warning windows Dagster's UI writes as they are (dagster_ui_duration), the round ones of them
_WARN_WINDOWS = sorted({*(timedelta(minutes=m) for m in (1, 2, 3, 4, 5, 10, 15, 20, 30, 40)), timedelta(hours=1),
                        *(timedelta(hours=h) for h in range(2, 48)), *(timedelta(days=d) for d in range(2, 26))})


def _js_round(value: float) -> int:
    return math.floor(value + 0.5)  # JavaScript's Math.round (Python's round() rounds half to even)


def dagster_ui_duration(window: timedelta) -> str:
    """How Dagster's UI writes a freshness window ("Warns if more than ... since last materialization"): dayjs's
    humanize with Dagster's thresholds (ui-core/src/util/dayjsExtensions.ts, Dagster 1.13). It rounds: 45 min
    and 1 h 29 min both read "an hour", 1 h 30 min "2 hours"."""
    seconds = window.total_seconds()
    if _js_round(seconds) <= 44:
        return f"{_js_round(seconds)} seconds"
    if _js_round(seconds) <= 89:
        return "a minute"
    if (minutes := _js_round(seconds / 60)) <= 44:
        return f"{minutes} minutes"
    if minutes <= 89:
        return "an hour"
    if (hours := _js_round(seconds / 3600)) <= 47:
        return f"{hours} hours"
    if (days := _js_round(seconds / 86400)) <= 25:
        return f"{days} days"
    return "a month" if days <= 45 else f"{_js_round(days / 30)} months"


def dagster_renders_exactly(window: timedelta) -> bool:
    """Whether the UI's words for the window mean exactly that window."""
    number, _, unit = dagster_ui_duration(window).partition(" ")
    units = {"second": 1, "seconds": 1, "minute": 60, "minutes": 60, "hour": 3600, "hours": 3600, "days": 86400}
    count = 1 if number in ("a", "an") else int(number) if number.isdigit() else None
    return count is not None and unit in units and count * units[unit] == window.total_seconds()


def freshness_windows(rpo: timedelta) -> tuple[timedelta, timedelta | None]:
    """(fail, warn): fail at the RPO (at least Dagster's minute); warn at the longest window up to 3/4 of it that
    Dagster's UI writes exactly (45 min would read "an hour": a 1 h RPO warns at 40 min), none under a minute."""
    fail = max(rpo, DAGSTER_MIN_WINDOW)
    fitting = [w for w in _WARN_WINDOWS if w <= fail * 0.75]
    return fail, (fitting[-1] if fitting else None)


def rpo_freshness_policy(rpo: timedelta) -> FreshnessPolicy:
    """Freshness by freshness_windows. A shorter RPO than a minute (tests) shows as one minute in the UI, while
    the RPO watch sensor alerts on the exact RPO."""
    fail, warn = freshness_windows(rpo)
    return FreshnessPolicy.time_window(fail_window=fail, warn_window=warn)


def _span(delta: timedelta) -> str:
    """A window as it is: 45 min, 1 h, 1 h 30 min, 2 d."""
    minutes = int(delta.total_seconds() // 60)
    days, rest = divmod(minutes, 24 * 60)
    hours, mins = divmod(rest, 60)
    parts = [f"{days} d" if days else "", f"{hours} h" if hours else "", f"{mins} min" if mins else ""]
    return " ".join(p for p in parts if p) or f"{delta.total_seconds():.0f} s"


def freshness_description(rpo: timedelta) -> str:
    """The windows in words, exactly; where the UI's freshness panel rounds one, what it shows instead."""
    fail, warn = freshness_windows(rpo)
    rounded = "" if dagster_renders_exactly(fail) else \
        f' (the UI\'s freshness panel rounds {_span(fail)} to "more than {dagster_ui_duration(fail)}")'
    return f"RPO {_span(rpo)}: freshness " + (f"warns {_span(warn)} after the last backup and " if warn else "") \
        + f"fails {_span(fail)} after it{rounded}"


def build_backup_asset(policy: Policy, target: str) -> AssetsDefinition:
    config = policy.target(target)
    rpo = policy.rpo_for(target)
    freshness = rpo_freshness_policy(rpo)
    fail, warn = freshness_windows(rpo)
    store_kind = backend_for(policy.repository.url).kind  # "s3", "filesystem"
    label = source_for(config.kind).label

    @asset(
        key=backup_asset_key(config.kind, target),
        group_name=asset_group(BACKUP_DOMAIN, policy, target, config.kind),
        kinds={config.kind, store_kind},
        description=f"Encrypted backup of the {label} '{target}'. {freshness_description(rpo)} (backups taken "
                    "outside Dagster count too: the backups_outside_dagster sensor reports them).",
        freshness_policy=freshness,
        owners=policy.owners_for(target),
        tags={"regal/target": target},
        op_tags=zone_op_tags(policy, target),
        pool=REPOSITORY_POOL,
        metadata={"regal/rpo": _span(rpo), "regal/freshness_warn_after": _span(warn) if warn else "-",
                  "regal/freshness_fail_after": _span(fail)},
    )
    def _backup(context: AssetExecutionContext, config: BackupConfig, regal: RegalEngine) -> MaterializeResult:
        retention_class = context.run.tags.get(RETENTION_CLASS_TAG, config.retention_class)
        result = regal.backup(target, retention_class, trigger={"dagster_run_id": context.run.run_id},
                              incremental=config.incremental)
        manifest, offsite_problem = result.manifest, result.offsite_problem
        for key in ("backup_from_note", "incremental_note"):  # a standby not used; an incremental taken full
            if note := manifest.source.get(key):
                context.log.warning(note)
        if taken_from := manifest.source.get("backup_server"):
            context.log.info(f"taken from the {manifest.source.get('backup_from')} {taken_from}")
        if problem := regal.archive_problem(manifest):  # the backup stands; its wal_continuity check says why
            context.log.warning(problem)
        context.log.info(f"backup {manifest.backup_id} ({retention_class}) stored: "
                         f"{manifest.stored_bytes} bytes from {manifest.plaintext_bytes}")
        metadata = backup_metadata(manifest, regal.repository().location, regal.retention(target, manifest.backup_id))
        metadata["worker"] = worker_name()  # the Celery worker of the target's zone, or this machine
        if regal.policy().offsite is not None:
            metadata["offsite_copy"] = offsite_problem or "copied and read back"
            if offsite_problem:  # the backup stands; the offsite_copy check fails and alerts
                context.log.warning(offsite_problem)
        return MaterializeResult(metadata=metadata)

    return _backup
