"""The tags that put one run of one target into Dagster's run queue (the policy's `fleet` section,
engine/fleet.py): the queued run coordinator limits runs per `regal/host` and per `regal/target`
(docs/dagster-fleet.yaml), orders them by `dagster/priority`, and run monitoring fails one past its
`dagster/max_runtime`; `regal/zone` names the workers that reach the target."""

from __future__ import annotations

import re
import socket

from dagster import ExecutorDefinition, in_process_executor

from ..engine.fleet import BROKER_ENV_NAME, PRIORITY, Activity, celery_queue
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


CELERY_QUEUE_TAG = "dagster-celery/queue"  # dagster_celery.tags.DAGSTER_CELERY_QUEUE_TAG: read from each step's op tags


def zone_op_tags(policy: Policy, target: str) -> dict[str, str]:
    """The op tags of a target's backup step: with the Celery executor, its zone's queue (dagster-celery routes a
    step by its op's tags, not the run's, so the queue is set on each target's asset)."""
    if policy.fleet.executor != "celery":
        return {}
    return {CELERY_QUEUE_TAG: celery_queue(policy.zone_of(target))}


def backup_executor(policy: Policy) -> ExecutorDefinition:
    """The backup job's executor: in the run's process, or dagster-celery's over `fleet.broker` (a variable's NAME
    is passed as `{env: NAME}`: the URL, password and all, is read where it is used and never lands in the run's
    config or logs)."""
    if policy.fleet.executor != "celery":
        return in_process_executor
    from dagster_celery import celery_executor  # imported only when used: it loads celery and kombu

    broker = policy.fleet.broker
    source: object = {"env": broker} if BROKER_ENV_NAME.fullmatch(broker) else broker
    return celery_executor.configured({"broker": source, "backend": policy.fleet.result_backend}, name="regal_celery")


def worker_name() -> str:
    """Where this step runs: the Celery worker's name (`eu@host`) inside a Celery task, else this machine's name."""
    try:
        from celery import current_task  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - celery is a dependency
        current_task = None
    request = getattr(current_task, "request", None) if current_task else None
    return getattr(request, "hostname", None) or socket.gethostname()


def asset_group(domain: str, policy: Policy, target: str, kind: str | None = None) -> str:
    """The asset group of one of the target's assets, so that a fleet of hundreds stays navigable in the UI: by
    what it is (`domain`: backups, wal, restore_tests), the target's zone and its kind (`backups_eu_west_postgres`,
    `wal_eu_west`, `restore_tests_eu_west_redis`). Jobs select assets by key, never by group. Characters a group
    name cannot hold (anything but letters, digits and `_`) become `_`."""
    parts = [domain, policy.zone_of(target), *([kind] if kind else [])]
    return re.sub(r"[^A-Za-z0-9_]", "_", "_".join(parts))
