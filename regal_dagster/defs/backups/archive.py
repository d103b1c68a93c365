"""The continuous archive of each target whose kind has one (a server's WAL: `postgres/<target>/wal`) in Dagster:
an asset Dagster does not materialize (the archive is fed by a service, not a run) whose freshness is the
target's RPO. A watch sensor per kind of archive (`wal_stream_watch`) reads the archive's state once a minute and
reports a materialization whenever newer changes were stored, or the archive has caught up with the source (an idle
server is not a stale archive): one event a minute at most, never one per file. When the archiving is down and the
source writes, no event comes and the asset goes stale at the RPO. The state is read through the target's
recoverability model (engine/recoverability.py): every event carries what a restore reaches (`recoverable_to`,
`newest_good_backup`) and, when a gap or an unreadable segment stops it, `unrecoverable` naming it; that finding is
also an observation as soon as it changes."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from dagster import (
    AssetKey,
    AssetMaterialization,
    AssetObservation,
    AssetSpec,
    DefaultSensorStatus,
    MetadataValue,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from ...engine.policy import Policy
from ...engine.sources.capabilities import ContinuousArchive
from ...engine.sources.registry import source_for
from ..fleet import asset_group
from ..resources import RegalEngine
from .assets import _span, backup_asset_key, recoverability_metadata, rpo_freshness_policy

WATCH_EVERY_SECONDS = 60


def archived_targets(policy: Policy) -> dict[str, ContinuousArchive]:
    """The targets whose kind keeps a continuous archive, with it."""
    found = {}
    for name, config in sorted(policy.targets.items()):
        if (archive := source_for(config.kind).continuous_archive()) is not None:
            found[name] = archive
    return found


def build_archive_asset(policy: Policy, target: str, archive: ContinuousArchive) -> AssetSpec:
    rpo, spec = policy.rpo_for(target), archive.asset(target)
    return AssetSpec(
        key=AssetKey(list(spec.key)), group_name=asset_group(spec.group, policy, target), kinds=set(spec.kinds),
        deps=[backup_asset_key(policy.target(target).kind, target)],
        description=spec.description.format(rpo=_span(rpo)),
        freshness_policy=rpo_freshness_policy(rpo), tags={"regal/target": target}, owners=policy.owners_for(target),
        metadata={"regal/rpo": _span(rpo)})


def build_archive_sensors(policy: Policy) -> list[SensorDefinition]:
    """One watch sensor per kind of archive, over all its targets."""
    by_sensor: dict[str, str] = {}
    for target, archive in archived_targets(policy).items():
        by_sensor.setdefault(archive.asset(target).sensor, archive.asset(target).sensor_description)
    return [_build_watch(name, description) for name, description in sorted(by_sensor.items())]


def _metadata_value(value: str | float) -> str | MetadataValue:
    if isinstance(value, str):
        return value
    return MetadataValue.int(value) if isinstance(value, int) else MetadataValue.float(value)


def _build_watch(name: str, description: str) -> SensorDefinition:
    @sensor(name=name, minimum_interval_seconds=WATCH_EVERY_SECONDS, default_status=DefaultSensorStatus.RUNNING,
            description=description)
    def _watch(context: SensorEvaluationContext, regal: RegalEngine) -> SensorResult:
        seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
        events: list[AssetMaterialization | AssetObservation] = []
        now = datetime.now(UTC)
        for target, archive in archived_targets(regal.policy()).items():
            spec = archive.asset(target)
            if spec.sensor != name:
                continue
            model = regal.recoverability(target)  # the archive's state, and what it lets a restore reach
            state = model.archive
            if state is None or state.newest_position is None:
                continue
            key = AssetKey(list(spec.key))
            metadata = {**{k: _metadata_value(v) for k, v in state.metadata.items()},
                        **recoverability_metadata(model)}
            unrecoverable_key = f"{target}/unrecoverable"
            if seen.get(unrecoverable_key, "") != (model.unrecoverable or ""):
                seen[unrecoverable_key] = model.unrecoverable or ""
                if model.unrecoverable:  # found: said at once, fresh or not
                    events.append(AssetObservation(asset_key=key, description=f"UNRECOVERABLE: {model.unrecoverable}",
                                                   metadata=metadata))
            advanced = seen.get(target) != state.newest_position
            caught_up = state.behind == 0
            if not advanced and not caught_up:
                context.log.info(f"{target}: no newer {archive.noun} stored; {state.behind} bytes behind the server")
                continue
            seen[target] = state.newest_position
            updated = now if caught_up else state.newest_stored_at or now
            events.append(AssetMaterialization(
                asset_key=key,
                description=f"{archive.noun} stored up to {state.newest_position}"
                            + (" (caught up with the server)" if caught_up else ""),
                metadata={**metadata, "dagster/last_updated_timestamp": MetadataValue.timestamp(updated)}))
        return SensorResult(asset_events=events, cursor=json.dumps(seen, sort_keys=True))

    return _watch
