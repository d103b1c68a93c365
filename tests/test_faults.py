"""Faults nobody planned for: a full disk, SIGKILL at random points, an S3 endpoint that disappears. Each
ends in a clear message and the documented exit code, nothing half-done is visible, and the next run works
without anybody cleaning up by hand. The counts of trials are in each test."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import boto3
import psutil
import psycopg
import pytest
import yaml

from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.layout import PARTIAL_SUFFIX
from regal_dagster.engine.policy import load_policy
from regal_dagster.engine.workspace import base_directory, owner_alive

from .conftest import (
    CLI,
    DatabaseFactory,
    MotoServer,
    load_awkward_data,
    run_cli,
    run_cli_process,
    use_test_aws_credentials,
    wait_for,
    write_policy_file,
)

TRIALS = 6


def _sql(dsn: str, statement: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement)


def _clear(done: subprocess.CompletedProcess[str]) -> None:
    assert "error: " in done.stderr and "what to do:" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def _kill_at_random(args: list[str], policy_file: Path, rng: random.Random, within: float) -> int | None:
    """Start a command and SIGKILL it at a random moment within `within` seconds; its exit status if it ended
    first (None when it was killed)."""
    process = subprocess.Popen([*CLI, *args, "--policy", str(policy_file)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + rng.uniform(0.05, within)
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return process.returncode
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the command and every child it started
    process.wait()
    return None


@pytest.fixture
def shop(system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> dict[str, Any]:
    source = system_pg.create()
    load_awkward_data(source)
    _sql(source, "CREATE TABLE sales AS SELECT g AS id, md5(g::text) AS ref, now() AS at "
                 "FROM generate_series(1, 1000000) g")
    policy_file = write_policy_file(tmp_path, {"pos": source}, prune={"orphan_grace": "0s"})
    return {"source": source, "policy_file": policy_file, "repository": tmp_path / "repository"}


def _listed(policy_file: Path) -> dict[str, Any]:
    done = run_cli(policy_file, "list", "--json")
    assert done.returncode == 0, done.stderr
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def test_sigkill_of_backups_and_prunes_at_random_points(shop: dict[str, Any]) -> None:
    rng = random.Random(20261130)
    policy_file = shop["policy_file"]
    started = time.monotonic()
    assert run_cli_process(policy_file, "backup", "pos").returncode == 0  # a process, as the killed ones
    duration = time.monotonic() - started  # kill within it: from start-up to the manifest
    good = []
    killed = 0
    for _ in range(TRIALS):
        if _kill_at_random(["backup", "pos"], policy_file, rng, 0.9 * duration) is None:
            killed += 1
        listing = _listed(policy_file)
        assert listing["damaged"] == []  # a killed backup is not a backup, and not hidden damage either
        done = run_cli(policy_file, "backup", "pos", "--json")  # no stale lock: the next one runs at once
        assert done.returncode == 0, done.stderr
        good.append(json.loads(done.stdout)["backup_id"])
        _kill_at_random(["prune"], policy_file, rng, 1.5)
    assert killed >= TRIALS // 2, f"only {killed} of {TRIALS} backups were killed midway"
    pruned = run_cli(policy_file, "prune", "--json")
    assert pruned.returncode == 0, pruned.stderr
    listing = _listed(policy_file)
    assert listing["unfinished"] == [] and listing["damaged"] == []
    assert not list(shop["repository"].rglob(f"*{PARTIAL_SUFFIX}"))
    kept = {b["backup_id"] for b in listing["backups"]}
    for backup_id in sorted(kept & set(good)):
        assert run_cli(policy_file, "verify", backup_id).returncode == 0


def test_sigkill_of_key_operations_never_loses_a_key_or_a_backup(shop: dict[str, Any]) -> None:
    rng = random.Random(7)
    policy_file = shop["policy_file"]
    policy = load_policy(policy_file)
    backups = []
    for trial in range(TRIALS):
        done = run_cli(policy_file, "backup", "pos", "--json")
        assert done.returncode == 0, done.stderr
        backups.append(json.loads(done.stdout)["backup_id"])
        before = load_keyring(policy)
        if trial % 2:
            _kill_at_random(["keys", "rotate"], policy_file, rng, 1.5)
        else:
            run_cli(policy_file, "keys", "rotate")
            _kill_at_random(["keys", "retire", str(before.primary_key_id), "--reencrypt"], policy_file, rng, 4.0)
        after = load_keyring(policy)  # the keyset opens: never half written
        assert before.key_ids - after.key_ids <= {before.primary_key_id}
        for backup_id in backups:  # whatever was interrupted, every backup still reads back
            verified = run_cli(policy_file, "verify", backup_id)
            assert verified.returncode == 0, (trial, backup_id, verified.stdout[-800:])
    done = run_cli(policy_file, "prune", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["damaged"] == {}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB filesystem of its own (tmpfs): the repository lives there."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0755", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_a_backup_is_a_clear_error_and_the_next_run_works(
        system_pg: DatabaseFactory, tmp_path: Path, master_key: str, small_disk: Path) -> None:
    source = system_pg.create()
    load_awkward_data(source)
    policy_file = write_policy_file(tmp_path, {"pos": source}, {"url": str(small_disk / "repository")})
    first = run_cli(policy_file, "backup", "pos", "--json")
    assert first.returncode == 0, first.stderr
    first_id = json.loads(first.stdout)["backup_id"]
    _sql(source, "CREATE TABLE blobs AS SELECT g, decode(md5(g::text) || md5((g + 1000000)::text) || "
                 "md5((g + 2000000)::text) || md5((g + 3000000)::text), 'hex') AS b "
                 "FROM generate_series(1, 150000) g")  # 9.6 MB that does not compress

    full = run_cli(policy_file, "backup", "pos")

    assert full.returncode == 1
    _clear(full)
    assert "is full" in full.stderr and "MiB left" in full.stderr and "prune" in full.stderr
    assert not list((small_disk / "repository").rglob(f"*{PARTIAL_SUFFIX}"))
    listing = _listed(policy_file)
    assert [b["backup_id"] for b in listing["backups"]] == [first_id] and listing["damaged"] == []
    assert run_cli(policy_file, "verify", first_id).returncode == 0  # what was there still reads back
    assert run_cli(policy_file, "prune").returncode == 0

    subprocess.run(["mount", "-o", "remount,size=96m", str(small_disk)], check=True)  # space was added
    again = run_cli(policy_file, "backup", "pos")
    assert again.returncode == 0, again.stderr


def test_an_s3_endpoint_that_disappears_mid_upload(system_pg: DatabaseFactory, tmp_path: Path, master_key: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    use_test_aws_credentials(monkeypatch)
    server = MotoServer()
    endpoint = server.start()
    port = server.port
    bucket = f"regal-outage-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    source = system_pg.create()
    _sql(source, "CREATE TABLE sales AS SELECT g AS id, md5(g::text) AS ref FROM generate_series(1, 600000) g")
    repository = {"url": f"s3://{bucket}/regal", "endpoint_url": endpoint, "part_size_mb": 5,
                  "retry": {"attempts": 2, "backoff": "0.1s", "max_backoff": "0.2s"}}
    policy_file = write_policy_file(tmp_path, {"pos": source}, repository, prune={"orphan_grace": "0s"})
    backup = subprocess.Popen([*CLI, "backup", "pos", "--policy", str(policy_file)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    deadline = time.monotonic() + 60
    while not s3.list_multipart_uploads(Bucket=bucket).get("Uploads"):
        assert time.monotonic() < deadline and backup.poll() is None, backup.stderr.read()  # type: ignore[union-attr]
        time.sleep(0.02)
    server.stop()  # the endpoint goes away with parts in flight
    try:
        _, stderr = backup.communicate(timeout=120)
        assert backup.returncode == 1 and "Traceback" not in stderr, stderr
        assert "cannot reach" in stderr and "what to do:" in stderr
    finally:
        server = MotoServer(port)  # it comes back
        server.start()
    try:
        listing = _listed(policy_file)
        assert listing["backups"] == [] and listing["damaged"] == []
        again = run_cli(policy_file, "backup", "pos", "--json")
        assert again.returncode == 0, again.stderr
        assert run_cli(policy_file, "verify", json.loads(again.stdout)["backup_id"]).returncode == 0
        assert run_cli(policy_file, "prune").returncode == 0  # and what the outage left is swept
        assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
        assert yaml.safe_load(policy_file.read_text())["repository"]["url"].startswith("s3://")
    finally:
        server.stop()


# --- restores: atomic as seen from the target -----------------------------------------------------------

RESTORE_TRIALS = 8
STAGING = "__regal_"  # the temporary databases' names: <target>__regal_restoring_<token>, ..._replaced_...


def _databases(server_dsn: str, prefix: str) -> list[str]:
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        return [row[0] for row in conn.execute("SELECT datname FROM pg_database WHERE starts_with(datname, %s) "
                                               "ORDER BY 1", (prefix,))]


def _table_counts(dsn: str) -> dict[str, int]:
    """Every user table's exact row count."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        tables = conn.execute("SELECT format('%I.%I', table_schema, table_name) FROM information_schema.tables "
                              "WHERE table_type = 'BASE TABLE' AND table_schema NOT IN "
                              "('pg_catalog', 'information_schema') ORDER BY 1").fetchall()
        return {name: conn.execute(f"SELECT count(*) FROM {name}").fetchone()[0] for (name,) in tables}  # type: ignore[index]


