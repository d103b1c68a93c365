"""PostgreSQL: a parallel dump from one exported snapshot, a parallel restore, and validation.

A backup is one snapshot, exported by a coordinating connection and imported by every worker:
- `schema.pgdump`: pg_dump's custom-format archive of everything but table rows (schema, sequence values,
  large objects, post-data such as indexes and constraints);
- one object per table: the rows as `COPY ... TO STDOUT` text, with the text-format settings pinned
  (ISO dates, UTC, exact floats, hex bytea). Workers stream several tables at once.
The SHA-256 of a table's COPY text is its content fingerprint: a restore loads that text, reads each
table back the same way and compares row counts and SHA-256 sums with the manifest.

Restore: pg_restore pre-data and data (sequences, large objects), then the tables loaded in parallel
with COPY, then pg_restore post-data with parallel jobs (indexes, constraints, triggers).

Passwords travel to child processes only through their environment, never on a command line, in a log
or in the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg

from ...postgresql.connection import connect, describe_dsn, libpq_environment, quote_ident, server_major
from ...postgresql.tools import PgTool, find_pg_tool
from ..streams import stream_command

SCHEMA_OBJECT = "schema.pgdump"
SCHEMA_CONTENT = "pg_dump custom-format archive without table rows (uncompressed)"
TABLE_CONTENT = "COPY text rows of {label}"


def dump_major(tool_versions: dict[str, str]) -> int:
    """The major version of the pg_dump that wrote an archive (its reader must be at least as new)."""
    return int(tool_versions.get("pg_dump", "0").split(".")[0] or 0)

# Settings that make a row's text form, and so its fingerprint, the same on every server; and a scan that
# starts at block 0, so a freshly loaded table reads back in the order it was loaded.
COPY_SESSION_SETTINGS = {
    "DateStyle": "ISO, YMD", "TimeZone": "UTC", "IntervalStyle": "postgres",
    "extra_float_digits": "3", "bytea_output": "hex", "row_security": "off", "synchronize_seqscans": "off",
    "statement_timeout": "0",
}
# Session settings for restoring (all user-settable): bigger sorts for index builds, no commit waits.
RESTORE_SESSION_SETTINGS = {"maintenance_work_mem": "256MB", "work_mem": "64MB", "synchronous_commit": "off"}


# --- tables --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Table:
    schema: str
    name: str
    columns: tuple[str, ...]  # stored columns, in order (no dropped or generated ones)
    pages: int = 0  # size estimate, to start the biggest tables first

    @property
    def label(self) -> str:
        return f"{self.schema}.{self.name}"

    def copy_statement(self, direction: str) -> str:
        """COPY "schema"."table" ("col", ...) TO STDOUT / FROM STDIN."""
        columns = f" ({', '.join(quote_ident(c) for c in self.columns)})" if self.columns else ""
        return f"COPY {quote_ident(self.schema)}.{quote_ident(self.name)}{columns} {direction}"

    def dump_pattern(self) -> str:
        """This table, exactly, as a pg_dump pattern."""
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"

    @classmethod
    def from_facts(cls, facts: dict[str, Any]) -> Table:
        return cls(facts["schema"], facts["name"], tuple(facts["columns"]))


def user_tables(cur: psycopg.Cursor[Any]) -> list[Table]:
    """The tables whose rows pg_dump would dump: ordinary tables and partitions, not extension members."""
    generated = "AND a.attgenerated = ''" if cur.connection.info.server_version >= 120000 else ""
    cur.execute(f"""
        SELECT n.nspname, c.relname, c.relpages,
               coalesce((SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a
                         WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped {generated}),
                        ARRAY[]::text[])
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
          AND n.nspname !~ '^pg_toast' AND n.nspname !~ '^pg_temp'
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                          AND d.objid = c.oid AND d.deptype = 'e')
        ORDER BY 1, 2""")
    return [Table(schema, name, tuple(columns), max(pages, 0)) for schema, name, pages, columns in cur.fetchall()]


_SCHEMA_OBJECT_COUNTS = """
    WITH rel AS (
        SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_(toast|temp)'
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                          AND d.deptype = 'e'))
    SELECT json_build_object(
      'tables', (SELECT count(*) FROM rel WHERE relkind IN ('r', 'p')),
      'indexes', (SELECT count(*) FROM rel WHERE relkind IN ('i', 'I')),
      'sequences', (SELECT count(*) FROM rel WHERE relkind = 'S'),
      'views', (SELECT count(*) FROM rel WHERE relkind = 'v'),
      'materialized_views', (SELECT count(*) FROM rel WHERE relkind = 'm'),
      'constraints', (SELECT count(*) FROM pg_constraint k JOIN pg_namespace n ON n.oid = k.connamespace
                      WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND k.contype IN ('p','u','f','c','x')),
      'triggers', (SELECT count(*) FROM pg_trigger t WHERE NOT t.tgisinternal),
      'functions', (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                    WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
                      AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                                      AND d.objid = p.oid AND d.deptype = 'e')))"""


def schema_object_counts(cur: psycopg.Cursor[Any]) -> dict[str, int]:
    """How many tables, indexes, constraints, ... the database has (extension members not counted)."""
    cur.execute(_SCHEMA_OBJECT_COUNTS)
    return dict(cur.fetchone()[0])  # type: ignore[index]


def restored_schema_counts(dsn: str) -> dict[str, int]:
    with connect(dsn) as conn, conn.cursor() as cur:
        return schema_object_counts(cur)


def compare_schema_counts(expected: dict[str, int], actual: dict[str, int]) -> list[str]:
    return [f"the backup had {count} {kind}, the restored database has {actual.get(kind, 0)}"
            for kind, count in sorted(expected.items()) if actual.get(kind, 0) != count]


def compare_tables(expected: list[dict[str, Any]], actual: list[dict[str, Any]]) -> list[str]:
    """Differences between two table fact lists, one sentence per table."""
    want = {(t["schema"], t["name"]): t for t in expected}
    have = {(t["schema"], t["name"]): t for t in actual}
    problems = []
    for key in sorted(want.keys() | have.keys()):
        label = f"{key[0]}.{key[1]}"
        if key not in have:
            problems.append(f"table {label} is missing")
        elif key not in want:
            problems.append(f"table {label} is not in the backup")
        elif want[key]["rows"] != have[key]["rows"]:
            problems.append(f"table {label} has {have[key]['rows']} rows, the backup had {want[key]['rows']}")
        elif want[key]["sha256"] != have[key]["sha256"]:
            problems.append(f"table {label} has the same row count but different content")
    return problems


def _psql_copy_out(psql: PgTool, table: Table, snapshot: str | None) -> list[str]:
    """psql arguments that print one table's rows as COPY text (from `snapshot` when given).

    psql, not psycopg: psycopg hands COPY data to Python one row at a time, psql streams it in C."""
    statements = ["BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"]
    if snapshot:
        statements.append(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
    statements += [f"SET {name} = '{value}'" for name, value in COPY_SESSION_SETTINGS.items()]
    statements += [table.copy_statement("TO STDOUT"), "COMMIT"]
    args = [str(psql.path), "--no-psqlrc", "--quiet", "--no-password", "--set=ON_ERROR_STOP=1"]
    for statement in statements:
        args += ["--command", statement]
    return args


def read_table(dsn: str, psql: PgTool, table: Table, snapshot: str | None = None) -> Iterator[bytes]:
    """A table's rows as COPY text, in chunks."""
    yield from stream_command(_psql_copy_out(psql, table, snapshot), libpq_environment(dsn),
                               f"reading table {table.label}")


