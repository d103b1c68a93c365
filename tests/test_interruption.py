"""Interrupted backups: a backup killed midway leaves no visible backup and no lock behind.

Real processes: `regal-backup backup` runs as a subprocess against the PostgreSQL at 127.0.0.1:5432 and is
killed with SIGKILL or SIGTERM (or stopped) while pg_dump is streaming; the S3 case talks HTTP to a moto server.
What runs beside or after it (`list`, the next backup) runs in this process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import psutil
import psycopg
import pytest
import yaml
from psycopg import sql

from regal_dagster.engine.crypto import generate_master_key
from regal_dagster.engine.layout import PARTIAL_SUFFIX
from regal_dagster.engine.policy import load_policy
from regal_dagster.engine.storage import open_repository

from .conftest import MotoServer, init_repository, invoke_cli, use_test_aws_credentials, wait_for

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
MASTER_KEY_ENV = "REGAL_TEST_INTERRUPT_MASTER_KEY"
ROWS = 2_500_000  # ~190 MB of pg_dump output: a backup takes a few seconds
CLI = [sys.executable, "-m", "regal_dagster.cli"]


# --- environment ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env() -> Iterator[dict[str, str]]:
    """Dummy AWS credentials and a master key, in this process and for the CLI subprocesses."""
    with pytest.MonkeyPatch.context() as mp:
        use_test_aws_credentials(mp, "testing-access-key", "testing-secret-key")
        mp.delenv("REGAL_POLICY", raising=False)
        mp.setenv(MASTER_KEY_ENV, generate_master_key())
        yield dict(os.environ)


@pytest.fixture(scope="module")
def moto_endpoint(env: dict[str, str]) -> Iterator[str]:
    with MotoServer() as endpoint:
        yield endpoint


def _dsn(dbname: str) -> str:
    return f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{dbname}"


def _admin() -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(_dsn("postgres"), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"no PostgreSQL at {PG_HOST}:{PG_PORT} ({exc}): start it (.ci/run shows how)")


@pytest.fixture(scope="module")
def big_db() -> Iterator[str]:
    """A database large enough that a backup takes a few seconds."""
    name = f"regal_interrupt_{uuid.uuid4().hex[:10]}"
    with _admin() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
    try:
        with psycopg.connect(_dsn(name), autocommit=True) as conn:
            conn.execute("SET synchronous_commit = off")
            conn.execute(
                f"CREATE TABLE sales AS SELECT g AS id, md5(g::text) || ' ' || md5((g * 7)::text) "
                f"|| ' ' || (g % 977)::text AS payload FROM generate_series(1, {int(ROWS)}) AS g"
            )
            conn.execute("VACUUM ANALYZE sales")  # its size known, as on a live server: read by a psql child
        yield name
    finally:
        with _admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


# --- helpers ----------------------------------------------------------------------------------------


def _write_policy(directory: Path, dbname: str, repository: dict[str, Any]) -> Path:
    path = directory / "regal_backup.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "repository": repository,
                "encryption": {"keyset": "keyset.json", "master_key": {"env": MASTER_KEY_ENV}},
                "targets": {"main": {"kind": "postgres", "dsn": _dsn(dbname)}},
            },
            sort_keys=False,
        )
    )
    init_repository(load_policy(path))
    return path


def _cli(policy: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`regal-backup --policy POLICY ARGS` with the environment `env`, in this process (conftest.invoke_cli): the
    commands that run beside a killed or stopped backup need no process of their own; the backups that are killed
    have one (_start_backup)."""
    return invoke_cli(["--policy", str(policy), *args], env=env)


