"""Backups while another session keeps creating and dropping tables: Regal Backup against pg_dump -Fc.

    .venv/bin/python benchmarks/schema_churn.py --server-dsn "host=127.0.0.1 user=postgres dbname=postgres"

Creates a database of 20 small tables and a session that, in a loop, creates a table, inserts a row and
drops the table it created three steps before, pausing `--pauses` seconds between steps. For each pause it
runs `pg_dump -Fc` and `regal-backup backup` `--runs` times each, alternating, and prints how many of each
succeeded and how long they took. (A backup that fails says why; pg_dump fails when a table it saw in its
snapshot is dropped before it locks it.)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg
from common import generated_database  # noqa: F401  (same sys.path set-up as compare_runbook)

from regal_dagster.engine.bootstrap import init_project
from regal_dagster.engine.postgresql.connection import libpq_environment, with_dbname
from regal_dagster.engine.postgresql.tools import find_pg_tool

REGAL = [sys.executable, "-m", "regal_dagster.cli"]


def churn(dsn: str, tag: int, pause: float, stop: threading.Event) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        step = 0
        while not stop.is_set():
            conn.execute(f'CREATE TABLE churn_{tag}_{step} (v int); INSERT INTO churn_{tag}_{step} VALUES ({step}); '
                         f'DROP TABLE IF EXISTS "churn_{tag}_{step - 3}"')
            step += 1
            time.sleep(pause)


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[bool, float, str]:
    start = time.monotonic()
    run = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    return run.returncode == 0, time.monotonic() - start, (run.stderr.strip().splitlines() or [""])[0][:120]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server-dsn", default="host=127.0.0.1 user=postgres dbname=postgres",
                        help="a PostgreSQL server to create the scratch database on")
    parser.add_argument("--pauses", type=float, nargs="+", default=[0.2, 0.05, 0.01])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    name = f"regal_churn_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        major = conn.info.server_version // 10000
    dsn = with_dbname(args.server_dsn, name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for i in range(20):
                conn.execute(f"CREATE TABLE t{i} (v int); INSERT INTO t{i} SELECT generate_series(1, 1000)")
        work = Path(tempfile.mkdtemp(prefix="regal-churn-"))
        policy = init_project(work / "regal", dsn, audit=False).policy_path
        pg_dump = str(find_pg_tool("pg_dump", major).path)
        print("| pause between steps | pg_dump -Fc ok | its seconds | regal backup ok | its seconds | a failure |")
        print("|---:|---:|---:|---:|---:|---|")
        for tag, pause in enumerate(args.pauses):
            stop = threading.Event()
            churner = threading.Thread(target=churn, args=(dsn, tag, pause, stop))
            churner.start()
            theirs, ours, failure = [], [], ""
            try:
                for _ in range(args.runs):
                    theirs.append(timed([pg_dump, "--format=custom", "--no-sync", f"--file={work / 'dump'}"],
                                        libpq_environment(dsn)))
                    ours.append(timed([*REGAL, "backup", "main", "--policy", str(policy)]))
            finally:
                stop.set()
                churner.join()
            failure = next((why for ok, _, why in ours if not ok), "") or next(
                (f"pg_dump: {why}" for ok, _, why in theirs if not ok), "")
            print(f"| {pause * 1000:.0f} ms | {sum(ok for ok, _, _ in theirs)}/{args.runs} "
                  f"| {max(s for _, s, _ in theirs):.2f} | {sum(ok for ok, _, _ in ours)}/{args.runs} "
                  f"| {max(s for _, s, _ in ours):.2f} | {failure.replace('|', '/')} |", flush=True)
    finally:
        with psycopg.connect(args.server_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
