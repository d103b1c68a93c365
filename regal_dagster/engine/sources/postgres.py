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
import os
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ..errors import RegalError, TargetNotEmptyError, ToolError
from .command import stream_command
from .pg_tools import PgTool, find_pg_tool

SCHEMA_OBJECT = "schema.pgdump"
SCHEMA_CONTENT = "pg_dump custom-format archive without table rows (uncompressed)"
TABLE_CONTENT = "COPY text rows of {label}"

# Settings that make a row's text form, and so its fingerprint, the same on every server; and a scan that
# starts at block 0, so a freshly loaded table reads back in the order it was loaded.
_COPY_SESSION_SETTINGS = {
    "DateStyle": "ISO, YMD", "TimeZone": "UTC", "IntervalStyle": "postgres",
    "extra_float_digits": "3", "bytea_output": "hex", "row_security": "off", "synchronize_seqscans": "off",
    "statement_timeout": "0",
}
# Session settings for restoring (all user-settable): bigger sorts for index builds, no commit waits.
_RESTORE_SESSION_SETTINGS = {"maintenance_work_mem": "256MB", "work_mem": "64MB", "synchronous_commit": "off"}
_LIBPQ_ENV = {
    "host": "PGHOST", "hostaddr": "PGHOSTADDR", "port": "PGPORT", "dbname": "PGDATABASE", "user": "PGUSER",
    "password": "PGPASSWORD", "passfile": "PGPASSFILE", "sslmode": "PGSSLMODE", "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT", "sslkey": "PGSSLKEY", "sslcrl": "PGSSLCRL", "connect_timeout": "PGCONNECT_TIMEOUT",
    "application_name": "PGAPPNAME", "options": "PGOPTIONS", "channel_binding": "PGCHANNELBINDING",
    "gssencmode": "PGGSSENCMODE", "target_session_attrs": "PGTARGETSESSIONATTRS", "service": "PGSERVICE",
    "sslnegotiation": "PGSSLNEGOTIATION", "require_auth": "PGREQUIREAUTH",
}


# --- connection ------------------------------------------------------------------------------------

def describe_dsn(dsn: str) -> str:
    """host:port/dbname as user — for people and logs; never the password."""
    try:
        p = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(unparseable DSN)"
    return f"{p.get('host', 'localhost')}:{p.get('port', 5432)}/{p.get('dbname', '?')} as {p.get('user', '?')}"


def with_dbname(dsn: str, dbname: str) -> str:
    return make_conninfo(dsn, dbname=dbname)