def _listed_backups(policy: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    out = _cli(policy, env, "list", "--json")
    assert out.returncode == 0, out.stderr
    document = json.loads(out.stdout)
    assert document["damaged"] == []
    return document["backups"]  # type: ignore[no-any-return]


def _wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    return wait_for(condition, what, timeout, interval)


@dataclass
class RunningBackup:
    process: subprocess.Popen[bytes]
    stderr_path: Path
    pg_dumps: list[psutil.Process]

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def _start_backup(
    policy: Path, env: dict[str, str], tmp_path: Path, in_flight: Callable[[], bool]
) -> RunningBackup:
    """Start `regal-backup backup main` and return once `in_flight()` holds (rows streaming into the repository)."""
    stderr_path = tmp_path / f"backup-{uuid.uuid4().hex[:6]}.stderr"
    with open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(
            [*CLI, "--policy", str(policy), "backup", "main"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    parent = psutil.Process(process.pid)

    def streaming() -> tuple[list[psutil.Process]] | None:
        if process.poll() is not None:
            pytest.fail(
                f"the backup ended before it could be interrupted (exit {process.returncode}): "
                f"{stderr_path.read_text()}"
            )
        try:  # rows are read in-process; pg_dump (the schema) may have finished already
            dumps = [c for c in parent.children(recursive=True) if c.name() in ("pg_dump", "psql")]
        except psutil.NoSuchProcess:
            return None
        return (dumps,) if in_flight() else None

    (pg_dumps,) = _wait_for(streaming, 30, "the backup's rows to stream and the backup to be in flight")
    return RunningBackup(process, stderr_path, pg_dumps)


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE  # exited; only its (new) parent has not reaped it yet
    except psutil.NoSuchProcess:
        return True


def _assert_no_pg_dump_left(run: RunningBackup, timeout: float = 15) -> None:
    _wait_for(
        lambda: all(_gone(p) for p in run.pg_dumps),
        timeout,
        f"pg_dump {[p.pid for p in run.pg_dumps]} to exit after its parent {run.process.pid} died",
    )


def _assert_no_sessions_left(dbname: str, timeout: float = 20) -> None:
    """Neither pg_dump's session nor the backup's own (snapshot, facts) is left on the server."""

    def none_left() -> bool:
        with _admin() as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (dbname,),
            ).fetchone()
        return row is not None and row[0] == 0

    _wait_for(none_left, timeout, f"the killed backup's sessions on {dbname} to end", interval=0.2)


def _partials(root: Path) -> list[Path]:
    return [p for p in root.rglob(f"*{PARTIAL_SUFFIX}")]


def _partial_in_flight(root: Path, min_bytes: int = 1024 * 1024) -> Callable[[], bool]:
    def check() -> bool:
        return any(p.stat().st_size >= min_bytes for p in _partials(root) if p.exists())

    return check


# --- local repository -------------------------------------------------------------------------------


def test_sigkill_midway_leaves_no_backup_and_no_lock(
    tmp_path: Path, env: dict[str, str], big_db: str
) -> None:
    repo_root = tmp_path / "repo"
    policy = _write_policy(tmp_path, big_db, {"url": str(repo_root)})
    run = _start_backup(policy, env, tmp_path, _partial_in_flight(repo_root))
    # the big table's rows come through a psql child that imported the backup's snapshot
    assert "psql" in [p.name() for p in run.pg_dumps], run.pg_dumps

    os.kill(run.process.pid, signal.SIGKILL)
    assert run.process.wait(timeout=10) == -signal.SIGKILL

    # pg_dump and psql do not outlive their parent: they get EPIPE on their next write and exit.
    _assert_no_pg_dump_left(run)
    _assert_no_sessions_left(big_db)
    # Nothing is visible as a backup. SIGKILL cannot clean up: the .partial file and the objects finished
    # so far stay, without a manifest, so they are not a backup (prune removes them after a grace period).
    assert _listed_backups(policy, env) == []
    assert not [p for p in (repo_root / "backups").rglob("*") if p.name == "manifest.json"]
    # The flock died with the process: a new backup of the same target takes the lock and succeeds.
    out = _cli(policy, env, "backup", "main", "--json")
    assert out.returncode == 0, out.stderr
    done = json.loads(out.stdout)
    assert done["rows"] == ROWS
    assert [b["backup_id"] for b in _listed_backups(policy, env)] == [done["backup_id"]]


def test_sigterm_midway_cleans_up(tmp_path: Path, env: dict[str, str], big_db: str) -> None:
    repo_root = tmp_path / "repo"
    policy = _write_policy(tmp_path, big_db, {"url": str(repo_root)})
    run = _start_backup(policy, env, tmp_path, _partial_in_flight(repo_root))

    os.kill(run.process.pid, signal.SIGTERM)
    assert run.process.wait(timeout=30) == 128 + signal.SIGTERM
    assert "Traceback" not in run.stderr

    _assert_no_pg_dump_left(run, timeout=1)  # killed and reaped by the backup itself
    _assert_no_sessions_left(big_db)
    assert _partials(repo_root) == []  # graceful: the unfinished object was removed
    assert _listed_backups(policy, env) == []
    assert not (repo_root / "backups").exists() or not [
        p for p in (repo_root / "backups").rglob("*") if p.is_file()
    ]
    repo = open_repository(load_policy(policy))
    with repo.lock("main"):  # released
        pass


@pytest.fixture
def s3_bucket(moto_endpoint: str) -> tuple[Any, str]:
    s3 = boto3.client("s3", region_name="us-east-1", endpoint_url=moto_endpoint)
    bucket = f"regal-interrupt-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    return s3, bucket


def _s3_repository(moto_endpoint: str, bucket: str) -> dict[str, Any]:
    return {
        "url": f"s3://{bucket}/prefix",
        "region": "us-east-1",
        "endpoint_url": moto_endpoint,
        "part_size_mb": 5,
    }


@pytest.mark.parametrize("store", ["local", "s3"])
def test_second_backup_of_the_same_target_fails_at_once(
    store: str, tmp_path: Path, env: dict[str, str], big_db: str, request: pytest.FixtureRequest
) -> None:
    repo_root = tmp_path / "repo"
    if store == "local":
        policy = _write_policy(tmp_path, big_db, {"url": str(repo_root)})
        in_flight = _partial_in_flight(repo_root, min_bytes=1)
    else:
        s3, bucket = request.getfixturevalue("s3_bucket")
        policy = _write_policy(
            tmp_path, big_db, _s3_repository(request.getfixturevalue("moto_endpoint"), bucket)
        )

        def in_flight() -> bool:
            return bool(s3.list_multipart_uploads(Bucket=bucket).get("Uploads"))

    first = _start_backup(policy, env, tmp_path, in_flight)
    # Make the first backup as slow as we like: stop it while it holds the lock, mid-stream.
    first.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        second = _cli(policy, env, "backup", "main")
        elapsed = time.monotonic() - started
    finally:
        first.process.send_signal(signal.SIGCONT)
    assert second.returncode == 1, second.stderr
    assert "another backup of 'main' is running" in second.stderr
    assert f"process {first.process.pid} on" in second.stderr  # names the holder
    assert "what to do:" in second.stderr and "Traceback" not in second.stderr
    assert elapsed < 15  # it did not wait for the first one (lock_wait defaults to 0)
    # The refused attempt did not disturb the running backup, which completes as the only backup.
    assert first.process.wait(timeout=60) == 0, first.stderr
    backups = _listed_backups(policy, env)
    assert len(backups) == 1 and backups[0]["rows"] == ROWS
    if store == "local":
        assert _partials(repo_root) == []
    else:
        assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert "prefix/locks/main.json" not in keys


# --- S3 on moto -------------------------------------------------------------------------------------


def test_sigterm_midway_s3_leaves_no_backup_lock_or_upload(
    tmp_path: Path, env: dict[str, str], big_db: str, moto_endpoint: str, s3_bucket: tuple[Any, str]
) -> None:
    s3, bucket = s3_bucket
    policy = _write_policy(tmp_path, big_db, _s3_repository(moto_endpoint, bucket))

    def uploading() -> bool:
        uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        if not uploads:
            return False
        parts = s3.list_parts(Bucket=bucket, Key=uploads[0]["Key"], UploadId=uploads[0]["UploadId"])
        return bool(parts.get("Parts"))

    run = _start_backup(policy, env, tmp_path, uploading)
    assert s3.get_object(Bucket=bucket, Key="prefix/locks/main.json")  # the lease is held while it runs

    os.kill(run.process.pid, signal.SIGTERM)
    assert run.process.wait(timeout=30) == 128 + signal.SIGTERM
    assert "Traceback" not in run.stderr

    _assert_no_pg_dump_left(run, timeout=1)
    _assert_no_sessions_left(big_db)
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")  # aborted, not left to bill
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys == ["prefix/regal-repository.json"]  # no lock object, no backup objects
    assert _listed_backups(policy, env) == []
    with open_repository(load_policy(policy)).lock("main"):
        pass
