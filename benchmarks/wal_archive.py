"""archive_command, measured: `wal push` run by PostgreSQL once per WAL segment, synchronously (each call starts
the engine and stores the segment) against the same command handing the segment to `wal daemon` (uploaded ahead,
in parallel), under a pgbench write load with a WAL segment closed every 1/--segments-per-second s.

    .venv/bin/python benchmarks/wal_archive.py [--seconds 30] [--segments-per-second 8] [--pgbench-scale 5]

For each path, on a fresh embedded PostgreSQL 18 and a local repository: the latency of every archive_command
call (timed around the command by the shell that runs it: p50, p99, max), the segments archived per second during
the load and how long the backlog took to drain after it, and pg_stat_archiver's failures. As root the server runs
as its own account, which runs regal-backup with the system Python of the same version.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from common import print_table

from regal_dagster.engine.postgresql.installations import pg_bin_dir
from regal_dagster.engine.postgresql.programs import server_account
from regal_dagster.engine.postgresql.server import ScratchCluster

ROOT = Path(__file__).resolve().parents[1]


def _server_program() -> tuple[list[str], dict[str, str]]:
    """How the server's account runs regal-backup (as root: the system Python, which it may read)."""
    extra = {"TMPDIR": tempfile.gettempdir()}
    if not server_account().is_other:
        return [sys.executable, "-m", "regal_dagster.cli"], {**extra, "PYTHONPATH": str(ROOT)}
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    interpreter = shutil.which(f"python{version}", path="/usr/bin:/usr/local/bin")
    if interpreter is None:
        raise SystemExit(f"as root, the server account needs /usr/bin/python{version} to run regal-backup")
    return [interpreter, "-m", "regal_dagster.cli"], {**extra, "XDG_STATE_HOME": str(Path(tempfile.gettempdir())),
                                                       "PYTHONPATH": f"{ROOT}:{sysconfig.get_paths()['purelib']}"}


def _sql(dsn: str, query: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cursor = conn.execute(query)
        return cursor.fetchall() if cursor.description else None


def _give(path: Path) -> None:
    account = server_account()
    if account.is_other:
        account.chown_tree(path)


def run_path(work: Path, daemon: bool, seconds: float, per_second: float, scale: int) -> dict[str, Any]:
    program, extra = _server_program()
    project, latencies = work / "regal", work / "latencies"
    server = ScratchCluster.persistent(work / "pgdata").start()
    daemon_process = None
    try:
        made = subprocess.run([sys.executable, "-m", "regal_dagster.cli", "init", str(project), "--cluster-dsn",
                               server.dsn(), "--no-audit", "--json"], capture_output=True, text=True, check=True)
        policy = json.loads(made.stdout)["policy"]
        latencies.touch()
        _give(work)
        push = " ".join(shlex.quote(w) for w in ["env", *(f"{k}={v}" for k, v in extra.items()), *program,
                                                  "--policy", policy, "wal", "push"])
        timed = (f"s=$(date +%%s%%N); {push} %p; rc=$?; echo $(( ($(date +%%s%%N) - s) / 1000 )) >> {latencies}; "
                 "exit $rc")  # %% is PostgreSQL's escape for %
        for name, value in {"archive_mode": "on", "archive_command": timed}.items():
            _sql(server.dsn(), f"ALTER SYSTEM SET {name} = '{value.replace(chr(39), chr(39) * 2)}'")
        server.stop()
        server.start()
        dsn = server.dsn()
        if daemon:
            account = server_account()
            as_server: dict[str, Any] = {"user": account.uid, "group": account.gid, "extra_groups": []} \
                if account.is_other else {}
            log = work / "daemon.log"
            with log.open("w") as err:
                daemon_process = subprocess.Popen([*program, "--policy", policy, "wal", "daemon"], cwd="/",
                                                  env={"PATH": os.environ["PATH"], **extra}, stderr=err,
                                                  stdout=subprocess.DEVNULL, **as_server)
            while "listening on" not in log.read_text():
                if daemon_process.poll() is not None or not log.exists():
                    raise SystemExit(log.read_text())
                time.sleep(0.1)
        pgbench = str(pg_bin_dir() / "pgbench")
        subprocess.run([pgbench, "-i", "-s", str(scale), "-q", dsn], check=True, capture_output=True)
        _sql(dsn, "SELECT pg_switch_wal()")
        time.sleep(2)
        before = _sql(dsn, "SELECT archived_count FROM pg_stat_archiver")[0][0]
        latencies.write_text("")
        stop = threading.Event()

        def switching() -> None:
            while not stop.wait(1 / per_second):
                _sql(dsn, "SELECT pg_switch_wal()")

        switcher = threading.Thread(target=switching, daemon=True)
        started = time.monotonic()
        switcher.start()
        subprocess.run([pgbench, "-n", "-c", "2", "-T", str(int(seconds)), dsn], check=True, capture_output=True)
        stop.set()
        switcher.join()
        during = _sql(dsn, "SELECT archived_count FROM pg_stat_archiver")[0][0] - before
        load_seconds = time.monotonic() - started
        wanted = _sql(dsn, "SELECT pg_walfile_name(pg_current_wal_lsn())")[0][0]
        _sql(dsn, "CREATE TABLE IF NOT EXISTS marker (x int); INSERT INTO marker VALUES (1)")
        _sql(dsn, "SELECT pg_switch_wal()")
        while (_sql(dsn, "SELECT last_archived_wal FROM pg_stat_archiver")[0][0] or "") < wanted:
            if time.monotonic() - started > 30 * seconds + 600:
                raise SystemExit(f"the archive did not catch up; the server log:\n{server.log_tail()}")
            time.sleep(0.2)
        drained = time.monotonic() - started - load_seconds
        archived, failed = _sql(dsn, "SELECT archived_count, failed_count FROM pg_stat_archiver")[0]
        calls = sorted(int(x) / 1e6 for x in latencies.read_text().split())
        return {"path": "wal daemon" if daemon else "synchronous", "calls": len(calls),
                "p50_ms": statistics.median(calls) * 1000,
                "p99_ms": calls[min(len(calls) - 1, int(len(calls) * 0.99))] * 1000, "max_ms": calls[-1] * 1000,
                "segments_per_second": during / load_seconds, "generated": archived - before,
                "drain_seconds": drained, "failed": failed}
    finally:
        if daemon_process is not None:
            daemon_process.send_signal(signal.SIGTERM)
            daemon_process.wait(timeout=120)
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--segments-per-second", type=float, default=8)
    parser.add_argument("--pgbench-scale", type=int, default=5)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    # the package's bytecode, as an installed package has it (PYTHONDONTWRITEBYTECODE would make every call compile)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "regal_dagster")], check=True)
    base = Path(tempfile.mkdtemp(prefix="regal-bench-wal-"))
    try:
        results = [run_path(base / name, daemon, args.seconds, args.segments_per_second, args.pgbench_scale)
                   for name, daemon in (("synchronous", False), ("daemon", True))]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print_table(f"archive_command under pgbench + a segment closed every {1 / args.segments_per_second:.3f} s "
                f"for {args.seconds:.0f} s (2 cores, local repository)",
                ["path", "calls", "p50 ms", "p99 ms", "max ms", "archived/s during load", "backlog drained in s",
                 "archiver failures"],
                [[r["path"], str(r["calls"]), f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}", f"{r['max_ms']:.0f}",
                  f"{r['segments_per_second']:.1f}", f"{r['drain_seconds']:.1f}", str(r["failed"])] for r in results])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
