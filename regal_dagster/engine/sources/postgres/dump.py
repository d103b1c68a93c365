"""PostgreSQL: a parallel dump from one exported snapshot, and what its restore and validation share.

A backup is one snapshot, exported by a coordinating session that first locks every table in ACCESS
SHARE mode (as pg_dump does: a TRUNCATE or table-rewriting ALTER TABLE waits for the backup instead of
making it read an empty table), and imported by every worker:
- `schema.pgdump`: pg_dump's custom-format archive of everything but table rows (schema, sequence values,
  large objects, post-data such as indexes and constraints);
- the rows of every table (a big table as its own object, small ones packed several to an object: packs.py) as
  `COPY ... TO STDOUT` text read in-process (psycopg, one session per
  worker), in the database's own encoding, with pg_dump's session settings (empty search_path, ISO
  dates, exact floats, row_security off, no timeouts) and UTC / hex bytea pinned.
The SHA-256 of a table's COPY text is its content fingerprint: a restore loads that text, reads each
table back the same way and compares row counts and SHA-256 sums with the manifest.

The manifest also records the database's own properties (encoding, locale, owner, settings, comment,
grants), the roles it refers to and what a server needs to hold it (ICU, xml, lz4, extensions): facts.py.

Restore (restore.py): the missing roles, then pg_restore pre-data and data (sequences, large objects), the
tables loaded in parallel with COPY, pg_restore post-data with parallel jobs (indexes, constraints,
triggers), then the database's properties.

Passwords travel to child processes only through their environment, never on a command line, in a log
or in the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg

from ...errors import RegalError, ToolError
from ...postgresql.connection import (
    NO_TIMEOUTS,
    apply_settings,
    connect,
    describe_dsn,
    encoded,
    is_text,
    libpq_environment,
    name_bytes,
    name_from_bytes,
    quote_ident,
    readable_name,
    server_major,
    session_codec,
)
from ...postgresql.tools import PgTool, find_pg_tool
from ..streams import stream_command
from .facts import database_properties, referenced_roles, server_needs, used_tablespaces

SCHEMA_OBJECT = "schema.pgdump"
SCHEMA_CONTENT = "pg_dump custom-format archive without table rows (uncompressed)"
TABLE_CONTENT = "COPY text rows of {label}"


def dump_major(tool_versions: dict[str, str]) -> int:
    """The major version of the pg_dump that wrote an archive (its reader must be at least as new)."""
    return int(tool_versions.get("pg_dump", "0").split(".")[0] or 0)

# pg_dump's session settings, for every session that reads or loads rows: names in statements are always
# schema-qualified (an empty search_path, so a regclass or a default is printed with its schema), the
# text form of values is the same on every server (ISO dates, UTC, exact floats, hex bytea), no policy
# silently hides rows (row_security off makes a query that would be filtered fail instead), and no
# timeout of the server's cuts a long table short. A scan starts at block 0, so a freshly loaded table
# reads back in the order it was loaded. Rows are read in as they were written out whatever the server,
# database or role says: xml values may be content, not documents (pg_dump's `SET xmloption = content`),
# and NULL in an array literal is a null element, not the string 'NULL' (array_nulls). The client
# encoding is set per database (client_encoding_for), COPY names the database's own.
COPY_SESSION_SETTINGS = {
    "search_path": "", "DateStyle": "ISO, YMD", "TimeZone": "UTC", "IntervalStyle": "postgres",
    "extra_float_digits": "3", "bytea_output": "hex", "row_security": "off", "synchronize_seqscans": "off",
    **NO_TIMEOUTS, "xmloption": "content", "array_nulls": "on",
}
# Session settings for restoring (all user-settable): bigger sorts for index builds, no commit waits.
RESTORE_SESSION_SETTINGS = {"maintenance_work_mem": "256MB", "work_mem": "64MB", "synchronous_commit": "off"}
# How long the backup waits for the ACCESS SHARE lock on a table that another session holds exclusively
# (a running ALTER TABLE, TRUNCATE, VACUUM FULL, ...) before it fails naming that session.
DEFAULT_LOCK_TIMEOUT_SECONDS = 60.0


def session_settings(conn: psycopg.Connection[Any], encoding: str | None) -> dict[str, str]:
    """COPY_SESSION_SETTINGS for this server (PostgreSQL 17's transaction_timeout too), for a database in
    `encoding` (see client_encoding_for)."""
    settings = dict(COPY_SESSION_SETTINGS)
    if conn.info.server_version >= 170000:
        settings["transaction_timeout"] = "0"
    if encoding:
        settings["client_encoding"] = client_encoding_for(encoding)
    return settings


# Server encodings Python has no codec for (psycopg cannot send or read text in them): their sessions speak
# UTF-8, and COPY's ENCODING option alone keeps the rows in the database's own bytes. A SQL_ASCII database's
# sessions speak SQL_ASCII (no conversion, no check: names and rows as the database's own bytes, as pg_dump
# reads them; see read_text_as_bytes_are in postgresql/connection.py).
NO_PYTHON_CODEC = frozenset({"EUC_TW", "MULE_INTERNAL"})


def client_encoding_for(encoding: str) -> str:
    """The client encoding of the sessions that read or load a database's rows: its own encoding, so that
    names in statements and values in results are exactly the database's, unless Python cannot handle it."""
    return "UTF8" if encoding in NO_PYTHON_CODEC else encoding


def pg_error_reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- tables --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Table:
    schema: str
    name: str
    columns: tuple[str, ...]  # stored columns, in order (no dropped or generated ones)
    pages: int = 0  # size estimate, to start the biggest tables first
    oid: int = 0  # in the source database, at backup time
    unlogged: bool = False
    kind: str = "r"  # pg_class.relkind: r (rows) or p (partitioned: its partitions hold the rows)

    @property
    def label(self) -> str:
        """schema.name for people (a byte of a SQL_ASCII name that is not valid UTF-8 as \\xNN)."""
        return f"{readable_name(self.schema)}.{readable_name(self.name)}"

    def copy_statement(self, direction: str, encoding: str | None, *options: str) -> str:
        """COPY "schema"."table" ("col", ...) TO STDOUT / FROM STDIN, the rows in `encoding` (the database's:
        its own bytes, whatever the session's client encoding), with more `options` (FREEZE)."""
        columns = f" ({', '.join(quote_ident(c) for c in self.columns)})" if self.columns else ""
        if encoding:
            options = (*options, "ENCODING '" + encoding.replace("'", "''") + "'")
        with_options = f" WITH ({', '.join(options)})" if options else ""
        return f"COPY {quote_ident(self.schema)}.{quote_ident(self.name)}{columns} {direction}{with_options}"

    def dump_pattern(self) -> str:
        """This table, exactly, as a pg_dump pattern."""
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"

    def facts(self) -> dict[str, Any]:
        """This table in the manifest: schema, name and columns as text, and, when one of them holds bytes that
        are valid in no encoding (a SQL_ASCII database's), `name_bytes`: each of them exactly, in hex."""
        facts: dict[str, Any] = {"schema": readable_name(self.schema), "name": readable_name(self.name),
                                 "columns": [readable_name(c) for c in self.columns]}
        if not all(map(is_text, (self.schema, self.name, *self.columns))):
            facts["name_bytes"] = {"schema": name_bytes(self.schema).hex(), "name": name_bytes(self.name).hex(),
                                   "columns": [name_bytes(c).hex() for c in self.columns]}
        return facts

    @classmethod
    def from_facts(cls, facts: dict[str, Any]) -> Table:
        if exact := facts.get("name_bytes"):
            return cls(name_from_bytes(bytes.fromhex(exact["schema"])), name_from_bytes(bytes.fromhex(exact["name"])),
                       tuple(name_from_bytes(bytes.fromhex(c)) for c in exact["columns"]))
        return cls(facts["schema"], facts["name"], tuple(facts.get("columns", ())))


def only_each(tables: list[Table]) -> str:
    """`ONLY "s"."a", ONLY "s"."b", ...`: in TRUNCATE and LOCK TABLE, ONLY binds to the one name after it (the
    others would take their inheritance children and partitions with them)."""
    return ", ".join(f"ONLY {t.dump_pattern()}" for t in tables)


def _relations(cur: psycopg.Cursor[Any], kinds: str) -> list[Table]:
    generated = "AND a.attgenerated = ''" if cur.connection.info.server_version >= 120000 else ""
    cur.execute(f"""
        SELECT n.nspname, c.relname, c.relpages, c.oid::int8, c.relpersistence = 'u', c.relkind::text,
               coalesce((SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a
                         WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped {generated}),
                        ARRAY[]::text[])
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = ANY(%s) AND n.nspname NOT IN ('pg_catalog', 'information_schema')
          AND n.nspname !~ '^pg_toast' AND n.nspname !~ '^pg_temp'
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                          AND d.objid = c.oid AND d.deptype = 'e')
        ORDER BY 1, 2""", (list(kinds),))
    return [Table(schema, name, tuple(columns), max(pages, 0), oid, unlogged, kind)
            for schema, name, pages, oid, unlogged, kind, columns in cur.fetchall()]


def locked_relations(cur: psycopg.Cursor[Any]) -> list[Table]:
    """The relations pg_dump locks: ordinary and partitioned tables (not extension members)."""
    return _relations(cur, "rp")


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
                      WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
                        AND k.contype IN ('p','u','f','c','x')),
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
    """Differences between two table fact lists, one sentence per table (tables matched by their exact names)."""
    def exact(facts: dict[str, Any]) -> tuple[str, str]:
        table = Table.from_facts(facts)
        return table.schema, table.name

    want = {exact(t): t for t in expected}
    have = {exact(t): t for t in actual}
    problems = []
    for key in sorted(want.keys() | have.keys()):
        label = Table(*key, ()).label
        if key not in have:
            problems.append(f"table {label} is missing")
        elif key not in want:
            problems.append(f"table {label} is not in the backup")
        elif want[key]["rows"] != have[key]["rows"]:
            problems.append(f"table {label} has {have[key]['rows']} rows, the backup had {want[key]['rows']}")
        elif want[key]["sha256"] != have[key]["sha256"]:
            problems.append(f"table {label} has the same row count but different content")
    return problems


