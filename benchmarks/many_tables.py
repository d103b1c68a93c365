"""Thousands of small tables: Regal Backup's backup and restore against pg_dump -Fc / pg_restore -j, in one run.

    .venv/bin/python benchmarks/many_tables.py                 # 2,000 tables of 5 rows, 3 interleaved rounds

Creates a database of `--tables` tables (a few columns, an index, a foreign key to the previous table,
`--rows` rows each) in a scratch embedded PostgreSQL 18 (or uses `--dsn`), then runs `--repeat` rounds, each
step as its own process, in this order every round (so that a machine busy with something else slows ours and
the reference alike):

  pg_dump -Fc                     to a file
  regal backup --no-verify        local repository, the backup alone
  regal backup                    the same with every check run before it returns (the CLI's default)
  pg_restore -j N                 of pg_dump's archive into an empty database
  regal restore -j N              of the round's backup into a new database, full read-back validation
  regal restore -j N --validate rows

Prints each step's median wall time and peak RSS, and the median over the rounds of each round's ratio of
ours to the reference (pg_dump -Fc for backups, pg_restore -j N for restores). The goals (issue 28): backup
within 2x pg_dump -Fc, restore within 1.5x pg_restore -j 2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
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


# step -> the reference it is held against
AGAINST = {"regal backup --no-verify": "pg_dump -Fc", "regal backup (with checks)": "pg_dump -Fc",
           "regal restore -j N": "pg_restore -j N", "regal restore -j N --validate rows": "pg_restore -j N"}


def bench(dsn: str, work: Path, repeat: int, jobs: int) -> dict[str, list[tuple[float, float]]]:
    """(wall seconds, peak RSS MB) of every step, one per round."""
    major = psycopg.connect(dsn).info.server_version // 10000
    pg_dump, pg_restore = (str(find_pg_tool(name, major).path) for name in ("pg_dump", "pg_restore"))
    env = {**os.environ, **libpq_environment(dsn)}
    made = init_project(work / "regal", dsn)
    policy = ["--policy", str(made.policy_path)]
    restored = with_dbname(dsn, "bench_regal_restore")
    archive = work / "many.dump"
    times: dict[str, list[tuple[float, float]]] = {}

    def measure(name: str, argv: list[str], before: Callable[[], object] | None = None) -> str:
        if before is not None:
            before()
        seconds, peak, stdout = run_measured(argv, env)
        times.setdefault(name.replace(f"-j {jobs}", "-j N"), []).append((seconds, peak / 1e6))
        print(f"  {name}: {seconds:.2f} s", file=sys.stderr, flush=True)
        return stdout

    for round_number in range(1, repeat + 1):
        print(f"round {round_number}", file=sys.stderr, flush=True)
        measure("pg_dump -Fc", [pg_dump, "--format=custom", f"--file={archive}"])
        measure("regal backup --no-verify", [*REGAL, "backup", "main", "--no-verify", "--json", *policy])
        backup = json.loads(measure("regal backup (with checks)", [*REGAL, "backup", "main", "--json", *policy]))
        measure(f"pg_restore -j {jobs}", [pg_restore, f"--jobs={jobs}", "--exit-on-error",
                                          f"--dbname={with_dbname(dsn, 'bench_pg_restore')}", str(archive)],
                before=lambda: create_empty_database(dsn, "bench_pg_restore"))
        for validation in ("full", "rows"):
            measure(f"regal restore -j {jobs}" + (" --validate rows" if validation == "rows" else ""),
                    [*REGAL, "restore", backup["backup_id"], "--to", restored, "--validate", validation,
                     "--jobs", str(jobs), "--json", *policy], before=lambda: drop_database(dsn, "bench_regal_restore"))
    drop_database(dsn, "bench_pg_restore")
    drop_database(dsn, "bench_regal_restore")
    return times


def report(times: dict[str, list[tuple[float, float]]], title: str, jobs: int) -> None:
    print(f"\n### {title}\n")
    print("| step | median wall s | runs (s) | peak RSS MB (tree) | ours ÷ reference (median of rounds) |")
    print("|---|---:|---|---:|---|")
    for name, runs in times.items():
        seconds = [s for s, _ in runs]
        versus = ""
        if name in AGAINST:
            reference = [s for s, _ in times[AGAINST[name]]]
            ratio = statistics.median(ours / ref for ours, ref in zip(seconds, reference, strict=True))
            versus = f"{ratio:.2f}x {AGAINST[name]}"
        print(f"| {name.replace('-j N', f'-j {jobs}')} | {statistics.median(seconds):.2f} | "
              f"{', '.join(f'{s:.2f}' for s in seconds)} | {max(p for _, p in runs):.0f} | "
              f"{versus.replace('-j N', f'-j {jobs}')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=5, help="rows per table")
    parser.add_argument("--dsn", help="an existing database of many tables to measure instead")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds of every step")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="regal-many-") as tmp:
        work = Path(tmp)
        if args.dsn:
            times = bench(args.dsn, work, args.repeat, args.jobs)
            title = "an existing database"
        else:
            with ScratchCluster(base_dir=work, tuned_for_restore=False) as cluster:
                dsn = cluster.create_database("many")
                print(f"creating {args.tables} tables", file=sys.stderr, flush=True)
                create_many_tables(dsn, args.tables, args.rows)
                times = bench(dsn, work, args.repeat, args.jobs)
            title = f"{args.tables} tables, {args.rows} rows each"
    report(times, f"{title}, {args.jobs} jobs, {os.cpu_count()} cores, {args.repeat} interleaved rounds", args.jobs)


if __name__ == "__main__":
    main()
