"""Point-in-time recovery, measured: how long a commit takes to reach the repository through `wal stream`
under a pgbench load (p50/p99: the RPO), base backup throughput through the pipeline against
`pg_basebackup -Ft` to a file, an incremental base backup (pg_basebackup --incremental, summarize_wal = on)
after a short pgbench run against the full one, and restores to the newest point until the server is promoted,
from the full backup and from the chain (full + incremental, combined with pg_combinebackup).

    .venv/bin/python benchmarks/pitr.py [--pgbench-scale 10] [--seconds 60] [--clients 4]

Everything runs on an embedded PostgreSQL 18 started here, with a local repository. The latency of a
commit is measured from the moment its WAL position was flushed on the server (sampled every 0.25 s)
to the first moment `wal status` finds WAL up to that position in the repository (polled every 0.25 s).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import psycopg
from common import print_table, wait_promoted

from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.policy import load_policy
from regal_dagster.engine.postgresql.server import ScratchCluster
from regal_dagster.engine.postgresql.tools import pg_tool_for_server
from regal_dagster.engine.sources.postgres_cluster.wal import parse_lsn
from regal_dagster.engine.sources.postgres_cluster.walstatus import wal_status
from regal_dagster.engine.storage import open_repository

CLI = [sys.executable, "-m", "regal_dagster.cli"]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(args), capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:6])} failed:\n{done.stderr[-2000:]}")
    return done


def _lsn(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()
    assert row is not None
    return parse_lsn(str(row[0]))


def measure_latency(dsn: str, policy_file: Path, work: Path, seconds: float, clients: int, scale: int,
                    pgbench: Path) -> list[float]:
    """Commit-to-repository latencies (seconds) while pgbench writes and `wal stream` stores."""
    env = {**os.environ, "PGPASSWORD": ""}
    _run(str(pgbench), "-i", "-s", str(scale), "-q", dsn, env=env)
    log = (work / "stream.log").open("w")
    stream = subprocess.Popen([*CLI, "--policy", str(policy_file), "wal", "stream", "cluster", "--snapshot-seconds",
                               "1"], stdout=subprocess.DEVNULL, stderr=log)
    policy = load_policy(policy_file)
    repo, keyring = open_repository(policy), load_keyring(policy)
    stored: list[tuple[float, int]] = []
    done = threading.Event()

    def poll_repository() -> None:
        while not done.is_set():
            status = wal_status(policy, repo, keyring, "cluster", ask_server=False)
            if status.newest_lsn:
                stored.append((time.monotonic(), parse_lsn(status.newest_lsn)))
            time.sleep(0.25)

    poller = threading.Thread(target=poll_repository, daemon=True)
    time.sleep(3)  # the stream is up
    poller.start()
    load = subprocess.Popen([str(pgbench), "-c", str(clients), "-j", str(clients), "-T", str(int(seconds)), "-n",
                             dsn], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    commits: list[tuple[float, int]] = []
    while load.poll() is None:
        commits.append((time.monotonic(), _lsn(dsn)))
        time.sleep(0.25)
    deadline = time.monotonic() + 90
    last = commits[-1][1]
    while (not stored or stored[-1][1] < last) and time.monotonic() < deadline:
        time.sleep(0.25)
    done.set()
    poller.join()
    stream.send_signal(signal.SIGTERM)
    stream.wait(timeout=60)
    latencies = []
    for at, lsn in commits:
        reached = next((t for t, position in stored if position >= lsn and t >= at), None)
        if reached is not None:
            latencies.append(reached - at)
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def restore_to_promotion(policy_file: Path, restored: Path, *how: str) -> tuple[float, float]:
    """Restore to the newest point, start PostgreSQL on it: seconds to the restored directory, to promotion."""
    started = time.monotonic()
    _run(*CLI, "--policy", str(policy_file), "restore", "cluster", "--to-dir", str(restored), "--latest", *how,
         *(["--with-wal"] if os.geteuid() == 0 else []))
    restore_seconds = time.monotonic() - started
    cluster = ScratchCluster.persistent(restored).start()
    try:
        wait_promoted(cluster)
        return restore_seconds, time.monotonic() - started
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pgbench-scale", type=int, default=10, help="pgbench -i -s (10 is about 160 MB)")
    parser.add_argument("--seconds", type=float, default=60, help="how long pgbench runs")
    parser.add_argument("--clients", type=int, default=4, help="pgbench clients")
    parser.add_argument("--incremental-seconds", type=int, default=10,
                        help="how long pgbench writes between the full and the incremental base backup")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="regal-bench-pitr-") as tmp:
        work = Path(tmp)
        server = ScratchCluster(base_dir=work, tuned_for_restore=False).start()
        try:
            dsn = server.dsn()
            made = json.loads(_run(*CLI, "init", str(work / "regal"), "--cluster-dsn", dsn, "--no-audit",
                                   "--json").stdout)
            policy_file = Path(made["policy"])
            pgbench = pg_tool_for_server("pgbench", 18).path
            latencies = measure_latency(dsn, policy_file, work, args.seconds, args.clients, args.pgbench_scale,
                                        pgbench)

            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("ALTER SYSTEM SET summarize_wal = on")
                conn.execute("SELECT pg_reload_conf()")
                conn.execute("CHECKPOINT")
            started = time.monotonic()
            backup = json.loads(_run(*CLI, "--policy", str(policy_file), "backup", "cluster", "--json").stdout)
            ours = time.monotonic() - started
            # checked, as Dagster checks every backup (wal_continuity fails here: no WAL is streamed at this point,
            # which leaves the backup good but makes verify exit 1)
            subprocess.run([*CLI, "--policy", str(policy_file), "verify", backup["backup_id"]], capture_output=True,
                           check=False)
            basebackup = pg_tool_for_server("pg_basebackup", 18).path
            started = time.monotonic()
            with (work / "plain.tar").open("wb") as out:
                subprocess.run([str(basebackup), "-d", dsn, "-D", "-", "-Ft", "-X", "none", "--checkpoint=fast",
                                "--manifest-checksums=SHA256"], stdout=out, check=True)
            plain = time.monotonic() - started
            data_mb = backup["bytes_read"] / 1e6
            _run(str(pgbench), "-c", str(args.clients), "-j", str(args.clients), "-T", str(args.incremental_seconds),
                 "-n", dsn, env={**os.environ, "PGPASSWORD": ""})
            started = time.monotonic()
            incremental = json.loads(_run(*CLI, "--policy", str(policy_file), "backup", "cluster", "--incremental",
                                          "--json").stdout)
            incremental_seconds = time.monotonic() - started
            with tarfile.open(work / "plain.tar") as tar:  # the plain full backup's manifest: the plain parent
                tar.extract("backup_manifest", work / "plain-parent", filter="data")
            started = time.monotonic()
            with (work / "plain-incremental.tar").open("wb") as out:
                subprocess.run([str(basebackup), "-d", dsn, "-D", "-", "-Ft", "-X", "none", "--checkpoint=fast",
                                "--manifest-checksums=SHA256",
                                f"--incremental={work / 'plain-parent' / 'backup_manifest'}"], stdout=out, check=True)
            plain_incremental = time.monotonic() - started

            stream = subprocess.Popen([*CLI, "--policy", str(policy_file), "wal", "stream", "cluster"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(3)
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("SELECT pg_switch_wal()")
            time.sleep(3)
            stream.send_signal(signal.SIGTERM)
            stream.wait(timeout=60)
            restores = {name: restore_to_promotion(policy_file, work / f"restored-{name}", *how)
                        for name, how in (("full", ["--base-backup", backup["backup_id"]]),
                                          ("chain", ["--base-backup", incremental["backup_id"]]))}
        finally:
            server.stop()

    print_table("WAL commit-to-repository latency (wal stream, --snapshot-seconds 1) under pgbench",
                ["pgbench", "samples", "p50", "p99", "max"],
                [[f"-s {args.pgbench_scale} -c {args.clients} -T {args.seconds:.0f}", str(len(latencies)),
                  f"{percentile(latencies, 0.5):.2f} s", f"{percentile(latencies, 0.99):.2f} s",
                  f"{max(latencies):.2f} s"]])
    print_table("Base backup", ["how", "MB", "seconds", "MB/s", "vs pg_basebackup"],
                [["regal-backup backup (pg_basebackup -Ft through zstd+Tink+SHA-256)", f"{data_mb:.0f}",
                  f"{ours:.1f}", f"{data_mb / ours:.0f}", f"{ours / plain:.2f}x"],
                 ["pg_basebackup -Ft -D - > file", f"{data_mb:.0f}", f"{plain:.1f}", f"{data_mb / plain:.0f}", "1x"]])
    print_table(f"Incremental base backup after pgbench -T {args.incremental_seconds} on the full one",
                ["backup", "MB read", "MB stored", "seconds", "vs full (stored, time)", "vs pg_basebackup alone"],
                [[kind, f"{b['bytes_read'] / 1e6:.1f}", f"{b['bytes_stored'] / 1e6:.1f}", f"{t:.1f}",
                  f"{b['bytes_stored'] / backup['bytes_stored']:.2f}x, {t / ours:.2f}x", f"{t / alone:.2f}x"]
                 for kind, b, t, alone in (("full", backup, ours, plain),
                                           ("incremental", incremental, incremental_seconds, plain_incremental))])
    print_table("Point-in-time restore to the newest point",
                ["from", "restore (extract, pg_verifybackup, config)", "to promotion (WAL replayed)"],
                [["full base backup", f"{restores['full'][0]:.1f} s", f"{restores['full'][1]:.1f} s"],
                 ["full + incremental (pg_combinebackup)", f"{restores['chain'][0]:.1f} s",
                  f"{restores['chain'][1]:.1f} s"]])


if __name__ == "__main__":
    main()
