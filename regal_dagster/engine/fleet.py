"""The policy's `fleet` section: how hundreds of targets share Dagster's run queue. Each scheduled backup,
check and restore test is one run of one target, tagged with its host (at most `max_backups_per_host` runs at
once per server), its zone (the workers that reach it) and a priority by what it does; a run past its class's
`max_runtime` is failed by Dagster's run monitoring.

Plain settings: engine/policy.py puts them together with the targets; regal_dagster/defs/fleet.py turns them into
run tags and the instance configuration (docs/dagster-fleet.yaml)."""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from pydantic import Field, field_validator

from .settings import Duration, Settings

# What a run does: a backup of a retention class, or one of these
Activity = Literal["hourly", "daily", "weekly", "monthly", "verify", "restore_test", "drill"]

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

    @field_validator("max_runtime")
    @classmethod
    def _positive(cls, given: dict[Activity, timedelta]) -> dict[Activity, timedelta]:
        for activity, limit in given.items():
            if limit.total_seconds() < 1:
                raise ValueError(f"{activity}: give a max_runtime of at least 1s (it is {limit.total_seconds():g}s)")
        return {**_default_max_runtime(), **given}

