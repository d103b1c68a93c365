"""The S3 repository against a real S3 API: a moto server over HTTP, and a real PostgreSQL.

Nothing here mocks boto3: the engine talks HTTP to a moto server on a free localhost port, and backs up
and restores real databases on the PostgreSQL at 127.0.0.1:5432 (user postgres, trust auth).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import psycopg
import pytest
import yaml
from psycopg import sql

from regal_dagster.engine import catalog
from regal_dagster.engine.backup import run_backup
from regal_dagster.engine.crypto import create_keyset, generate_master_key, load_keyring
from regal_dagster.engine.errors import IntegrityError, LockedError, RegalError
from regal_dagster.engine.policy import Policy, load_policy
from regal_dagster.engine.postgresql.tools import find_pg_tool
from regal_dagster.engine.sources.postgres.dump import Table
from regal_dagster.engine.sources.postgres.restore import restore_database
from regal_dagster.engine.sources.postgres.validate import restored_table_facts
from regal_dagster.engine.storage import open_repository
from regal_dagster.engine.storage.s3 import S3Repository
from regal_dagster.engine.verify import verify_backup

from .conftest import MotoServer, init_repository, invoke_cli, use_test_aws_credentials

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
MASTER_KEY_ENV = "REGAL_TEST_S3_MASTER_KEY"
PART_SIZE_MB = 5

# Distinctive plaintext that must never show up in stored bytes.
SECRET_TABLE = "loyalty_members_qzx"
SECRET_EMAIL = "ada.lovelace+regal@example-pos.test"
SECRET_TOKEN = "tok_4f9Qz7LmP2xR8sVbK1wY"
AWKWARD_TABLE = 'odd "table" name'
AWKWARD_COLUMN = 'the "quoted" column'
UNICODE_TEXT = "Grüße — 日本語 — emoji 🎉👩‍💻🇵🇹 — RTL שלום עולם مرحبا بالعالم — \u200fmark\u200e"
TRICKY_TEXT = "line1\nline2\ttab \\backslash 'single' \"double\" $$dollar$$ \\N not-null"
NUL_BYTES = b"\x00\x01\x00\xff\x00\x00binary\x00"


# --- environment: dummy AWS credentials and a moto server ------------------------------------------


@pytest.fixture(scope="module")
def aws_env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        use_test_aws_credentials(mp, "testing-access-key", "testing-secret-key")
        yield


@pytest.fixture(scope="module")
def moto_endpoint(aws_env: None) -> Iterator[str]:
    with MotoServer() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def s3(moto_endpoint: str):  # type: ignore[no-untyped-def]
    return boto3.client("s3", region_name="us-east-1", endpoint_url=moto_endpoint)


@pytest.fixture
def bucket(s3) -> str:  # type: ignore[no-untyped-def]
    name = f"regal-test-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def master_key(monkeypatch: pytest.MonkeyPatch) -> str:
    key = generate_master_key()
    monkeypatch.setenv(MASTER_KEY_ENV, key)
    return key


# --- PostgreSQL -------------------------------------------------------------------------------------


def _dsn(dbname: str) -> str:
    return f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{dbname}"


def _admin() -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(_dsn("postgres"), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"no PostgreSQL at {PG_HOST}:{PG_PORT} ({exc}): start it (.ci/run shows how)")


def _drop_database(name: str) -> None:
    with _admin() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def new_database_name() -> Iterator[Any]:
    """Unique database names; every one handed out is dropped afterwards (created or not)."""
    names: list[str] = []

    def make(label: str) -> str:
        names.append(f"regal_s3_{label}_{uuid.uuid4().hex[:10]}")
        return names[-1]

    yield make
    for name in names:
        _drop_database(name)


def _create_awkward_database(name: str) -> None:
    with _admin() as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8'").format(sql.Identifier(name))
        )
    big_text = os.urandom(3_900_000).hex()[:5_200_000]  # ~5 MB of text, barely compressible past hex
    big_blob = os.urandom(3 * 1024 * 1024)  # incompressible: the stored dump exceeds one 5 MB part
    with psycopg.connect(_dsn(name), autocommit=True) as conn:
        conn.execute(
            sql.SQL("""
            CREATE TABLE {awkward} (
                id integer PRIMARY KEY,
                {column} text,
                note text,
                blob bytea,
                amount numeric(12, 2),
                seen_at timestamptz,
                tags text[],
                doc jsonb
            )""").format(awkward=sql.Identifier(AWKWARD_TABLE), column=sql.Identifier(AWKWARD_COLUMN))
        )
        conn.execute(
            sql.SQL("CREATE INDEX {} ON {} (amount, left(note, 16))").format(
                sql.Identifier('idx "odd" note'), sql.Identifier(AWKWARD_TABLE)
            )
        )
        conn.execute(
            sql.SQL("CREATE VIEW {} AS SELECT id, {} FROM {} WHERE note IS NOT NULL").format(
                sql.Identifier("view with spaces"),
                sql.Identifier(AWKWARD_COLUMN),
                sql.Identifier(AWKWARD_TABLE),
            )
        )
        insert = sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s, %s, %s, %s)").format(
            sql.Identifier(AWKWARD_TABLE)
        )
        rows = [
            (
                1,
                UNICODE_TEXT,
                TRICKY_TEXT,
                NUL_BYTES,
                "12.50",
                "2024-02-29 23:59:59.123456+00",
                ["ünï", "with space", 'quote"d', None],
                json.dumps({"emoji": "🎉", "rtl": "שלום", "nul": "\\u0000"}),
            ),
            (2, None, None, None, None, None, None, None),  # NULLs everywhere
            (3, "", "", b"", "0", "1970-01-01 00:00:00+00", [], json.dumps({})),  # empty, not NULL
            (4, "big text", big_text, big_blob, "-99999.99", "2099-12-31 12:00:00+05:30", ["x"], "null"),
        ]
        with conn.cursor() as cur:
            cur.executemany(insert, rows)
        conn.execute(
            sql.SQL("""
            CREATE TABLE {secret} (
                id serial PRIMARY KEY,
                email text NOT NULL UNIQUE,
                card_token text NOT NULL,
                points integer DEFAULT 0
            )""").format(secret=sql.Identifier(SECRET_TABLE))
        )
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (email, card_token, points) VALUES (%s, %s, 42), "
                "('second@example.test', 'tok_other', 7)"
            ).format(sql.Identifier(SECRET_TABLE)),
            (SECRET_EMAIL, SECRET_TOKEN),
        )
        conn.execute("ANALYZE")


@pytest.fixture(scope="module")
def source_db() -> Iterator[str]:
    """A database with awkward content, shared by the tests of this module (they only read it)."""
    name = f"regal_s3_src_{uuid.uuid4().hex[:10]}"
    try:
        _create_awkward_database(name)
        yield name
    finally:
        _drop_database(name)


# --- policy -----------------------------------------------------------------------------------------


def _write_policy(directory: Path, *, url: str, endpoint_url: str, dbname: str, **repository: Any) -> Policy:
    document = {
        "repository": {
            "url": url,
            "region": "us-east-1",
            "endpoint_url": endpoint_url,
            "part_size_mb": PART_SIZE_MB,
            **repository,
        },
        "encryption": {"keyset": "keyset.json", "master_key": {"env": MASTER_KEY_ENV}},
        "targets": {"main": {"kind": "postgres", "dsn": _dsn(dbname)}},
    }
    path = directory / "regal_backup.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return load_policy(path)


@pytest.fixture
def s3_policy(tmp_path: Path, moto_endpoint: str, bucket: str, source_db: str, master_key: str) -> Policy:
    policy = _write_policy(
        tmp_path, url=f"s3://{bucket}/prefix", endpoint_url=moto_endpoint, dbname=source_db
    )
    init_repository(policy)
    return policy


def _all_objects(s3, bucket: str) -> dict[str, dict[str, Any]]:  # type: ignore[no-untyped-def]
    objects: dict[str, dict[str, Any]] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            objects[item["Key"]] = item
    return objects


def _schema_dump(dbname: str) -> str:
    out = subprocess.run(
        [
            "pg_dump",
            "--schema-only",
            "--no-owner",
            "--no-privileges",
            "-h",
            PG_HOST,
            "-p",
            str(PG_PORT),
            "-U",
            PG_USER,
            "--no-password",
            dbname,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    lines = []
    for line in out.splitlines():
        if line.startswith(("\\restrict", "\\unrestrict")):  # random per-run keys (pg_dump >= 15.14)
            continue
        lines.append(line.replace(dbname, "<DBNAME>"))
    return "\n".join(lines)


def _awkward_rows(dbname: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(_dsn(dbname)) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        return conn.execute(
            sql.SQL("SELECT * FROM {} ORDER BY id").format(sql.Identifier(AWKWARD_TABLE))
        ).fetchall()


def _secret_rows(dbname: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(_dsn(dbname)) as conn:
        return conn.execute(
            sql.SQL("SELECT * FROM {} ORDER BY id").format(sql.Identifier(SECRET_TABLE))
        ).fetchall()


# --- round trip -------------------------------------------------------------------------------------


def test_round_trip_through_s3(
    s3_policy: Policy,
    s3,
    bucket: str,
    source_db: str,  # type: ignore[no-untyped-def]
    new_database_name,
) -> None:
    repo = open_repository(s3_policy)
    assert isinstance(repo.backend, S3Repository)  # under the retry and logging wrappers
    calls: list[str] = []
    for operation in ("CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload", "PutObject"):
        repo.client.meta.events.register(
            f"before-call.s3.{operation}", lambda model, **_: calls.append(model.name)
        )

    manifest = run_backup(s3_policy, "main", "daily", repo=repo).manifest

    # Objects landed under the prefix, encrypted at rest by the store as well, and no lock is left.
    objects = _all_objects(s3, bucket)
    record = max(manifest.objects, key=lambda o: o.size)  # the pack holding the table with the large values
    dump_key = f"prefix/{record.key}"
    assert set(objects) == {
        "prefix/regal-repository.json",
        f"prefix/backups/main/{manifest.backup_id}/manifest.json",
        *(f"prefix/{o.key}" for o in manifest.objects),
    }
    # both tables (never analyzed: estimated small) in one pack
    assert {o.name for o in manifest.objects} == {"schema.pgdump", "tables/pack-00001.copy"}
    for key in objects:
        assert repo.server_side_encryption(key.removeprefix("prefix/")) == "AES256", key

    # That object is larger than a part, so it went up as a multipart upload (S3's "-N" ETag says so too).
    assert record.size > PART_SIZE_MB * 1024 * 1024
    assert objects[dump_key]["Size"] == record.size
    parts = -(-record.size // (PART_SIZE_MB * 1024 * 1024))
    assert objects[dump_key]["ETag"].strip('"').endswith(f"-{parts}")
    assert calls.count("CreateMultipartUpload") == 1 and calls.count("CompleteMultipartUpload") == 1
    assert calls.count("UploadPart") == parts
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")

    # The catalog sees exactly this backup, and it verifies.
    keyring = load_keyring(s3_policy)
    backups, damaged = catalog.list_backups(repo, keyring, "main")
    assert [m.backup_id for m in backups] == [manifest.backup_id] and not damaged
    result = verify_backup(repo, keyring, manifest)
    assert result.ok, result.problems

    # Restore into a new database: the manifest's fingerprints match ...
    restored = new_database_name("restored")
    report = restore_database(repo, keyring, manifest, _dsn(restored))
    assert report.target_state == "created"
    assert report.ok, report.validation_problems
    assert report.tables == 2 and report.rows == 4 + 2
    tables = [Table.from_facts(t) for t in manifest.source["tables"]]
    psql = find_pg_tool("psql", 15)
    restored_facts = restored_table_facts(_dsn(restored), tables, psql)
    assert [{k: f[k] for k in ("schema", "name", "columns", "rows")} for f in restored_facts] == [
        {k: t[k] for k in ("schema", "name", "columns", "rows")} for t in manifest.source["tables"]]
    assert all(keyring.fingerprint_matches(t["sha256"], f["sha256"])  # the manifest holds keyed fingerprints
               for t, f in zip(manifest.source["tables"], restored_facts, strict=True))
    # ... the schema is identical ...
    assert _schema_dump(restored) == _schema_dump(source_db)
    # ... and so is the awkward data, compared value by value.
    source_rows, restored_rows = _awkward_rows(source_db), _awkward_rows(restored)
    assert restored_rows == source_rows
    by_id = {row[0]: row for row in restored_rows}
    assert by_id[1][1] == UNICODE_TEXT and by_id[1][2] == TRICKY_TEXT and by_id[1][3] == NUL_BYTES
    assert by_id[2][1:] == (None,) * 7
    assert by_id[3][1] == "" and by_id[3][3] == b""
    assert len(by_id[4][2]) == 5_200_000
    assert _secret_rows(restored) == _secret_rows(source_db)


def test_stored_bytes_hold_no_plaintext(s3_policy: Policy, s3, bucket: str) -> None:  # type: ignore[no-untyped-def]
    manifest = run_backup(s3_policy, "main").manifest
    objects = _all_objects(s3, bucket)
    assert any(key.endswith("/schema.pgdump") for key in objects)
    secrets = [SECRET_EMAIL, SECRET_TOKEN, "tok_other", "second@example.test", UNICODE_TEXT, TRICKY_TEXT]
    for key in objects:
        stored = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        for secret in secrets:
            for encoding in ("utf-8", "utf-16-le"):
                assert secret.encode(encoding) not in stored, f"{secret!r} in plaintext in {key}"
        assert NUL_BYTES not in stored, key
        if not key.endswith("/manifest.json"):
            # The manifest lists table names (for restore validation); the data objects must not.
            assert SECRET_TABLE.encode() not in stored, f"table name in plaintext in {key}"
            assert AWKWARD_COLUMN.encode() not in stored, f"column name in plaintext in {key}"
    # The data object starts with the regal-backup header, not with a pg_dump archive header.
    dump = s3.get_object(Bucket=bucket, Key=f"prefix/{manifest.objects[0].key}")["Body"].read(16)
    assert dump.startswith(b"RGLB") and b"PGDMP" not in dump


def test_corrupted_object_fails_verification_naming_it(s3_policy: Policy, s3, bucket: str) -> None:  # type: ignore[no-untyped-def]
    repo = open_repository(s3_policy)
    manifest = run_backup(s3_policy, "main", repo=repo).manifest
    record = manifest.objects[0]
    full_key = f"prefix/{record.key}"
    data = bytearray(s3.get_object(Bucket=bucket, Key=full_key)["Body"].read())
    middle = len(data) // 2
    data[middle] ^= 0x01
    s3.put_object(Bucket=bucket, Key=full_key, Body=bytes(data), ServerSideEncryption="AES256")

    keyring = load_keyring(s3_policy)
    result = verify_backup(repo, keyring, manifest)
    assert not result.ok
    assert len(result.problems) == 1
    assert record.key in result.problems[0]
    assert "authentication" in result.problems[0]
    # The CLI says the same and exits 3.
    out = invoke_cli(["--policy", str(s3_policy.base_dir / "regal_backup.yaml"), "verify", manifest.backup_id])
    assert out.returncode == 3, out.stderr
    assert record.key in out.stdout and "FAIL" in out.stdout


def test_corrupted_object_fails_restore_naming_it(
    s3_policy: Policy, s3, bucket: str, new_database_name
) -> None:  # type: ignore[no-untyped-def]
    repo = open_repository(s3_policy)
    manifest = run_backup(s3_policy, "main", repo=repo).manifest
    full_key = f"prefix/{manifest.objects[0].key}"
    data = bytearray(s3.get_object(Bucket=bucket, Key=full_key)["Body"].read())
    data[len(data) // 2] ^= 0x80
    s3.put_object(Bucket=bucket, Key=full_key, Body=bytes(data))
    target = new_database_name("corrupt")
    with pytest.raises(IntegrityError) as caught:
        restore_database(repo, load_keyring(s3_policy), manifest, _dsn(target))
    assert manifest.objects[0].key in caught.value.message


# --- clear errors -----------------------------------------------------------------------------------


def test_missing_bucket_is_a_clear_error(
    tmp_path: Path, moto_endpoint: str, source_db: str, master_key: str
) -> None:
    missing = f"regal-missing-{uuid.uuid4().hex[:8]}"
    policy = _write_policy(
        tmp_path, url=f"s3://{missing}/prefix", endpoint_url=moto_endpoint, dbname=source_db
    )
    create_keyset(policy)
    with pytest.raises(RegalError) as caught:
        run_backup(policy, "main")
    assert type(caught.value) is RegalError
    assert missing in caught.value.message and "does not exist" in caught.value.message
    assert caught.value.hint and "create" in caught.value.hint
    with pytest.raises(RegalError, match=missing):
        catalog.list_backups(open_repository(policy), load_keyring(policy))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_endpoint_is_a_clear_error(
    tmp_path: Path, aws_env: None, source_db: str, master_key: str
) -> None:
    endpoint = f"http://127.0.0.1:{_free_port()}"
    policy = _write_policy(tmp_path, url="s3://regal-nowhere/prefix", endpoint_url=endpoint, dbname=source_db)
    create_keyset(policy)
    repo = open_repository(policy)
    for action in (
        lambda: run_backup(policy, "main", repo=repo).manifest,
        lambda: repo.size("x"),
        lambda: catalog.list_backups(repo, load_keyring(policy)),
        lambda: repo.get_bytes("x"),
    ):
        with pytest.raises(RegalError) as caught:
            action()
        assert "cannot reach s3://regal-nowhere/prefix" in caught.value.message
        assert caught.value.hint and "endpoint_url" in caught.value.hint
    with pytest.raises(RegalError), repo.lock("main"):
        pass
    # The CLI prints the error and its hint, with no traceback, and exits 1.
    out = invoke_cli(["--policy", str(tmp_path / "regal_backup.yaml"), "list"])
    assert out.returncode == 1
    assert out.stderr.startswith("error: cannot reach") and "Traceback" not in out.stderr


# --- the lease lock ---------------------------------------------------------------------------------


def _lease(s3, bucket: str) -> dict[str, Any] | None:  # type: ignore[no-untyped-def]
    try:
        return json.loads(s3.get_object(Bucket=bucket, Key="prefix/locks/main.json")["Body"].read())  # type: ignore[no-any-return]
    except s3.exceptions.NoSuchKey:
        return None


def test_lock_is_exclusive_and_released(s3_policy: Policy, s3, bucket: str) -> None:  # type: ignore[no-untyped-def]
    repo = open_repository(s3_policy)
    other = open_repository(s3_policy)
    with repo.lock("main"):
        lease = _lease(s3, bucket)
        assert lease is not None and lease["pid"] == os.getpid() and lease["expires"] > time.time()
        started = time.monotonic()
        with pytest.raises(LockedError) as caught, other.lock("main"):
            pytest.fail("a second holder got the lock")
        assert time.monotonic() - started < 5  # lock_wait 0: fails at once
        message = caught.value.message
        assert "another backup of 'main' is running" in message
        assert f"process {os.getpid()} on {socket.gethostname()}" in message
        assert caught.value.hint
        with other.lock("other_target"):  # locks are per target
            pass
        # run_backup refuses too, and stores nothing.
        with pytest.raises(LockedError):
            run_backup(s3_policy, "main", repo=other)
    assert _lease(s3, bucket) is None
    assert not [k for k in _all_objects(s3, bucket) if "/backups/" in k]
    with other.lock("main"):
        assert _lease(s3, bucket) is not None
    assert _lease(s3, bucket) is None


def test_expired_lease_is_taken_over(s3_policy: Policy, s3, bucket: str) -> None:  # type: ignore[no-untyped-def]
    dead = {
        "host": "crashed-host",
        "pid": 4242,
        "since": "2020-01-01T00:00:00+00:00",
        "token": "dead",
        "expires": time.time() - 60,
    }
    s3.put_object(Bucket=bucket, Key="prefix/locks/main.json", Body=json.dumps(dead).encode())
    repo = open_repository(s3_policy)
    with repo.lock("main"):
        lease = _lease(s3, bucket)
        assert lease is not None and lease["token"] != "dead" and lease["pid"] == os.getpid()
    assert _lease(s3, bucket) is None
    # An unreadable lease counts as expired too.
    s3.put_object(Bucket=bucket, Key="prefix/locks/main.json", Body=b"not json")
    with repo.lock("main"):
        assert _lease(s3, bucket)["pid"] == os.getpid()  # type: ignore[index]


def test_live_foreign_lease_blocks_and_names_its_holder(s3_policy: Policy, s3, bucket: str) -> None:  # type: ignore[no-untyped-def]
    live = {
        "host": "backup-node-7",
        "pid": 31337,
        "since": "2024-05-01T10:00:00+00:00",
        "token": "theirs",
        "expires": time.time() + 600,
    }
    s3.put_object(Bucket=bucket, Key="prefix/locks/main.json", Body=json.dumps(live).encode())
    with (
        pytest.raises(LockedError, match="process 31337 on backup-node-7 since 2024-05-01T10:00:00"),
        open_repository(s3_policy).lock("main"),
    ):
        pass
    assert _lease(s3, bucket)["token"] == "theirs"  # type: ignore[index]


def test_lock_wait_queues_until_the_holder_releases(
    tmp_path: Path, moto_endpoint: str, bucket: str, source_db: str, master_key: str
) -> None:
    import threading

    policy = _write_policy(
        tmp_path, url=f"s3://{bucket}/prefix", endpoint_url=moto_endpoint, dbname=source_db, lock_wait="20s"
    )
    holder, waiter = open_repository(policy), open_repository(policy)
    acquired, release = threading.Event(), threading.Event()

    def hold() -> None:
        with holder.lock("main"):
            acquired.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    assert acquired.wait(10)
    threading.Timer(1.0, release.set).start()
    started = time.monotonic()
    with waiter.lock("main"):
        waited = time.monotonic() - started
    thread.join()
    assert 0.8 < waited < 10


def test_lease_is_renewed_but_never_clobbers_a_new_holder(
    tmp_path: Path,
    moto_endpoint: str,
    s3,  # type: ignore[no-untyped-def]
    bucket: str,
    source_db: str,
    master_key: str,
) -> None:
    policy = _write_policy(
        tmp_path, url=f"s3://{bucket}/prefix", endpoint_url=moto_endpoint, dbname=source_db, lock_lease="1.5s"
    )
    repo = open_repository(policy)
    with repo.lock("main"):
        first = _lease(s3, bucket)
        time.sleep(1.3)  # renewed every lease/3 = 0.5 s
        renewed = _lease(s3, bucket)
        assert renewed is not None and renewed["token"] == first["token"]  # type: ignore[index]
        assert renewed["expires"] > first["expires"]  # type: ignore[index]
        # We stall; another process takes the (expired) lease over. We must not overwrite or delete it.
        theirs = {"host": "other", "pid": 7, "since": "now", "token": "theirs", "expires": time.time() + 600}
        s3.put_object(Bucket=bucket, Key="prefix/locks/main.json", Body=json.dumps(theirs).encode())
        time.sleep(1.2)
        assert _lease(s3, bucket)["token"] == "theirs"  # type: ignore[index]
    assert _lease(s3, bucket)["token"] == "theirs"  # type: ignore[index]


# --- the multipart writer ---------------------------------------------------------------------------


def test_aborted_writer_leaves_no_upload_even_if_written_to_later(s3_policy: Policy, s3, bucket: str) -> None:  # type: ignore[no-untyped-def]
    repo = open_repository(s3_policy)
    part = PART_SIZE_MB * 1024 * 1024
    writer = repo.writer("backups/main/x/database.pgdump")
    writer.write(os.urandom(part + 1000))  # one part in flight: a multipart upload exists
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
    writer.write(os.urandom(part - 2000))  # buffered, not yet sent
    writer.abort()
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
    # A late flush (a stream finalizer after the failure) must not start a new, orphaned upload.
    writer.write(os.urandom(part))
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
    assert not [k for k in _all_objects(s3, bucket) if "/backups/" in k]


def test_failing_source_stream_leaves_no_upload_and_no_object(s3_policy: Policy, s3, bucket: str) -> None:  # type: ignore[no-untyped-def]
    import gc

    from regal_dagster.engine.pipeline import store_stream

    repo = open_repository(s3_policy)
    keyring = load_keyring(s3_policy)

    def chunks() -> Iterator[bytes]:
        # 10.45 MiB of incompressible data: one part sent, ~4 MB buffered in the writer, and ~1.6 MB still
        # inside zstd and Tink when the source fails; those flush late and would cross a part boundary.
        left = 10_700 * 1024
        while left > 0:
            yield os.urandom(min(left, 1024 * 1024))
            left -= 1024 * 1024
        raise RuntimeError("pg_dump died")

    with pytest.raises(RuntimeError, match="pg_dump died"):
        store_stream(
            repo,
            "backups/main/x/database.pgdump",
            chunks(),
            keyring=keyring,
            backup_id="main-20260101T000000Z-abcdef",
            object_name="database.pgdump",
            content="test",
        )
    gc.collect()  # the Tink stream's finalizer flushes into the (aborted) writer
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
    assert not [k for k in _all_objects(s3, bucket) if "/backups/" in k]


def test_upload_errors_are_regal_errors(s3_policy: Policy, s3, bucket: str) -> None:  # type: ignore[no-untyped-def]
    repo = open_repository(s3_policy)
    for item in s3.list_objects_v2(Bucket=bucket).get("Contents", []):  # the repository's marker
        s3.delete_object(Bucket=bucket, Key=item["Key"])
    s3.delete_bucket(Bucket=bucket)  # the bucket disappears under a running backup
    writer = repo.writer("backups/main/x/database.pgdump")
    with pytest.raises(RegalError, match=bucket), writer:
        writer.write(os.urandom(PART_SIZE_MB * 1024 * 1024 + 1))
    small = repo.writer("backups/main/x/manifest.json")
    with pytest.raises(RegalError, match=bucket), small:
        small.write(b"{}")


def test_checks_pass_on_s3_and_capacity_is_measured_against_the_quota(s3_policy: Policy) -> None:
    from regal_dagster.engine.alerts import capacity_conditions
    from regal_dagster.engine.checks import run_checks

    repo = open_repository(s3_policy)
    manifest = run_backup(s3_policy, "main", repo=repo).manifest
    record = run_checks(s3_policy, repo, load_keyring(s3_policy), manifest.backup_id)
    assert record.passed, [o.description for o in record.outcomes]
    assert "server-side encryption on every object" in record.outcome("encryption").description  # type: ignore[union-attr]

    used = repo.usage_bytes()
    assert used >= manifest.stored_bytes
    tight = s3_policy.model_copy(update={"alerts": s3_policy.alerts.model_copy(update={
        "capacity": s3_policy.alerts.capacity.model_copy(update={"s3_quota_bytes": used})})})
    (condition,) = capacity_conditions(tight, repo)
    assert condition.details == {"used_bytes": used, "quota_bytes": used, "repository": repo.location}
    roomy = tight.model_copy(update={"alerts": tight.alerts.model_copy(update={
        "capacity": tight.alerts.capacity.model_copy(update={"s3_quota_bytes": used * 10})})})
    assert capacity_conditions(roomy, repo) == []
