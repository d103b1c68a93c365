"""High availability: base backups taken from a streaming standby (so the primary does not pay for them), restored and
compared with the primary at the same point; a standby that lags or does not answer sends the backup to the primary
(prefer-standby) or stops it naming the standby and why (standby). One real PostgreSQL 18 primary with a streaming
standby made by `pg_basebackup -R`, shared by the tests of this file; `wal stream` stores the primary's WAL."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote

import pytest
import yaml

from regal_dagster.engine.postgresql.installations import pg_bin_dir
from regal_dagster.engine.postgresql.server import ScratchCluster
from regal_dagster.engine.sources.postgres_cluster.wal import parse_lsn

from .old_formats import manifest_body
from .pg_compare import schema_text, table_contents
from .test_pitr import AS_ROOT, CLI, _ok, _run, _sql, _start_stream, _wait_for, _wait_promoted, cli


def make_standby(primary: ScratchCluster, data: Path) -> ScratchCluster:
    """A streaming standby of `primary` (pg_basebackup -R: standby.signal and primary_conninfo), started."""
    done = subprocess.run([str(pg_bin_dir() / "pg_basebackup"), "-D", str(data), "-R", "-X", "stream", "-c", "fast",
                           "-d", primary.dsn()], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    for runtime in data.glob(".s.PGSQL.*"):  # the primary's socket lock (its socket lives in its data directory)
        runtime.unlink()
    standby = ScratchCluster.persistent(data).start()
    _wait_for(lambda: _sql(primary.dsn(), "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")
              == [(1,)], "the standby to stream")
    return standby


def set_target(policy: Path, **settings: Any) -> None:
    document = yaml.safe_load(policy.read_text())
    document["targets"]["cluster"].update(settings)
    policy.write_text(yaml.safe_dump(document))


def caught_up(primary: str, standby: str) -> None:
    lsn = _sql(primary, "SELECT pg_current_wal_lsn()::text")[0][0]
    _wait_for(lambda: parse_lsn(_sql(standby, "SELECT pg_last_wal_replay_lsn()::text")[0][0]) >= parse_lsn(lsn),
              "the standby to replay the primary's WAL")


def stored_up_to(policy: Path, lsn: str) -> bool:
    status = json.loads(cli(policy, "wal", "status", "--json").stdout)
    return bool(status.get("newest_lsn")) and parse_lsn(status["newest_lsn"]) >= parse_lsn(lsn)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("standby")
    primary = ScratchCluster.persistent(base / "primary").start()
    standby = stream = None
    try:
        _sql(primary.dsn(), "ALTER SYSTEM SET summarize_wal = on")  # incremental base backups (PostgreSQL 17+)
        _sql(primary.dsn(), "SELECT pg_reload_conf()")
        standby = make_standby(primary, base / "standby")
        # one DSN for both servers: libpq connects to whichever is the primary (after a failover: the promoted one)
        both = ",".join(str(server.data_dir) for server in (primary, standby))
        dsn = f"postgresql://postgres@/postgres?host={quote(both, safe='')}&port=5432&target_session_attrs=primary"
        made = json.loads(_run([*CLI, "init", str(base / "regal"), "--cluster-dsn", dsn, "--no-audit",
                                "--json"]).stdout)
        policy = Path(made["policy"])
        set_target(policy, standbys=[standby.dsn()], backup_from="standby", standby_max_lag="5s")
        stream = _start_stream(policy, base / "stream.log")
        _sql(primary.dsn(), "CREATE TABLE orders (id int PRIMARY KEY, note text, amount numeric)")
        _sql(primary.dsn(), "CREATE TABLE payments (id bigserial PRIMARY KEY, order_id int, paid_at timestamptz)")
        _sql(primary.dsn(), "INSERT INTO orders SELECT g, 'before the full backup', g * 1.25 "
                            "FROM generate_series(1, 500) g")
        yield {"base": base, "primary": primary, "standby": standby, "policy": policy, "dsn": dsn,
               "stream_log": base / "stream.log"}
    finally:
        if stream is not None and stream.poll() is None:
            stream.send_signal(signal.SIGTERM)
            stream.wait(timeout=30)
        if standby is not None:
            standby.stop()
        primary.stop()


def _restore_and_compare(pair: dict[str, Any], backup_id: str, name: str) -> None:
    """Restore `backup_id` to a restore point made on the primary now and compare with what the primary holds there:
    pg_dump's schema text and every table's rows (nothing is written meanwhile)."""
    primary, policy = pair["primary"].dsn(), pair["policy"]
    expected_schema, expected_rows = schema_text(primary), table_contents(primary)
    at = _sql(primary, "SELECT pg_create_restore_point(%s)::text", (f"compare-{name}",))[0][0]  # writes no row
    _sql(primary, "SELECT pg_switch_wal()")
    _wait_for(lambda: stored_up_to(policy, at), f"the WAL up to {at} to be stored")
    data = pair["base"] / f"restored-{name}"
    _ok(cli(policy, "restore", "cluster", "--to-dir", str(data), "--to-name", f"compare-{name}", "--base-backup",
            backup_id, *(["--with-wal"] if AS_ROOT else [])))
    restored = ScratchCluster.persistent(data).start()
    try:
        _wait_promoted(restored)
        assert schema_text(restored.dsn()) == expected_schema
        assert table_contents(restored.dsn()) == expected_rows
    finally:
        restored.stop()
        shutil.rmtree(data, ignore_errors=True)


def test_full_and_incremental_base_backups_from_the_standby_restore_what_the_primary_held(
        pair: dict[str, Any]) -> None:
    primary, standby, policy = pair["primary"].dsn(), pair["standby"].dsn(), pair["policy"]
    caught_up(primary, standby)
    done = _ok(cli(policy, "backup", "cluster", "--json"))
    full = json.loads(done.stdout)
    assert full["taken_from"].startswith("standby ") and full["verification"]["passed"], done.stdout + done.stderr
    source = manifest_body(policy, "cluster", full["backup_id"])["source"]
    assert source["backup_from"] == "standby" and str(pair["standby"].data_dir) in source["backup_server"]
    assert "backup_from_note" not in source
    _restore_and_compare(pair, full["backup_id"], "full")

    _sql(primary, "INSERT INTO orders SELECT g, 'after the full backup', g FROM generate_series(501, 900) g")
    _sql(primary, "UPDATE orders SET note = 'changed' WHERE id % 7 = 0")
    _sql(primary, "INSERT INTO payments (order_id, paid_at) SELECT g, now() FROM generate_series(1, 300) g")
    done = _ok(cli(policy, "backup", "cluster", "--incremental", "--json"))
    incremental = json.loads(done.stdout)
    assert incremental["backup_type"] == "incremental" and incremental["parent_backup_id"] == full["backup_id"]
    assert incremental["taken_from"].startswith("standby ") and incremental["verification"]["passed"], done.stdout
    _restore_and_compare(pair, incremental["backup_id"], "incremental")


def test_a_lagging_or_unreachable_standby_sends_the_backup_to_the_primary_or_stops_it_naming_why(
        pair: dict[str, Any]) -> None:
    primary, standby, policy = pair["primary"].dsn(), pair["standby"].dsn(), pair["policy"]
    gone = f"postgresql://postgres@/postgres?host={quote(str(pair['base'] / 'no-such-server'), safe='')}&port=5432"
    _sql(standby, "ALTER SYSTEM SET recovery_min_apply_delay = '1h'")  # a standby that falls behind
    _sql(standby, "SELECT pg_reload_conf()")
    try:
        _sql(primary, "INSERT INTO payments (order_id, paid_at) VALUES (-1, now())")  # not replayed for an hour
        set_target(policy, standbys=[gone, standby], backup_from="standby", standby_max_lag="2s")
        done = cli(policy, "backup", "cluster", "--json")
        assert done.returncode == 1, done.stdout + done.stderr
        assert "no standby can take the base backup (backup_from: standby)" in done.stderr
        assert f"{pair['base'] / 'no-such-server'}" in done.stderr and "unreachable" in done.stderr
        assert "lags: it replayed up to" in done.stderr and "standby_max_lag (2 s)" in done.stderr
        assert "Traceback" not in done.stderr

        set_target(policy, backup_from="prefer-standby")
        done = _ok(cli(policy, "backup", "cluster", "--json", "--no-verify"))
        taken = json.loads(done.stdout)
        assert taken["taken_from"].startswith("primary "), taken
        assert "taken from the primary instead of a standby (backup_from: prefer-standby)" in done.stderr
        assert "lags: it replayed up to" in done.stderr
        source = manifest_body(policy, "cluster", taken["backup_id"])["source"]
        assert source["backup_from"] == "primary" and "lags" in source["backup_from_note"]
    finally:
        _sql(standby, "ALTER SYSTEM RESET recovery_min_apply_delay")
        _sql(standby, "SELECT pg_reload_conf()")
        set_target(policy, standbys=[standby], backup_from="standby", standby_max_lag="5s")


def _dump_target(pair: dict[str, Any], **settings: Any) -> None:
    """A `postgres` target `shop` on the pair: the primary's database shop, read from the standby's."""
    document = yaml.safe_load(pair["policy"].read_text())
    document["targets"]["shop"] = {"kind": "postgres", "dsn": pair["primary"].dsn("shop"),
                                   "standbys": [pair["standby"].dsn("shop")], "rpo": "1h", **settings}
    pair["policy"].write_text(yaml.safe_dump(document))


def _churn(dsn: str, stop: Any) -> None:
    """Rows deleted and VACUUMed away on the primary, again and again: replay on a standby then removes row versions
    a snapshot there may still see (and truncating the table takes an ACCESS EXCLUSIVE lock there)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop.is_set():
            conn.execute("DELETE FROM churn")
            conn.execute("INSERT INTO churn SELECT g, repeat('c', 100) FROM generate_series(1, 2000) g")
            conn.execute("VACUUM churn")


