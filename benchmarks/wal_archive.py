"""archive_command, measured: `wal push` run by PostgreSQL once per WAL segment, synchronously (each call starts
the engine and stores the segment) against the same command handing the segment to `wal daemon` (uploaded ahead,
in parallel) and against PostgreSQL 15 loading archive_module/ (`archive_library`: no process per segment, the
daemon behind it; built here with PGXS, skipped when it cannot be), under a pgbench write load with a WAL segment
closed every 1/--segments-per-second s, into a local repository and into S3 (a moto server on 127.0.0.1, started
and stopped here).

    .venv/bin/python benchmarks/wal_archive.py [--seconds 30] [--segments-per-second 8] [--pgbench-scale 5]
        [--repositories local s3] [--paths synchronous "wal daemon" archive_library]

For each path and repository, on a fresh server: the latency of every archive call (archive_command: timed
around the command by the shell that runs it; archive_library: the round trip the module logs; p50, p99, max),
the segments archived per second during the load and how long the backlog took to drain after it, and
pg_stat_archiver's failures; each path's p99 and rate as ratios to the synchronous path's on the same repository.
As root the server runs as its own account, which runs regal-backup with the system Python of the same version.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from common import print_table

from regal_dagster.engine.postgresql.installations import pg_bin_dir
from regal_dagster.engine.postgresql.programs import server_account
from regal_dagster.engine.postgresql.server import ScratchCluster

ROOT = Path(__file__).resolve().parents[1]
PG15 = Path("/usr/lib/postgresql/15/bin")  # the machine's PostgreSQL, which archive_module/ is built for
# moto's dummy credentials (nothing of this machine's AWS set-up is read): this process's and the server's children's
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """A moto S3 server in a process of its own on 127.0.0.1 (its endpoint URL), stopped afterwards."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the moto server did not start")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=60)


def make_project(work: Path, dsn: str, s3_endpoint: str | None) -> str:
    """`regal-backup init` of a cluster target in `work/regal`: its local repository, or with `s3_endpoint` a bucket
    there (created, then initialised as `init` does); the policy's path."""
    made = subprocess.run([sys.executable, "-m", "regal_dagster.cli", "init", str(work / "regal"), "--cluster-dsn",
                           dsn, "--no-audit", "--json"], capture_output=True, text=True, check=True)
    policy = json.loads(made.stdout)["policy"]
    if s3_endpoint is not None:
        import boto3
        import yaml

        from regal_dagster.engine.crypto import load_keyring
        from regal_dagster.engine.policy import load_policy
        from regal_dagster.engine.repository_format import initialize
        from regal_dagster.engine.storage import open_repository

        os.environ.update(S3_ENV)
        bucket = f"regal-bench-{os.getpid()}-{time.monotonic_ns()}"
        boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
        document = yaml.safe_load(Path(policy).read_text())
        document["repository"] = {"url": f"s3://{bucket}/regal", "region": "us-east-1", "endpoint_url": s3_endpoint}
        Path(policy).write_text(yaml.safe_dump(document, sort_keys=False))
        loaded = load_policy(Path(policy))
        initialize(open_repository(loaded), load_keyring(loaded))
    return str(policy)


def start_daemon(program: list[str], policy: str, extra: dict[str, str], log: Path,
                 *options: str) -> subprocess.Popen[str]:
    """`wal daemon` as the server's account, once it listens (its final JSON on stdout)."""
    account = server_account()
    as_server: dict[str, Any] = {"user": account.uid, "group": account.gid, "extra_groups": []} \
        if account.is_other else {}
    with log.open("w") as err:
        process = subprocess.Popen([*program, "--policy", policy, "wal", "daemon", "--json", *options], cwd="/",
                                   env={"PATH": os.environ["PATH"], **extra}, stderr=err, stdout=subprocess.PIPE,
                                   text=True, **as_server)
    while "listening on" not in log.read_text():
        if process.poll() is not None:
            raise SystemExit(log.read_text())
        time.sleep(0.1)
    return process


def stop_daemon(process: subprocess.Popen[str]) -> dict[str, Any]:
    """SIGTERM, then what it says it did."""
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=300)
    return dict(json.loads(out)) if out.strip() else {}


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


def build_archive_module(work: Path) -> Path | None:
    """archive_module/ built with PGXS for the machine's PostgreSQL 15 (None, said, when it cannot be)."""
    pg_config = PG15 / "pg_config"
    pgxs = subprocess.run([str(pg_config), "--pgxs"], capture_output=True, text=True, check=False) \
        if pg_config.exists() else None
    if pgxs is None or pgxs.returncode != 0 or not Path(pgxs.stdout.strip()).is_file():
        print("archive_library: skipped (no PostgreSQL 15 with PGXS here: apt-get install postgresql-server-dev-15)")
        return None
    work.mkdir(parents=True)
    for name in ("Makefile", "regal_archive.c"):
        shutil.copyfile(ROOT / "archive_module" / name, work / name)
    subprocess.run(["make", "-C", str(work), f"PG_CONFIG={pg_config}"], check=True, capture_output=True)
    _give(work)
    return work / "regal_archive.so"