def libpq_environment(dsn: str) -> dict[str, str]:
    """The environment for a PostgreSQL client program: inherited PG* variables replaced by the DSN's."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        raise RegalError("the DSN cannot be parsed", "write it as postgresql://user@host:port/dbname") from None
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    for key, value in params.items():
        if key not in _LIBPQ_ENV:
            raise RegalError(f"the DSN parameter '{key}' is not supported for backups", "remove it from the DSN")
        env[_LIBPQ_ENV[key]] = str(value)
    return env


def connect(dsn: str, **kwargs: Any) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(dsn, connect_timeout=10, **kwargs)
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        if "password" in reason.lower():
            reason = "authentication failed"
        raise RegalError(f"cannot connect to PostgreSQL at {describe_dsn(dsn)}: {reason}",
                         "check that the server is up and reachable, and the DSN and credentials in the policy") from None


def server_major(conn: psycopg.Connection[Any]) -> int:
    return conn.info.server_version // 10000


# --- tables --------------------------------------------------------------------------------------

def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


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
    statements += [f"SET {name} = '{value}'" for name, value in _COPY_SESSION_SETTINGS.items()]
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


# --- restore ---------------------------------------------------------------------------------------

def user_relation_count(dsn: str) -> int:
    with connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("""SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                       WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
                         AND n.nspname !~ '^pg_toast' AND n.nspname !~ '^pg_temp'""")
        return int(cur.fetchone()[0])  # type: ignore[index]


def prepare_target_database(dsn: str, drop_existing: bool) -> str:
    """Check the target; returns 'created', 'empty' or 'replace' (the drop happens later, after the
    backup has been authenticated, in `reset_database`). Refuses a non-empty database unless told."""
    dbname = conninfo_to_dict(dsn).get("dbname")
    if not dbname:
        raise RegalError("the restore DSN names no database", "add the database name, e.g. .../regalpos_restored")
    with connect(with_dbname(dsn, "postgres"), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
        exists = cur.fetchone() is not None
        if not exists:
            cur.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(dbname)))
            return "created"
    if user_relation_count(dsn) == 0:
        return "empty"
    if not drop_existing:
        raise TargetNotEmptyError(
            f"the database {describe_dsn(dsn)} is not empty",
            "restore into a new database name, or pass --drop-existing to replace it (it is dropped only after "
            "the backup has been read back and authenticated)")
    return "replace"


def reset_database(dsn: str) -> None:
    dbname = conninfo_to_dict(dsn)["dbname"]
    with connect(with_dbname(dsn, "postgres"), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
        cur.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(dbname)))


def restore_tools(dsn: str, dump_major: int) -> tuple[PgTool, PgTool]:
    """pg_restore and psql able to read an archive of `dump_major` and talk to the target server."""
    with connect(dsn) as conn:
        major = max(server_major(conn), dump_major)
    return find_pg_tool("pg_restore", major), find_pg_tool("psql", major)


def run_pg_restore(pg_restore: PgTool, dsn: str, archive: Path, sections: list[str], *, jobs: int = 1,
                   keep_owners: bool = False) -> None:
    """pg_restore of some sections of an archive file, with restore-friendly session settings."""
    args = [str(pg_restore.path), f"--dbname={conninfo_to_dict(dsn)['dbname']}", "--exit-on-error",
            "--no-password", f"--jobs={jobs}", *(f"--section={s}" for s in sections)]
    if not keep_owners:
        args += ["--no-owner", "--no-privileges"]
    env = libpq_environment(dsn)
    env["PGOPTIONS"] = " ".join(f"-c {k}={v}" for k, v in _RESTORE_SESSION_SETTINGS.items())
    result = subprocess.run([*args, str(archive)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            check=False)
    if result.returncode != 0:
        tail = result.stderr.decode(errors="replace").strip()[-800:]
        raise ToolError(f"pg_restore ({', '.join(sections)}) failed with exit code {result.returncode}: {tail}",
                        "fix the cause above, then restore again into an empty database")


@dataclass
class TableLoad:
    write: Callable[[bytes], None]  # takes chunks of COPY text
    rows: int = -1  # rows the server loaded, once the load has committed


@contextlib.contextmanager
def table_loader(dsn: str, table: Table) -> Iterator[TableLoad]:
    """COPY FROM STDIN into one (new, empty) table, in its own transaction, committed when the block ends.

    The table is truncated in the same transaction first. That gives it a new file, so COPY fills pages
    strictly in order without looking for free space in earlier pages (and may freeze the rows, sparing
    a later anti-wraparound vacuum): the table then reads back in exactly the order it was loaded, which
    is what lets validation compare the SHA-256 of its COPY text with the backup's."""
    with connect(dsn) as conn, conn.cursor() as cur:
        for name, value in {**_COPY_SESSION_SETTINGS, **_RESTORE_SESSION_SETTINGS}.items():
            cur.execute("SELECT set_config(%s, %s, false)", (name, value))
        try:
            cur.execute(f"TRUNCATE ONLY {quote_ident(table.schema)}.{quote_ident(table.name)}")
            with cur.copy(table.copy_statement("FROM STDIN WITH (FREEZE)")) as copy:
                load = TableLoad(copy.write)
                yield load
            load.rows = cur.rowcount
        except psycopg.Error as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ToolError(f"loading table {table.label} failed: {reason}",
                            "fix the cause above, then restore again into an empty database") from None
        conn.commit()


def restored_table_facts(dsn: str, tables: list[Table], psql: PgTool, jobs: int = 1) -> list[dict[str, Any]]:
    """Row count and SHA-256 of each table's COPY text in a restored database, `jobs` tables at a time."""
    def digest(table: Table) -> dict[str, Any] | None:
        d = TableDigest()
        try:
            for chunk in read_table(dsn, psql, table):
                d.update(chunk)
        except ToolError:
            return None  # missing or unreadable: compare_tables reports it missing
        return d.facts(table)

    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="pg-validate") as pool:
        return [facts for facts in pool.map(digest, tables) if facts is not None]
