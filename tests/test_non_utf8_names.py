"""A SQL_ASCII database whose names are valid in no encoding (LATIN1 bytes sent by a client that said SQL_ASCII)
backs up, restores and restore-tests as `pg_dump | pg_restore` brings it back (issue 28): its schema, tables,
columns, index, view and sequence named with such bytes, read and written as the database's own bytes.

Real servers only: the machine's PostgreSQL 15 and the embedded PostgreSQL 18."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from regal_dagster.engine.backup import run_backup
from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.errors import RegalError
from regal_dagster.engine.restore_test import run_restore_test
from regal_dagster.engine.sources.postgres.dump import PAGE_BYTES, PSQL_COPY_BYTES
from regal_dagster.engine.sources.postgres.restore import restore_database
from regal_dagster.engine.storage import open_repository

from .conftest import DatabaseFactory, make_policy, run_cli, write_policy_file
from .pg_compare import execute, pg_dump_restore, schema_bytes, table_contents, table_rows

# Python holds a byte that is not valid UTF-8 as a lone surrogate (surrogateescape): "\udce9" is the byte 0xe9
# (LATIN1's é), "\udcdf" 0xdf (ß), "\udcff" 0xff. 商品 is valid UTF-8 beside them.
SCHEMA, TABLE, COLUMN = "sch\udce9ma", "caf\udce9", "pr\udce9nom"
BIG = "gro\udcdf"  # more COPY text than PSQL_COPY_BYTES: read by a psql child at backup and validation
SOURCE_SQL = f"""
    CREATE SCHEMA "{SCHEMA}";
    CREATE SEQUENCE "{SCHEMA}"."s\udce9q" START 100;
    CREATE TABLE "{SCHEMA}"."{TABLE}" (id int PRIMARY KEY DEFAULT nextval('"{SCHEMA}"."s\udce9q"'),
                                      "{COLUMN}" text NOT NULL, "商品" text);
    CREATE INDEX "idx_pr\udce9nom" ON "{SCHEMA}"."{TABLE}" ("{COLUMN}");
    CREATE VIEW "{SCHEMA}"."vue_caf\udce9" AS SELECT "{COLUMN}" FROM "{SCHEMA}"."{TABLE}" WHERE id > 10;
    INSERT INTO "{SCHEMA}"."{TABLE}" ("{COLUMN}", "商品")
        SELECT 'Ren\udce9e ' || g, '珍珠' FROM generate_series(1, 300) g;
    COMMENT ON TABLE "{SCHEMA}"."{TABLE}" IS 'd\udce9j\udce0 \udcff';
    CREATE TABLE "{SCHEMA}"."parent\udce9" (id int, note text);
    CREATE TABLE "{SCHEMA}"."child\udce9" (extra text) INHERITS ("{SCHEMA}"."parent\udce9");
    INSERT INTO "{SCHEMA}"."parent\udce9" SELECT g, 'p\udce9re' FROM generate_series(1, 20) g;
    INSERT INTO "{SCHEMA}"."child\udce9" SELECT g, 'enfant', '\udce9\udcff' FROM generate_series(1, 30) g;
    CREATE TABLE public."{BIG}" (id bigint, "d\udce9tail" text);
    INSERT INTO public."{BIG}" SELECT g, repeat('\udce9', 90) FROM generate_series(1, 60000) g;
    CREATE TABLE public."商品" (id int PRIMARY KEY, name text);
    INSERT INTO public."商品" VALUES (1, '\udce9\udcff'), (2, '珍珠奶茶');
    VACUUM ANALYZE;
