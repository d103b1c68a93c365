"""Backup, verify and restore: Regal Backup against the runbook's own script and the floor, in one run.

    .venv/bin/python benchmarks/compare_runbook.py --scales 2 20 --json benchmark.json

For each scale it creates the point-of-sale dataset in a scratch embedded PostgreSQL 18 (or uses the
database of `--dsn`, at one "scale"), then measures on that same database, each step as its own process:

  runbook   pg_dump | gzip > file;  gunzip -t file;  gunzip -c file | psql  (into an empty database)
  floor     pg_dump -Fd -j N --compress=0 into a throwaway directory;  pg_dump > /dev/null
  ours      regal-backup backup (local repository, and S3 on a moto server);
            regal-backup verify (every check: integrity, encryption, manifest, size);
            regal-backup restore (into an empty database; full read-back validation, and row counts only)

With `--repeat N` every step runs N times and the fastest run counts (disk and checkpoint noise).
For every step: wall time, ratio to the runbook's step and to the floor, bytes written, and the peak RSS
of the step's whole process tree (sampled every 20 ms; the PostgreSQL server's own processes are not in
it). Prints a markdown table per scale and a memory-across-scales table, and writes all rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import boto3
import psutil
import psycopg
import yaml
from common import generated_database

from regal_dagster.engine.bootstrap import init_project
from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.policy import load_policy
from regal_dagster.engine.postgresql.connection import libpq_environment, with_dbname
from regal_dagster.engine.postgresql.tools import find_pg_tool
from regal_dagster.engine.repository_format import initialize
from regal_dagster.engine.storage import open_repository

REGAL = [sys.executable, "-m", "regal_dagster.cli"]

# step -> (the runbook's step it replaces, the floor it is held against)
BASELINES = {
    "regal backup (local)": ("runbook: pg_dump | gzip", "floor: pg_dump -Fd -j N"),
    "regal backup (S3, moto)": ("runbook: pg_dump | gzip", "floor: pg_dump -Fd -j N"),
    "regal verify (all checks)": ("runbook: gunzip -t", None),
    "regal restore": ("runbook: gunzip -c | psql", None),
    "regal restore --validate rows": ("runbook: gunzip -c | psql", None),
}


@dataclass
class Step:
    scale: float
    name: str
    seconds: float
    bytes_written: int
    peak_rss_mb: float
    vs_runbook: float | None = None
    vs_floor: float | None = None


def _own_peak(pid: int) -> int:
    """A process's own peak RSS (VmHWM: the high-water mark of the memory it has had since its exec)."""
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def tree_rss(process: psutil.Process) -> int:
    """The sum of the peaks of the step's processes alive now. Not the kernel's ru_maxrss of the child: a
    child forked from this (large) benchmark process inherits its high-water mark through exec."""
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += _own_peak(p.pid)
        except (OSError, ValueError, psutil.NoSuchProcess):
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
    return total


# GNU time, a small C program, runs each step: the kernel's peak of the step's largest process (ru_maxrss),
# which inherits only time's own small high-water mark, covers a step that ends before the first sample.
GNU_TIME = "/usr/bin/time" if Path("/usr/bin/time").is_file() else None


