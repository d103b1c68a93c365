"""`regal-backup wal daemon`: the resident archiver and prefetcher behind PostgreSQL's archive_command (`wal push`)
and restore_command (`wal get`). A real PostgreSQL 18 archives through it under a pgbench write load while the
daemon and the server are killed with SIGKILL at seeded random moments: every WAL file PostgreSQL counts as
archived is in the repository and the base backup's WAL continuity holds. Without a daemon, `wal push` archives
synchronously and says so; a second daemon is refused naming the first; other content under an archived name is
refused as before; `wal get` serves most of a recovery's requests from its prefetch queue and never hands over a
segment that fails authentication.

Everything that PostgreSQL's commands share with the daemon (its socket lives in the private directory of the
account PostgreSQL runs as) runs as that account: as root, regal_pg with the system's Python of the same version
(this interpreter lives where regal_pg cannot read)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from regal_dagster.engine.postgresql.installations import pg_bin_dir
from regal_dagster.engine.postgresql.programs import server_account
from regal_dagster.engine.postgresql.server import ScratchCluster
from regal_dagster.engine.postgresql.watchdog import kill_postmaster, read_postmaster_pid

from .conftest import invoke_cli, wait_for
from .test_pitr import AS_ROOT, archiving_server

ROOT = Path(__file__).resolve().parents[1]


def _server_cli() -> tuple[list[str], dict[str, str]]:
    """How the server's account runs regal-backup: the program and the environment it adds."""
    extra = {"TMPDIR": "/tmp"}  # the daemon's socket directory: the same for the server and us
    if not AS_ROOT:
        return [sys.executable, "-m", "regal_dagster.cli"], {**extra, "PYTHONPATH": str(ROOT)}
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    interpreter = shutil.which(f"python{version}", path="/usr/bin:/usr/local/bin")
    if interpreter is None:
        pytest.skip("as root, the server account needs a system Python of this version to run regal-backup")
    return [interpreter, "-m", "regal_dagster.cli"], {**extra, "XDG_STATE_HOME": "/tmp/regal-test-state",
                                                       "PYTHONPATH": f"{ROOT}:{sysconfig.get_paths()['purelib']}"}


def _as_server(command: list[str], **kwargs: Any) -> dict[str, Any]:
    account = server_account()
    program, extra = _server_cli()
    options: dict[str, Any] = {"env": {"PATH": os.environ["PATH"], **extra}, "cwd": "/"}
    if account.is_other:
        options.update(user=account.uid, group=account.gid, extra_groups=[])
    return {**options, **kwargs, "args": [*program, *command]}


