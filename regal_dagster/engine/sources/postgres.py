"""PostgreSQL: dump from one exported snapshot, facts from the same snapshot, restore and validate.

The dump (pg_dump custom format, uncompressed: we compress with zstd) and the manifest's facts (server
version, WAL position, per-table row counts and content fingerprints) are taken from one exported
snapshot, so they describe exactly the same data. Passwords travel to child processes only through
their environment, never on a command line, in a log or in the manifest.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ..errors import RegalError, TargetNotEmptyError, ToolError
from .pg_tools import PgTool, find_pg_tool

CHUNK = 1024 * 1024
DUMP_OBJECT = "database.pgdump"
DUMP_CONTENT = "pg_dump custom-format archive (uncompressed)"

# Settings that make a row's text form, and so its fingerprint, the same on every server.
_STABLE_TEXT_SETTINGS = {
    "DateStyle": "ISO, YMD", "TimeZone": "UTC", "IntervalStyle": "postgres",
    "extra_float_digits": "3", "bytea_output": "hex",
}
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


# --- facts -----------------------------------------------------------------------------------------

def _user_tables(cur: psycopg.Cursor[Any]) -> list[tuple[str, str]]:
    cur.execute("""
        SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
          AND n.nspname !~ '^pg_toast' AND n.nspname !~ '^pg_temp'
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                          AND d.objid = c.oid AND d.deptype = 'e')
        ORDER BY 1, 2""")
    return [(s, t) for s, t in cur.fetchall()]


def table_facts(cur: psycopg.Cursor[Any]) -> list[dict[str, Any]]:
    """Row count and an order-independent content fingerprint of every user table.

    The fingerprint is the sum of a 64-bit hash of each row's text form, with settings pinned so that
    the text form is the same on every server: equal data gives equal fingerprints after a restore.
    """
    for name, value in _STABLE_TEXT_SETTINGS.items():
        cur.execute("SELECT set_config(%s, %s, true)", (name, value))
    facts = []
    for schema, table in _user_tables(cur):
        cur.execute(sql.SQL("SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)), 0)::text "
                            "FROM ONLY {}.{} AS t").format(sql.Identifier(schema), sql.Identifier(table)))
        rows, fingerprint = cur.fetchone()  # type: ignore[misc]
        facts.append({"schema": schema, "name": table, "rows": rows, "fingerprint": fingerprint})
    return facts


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
        elif want[key]["fingerprint"] != have[key]["fingerprint"]:
            problems.append(f"table {label} has the same row count but different content")
    return problems


# --- backup ----------------------------------------------------------------------------------------

@dataclass
class DumpSession:
    """An open snapshot: `chunks()` streams the dump, `facts()` waits for the facts of the same snapshot."""

    chunks: Callable[[], Iterator[bytes]]
    facts: Callable[[], dict[str, Any]]
    pg_dump: PgTool


@contextlib.contextmanager
def dump_session(dsn: str) -> Iterator[DumpSession]:
    conn = connect(dsn, autocommit=False)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pg-facts")
    try:
        with conn.cursor() as cur:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            cur.execute("SELECT pg_export_snapshot(), pg_is_in_recovery(), "
                        "current_setting('server_version'), current_database(), txid_current_snapshot()::text")
            snapshot, in_recovery, version, database, txid_snapshot = cur.fetchone()  # type: ignore[misc]
            cur.execute("SELECT pg_last_wal_replay_lsn()::text" if in_recovery else "SELECT pg_current_wal_lsn()::text")
            (lsn,) = cur.fetchone()  # type: ignore[misc]
        major = server_major(conn)
        pg_dump = find_pg_tool("pg_dump", major)
        imported = threading.Event()

        def gather() -> dict[str, Any]:
            imported.wait(timeout=60)  # let pg_dump import the snapshot before we keep the connection busy
            with conn.cursor() as cur:
                tables = table_facts(cur)
            return {"server_version": version, "server_version_num": conn.info.server_version,
                    "database": database, "endpoint": describe_dsn(dsn), "snapshot": snapshot,
                    "in_recovery": in_recovery, "wal_lsn": lsn, "txid_snapshot": txid_snapshot,
                    "tables": tables}

        facts_future: Future[dict[str, Any]] = pool.submit(gather)

        def chunks() -> Iterator[bytes]:
            yield from _run_pg_dump(pg_dump, dsn, snapshot, on_started=imported.set)

        yield DumpSession(chunks=chunks, facts=lambda: facts_future.result(), pg_dump=pg_dump)
    finally:
        pool.shutdown(wait=True)
        with contextlib.suppress(Exception):
            conn.rollback()
        conn.close()


def _run_pg_dump(tool: PgTool, dsn: str, snapshot: str, on_started: Callable[[], None]) -> Iterator[bytes]:
    args = [str(tool.path), "--format=custom", "--compress=0", f"--snapshot={snapshot}", "--no-password"]
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=errors, env=libpq_environment(dsn))
        assert process.stdout is not None
        try:
            first = True
            while chunk := process.stdout.read(CHUNK):
                if first:
                    on_started()
                    first = False
                yield chunk
            on_started()
            code = process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stdout.close()
        if code != 0:
            errors.seek(0)
            tail = errors.read().decode(errors="replace").strip()[-800:]
            raise ToolError(f"pg_dump failed with exit code {code}: {tail}",
                            "fix the cause above; nothing was stored as a backup")


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


class PgRestoreProcess:
    """pg_restore reading the archive from stdin; `feed` chunks, then `finish`."""

    def __init__(self, dsn: str, dump_major: int, keep_owners: bool = False):
        with connect(dsn) as conn:
            major = max(server_major(conn), dump_major)
        self.tool = find_pg_tool("pg_restore", major)
        dbname = conninfo_to_dict(dsn)["dbname"]
        args = [str(self.tool.path), f"--dbname={dbname}", "--exit-on-error", "--no-password"]
        if not keep_owners:
            args += ["--no-owner", "--no-privileges"]
        self._errors = tempfile.TemporaryFile()
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=self._errors, env=libpq_environment(dsn))

    def feed(self, chunk: bytes) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(chunk)
        except BrokenPipeError:
            self.finish()  # raises with pg_restore's own message

    def finish(self) -> None:
        assert self.process.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.close()
        code = self.process.wait()
        self._errors.seek(0)
        tail = self._errors.read().decode(errors="replace").strip()[-800:]
        self._errors.close()
        if code != 0:
            raise ToolError(f"pg_restore failed with exit code {code}: {tail}",
                            "fix the cause above, then restore again into an empty database")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        with contextlib.suppress(Exception):
            self._errors.close()


def restored_table_facts(dsn: str) -> list[dict[str, Any]]:
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        return table_facts(cur)