# COPY hands over one row at a time; rows are joined into chunks of about this size before they go on.
COPY_CHUNK = 1 << 20


def copy_out(cur: psycopg.Cursor[Any], table: Table, encoding: str | None) -> Iterator[bytes]:
    """A table's rows as COPY text in `encoding` (the database's), in chunks, read by this session."""
    rows: list[bytes] = []
    size = 0
    with cur.copy(encoded(cur.connection, table.copy_statement("TO STDOUT", encoding))) as copy:
        while data := copy.read():
            rows.append(bytes(data))
            size += len(data)
            if size >= COPY_CHUNK:
                yield b"".join(rows)
                rows, size = [], 0
    if rows:
        yield b"".join(rows)


# Tables bigger than this are read by a psql child instead: psycopg hands COPY over one row per Python call
# (about 40 CPU-seconds per GB of rows, more than the server spends), psql reads it in C and passes it on in
# big chunks; its start (~10 ms) is what makes in-process reading better for small tables.
PSQL_COPY_BYTES = 4 << 20
PAGE_BYTES = 8192  # pg_class.relpages is in pages of this size (the default build's)


def psql_copy_out(psql: PgTool, dsn: str, table: Table, settings: dict[str, str], codec: str,
                  encoding: str | None, snapshot: str | None = None) -> Iterator[bytes]:
    """A table's rows as COPY text in `encoding` read by a psql child in a session with `settings`
    (session_settings): the same bytes as copy_out. `codec`: Python's name of the client encoding (session_codec),
    in which psql passes the statement on as it is (a table's name may not be ASCII, or even text). ToolError when
    psql fails (a table missing).
    With `snapshot`: read in that exported snapshot, after taking the table's ACCESS SHARE lock NOWAIT
    (ToolError "could not obtain lock" before any row when a statement is queued for the table)."""
    env = libpq_environment(dsn)
    settings = dict(settings)
    if client_encoding := settings.pop("client_encoding", None):
        env["PGCLIENTENCODING"] = client_encoding
    literal = ", ".join("'" + v.replace("'", "''") + "'" for v in settings.values())
    names = ", ".join("'" + k.replace("'", "''") + "'" for k in settings)
    apply = (f"SELECT count(set_config(name, value, false)) FROM unnest(ARRAY[{names}]::text[], "
             f"ARRAY[{literal}]::text[]) AS s(name, value)")
    args: list[str | bytes] = [str(psql.path), "-X", "-q", "--no-password", "-v", "ON_ERROR_STOP=1",
                               "-c", "\\o /dev/null", "-c", apply,  # set_config's result is not COPY text
                               "-c", "\\o"]
    if snapshot is not None:
        args += ["-c", "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
                 "-c", f"SET TRANSACTION SNAPSHOT '{snapshot}'",
                 "-c", f"LOCK TABLE ONLY {table.dump_pattern()} IN ACCESS SHARE MODE NOWAIT".encode(codec,
                                                                                                 "surrogateescape")]
    args += ["-c", table.copy_statement("TO STDOUT", encoding).encode(codec, "surrogateescape")]
    yield from stream_command(args, env, f"psql reading table {table.label}")




