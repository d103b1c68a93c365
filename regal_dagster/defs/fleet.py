"""The tags that put one run of one target into Dagster's run queue (the policy's `fleet` section,
engine/fleet.py): the queued run coordinator limits runs per `regal/host` and per `regal/target`
(docs/dagster-fleet.yaml), orders them by `dagster/priority`, and run monitoring fails one past its
`dagster/max_runtime`; `regal/zone` names the workers that reach the target."""

from __future__ import annotations

import re

from ..engine.fleet import PRIORITY, Activity
from ..engine.policy import Policy

TARGET_TAG = "regal/target"
HOST_TAG = "regal/host"
ZONE_TAG = "regal/zone"
PRIORITY_TAG = "dagster/priority"
MAX_RUNTIME_TAG = "dagster/max_runtime"


def fleet_tags(policy: Policy, target: str | None, activity: Activity) -> dict[str, str]:
    """The run's queue tags: of `target`, or of a run over the whole fleet (None: priority and runtime only)."""
    tags = {PRIORITY_TAG: str(PRIORITY[activity]),
            MAX_RUNTIME_TAG: str(int(policy.fleet.max_runtime[activity].total_seconds()))}
    if target is not None:
        tags |= {TARGET_TAG: target, HOST_TAG: policy.host_of(target), ZONE_TAG: policy.zone_of(target)}
    return tags


def asset_group(domain: str, policy: Policy, target: str, kind: str | None = None) -> str:
    """The asset group of one of the target's assets, so that a fleet of hundreds stays navigable in the UI: by
    what it is (`domain`: backups, wal, restore_tests), the target's zone and its kind (`backups_eu_west_postgres`,
    `wal_eu_west`, `restore_tests_eu_west_redis`). Jobs select assets by key, never by group. Characters a group
    name cannot hold (anything but letters, digits and `_`) become `_`."""
    parts = [domain, policy.zone_of(target), *([kind] if kind else [])]
    return re.sub(r"[^A-Za-z0-9_]", "_", "_".join(parts))
