"""The WAL stream under real conditions: a pgbench load, server restarts (fast and immediate) while
`wal stream` runs, and restores compared exactly with what the server held at recorded positions."""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from regal_dagster.engine.postgresql.installations import pg_bin_dir
from regal_dagster.engine.postgresql.server import ScratchCluster

from .old_formats import manifest_body
from .test_pitr import AS_ROOT, CLI, _ok, _run, _sql, _start_stream, _wait_for, _wait_promoted, cli

KILL_TRIALS = 3
PGBENCH_FACTS = ("SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT count(*) FROM pgbench_history), "
                 "(SELECT sum(bbalance) FROM pgbench_branches)")


def _pgbench(dsn: str, *args: str) -> None:
    done = subprocess.run([str(pg_bin_dir() / "pgbench"), *args, dsn], capture_output=True, text=True,
                          check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def _facts(dsn: str) -> tuple[Any, ...]:
    return tuple(_sql(dsn, PGBENCH_FACTS)[0])


def _stored_up_to(policy: Path, lsn: str) -> bool:
    """The repository holds the server's WAL up to `lsn` (in a complete segment or the newest snapshot)."""
    from regal_dagster.engine.sources.postgres_cluster.wal import parse_lsn

    status = json.loads(cli(policy, "wal", "status", "--json").stdout)
    return bool(status.get("newest_lsn")) and parse_lsn(status["newest_lsn"]) >= parse_lsn(lsn)


def _restore_facts(policy: Path, base: Path, name: str, *how: str) -> tuple[Any, ...]:
    """Restore, start PostgreSQL on it, wait for the promotion, read the pgbench facts."""
    import shutil

    data = base / f"restored-{name}"
    _ok(cli(policy, "restore", "cluster", "--to-dir", str(data), *how, *(["--with-wal"] if AS_ROOT else [])))
    restored = ScratchCluster.persistent(data).start()
    try:
        _wait_promoted(restored)
        return _facts(restored.dsn())
    finally:
        restored.stop()
        shutil.rmtree(data, ignore_errors=True)


def _stop_server(server: ScratchCluster, mode: str) -> None:
    """pg_ctl stop -m MODE on the test's server (immediate: a crash, recovered at the next start)."""
    done = server.halt(mode)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def streamed_server(tmp_path: Path) -> Iterator[dict[str, Any]]:
    server = ScratchCluster.persistent(tmp_path / "pgdata").start()
    state: dict[str, Any] = {"server": server, "base": tmp_path, "stream": None}
    try:
        made = json.loads(_run([*CLI, "init", str(tmp_path / "regal"), "--cluster-dsn", server.dsn(), "--no-audit",
                                "--json"]).stdout)
        state["policy"] = policy = Path(made["policy"])
        state["log"] = log = tmp_path / "stream.log"
        state["stream"] = _start_stream(policy, log)
        yield state
    finally:
        stream = state["stream"]  # the test may have started another one in its place
        if stream is not None and stream.poll() is None:
            stream.terminate()
            try:
                stream.wait(timeout=30)
            except subprocess.TimeoutExpired:
                stream.kill()
                stream.wait()
        server.stop()


def test_pgbench_through_server_restarts_restores_exactly(streamed_server: dict[str, Any]) -> None:
    """pgbench runs while `wal stream` receives; the server is restarted (fast) and crashed (immediate) in between,
    the stream is killed (-9) and started again under load; the stream reconnects by itself, leaves no gap, and
    restores to a position recorded between the runs and
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
    _wait_for(lambda: log.read_text().count("streaming WAL") >= 2, "the stream to reconnect")
    _wait_for(lambda: _sql(dsn, "SELECT active FROM pg_replication_slots") == [(True,)], "the slot to be held")
    _stop_server(server, "immediate")  # a crash: the next start recovers
    server.start()
    _pgbench(dsn, "-c", "4", "-j", "2", "-T", "2", "-n")
    _wait_for(lambda: log.read_text().count("streaming WAL") >= 3, "the stream to reconnect after the crash")
    _wait_for(lambda: _sql(dsn, "SELECT active FROM pg_replication_slots") == [(True,)], "the slot to be held")
    assert streamed_server["stream"].poll() is None, log.read_text()  # it reconnected, it did not exit
    text = log.read_text()
    assert text.count("pg_receivewal stopped") >= 2 and "restarting in" in text, text
    assert "error: " in text.split("pg_receivewal stopped", 1)[1].splitlines()[0]  # its reason, in its words

    # kill -9 of the stream at assorted moments while pgbench writes (snapshots every second: some kills land
    # while one is being stored), each time started again as systemd would; the moments are drawn from a
    # seeded generator, so a failure is replayed with the same kill times
    rng = random.Random(20261130)
    bench = subprocess.Popen([str(pg_bin_dir() / "pgbench"), "-c", "4", "-j", "2", "-T", "5", "-n", dsn],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for trial in range(KILL_TRIALS):
        time.sleep(rng.uniform(0.5, 1.5))
        streamed_server["stream"].kill()
        streamed_server["stream"].wait()
        streamed_server["stream"] = _start_stream(policy, streamed_server["base"] / f"stream-after-kill-{trial}.log")
    assert bench.wait(timeout=120) == 0, bench.stderr.read() if bench.stderr else ""
    latest = _sql(dsn, "SELECT pg_current_wal_lsn()::text")[0][0]
    facts_latest = _facts(dsn)
    assert facts_latest[1] > facts_at_lsn[1]
    _wait_for(lambda: _stored_up_to(policy, latest), f"the WAL up to {latest} to be stored", 120)

    status = json.loads(_ok(cli(policy, "wal", "status", "--json")).stdout)
    assert status["gaps"] == []
    assert _restore_facts(policy, streamed_server["base"], "lsn", "--to-lsn", at_lsn) == facts_at_lsn
    assert _restore_facts(policy, streamed_server["base"], "latest", "--latest") == facts_latest
    verified = json.loads(_ok(cli(policy, "verify", backup_id, "--json")).stdout)
    continuity = {c["name"]: c for c in verified["checks"]}["wal_continuity"]
    assert continuity["passed"], continuity


SYSTEM_PG15 = Path("/usr/lib/postgresql/15/bin")


@pytest.mark.skipif(not (SYSTEM_PG15 / "postgres").exists(), reason="the machine's PostgreSQL 15 binaries are absent "
                    f"({SYSTEM_PG15}): the private PostgreSQL 15 server cannot be started")
def test_a_private_postgresql_15_server_streams_and_restores_to_a_time(tmp_path: Path) -> None:
    """The machine's PostgreSQL 15 (its running server refuses replication, so a private one from its binaries):
    base backup and WAL stream with its own 15 tools, a restore to a time started with the 15 binaries, exact rows."""
    import signal

    server = ScratchCluster.persistent(tmp_path / "pg15", bin_dir=SYSTEM_PG15).start()
    stream = None
    try:
        dsn = server.dsn()
        assert _sql(dsn, "SELECT current_setting('server_version_num')::int / 10000") == [(15,)]
        made = json.loads(_run([*CLI, "init", str(tmp_path / "regal"), "--cluster-dsn", dsn, "--no-audit",
                                "--json"]).stdout)
        policy = Path(made["policy"])
        log = tmp_path / "stream.log"
        stream = _start_stream(policy, log)
        assert "pg_receivewal 15." in log.read_text()
        _sql(dsn, "CREATE TABLE payments (id int PRIMARY KEY, note text)")
        _sql(dsn, "INSERT INTO payments VALUES (1, 'before the base backup')")
        backup_id = json.loads(_ok(cli(policy, "backup", "cluster", "--json")).stdout)["backup_id"]
        _sql(dsn, "INSERT INTO payments VALUES (2, 'before the time')")
        time.sleep(0.3)
        at_time = _sql(dsn, "SELECT clock_timestamp()")[0][0]
        time.sleep(0.3)
        _sql(dsn, "INSERT INTO payments VALUES (3, 'after the time')")
        latest = _sql(dsn, "SELECT pg_current_wal_lsn()::text")[0][0]
        _wait_for(lambda: _stored_up_to(policy, latest), f"the WAL up to {latest} to be stored")
        stream.send_signal(signal.SIGTERM)
        assert stream.wait(timeout=30) == 0, log.read_text()
        stream = None

        manifest = manifest_body(policy, "cluster", backup_id)
        assert manifest["tool_versions"]["pg_basebackup"].startswith("15")
        verified = json.loads(_ok(cli(policy, "verify", backup_id, "--json")).stdout)
        assert all(c["passed"] for c in verified["checks"]), verified["checks"]
        data = tmp_path / "restored"
        _ok(cli(policy, "restore", "cluster", "--to-dir", str(data), "--to-time", at_time.isoformat(),
                *(["--with-wal"] if AS_ROOT else [])))
        restored = ScratchCluster.persistent(data, bin_dir=SYSTEM_PG15).start()
        try:
            _wait_promoted(restored)
            assert _sql(restored.dsn(), "SELECT id, note FROM payments ORDER BY id") == [
                (1, "before the base backup"), (2, "before the time")]
            assert _sql(restored.dsn(), "SELECT current_setting('server_version_num')::int / 10000") == [(15,)]
        finally:
            restored.stop()
    finally:
        if stream is not None and stream.poll() is None:
            stream.kill()
            stream.wait()
        server.stop()


def test_a_base_backup_of_a_server_whose_archive_command_fails_stops_with_the_reason(tmp_path: Path) -> None:
    """pg_basebackup -X none waits until the server archived the backup's WAL: with a failing archive_command, for
    ever. The backup is refused up front when the archiver is failing already, and stopped (nothing kept) when it
    starts failing while the backup waits; the next backup, once archiving works, succeeds."""
    from regal_dagster.engine.sources.postgres_cluster.archiver import FAILING_FOR_SECONDS

    server = ScratchCluster.persistent(tmp_path / "pgdata").start()
    try:
        dsn = server.dsn()
        _sql(dsn, "ALTER SYSTEM SET archive_mode = 'on'")
        _sql(dsn, "ALTER SYSTEM SET archive_command = 'false'")
        _stop_server(server, "fast")
        server.start()
        made = json.loads(_run([*CLI, "init", str(tmp_path / "regal"), "--cluster-dsn", server.dsn(), "--no-audit",
                                "--json"]).stdout)
        policy = Path(made["policy"])
        started = time.monotonic()
        done = cli(policy, "backup", "cluster")
        assert done.returncode == 1 and "archive_command fails" in done.stderr, done.stderr
        assert "while the base backup waited" in done.stderr and time.monotonic() - started < FAILING_FOR_SECONDS + 60
        assert json.loads(_ok(cli(policy, "list", "cluster", "--json")).stdout)["backups"] == []

        done = cli(policy, "backup", "cluster")  # failing already: refused at once
        assert done.returncode == 1 and "a base backup would wait forever" in done.stderr, done.stderr
        assert "archive_command" in done.stderr.split("what to do:")[1]

        _sql(dsn, "ALTER SYSTEM SET archive_command = 'true'")
        _sql(dsn, "SELECT pg_reload_conf()")
        _wait_for(lambda: _sql(dsn, "SELECT last_archived_wal IS NOT NULL FROM pg_stat_archiver") == [(True,)],
                  "the archiver to catch up", 90)
        _ok(cli(policy, "backup", "cluster", "--no-verify"))  # archive_command "true" stores nothing: checked never
    finally:
        server.stop()


class _DiesBeforeTheRecord:
    """The repository of a stream killed between a snapshot's object and its record (the record never lands)."""

    def __init__(self, repo: Any):
        self._repo = repo

    def __getattr__(self, name: str) -> Any:
        return getattr(self._repo, name)

    def put_bytes(self, key: str, data: bytes, retain_until: Any = None) -> None:
        raise KeyboardInterrupt(f"killed before {key} was written")


def test_a_stream_killed_between_a_snapshot_and_its_record_leaves_the_previous_snapshot(tmp_path: Path) -> None:
    """Each snapshot of the segment being received is a new object, switched to by its record: a stream that dies
    after storing the object leaves the previous snapshot readable (not a record over other bytes), and the next
    snapshot removes the orphan."""
    from regal_dagster.engine.crypto import load_keyring
    from regal_dagster.engine.layout import wal_prefix
    from regal_dagster.engine.policy import load_policy
    from regal_dagster.engine.sources.postgres_cluster.wal import fetch_wal, push_wal
    from regal_dagster.engine.storage import open_repository

    made = json.loads(_run([*CLI, "init", str(tmp_path / "regal"), "--cluster-dsn",
                            "postgresql://replicator@db.invalid/postgres", "--no-audit", "--json"]).stdout)
    policy = load_policy(Path(made["policy"]))
    repo, keyring = open_repository(policy), load_keyring(policy)
    segment = "000000010000000000000007"
    receiving = tmp_path / (segment + ".partial")
    first = b"first WAL bytes" + b"\0" * 1000
    receiving.write_bytes(first)
    push_wal(policy, repo, keyring, "cluster", receiving, name=segment, partial=True, segment_size=len(first))
    second = b"first WAL bytes, and more" + b"\0" * 990
    receiving.write_bytes(second)
    with pytest.raises(KeyboardInterrupt):
        push_wal(policy, _DiesBeforeTheRecord(repo), keyring, "cluster", receiving, name=segment, partial=True,
                 segment_size=len(second))
    snapshots = sorted(o.key for o in repo.list(wal_prefix("cluster") + "partial/") if not o.key.endswith(".json"))
    assert len(snapshots) == 2  # the killed run's object is there, unused
    found = fetch_wal(repo, keyring, "cluster", segment, tmp_path / "served")
    assert found.partial and (tmp_path / "served").read_bytes() == first  # the previous snapshot, whole

    push_wal(policy, repo, keyring, "cluster", receiving, name=segment, partial=True, segment_size=len(second))
    assert len([o for o in repo.list(wal_prefix("cluster") + "partial/") if not o.key.endswith(".json")]) == 1
    fetch_wal(repo, keyring, "cluster", segment, tmp_path / "served")
    assert (tmp_path / "served").read_bytes() == second


@pytest.fixture
def small_spool(tmp_path: Path) -> Iterator[Path]:
    """A 40 MiB filesystem of its own (tmpfs) for the stream's working directory."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root, and this run is not root")
    mount = tmp_path / "spool"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m,mode=0755", "tmpfs", str(mount)],
                             capture_output=True, text=True, check=False)
    assert mounted.returncode == 0, f"root could not mount a tmpfs: {mounted.stderr.strip()}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_spool_disk_stops_the_receiver_clearly_and_the_stream_resumes_without_loss(
        streamed_server: dict[str, Any], small_spool: Path) -> None:
    """The stream's working directory (a small disk of its own) fills up: pg_receivewal stops with its own words
    (no space left), the slot keeps the server's WAL, and once there is room again the stream resumes; nothing
    is missing and a restore to the newest WAL has every row."""
    import signal

    server, policy, log = streamed_server["server"], streamed_server["policy"], streamed_server["log"]
    streamed_server["stream"].send_signal(signal.SIGTERM)  # the fixture's stream, on the ordinary disk
    assert streamed_server["stream"].wait(timeout=30) == 0
    dsn = server.dsn()
    _sql(dsn, "CREATE TABLE payments (id int PRIMARY KEY, note text)")
    _sql(dsn, "INSERT INTO payments VALUES (1, 'before the base backup')")
    _ok(cli(policy, "backup", "cluster", "--no-verify"))  # no stream yet: its WAL comes later
    ballast = small_spool / "ballast"
    ballast.write_bytes(b"\0" * (30 * 1024 * 1024))  # no room for the 16 MiB segment pg_receivewal opens
    streamed_server["stream"] = stream = subprocess.Popen(
        [*CLI, "--policy", str(policy), "wal", "stream", "cluster", "--snapshot-seconds", "1", "--work-dir",
         str(small_spool / "cluster")], stdout=subprocess.DEVNULL, stderr=log.open("a"))
    _wait_for(lambda: "No space left on device" in log.read_text(), "the receiver to stop on the full disk")
    _sql(dsn, "INSERT INTO payments VALUES (2, 'while the spool disk is full')")
    closed = _sql(dsn, "SELECT pg_walfile_name(pg_switch_wal())")[0][0]
    _sql(dsn, "INSERT INTO payments VALUES (3, 'while the spool disk is full, next segment')")
    assert stream.poll() is None  # it waits and retries
    ballast.unlink()
    _wait_for(lambda: (policy.parent / "repository" / "wal" / "cluster" / (closed + ".json")).exists(),
              f"{closed} to be stored once there is room")
    latest = _sql(dsn, "SELECT pg_current_wal_lsn()::text")[0][0]
    _wait_for(lambda: _stored_up_to(policy, latest), f"the WAL up to {latest} to be stored")
    text = log.read_text()
    assert "pg_receivewal stopped (exit code 1: " in text and "No space left on device" in text.split(
        "pg_receivewal stopped (exit code 1: ", 1)[1].splitlines()[0]
    assert "completed with zeros" in text  # the segment file the full disk cut short (else refused for ever)
    stream.send_signal(signal.SIGTERM)
    assert stream.wait(timeout=30) == 0
    status = json.loads(_ok(cli(policy, "wal", "status", "--json")).stdout)
    assert status["gaps"] == []
    data = streamed_server["base"] / "restored"
    _ok(cli(policy, "restore", "cluster", "--to-dir", str(data), "--latest", *(["--with-wal"] if AS_ROOT else [])))
    restored = ScratchCluster.persistent(data).start()
    try:
        _wait_promoted(restored)
        assert [r[0] for r in _sql(restored.dsn(), "SELECT id FROM payments ORDER BY id")] == [1, 2, 3]
    finally:
        restored.stop()


def test_a_slot_dropped_while_the_receiver_was_away_is_created_again(streamed_server: dict[str, Any]) -> None:
    """The receiver loses its connection and, before it is back, someone drops the slot: the stream creates it
    again (instead of failing for ever on a missing slot), says so, and goes on storing with no gap."""
    server, policy, log = streamed_server["server"], streamed_server["policy"], streamed_server["log"]
    dsn = server.dsn()
    _sql(dsn, "CREATE TABLE payments (id int PRIMARY KEY)")
    _ok(cli(policy, "backup", "cluster"))
    _sql(dsn, "INSERT INTO payments VALUES (1)")
    _sql(dsn, "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE active_pid IS NOT NULL")
    _wait_for(lambda: _sql(dsn, "SELECT active FROM pg_replication_slots") == [(False,)], "the receiver to be gone")
    _sql(dsn, "SELECT pg_drop_replication_slot('regal_backup')")
    _sql(dsn, "INSERT INTO payments VALUES (2)")
    _wait_for(lambda: "was gone: created it again" in log.read_text(), "the slot to be created again")
    _wait_for(lambda: _sql(dsn, "SELECT active FROM pg_replication_slots") == [(True,)], "the slot to be held")
    closed = _sql(dsn, "SELECT pg_walfile_name(pg_switch_wal())")[0][0]
    _wait_for(lambda: (policy.parent / "repository" / "wal" / "cluster" / (closed + ".json")).exists(),
              f"{closed} to be stored")
    assert json.loads(_ok(cli(policy, "wal", "status", "--json")).stdout)["gaps"] == []
    assert streamed_server["stream"].poll() is None


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_killed_stream_takes_its_receiver_with_it_even_when_the_server_hangs(
        streamed_server: dict[str, Any]) -> None:
    """kill -9 of `wal stream` while the server does not answer (its walsender stopped: a hung server or network):
    pg_receivewal, told to stop, would wait for the server's answer for ever, an orphan holding the slot. Its
    watchdog kills it within seconds; the next `wal stream` streams and stores again. Failed before: the receiver
    outlived the stream."""
    server, policy = streamed_server["server"], streamed_server["policy"]
    dsn = server.dsn()
    stream = streamed_server["stream"]
    (receiver,) = [p for p in psutil.Process(stream.pid).children() if p.name() == "pg_receivewal"]
    _wait_for(lambda: _sql(dsn, "SELECT active_pid FROM pg_replication_slots")[0][0], "the slot to be held")
    sender = psutil.Process(_sql(dsn, "SELECT active_pid FROM pg_replication_slots")[0][0])
    sender.suspend()  # the server stops answering the receiver
    try:
        stream.kill()
        stream.wait()
        started = time.monotonic()
        _wait_for(lambda: not _alive(receiver), "pg_receivewal to die with its stream", seconds=15)
        assert time.monotonic() - started < 10
    finally:
        sender.resume()
    streamed_server["stream"] = _start_stream(policy, streamed_server["base"] / "stream-after-kill.log")
    _sql(dsn, "CREATE TABLE payments (id int PRIMARY KEY); INSERT INTO payments VALUES (1)")
    closed = _sql(dsn, "SELECT pg_walfile_name(pg_switch_wal())")[0][0]
    _wait_for(lambda: (policy.parent / "repository" / "wal" / "cluster" / (closed + ".json")).exists(),
              f"{closed} to be stored by the next stream")
    assert streamed_server["stream"].poll() is None
