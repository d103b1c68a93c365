"""The policy's `fleet` section: how hundreds of targets share Dagster's run queue. Each scheduled backup,
check and restore test is one run of one target, tagged with its host (at most `max_backups_per_host` runs at
once per server), its zone (the workers that reach it) and a priority by what it does; a run past its class's
`max_runtime` is failed by Dagster's run monitoring.

Plain settings: engine/policy.py puts them together with the targets; regal_dagster/defs/fleet.py turns them into
run tags and the instance configuration (docs/dagster-fleet.yaml)."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from .settings import Duration, Settings

# What a run does: a backup of a retention class, or one of these
Activity = Literal["hourly", "daily", "weekly", "monthly", "verify", "restore_test", "drill"]

DEFAULT_BROKER = "pyamqp://guest@127.0.0.1:5672//"  # RabbitMQ on this machine (amqp's guest password is its default)
BROKER_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


def celery_queue(zone: str) -> str:
    """The Celery queue of a zone's workers: `regal-<zone>`."""
    return f"regal-{zone}"


# dagster/priority of each: higher first in the queue (monthly > weekly > daily > hourly; checks, restore tests
# and drills below every backup)
PRIORITY: dict[str, int] = {"monthly": 40, "weekly": 30, "daily": 20, "hourly": 10, "verify": 5,
                            "restore_test": 0, "drill": -5}


def _default_max_runtime() -> dict[Activity, timedelta]:
    return {"hourly": timedelta(hours=1), "daily": timedelta(hours=6), "weekly": timedelta(hours=12),
            "monthly": timedelta(hours=12), "verify": timedelta(hours=6), "restore_test": timedelta(hours=6),
            "drill": timedelta(hours=24)}


class FleetConfig(Settings):
    max_backups_per_host: int = Field(1, ge=1, description="runs at once on one server (`regal/host`): a limit "
                                      "of the run queue (docs/dagster-fleet.yaml); 0 would stop every backup")
    max_concurrent_runs: int = Field(20, ge=1, description="runs at once in the whole instance")
    default_zone: str = Field("default", min_length=1, description="the zone of a target that names none")
    max_runtime: dict[Activity, Duration] = Field(
        default_factory=_default_max_runtime,
        description="a run still going after this long is failed by Dagster's run monitoring and alerted, "
                    "naming its target (given entries replace the defaults of the same key only)")
    executor: Literal["in_process", "celery"] = Field(
        "in_process", description="where a backup run's step runs: in the run's process, or on a Celery worker "
                                  "of the target's zone (queue `regal-<zone>`, docs/fleet.md)")
    broker: str = Field(
        DEFAULT_BROKER, min_length=1,
        description="the Celery broker (executor: celery): a URL without a password, or the NAME of an "
                    "environment variable holding the URL (so the password stays out of the policy and the logs)")
    result_backend: str = Field(
        "rpc://", min_length=1, description="where Celery workers send a step's result (executor: celery): rpc:// "
                                            "through the broker, or e.g. redis://host:6379/0 (no password in it)")

    @field_validator("broker")
    @classmethod
    def _no_password(cls, broker: str) -> str:
        if BROKER_ENV_NAME.fullmatch(broker):
            return broker
        parts = urlsplit(broker)
        if not parts.scheme or "://" not in broker:
            raise ValueError(f"broker '{broker}': give a URL (pyamqp://user@host:5672//) or the NAME of an "
                             "environment variable holding one (upper-case letters, digits and _)")
        if parts.password:
            raise ValueError("broker: the URL holds a password; put the URL in an environment variable and give "
                             "its NAME here (e.g. broker: REGAL_CELERY_BROKER)")
        return broker

    @field_validator("max_runtime")
    @classmethod
    def _positive(cls, given: dict[Activity, timedelta]) -> dict[Activity, timedelta]:
        for activity, limit in given.items():
            if limit.total_seconds() < 1:
                raise ValueError(f"{activity}: give a max_runtime of at least 1s (it is {limit.total_seconds():g}s)")
        return {**_default_max_runtime(), **given}

