"""The WAL stream under real conditions: a pgbench load, server restarts (fast and immediate) while
`wal stream` runs, and restores compared exactly with what the server held at recorded positions."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from regal_dagster.engine.postgresql import server as pg_server
from regal_dagster.engine.postgresql.server import ScratchCluster

from .test_pitr import AS_ROOT, CLI, _ok, _run, _sql, _start_stream, _wait_for, cli

PGBENCH_FACTS = ("SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT count(*) FROM pgbench_history), "
                 "(SELECT sum(bbalance) FROM pgbench_branches)")


def _pgbench(dsn: str, *args: str) -> None:
    done = subprocess.run([str(pg_server.pg_bin_dir() / "pgbench"), *args, dsn], capture_output=True, text=True,
                          check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def _facts(dsn: str) -> tuple[Any, ...]:
    return tuple(_sql(dsn, PGBENCH_FACTS)[0])


def _stored_up_to(policy: Path, lsn: str) -> bool:
    """The repository holds the server's WAL up to `lsn` (in a complete segment or the newest snapshot)."""
    from regal_dagster.engine.wal import parse_lsn

    status = json.loads(cli(policy, "wal", "status", "--json").stdout)
    return bool(status.get("newest_lsn")) and parse_lsn(status["newest_lsn"]) >= parse_lsn(lsn)


def _restore_facts(policy: Path, base: Path, name: str, *how: str) -> tuple[Any, ...]:
    """Restore, start PostgreSQL on it, wait for the promotion, read the pgbench facts."""
    import shutil

    data = base / f"restored-{name}"
    _ok(cli(policy, "restore", "cluster", "--to-dir", str(data), *how, *(["--with-wal"] if AS_ROOT else [])))
    restored = ScratchCluster.persistent(data).start()
    try:
        _wait_for(lambda: not _sql(restored.dsn(), "SELECT pg_is_in_recovery()")[0][0], "the promotion", 120)
        return _facts(restored.dsn())
    finally:
        restored.stop()
        shutil.rmtree(data, ignore_errors=True)


def _stop_server(server: ScratchCluster, mode: str) -> None:
    """pg_ctl stop -m MODE on the test's server (immediate: a crash, recovered at the next start)."""
    assert server.data_dir is not None
    done = pg_server._run_pg("pg_ctl", ["-D", str(server.data_dir), "-m", mode, "-w", "stop"],
                             pg_server._server_account(), server.data_dir.parent, timeout=60)
    assert done.returncode == 0, done.stderr
    server.port = server.pid = None
    server._started_by_us = False


@pytest.fixture
def streamed_server(tmp_path: Path) -> Iterator[dict[str, Any]]:
    server = ScratchCluster.persistent(tmp_path / "pgdata").start()
    stream = None
    try:
        made = json.loads(_run([*CLI, "init", str(tmp_path / "regal"), "--cluster-dsn", server.dsn(), "--no-audit",
                                "--json"]).stdout)
        policy = Path(made["policy"])
        log = tmp_path / "stream.log"
        stream = _start_stream(policy, log)
        yield {"server": server, "policy": policy, "log": log, "stream": stream, "base": tmp_path}
    finally:
        if stream is not None and stream.poll() is None:
            stream.terminate()
            try:
                stream.wait(timeout=30)
            except subprocess.TimeoutExpired:
                stream.kill()
                stream.wait()
        server.stop()


def test_pgbench_through_server_restarts_restores_exactly(streamed_server: dict[str, Any]) -> None:
    """pgbench runs while `wal stream` receives; the server is restarted (fast) and crashed (immediate) in between;
    the stream reconnects by itself, leaves no gap, and restores to a position recorded between the runs and
    to the newest WAL give exactly the balances and history rows the server had there."""
    server, policy, log = streamed_server["server"], streamed_server["policy"], streamed_server["log"]
    dsn = server.dsn()
    _pgbench(dsn, "-i", "-s", "1", "-q")
    backup_id = json.loads(_ok(cli(policy, "backup", "cluster", "--json")).stdout)["backup_id"]
    _pgbench(dsn, "-c", "4", "-j", "2", "-T", "3", "-n")
    at_lsn = _sql(dsn, "SELECT pg_current_wal_lsn()::text")[0][0]
    facts_at_lsn = _facts(dsn)
    assert facts_at_lsn[1] > 0

    _stop_server(server, "fast")  # pg_ctl restart -m fast
    server.start()
    _pgbench(dsn, "-c", "4", "-j", "2", "-T", "2", "-n")
    _wait_for(lambda: log.read_text().count("streaming WAL") == 2, "the stream to reconnect")
    _wait_for(lambda: _sql(dsn, "SELECT active FROM pg_replication_slots") == [(True,)], "the slot to be held")
    _stop_server(server, "immediate")  # a crash: the next start recovers
    server.start()
    _pgbench(dsn, "-c", "4", "-j", "2", "-T", "2", "-n")
    latest = _sql(dsn, "SELECT pg_current_wal_lsn()::text")[0][0]
    facts_latest = _facts(dsn)
    assert facts_latest[1] > facts_at_lsn[1]
    _wait_for(lambda: _stored_up_to(policy, latest), f"the WAL up to {latest} to be stored", 120)
    assert streamed_server["stream"].poll() is None, log.read_text()  # it reconnected, it did not exit
    text = log.read_text()
    assert text.count("pg_receivewal stopped") >= 2 and "restarting in" in text, text
    assert "error: " in text.split("pg_receivewal stopped", 1)[1].splitlines()[0]  # its reason, in its words

    status = json.loads(_ok(cli(policy, "wal", "status", "--json")).stdout)
    assert status["gaps"] == []
    assert _restore_facts(policy, streamed_server["base"], "lsn", "--to-lsn", at_lsn) == facts_at_lsn
    assert _restore_facts(policy, streamed_server["base"], "latest", "--latest") == facts_latest
    verified = json.loads(_ok(cli(policy, "verify", backup_id, "--json")).stdout)
    continuity = {c["name"]: c for c in verified["checks"]}["wal_continuity"]
    assert continuity["passed"], continuity