def _decrypted_leftovers() -> list[Path]:
    """Private working directories (decrypted files, scratch servers) whose owner is dead: none may stay once
    the next command ran (the live ones of this test session, its own scratch server, are not leftovers)."""
    return [p for p in base_directory().glob("regal-*") if p.is_dir() and not owner_alive(p)]


def _wait_sessions_gone(server_dsn: str, prefix: str) -> None:
    """Until no session is connected to a database named `prefix`... or holds a restore's advisory lock (in
    `postgres`; the tests run one at a time, so any such lock is a restore's): a SIGKILLed client's server session
    ends (and its advisory lock is freed) when the server next notices the closed socket, a moment later if
    it was inside a COPY or CREATE DATABASE. A retry started by a person is seconds later; one started by
    this test in its own process (no interpreter start-up) could otherwise find it still there."""
    def gone() -> bool:
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            return not conn.execute("SELECT 1 FROM pg_stat_activity WHERE (starts_with(datname, %s) OR pid IN "
                                    "(SELECT pid FROM pg_locks WHERE locktype = 'advisory')) "
                                    "AND pid <> pg_backend_pid()", (prefix,)).fetchone()
    wait_for(gone, f"the sessions of the killed restore into {prefix} to end", 60, 0.05)


@pytest.fixture
def backed_up_shop(shop: dict[str, Any], system_pg: DatabaseFactory) -> dict[str, Any]:
    done = run_cli(shop["policy_file"], "backup", "pos", "--json")
    assert done.returncode == 0, done.stderr
    backup_id = json.loads(done.stdout)["backup_id"]
    first = system_pg.dsn(system_pg.new_name("regal_first"))
    started = time.monotonic()
    restored = run_cli_process(shop["policy_file"], "restore", backup_id, "--to", first)  # as the killed ones
    assert restored.returncode == 0, restored.stderr
    return {**shop, "backup_id": backup_id, "duration": time.monotonic() - started,
            "expected": _table_counts(shop["source"]), "server": system_pg.dsn("postgres")}


