"""Logical backups as faithful as pg_dump's (issue 15), each case built for real and checked by restoring it.

Every test builds an awkward database on the machine's PostgreSQL 15, backs it up, restores it into a new
database and compares the two: pg_dump's schema text and every table's rows. Nothing is mocked; the
concurrent-DDL test only holds the backup at one table (a pause in our own reading code) so the
statements it starts are certain to arrive while the backup runs.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from regal_dagster.engine.backup import run_backup
from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.errors import IntegrityError, RegalError
from regal_dagster.engine.manifest import Manifest
from regal_dagster.engine.pipeline import StoredBackup
from regal_dagster.engine.policy import Policy
from regal_dagster.engine.postgresql.tools import find_pg_tool
from regal_dagster.engine.sources.postgres import dump
from regal_dagster.engine.sources.postgres.restore import DatabaseRestore, restore_database
from regal_dagster.engine.storage import open_repository

from .conftest import DatabaseFactory, invoke_cli, load_awkward_data, make_policy, run_cli, write_policy_file
from .pg_compare import execute, full_schema_text, schema_text, table_contents, table_rows


def assert_same_database(restored: str, source: str, expected_contents: dict[str, list[str]] | None = None,
                         expected_schema: str | None = None) -> None:
    assert schema_text(restored) == (expected_schema if expected_schema is not None else schema_text(source))
    assert table_contents(restored) == (expected_contents if expected_contents is not None
                                        else table_contents(source))


def backup_and_restore(policy: Policy, factory: DatabaseFactory, **restore: Any) -> tuple[Manifest, str,
                                                                                          DatabaseRestore]:
    manifest = run_backup(policy, "pos").manifest
    target = factory.dsn(factory.new_name("regal_fid"))
    report = restore_database(open_repository(policy), load_keyring(policy), manifest, target, jobs=3, **restore)
    assert report.ok, report.validation_problems
    return manifest, target, report


@pytest.fixture(params=["in-process", "psql"])
def table_reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Backups and validation read small tables in-process and big ones through psql: both, on every table
    (the psql one checks that the backup did read through psql)."""
    if request.param == "in-process":
        yield "in-process"
        return
    from regal_dagster.engine.sources.postgres import validate

    monkeypatch.setattr(validate, "PSQL_COPY_BYTES", -1)
    monkeypatch.setattr(dump, "PSQL_COPY_BYTES", -1)
    read, real = [], dump.psql_copy_out

    def recorded(*args: Any, **kwargs: Any) -> Iterator[bytes]:
        if kwargs.get("snapshot"):
            read.append(args[2].label)
        return real(*args, **kwargs)

    monkeypatch.setattr(dump, "psql_copy_out", recorded)
    yield "psql"
    assert read, "no table was read through psql by the backup"


# --- case 1: concurrent DDL --------------------------------------------------------------------------

def _waiting_statements(dsn: str, marker: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return int(conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                "AND query LIKE %s", (f"%{marker}%",)).fetchone()[0])  # type: ignore[index]


def test_truncate_and_rewrite_during_a_backup_wait_for_it_and_lose_no_rows(
        system_pg: DatabaseFactory, tmp_path: Path, master_key: str, monkeypatch: pytest.MonkeyPatch,
        table_reader: str) -> None:
    source = system_pg.create()
    execute(source, """
        CREATE TABLE aaa_first (id int PRIMARY KEY, v text);
        INSERT INTO aaa_first SELECT g, 'first ' || g FROM generate_series(1, 200) g;
        CREATE TABLE emptied (id int PRIMARY KEY, v text);
        INSERT INTO emptied SELECT g, 'row ' || g FROM generate_series(1, 3000) g;
        CREATE TABLE retyped (id int PRIMARY KEY, amount int);
        INSERT INTO retyped SELECT g, g * 7 FROM generate_series(1, 2000) g;
    """)
    before_schema, before_rows = schema_text(source), table_contents(source)
    policy = make_policy(tmp_path, {"pos": source})

    ddl_queued = threading.Event()
    ddl_done: dict[str, float] = {}
    handed_over: list[str] = []

    def run_ddl(statement: str, marker: str) -> None:
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute(f"/* {marker} */ {statement}")
        ddl_done[marker] = time.monotonic()

    threads = [threading.Thread(target=run_ddl, args=("TRUNCATE emptied", "regal-test-truncate")),
               threading.Thread(target=run_ddl, args=("ALTER TABLE retyped ALTER COLUMN amount TYPE bigint",
                                                      "regal-test-alter"))]
    real_wait, real_close = dump.DumpSession.wait_for_schema_locks, dump.DumpSession.close

    def wait_then_start_ddl(session: dump.DumpSession) -> None:
        """Once the backup holds its locks (and pg_dump its own), before any row is read: the statements
        queue behind the backup's locks, so the workers cannot lock those tables themselves either."""
        real_wait(session)
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 20
        while _waiting_statements(source, "regal-test-") < 2:
            assert time.monotonic() < deadline, "the TRUNCATE and ALTER TABLE did not wait for the backup"
            time.sleep(0.05)
        ddl_queued.set()

    def close(session: dump.DumpSession) -> None:
        handed_over.extend(session.read_by_coordinator)
        real_close(session)

    monkeypatch.setattr(dump.DumpSession, "wait_for_schema_locks", wait_then_start_ddl)
    monkeypatch.setattr(dump.DumpSession, "close", close)
    manifest = run_backup(policy, "pos").manifest
    backup_ended = time.monotonic()
    for thread in threads:
        thread.join(timeout=30)
    assert ddl_queued.is_set()
    # The tables a statement was queued for were read through the session holding the locks.
    assert sorted(handed_over) == ["public.emptied", "public.retyped"]
    # Both statements waited for the backup to end, then did their work on the source.
    assert set(ddl_done) == {"regal-test-truncate", "regal-test-alter"}
    assert min(ddl_done.values()) >= backup_ended - 0.5
    assert table_contents(source)["public.emptied"] == []

    rows = {t["name"]: t["rows"] for t in manifest.source["tables"]}
    assert rows == {"aaa_first": 200, "emptied": 3000, "retyped": 2000}
    target = system_pg.dsn(system_pg.new_name("regal_fid"))
    report = restore_database(open_repository(policy), load_keyring(policy), manifest, target, jobs=2)
    assert report.ok, report.validation_problems
    assert_same_database(target, source, before_rows, before_schema)


