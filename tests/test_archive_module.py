"""archive_module/ (regal_archive): PostgreSQL 15's `archive_library` that hands each WAL file to `regal-backup wal
daemon` over its UNIX socket instead of starting `wal push` per segment. Built with PGXS for the machine's
PostgreSQL 15 (Debian's postgresql-server-dev-15, which .ci/run installs when missing); the test skips, saying
why, when it cannot be built here. A real PostgreSQL 15 archives through it: every segment it counts as archived is
in the repository; with the daemon stopped it reports failure (counted by pg_stat_archiver, said in its log) and
the segment waits in pg_wal, until the fallback command (`wal push`, synchronous) archives it or the daemon is
back."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from regal_dagster.engine.postgresql.server import ScratchCluster

from .conftest import wait_for
from .test_pitr import CLI, _give_to_server_account, _run, _sql
from .test_wal_daemon import push_command, start_daemon, stop_daemon

ROOT = Path(__file__).resolve().parents[1]
PG15 = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture(scope="module")
def archive_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """regal_archive.so, built from archive_module/ in a scratch directory the server's account can read."""
    if not (PG15 / "postgres").is_file():
        pytest.skip(f"no PostgreSQL 15 server in {PG15}: the archive module is built and tested against it")
    pgxs = subprocess.run([str(PG15 / "pg_config"), "--pgxs"], capture_output=True, text=True, check=False)
    if pgxs.returncode != 0 or not Path(pgxs.stdout.strip()).is_file():
        pytest.skip("PGXS for PostgreSQL 15 is not installed (apt-get install postgresql-server-dev-15; .ci/run "
                    "does it): the archive module cannot be built here")
    build = tmp_path_factory.mktemp("regal-archive")
    for name in ("Makefile", "regal_archive.c"):
        shutil.copyfile(ROOT / "archive_module" / name, build / name)
    made = subprocess.run(["make", "-C", str(build), f"PG_CONFIG={PG15 / 'pg_config'}"], capture_output=True,
                          text=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"the archive module does not build here: {(made.stderr or made.stdout)[-800:]}")
    _give_to_server_account(build)
    return build / "regal_archive.so"


def _archived(dsn: str) -> tuple[str, int, int]:
    last, archived, failed = _sql(dsn, "SELECT coalesce(last_archived_wal, ''), archived_count, failed_count "
                                       "FROM pg_stat_archiver")[0]
    return last, archived, failed


def test_postgresql_15_archives_through_the_daemon_socket_and_never_without_it(archive_module: Path,
                                                                              tmp_path: Path) -> None:
    server = ScratchCluster.persistent(tmp_path / "pgdata", bin_dir=PG15).start()
    daemon: Any = None
    try:
        made = _run([*CLI, "init", str(tmp_path / "regal"), "--cluster-dsn", server.dsn(), "--no-audit", "--json"])
        policy = Path(re.search(r'"policy": "([^"]+)"', made.stdout).group(1))  # type: ignore[union-attr]
        _give_to_server_account(tmp_path / "regal")
        logs = tmp_path / "logs"
        logs.mkdir()
        _give_to_server_account(logs)
        daemon = start_daemon(policy, logs / "daemon.log")
        socket = re.search(r"listening on (\S+):", (logs / "daemon.log").read_text()).group(1)  # type: ignore[union-attr]
        _sql(server.dsn(), "ALTER SYSTEM SET archive_mode = on")
        _sql(server.dsn(), f"ALTER SYSTEM SET archive_library = '{archive_module}'")
        server.stop()  # the module's settings in postgresql.conf: only the archiver loads it, ALTER SYSTEM refuses them
        with (tmp_path / "pgdata" / "postgresql.conf").open("a") as conf:
            conf.write(f"regal_archive.socket = '{socket}'\nregal_archive.log_latency = on\n")
        server.start()
        dsn = server.dsn()
        _sql(dsn, "CREATE TABLE t (x int)")
        for _ in range(4):
            _sql(dsn, "INSERT INTO t SELECT generate_series(1, 1000)")
            wanted = _sql(dsn, "SELECT pg_walfile_name(pg_switch_wal())")[0][0]
        wait_for(lambda: _archived(dsn)[0] >= wanted, f"{wanted} archived through the daemon", 60, 0.1)
        wal_dir = policy.parent / "repository" / "wal" / "cluster"
        stored = {p.name for p in wal_dir.iterdir() if len(p.name) == 24}
        assert wanted in stored and _archived(dsn)[2] == 0
        log = server.log_tail(200)
        latencies = [float(ms) for ms in re.findall(r"regal_archive: \w+ archived in ([0-9.]+) ms", log)]
        assert len(latencies) >= 4, log
        counts = stop_daemon(daemon)
        daemon = None
        assert counts["pushed"] >= 4, counts

        _sql(dsn, "INSERT INTO t SELECT generate_series(1, 1000)")
        waiting = _sql(dsn, "SELECT pg_walfile_name(pg_switch_wal())")[0][0]
        wait_for(lambda: _archived(dsn)[2] > 0, "a failed archive call without the daemon", 60, 0.1)
        assert _archived(dsn)[0] < waiting and not (wal_dir / waiting).exists()
        assert (tmp_path / "pgdata" / "pg_wal" / "archive_status" / f"{waiting}.ready").exists()
        assert "no wal daemon answered" in server.log_tail(200) and "is not archived yet" in server.log_tail(200)

        with (tmp_path / "pgdata" / "postgresql.conf").open("a") as conf:  # archived synchronously without it
            conf.write(f"regal_archive.fallback_command = '{push_command(policy)}'\n")
        _sql(dsn, "SELECT pg_reload_conf()")
        time.sleep(0.5)
        _sql(dsn, "INSERT INTO t VALUES (1); SELECT pg_switch_wal()")  # a new segment wakes the archiver at once
        wait_for(lambda: _archived(dsn)[0] >= waiting, f"{waiting} archived by the fallback command", 120, 0.2)
        assert (wal_dir / waiting).exists() and (wal_dir / f"{waiting}.json").exists()
        assert "with regal_archive.fallback_command" in server.log_tail(400)
        assert "archiving synchronously in this process" in server.log_tail(400)  # what `wal push` says

        daemon = start_daemon(policy, logs / "daemon.log")
        _sql(dsn, "INSERT INTO t VALUES (2)")
        after = _sql(dsn, "SELECT pg_walfile_name(pg_switch_wal())")[0][0]
        wait_for(lambda: _archived(dsn)[0] >= after, f"{after} archived once the daemon is back", 120, 0.2)
        assert (wal_dir / after).exists() and stop_daemon(daemon)["pushed"] >= 1
        daemon = None
    finally:
        if daemon is not None:
            stop_daemon(daemon)
        server.stop()