def test_sigkill_of_restores_into_a_new_database_never_leaves_a_half_loaded_one(
        backed_up_shop: dict[str, Any], system_pg: DatabaseFactory) -> None:
    shop, rng = backed_up_shop, random.Random(16)
    policy_file, expected = shop["policy_file"], shop["expected"]
    outcomes = {"killed, target absent": 0, "killed, target complete": 0, "finished first": 0}
    for _ in range(RESTORE_TRIALS):
        name = system_pg.new_name("regal_killed")
        status = _kill_at_random(["restore", shop["backup_id"], "--to", system_pg.dsn(name)], policy_file, rng,
                                 0.8 * shop["duration"])
        present = _databases(shop["server"], name) == [name]
        if present:  # never a half-loaded database under the target's name: the whole backup or nothing
            assert _table_counts(system_pg.dsn(name)) == expected
        outcomes["finished first" if status is not None else
                 f"killed, target {'complete' if present else 'absent'}"] += 1
        if status is not None:
            assert status == 0 and present
        _wait_sessions_gone(shop["server"], name)
        # the next restore works at once, without anybody cleaning up, and sweeps what the killed one left
        again = run_cli(policy_file, "restore", shop["backup_id"], "--to", system_pg.dsn(name), "--drop-existing")
        assert again.returncode == 0, again.stderr
        assert _table_counts(system_pg.dsn(name)) == expected
        assert _databases(shop["server"], name) == [name]  # its temporary databases are gone
        assert _decrypted_leftovers() == []  # and so are the decrypted files in private directories
    print(f"restore into a new database, SIGKILL at random: {outcomes}")
    assert outcomes["killed, target absent"] >= RESTORE_TRIALS // 2, outcomes
    assert [d for d in _databases(shop["server"], "regal_") if STAGING in d] == []