def run_path(work: Path, mode: str, seconds: float, per_second: float, scale: int,
             s3_endpoint: str | None, module: Path | None = None) -> dict[str, Any]:
    """One archiving path: "synchronous" (archive_command `wal push`, no daemon), "wal daemon" (the same command
    with a daemon), "archive_library" (archive_module/ on the machine's PostgreSQL 15, the daemon behind it; the
    others run the embedded PostgreSQL 18)."""
    program, extra = _server_program()
    if s3_endpoint is not None:
        extra = {**extra, **S3_ENV}
    latencies = work / "latencies"
    library = mode == "archive_library"
    server = ScratchCluster.persistent(work / "pgdata", bin_dir=PG15 if library else None).start()
    daemon_process = None
    try:
        policy = make_project(work, server.dsn(), s3_endpoint)
        latencies.touch()
        _give(work)
        push = " ".join(shlex.quote(w) for w in ["env", *(f"{k}={v}" for k, v in extra.items()), *program,
                                                  "--policy", policy, "wal", "push"])
        timed = (f"s=$(date +%%s%%N); {push} %p; rc=$?; echo $(( ($(date +%%s%%N) - s) / 1000 )) >> {latencies}; "
                 "exit $rc")  # %% is PostgreSQL's escape for %
        settings = {"archive_mode": "on", **({"archive_library": str(module)} if library else
                                             {"archive_command": timed})}
        for name, value in settings.items():
            _sql(server.dsn(), f"ALTER SYSTEM SET {name} = '{value.replace(chr(39), chr(39) * 2)}'")
        server.stop()
        if mode != "synchronous":
            daemon_process = start_daemon(program, policy, extra, work / "daemon.log")
        if library:
            socket_file = re.search(r"listening on (\S+):", (work / "daemon.log").read_text())
            assert socket_file is not None
            with (work / "pgdata" / "postgresql.conf").open("a") as conf:  # read by the archiver, which loads it
                conf.write(f"regal_archive.socket = '{socket_file.group(1)}'\nregal_archive.log_latency = on\n")
        server.start()
        dsn = server.dsn()
        pgbench = str(pg_bin_dir() / "pgbench")
        subprocess.run([pgbench, "-i", "-s", str(scale), "-q", dsn], check=True, capture_output=True)
        _sql(dsn, "SELECT pg_switch_wal()")
        time.sleep(2)
        before = _sql(dsn, "SELECT archived_count FROM pg_stat_archiver")[0][0]
        latencies.write_text("")
        server_log = work / "pgdata" / "regal-server.log"
        log_start = server_log.stat().st_size
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
        if library:  # the module logs each call's round trip (failed calls too: "NOT archived")
            with server_log.open("rb") as log:
                log.seek(log_start)
                text = log.read().decode(errors="replace")
            calls = sorted(float(ms) / 1000 for ms in re.findall(r"regal_archive: \w+ (?:NOT )?archived in "
                                                                 r"([0-9.]+) ms", text))
        else:
            calls = sorted(int(x) / 1e6 for x in latencies.read_text().split())
        return {"path": mode, "repository": "S3 (moto)" if s3_endpoint else
                "local", "calls": len(calls),
                "p50_ms": statistics.median(calls) * 1000,
                "p99_ms": calls[min(len(calls) - 1, int(len(calls) * 0.99))] * 1000, "max_ms": calls[-1] * 1000,
                "segments_per_second": during / load_seconds, "generated": archived - before,
                "drain_seconds": drained, "failed": failed}
    finally:
        if daemon_process is not None:
            stop_daemon(daemon_process)
        server.stop()


PATHS = ["synchronous", "wal daemon", "archive_library"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--segments-per-second", type=float, default=8)
    parser.add_argument("--pgbench-scale", type=int, default=5)
    parser.add_argument("--repositories", nargs="+", choices=["local", "s3"], default=["local", "s3"])
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=PATHS)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    # the package's bytecode, as an installed package has it (PYTHONDONTWRITEBYTECODE would make every call compile)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "regal_dagster")], check=True)
    base = Path(tempfile.mkdtemp(prefix="regal-bench-wal-"))
    results = []
    try:
        module = build_archive_module(base / "archive_module") if "archive_library" in args.paths else None
        for repository in args.repositories:
            with contextlib.ExitStack() as stack:
                endpoint = stack.enter_context(moto_s3()) if repository == "s3" else None
                for mode in args.paths:
                    if mode == "archive_library" and module is None:
                        continue
                    results.append(run_path(base / f"{repository}-{mode.replace(' ', '-')}", mode, args.seconds,
                                            args.segments_per_second, args.pgbench_scale, endpoint, module))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rows = []
    for r in results:
        sync = next((s for s in results if s["repository"] == r["repository"] and s["path"] == "synchronous"), r)
        rows.append([r["path"], r["repository"], str(r["calls"]), f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}",
                     f"{r['max_ms']:.0f}", f"{r['segments_per_second']:.1f}", f"{r['drain_seconds']:.1f}",
                     str(r["failed"]), f"{sync['p99_ms'] / r['p99_ms']:.1f}x",
                     f"{r['segments_per_second'] / max(sync['segments_per_second'], 1e-9):.1f}x"])
    print_table(f"archive_command under pgbench + a segment closed every {1 / args.segments_per_second:.3f} s "
                f"for {args.seconds:.0f} s (2 cores)",
                ["path", "repository", "calls", "p50 ms", "p99 ms", "max ms", "archived/s during load",
                 "backlog drained in s", "archiver failures", "p99 faster than synchronous",
                 "archived/s vs synchronous"], rows)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