def run_measured(argv: Sequence[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """Run a command; return (wall seconds, peak RSS in bytes, stdout). Fails loudly on a non-zero exit. The
    peak is the larger of the sampled sum of the step's processes' peaks and its largest process's peak."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile(mode="r") as largest:
        timed = [GNU_TIME, "--quiet", "--format=%M", f"--output={largest.name}", *argv] if GNU_TIME else list(argv)
        start = time.monotonic()
        child = subprocess.Popen(timed, stdout=out, stderr=err, env=env)
        watcher, peak = psutil.Process(child.pid), 0
        while True:
            try:  # sampled before reaping, so the last sample still sees the finished processes' peaks
                peak = max(peak, tree_rss(watcher))
            except psutil.NoSuchProcess:
                pass
            pid, status = os.waitpid(child.pid, os.WNOHANG)
            if pid:
                child.returncode = os.waitstatus_to_exitcode(status)
                break
            time.sleep(0.02)
        seconds = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        if child.returncode != 0:
            raise SystemExit(f"benchmark step failed ({child.returncode}): {shlex.join(argv)}\n"
                             f"{err.read().decode(errors='replace')[-2000:]}")
        if GNU_TIME:
            peak = max(peak, int(largest.read().strip() or 0) * 1024)
        return seconds, peak, out.read().decode()


def shell(script: str) -> list[str]:
    return ["bash", "-o", "pipefail", "-c", script]


def path_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def database_size(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return int(conn.execute("SELECT pg_database_size(current_database())").fetchone()[0])  # type: ignore[index]


def create_empty_database(dsn: str, name: str) -> str:
    with psycopg.connect(with_dbname(dsn, "postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    return with_dbname(dsn, name)


def drop_database(dsn: str, name: str) -> None:
    with psycopg.connect(with_dbname(dsn, "postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def s3_policy(local_policy: Path, endpoint: str, bucket: str) -> Path:
    """The same policy with its repository in the bucket, initialized there (as `regal-backup init` does)."""
    document = yaml.safe_load(local_policy.read_text())
    document["repository"] = {"url": f"s3://{bucket}/regal", "endpoint_url": endpoint, "region": "us-east-1"}
    path = local_policy.with_name("regal_s3.yaml")
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    policy = load_policy(path)
    initialize(open_repository(policy), load_keyring(policy))
    return path


def bench_scale(scale: float, dsn: str, work: Path, jobs: int, s3_endpoint: str | None,
                repeat: int = 1) -> list[Step]:
    major = psycopg.connect(dsn).info.server_version // 10000
    pg_dump = str(find_pg_tool("pg_dump", major).path)
    psql = str(find_pg_tool("psql", major).path)
    env = {**os.environ, **libpq_environment(dsn)}  # PG* variables: the password never goes on a command line
    steps: list[Step] = []

    def measure(name: str, argv: Sequence[str], output: Path | None, database: str | None = None,
                before: Callable[[], object] = lambda: None) -> tuple[Step, str]:
        runs = []
        for _ in range(repeat):
            before()
            runs.append(run_measured(argv, {**env, "PGDATABASE": database} if database else env))
        seconds, peak, stdout = min(runs, key=lambda r: r[0])
        peak = max(r[1] for r in runs)
        step = Step(scale, name, seconds, path_size(output) if output else 0, peak / 1e6)
        steps.append(step)
        print(f"  {name}: {seconds:.1f} s, peak {peak / 1e6:.0f} MB", file=sys.stderr, flush=True)
        return step, stdout

    # the runbook's script
    gz = work / "runbook.sql.gz"
    measure("runbook: pg_dump | gzip", shell(f"{shlex.quote(pg_dump)} | gzip > {shlex.quote(str(gz))}"), gz)
    measure("runbook: gunzip -t", ["gunzip", "-t", str(gz)], None)
    measure("runbook: gunzip -c | psql",
            shell(f"gunzip -c {shlex.quote(str(gz))} | {shlex.quote(psql)} -q -X -v ON_ERROR_STOP=1 > /dev/null"),
            None, database="bench_runbook_restore", before=lambda: create_empty_database(dsn, "bench_runbook_restore"))
    drop_database(dsn, "bench_runbook_restore")
    gz.unlink()

    # the floor
    floor_dir = work / "floor.dir"
    measure("floor: pg_dump -Fd -j N",
            [pg_dump, "--format=directory", f"--jobs={jobs}", "--compress=0", f"--file={floor_dir}"], floor_dir,
            before=lambda: shutil.rmtree(floor_dir, ignore_errors=True))
    shutil.rmtree(floor_dir)
    measure("floor: pg_dump > /dev/null", shell(f"{shlex.quote(pg_dump)} > /dev/null"), None)

    # ours
    project = work / "regal"
    made = init_project(project, dsn)
    step, stdout = measure("regal backup (local)", [*REGAL, "backup", "main", "--json", "--policy",
                                                    str(made.policy_path)], None)
    step.bytes_written = json.loads(stdout)["bytes_stored"]
    backup_id = json.loads(stdout)["backup_id"]
    if s3_endpoint:
        bucket = f"regal-bench-{os.getpid()}-{int(scale * 100)}"
        s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket=bucket)
        step, stdout = measure("regal backup (S3, moto)", [*REGAL, "backup", "main", "--json", "--policy",
                                                           str(s3_policy(made.policy_path, s3_endpoint, bucket))], None)
        step.bytes_written = json.loads(stdout)["bytes_stored"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                s3.delete_object(Bucket=bucket, Key=item["Key"])
    measure("regal verify (all checks)", [*REGAL, "verify", backup_id, "--json", "--policy", str(made.policy_path)],
            None)
    restored = with_dbname(dsn, "bench_regal_restore")
    for validation in ("full", "rows"):
        measure("regal restore" if validation == "full" else f"regal restore --validate {validation}",
                [*REGAL, "restore", backup_id, "--to", restored, "--validate", validation, "--json", "--policy",
                 str(made.policy_path)], None, before=lambda: create_empty_database(dsn, "bench_regal_restore"))
    drop_database(dsn, "bench_regal_restore")
    shutil.rmtree(project)

    by_name = {s.name: s for s in steps}
    for step in steps:
        runbook, floor = BASELINES.get(step.name, (None, None))
        if runbook:
            step.vs_runbook = step.seconds / by_name[runbook].seconds
        if floor:
            step.vs_floor = step.seconds / by_name[floor].seconds
    return steps


def ratio(value: float | None) -> str:
    return f"{value:.2f}×" if value is not None else ""


def print_tables(results: dict[float, tuple[int, list[Step]]], jobs: int) -> None:
    for scale, (db_bytes, steps) in results.items():
        print(f"\n### scale {scale:g}: database {db_bytes / 1e6:,.0f} MB, {jobs} parallel jobs, "
              f"{os.cpu_count()} cores\n")
        print("| step | wall s | time ÷ runbook's step | speed-up over runbook | time ÷ floor | written MB "
              "| peak RSS MB (tree) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for s in steps:
            speedup = ratio(1 / s.vs_runbook) if s.vs_runbook else ""
            print(f"| {s.name.replace('|', '&#124;')} | {s.seconds:.2f} | {ratio(s.vs_runbook)} | {speedup} | "
                  f"{ratio(s.vs_floor)} | {s.bytes_written / 1e6:,.1f} | {s.peak_rss_mb:.0f} |")
    if len(results) > 1:
        print("\n### peak RSS of our steps across scales (MB)\n")
        scales = list(results)
        print("| step | " + " | ".join(f"scale {s:g}" for s in scales) + " |")
        print("|---|" + "---:|" * len(scales))
        names = [s.name for s in results[scales[0]][1] if s.name.startswith("regal")]
        for name in names:
            row = [next(s.peak_rss_mb for s in results[sc][1] if s.name == name) for sc in scales]
            print(f"| {name} | " + " | ".join(f"{v:.0f}" for v in row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=float, nargs="+", default=[2.0, 20.0],
                        help="dataset scales (1.0 is about 84 MB; 20 about 1.5 GB)")
    parser.add_argument("--dsn", help="benchmark this existing database instead of generated ones")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel jobs of the floor dump")
    parser.add_argument("--no-s3", action="store_true", help="skip the backup to S3 on a moto server")
    parser.add_argument("--json", type=Path, help="also write every measurement to this file")
    parser.add_argument("--repeat", type=int, default=1, help="run every step N times; the fastest counts")
    parser.add_argument("--work-dir", type=Path, help="where dumps and repositories go (default: a temp dir)")
    args = parser.parse_args()

    for name, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                        "AWS_EC2_METADATA_DISABLED": "true"}.items():
        os.environ.setdefault(name, value)
    moto = None
    if not args.no_s3:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log lines between the results
        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        moto.start()
        host, port = moto.get_host_and_port()
    s3_endpoint = f"http://{host}:{port}" if moto else None
    results: dict[float, tuple[int, list[Step]]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="regal-bench-", dir=args.work_dir) as tmp:
            work = Path(tmp)
            if args.dsn:
                results[0] = (database_size(args.dsn), bench_scale(0, args.dsn, work, args.jobs, s3_endpoint,
                                                                       args.repeat))
            for scale in [] if args.dsn else args.scales:
                print(f"scale {scale:g}: generating the dataset", file=sys.stderr, flush=True)
                with generated_database(work, scale) as dsn:
                    results[scale] = (database_size(dsn), bench_scale(scale, dsn, work, args.jobs,
                                                                           s3_endpoint, args.repeat))
    finally:
        if moto:
            moto.stop()
    print_tables(results, args.jobs)
    if args.json:
        args.json.write_text(json.dumps({"jobs": args.jobs, "cores": os.cpu_count(), "scales": [
            {"scale": scale, "database_bytes": db, "steps": [asdict(s) for s in steps]}
            for scale, (db, steps) in results.items()]}, indent=2))


if __name__ == "__main__":
    main()
