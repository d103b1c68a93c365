"""Hundreds of small tables: Regal Backup's backup and restore against pg_dump -Fc / pg_restore.

    .venv/bin/python benchmarks/many_tables.py --tables 500 --repeat 2

Creates a database of `--tables` tables (a few columns, an index, a foreign key to the previous table,
`--rows` rows each) in a scratch embedded PostgreSQL 18 (or uses `--dsn`), then measures, each step as
its own process: `pg_dump -Fc` to a file, `pg_restore` of it into an empty database, `regal-backup
backup` (local repository) and `regal-backup restore` (into an empty database, full read-back
validation, and row counts only). Prints a table of wall times and the ratio of ours to pg_dump's.
The issue's goal: within 1.5x.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import psycopg
from common import generated_database  # noqa: F401  (same sys.path set-up as compare_runbook)
from compare_runbook import create_empty_database, drop_database, run_measured

from regal_dagster.engine.bootstrap import init_project
from regal_dagster.engine.postgresql.connection import libpq_environment, with_dbname
from regal_dagster.engine.postgresql.server import ScratchCluster
from regal_dagster.engine.postgresql.tools import find_pg_tool

REGAL = [sys.executable, "-m", "regal_dagster.cli"]


def create_many_tables(dsn: str, tables: int, rows: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(tables):
            ref = f", parent int REFERENCES t{i - 1:04d} (id)" if i else ""
            conn.execute(f"""
                CREATE TABLE t{i:04d} (id int PRIMARY KEY, name text NOT NULL, amount numeric(12, 2),
                                       at timestamptz DEFAULT now(){ref});
                CREATE INDEX ON t{i:04d} (name);
                INSERT INTO t{i:04d} (id, name, amount, at{', parent' if i else ''})
                  SELECT g, 'name ' || g || ' of {i}', g * 1.01, '2026-01-01'::timestamptz + g * interval '1 min'
                         {', g' if i else ''}
                  FROM generate_series(1, {rows}) g;""")
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")


def bench(dsn: str, work: Path, repeat: int, jobs: int) -> list[tuple[str, float, float, str]]:
    major = psycopg.connect(dsn).info.server_version // 10000
    pg_dump, pg_restore = (str(find_pg_tool(name, major).path) for name in ("pg_dump", "pg_restore"))
    env = {**os.environ, **libpq_environment(dsn)}
    times: dict[str, tuple[float, float]] = {}

    def measure(name: str, argv: list[str], before: object = None, database: str | None = None) -> str:
        runs = []
        for _ in range(repeat):
            if callable(before):
                before()
            runs.append(run_measured(argv, {**env, "PGDATABASE": database} if database else env))
        seconds, _, stdout = min(runs, key=lambda r: r[0])
        times[name] = (seconds, max(r[1] for r in runs) / 1e6)
        print(f"  {name}: {seconds:.2f} s", file=sys.stderr, flush=True)
        return stdout

    archive = work / "many.dump"
    measure("pg_dump -Fc", [pg_dump, "--format=custom", f"--file={archive}"])
    measure(f"pg_restore -j {jobs}", [pg_restore, f"--jobs={jobs}", "--exit-on-error", "--dbname=bench_pg_restore",
                                      str(archive)],
            before=lambda: create_empty_database(dsn, "bench_pg_restore"))
    measure("pg_restore", [pg_restore, "--exit-on-error", "--dbname=bench_pg_restore", str(archive)],
            before=lambda: create_empty_database(dsn, "bench_pg_restore"))
    drop_database(dsn, "bench_pg_restore")

    made = init_project(work / "regal", dsn)
    policy = ["--policy", str(made.policy_path)]
    backup_id = json.loads(measure("regal backup", [*REGAL, "backup", "main", "--json", *policy]))["backup_id"]
    restored = with_dbname(dsn, "bench_regal_restore")
    for validation in ("full", "rows"):
        measure(f"regal restore --validate {validation}",
                [*REGAL, "restore", backup_id, "--to", restored, "--validate", validation, "--jobs", str(jobs),
                 "--json", *policy], before=lambda: drop_database(dsn, "bench_regal_restore"))
    drop_database(dsn, "bench_regal_restore")
    against = {"regal backup": "pg_dump -Fc", "regal restore --validate full": f"pg_restore -j {jobs}",
               "regal restore --validate rows": f"pg_restore -j {jobs}"}
    return [(name, seconds, peak, f"{seconds / times[against[name]][0]:.2f}x {against[name]}" if name in against
             else "") for name, (seconds, peak) in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", type=int, default=500)
    parser.add_argument("--rows", type=int, default=200, help="rows per table")
    parser.add_argument("--dsn", help="an existing database of many tables to measure instead")
    parser.add_argument("--repeat", type=int, default=1, help="run every step N times; the fastest counts")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="regal-many-") as tmp:
        work = Path(tmp)
        if args.dsn:
            rows = bench(args.dsn, work, args.repeat, args.jobs)
        else:
            with ScratchCluster(base_dir=work, tuned_for_restore=False) as cluster:
                dsn = cluster.create_database("many")
                print(f"creating {args.tables} tables", file=sys.stderr, flush=True)
                create_many_tables(dsn, args.tables, args.rows)
                rows = bench(dsn, work, args.repeat, args.jobs)
    print(f"\n### {args.tables if not args.dsn else 'many'} tables, {args.rows} rows each, {args.jobs} jobs, "
          f"{os.cpu_count()} cores\n")
    print("| step | wall s | peak RSS MB (tree) | ours ÷ pg_dump's |")
    print("|---|---:|---:|---|")
    for name, seconds, peak, versus in rows:
        print(f"| {name} | {seconds:.2f} | {peak:.0f} | {versus} |")


if __name__ == "__main__":
    main()
