"""CLI start-up: the CPU time (user + system, of the process and its children; median of N runs) of the commands
an operator, a monitoring probe or PostgreSQL run most, against `python -c pass` and `pg_dump --version`.

    python benchmarks/startup.py [--runs 10] [--dsn postgresql://postgres@127.0.0.1:5432/postgres]
                                 [--baseline GIT_REV]

One local repository whose policy holds a `postgres` target (a small database, one backup) and a
`postgres_cluster` target (the server of --dsn; a `wal daemon` serves it, ten synthetic segments pushed). With
--baseline, the same commands of that revision's code (`git archive`) run interleaved with this tree's, on the
same repository. Bytecode is compiled first, as an installed package has it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import print_table
from regal_dagster.engine.postgresql.tools import find_pg_tool

GOALS = {"--version": 0.08, "--help": 0.08, "wal push": 0.15, "wal get": 0.15, "status": 0.3, "list": 0.3}


def cpu_seconds(argv: list[str], env: dict[str, str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=False,
                   cwd=env["TMPDIR"])  # not the source tree: `python -m` would import from the working directory first
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def code_of(revision: str, into: Path) -> Path:
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "regal_dagster"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--baseline", help="a git revision to measure beside this tree (e.g. main)")
    options = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # stopped: the daemon and database too
    work = Path(tempfile.mkdtemp(prefix="regal-startup-"))
    codes = {"this tree": ROOT}
    if options.baseline:
        codes[options.baseline] = code_of(options.baseline, work / "baseline")
    for code in codes.values():
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(code / "regal_dagster")], check=True)
    database = f"regal_startup_{os.getpid()}"
    with psycopg.connect(options.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    small = make_conninfo(options.dsn, dbname=database)
    daemon = None
    try:
        with psycopg.connect(small, autocommit=True) as conn:
            conn.execute("CREATE TABLE orders AS SELECT g AS id, md5(g::text) AS note FROM generate_series(1, 1000) g")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(work)}
        cli = [sys.executable, "-m", "regal_dagster.cli"]
        made = subprocess.run([*cli, "init", str(work / "regal"), "--postgres-dsn", small, "--cluster-dsn",
                               options.dsn, "--no-audit", "--json"], capture_output=True, text=True, env=env,
                              check=True)
        policy = json.loads(made.stdout)["policy"]
        subprocess.run([*cli, "--policy", policy, "backup", "main"], capture_output=True, env=env, check=True)
        log = work / "daemon.log"
        with log.open("w") as err:
            daemon = subprocess.Popen([*cli, "--policy", policy, "wal", "daemon"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=err)
        while "listening on" not in log.read_text():
            if daemon.poll() is not None:
                raise SystemExit(f"the wal daemon stopped: {log.read_text()}")
            time.sleep(0.1)
        segments = work / "pg_wal"
        segments.mkdir()
        runs = options.runs
        names = [f"0000000100000000000000{n:02X}" for n in range(1, 2 * runs * len(codes) + 1)]
        for name in names:
            (segments / name).write_bytes(os.urandom(1 << 20))
        pg_dump = str(find_pg_tool("pg_dump", 0).path)
        commands: dict[str, list[str]] = {
            "--version": ["--version"], "--help": ["--help"], "status": ["--policy", policy, "status"],
            "list": ["--policy", policy, "list"]}
        samples: dict[tuple[str, str], list[float]] = {}
        fresh = iter(names)
        for _round in range(runs):  # interleaved: the machine's load falls on every column alike
            samples.setdefault(("", "python -c pass"), []).append(cpu_seconds([sys.executable, "-c", "pass"], env))
            samples.setdefault(("", "pg_dump --version"), []).append(cpu_seconds([pg_dump, "--version"], env))
            for label, code in codes.items():
                code_env = {**env, "PYTHONPATH": str(code)}
                for name, argv in commands.items():
                    samples.setdefault((label, name), []).append(cpu_seconds([*cli, *argv], code_env))
                pushed = next(fresh)
                samples.setdefault((label, "wal push"), []).append(cpu_seconds(
                    [*cli, "--policy", policy, "wal", "push", str(segments / pushed)], code_env))
                samples.setdefault((label, "wal get"), []).append(cpu_seconds(
                    [*cli, "--policy", policy, "wal", "get", pushed, str(work / "RECOVERYXLOG")], code_env))
        base = statistics.median(samples[("", "python -c pass")])
        pg = statistics.median(samples[("", "pg_dump --version")])
        header = ["command", *(f"CPU s ({label})" for label in codes), "× python -c pass", "× pg_dump --version",
                  "goal"]
        rows = [["python -c pass", *[f"{base:.3f}"] * len(codes), "1.0", f"{base / pg:.1f}", ""],
                ["pg_dump --version", *[f"{pg:.3f}"] * len(codes), f"{pg / base:.2f}", "1.0", ""]]
        for name in [*commands, "wal push", "wal get"]:
            medians = [statistics.median(samples[(label, name)]) for label in codes]
            rows.append([f"regal-backup {name}", *(f"{m:.3f}" for m in medians), f"{medians[0] / base:.1f}",
                         f"{medians[0] / pg:.1f}", f"≤ {GOALS[name]}"])
        print_table(f"CLI start-up, CPU seconds, median of {runs} (wal push/get through a wal daemon)", header, rows)
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
        with psycopg.connect(options.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