class TableDigest:
    """Row count and SHA-256 of a table's COPY text, fed chunk by chunk."""

    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()
        self.rows = 0

    def update(self, chunk: bytes) -> None:
        self.sha256.update(chunk)
        self.rows += chunk.count(b"\n")  # COPY text escapes newlines inside values: one line per row

    def facts(self, table: Table) -> dict[str, Any]:
        return {"schema": table.schema, "name": table.name, "columns": list(table.columns), "rows": self.rows,
                "sha256": self.sha256.hexdigest()}


# --- backup ----------------------------------------------------------------------------------------

@dataclass
class DumpSession:
    """An open exported snapshot: the schema archive and each table's rows all come from it."""

    dsn: str
    snapshot: str
    tables: list[Table]
    facts: dict[str, Any]  # server version, WAL position, ... (the tables' facts are added by the backup)
    pg_dump: PgTool
    psql: PgTool

    def schema_chunks(self) -> Iterator[bytes]:
        """pg_dump's archive of everything but table rows (sequence values and large objects included)."""
        args = [str(self.pg_dump.path), "--format=custom", "--compress=0", f"--snapshot={self.snapshot}",
                "--no-password", *(f"--exclude-table-data={t.dump_pattern()}" for t in self.tables)]
        yield from stream_command(args, libpq_environment(self.dsn), "pg_dump")

    def table_chunks(self, table: Table) -> Iterator[bytes]:
        yield from read_table(self.dsn, self.psql, table, self.snapshot)


@contextlib.contextmanager
def dump_session(dsn: str) -> Iterator[DumpSession]:
    """Export a snapshot and keep it open (its transaction stays open) while the body dumps from it."""
    conn = connect(dsn, autocommit=False)
    try:
        with conn.cursor() as cur:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            cur.execute("SELECT pg_export_snapshot(), pg_is_in_recovery(), "
                        "current_setting('server_version'), current_database(), txid_current_snapshot()::text")
            snapshot, in_recovery, version, database, txid_snapshot = cur.fetchone()  # type: ignore[misc]
            cur.execute("SELECT pg_last_wal_replay_lsn()::text" if in_recovery else "SELECT pg_current_wal_lsn()::text")
            (lsn,) = cur.fetchone()  # type: ignore[misc]
            tables = user_tables(cur)
            counts = schema_object_counts(cur)
        major = server_major(conn)
        facts = {"server_version": version, "server_version_num": conn.info.server_version,
                 "database": database, "endpoint": describe_dsn(dsn), "snapshot": snapshot,
                 "in_recovery": in_recovery, "wal_lsn": lsn, "txid_snapshot": txid_snapshot,
                 "schema_objects": counts}
        yield DumpSession(dsn, snapshot, tables, facts, find_pg_tool("pg_dump", major), find_pg_tool("psql", major))
    finally:
        with contextlib.suppress(Exception):
            conn.rollback()
        conn.close()


