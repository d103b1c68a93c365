"""What the backup lifecycle costs: the off-site copy, its check, re-encryption under a new key, and the
retention planner over many backups.

    .venv/bin/python benchmarks/lifecycle.py --scale 2
    .venv/bin/python benchmarks/lifecycle.py --dsn postgresql://user@host/db

It backs up the database (a generated one in a scratch PostgreSQL 18, or `--dsn`) into a local
repository with a local off-site repository, then times: copying the backup off-site (read, write, read
back), the `offsite_copy` check alone, `keys retire --reencrypt` of the backup (decrypt, encrypt, write,
read back, checks again), and the pure retention planner over 1,000 and 20,000 backups. Prints a
markdown table: wall seconds, MB/s of stored bytes, peak RSS of this process.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml
from common import generated_database, print_table

from regal_dagster.engine.backup import run_backup
from regal_dagster.engine.bootstrap import init_project
from regal_dagster.engine.checks import check_offsite
from regal_dagster.engine.keys import retire_key, rotate_key
from regal_dagster.engine.offsite import sync_backup
from regal_dagster.engine.policy import RETENTION_CLASSES, load_policy
from regal_dagster.engine.retention import BackupInfo, plan
from regal_dagster.engine.storage import open_offsite, open_repository


def synthetic_backups(count: int, now: datetime) -> list[BackupInfo]:
    """An hourly backup for `count` hours back, a failed one every 97th, classes as the schedules make them."""
    backups = []
    for i in range(count):
        when = now - timedelta(hours=i)
        cls = ("monthly" if when.day <= 7 and when.weekday() == 6 and when.hour == 1 else
               "weekly" if when.weekday() == 6 and when.hour == 1 else "daily" if when.hour == 2 else "hourly")
        backups.append(BackupInfo(f"t-{i:06d}", when, cls, "failed" if i % 97 == 0 else "good"))
    return backups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=2.0)
    parser.add_argument("--dsn")
    args = parser.parse_args()
    rows: list[tuple[str, float, float | None]] = []

    def timed(name: str, stored_bytes: int | None, work):  # type: ignore[no-untyped-def]
        start = time.monotonic()
        result = work()
        wall = time.monotonic() - start
        rows.append((name, wall, stored_bytes / wall / 1e6 if stored_bytes else None))
        return result

    with tempfile.TemporaryDirectory(prefix="regal-lifecycle-") as tmp, contextlib.ExitStack() as stack:
        dsn = args.dsn
        if not dsn:
            dsn = stack.enter_context(generated_database(Path(tmp), args.scale))
        made = init_project(Path(tmp) / "regal", dsn)
        document = yaml.safe_load(made.policy_path.read_text())
        document["offsite"] = {"url": str(Path(tmp) / "offsite")}
        made.policy_path.write_text(yaml.safe_dump(document))
        policy = load_policy(made.policy_path)
        repo, secondary = open_repository(policy), open_offsite(policy)
        assert secondary is not None
        manifest = timed("backup (for scale)", None, lambda: run_backup(policy, "main", repo=repo).manifest)
        size = manifest.stored_bytes
        timed("off-site copy (copy + read back)", size, lambda: sync_backup(repo, secondary, manifest))
        timed("offsite_copy check", size, lambda: check_offsite(repo, secondary, manifest))
        old_key = manifest.objects[0].encryption.key_id
        rotate_key(policy)
        timed("keys retire --reencrypt (+ checks, + off-site)", size,
              lambda: retire_key(policy, old_key, reencrypt=True, repo=repo))
        now = datetime.now(UTC)
        counts = policy.retention.model_dump()
        for count in (1_000, 20_000):
            backups = synthetic_backups(count, now)
            kept = timed(f"retention plan, {count:,} backups", None, lambda b=backups: plan(b, counts, now))
            rows[-1] = (f"{rows[-1][0]} (keeps {sum(d.keep for d in kept)})", rows[-1][1], None)

    print_table(f"lifecycle costs ({size / 1e6:,.1f} MB stored; classes {', '.join(RETENTION_CLASSES)})",
                ["step", "wall s", "MB/s of stored bytes"],
                [[name, f"{wall:.2f}", "" if rate is None else f"{rate:,.0f}"] for name, wall, rate in rows])


if __name__ == "__main__":
    main()