def test_sigkill_of_restores_with_drop_existing_leaves_the_old_database_or_the_complete_new_one(
        backed_up_shop: dict[str, Any], system_pg: DatabaseFactory) -> None:
    shop, rng = backed_up_shop, random.Random(1616)
    policy_file, expected = shop["policy_file"], shop["expected"]
    outcomes = {"killed, old database kept": 0, "killed, new database complete": 0, "finished first": 0}
    for _ in range(RESTORE_TRIALS):
        name = system_pg.new_name("regal_replaced")
        _sql(shop["server"], f'CREATE DATABASE "{name}"')
        _sql(system_pg.dsn(name), "CREATE TABLE precious AS SELECT g FROM generate_series(1, 1234) g")
        status = _kill_at_random(["restore", shop["backup_id"], "--to", system_pg.dsn(name), "--drop-existing"],
                                 policy_file, rng, shop["duration"])
        assert _databases(shop["server"], name)[:1] == [name]  # the target's name never goes missing
        found = _table_counts(system_pg.dsn(name))
        if found == {"public.precious": 1234}:
            assert status is None
            outcomes["killed, old database kept"] += 1
        else:
            assert found == expected  # the complete new database, never a mixture
            outcomes["finished first" if status is not None else "killed, new database complete"] += 1
        _wait_sessions_gone(shop["server"], name)
        again = run_cli(policy_file, "restore", shop["backup_id"], "--to", system_pg.dsn(name), "--drop-existing")
        assert again.returncode == 0, again.stderr
        assert _table_counts(system_pg.dsn(name)) == expected
        assert _databases(shop["server"], name) == [name]
        assert _decrypted_leftovers() == []
    print(f"restore --drop-existing, SIGKILL at random: {outcomes}")
    assert outcomes["killed, old database kept"] >= RESTORE_TRIALS // 2, outcomes


