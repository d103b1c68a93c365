"""The WAL stream of each postgres_cluster target in Dagster: `postgres/<target>/wal`, an asset Dagster does
not materialize (the stream is a systemd service, not a run) whose freshness is the target's RPO. The
`wal_stream_watch` sensor reads `wal status` once a minute and reports a materialization whenever newer WAL
was stored, or the archive has caught up with the server (an idle server is not a stale archive): one event
a minute at most, never one per segment. When the stream is down and the server writes, no event comes and
the asset goes stale at the RPO."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from dagster import (
    AssetKey,
    AssetMaterialization,
    AssetSpec,
    DefaultSensorStatus,
    MetadataValue,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from ...engine.policy import Policy
from ..resources import RegalEngine
from .assets import _span, backup_asset_key, rpo_freshness_policy

WATCH_EVERY_SECONDS = 60
WAL_GROUP = "wal"  # not in the backups group: backup_job materializes that group, and nothing materializes WAL


def wal_asset_key(target: str) -> AssetKey:
    return AssetKey(["postgres", target, "wal"])


def cluster_targets(policy: Policy) -> list[str]:
    return sorted(name for name, config in policy.targets.items() if config.kind == "postgres_cluster")


def build_wal_asset(policy: Policy, target: str) -> AssetSpec:
    rpo = policy.rpo_for(target)
    return AssetSpec(
        key=wal_asset_key(target), group_name=WAL_GROUP, kinds={"postgres"},
        deps=[backup_asset_key("postgres_cluster", target)],
        description=f"The WAL of the server '{target}' in the repository (`regal-backup wal stream`, or `wal push` as "
                    f"archive_command): what a point-in-time restore replays. Freshness is the RPO ({_span(rpo)}): "
                    "the age of the newest stored WAL while the server writes more, reported each minute by the "
                    "wal_stream_watch sensor.",
        freshness_policy=rpo_freshness_policy(rpo), tags={"regal/target": target},
        metadata={"regal/rpo": _span(rpo)})


def build_wal_sensor(policy: Policy) -> SensorDefinition:
    @sensor(name="wal_stream_watch", minimum_interval_seconds=WATCH_EVERY_SECONDS,
            default_status=DefaultSensorStatus.RUNNING,
            description="Each minute: `wal status` of every postgres_cluster target; newer WAL stored (or the "
                        "archive caught up with the server) is a materialization of postgres/<target>/wal.")
    def _watch(context: SensorEvaluationContext, regal: RegalEngine) -> SensorResult:
        from ...engine.walstatus import wal_status

        seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
        events: list[AssetMaterialization] = []
        repo, keyring, now = regal.repository(), regal.keyring(), datetime.now(UTC)
        for target in cluster_targets(regal.policy()):
            status = wal_status(regal.policy(), repo, keyring, target, now)
            if status.newest_lsn is None:
                continue
            advanced = seen.get(target) != status.newest_lsn
            caught_up = status.lag_bytes == 0
            if not advanced and not caught_up:
                context.log.info(f"{target}: no newer WAL stored; {status.lag_bytes} bytes behind the server")
                continue
            seen[target] = status.newest_lsn
            updated = now if caught_up else datetime.fromisoformat(str(status.newest_stored_at))
            events.append(AssetMaterialization(
                asset_key=wal_asset_key(target),
                description=f"WAL stored up to {status.newest_lsn}" + (" (caught up with the server)" if caught_up
                                                                       else ""),
                metadata={"newest_lsn": status.newest_lsn, "newest_segment": status.newest_segment or "",
                          "newest_stored_at": status.newest_stored_at or "",
                          "server_lsn": status.server_lsn or "unreachable",
                          "lag_bytes": MetadataValue.int(status.lag_bytes or 0),
                          "lag_seconds": MetadataValue.float(float(status.lag_seconds or 0.0)),
                          "gaps": MetadataValue.int(len(status.gaps)),
                          **({"first_gap": status.gaps[0]} if status.gaps else {}),
                          "dagster/last_updated_timestamp": MetadataValue.timestamp(updated)}))
        return SensorResult(asset_events=events, cursor=json.dumps(seen, sort_keys=True))

    return _watch
