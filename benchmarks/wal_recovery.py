"""Recovery of a large amount of WAL, measured: one base backup, then --gigabytes of real WAL (rows of random text,
so it does not compress to nothing) archived into a local repository; the same point-in-time restore (--latest)
recovered three ways, each on a fresh copy started with the embedded PostgreSQL 18:

- `restore_command = wal get`, synchronous: one process per segment, each starting the engine and fetching
  (today's path when no daemon runs);
- `restore_command = wal get` served by `wal daemon` (its prefetch queue, --prefetch segments ahead);
- `restore --with-wal`: the WAL fetched into the data directory first (walfetch.fetch_wal_files, the same parallel
  fetch), then `cp` as restore_command.

    .venv/bin/python benchmarks/wal_recovery.py [--gigabytes 2] [--prefetch 16] [--workers 4]

Prints the time of the restore command, of the recovery (server start to promotion) and their sum, each path's
speed-up over the synchronous one, and the share of `wal get` calls the daemon served from its prefetch queue.
Every server and daemon started here is stopped; the work directory is removed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import print_table, wait_promoted
from wal_archive import ROOT, _give, _server_program, _sql, make_project, start_daemon, stop_daemon

from regal_dagster.engine.postgresql.server import ScratchCluster

SEGMENT = 16 << 20


def _cli(policy: str, *args: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "regal_dagster.cli", "--policy", policy, *args, "--json"],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"regal-backup {' '.join(args)} failed: {done.stderr}")
    return dict(json.loads(done.stdout))


def archive_wal(work: Path, gigabytes: float) -> tuple[str, int]:
    """A server whose base backup is followed by `gigabytes` of WAL, all archived (the server is stopped after);
    the policy and how many segments were written after the backup."""
    from regal_dagster.engine.crypto import load_keyring
    from regal_dagster.engine.policy import load_policy
    from regal_dagster.engine.sources.postgres_cluster.wal import push_wal
    from regal_dagster.engine.storage import open_repository

    spool = work / "spool"
    spool.mkdir(parents=True)
    server = ScratchCluster.persistent(work / "pgdata").start()
    try:
        policy = make_project(work, server.dsn(), None)
        _give(work)
        for name, value in {"archive_mode": "on", "archive_command": f"cp %p {spool}/%f.tmp && mv {spool}/%f.tmp "
                                                                       f"{spool}/%f", "max_wal_size": "4GB"}.items():
            _sql(server.dsn(), f"ALTER SYSTEM SET {name} = '{value}'")
        server.stop()
        server.start()
        dsn = server.dsn()
        loaded = load_policy(Path(policy))
        repo, keyring = open_repository(loaded), load_keyring(loaded)
        done = threading.Event()
        failed: list[BaseException] = []

        def pushing() -> None:  # what `wal push` does for each file, two at a time (setting up, not measured)
            try:
                with ThreadPoolExecutor(max_workers=2) as pool:
                    while True:
                        finished = done.is_set()
                        files = sorted(p for p in spool.iterdir() if not p.name.endswith(".tmp"))
                        for path, _ in zip(files, pool.map(
                                lambda p: push_wal(loaded, repo, keyring, "cluster", p), files), strict=True):
                            path.unlink()
                        if finished and not files:
                            return
                        time.sleep(0.2)
            except BaseException as exc:
                failed.append(exc)
                raise

        pusher = threading.Thread(target=pushing)
        pusher.start()
        _cli(policy, "backup", "cluster", "--no-verify")
        start = _sql(dsn, "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")[0][0]
        _sql(dsn, "CREATE TABLE filler (id bigint, payload text)")
        while _sql(dsn, "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")[0][0] - start < gigabytes * (1 << 30):
            _sql(dsn, "INSERT INTO filler SELECT g, md5(random()::text) || md5(random()::text) || "
                      "md5(random()::text) FROM generate_series(1, 200000) g")
        _sql(dsn, "CREATE TABLE marker AS SELECT count(*) AS n FROM filler")
        wanted = _sql(dsn, "SELECT pg_walfile_name(pg_switch_wal())")[0][0]
        while (_sql(dsn, "SELECT last_archived_wal FROM pg_stat_archiver")[0][0] or "") < wanted:
            time.sleep(0.2)
        segments = int((_sql(dsn, "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")[0][0] - start) // SEGMENT)
        done.set()
        pusher.join()
        if failed:
            raise SystemExit(f"archiving failed: {failed[0]!r}")
        _give(work)  # the repository, readable by the server's account (its restore_command, the daemon)
        return policy, segments
    finally:
        server.stop()


def recover(work: Path, policy: str, how: str, prefetch: int, workers: int) -> dict[str, Any]:
    """One restore --latest into a new directory and its recovery to promotion, timed."""
    program, extra = _server_program()
    data = work / f"restored-{how}"
    daemon = None
    counts: dict[str, Any] = {}
    try:
        started = time.monotonic()
        restored = _cli(policy, "restore", "cluster", "--to-dir", str(data), "--latest",
                        *(["--with-wal"] if how == "with-wal" else []))
        restore_seconds = time.monotonic() - started
        if how != "with-wal":  # the restore_command as the server's account runs it here
            command = " ".join(shlex.quote(w) for w in ["env", *(f"{k}={v}" for k, v in extra.items()), *program,
                                                         "--policy", policy, "wal", "get", "--restore-command",
                                                         "--target", "cluster"]) + " %f %p"
            settings = data / "postgresql.auto.conf"
            lines = [line for line in settings.read_text().splitlines() if not line.startswith("restore_command")]
            settings.write_text("\n".join([*lines, f"restore_command = '{command}'"]) + "\n")
        if how == "daemon":
            daemon = start_daemon(program, policy, extra, work / "daemon.log", "--prefetch", str(prefetch),
                                  "--workers", str(workers))
        started = time.monotonic()
        server = ScratchCluster.persistent(data)
        try:
            server.start()
            wait_promoted(server)
            recovery_seconds = time.monotonic() - started
            rows = _sql(server.dsn(), "SELECT n FROM marker")[0][0]
        finally:
            server.stop()
    finally:
        if daemon is not None:
            counts = stop_daemon(daemon)
        shutil.rmtree(data, ignore_errors=True)
    return {"path": how, "restore_seconds": restore_seconds, "recovery_seconds": recovery_seconds,
            "total_seconds": restore_seconds + recovery_seconds, "rows": rows,
            "wal_files": restored.get("details", {}).get("wal_files"),
            "copy_wal_seconds": restored.get("seconds", {}).get("copy_wal"),
            "served": counts.get("served"), "served_prefetched": counts.get("served_prefetched")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=2.0)
    parser.add_argument("--prefetch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "regal_dagster")], check=True)
    base = Path(tempfile.mkdtemp(prefix="regal-bench-recovery-"))
    try:
        started = time.monotonic()
        policy, segments = archive_wal(base, args.gigabytes)
        print(f"{segments} segments of WAL written and archived after the base backup in "
              f"{time.monotonic() - started:.0f} s", flush=True)
        results = []
        for how in ("synchronous", "daemon", "with-wal"):
            results.append(recover(base, policy, how, args.prefetch, args.workers))
            print(json.dumps(results[-1]), flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rows_seen = {r["rows"] for r in results}
    if len(rows_seen) != 1:
        raise SystemExit(f"the three recoveries disagree on the newest rows: {results}")
    sync, sync_recovery = results[0]["total_seconds"], results[0]["recovery_seconds"]
    labels = {"synchronous": "`wal get`, synchronous (one engine start per segment)",
              "daemon": f"`wal get` through `wal daemon` (prefetch {args.prefetch}, {args.workers} workers)",
              "with-wal": "`restore --with-wal` (parallel fetch, then `cp`)"}
    print_table(f"recovery of {segments} WAL segments ({segments * 16} MB) after a base backup, restore --latest, "
                "to promotion (2 cores, local repository)",
                ["path", "restore s", "of which WAL fetch s", "recovery to promotion s", "total s",
                 "total: faster than synchronous", "recovery alone: faster", "served from the prefetch queue"],
                [[labels[r["path"]], f"{r['restore_seconds']:.1f}",
                  f"{r['copy_wal_seconds']:.1f}" if r["copy_wal_seconds"] is not None else "-",
                  f"{r['recovery_seconds']:.1f}", f"{r['total_seconds']:.1f}", f"{sync / r['total_seconds']:.1f}x",
                  f"{sync_recovery / r['recovery_seconds']:.1f}x",
                  f"{r['served_prefetched']}/{r['served']} ({r['served_prefetched'] / r['served']:.0%})"
                  if r["served"] else "-"] for r in results])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