def test_a_damaged_backup_restored_into_a_new_database_creates_nothing_and_names_the_object(
        backed_up_shop: dict[str, Any], system_pg: DatabaseFactory) -> None:
    shop = backed_up_shop
    policy = load_policy(shop["policy_file"])
    from regal_dagster.engine import catalog
    from regal_dagster.engine.storage import open_repository

    manifest = catalog.load_manifest(open_repository(policy), load_keyring(policy), shop["backup_id"])
    damaged = max(manifest.objects, key=lambda r: r.size)  # the big table's rows
    path = shop["repository"] / damaged.key
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, in the middle of the object
    path.write_bytes(bytes(data))
    name = system_pg.new_name("regal_damaged")

    done = run_cli(shop["policy_file"], "restore", shop["backup_id"], "--to", system_pg.dsn(name))

    assert done.returncode == 3, done.stderr
    _clear(done)
    assert damaged.key in done.stderr and "nothing was created" in done.stderr
    assert _databases(shop["server"], name) == []  # neither the target nor a temporary database
    assert _decrypted_leftovers() == []


# --- restore tests: scratch servers never outlive their owner --------------------------------------------

RESTORE_TEST_TRIALS = 7


def _scratch_processes(work_dir: Path) -> list[psutil.Process]:
    """Every process a scratch server of `work_dir` runs (postmaster and its children) or watches it with."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(str(work_dir) in part for part in process.info["cmdline"] or []):
            with contextlib.suppress(psutil.NoSuchProcess):
                found += [process, *process.children(recursive=True)]
    return found


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
    return alive


def _server_or_exit(process: subprocess.Popen[bytes], work_dir: Path) -> bool:
    """The command ended, or its scratch server runs: a postmaster in `work_dir` accepting connections
    (postmaster.pid says "ready"), not initdb's short-lived bootstrap postgres."""
    if process.poll() is not None:
        return True
    for pid_file in work_dir.glob("regal-backup-*/regal-pg-*/**/postmaster.pid"):
        with contextlib.suppress(OSError):
            if pid_file.read_text().rstrip().endswith("ready"):
                return True
    return False