def read_error(table: Table, exc: psycopg.Error | ToolError) -> RegalError:
    """One clear message for a failed read of a table's rows (in-process, or by psql)."""
    reason = exc.message if isinstance(exc, ToolError) else pg_error_reason(exc)
    if "row-level security" in reason:
        return RegalError(f"reading table {table.label}: row-level security policies would hide some of its rows "
                          "from the backup's user, so a backup would silently miss them",
                          "back up as the table's owner, a superuser or a role with BYPASSRLS")
    return ToolError(f"reading table {table.label} failed: {reason}",
                     "fix the cause above; nothing was stored as a backup")


class TableDigest:
    """Row count and SHA-256 of a table's COPY text, fed chunk by chunk."""

    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()
        self.rows = 0

    def update(self, chunk: bytes) -> None:
        self.sha256.update(chunk)
        self.rows += chunk.count(b"\n")  # COPY text escapes newlines inside values: one line per row

    def facts(self, table: Table) -> dict[str, Any]:
        return {**table.facts(), "rows": self.rows, "sha256": self.sha256.hexdigest()}


# --- backup ----------------------------------------------------------------------------------------

class SchemaLockQueued(Exception):
    """A statement queued behind the backup's locks before pg_dump took its own: the backup starts again."""


class DumpSession:
    """An open exported snapshot: the schema archive and each table's rows all come from it.

    The coordinating session holds an ACCESS SHARE lock on every table (taken before its snapshot), as
    pg_dump does: an ALTER TABLE or TRUNCATE that would rewrite or empty a table waits until the backup
    ends instead of making the backup read it empty. Workers read tables in sessions of their own that
    imported the snapshot; a worker that cannot get its own lock at once (because such a statement is
    already queued behind the coordinator's lock, and would queue the worker behind it in turn) reads
    that table through the coordinating session, which holds the lock already."""

    def __init__(self, dsn: str, snapshot: str, tables: list[Table], locked: list[Table], facts: dict[str, Any],
                 pg_dump: PgTool, coordinator: psycopg.Connection[Any], encoding: str, lock_timeout: float):
        self.dsn, self.snapshot, self.tables, self.locked, self.facts = dsn, snapshot, tables, locked, facts
        self.pg_dump, self.coordinator, self.encoding, self.lock_timeout = pg_dump, coordinator, encoding, lock_timeout
        self._coordinator_busy = threading.Lock()
        self._local = threading.local()
        self._workers: list[psycopg.Connection[Any]] = []
        self._workers_lock = threading.Lock()
        self._schema_done = threading.Event()
        self.schema_application = f"regal-backup schema {snapshot}"
        self.read_by_coordinator: list[str] = []  # tables a queued lock made a worker hand over
        self.psql = find_pg_tool("psql", pg_dump.major)  # reads big tables (psql_copy_out)
        self._psql_settings = session_settings(coordinator, encoding)
        self._psql_settings.pop("lock_timeout", None)  # NOWAIT decides
        self._codec = session_codec(coordinator)  # the session's, set by session_settings

    def schema_chunks(self) -> Iterator[bytes]:
        """pg_dump's archive of everything but table rows (sequence values and large objects included)."""
        args: list[str | bytes] = [
            str(self.pg_dump.path), "--format=custom", "--compress=0", f"--snapshot={self.snapshot}",
            "--no-password", f"--lock-wait-timeout={max(1, int(self.lock_timeout * 1000))}",
            # the patterns below are UTF-8, as every argument is: pg_dump must read them so (in the
            # database's own encoding a non-ASCII table name would not match, and its rows would be
            # dumped too); a SQL_ASCII database converts nothing: pg_dump speaks it, as pg_dump alone
            # does, and the patterns are its names' own bytes
            *([] if self.encoding == "SQL_ASCII" else ["--encoding=UTF8"]),
            *(b"--exclude-table-data=" + name_bytes(pattern) for pattern in exclusion_patterns(self.locked))]
        env = libpq_environment(self.dsn)
        env["PGAPPNAME"] = self.schema_application
        try:
            yield from stream_command(args, env, "pg_dump")
        finally:
            self._schema_done.set()

    def wait_for_schema_locks(self) -> None:
        """Until pg_dump holds its own locks on the tables (or has finished): from then on a statement
        queued behind the backup's locks can no longer make pg_dump wait for it. A statement that queued
        behind them before (an ALTER TABLE, TRUNCATE or DROP) would make pg_dump wait for it while it waits
        for the backup: then pg_dump's lock request is cancelled and SchemaLockQueued raised, so that the
        backup lets that statement through and starts again."""
        oids = [t.oid for t in self.locked]
        if not oids:
            return
        deadline = time.monotonic() + self.lock_timeout + 30
        coordinator = self.coordinator.info.backend_pid
        with connect(self.dsn, autocommit=True) as monitor:
            while not self._schema_done.is_set() and time.monotonic() < deadline:
                locked, stuck = monitor.execute("""
                    SELECT (SELECT count(DISTINCT l.relation) FROM pg_locks l
                            WHERE l.pid = a.pid AND l.locktype = 'relation' AND l.granted
                              AND l.relation = ANY(%(oids)s::oid[])),
                           EXISTS (SELECT 1 FROM unnest(pg_blocking_pids(a.pid)) AS ahead(pid)
                                   WHERE %(coordinator)s = ANY(pg_blocking_pids(ahead.pid)))
                    FROM pg_stat_activity a WHERE a.application_name = %(application)s""",
                    {"oids": oids, "coordinator": coordinator, "application": self.schema_application}
                ).fetchone() or (0, False)
                if locked >= len(oids):
                    return
                if stuck:
                    monitor.execute("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                                    (self.schema_application,))
                    raise SchemaLockQueued()
                self._schema_done.wait(0.02)

    def _worker(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = connect(self.dsn, autocommit=True)
            with self._workers_lock:
                self._workers.append(conn)
            apply_settings(conn, session_settings(conn, self.encoding))
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            conn.execute(f"SET TRANSACTION SNAPSHOT '{self.snapshot}'")
            self._local.conn = conn
            self._local.all_locked = self._lock_all(conn)
        return conn

    def _lock_all(self, conn: psycopg.Connection[Any]) -> bool:
        """Every table's lock for this worker in one statement, when none is wanted by someone else now
        (else each table is tried on its own, see table_chunks)."""
        if not self.tables:
            return True
        names = only_each(self.tables)
        try:
            conn.execute(encoded(conn, f"SAVEPOINT regal_lock; LOCK TABLE {names} IN ACCESS SHARE MODE NOWAIT; "
                                       "RELEASE SAVEPOINT regal_lock"))
            return True
        except psycopg.errors.LockNotAvailable:
            conn.execute("ROLLBACK TO SAVEPOINT regal_lock; RELEASE SAVEPOINT regal_lock")
            return False

    def table_chunks(self, table: Table) -> Iterator[bytes]:
        """A table's rows as COPY text, in the database's own encoding, from the snapshot: a big table by a
        psql child (unless its lock is wanted by someone else right now), the others in-process."""
        if self.psql is not None and table.pages * PAGE_BYTES >= PSQL_COPY_BYTES:
            started = False
            try:
                for chunk in psql_copy_out(self.psql, self.dsn, table, self._psql_settings, self._codec,
                                           self.encoding, snapshot=self.snapshot):
                    started = True
                    yield chunk
                return
            except ToolError as exc:
                if started or "could not obtain lock" not in exc.message:
                    raise read_error(table, exc) from None
        conn = self._worker()
        try:
            with conn.cursor() as cur:
                own = True
                if not self._local.all_locked:
                    try:
                        cur.execute(encoded(conn, f"SAVEPOINT regal_lock; LOCK TABLE ONLY {table.dump_pattern()} "
                                                  "IN ACCESS SHARE MODE NOWAIT; RELEASE SAVEPOINT regal_lock"))
                    except psycopg.errors.LockNotAvailable:
                        cur.execute("ROLLBACK TO SAVEPOINT regal_lock; RELEASE SAVEPOINT regal_lock")
                        own = False
                if own:
                    yield from copy_out(cur, table, self.encoding)
            if not own:
                with self._coordinator_busy, self.coordinator.cursor() as cur:
                    self.read_by_coordinator.append(table.label)
                    yield from copy_out(cur, table, self.encoding)
        except psycopg.Error as exc:
            self._drop_worker(conn)
            raise read_error(table, exc) from None
        except BaseException:
            self._drop_worker(conn)  # stopped in the middle of a COPY: this session is of no further use
            raise

    def _drop_worker(self, conn: psycopg.Connection[Any]) -> None:
        self._local.conn = None
        with contextlib.suppress(Exception):
            conn.close()

    def close(self) -> None:
        with self._workers_lock:
            for conn in self._workers:
                with contextlib.suppress(Exception):
                    conn.close()
            self._workers.clear()


def exclusion_patterns(tables: list[Table], limit: int = 32_000) -> list[str]:
    """pg_dump patterns that match exactly these tables, a few: `"schema".("a"|"b"|...)` per schema (quoted
    names match literally, the alternation outside quotes is a regular expression). One pattern per table
    makes pg_dump run a query per table; each pattern stays well under the kernel's limit for one argument."""
    by_schema: dict[str, list[str]] = {}
    for table in tables:
        by_schema.setdefault(table.schema, []).append(quote_ident(table.name))
    patterns = []
    for schema, names in by_schema.items():
        group: list[str] = []
        size = 0
        for name in [*names, None]:
            if name is None or (group and size + len(name) > limit):
                patterns.append(f"{quote_ident(schema)}.({'|'.join(group)})")
                group, size = [], 0
            if name is not None:
                group.append(name)
                size += len(name) + 1
    return patterns


def _lock_refused(conn: psycopg.Connection[Any], tables: list[Table], timeout: float) -> RegalError:
    """Which of `tables` another session holds exclusively, and who that session is (pid, application,
    user, state, statement), as one message."""
    labels = {t.oid: t.label for t in tables}
    holders = conn.execute(r"""
        SELECT l.relation::int8, a.pid, coalesce(a.application_name, ''), coalesce(a.usename::text, ''),
               coalesce(a.state, ''), left(regexp_replace(coalesce(a.query, ''), '\s+', ' ', 'g'), 200)
        FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'relation' AND l.relation = ANY(%s::oid[]) AND l.granted AND l.pid <> pg_backend_pid()
          AND l.mode = 'AccessExclusiveLock'
        ORDER BY 1, 2""", (list(labels),)).fetchall()
    if not holders:
        return RegalError(f"the backup could not lock its tables within {timeout:g}s; the session holding the "
                          "lock has ended since", "run the backup again")
    held = "; ".join(f"table {labels.get(relation, relation)} is locked exclusively by pid {pid} (application "
                     f"'{readable_name(app)}', user {readable_name(user)}, {state}: {readable_name(query)})"
                     for relation, pid, app, user, state, query in holders)
    return RegalError(f"the backup could not lock its tables within {timeout:g}s: {held}",
                      "let that statement or transaction finish (or end it), then run the backup again")


# Tables locked per LOCK statement (one round trip each).
LOCK_BATCH = 500
# How often the backup takes its snapshot again when a table created meanwhile changed right after it.
LOCK_ATTEMPTS = 10


def _lock_present(cur: psycopg.Cursor[Any], tables: list[Table], timeout: float) -> set[int]:
    """ACCESS SHARE locks on `tables`, LOCK_BATCH per statement, in the open transaction (a LOCK takes no
    snapshot); a table dropped or renamed since it was listed is left out. The oids locked."""
    locked: set[int] = set()
    for first in range(0, len(tables), LOCK_BATCH):
        batch = tables[first:first + LOCK_BATCH]
        cur.execute("SAVEPOINT regal_lock")
        try:
            cur.execute(encoded(cur.connection, f"LOCK TABLE {only_each(batch)} IN ACCESS SHARE MODE"))
            locked.update(t.oid for t in batch)
        except psycopg.errors.UndefinedTable:
            cur.execute("ROLLBACK TO SAVEPOINT regal_lock")
            if len(batch) > 1:  # which one is gone: one at a time
                for table in batch:
                    locked |= _lock_present(cur, [table], timeout)
        except psycopg.errors.LockNotAvailable:
            cur.execute("ROLLBACK TO SAVEPOINT regal_lock")
            raise _lock_refused(cur.connection, batch, timeout) from None
        cur.execute("RELEASE SAVEPOINT regal_lock")  # a snapshot cannot be exported from a subtransaction
    return locked


def _lock_late_tables(cur: psycopg.Cursor[Any], late: list[Table], timeout: float) -> bool:
    """Lock the tables the snapshot sees but the backup did not lock before it (created, or renamed, meanwhile).
    True when their rows as the snapshot sees them are their rows now: none was dropped, truncated or
    rewritten since the snapshot (any of which gives it a new relation file, which the catalogs, read outside
    the snapshot once the lock is held, would show)."""
    if len(_lock_present(cur, late, timeout)) < len(late):
        return False
    cur.execute("SELECT count(*) FROM pg_class c WHERE c.oid = ANY(%s::oid[]) "
                "AND nullif(c.relfilenode, 0) IS DISTINCT FROM pg_relation_filenode(c.oid)",
                ([t.oid for t in late],))
    return cur.fetchone()[0] == 0  # type: ignore[index]


@contextlib.contextmanager
def dump_session(dsn: str, lock_timeout: float = DEFAULT_LOCK_TIMEOUT_SECONDS,
                 role_passwords: bool = False) -> Iterator[DumpSession]:
    """Lock every table, export a snapshot and keep both (the transaction stays open) while the body
    dumps from it. The locks come first: the snapshot, taken after them, sees every change a rewrite or
    TRUNCATE committed before, and none can commit after."""
    conn = connect(dsn, autocommit=True)
    session: DumpSession | None = None
    try:
        try:  # in UTF-8, as the manifest records them (the tables' names come later, in the database's encoding)
            properties = database_properties(conn)
            roles = referenced_roles(conn, role_passwords)
            tablespaces = used_tablespaces(conn)
        except psycopg.errors.CharacterNotInRepertoire as exc:
            raise RegalError(f"the database's own properties, roles or tablespaces hold a name or text that is not "
                             f"valid UTF-8 ({pg_error_reason(exc)}): regal-backup records them as text",
                             "rename that role or tablespace, or rewrite the database's comment or settings in "
                             "UTF-8; or back the server up with a `postgres_cluster` target") from None
        needs = server_needs(conn)
        encoding = properties["encoding"]
        settings = session_settings(conn, encoding)
        settings["lock_timeout"] = str(max(1, int(lock_timeout * 1000)))
        apply_settings(conn, settings)
        for _attempt in range(LOCK_ATTEMPTS):
            with conn.cursor() as cur:
                candidates = locked_relations(cur)
                cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                locked_before = _lock_present(cur, candidates, lock_timeout)  # the snapshot comes after
                cur.execute("SELECT pg_export_snapshot(), pg_is_in_recovery(), current_setting('server_version'), "
                            "current_database(), txid_current_snapshot()::text")
                snapshot, in_recovery, version, database, txid_snapshot = cur.fetchone()  # type: ignore[misc]
                locked = locked_relations(cur)  # as the snapshot sees them
                late = [t for t in locked if t.oid not in locked_before]
                if late and not _lock_late_tables(cur, late, lock_timeout):
                    cur.execute("ROLLBACK")  # dropped, truncated or rewritten since the snapshot: list again
                    continue
                cur.execute("SELECT pg_last_wal_replay_lsn()::text" if in_recovery
                            else "SELECT pg_current_wal_lsn()::text")
                (lsn,) = cur.fetchone()  # type: ignore[misc]
                counts = schema_object_counts(cur)
                cur.execute("SET lock_timeout = 0")
                break
        else:
            raise RegalError(f"tables kept being dropped, truncated or rewritten right after the backup's snapshot "
                             f"({LOCK_ATTEMPTS} attempts)",
                             "run the backup again once the schema change (migration) has finished")
        tables = [t for t in locked if t.kind == "r"]  # partitioned tables hold no rows of their own
        skipped = [t.label for t in tables if in_recovery and t.unlogged]
        tables = [t for t in tables if not (in_recovery and t.unlogged)]
        major = server_major(conn)
        facts = {"server_version": version, "server_version_num": conn.info.server_version,
                 "database": readable_name(database), "endpoint": describe_dsn(dsn), "snapshot": snapshot,
                 "in_recovery": in_recovery, "wal_lsn": lsn, "txid_snapshot": txid_snapshot,
                 "schema_objects": counts, "database_properties": properties, "encoding": encoding,
                 "roles": roles, "tablespaces": tablespaces, "server_needs": needs,
                 "unlogged_tables_skipped": skipped}
        session = DumpSession(dsn, snapshot, tables, locked, facts, find_pg_tool("pg_dump", major), conn, encoding,
                              lock_timeout)
        yield session
    finally:
        if session is not None:
            session.close()
        with contextlib.suppress(Exception):
            conn.execute("ROLLBACK")
        conn.close()