def server_cli(policy: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(**_as_server(["--policy", str(policy), *args]), capture_output=True, text=True,
                          timeout=timeout, check=False)


def start_daemon(policy: Path, log: Path, *extra: str) -> subprocess.Popen[str]:
    with log.open("a") as out:
        daemon = subprocess.Popen(**_as_server(["--policy", str(policy), "wal", "daemon", "--json", *extra]),
                                  stdout=subprocess.PIPE, stderr=out, text=True)
    wait_for(lambda: "listening on" in log.read_text() or daemon.poll() is not None, "the wal daemon to listen", 60)
    assert daemon.poll() is None, log.read_text()
    return daemon


def stop_daemon(daemon: subprocess.Popen[str]) -> dict[str, Any]:
    daemon.send_signal(signal.SIGTERM)
    out, _ = daemon.communicate(timeout=120)
    assert daemon.returncode == 0, out
    return json.loads(out)


def push_command(policy: Path) -> str:
    program, extra = _server_cli()
    return " ".join(["env", *(f"{k}={v}" for k, v in extra.items()), *program, "--policy", str(policy), "wal", "push",
                     "%p"])


def _sql(dsn: str, query: str) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cursor = conn.execute(query)
        return cursor.fetchall() if cursor.description else None


def _stored_names(policy: Path) -> set[str]:
    wal = policy.parent / "repository" / "wal" / "cluster"
    return {p.name.removesuffix(".json") for p in wal.iterdir() if p.name.endswith(".json")} if wal.is_dir() else set()


def _archived_by_server(data: Path, dsn: str) -> set[str]:
    """What PostgreSQL counts as archived: every `.done` in archive_status, and pg_stat_archiver's newest."""
    done = {p.name.removesuffix(".done") for p in (data / "pg_wal" / "archive_status").glob("*.done")}
    last = _sql(dsn, "SELECT last_archived_wal FROM pg_stat_archiver")[0][0]
    return done | ({last} if last else set())


def _switch_and_wait_archived(dsn: str, seconds: float = 180) -> str:
    """Something written, the segment holding it closed, and archived (pg_stat_archiver)."""
    _sql(dsn, "CREATE TABLE IF NOT EXISTS marker (at timestamptz); INSERT INTO marker VALUES (now())")
    wanted = _sql(dsn, "SELECT pg_walfile_name(pg_switch_wal())")[0][0]
    wait_for(lambda: (_sql(dsn, "SELECT last_archived_wal FROM pg_stat_archiver")[0][0] or "") >= wanted,
             f"{wanted} to be archived (pg_stat_archiver)", seconds, 0.5)
    return str(wanted)


@pytest.fixture
def daemon_server(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A PostgreSQL 18 server whose archive_command is `wal push` run as the server's account."""
    project_policy = tmp_path / "regal" / "regal_backup.yaml"
    server, policy, _spool = archiving_server(tmp_path, archive_command=push_command(project_policy))
    setup = {"server": server, "policy": policy, "dsn": server.dsn(), "logs": tmp_path / "logs", "base": tmp_path}
    try:
        assert policy == project_policy
        (tmp_path / "logs").mkdir()
        if server_account().is_other:
            server_account().chown_tree(tmp_path / "logs")
        yield setup
    finally:
        setup["server"].stop()


class SwitchingLoad:
    """pgbench writes (started again when a killed server ends it) and a thread closes a WAL segment every 0.2 s:
    many segments to archive, for `seconds`."""

    def __init__(self, setup: dict[str, Any], seconds: float):
        self.pgbench = str(pg_bin_dir() / "pgbench")
        subprocess.run([self.pgbench, "-i", "-s", "2", "-q", setup["dsn"]], check=True, capture_output=True,
                       timeout=300)
        self.setup, self.deadline = setup, time.monotonic() + seconds
        self.threads = [threading.Thread(target=self._bench, daemon=True),
                        threading.Thread(target=self._switch, daemon=True)]
        for thread in self.threads:
            thread.start()

    def _bench(self) -> None:
        while (left := self.deadline - time.monotonic()) > 1:
            subprocess.run([self.pgbench, "-n", "-c", "2", "-T", str(int(left)), self.setup["dsn"]],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            time.sleep(0.5)  # the server is being restarted

    def _switch(self) -> None:
        while time.monotonic() < self.deadline:
            time.sleep(0.2)
            try:
                _sql(self.setup["dsn"], "SELECT pg_switch_wal()")
            except psycopg.Error:
                continue  # the server is being killed and restarted

    def wait(self) -> None:
        for thread in self.threads:
            thread.join(timeout=600)


def _kill_9_and_restart_server(setup: dict[str, Any]) -> None:
    data = setup["server"].data_dir
    pid = read_postmaster_pid(data)
    assert pid is not None
    kill_postmaster(pid[0], data)
    wait_for(lambda: not Path(f"/proc/{pid[0]}").exists(), "the killed postmaster to be reaped", 60)
    setup["server"] = ScratchCluster.persistent(data).start()  # crash recovery, then archiving resumes
    setup["dsn"] = setup["server"].dsn()


def test_kill_9_of_daemon_and_server_never_loses_an_archived_segment(daemon_server: dict[str, Any]) -> None:
    setup, rng = daemon_server, random.Random(30)
    policy, dsn, data = setup["policy"], setup["dsn"], setup["server"].data_dir
    log = setup["logs"] / "daemon.log"
    daemon = start_daemon(policy, log)
    try:
        backup = server_cli(policy, "backup", "cluster", "--no-verify", "--json")
        assert backup.returncode == 0, backup.stderr
        backup_id = json.loads(backup.stdout)["backup_id"]
        load = SwitchingLoad(setup, seconds=24)
        kills = []
        for _ in range(4):
            time.sleep(rng.uniform(1.0, 4.0))
            if rng.random() < 0.5:
                daemon.kill()
                daemon.wait()
                kills.append("daemon")
                time.sleep(rng.uniform(0.0, 1.5))  # archive_command falls back to synchronous pushes meanwhile
                daemon = start_daemon(policy, log)
            else:
                _kill_9_and_restart_server(setup)
                kills.append("server")
        load.wait()
        dsn = setup["dsn"]
        _switch_and_wait_archived(dsn)
    finally:
        counts = stop_daemon(daemon) if daemon.poll() is None else {}
    archived = _archived_by_server(data, dsn)
    assert len(archived) >= 20, (kills, archived)
    assert archived - _stored_names(policy) == set(), kills  # acknowledged, so in the repository
    assert "archived (uploaded ahead)" in log.read_text()  # the look-ahead did its part
    assert counts["pushed"] >= 1
    verified = server_cli(policy, "verify", backup_id, "--all-wal", "--json")
    assert verified.returncode == 0, verified.stdout + verified.stderr  # WAL continuity from the base backup on


def test_without_a_daemon_wal_push_archives_synchronously_and_says_so(daemon_server: dict[str, Any]) -> None:
    setup = daemon_server
    wanted = _switch_and_wait_archived(setup["dsn"])
    assert wanted in _stored_names(setup["policy"])
    server_log = setup["server"].log_path.read_text()  # what archive_command prints goes to PostgreSQL's log
    assert "no `regal-backup wal daemon` runs" in server_log and "archiving synchronously" in server_log


def test_a_second_daemon_is_refused_naming_the_first(daemon_server: dict[str, Any]) -> None:
    setup = daemon_server
    first = start_daemon(setup["policy"], setup["logs"] / "first.log")
    try:
        second = server_cli(setup["policy"], "wal", "daemon", timeout=60)
        assert second.returncode == 1
        assert f"already runs (pid {first.pid})" in second.stderr
    finally:
        stop_daemon(first)


def test_the_daemon_refuses_other_content_under_an_archived_name(daemon_server: dict[str, Any]) -> None:
    setup = daemon_server
    daemon = start_daemon(setup["policy"], setup["logs"] / "daemon.log")
    try:
        wanted = _switch_and_wait_archived(setup["dsn"])
        forged = setup["logs"] / wanted
        forged.write_bytes(os.urandom(1 << 20))
        if server_account().is_other:
            server_account().chown(forged)
        refused = server_cli(setup["policy"], "wal", "push", str(forged))
        assert refused.returncode == 1, refused.stderr
        assert "already archived" in refused.stderr and "other content" in refused.stderr
        assert "synchronously" not in refused.stderr  # the daemon answered
    finally:
        stop_daemon(daemon)


def test_wal_get_serves_recovery_from_the_prefetch_queue_and_never_a_tampered_segment(
        daemon_server: dict[str, Any]) -> None:
    setup = daemon_server
    policy, dsn = setup["policy"], setup["dsn"]
    restore_dir = setup["logs"] / "pg_wal"
    restore_dir.mkdir()
    if server_account().is_other:
        server_account().chown(restore_dir)
    daemon = start_daemon(policy, setup["logs"] / "daemon.log", "--prefetch", "8")
    try:
        for _ in range(24):
            _sql(dsn, "CREATE TABLE IF NOT EXISTS t (x int); INSERT INTO t SELECT generate_series(1, 1000)")
            _sql(dsn, "SELECT pg_switch_wal()")
        _switch_and_wait_archived(dsn)
        segments = sorted(n for n in _stored_names(policy) if len(n) == 24)
        assert len(segments) >= 20
        tampered = segments[15]
        stored = policy.parent / "repository" / "wal" / "cluster" / tampered
        body = bytearray(stored.read_bytes())
        body[len(body) // 2] ^= 1
        stored.write_bytes(bytes(body))
        served = []
        for name in segments[:15]:  # what recovery asks for, one segment after the other
            got = server_cli(policy, "wal", "get", "--restore-command", name, str(restore_dir / "RECOVERYXLOG"),
                             "--json")
            assert got.returncode == 0, got.stderr
            served.append(json.loads(got.stdout)["prefetched"])
            time.sleep(0.3)  # PostgreSQL replays the segment meanwhile
        refused = server_cli(policy, "wal", "get", "--restore-command", tampered, str(restore_dir / "RECOVERYXLOG"))
    finally:
        counts = stop_daemon(daemon)
    assert sum(served) >= 12, served  # all but the first few from the queue
    assert counts["served_prefetched"] == sum(served)
    assert refused.returncode == 126, refused.stderr  # recovery stops rather than replay or skip it
    assert "synchronously" not in refused.stderr
    assert "fails authentication" in refused.stderr or "authentic" in refused.stderr, refused.stderr
    # the last file handed over is the segment before the tampered one, whole: nothing of the tampered one
    assert (restore_dir / "RECOVERYXLOG").stat().st_size == 16 << 20
    assert not [p for p in restore_dir.iterdir() if p.name != "RECOVERYXLOG"]


def test_a_recovery_with_restore_command_wal_get_is_served_from_the_prefetch_queue(
        daemon_server: dict[str, Any]) -> None:
    """A restored server recovering through `restore_command = wal get`: most of its requests are served from
    the daemon's prefetch queue, and it reaches the newest row."""
    setup = daemon_server
    policy, dsn = setup["policy"], setup["dsn"]
    daemon = start_daemon(policy, setup["logs"] / "daemon.log", "--prefetch", "8")
    restored = None
    try:
        backup = server_cli(policy, "backup", "cluster", "--no-verify", "--json")
        assert backup.returncode == 0, backup.stderr
        _sql(dsn, "CREATE TABLE rows_written (n int)")
        for n in range(30):
            _sql(dsn, f"INSERT INTO rows_written VALUES ({n}); SELECT pg_switch_wal()")
        _switch_and_wait_archived(dsn)
        data = setup["logs"] / "restored"
        done = invoke_cli(["--policy", str(policy), "restore", "cluster", "--to-dir", str(data), "--latest"])
        assert done.returncode == 0, done.stderr
        program, extra = _server_cli()  # the restore_command as the server's account runs it here
        command = " ".join(["env", *(f"{k}={v}" for k, v in extra.items()), *program, "--policy", str(policy), "wal",
                            "get", "--restore-command", "%f", "%p"])
        settings = data / "postgresql.auto.conf"
        lines = [line for line in settings.read_text().splitlines() if not line.startswith("restore_command")]
        settings.write_text("\n".join([*lines, f"restore_command = '{command}'"]) + "\n")
        restored = ScratchCluster.persistent(data).start()
        wait_for(lambda: not _sql(restored.dsn(), "SELECT pg_is_in_recovery()")[0][0], "the promotion", 300, 0.5)
        assert _sql(restored.dsn(), "SELECT count(*) FROM rows_written")[0][0] == 30
    finally:
        if restored is not None:
            restored.stop()
        counts = stop_daemon(daemon)
    assert counts["served"] >= 30, counts
    assert counts["served_prefetched"] >= 0.8 * counts["served"], counts  # all but the first and a few