def test_a_schema_change_queued_before_pg_dump_locks_is_let_through_and_the_backup_starts_again(
        system_pg: DatabaseFactory, tmp_path: Path, master_key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A DROP TABLE that queues behind the backup's locks before pg_dump has taken its own would make pg_dump
    wait for it while it waits for the backup, until the lock timeout. The backup cancels pg_dump's lock
    request, lets the DROP through and starts again: the backup is of the database after the DROP."""
    source = system_pg.create()
    execute(source, "CREATE TABLE kept (id int); INSERT INTO kept SELECT generate_series(1, 500); "
                    "CREATE TABLE doomed (id int); INSERT INTO doomed VALUES (1)")
    policy = make_policy(tmp_path, {"pos": source})
    real_chunks = dump.DumpSession.schema_chunks
    attempts: list[str] = []
    dropper = threading.Thread(target=execute, args=(source, "/* regal-test-drop */ DROP TABLE doomed"))

    def drop_queued_first(session: dump.DumpSession) -> Iterator[bytes]:
        attempts.append(session.snapshot)
        if len(attempts) == 1:  # the DROP queues behind the backup's locks before pg_dump starts
            dropper.start()
            deadline = time.monotonic() + 20
            while _waiting_statements(source, "regal-test-drop") < 1:
                assert time.monotonic() < deadline, "the DROP did not wait for the backup"
                time.sleep(0.02)
        yield from real_chunks(session)

    monkeypatch.setattr(dump.DumpSession, "schema_chunks", drop_queued_first)
    started = time.monotonic()
    manifest = run_backup(policy, "pos").manifest
    assert time.monotonic() - started < 30  # not the 60 s lock timeout
    dropper.join(timeout=10)
    assert len(attempts) == 2 and not dropper.is_alive()
    assert {t["name"]: t["rows"] for t in manifest.source["tables"]} == {"kept": 500}
    target = system_pg.dsn(system_pg.new_name("regal_fid"))
    report = restore_database(open_repository(policy), load_keyring(policy), manifest, target)
    assert report.ok, report.validation_problems
    assert_same_database(target, source)


def test_tables_created_while_the_backup_locks_are_backed_up_unless_changed_after_its_snapshot(
        system_pg: DatabaseFactory, tmp_path: Path, master_key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A table created between the backup's listing and its snapshot is locked after the snapshot; if it was
    truncated (or rewritten) in between, the snapshot would see it empty: the backup takes its snapshot again."""
    source = system_pg.create()
    execute(source, "CREATE TABLE old (id int); INSERT INTO old VALUES (1), (2)")
    policy = make_policy(tmp_path, {"pos": source})
    real_lock_present, real_lock_late = dump._lock_present, dump._lock_late_tables
    verdicts: list[bool] = []
    truncate_next = [True]

    def create_before_locking(cur: psycopg.Cursor[Any], tables: list[dump.Table], timeout: float) -> set[int]:
        if not verdicts and [t.name for t in tables] == ["old"]:  # the first listing: a table appears
            execute(source, "CREATE TABLE newcomer (v text); INSERT INTO newcomer VALUES ('a'), ('b'), ('c')")
        return real_lock_present(cur, tables, timeout)

    def truncate_after_the_first_snapshot(cur: psycopg.Cursor[Any], late: list[dump.Table], timeout: float) -> bool:
        if truncate_next[0]:
            truncate_next[0] = False
            execute(source, "TRUNCATE newcomer; INSERT INTO newcomer VALUES ('after')")
        verdicts.append(real_lock_late(cur, late, timeout))
        return verdicts[-1]

    monkeypatch.setattr(dump, "_lock_present", create_before_locking)
    monkeypatch.setattr(dump, "_lock_late_tables", truncate_after_the_first_snapshot)
    manifest = run_backup(policy, "pos").manifest
    # the first snapshot saw newcomer with 3 rows that were no longer its rows: refused; the second listed it
    assert verdicts == [False]
    assert {t["name"]: t["rows"] for t in manifest.source["tables"]} == {"old": 2, "newcomer": 1}

    execute(source, "DROP TABLE newcomer")
    verdicts.clear()
    manifest = run_backup(policy, "pos").manifest  # created meanwhile and left alone: in the backup
    assert verdicts == [True]
    assert {t["name"]: t["rows"] for t in manifest.source["tables"]} == {"old": 2, "newcomer": 3}
    target = system_pg.dsn(system_pg.new_name("regal_fid"))
    report = restore_database(open_repository(policy), load_keyring(policy), manifest, target)
    assert report.ok, report.validation_problems
    assert_same_database(target, source)


def test_a_table_locked_exclusively_fails_the_backup_naming_the_session(
        system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> None:
    source = system_pg.create()
    execute(source, "CREATE TABLE busy (id int); INSERT INTO busy VALUES (1)")
    policy = make_policy(tmp_path, {"pos": source})
    policy = policy.model_copy(update={"targets": {"pos": policy.targets["pos"].model_copy(
        update={"lock_timeout": 1.0})}})
    with psycopg.connect(source, autocommit=True, application_name="nightly-migration") as holder:
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE busy IN ACCESS EXCLUSIVE MODE")
        pid = holder.info.backend_pid
        started = time.monotonic()
        with pytest.raises(RegalError) as raised:
            run_backup(policy, "pos")
        assert time.monotonic() - started < 20
        holder.execute("ROLLBACK")
    message = str(raised.value)
    assert "public.busy" in message and f"pid {pid}" in message
    assert "nightly-migration" in message and "LOCK TABLE busy" in message


def test_rows_row_level_security_would_hide_fail_the_backup_naming_the_table(
        system_pg: DatabaseFactory, tmp_path: Path, master_key: str, table_reader: str) -> None:
    """pg_dump's row_security = off: a backup by a role that policies would show only some rows fails."""
    import uuid

    role = f"regal_rls_{uuid.uuid4().hex[:6]}"
    source = system_pg.create()
    execute(source, f"""
        CREATE ROLE {role} LOGIN;
        CREATE TABLE open_rows (id int PRIMARY KEY);
        INSERT INTO open_rows SELECT generate_series(1, 10);
        CREATE TABLE guarded (id int PRIMARY KEY, owner text);
        INSERT INTO guarded SELECT g, CASE WHEN g % 2 = 0 THEN '{role}' ELSE 'someone' END
            FROM generate_series(1, 10) g;
        ALTER TABLE guarded ENABLE ROW LEVEL SECURITY;
        CREATE POLICY mine ON guarded FOR SELECT USING (owner = current_user);
        GRANT SELECT ON open_rows, guarded TO {role};""")
    try:
        as_role = psycopg.conninfo.make_conninfo(source, user=role)
        policy = make_policy(tmp_path, {"pos": as_role})
        with pytest.raises(RegalError) as refused:
            run_backup(policy, "pos")
        assert refused.value.message == ("reading table public.guarded: row-level security policies would hide "
                                         "some of its rows from the backup's user, so a backup would silently miss "
                                         "them")
        assert "BYPASSRLS" in refused.value.hint
    finally:
        system_pg.drop_all()
        system_pg.created.clear()
        execute(system_pg.server_dsn, f"DROP ROLE IF EXISTS {role}")


def test_a_table_the_backup_role_cannot_read_fails_the_backup_naming_it(
        system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> None:
    """As pg_dump: a role without SELECT on a table gets no backup that leaves the table out."""
    import uuid

    role = f"regal_noread_{uuid.uuid4().hex[:6]}"
    source = system_pg.create()
    execute(source, f"""CREATE ROLE {role} LOGIN; CREATE TABLE readable (id int); CREATE TABLE "Payroll" (id int);
                        INSERT INTO "Payroll" VALUES (1); GRANT SELECT ON readable TO {role}""")
    try:
        policy_file = write_policy_file(tmp_path, {"pos": psycopg.conninfo.make_conninfo(source, user=role)})
        done = run_cli(policy_file, "backup", "pos")
        assert done.returncode == 1
        assert done.stderr.startswith("error: PostgreSQL refused: permission denied for table Payroll"), done.stderr
        assert "a backup reads every table" in done.stderr and "Traceback" not in done.stderr
        listed = run_cli(policy_file, "list", "--json")
        assert listed.returncode == 0 and json.loads(listed.stdout)["backups"] == [], listed.stdout
    finally:
        system_pg.drop_all()
        system_pg.created.clear()
        execute(system_pg.server_dsn, f"DROP ROLE IF EXISTS {role}")


# --- case 2: search_path ---------------------------------------------------------------------------

def test_values_depending_on_the_search_path_come_back_pointing_at_the_same_objects(
        system_pg: DatabaseFactory, tmp_path: Path, master_key: str, table_reader: str) -> None:
    source = system_pg.create()
    execute(source, """
        CREATE SCHEMA app;
        CREATE TABLE app.things (id int PRIMARY KEY);
        CREATE TABLE public.things (id int PRIMARY KEY);
        CREATE TYPE app.mood AS ENUM ('ok', 'sad');
        CREATE TABLE public.refs (id int PRIMARY KEY, r regclass, p regproc, t regtype, m app.mood);
        INSERT INTO public.refs VALUES (1, 'app.things', 'pg_catalog.now', 'app.mood', 'sad'),
                                       (2, 'public.things', 'pg_catalog.pi', 'pg_catalog.int4', 'ok');
    """)
    with psycopg.connect(source, autocommit=True) as conn:
        dbname = conn.info.dbname
        conn.execute(f'ALTER DATABASE "{dbname}" SET search_path = app, public')
    policy = make_policy(tmp_path, {"pos": source})
    manifest, target, _ = backup_and_restore(policy, system_pg)
    assert_same_database(target, source)
    # read as an application of that database reads them
    query = "SELECT r::text, t::text FROM public.refs ORDER BY id"
    with psycopg.connect(target, autocommit=True, options="-c search_path=") as t, \
            psycopg.connect(source, autocommit=True, options="-c search_path=") as s:
        assert t.execute(query).fetchall() == s.execute(query).fetchall() == [
            ("app.things", "app.mood"), ("public.things", "integer")]
    assert manifest.source["database_properties"]["settings"] == [{"role": None,
                                                                  "settings": ["search_path=app, public"]}]


# --- case 3: encodings -----------------------------------------------------------------------------

def test_a_latin1_database_restores_byte_for_byte_with_its_encoding(
        system_pg: DatabaseFactory, tmp_path: Path, master_key: str, table_reader: str) -> None:
    name = system_pg.new_name("regal_latin1")
    with psycopg.connect(system_pg.server_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    source = system_pg.dsn(name)
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("SET client_encoding = 'UTF8'")
        conn.execute('CREATE TABLE "Café" (id int PRIMARY KEY, "naïve" text)')
        # 'CafÃ©' in LATIN1 is the bytes of 'Café' in UTF-8: a restore that mixes the two passes unnoticed.
        conn.execute("""INSERT INTO "Café" VALUES (1, 'Café'), (2, 'CafÃ©'), (3, 'ÿ ß ½ ©')""")
        conn.execute("CREATE TABLE plain (id int, v text)")
        conn.execute("INSERT INTO plain VALUES (1, 'Ærø')")
    policy = make_policy(tmp_path, {"pos": source})
    manifest, target, _ = backup_and_restore(policy, system_pg)
    assert manifest.source["encoding"] == "LATIN1"
    assert {t["name"] for t in manifest.source["tables"]} == {"Café", "plain"}
    assert_same_database(target, source)
    raw = 'SELECT convert_to("naïve", \'LATIN1\') FROM public."Café" ORDER BY id'
    with psycopg.connect(target, autocommit=True) as conn:
        encoding, collate = conn.execute("SELECT pg_encoding_to_char(encoding), datcollate FROM pg_database "
                                         "WHERE datname = current_database()").fetchone()  # type: ignore[misc]
        conn.execute("SET client_encoding = 'UTF8'")
        assert [bytes(r[0]) for r in conn.execute(raw).fetchall()] == [
            b"Caf\xe9", b"Caf\xc3\xa9", b"\xff \xdf \xbd \xa9"]
    assert (encoding, collate) == ("LATIN1", "C")
    # the rows are the backup's own objects only: pg_dump matched the non-ASCII name it was told to leave out
    assert "TABLE DATA" not in schema_archive_listing(policy, manifest)

    # --drop-existing recreates it with the backup's encoding, not the server's default
    report = restore_database(open_repository(policy), load_keyring(policy), manifest, target, drop_existing=True)
    assert report.ok and report.target_state == "replace"
    assert_same_database(target, source)


def schema_archive_listing(policy: Policy, manifest: Manifest) -> str:
    """`pg_restore --list` of a backup's schema archive."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = StoredBackup(open_repository(policy), load_keyring(policy), manifest).to_file(
            dump.SCHEMA_OBJECT, Path(tmp) / "schema.pgdump")
        pg_restore = find_pg_tool("pg_restore", dump.dump_major(manifest.tool_versions))
        return subprocess.run([str(pg_restore.path), "--list", str(archive)], capture_output=True, check=True,
                              text=True, errors="replace").stdout


def raw_rows(dsn: str, table: str, encoding: str) -> bytes:
    """A table's rows, ordered, as COPY text in `encoding` (the database's own bytes)."""
    statement = f"COPY (SELECT * FROM {table} ORDER BY 1) TO STDOUT WITH (ENCODING '{encoding}')"
    with psycopg.connect(dsn, autocommit=True, client_encoding="UTF8") as conn, conn.cursor() as cur, \
            cur.copy(statement) as copy:
        return b"".join(bytes(chunk) for chunk in copy)


@pytest.mark.parametrize("encoding", ["SQL_ASCII", "EUC_TW"])
def test_databases_in_encodings_python_cannot_decode_restore_byte_for_byte(
        encoding: str, system_pg: DatabaseFactory, tmp_path: Path, master_key: str, table_reader: str) -> None:
    name = system_pg.new_name("regal_enc")
    with psycopg.connect(system_pg.server_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    source = system_pg.dsn(name)
    with psycopg.connect(source, autocommit=True, client_encoding="UTF8") as conn:
        conn.execute('CREATE TABLE "商品" (id int PRIMARY KEY, "名稱" text)')
        conn.execute("""INSERT INTO "商品" SELECT g, '珍珠奶茶 ' || g FROM generate_series(1, 3000) g""")
        conn.execute("""COMMENT ON TABLE "商品" IS '台灣'""")
        if encoding == "SQL_ASCII":  # bytes that are not UTF-8: a SQL_ASCII database keeps them as they came
            conn.execute("""INSERT INTO "商品" VALUES (0, convert_from('\\xe9ff'::bytea, 'SQL_ASCII'))""")
    policy = make_policy(tmp_path, {"pos": source})
    manifest, target, _ = backup_and_restore(policy, system_pg)
    assert manifest.source["encoding"] == encoding
    assert schema_text(target) == schema_text(source)
    rows = raw_rows(source, 'public."商品"', encoding)
    assert raw_rows(target, 'public."商品"', encoding) == rows
    # the database's own bytes: not UTF-8 at all (SQL_ASCII), 珍珠 in EUC_TW
    assert (b"\xe9\xff" if encoding == "SQL_ASCII" else b"\xd2\xc6\xd6\xe0") in rows
    assert "TABLE DATA" not in schema_archive_listing(policy, manifest)


def test_a_database_postgresql_cannot_convert_to_utf8_is_refused_naming_what_can_back_it_up(
        system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> None:
    name = system_pg.new_name("regal_mule")
    with psycopg.connect(system_pg.server_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} ENCODING 'MULE_INTERNAL' LC_COLLATE 'C' LC_CTYPE 'C' "
                     "TEMPLATE template0")
    policy = make_policy(tmp_path, {"pos": system_pg.dsn(name)})
    with pytest.raises(RegalError, match="cannot convert to UTF-8") as refused:
        run_backup(policy, "pos")
    assert "MULE_INTERNAL" in refused.value.message and "postgres_cluster" in refused.value.hint


def test_an_existing_database_of_another_encoding_is_refused(system_pg: DatabaseFactory, tmp_path: Path,
                                                             master_key: str) -> None:
    name = system_pg.new_name("regal_latin1")
    with psycopg.connect(system_pg.server_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    source = system_pg.dsn(name)
    execute(source, "CREATE TABLE t (v text); INSERT INTO t VALUES ('x')")
    policy = make_policy(tmp_path, {"pos": source})
    manifest = run_backup(policy, "pos").manifest
    utf8 = system_pg.create()
    with pytest.raises(RegalError, match="has the encoding UTF8, the backup's database had LATIN1"):
        restore_database(open_repository(policy), load_keyring(policy), manifest, utf8)


# --- case 7: many tables, in-process COPY ------------------------------------------------------------

def test_many_tables_round_trip(system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> None:
    source = system_pg.create()
    statements = []
    for i in range(120):
        statements.append(f"CREATE TABLE t{i:03d} (id int PRIMARY KEY, v text, at timestamptz DEFAULT now(), "
                          f"f float8)")
        statements.append(f"INSERT INTO t{i:03d} SELECT g, md5((g * {i})::text), "
                          f"'2026-01-01'::timestamptz + g * interval '1 hour', g / 3.0 FROM generate_series(1, {i}) g")
    statements.append('CREATE SCHEMA "Odd ""schema"" .*"; CREATE TABLE "Odd ""schema"" .*"."We""ird .*|(x)" (v text)')
    statements.append('INSERT INTO "Odd ""schema"" .*"."We""ird .*|(x)" VALUES (\'a\'), (\'b\')')
    statements.append("CREATE SEQUENCE counter; SELECT setval('counter', 77)")
    statements.append("CREATE MATERIALIZED VIEW t005_count AS SELECT count(*) AS n FROM t005")
    execute(source, ";\n".join(statements))
    policy = make_policy(tmp_path, {"pos": source})
    manifest, target, report = backup_and_restore(policy, system_pg)
    assert len(manifest.source["tables"]) == 121 and report.rows == sum(range(120)) + 2
    assert "psql" not in manifest.tool_versions
    assert_same_database(target, source)
    assert table_rows(target, "SELECT last_value FROM counter") == [(77,)]
    assert table_rows(target, "SELECT n FROM t005_count") == [(5,)]
    # pg_dump's archive holds no table's rows (they are the per-table objects), its other data it does
    import subprocess

    from regal_dagster.engine.pipeline import StoredBackup
    from regal_dagster.engine.postgresql.tools import find_pg_tool

    archive = StoredBackup(open_repository(policy), load_keyring(policy), manifest).to_file(
        dump.SCHEMA_OBJECT, tmp_path / "schema.pgdump")
    listed = subprocess.run([str(find_pg_tool("pg_restore", 15).path), "--list", str(archive)], capture_output=True,
                            text=True, check=True).stdout
    assert " TABLE DATA " not in listed
    assert " SEQUENCE SET " in listed and " MATERIALIZED VIEW DATA " in listed


# --- cases 4 and 5: database properties and roles, onto a fresh server --------------------------------

PG15_BIN = Path("/usr/lib/postgresql/15/bin")


DATABASE_FACTS = """
    SELECT pg_encoding_to_char(d.encoding), d.datcollate, d.datctype, pg_get_userbyid(d.datdba),
           shobj_description(d.oid, 'pg_database'), d.datconnlimit, d.datacl::text,
           ARRAY(SELECT coalesce(pg_get_userbyid(s.setrole), '*') || ':' || array_to_string(s.setconfig, ';')
                 FROM pg_db_role_setting s WHERE s.setdatabase = d.oid ORDER BY 1)
    FROM pg_database d WHERE d.datname = current_database()"""

ROLE_FACTS = """
    SELECT r.rolname, r.rolsuper, r.rolinherit, r.rolcreaterole, r.rolcreatedb, r.rolcanlogin, r.rolbypassrls,
           r.rolconnlimit, ARRAY(SELECT pg_get_userbyid(m.roleid)::text FROM pg_auth_members m
                                 WHERE m.member = r.oid ORDER BY 1)
    FROM pg_roles r WHERE r.rolname LIKE %s ORDER BY 1"""


@pytest.fixture
def roles_source(system_pg: DatabaseFactory) -> Iterator[tuple[str, str]]:
    """A database on the system server that refers to roles of its own (dropped afterwards): its DSN and
    the roles' common suffix."""
    import uuid

    suffix = uuid.uuid4().hex[:6]
    owner, reader, writer, service = (f"{n}_{suffix}" for n in ("owner", "reader", "writer", "svc"))
    execute(system_pg.server_dsn, f"""
        CREATE ROLE {owner} NOLOGIN; CREATE ROLE {reader} NOLOGIN; CREATE ROLE {writer} NOLOGIN IN ROLE {reader};
        CREATE ROLE {service} LOGIN CONNECTION LIMIT 5 IN ROLE {writer}""")
    source = system_pg.create("regal_roles")
    dbname = psycopg.conninfo.conninfo_to_dict(source)["dbname"]
    policies = "\n".join(f"CREATE POLICY p{i} ON app.items FOR SELECT TO {reader if i % 2 else writer} "
                         f"USING (id % 30 = {i});" for i in range(30))
    execute(source, f"""
        ALTER DATABASE "{dbname}" OWNER TO {owner};
        COMMENT ON DATABASE "{dbname}" IS 'the shop''s database';
        ALTER DATABASE "{dbname}" SET work_mem = '12MB';
        ALTER DATABASE "{dbname}" SET search_path = app, public;
        ALTER ROLE {reader} IN DATABASE "{dbname}" SET statement_timeout = '5s';
        REVOKE ALL ON DATABASE "{dbname}" FROM PUBLIC;
        GRANT CONNECT ON DATABASE "{dbname}" TO {reader};
        GRANT CONNECT, TEMPORARY ON DATABASE "{dbname}" TO {service} WITH GRANT OPTION;
        CREATE SCHEMA app AUTHORIZATION {owner};
        CREATE TABLE app.items (id int PRIMARY KEY, name text, price numeric);
        ALTER TABLE app.items OWNER TO {owner};
        INSERT INTO app.items SELECT g, 'item ' || g, g * 0.5 FROM generate_series(1, 300) g;
        ALTER TABLE app.items ENABLE ROW LEVEL SECURITY;
        {policies}
        GRANT SELECT ON app.items TO {reader};
        GRANT INSERT, UPDATE ON app.items TO {writer};
        CREATE MATERIALIZED VIEW app.totals AS SELECT count(*) AS n, sum(price) AS total FROM app.items;
        ALTER MATERIALIZED VIEW app.totals OWNER TO {owner};
        GRANT SELECT ON app.totals TO {reader};
        CREATE PUBLICATION shop_{suffix} FOR TABLE app.items;
    """)
    yield source, suffix
    system_pg.drop_all()
    system_pg.created.clear()
    for role in (service, writer, reader, owner):
        execute(system_pg.server_dsn, f"DROP ROLE IF EXISTS {role}")


@pytest.mark.skipif(not (PG15_BIN / "postgres").is_file(), reason="needs the machine's PostgreSQL 15 server")
def test_roles_and_database_properties_come_back_on_a_fresh_server(roles_source: tuple[str, str], tmp_path: Path,
                                                                    master_key: str) -> None:
    from regal_dagster.engine.postgresql.server import ScratchCluster

    source, suffix = roles_source
    policy = make_policy(tmp_path, {"pos": source})
    manifest = run_backup(policy, "pos").manifest
    recorded = {r["name"] for r in manifest.source["roles"]["roles"]}
    assert {f"owner_{suffix}", f"reader_{suffix}", f"writer_{suffix}", f"svc_{suffix}"} <= recorded
    assert all("password_hash" not in r for r in manifest.source["roles"]["roles"])
    properties = manifest.source["database_properties"]
    assert properties["owner"] == f"owner_{suffix}" and properties["comment"] == "the shop's database"
    repo, keyring = open_repository(policy), load_keyring(policy)

    with ScratchCluster(base_dir=tmp_path / "fresh", tuned_for_restore=True, bin_dir=PG15_BIN) as fresh:
        # Without creating the roles: every object is tried and each one that needs a missing role is
        # listed with the server's reason; the incomplete copy is never published under the target's name.
        bare = fresh.dsn("bare")
        report = restore_database(repo, keyring, manifest, bare, create_roles=False)
        assert not report.ok
        *failures, outcome = report.validation_problems
        missing_role = [p for p in failures if "does not exist" in p]
        assert len(missing_role) >= 30  # every policy, grant and owner change that names a missing role
        assert any("CREATE POLICY p29 ON app.items" in p for p in missing_role)
        assert all(p.startswith("not restored: ") for p in failures)
        assert outcome == "the restored copy was dropped: no database bare was created"
        with psycopg.connect(fresh.dsn()) as conn:
            assert conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'bare%'").fetchall() == []

        # A byte of the table's rows changed in the repository: found while loading, before anything is
        # published; the temporary database and the roles created for it are dropped, the error names the object.
        table_object = next(r for r in manifest.objects if r.name.startswith("tables/"))
        stored = tmp_path / "repository" / table_object.key
        original = stored.read_bytes()
        stored.write_bytes(original[:-100] + bytes([original[-100] ^ 0x01]) + original[-99:])
        with pytest.raises(IntegrityError) as damaged:
            restore_database(repo, keyring, manifest, fresh.dsn("damaged"))
        assert table_object.key in damaged.value.message and "nothing was created" in damaged.value.message
        with psycopg.connect(fresh.dsn()) as conn:
            assert conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'damaged%'").fetchall() == []
            assert conn.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE %s",
                                (f"%\\_{suffix}",)).fetchall() == []
        stored.write_bytes(original)

        # With them (the default): the same database, owners, grants, policies and properties included.
        restored = fresh.dsn("restored")
        report = restore_database(repo, keyring, manifest, restored)
        assert report.ok, report.validation_problems
        assert full_schema_text(restored) == full_schema_text(source)
        assert table_contents(restored) == table_contents(source)
        with psycopg.connect(restored) as r, psycopg.connect(source) as s:
            assert r.execute(DATABASE_FACTS).fetchone() == s.execute(DATABASE_FACTS).fetchone()
            pattern = f"%\\_{suffix}"
            assert r.execute(ROLE_FACTS, (pattern,)).fetchall() == s.execute(ROLE_FACTS, (pattern,)).fetchall()
            assert r.execute("SELECT count(*) FROM pg_policy").fetchone() == (30,)

        # --drop-existing recreates the database with the same properties
        report = restore_database(repo, keyring, manifest, restored, drop_existing=True)
        assert report.ok, report.validation_problems
        with psycopg.connect(restored) as r, psycopg.connect(source) as s:
            assert r.execute(DATABASE_FACTS).fetchone() == s.execute(DATABASE_FACTS).fetchone()


def test_a_database_an_application_is_connected_to_is_not_replaced(system_pg: DatabaseFactory, tmp_path: Path,
                                                                   master_key: str) -> None:
    source = system_pg.create()
    execute(source, "CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
    policy = make_policy(tmp_path, {"pos": source})
    manifest = run_backup(policy, "pos").manifest
    repo, keyring = open_repository(policy), load_keyring(policy)
    target = system_pg.create()
    execute(target, "CREATE TABLE other (v int)")
    with psycopg.connect(target, application_name="pos-app"), pytest.raises(RegalError) as refused:
        restore_database(repo, keyring, manifest, target, drop_existing=True)
    assert "1 session(s) are connected to" in refused.value.message and "nothing was changed" in refused.value.message
    assert table_rows(target, "SELECT count(*) FROM pg_tables WHERE tablename = 'other'") == [(1,)]
    report = restore_database(repo, keyring, manifest, target, drop_existing=True)  # once the application left
    assert report.ok, report.validation_problems
    assert_same_database(target, source)


@pytest.mark.skipif(not (PG15_BIN / "postgres").is_file(), reason="needs the machine's PostgreSQL 15 server")
def test_rows_load_as_written_whatever_the_target_server_sets_for_xml_and_array_nulls(
        system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> None:
    """XML content that is not a document (pg_dump's `SET xmloption = content`) and NULL elements of arrays
    load and read back on a server whose xmloption is document and array_nulls off (pg_restore would turn
    the NULL elements into the string 'NULL' there)."""
    from regal_dagster.engine.postgresql.server import ScratchCluster

    source = system_pg.create("regal_settings")
    execute(source, """SET xmloption = content;
        CREATE TABLE docs (id int PRIMARY KEY, body xml, tags text[], scores int[]);
        INSERT INTO docs VALUES (1, 'plain text', '{a,NULL,"NULL"}', '{1,NULL}'),
                                (2, '<a/><b>two roots</b>', '{NULL}', NULL),
                                (3, '<?xml version="1.0"?><doc/>', '{}', '{NULL,NULL}')""")
    execute(source, f'ALTER DATABASE "{psycopg.conninfo.conninfo_to_dict(source)["dbname"]}" SET xmloption = document')
    policy = make_policy(tmp_path, {"pos": source})
    manifest = run_backup(policy, "pos").manifest
    with ScratchCluster(base_dir=tmp_path / "document", tuned_for_restore=True, bin_dir=PG15_BIN) as server:
        execute(server.dsn(), "ALTER SYSTEM SET xmloption = document")
        execute(server.dsn(), "ALTER SYSTEM SET array_nulls = off")
        execute(server.dsn(), "SELECT pg_reload_conf()")
        restored = server.dsn("restored")
        report = restore_database(open_repository(policy), load_keyring(policy), manifest, restored)
        assert report.ok, report.validation_problems
        assert full_schema_text(restored) == full_schema_text(source)
        assert table_contents(restored) == table_contents(source)
        assert table_rows(restored, "SELECT tags[2] IS NULL, tags[3] FROM docs WHERE id = 1") == [(True, "NULL")]


def test_a_restore_test_runs_on_a_server_that_has_what_the_source_uses(roles_source: tuple[str, str],
                                                                       tmp_path: Path, master_key: str) -> None:
    """ICU collations, xml and lz4 columns (the embedded PostgreSQL 18 has none of them) and roles."""
    from regal_dagster.engine.restore_test import run_restore_test

    source, _ = roles_source
    execute(source, """
        CREATE COLLATION app.german (provider = icu, locale = 'de-DE');
        CREATE TABLE app.docs (id int PRIMARY KEY, title text COLLATE app.german, body xml,
                               blob text COMPRESSION lz4);
        INSERT INTO app.docs SELECT g, 'Straße ' || g, xmlparse(content '<a>' || g || '</a>'), repeat('x', 5000)
          FROM generate_series(1, 50) g;
    """)
    policy = make_policy(tmp_path, {"pos": source})
    manifest = run_backup(policy, "pos").manifest
    assert {"icu", "libxml", "lz4"} <= set(manifest.source["server_needs"])
    work = tmp_path / "scratch"
    work.mkdir()
    result = run_restore_test(policy, open_repository(policy), load_keyring(policy), manifest, work_dir=work)
    assert result.validation_passed, result.problems


def test_when_no_server_can_hold_the_source_the_reason_is_exact() -> None:
    from regal_dagster.engine.postgresql.installations import choose_server_binaries

    chosen, why = choose_server_binaries(15, {"icu", "extension:no_such_extension_here"})
    assert chosen is None
    assert why.startswith("no PostgreSQL installation here can hold this database (PostgreSQL 15+ with "
                          "extension:no_such_extension_here, icu)")
    assert "lacks extension:no_such_extension_here" in why
    assert choose_server_binaries(99, set())[1].count("< 99") >= 1


# --- tablespaces ----------------------------------------------------------------------------------------

@pytest.fixture
def tablespaces(system_pg: DatabaseFactory) -> Iterator[tuple[str, str]]:
    """Two tablespaces on the system server, in directories its postgres account owns (dropped afterwards,
    once the test's databases are): the names (one for a database's default, one for a table)."""
    import shutil
    import tempfile
    import uuid

    suffix = uuid.uuid4().hex[:6]
    names = (f"regal_dbspace_{suffix}", f"regal_fast_{suffix}")
    base = Path(tempfile.mkdtemp(prefix="regal-tablespaces-"))
    base.chmod(0o755)  # the server's account must reach the directories
    for name in names:
        (base / name).mkdir()
        shutil.chown(base / name, "postgres", "postgres")
        execute(system_pg.server_dsn, f"CREATE TABLESPACE {name} LOCATION '{base / name}'")
    yield names
    system_pg.drop_all()
    system_pg.created.clear()
    for name in names:
        execute(system_pg.server_dsn, f"DROP TABLESPACE IF EXISTS {name}")
    shutil.rmtree(base, ignore_errors=True)


def test_tables_indexes_and_the_database_come_back_in_their_tablespaces(
        system_pg: DatabaseFactory, embedded_pg: DatabaseFactory, tablespaces: tuple[str, str], tmp_path: Path,
        master_key: str) -> None:
    from regal_dagster.engine.restore_test import run_restore_test

    database_space, fast = tablespaces
    name = system_pg.new_name("regal_ts")
    execute(system_pg.server_dsn, f'CREATE DATABASE "{name}" TABLESPACE {database_space}')
    source = system_pg.dsn(name)
    execute(source, f"""
        CREATE TABLE hot (id int PRIMARY KEY USING INDEX TABLESPACE {fast}, v text) TABLESPACE {fast};
        CREATE INDEX hot_v ON hot (v) TABLESPACE {fast};
        INSERT INTO hot SELECT g, 'v' || g FROM generate_series(1, 200) g;
        CREATE TABLE cold (id int PRIMARY KEY, note text);
        INSERT INTO cold SELECT g, 'n' || g FROM generate_series(1, 50) g;""")
    placement = """SELECT c.relname, coalesce(t.spcname, 'database default') FROM pg_class c
                   LEFT JOIN pg_tablespace t ON t.oid = c.reltablespace
                   WHERE c.relname IN ('hot', 'hot_pkey', 'hot_v', 'cold', 'cold_pkey') ORDER BY 1"""
    database_default = "SELECT t.spcname FROM pg_database d JOIN pg_tablespace t ON t.oid = d.dattablespace " \
                       "WHERE d.datname = current_database()"
    policy = make_policy(tmp_path, {"pos": source})
    manifest = run_backup(policy, "pos").manifest
    assert [(t["name"], t["database_default"]) for t in manifest.source["tablespaces"]] == [
        (database_space, True), (fast, False)]
    repo, keyring = open_repository(policy), load_keyring(policy)

    # onto a server that has them: every object where it was, the database's default included
    target = system_pg.dsn(system_pg.new_name("regal_ts"))
    report = restore_database(repo, keyring, manifest, target, jobs=2)
    assert report.ok, report.validation_problems
    assert_same_database(target, source)
    with psycopg.connect(target) as r, psycopg.connect(source) as s:
        assert r.execute(placement).fetchall() == s.execute(placement).fetchall()
        assert r.execute(database_default).fetchone() == (database_space,)

    # a restore test creates them in its scratch server
    result = run_restore_test(policy, repo, keyring, manifest)
    assert result.validation_passed, result.problems

    # a server without them is refused before anything is created, naming them; --no-tablespaces restores
    # everything into the default tablespace
    fresh = embedded_pg.dsn(embedded_pg.new_name("regal_ts"))
    with pytest.raises(RegalError) as refused:
        restore_database(repo, keyring, manifest, fresh)
    assert f"has no tablespace {database_space} (at " in refused.value.message
    assert f", {fast} (at " in refused.value.message and "--no-tablespaces" in refused.value.hint
    with psycopg.connect(embedded_pg.server_dsn) as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname LIKE 'regal_ts%'").fetchall() == []
    report = restore_database(repo, keyring, manifest, fresh, tablespaces=False)
    assert report.ok, report.validation_problems
    assert table_contents(fresh) == table_contents(source)
    with psycopg.connect(fresh) as r:
        assert {space for _, space in r.execute(placement).fetchall()} == {"database default"}


# --- Redis function libraries and every git ref ---------------------------------------------------------

def test_redis_function_libraries_are_copied_back_with_the_keys(tmp_path: Path, master_key: str) -> None:
    from regal_dagster.engine.policy import load_policy

    from .test_redis import PASSWORD, RedisServer, _policy

    (tmp_path / "source").mkdir()
    (tmp_path / "live").mkdir()
    source = RedisServer(tmp_path / "source", "--save", "", "--appendonly", "no", "--requirepass", PASSWORD)
    live = RedisServer(tmp_path / "live", "--save", "", "--appendonly", "no", "--requirepass", PASSWORD)
    try:
        library = "#!lua name=shop\nredis.register_function('total', function(keys, args) return 42 end)"
        source.client.execute_command("FUNCTION", "LOAD", library)
        source.client.set("order:1", "one")
        _policy(tmp_path, {"url": f"redis://:{PASSWORD}@127.0.0.1:{source.port}"})
        policy_file = tmp_path / "regal_backup.yaml"
        manifest = run_backup(load_policy(policy_file), "cache").manifest
        url = f"redis://:{PASSWORD}@127.0.0.1:{live.port}"
        done = invoke_cli(["restore", manifest.backup_id, "--to", url,
                           "--keys", "*", "--json", "--policy", str(policy_file)])
        assert done.returncode == 0, done.stderr
        assert live.client.fcall("total", 0) == 42 and live.client.get("order:1") == b"one"
        libraries = live.client.execute_command("FUNCTION", "LIST", "WITHCODE")
        source_libraries = source.client.execute_command("FUNCTION", "LIST", "WITHCODE")
        assert libraries == source_libraries
    finally:
        source.stop()
        live.stop()


def test_every_git_ref_is_restored_and_compared(tmp_path: Path, master_key: str) -> None:
    import os
    import subprocess

    from regal_dagster.engine.restore_test import run_restore_test
    from regal_dagster.engine.sources.config import git as config_git

    from .test_terraform_and_config import _policy

    repo = tmp_path / "config"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "Ops", "GIT_AUTHOR_EMAIL": "ops@example.test",
           "GIT_COMMITTER_NAME": "Ops", "GIT_COMMITTER_EMAIL": "ops@example.test"}

    def run_git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                              env=env).stdout.strip()

    run_git("init", "-q", "-b", "main")
    (repo / "app.yaml").write_text("a: 1\n")
    run_git("add", "-A")
    run_git("commit", "-q", "-m", "one")
    run_git("tag", "-a", "v1", "-m", "release 1")
    run_git("notes", "add", "-m", "deployed to prod")
    run_git("branch", "feature")
    for n in (2, 3, 4):  # three stash entries: the older two live only in refs/stash's reflog
        (repo / "app.yaml").write_text(f"a: {n}\n")
        run_git("stash", "push", "-q", "-m", f"try {n}")
    run_git("update-ref", "refs/deploy/prod", run_git("rev-parse", "HEAD"))
    source_refs = config_git.all_refs(repo)
    assert {"refs/notes/commits", "refs/stash", "refs/deploy/prod", "refs/tags/v1"} <= set(source_refs)

    policy = _policy(tmp_path, "config", {"kind": "config", "repository": str(repo)})
    manifest = run_backup(policy, "config").manifest
    assert manifest.source["all_refs"] == source_refs
    result = run_restore_test(policy, open_repository(policy), load_keyring(policy), manifest)
    assert result.validation_passed, result.problems

    from regal_dagster.engine.restore import restore_backup
    from regal_dagster.engine.sources.base import RestoreRequest

    target = tmp_path / "restored"
    restored = restore_backup(policy, open_repository(policy), load_keyring(policy), manifest,
                              RestoreRequest(str(target), jobs=1))
    assert restored.ok, restored.problems
    assert config_git.all_refs(target) == source_refs
    assert config_git.stash_entries(target) == config_git.stash_entries(repo) == manifest.source["stash"]
    assert [e["message"] for e in manifest.source["stash"]] == ["On main: try 4", "On main: try 3", "On main: try 2"]
    assert subprocess.run(["git", "-C", str(target), "stash", "show", "-p", "stash@{2}"], capture_output=True,
                          text=True, check=True).stdout.count("+a: 2") == 1
    assert subprocess.run(["git", "-C", str(target), "notes", "show", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip() == "deployed to prod"

    # a ref the restore test does not find in the clone is named
    lying = manifest.model_copy(update={"source": {**manifest.source,
                                                   "all_refs": {**source_refs, "refs/deploy/prod": "0" * 40}}})
    result = run_restore_test(policy, open_repository(policy), load_keyring(policy), lying)
    assert result.problems == [(f"ref refs/deploy/prod is {source_refs['refs/deploy/prod']} in the clone, "
                               f"{'0' * 40} in the backup")]

    # a stash entry whose commit the bundle does not hold fails the restore, naming it
    stash = manifest.source["stash"]
    lying = manifest.model_copy(update={"source": {**manifest.source,
                                                   "stash": [*stash, {"commit": "0" * 40, "message": "lost"}]}})
    result = run_restore_test(policy, open_repository(policy), load_keyring(policy), lying)
    assert not result.validation_passed
    assert any("000000000000" in problem for problem in result.problems), result.problems


# --- case 6: a hot standby as the source ----------------------------------------------------------------

def test_a_backup_from_a_hot_standby_skips_unlogged_table_data_as_pg_dump_does(tmp_path: Path,
                                                                              master_key: str) -> None:
    from regal_dagster.engine.postgresql.programs import run_pg, server_account
    from regal_dagster.engine.postgresql.server import ScratchCluster

    with ScratchCluster(base_dir=tmp_path / "primary", tuned_for_restore=False) as primary:
        source_primary = primary.create_database("shop")
        execute(source_primary, """
            CREATE TABLE orders (id int PRIMARY KEY, v text);
            INSERT INTO orders SELECT g, 'order ' || g FROM generate_series(1, 500) g;
            CREATE UNLOGGED TABLE cache (k text PRIMARY KEY, v text);
            INSERT INTO cache SELECT 'k' || g, 'v' || g FROM generate_series(1, 100) g;
        """)
        account = server_account()
        standby_dir = tmp_path / "standby" / "data"
        standby_dir.parent.mkdir()
        account.chown(standby_dir.parent)
        copied = run_pg("pg_basebackup", ["-D", str(standby_dir), "-R", "-X", "stream",
                                          "-d", primary.dsn(), "--no-sync", "--checkpoint=fast"],
                        account, standby_dir.parent, timeout=120)
        assert copied.returncode == 0, copied.stderr
        standby = ScratchCluster.persistent(standby_dir)
        with standby:
            source = standby.dsn("shop")
            with psycopg.connect(source) as conn:
                assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
            policy = make_policy(tmp_path, {"pos": source})
            manifest = run_backup(policy, "pos").manifest
            assert manifest.source["in_recovery"] is True
            assert manifest.source["unlogged_tables_skipped"] == ["public.cache"]
            assert [t["name"] for t in manifest.source["tables"]] == ["orders"]

            target = primary.dsn("restored")
            report = restore_database(open_repository(policy), load_keyring(policy), manifest, target)
            assert report.ok, report.validation_problems
            assert schema_text(target) == schema_text(source)
            assert table_contents(target) == {**table_contents(source_primary), "public.cache": []}


# --- a connection pooler in front of the server ---------------------------------------------------------

PGBOUNCER = Path("/usr/sbin/pgbouncer")


@pytest.fixture
def pgbouncer(system_pg: DatabaseFactory) -> Iterator[int]:
    """PgBouncer (session pooling, trust) in front of the machine's PostgreSQL 15: its port. PgBouncer refuses
    libpq's `options` startup parameter, which our sessions use for their settings."""
    import shutil
    import socket

    if not PGBOUNCER.is_file():
        pytest.skip("PgBouncer is not installed (apt-get install pgbouncer; .ci/run installs it)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    home = Path(tempfile.mkdtemp(prefix="regal-pgbouncer-"))
    server = psycopg.conninfo.conninfo_to_dict(system_pg.server_dsn)
    (home / "users.txt").write_text(f'"{server.get("user", "postgres")}" ""\n')
    (home / "pgbouncer.ini").write_text(f"""[databases]
* = host={server.get("host", "127.0.0.1")} port={server.get("port", 5432)}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {home}/users.txt
pool_mode = session
logfile = {home}/pgbouncer.log
pidfile = {home}/pgbouncer.pid
""")
    shutil.chown(home, "postgres")
    for path in home.iterdir():
        shutil.chown(path, "postgres")
    subprocess.run([str(PGBOUNCER), "-d", "-u", "postgres", str(home / "pgbouncer.ini")], check=True)
    try:
        deadline = time.monotonic() + 10
        while not (home / "pgbouncer.pid").is_file():
            assert time.monotonic() < deadline, (home / "pgbouncer.log").read_text()
            time.sleep(0.05)
        yield port
    finally:
        subprocess.run(["kill", (home / "pgbouncer.pid").read_text().strip()], check=False)
        shutil.rmtree(home, ignore_errors=True)


def test_backups_and_restores_go_through_a_pooler_that_refuses_startup_options(
        system_pg: DatabaseFactory, pgbouncer: int, tmp_path: Path, master_key: str) -> None:
    from regal_dagster.engine.postgresql.connection import connect

    source = system_pg.create()
    load_awkward_data(source)
    dbname = psycopg.conninfo.conninfo_to_dict(source)["dbname"]
    execute(source, f"""ALTER DATABASE "{dbname}" SET statement_timeout = '5min'""")
    pooled = psycopg.conninfo.make_conninfo(source, port=pgbouncer)
    with pytest.raises(psycopg.OperationalError, match="unsupported startup parameter"):
        psycopg.connect(pooled, options="-c statement_timeout=0")
    with connect(pooled) as conn:  # the settings are SET instead
        assert conn.execute("SHOW statement_timeout").fetchone() == ("0",)

    policy = make_policy(tmp_path, {"pos": pooled})
    manifest = run_backup(policy, "pos").manifest
    repo, keyring = open_repository(policy), load_keyring(policy)
    # through the pooler the copy loads (pg_restore without its speed settings), but the pooler keeps sessions
    # to the database open, so it is not put in place: the error says to restore to the server itself
    target = system_pg.new_name("regal_pooled")
    with pytest.raises(RegalError) as refused:
        restore_database(repo, keyring, manifest, psycopg.conninfo.make_conninfo(pooled, dbname=target))
    assert "through a connection pooler" in refused.value.hint
    restored = system_pg.dsn(system_pg.new_name("regal_pooled"))
    report = restore_database(repo, keyring, manifest, restored)
    assert report.ok, report.validation_problems
    assert_same_database(restored, source)
