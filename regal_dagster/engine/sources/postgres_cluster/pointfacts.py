"""Facts at a named restore point: what a server held, recorded at the moment of `pg_create_restore_point`, that
must hold exactly on a copy recovered to that point (`recovery_target_name`).

Exactness. Recovery to a restore point R applies exactly the transactions whose COMMIT record precedes R in the
WAL. Facts read under an MVCC snapshot S show exactly the transactions S sees as committed. The two sets are equal
when no transaction S does not see commits before R. Snapshots alone cannot prove that (a transaction whose xid is
above every completed one is in no snapshot, and a commit is in the WAL before it leaves the snapshot's running
set), so the transaction id counter proves it instead. In one REPEATABLE READ session per database the first
statement fixes each snapshot S_i; then, in the first session, pg_current_xact_id() takes the next id N1, the
restore point R is written, and a separate session takes the next id N2. Facts are exact when
- every S_i has no running transaction (xip empty) and xmax = N1: every id below N1 had ended before S_1 was taken,
  so S_i sees as committed exactly the ids below N1 that committed, all of whose COMMIT records precede S_1 and R;
- N2 = N1 + 1: no id was assigned between N1 and N2, so no other transaction could commit before R (a COMMIT
  record needs an id; N1 is the recording session, which writes nothing and ends after R; N2 is taken after R).
Sequences (not transactional), unlogged and temporary tables (not recovered) are not facts. When a busy server
keeps assigning ids in that short window, it is tried again a few times, then only the restore point is kept,
without facts, and the result says so.

The same `database_facts` reads the source and the restored server, with the same output settings, so that equal
data gives equal text, hashed row by row in byte order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from ...errors import RegalError
from ...postgresql.connection import connect

ATTEMPTS = 5
MAX_DATABASES = 8
MAX_TABLES = 20  # sampled per database, in name order, among the readable small tables
MAX_TABLE_BYTES = 8 * 1024 * 1024  # pg_table_size (with TOAST): the content hash reads the table on the source
OUTPUT_SETTINGS = {"TimeZone": "UTC", "DateStyle": "ISO, YMD", "IntervalStyle": "postgres",
                   "extra_float_digits": "1", "bytea_output": "hex", "lc_monetary": "C"}
_TABLES = """
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p') AND c.relpersistence <> 't'
      AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%%'"""
_SAMPLE = ("SELECT n.nspname, c.relname" + _TABLES + " AND c.relkind = 'r' AND c.relpersistence = 'p'"
           " AND NOT c.relrowsecurity AND has_table_privilege(c.oid, 'SELECT')"
           " AND pg_table_size(c.oid) <= %s ORDER BY 1, 2 LIMIT %s")


@dataclass
class PointFacts:
    name: str
    lsn: str | None = None  # where the restore point's record ends (pg_create_restore_point); None: not created
    created_at: str | None = None
    facts: dict[str, dict[str, Any]] | None = None  # database -> {"tables": n, "sample": {schema.table: {...}}}
    note: str = ""  # how the facts were proved exact, or why there are none
    attempts: int = 0
    next_xid: str | None = None  # N1: the facts hold the transactions below it that committed

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def database_facts(conn: psycopg.Connection[Any], sample: list[str] | None = None) -> dict[str, Any]:
    """How many tables the database has (temporary ones aside) and, for `sample` (default: chosen here), each
    table's row count and the SHA-256 of its rows as text, sorted bytewise."""
    row = conn.execute("SELECT count(*)" + _TABLES).fetchone()
    assert row is not None
    if sample is None:
        sample = [f"{s}.{t}" for s, t in conn.execute(_SAMPLE, (MAX_TABLE_BYTES, MAX_TABLES)).fetchall()]
    found: dict[str, Any] = {}
    for qualified in sample:
        schema, _, table = qualified.partition(".")
        counted = conn.execute(sql.SQL(
            "SELECT count(*), encode(sha256(convert_to(coalesce(string_agg(t::text, E'\\n' "
            "ORDER BY t::text COLLATE \"C\"), ''), 'UTF8')), 'hex') FROM ONLY {} t").format(
            sql.Identifier(schema, table))).fetchone()
        assert counted is not None
        found[qualified] = {"rows": int(counted[0]), "sha256": str(counted[1])}
    return {"tables": int(row[0]), "sample": found}