def test_a_dump_reads_a_caught_up_standby_and_a_conflict_with_recovery_says_what_to_set(
        pair: dict[str, Any]) -> None:
    """A `postgres` target dumped from the standby (its snapshot and locks there) restores exactly what the primary
    holds; replay cancelling the dump (max_standby_streaming_delay = 0 while the primary VACUUMs) stops the backup
    naming the standby's settings and what to set, and prefer-standby dumps the primary instead, saying why."""
    import threading

    primary, standby, policy = pair["primary"], pair["standby"], pair["policy"]
    _sql(primary.dsn(), "CREATE DATABASE shop")
    shop = primary.dsn("shop")
    _sql(shop, "CREATE TABLE items (id int PRIMARY KEY, name text, price numeric)")
    _sql(shop, "INSERT INTO items SELECT g, 'item ' || g, g * 0.5 FROM generate_series(1, 200000) g")
    _sql(shop, "CREATE TABLE churn (id int, filler text)")
    _dump_target(pair, backup_from="standby", standby_max_lag="5s")
    caught_up(primary.dsn(), standby.dsn())
    done = _ok(cli(policy, "backup", "shop", "--json"))
    taken = json.loads(done.stdout)
    assert taken["taken_from"].startswith("standby ") and taken["verification"]["passed"], done.stdout + done.stderr
    source = manifest_body(policy, "shop", taken["backup_id"])["source"]
    assert source["in_recovery"] and source["backup_from"] == "standby", source
    _ok(cli(policy, "restore", taken["backup_id"], "--to", primary.dsn("shop_restored")))
    assert table_contents(primary.dsn("shop_restored")) == table_contents(shop)

    _sql(standby.dsn(), "ALTER SYSTEM SET max_standby_streaming_delay = 0")  # replay cancels at once
    _sql(standby.dsn(), "SELECT pg_reload_conf()")
    stop = threading.Event()
    churn = threading.Thread(target=_churn, args=(shop, stop), daemon=True)
    churn.start()
    try:
        done = cli(policy, "backup", "shop", "--json")
        assert done.returncode == 1, done.stdout + done.stderr
        assert "was cancelled by a conflict with recovery" in done.stderr, done.stderr
        assert "max_standby_streaming_delay = 0" in done.stderr and "hot_standby_feedback = off" in done.stderr
        assert "set hot_standby_feedback = on" in done.stderr and "Traceback" not in done.stderr

        _dump_target(pair, backup_from="prefer-standby", standby_max_lag="5s")
        done = _ok(cli(policy, "backup", "shop", "--json", "--no-verify"))
        assert json.loads(done.stdout)["taken_from"].startswith("primary "), done.stdout
        assert "taken from the primary after the dump on a standby was cancelled" in done.stderr, done.stderr
    finally:
        stop.set()
        churn.join()
        _sql(standby.dsn(), "ALTER SYSTEM RESET max_standby_streaming_delay")
        _sql(standby.dsn(), "SELECT pg_reload_conf()")
        document = yaml.safe_load(policy.read_text())
        del document["targets"]["shop"]
        policy.write_text(yaml.safe_dump(document))


