"""The Dagster instance a fleet runs on ($DAGSTER_HOME/dagster.yaml), from the policy's `fleet` section: PostgreSQL
storage (dagster-postgres), the queued run coordinator with its limits per server (`regal/host`) and per target
(`regal/target`: a second run of a target waits in the queue instead of failing on the target's lock), the
threaded dequeuer, pools for the shared sinks (the repository uploads, the restore tests' scratch servers) and run
monitoring, which fails a run past its `dagster/max_runtime` (defs/fleet.py; backup_alerts names its target).

    python -m regal_dagster.defs.instance --policy /etc/regal/regal_backup.yaml > $DAGSTER_HOME/dagster.yaml

docs/dagster-fleet.yaml is this for a policy with the default `fleet` settings (tests/test_fleet.py keeps it so).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from ..engine.errors import RegalError
from ..engine.fleet import FleetConfig
from .fleet import HOST_TAG, TARGET_TAG

POOL_LIMIT = 8  # runs at once in each pool; `dagster instance concurrency set POOL N` changes one
FREE_SLOTS_AFTER_RUN_END_SECONDS = 60

_POSTGRES_STORAGE = {"postgres": {"postgres_db": {
    "hostname": {"env": "DAGSTER_PG_HOST"}, "port": {"env": "DAGSTER_PG_PORT"},
    "username": {"env": "DAGSTER_PG_USER"}, "password": {"env": "DAGSTER_PG_PASSWORD"},
    "db_name": {"env": "DAGSTER_PG_DB"}}}}

HEADER = """\
# dagster.yaml of a Regal Backup fleet: PostgreSQL storage (dagster-postgres), the run queue and run monitoring.
# Rendered from the policy's `fleet` section (here: its defaults) by
#   python -m regal_dagster.defs.instance --policy /etc/regal/regal_backup.yaml > $DAGSTER_HOME/dagster.yaml
# Credentials come from the environment, never this file; the database must exist (CREATE DATABASE dagster_regal).
# - one run per target per tick (tags regal/target, regal/host, regal/zone, dagster/priority, dagster/max_runtime);
# - at most fleet.max_backups_per_host runs per server (each unique regal/host) and one per target: the rest wait;
# - pools regal_repository (backup runs) and regal_scratch_servers (restore tests): at most 8 runs each
#   (`dagster instance concurrency set regal_repository 16` changes one); a finished run frees its slot;
# - a run past its dagster/max_runtime is failed by run monitoring, and backup_alerts alerts naming the target.
"""


def instance_config(fleet: FleetConfig, storage: str = "postgres") -> dict[str, Any]:
    """The dagster.yaml document; `storage` "sqlite": the default SQLite storage under $DAGSTER_HOME (tests)."""
    document: dict[str, Any] = {}
    if storage == "postgres":
        document["storage"] = _POSTGRES_STORAGE
    document |= {
        # run_queue: the queued run coordinator (Dagster's default), with the threaded dequeuer
        "run_queue": {"dequeue_use_threads": True, "dequeue_num_workers": 4, "dequeue_interval_seconds": 2},
        "concurrency": {
            "runs": {"max_concurrent_runs": fleet.max_concurrent_runs, "tag_concurrency_limits": [
                {"key": HOST_TAG, "value": {"applyLimitPerUniqueValue": True}, "limit": fleet.max_backups_per_host},
                {"key": TARGET_TAG, "value": {"applyLimitPerUniqueValue": True}, "limit": 1}]},
            "pools": {"granularity": "run", "default_limit": POOL_LIMIT}},
        "run_monitoring": {"enabled": True, "start_timeout_seconds": 300, "cancel_timeout_seconds": 180,
                           "poll_interval_seconds": 15,
                           "free_slots_after_run_end_seconds": FREE_SLOTS_AFTER_RUN_END_SECONDS},
        # the freshness policies on the backup assets are evaluated by the daemon when this is on
        "freshness": {"enabled": True},
    }
    return document


def render(fleet: FleetConfig, storage: str = "postgres") -> str:
    return HEADER + yaml.safe_dump(instance_config(fleet, storage), sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m regal_dagster.defs.instance",
                                     description="Print the dagster.yaml of a fleet from the policy's `fleet` section.")
    parser.add_argument("--policy", help="the policy file (default: $REGAL_POLICY or ./regal_backup.yaml)")
    parser.add_argument("--storage", choices=["postgres", "sqlite"], default="postgres",
                        help="postgres (dagster-postgres, production) or sqlite under $DAGSTER_HOME (a try)")
    args = parser.parse_args(argv)
    from ..engine.policy import load_policy

    try:
        fleet = load_policy(args.policy).fleet
    except RegalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    sys.stdout.write(render(fleet, args.storage))
    return 0


if __name__ == "__main__":
    sys.exit(main())