def _session(dsn: str, database: str) -> psycopg.Connection[Any]:
    conn = connect(make_conninfo(dsn, dbname=database), autocommit=True)
    for name, value in OUTPUT_SETTINGS.items():
        conn.execute(sql.SQL("SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
    return conn


def _snapshot(text: str) -> tuple[int, int, list[int]]:
    xmin, xmax, xip = text.split(":")
    return int(xmin), int(xmax), [int(x) for x in xip.split(",") if x]


def create_restore_point(dsn: str, name: str) -> PointFacts:
    """A named restore point on the server at `dsn` and, when provably exact (see the module), the facts of up to
    MAX_DATABASES databases at it. RegalError when the server cannot be reached."""
    with connect(dsn, autocommit=True) as conn:
        databases = [r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate "
            "AND has_database_privilege(datname, 'CONNECT') ORDER BY datname LIMIT %s", (MAX_DATABASES,)).fetchall()]
    point = PointFacts(name)
    if not databases:
        point.note = "no restore point: the role may connect to no database of the server"
        return point
    for attempt in range(1, ATTEMPTS + 1):
        point.attempts = attempt
        label = name if attempt == 1 else f"{name}_{attempt}"
        try:
            facts = _attempt(dsn, databases, label, point)
        except psycopg.Error as exc:
            reason = (exc.diag.message_primary or str(exc)).strip()
            point.note = (f"{'only the restore point, no facts' if point.lsn else 'no restore point'}: {reason} (a "
                          "superuser, or a role granted EXECUTE on pg_create_restore_point(text) and SELECT on the "
                          "tables, can record them)")
            return point
        if facts is not None:
            point.facts = facts
            point.note = (f"facts of {len(facts)} database(s), exact: no transaction id was running or assigned "
                          "between their snapshot and the restore point")
            return point
    point.note = (f"only the restore point, no facts: in {ATTEMPTS} attempts, transactions were running or began "
                  "between the snapshot and the restore point, so no facts could be proved exact")
    return point


def _attempt(dsn: str, databases: list[str], label: str, point: PointFacts) -> dict[str, dict[str, Any]] | None:
    with contextlib.ExitStack() as stack:
        probe = stack.enter_context(connect(dsn, autocommit=True))
        sessions = {db: stack.enter_context(_session(dsn, db)) for db in databases}
        snapshots = []
        for conn in sessions.values():
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            snapshots.append(_snapshot(_one(conn, "SELECT pg_current_snapshot()::text")))
        first = next(iter(sessions.values()))
        n1 = int(_one(first, "SELECT pg_current_xact_id()::text"))
        point.next_xid = str(n1)
        point.lsn = _one(first, "SELECT pg_create_restore_point(%s)::text", (label,))
        point.name, point.created_at = label, datetime.now(UTC).isoformat()
        n2 = int(_one(probe, "SELECT pg_current_xact_id()::text"))
        exact = n2 == n1 + 1 and all(not xip and xmax == n1 for _xmin, xmax, xip in snapshots)
        facts = {db: database_facts(conn) for db, conn in sessions.items()} if exact else None
        for conn in sessions.values():
            conn.execute("ROLLBACK")
        return facts


def _one(conn: psycopg.Connection[Any], query: str, params: tuple[Any, ...] | None = None) -> str:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return str(row[0])


def facts_problems(dsn_of: Callable[[str], str], point: PointFacts) -> list[str]:
    """Where the restored server (`dsn_of(database)`) differs from the facts recorded at the restore point."""
    problems: list[str] = []
    for database, expected in (point.facts or {}).items():
        where = f"at restore point '{point.name}', database {database}"
        try:
            with _session(dsn_of(database), database) as conn:
                found = database_facts(conn, list(expected["sample"]))
        except (RegalError, psycopg.Error) as exc:
            problems.append(f"{where} cannot be read: {getattr(exc, 'message', None) or str(exc).strip()}")
            continue
        if found["tables"] != expected["tables"]:
            problems.append(f"{where}: {found['tables']} table(s) restored, the server had {expected['tables']}")
        for table, want in expected["sample"].items():
            got = found["sample"][table]
            if got != want:
                problems.append(f"{where}: table {table} restored with {got['rows']} row(s) (SHA-256 "
                                f"{got['sha256'][:12]}), the server had {want['rows']} (SHA-256 {want['sha256'][:12]})")
    return problems