def test_every_host_down_the_stream_and_a_backup_name_each(tmp_path: Path) -> None:
    """No server of the target answers: `wal stream` and a backup stop at once (exit 1, no traceback) naming every
    host of the multi-host DSN and every standby, each with its reason."""
    gone = [tmp_path / name for name in ("old-primary", "new-primary", "standby")]
    dsn = (f"postgresql://postgres@/postgres?host={quote(f'{gone[0]},{gone[1]}', safe='')}&port=5432"
           "&target_session_attrs=primary")
    made = json.loads(_run([*CLI, "init", str(tmp_path / "regal"), "--cluster-dsn", dsn, "--no-audit",
                            "--json"]).stdout)
    policy = Path(made["policy"])
    set_target(policy, standbys=[f"postgresql://postgres@/postgres?host={quote(str(gone[2]), safe='')}&port=5432"],
               backup_from="prefer-standby")
    for command in (["wal", "stream", "cluster"], ["backup", "cluster"]):
        done = subprocess.run([*CLI, *command, "--policy", str(policy)], capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        for host in gone:
            assert f'"{host}/.s.PGSQL.5432" failed: No such file or directory' in done.stderr, (command, done.stderr)
        assert "what to do:" in done.stderr.lower() or "start the primary" in done.stderr, done.stderr


class Ledger:
    """The independent record of the test's writes: a thread inserts ids one at a time (with the client's timestamp)
    through the DSN that follows the primary, retrying an id after a connection loss (ON CONFLICT DO NOTHING: each
    id is committed once), and records every id whose commit returned. `paused()` holds it between two inserts."""

    def __init__(self, dsn: str):
        import threading

        self.dsn, self.acked, self.lock, self.stop = dsn, [], threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import time
        from datetime import UTC, datetime

        import psycopg

        conn, next_id = None, 1
        while not self.stop.is_set():
            with self.lock:
                try:
                    conn = conn or psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
                    at = datetime.now(UTC)
                    conn.execute("INSERT INTO ledger VALUES (%s, %s) ON CONFLICT (id) DO NOTHING", (next_id, at))
                    self.acked.append((next_id, at))
                    next_id += 1
                    continue
                except psycopg.Error:
                    if conn is not None:
                        conn.close()
                    conn = None
            time.sleep(0.2)  # the primary is going or not there yet
        if conn is not None:
            conn.close()

    def paused(self) -> Any:
        return self.lock

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _noise(dsn: str, stop: Any) -> None:
    """More write load, not recorded: batches of rows, through the failover."""
    import time

    import psycopg

    while not stop.is_set():
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
                while not stop.is_set():
                    conn.execute("INSERT INTO noise SELECT g, repeat('x', 200) FROM generate_series(1, 300) g")
        except psycopg.Error:
            time.sleep(0.2)


def _restored_ledger(pair: dict[str, Any], name: str, *how: str) -> list[tuple[int, Any]]:
    data = pair["base"] / f"restored-{name}"
    _ok(cli(pair["policy"], "restore", "cluster", "--to-dir", str(data), *how, *(["--with-wal"] if AS_ROOT else [])))
    restored = ScratchCluster.persistent(data).start()
    try:
        _wait_promoted(restored)
        return [tuple(row) for row in _sql(restored.dsn(), "SELECT id, at FROM ledger ORDER BY id")]
    finally:
        restored.stop()
        shutil.rmtree(data, ignore_errors=True)


def test_the_wal_stream_follows_a_promoted_standby_and_reports_the_wal_lost_at_the_failover(
        pair: dict[str, Any]) -> None:
    """Under a write load, the standby is cut off from the primary for a moment (what the primary writes then reaches
    only the stream), the primary stops and the standby is promoted: the stream follows the new primary (its slot
    created there, timeline 2, the history file stored), reports the old timeline's WAL past the switch as LOST with
    its range, and restores to a restore point before the promotion and one after it hold exactly the ids the
    writer's record says (those written while the standby was cut off: lost); wal_continuity passes across."""
    import threading

    from regal_dagster.engine.postgresql.programs import run_pg, server_account

    primary, standby, policy, dsn = pair["primary"], pair["standby"], pair["policy"], pair["dsn"]
    _sql(dsn, "CREATE TABLE ledger (id int PRIMARY KEY, at timestamptz NOT NULL)")
    _sql(dsn, "CREATE TABLE noise (n int, filler text)")
    caught_up(primary.dsn(), standby.dsn())
    backup_id = json.loads(_ok(cli(policy, "backup", "cluster", "--json")).stdout)["backup_id"]
    quiet = threading.Event()
    noise = threading.Thread(target=_noise, args=(dsn, quiet), daemon=True)
    noise.start()
    try:
        with Ledger(dsn) as ledger:
            _wait_for(lambda: len(ledger.acked) > 20, "the writer to write")
            with ledger.paused():
                _sql(primary.dsn(), "SELECT pg_create_restore_point('before_failover')")
                before = list(ledger.acked)
            _wait_for(lambda: len(ledger.acked) > len(before) + 20, "more writes")
            with ledger.paused():  # the standby has all that was acknowledged, then is cut off
                caught_up(primary.dsn(), standby.dsn())
                stored_before = _backup_entries(policy)
                inflight = _base_backup_held(policy, standby.dsn())  # a base backup of the standby, held mid-way
                _sql(standby.dsn(), "ALTER SYSTEM SET primary_conninfo = ''")
                _sql(standby.dsn(), "SELECT pg_reload_conf()")
                _wait_for(lambda: _sql(standby.dsn(), "SELECT count(*) FROM pg_stat_wal_receiver") == [(0,)],
                          "the standby to stop receiving")
                cut = len(ledger.acked)
            _wait_for(lambda: len(ledger.acked) > cut + 20, "writes only the primary (and the stream) get")
            with ledger.paused():
                stopped = len(ledger.acked)
                at = _sql(primary.dsn(), "SELECT pg_current_wal_lsn()::text")[0][0]
                _wait_for(lambda: stored_up_to(policy, at), "the stream to store the primary's newest WAL")
                assert primary.halt("fast").returncode == 0
                done = run_pg("pg_ctl", ["-D", str(standby.data_dir), "-w", "promote"], server_account(),
                              standby.data_dir.parent, timeout=60)
                assert done.returncode == 0, done.stderr
            log = pair["stream_log"]
            _wait_for(lambda: "WAL LOST at the failover to timeline 2" in log.read_text(), "the stream to follow the "
                      "new primary", 90)
            failed = _resumed(inflight)  # the failover happened in the middle of it: it fails, nothing is left
            assert failed.returncode != 0 and "Traceback" not in failed.stderr, failed.stderr
            assert "promoted during online backup" in failed.stderr and "(a failover)" in failed.stderr, failed.stderr
            assert _backup_entries(policy) == stored_before, failed.stderr
            _wait_for(lambda: len(ledger.acked) > stopped + 20, "writes on the new primary")
            with ledger.paused():
                _sql(dsn, "SELECT pg_create_restore_point('after_failover')")
                after = list(ledger.acked)
            _wait_for(lambda: len(ledger.acked) > len(after) + 5, "more writes on the new primary")
    finally:
        quiet.set()
        noise.join()
    text = log.read_text()
    assert "the primary is now" in text and "created the physical replication slot regal_backup there" in text, text
    end = _sql(dsn, "SELECT pg_current_wal_lsn()::text")[0][0]
    _sql(dsn, "SELECT pg_switch_wal()")
    _wait_for(lambda: stored_up_to(policy, end), f"the WAL up to {end} to be stored", 90)

    done = cli(policy, "wal", "status", "--json")
    status = json.loads(done.stdout)
    assert done.returncode == 0 and status["gaps"] == [] and status["newest_segment"].startswith("00000002"), status
    assert len(status["lost"]) == 1 and status["lost"][0].startswith("timeline 1 from "), status["lost"]
    assert (policy.parent / "repository" / "wal" / "cluster" / "00000002.history.json").exists()
    _lost_range_alerts_once(policy, status["lost"][0].split(":")[0])
    lost = ledger.acked[cut:stopped]  # acknowledged by the old primary alone
    assert _restored_ledger(pair, "before", "--to-name", "before_failover") == before
    assert _restored_ledger(pair, "after", "--to-name", "after_failover") == before + after[len(before):cut] + \
        after[stopped:]
    assert lost and not set(lost) & set(after[stopped:])
    verified = json.loads(_ok(cli(policy, "verify", backup_id, "--json")).stdout)
    continuity = {c["name"]: c for c in verified["checks"]}["wal_continuity"]
    assert continuity["passed"], continuity
    set_target(policy, backup_from="prefer-standby")  # the next one on the new topology: its standby is gone
    done = _ok(cli(policy, "backup", "cluster", "--json"))
    taken = json.loads(done.stdout)
    assert taken["taken_from"].startswith("primary ") and taken["timeline"] == 2 and taken["verification"]["passed"]
    assert "is not in recovery: it is a primary itself" in done.stderr, done.stderr


def _backup_entries(policy: Path) -> list[str]:
    """Every file under the repository's backups of `cluster` (a failed backup leaves none, at most a directory)."""
    root = policy.parent / "repository" / "backups" / "cluster"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _base_backup_held(policy: Path, standby: str) -> list[Any]:
    """`regal-backup backup cluster` started, and stopped (SIGSTOP, with its pg_basebackup) in the middle of the
    transfer: the standby reports the backup streaming its files, part of them sent (its side then blocks on the
    socket)."""
    import time

    import psutil

    command = subprocess.Popen([*CLI, "backup", "cluster", "--policy", str(policy)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    held = psutil.Process(command.pid)
    deadline = time.monotonic() + 60
    while not any(c.name() == "pg_basebackup" for c in held.children(recursive=True)):
        assert command.poll() is None and time.monotonic() < deadline, command.communicate()
        time.sleep(0.002)
    processes = [held, *(c for c in held.children(recursive=True) if c.name() == "pg_basebackup")]
    _signal_all(processes, "suspend")
    while True:  # let it run a few milliseconds at a time until the server streams the data files
        progress = _sql(standby, "SELECT phase, backup_streamed FROM pg_stat_progress_basebackup")
        if progress and progress[0][0] == "streaming database files" and progress[0][1] > 0:
            return [command, processes]
        assert time.monotonic() < deadline, progress
        _signal_all(processes, "resume")
        time.sleep(0.003)
        _signal_all(processes, "suspend")


def _signal_all(processes: list[Any], how: str) -> None:
    import contextlib

    import psutil

    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            getattr(process, how)()


def _resumed(held: list[Any]) -> Any:
    command, processes = held
    _signal_all(processes, "resume")
    out, err = command.communicate(timeout=120)
    return subprocess.CompletedProcess(command.args, command.returncode, out, err)


def _lost_range_alerts_once(policy: Path, lost: str) -> None:
    """The range lost at the failover is an open alert in `status`, named by its range, and the alert evaluation
    (the RPO sensor's conditions, through the policy's channels) tells it once however often it runs."""
    from datetime import UTC, datetime

    from regal_dagster.engine.alerts import AlertBook, evaluate_and_notify, rpo_conditions
    from regal_dagster.engine.crypto import load_keyring
    from regal_dagster.engine.policy import load_policy
    from regal_dagster.engine.storage import open_repository

    shown = json.loads(cli(policy, "status", "cluster", "--json").stdout)["open_alerts"]
    lost_alerts = [a for a in shown if a["event"] == "lost_at_failover"]
    assert [a["what"] for a in lost_alerts] == [f"cluster: WAL lost at a failover: {lost}"], shown
    document = yaml.safe_load(policy.read_text())
    document.setdefault("alerts", {})["channels"] = [{"kind": "file", "path": "alerts.jsonl"}]
    policy.write_text(yaml.safe_dump(document))
    loaded = load_policy(policy)
    repo, keyring, book = open_repository(loaded), load_keyring(loaded), AlertBook()
    for _ in range(2):
        conditions = rpo_conditions(loaded, repo, keyring, datetime.now(UTC))
        assert evaluate_and_notify(loaded, book, conditions, datetime.now(UTC)) == []
    told = [json.loads(line) for line in (policy.parent / "alerts.jsonl").read_text().splitlines()]
    assert [(t["status"], t["what"]) for t in told if t["event"] == "lost_at_failover"] == \
        [("alert", f"cluster: WAL lost at a failover: {lost}")], told
