"""Peak memory of `regal-backup backup` at several database sizes: it must not grow with the database.

    .venv/bin/python benchmarks/backup_memory.py --scales 0.2 1.0

Creates the point-of-sale dataset in a scratch embedded PostgreSQL per scale, runs the CLI backup as a
separate process and samples the RSS of its whole process tree (regal-backup + pg_dump) every 20 ms.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from regal_dagster.engine.bootstrap import init_project
from regal_dagster.engine.cluster import ScratchCluster
from regal_dagster.engine.datagen import create_pos_database


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def measure(scale: float, work: Path) -> dict[str, float]:
    with ScratchCluster(base_dir=work, tuned_for_restore=True) as cluster:
        dsn = cluster.create_database("regalpos")
        create_pos_database(dsn, scale)
        import psycopg

        with psycopg.connect(dsn) as conn:
            db_bytes = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        made = init_project(work / f"regal-{scale}", dsn)
        start = time.monotonic()
        child = subprocess.Popen([sys.executable, "-m", "regal_dagster.cli", "backup", "main", "--json",
                                  "--policy", str(made.policy_path)], stdout=subprocess.PIPE)
        peak, watcher = 0, psutil.Process(child.pid)
        while child.poll() is None:
            peak = max(peak, tree_rss(watcher))
            time.sleep(0.02)
        seconds = time.monotonic() - start
        result = json.loads(child.stdout.read())  # type: ignore[union-attr]
        assert child.returncode == 0
    return {"scale": scale, "database_mb": db_bytes / 1e6, "dump_mb": result["bytes_read"] / 1e6,
            "stored_mb": result["bytes_stored"] / 1e6, "seconds": seconds, "peak_rss_mb": peak / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=float, nargs="+", default=[0.2, 1.0])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="regal-bench-") as tmp:
        rows = [measure(scale, Path(tmp)) for scale in args.scales]
    print("| scale | database MB | dump MB | stored MB | seconds | peak RSS MB (tree) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['scale']} | {r['database_mb']:.0f} | {r['dump_mb']:.0f} | {r['stored_mb']:.1f} | "
              f"{r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