"""


def raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def sql_ascii_database(factory: DatabaseFactory) -> str:
    name = factory.new_name("regal_ascii")
    with psycopg.connect(factory.server_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} ENCODING 'SQL_ASCII' LOCALE_PROVIDER libc LC_COLLATE 'C' "
                     "LC_CTYPE 'C' TEMPLATE template0")
    return factory.dsn(name)


def source_database(factory: DatabaseFactory) -> str:
    """A SQL_ASCII database whose names hold bytes valid in no encoding, written by a SQL_ASCII client."""
    dsn = sql_ascii_database(factory)
    with psycopg.connect(dsn, autocommit=True, client_encoding="SQL_ASCII") as conn:
        for statement in SOURCE_SQL.split(";"):
            if statement.strip():
                conn.execute(raw(statement))
    pages = table_rows(dsn, "SELECT relpages FROM pg_class WHERE relname = 'gro' || chr(223)")
    assert pages and pages[0][0] * PAGE_BYTES >= PSQL_COPY_BYTES  # type: ignore[operator]
    return dsn


@pytest.fixture(params=["system_pg", "embedded_pg"])
def server(request: pytest.FixtureRequest) -> DatabaseFactory:
    factory: DatabaseFactory = request.getfixturevalue(request.param)
    return factory


def test_a_sql_ascii_database_named_in_no_encoding_comes_back_as_pg_restore_brings_it_back(
        server: DatabaseFactory, tmp_path: Path, master_key: str) -> None:
    """Failed before: the backup listed its tables in a UTF-8 session, which the server refused
    ("invalid byte sequence for encoding UTF8: 0xe9")."""
    source = source_database(server)
    reference = sql_ascii_database(server)
    assert "error" not in pg_dump_restore(source, reference)
    assert raw(f'"{SCHEMA}"."{TABLE}"') in schema_bytes(reference)

    policy = make_policy(tmp_path, {"pos": source})
    manifest = run_backup(policy, "pos").manifest
    assert manifest.source["encoding"] == "SQL_ASCII"
    recorded = {(t["schema"], t["name"]): t for t in manifest.source["tables"]}
    # readable text, and the names' exact bytes beside it when they are not text
    cafe = recorded[("sch\\xe9ma", "caf\\xe9")]
    assert cafe["columns"] == ["id", "pr\\xe9nom", "商品"]
    assert cafe["name_bytes"] == {"schema": raw(SCHEMA).hex(), "name": raw(TABLE).hex(),
                                  "columns": [b"id".hex(), raw(COLUMN).hex(), raw("商品").hex()]}
    assert cafe["rows"] == 300
    assert "name_bytes" not in recorded[("public", "商品")]
    assert recorded[("public", "gro\\xdf")]["rows"] == 60000

    for validation in ("full", "rows"):
        target = server.dsn(server.new_name("regal_ascii_ours"))
        report = restore_database(open_repository(policy), load_keyring(policy), manifest, target, jobs=2,
                                  validation=validation)
        assert report.ok, report.validation_problems
        assert schema_bytes(target) == schema_bytes(reference)
        contents = table_contents(target)
        assert contents == table_contents(reference)
        assert raw("Ren\udce9e 1") in contents[f'"{SCHEMA}"."{TABLE}"'][0]  # type: ignore[operator]


def test_a_sql_ascii_database_named_in_no_encoding_is_restore_tested(system_pg: DatabaseFactory, tmp_path: Path,
                                                                     master_key: str) -> None:
    """Failed before: there was no backup to test (see above)."""
    source = source_database(system_pg)
    policy = make_policy(tmp_path, {"pos": source})
    manifest = run_backup(policy, "pos").manifest

    result = run_restore_test(policy, open_repository(policy), load_keyring(policy), manifest)

    assert result.validation_passed, result.problems
    tested = {(t["schema"], t["name"]): t for t in result.tables}
    assert tested[("sch\\xe9ma", "caf\\xe9")] == {"schema": "sch\\xe9ma", "name": "caf\\xe9", "rows": 300,
                                                  "matches": True}
    assert all(t["matches"] for t in result.tables) and len(tested) == 5
    assert result.details["locale"]["encoding"] == "SQL_ASCII"


def test_check_names_a_table_named_in_no_encoding_that_the_backup_role_cannot_read(
        system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> None:
    """Failed before: listing the unreadable tables in a UTF-8 session was refused by the server, and `check`
    reported an error instead of naming the table."""
    source = source_database(system_pg)
    role = f"regal_reader_{secrets.token_hex(4)}"
    database = conninfo_to_dict(source)["dbname"]
    execute(source, f"CREATE ROLE {role} LOGIN; GRANT CONNECT ON DATABASE {database} TO {role}; "
                    f"GRANT USAGE ON SCHEMA public TO {role}")
    try:
        policy_file = write_policy_file(tmp_path, {"pos": make_conninfo(source, user=role)})
        done = run_cli(policy_file, "check", "pos", "--json")
        assert "Traceback" not in done.stderr
        found = {f["check"]: f for f in json.loads(done.stdout)["findings"] if f["subject"] == "target pos"}
        assert not found["privileges"]["passed"]
        assert "sch\\xe9ma.caf\\xe9" in found["privileges"]["detail"].replace('"', "")
    finally:
        execute(source, f"REVOKE ALL ON SCHEMA public FROM {role}")
        with psycopg.connect(system_pg.server_dsn, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {database} WITH (FORCE)")
            conn.execute(f"DROP ROLE {role}")


def test_a_database_comment_valid_in_no_encoding_is_refused_naming_what_to_do(
        system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> None:
    """The database's own properties are recorded as text in the manifest: a comment (or setting, role or
    tablespace name) that is valid in no encoding is refused with what to do, not a driver's traceback."""
    source = sql_ascii_database(system_pg)
    database = conninfo_to_dict(source)["dbname"]
    with psycopg.connect(source, autocommit=True, client_encoding="SQL_ASCII") as conn:
        conn.execute(raw(f"COMMENT ON DATABASE {database} IS 'd\udce9j\udce0'"))
    policy = make_policy(tmp_path, {"pos": source})
    with pytest.raises(RegalError) as refused:
        run_backup(policy, "pos")
    assert "not valid UTF-8" in refused.value.message and "rewrite the database's comment" in refused.value.hint