def test_sigkill_of_restore_tests_leaves_no_scratch_server_behind(shop: dict[str, Any]) -> None:
    rng = random.Random(1618)
    policy_file, work_dir = shop["policy_file"], shop["repository"].parent / "scratch"
    assert run_cli(policy_file, "backup", "pos").returncode == 0
    command = ["restore-test", "--target", "pos", "--work-dir", str(work_dir)]
    started = time.monotonic()
    first = run_cli_process(policy_file, *command)  # a process, as the killed ones: its start-up counts
    assert first.returncode == 0, first.stderr
    duration = time.monotonic() - started
    outcomes = {"killed with a scratch server running": 0, "killed before or after it": 0, "finished first": 0}
    dir_gone = 0
    for trial in range(RESTORE_TEST_TRIALS):
        process = subprocess.Popen([*CLI, *command, "--policy", str(policy_file)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        if trial % 2 == 0:  # once its scratch server runs (seen, not timed: a loaded machine changes nothing)
            wait_for(partial(_server_or_exit, process, work_dir), "a scratch server or the exit", 120, 0.01)
        else:  # at a random moment, start-up and clean-up included
            deadline = time.monotonic() + rng.uniform(0.5, duration)
            while time.monotonic() < deadline and process.poll() is None:
                time.sleep(0.01)
        if process.poll() is not None:
            outcomes["finished first"] += 1
            continue
        servers = _scratch_processes(work_dir)
        running = any(p.name() == "postgres" for p in _alive(servers))
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        killed_at = time.monotonic()
        while _alive(servers + _scratch_processes(work_dir)) and time.monotonic() - killed_at < 10:
            time.sleep(0.1)
        assert not _alive(servers + _scratch_processes(work_dir)), "a scratch server outlived its owner by 10 s"
        listening = [c for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.pid in
                     {p.pid for p in servers}]
        assert listening == []
        while list(work_dir.glob("regal-backup-*/regal-pg-*")) and time.monotonic() - killed_at < 10:
            time.sleep(0.1)
        # removed by the watchdog (else: by the next run)
        dir_gone += not list(work_dir.glob("regal-backup-*/regal-pg-*"))
        outcomes["killed with a scratch server running" if running else "killed before or after it"] += 1
        again = run_cli(policy_file, *command)  # the next one works, nothing to clean by hand
        assert again.returncode == 0, again.stderr
        assert not work_dir.exists() or list(work_dir.iterdir()) == []
    print(f"restore-test, SIGKILL while its server runs or at random: {outcomes}; private directory gone "
          f"within 10 s: {dir_gone}")
    assert outcomes["killed with a scratch server running"] >= RESTORE_TEST_TRIALS // 2, outcomes


KILLED_AT = ("unlink", "unlinkat", "rename", "renameat", "renameat2")  # every delete and every write's commit


def _prune_killed_before(policy_file: Path, step: int) -> int:
    """`regal-backup prune` as a real process, SIGKILLed by strace on entering its `step`-th file deletion or
    rename (the commit of a write): the syscall never runs. Its exit status (-9 when it was killed)."""
    calls = ",".join(KILLED_AT)
    done = subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "-e", f"trace={calls}", "-e",
                           f"inject={calls}:signal=KILL:when={step}", *CLI, "prune", "--policy", str(policy_file)],
                          check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    return done.returncode  # strace ends as its tracee did: killed by the same signal


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace injects the SIGKILL at each step")
def test_a_prune_killed_at_each_step_of_a_deletion_leaves_no_damaged_backup(system_pg: DatabaseFactory,
                                                                             tmp_path: Path, master_key: str) -> None:
    """Every step of a prune, one after the other: a real `regal-backup prune` is SIGKILLed just before its
    1st, 2nd, ... file deletion or write (until one runs to its end), while it deletes a verified backup the
    audit trail saw complete. After each kill `list` shows no DAMAGED backup and `status` no alert about one;
    the backup is either whole (and verifies) or not listed at all; the next prune finishes with nobody
    cleaning up, and leaves no empty directory behind."""
    source = system_pg.create()
    load_awkward_data(source)
    policy_file = write_policy_file(tmp_path, {"pos": source}, audit={"dsn": system_pg.create("regal_audit")},
                                    prune={"orphan_grace": "0s"})
    backups = tmp_path / "repository" / "backups" / "pos"
    victim = _verified(policy_file)
    step, finished = 1, False
    while not finished:
        assert step < 60, "the prune never ran to its end"
        newest = _verified(policy_file)  # the hourly slot keeps it: the one before goes
        status = _prune_killed_before(policy_file, step)
        finished = status == 0
        assert status in (0, -signal.SIGKILL), status
        listing = _listed(policy_file)
        assert listing["damaged"] == [], (step, listing["damaged"])
        alerts = json.loads(run_cli(policy_file, "status", "--json").stdout)
        assert alerts["damaged_backups"] == 0 and not [a for a in alerts["open_alerts"] if "damaged" in a["event"]]
        listed = [b["backup_id"] for b in listing["backups"]]
        assert newest in listed
        if victim in listed:  # not marked yet: whole
            assert run_cli(policy_file, "verify", victim).returncode == 0, step
        done = run_cli(policy_file, "prune", "--json")
        assert done.returncode == 0, done.stderr
        assert [b["backup_id"] for b in _listed(policy_file)["backups"]] == [newest]
        assert sorted(p.name for p in backups.iterdir()) == [newest], step  # no directory left behind
        assert _listed(policy_file)["unfinished"] == []
        victim, step = newest, step + 1
    print(f"prune killed at each of its first {step - 1} steps")
    assert step > 5  # the mark, the objects, the manifest, the mark again, the log: each was a kill point


def _verified(policy_file: Path) -> str:
    done = run_cli(policy_file, "backup", "pos", "--json")
    assert done.returncode == 0, done.stderr
    backup_id = str(json.loads(done.stdout)["backup_id"])
    assert run_cli(policy_file, "verify", backup_id).returncode == 0
    return backup_id
