"""Recovery time of the point-of-sale database: point-in-time restore of the whole server against the
logical restore of the database and the runbook's `gunzip -c | psql`, on the same data, in one run.

    .venv/bin/python benchmarks/pitr_vs_logical.py [--scale 20] [--repeat 1]

Generates the point-of-sale database at `--scale` in a scratch PostgreSQL 18, then takes the runbook's
`pg_dump | gzip`, a logical backup (`regal-backup backup main`) and a base backup with the WAL after it
(`regal-backup backup cluster` and a short `wal stream`). Each recovery is timed until the data can be used:

- runbook: `gunzip -c dump.sql.gz | psql` into an empty database;
- logical: `regal-backup restore main --latest --to NEW` (authenticated, loaded, every table read back and
  compared, renamed into place) and the same with `--validate rows`;
- PITR: `regal-backup restore cluster --latest --to-dir DIR --with-wal` (extract, pg_verifybackup, recovery
  settings) and then `pg_ctl start` until the server is promoted (WAL replayed, open for writes).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from common import generated_database, print_table, wait_promoted
from compare_runbook import create_empty_database, drop_database, path_size, run_measured, shell

from regal_dagster.engine.bootstrap import init_project
from regal_dagster.engine.postgresql.connection import libpq_environment, with_dbname
from regal_dagster.engine.postgresql.server import ScratchCluster
from regal_dagster.engine.postgresql.tools import find_pg_tool

REGAL = [sys.executable, "-m", "regal_dagster.cli"]


def bench(scale: float, work: Path, repeat: int) -> tuple[list[list[str]], dict[str, float]]:
    timings: dict[str, list[float]] = {}
    with generated_database(work / "source", scale) as dsn:
        major = psycopg.connect(dsn).info.server_version // 10000
        pg_dump, psql = (str(find_pg_tool(tool, major).path) for tool in ("pg_dump", "psql"))
        env = {**os.environ, **libpq_environment(dsn)}
        database_mb = path_size(work / "source") / 1e6

        gz = work / "runbook.sql.gz"
        run_measured(shell(f"{shlex.quote(pg_dump)} | gzip > {shlex.quote(str(gz))}"), env)
        server_dsn = with_dbname(dsn, "postgres")
        made = init_project(work / "regal", dsn, cluster_dsn=server_dsn, audit=False)
        policy = ["--policy", str(made.policy_path)]
        run_measured([*REGAL, *policy, "backup", "main", "--json"])
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
        run_measured([*REGAL, *policy, "backup", "cluster", "--json"])
        stream = subprocess.Popen([*REGAL, *policy, "wal", "stream", "cluster"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            time.sleep(3)
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("SELECT pg_switch_wal()")
            time.sleep(3)
        finally:
            stream.send_signal(signal.SIGTERM)
            stream.wait(timeout=60)

        for _ in range(repeat):
            create_empty_database(dsn, "bench_runbook")
            seconds, _, _ = run_measured(shell(f"gunzip -c {shlex.quote(str(gz))} | {shlex.quote(psql)} -q -X "
                                               "-v ON_ERROR_STOP=1 > /dev/null"),
                                         {**env, "PGDATABASE": "bench_runbook"})
            timings.setdefault("runbook", []).append(seconds)
            drop_database(dsn, "bench_runbook")
            for validation in ("full", "rows"):
                seconds, _, _ = run_measured([*REGAL, *policy, "restore", "main", "--latest", "--to",
                                              with_dbname(dsn, "bench_logical"), "--validate", validation, "--json"])
                timings.setdefault(f"logical {validation}", []).append(seconds)
                drop_database(dsn, "bench_logical")
            restored = work / "restored"
            started = time.monotonic()
            run_measured([*REGAL, *policy, "restore", "cluster", "--latest", "--to-dir", str(restored),
                          *(["--with-wal"] if os.geteuid() == 0 else [])])
            timings.setdefault("pitr restore", []).append(time.monotonic() - started)
            cluster = ScratchCluster.persistent(restored).start()
            try:
                wait_promoted(cluster)
                timings.setdefault("pitr promoted", []).append(time.monotonic() - started)
            finally:
                cluster.stop()
            subprocess.run(["rm", "-rf", str(restored)], check=True)

    best = {name: min(values) for name, values in timings.items()}
    logical = best["logical full"]
    labels = {"runbook": "runbook: gunzip -c \\| psql",
              "logical full": "regal restore (logical, full read-back validation)",
              "logical rows": "regal restore --validate rows (logical)",
              "pitr restore": "regal restore --to-dir --latest --with-wal (PITR: extract, verify, configure)",
              "pitr promoted": "PITR: ... then pg_ctl start until promoted (WAL replayed)"}
    rows = [[labels[name], f"{scale:g} ({database_mb:,.0f} MB on disk)", f"{seconds:.1f} s",
             f"{seconds / logical:.2f}x", f"{seconds / best['runbook']:.2f}x"] for name, seconds in best.items()]
    return rows, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=20, help="point-of-sale dataset scale (20 is about 1 GB)")
    parser.add_argument("--repeat", type=int, default=1, help="recoveries per method (the best is shown)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="regal-bench-pitr-logical-") as tmp:
        rows, _ = bench(args.scale, Path(tmp), args.repeat)
    print_table("Recovery of the point-of-sale database: PITR against logical restore and the runbook",
                ["method", "scale", "seconds", "vs regal logical restore", "vs runbook"], rows)


if __name__ == "__main__":
    main()
