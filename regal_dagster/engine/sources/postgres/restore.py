"""Restoring a backup into a PostgreSQL database, safely and in parallel.

Order matters: the target is checked first (a non-empty database is refused unless replacing is asked
for); when replacing, the whole backup is read back and authenticated BEFORE the old database is
dropped. Then: pg_restore pre-data and data (tables, sequences, large objects), the tables' rows loaded
`jobs` at a time with COPY, pg_restore post-data with `jobs` parallel jobs (indexes, constraints,
triggers), and last every table is read back and compared with the manifest (row count and SHA-256).
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from ...crypto import Keyring
from ...errors import IntegrityError, RegalError, TargetNotEmptyError, ToolError
from ...manifest import Manifest
from ...parallel import check, map_parallel
from ...pipeline import Progress, StoredBackup, read_stream
from ...postgresql.connection import (
    connect,
    database_of,
    describe_dsn,
    libpq_environment,
    quote_ident,
    server_major,
    with_dbname,
)
from ...postgresql.tools import PgTool, find_pg_tool
from ...settings import default_jobs
from ...storage import Repository
from ...verify import verify_backup
from .dump import (
    RESTORE_SESSION_SETTINGS,
    SCHEMA_OBJECT,
    Table,
    TableDigest,
    apply_settings,
    compare_tables,
    dump_major,
    pg_error_reason,
    read_table,
    session_settings,
)


@dataclass
class DatabaseRestore:
    backup_id: str
    target: str  # where it went, without credentials
    target_state: str  # created | empty | replace
    tables: int
    rows: int
    jobs: int
    validation: str  # full | rows (see VALIDATION)
    seconds: dict[str, float] = field(default_factory=dict)
    validation_problems: list[str] = field(default_factory=list)
    # Inside the load phase, summed over the parallel workers: fetching, decrypting, decompressing and
    # checksumming the stored bytes, against the server taking the rows in (the two overlap in time).
    load_breakdown: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.validation_problems


class _Phases:
    def __init__(self) -> None:
        self.start = self.mark = time.monotonic()
        self.seconds: dict[str, float] = {}

    def done(self, name: str) -> None:
        now = time.monotonic()
        self.seconds[name] = now - self.mark
        self.mark = now

    def total(self) -> dict[str, float]:
        return {**self.seconds, "total": time.monotonic() - self.start}


VALIDATION = {
    "full": "every table read back from the server: row count and SHA-256 of its rows match the backup",
    "rows": "every table's loaded row count matches the backup (its bytes were authenticated on the way in)",
}


def restore_database(repo: Repository, keyring: Keyring, manifest: Manifest, to_dsn: str, *,
                   drop_existing: bool = False, keep_owners: bool = False, jobs: int | None = None,
                   validation: str = "full", progress: Progress | None = None,
                   before_writing: Callable[[], None] | None = None) -> DatabaseRestore:
    """Restore one backup into `to_dsn`. `before_writing` runs once the target is known to be acceptable
    and, when replacing, the backup has been authenticated: just before the first change to the target."""
    if validation not in VALIDATION:
        raise RegalError(f"unknown validation '{validation}'", f"use one of {', '.join(VALIDATION)}")
    phases = _Phases()
    jobs = jobs or default_jobs()
    properties: dict[str, Any] | None = manifest.source.get("database_properties")
    encoding: str | None = manifest.source.get("encoding")
    state = prepare_target_database(to_dsn, drop_existing, properties)
    if state == "replace":
        verified = verify_backup(repo, keyring, manifest, jobs=jobs)
        phases.done("authenticate")
        if not verified.ok:
            raise IntegrityError(f"backup {manifest.backup_id} failed verification; the existing database was "
                                 f"left untouched: {'; '.join(verified.problems)}", "restore another backup")
    if before_writing:
        before_writing()
    if state == "replace":
        reset_database(to_dsn, properties)
    pg_restore, psql = restore_tools(to_dsn, dump_major(manifest.tool_versions))
    table_facts: list[dict[str, Any]] = manifest.source.get("tables", [])
    tables = [Table.from_facts(t) for t in table_facts]
    with tempfile.TemporaryDirectory(prefix="regal-restore-") as tmp:  # private (0700), removed afterwards
        archive = StoredBackup(repo, keyring, manifest).to_file(SCHEMA_OBJECT, Path(tmp) / SCHEMA_OBJECT)
        run_pg_restore(pg_restore, to_dsn, archive, ["pre-data", "data"], keep_owners=keep_owners)
        phases.done("schema")

        def load(numbered: tuple[dict[str, Any], Table], cancelled: threading.Event) -> dict[str, Any]:
            facts, table = numbered
            record = manifest.object(facts["object"])
            started, in_server = time.monotonic(), 0.0
            with table_loader(to_dsn, table, encoding) as loading:
                def sink(chunk: bytes) -> None:
                    nonlocal in_server
                    check(cancelled)
                    mark = time.monotonic()
                    loading.write(chunk)
                    in_server += time.monotonic() - mark

                read_stream(repo, record, keyring=keyring, backup_id=manifest.backup_id, sink=sink,
                            progress=progress)  # raises unless every byte matches the manifest's SHA-256
            return {"schema": table.schema, "name": table.name, "rows": loading.rows,
                    "sha256": record.plaintext_sha256,
                    "seconds": (time.monotonic() - started - in_server, in_server)}

        biggest_first = sorted(zip(table_facts, tables, strict=True), key=lambda t: -t[0]["rows"])
        loaded = map_parallel(load, biggest_first, jobs, "load")
        phases.done("load")
        timings = [t.pop("seconds") for t in loaded]
        breakdown = {"fetch_decrypt_decompress": sum(ours for ours, _ in timings),
                     "copy_into_server": sum(server for _, server in timings)}
        run_pg_restore(pg_restore, to_dsn, archive, ["post-data"], jobs=jobs, keep_owners=keep_owners)
        phases.done("post_data")
    if validation == "full":
        loaded = restored_table_facts(to_dsn, [t for _, t in biggest_first], psql, jobs, encoding)
    problems = compare_tables(table_facts, loaded)
    phases.done("validate")
    return DatabaseRestore(manifest.backup_id, describe_dsn(to_dsn), state, len(tables),
                         sum(t["rows"] for t in table_facts), jobs, validation, phases.total(), problems,
                         breakdown)


# --- the target database ----------------------------------------------------------------------------

def user_relation_count(dsn: str) -> int:
    with connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("""SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                       WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
                         AND n.nspname !~ '^pg_toast' AND n.nspname !~ '^pg_temp'""")
        return int(cur.fetchone()[0])  # type: ignore[index]


def create_database_statement(dbname: str, properties: dict[str, Any] | None) -> sql.Composed:
    """CREATE DATABASE with the source database's encoding, locale and collation provider (from template0,
    the only template any encoding and locale can be copied from)."""
    statement = [sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(dbname))]
    if properties:
        statement.append(sql.SQL("ENCODING {}").format(sql.Literal(properties["encoding"])))
        statement.append(sql.SQL("LC_COLLATE {} LC_CTYPE {}").format(sql.Literal(properties["lc_collate"]),
                                                                     sql.Literal(properties["lc_ctype"])))
        provider = properties.get("locale_provider") or "libc"
        if provider == "icu":
            statement.append(sql.SQL("LOCALE_PROVIDER icu ICU_LOCALE {}").format(sql.Literal(properties["locale"])))
            if properties.get("icu_rules"):
                statement.append(sql.SQL("ICU_RULES {}").format(sql.Literal(properties["icu_rules"])))
        elif provider == "builtin":
            statement.append(sql.SQL("LOCALE_PROVIDER builtin BUILTIN_LOCALE {}").format(
                sql.Literal(properties["locale"])))
    return sql.SQL(" ").join(statement)


def describe_locale(properties: dict[str, Any]) -> str:
    provider = properties.get("locale_provider") or "libc"
    locale = f"LC_COLLATE {properties['lc_collate']}, LC_CTYPE {properties['lc_ctype']}"
    if provider != "libc":
        locale += f", {provider} locale {properties.get('locale')}"
    return f"encoding {properties['encoding']}, {locale}"


def create_database(cur: psycopg.Cursor[Any], dbname: str, properties: dict[str, Any] | None) -> None:
    try:
        cur.execute(create_database_statement(dbname, properties))
    except psycopg.Error as exc:
        what = describe_locale(properties) if properties else "the server's defaults"
        raise RegalError(f"cannot create database {dbname} as the backup's was ({what}): "
                         f"{pg_error_reason(exc)}",
                         "restore onto a server that has that locale (and ICU, when the backup's database uses "
                         "it), or create an empty database with these properties yourself and restore into it") from None


def database_encoding(dsn: str) -> str:
    with connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_encoding_to_char(encoding) FROM pg_database "
                           "WHERE datname = current_database()").fetchone()
    assert row is not None
    return str(row[0])


def prepare_target_database(dsn: str, drop_existing: bool, properties: dict[str, Any] | None = None) -> str:
    """Check the target; returns 'created', 'empty' or 'replace' (the drop happens later, after the
    backup has been authenticated, in `reset_database`). Refuses a non-empty database unless told, and
    an existing database whose encoding is not the backup's (its text would be converted)."""
    dbname = database_of(dsn)
    if not dbname:
        raise RegalError("the restore DSN names no database", "add the database name, e.g. .../regalpos_restored")
    with connect(with_dbname(dsn, "postgres"), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
        exists = cur.fetchone() is not None
        if not exists:
            create_database(cur, dbname, properties)
            return "created"
    if user_relation_count(dsn) == 0:
        if properties and (have := database_encoding(dsn)) != properties["encoding"]:
            if not drop_existing:
                raise RegalError(f"the database {describe_dsn(dsn)} has the encoding {have}, the backup's database "
                                 f"had {properties['encoding']}: its text would not come back byte for byte",
                                 "restore into a new database name (it is created with the backup's encoding and "
                                 "locale), or pass --drop-existing to recreate this one")
            return "replace"
        return "empty"
    if not drop_existing:
        raise TargetNotEmptyError(
            f"the database {describe_dsn(dsn)} is not empty",
            "restore into a new database name, or pass --drop-existing to replace it (it is dropped only after "
            "the backup has been read back and authenticated)")
    return "replace"


def reset_database(dsn: str, properties: dict[str, Any] | None = None) -> None:
    dbname = database_of(dsn)
    assert dbname is not None  # prepare_target_database refused a DSN without one
    with connect(with_dbname(dsn, "postgres"), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
        create_database(cur, dbname, properties)


def restore_tools(dsn: str, archive_major: int) -> tuple[PgTool, PgTool]:
    """pg_restore and psql able to read an archive of `dump_major` and talk to the target server."""
    with connect(dsn) as conn:
        major = max(server_major(conn), archive_major)
    return find_pg_tool("pg_restore", major), find_pg_tool("psql", major)


def run_pg_restore(pg_restore: PgTool, dsn: str, archive: Path, sections: list[str], *, jobs: int = 1,
                   keep_owners: bool = False) -> None:
    """pg_restore of some sections of an archive file, with restore-friendly session settings."""
    args = [str(pg_restore.path), f"--dbname={database_of(dsn)}", "--exit-on-error",
            "--no-password", f"--jobs={jobs}", *(f"--section={s}" for s in sections)]
    if not keep_owners:
        args += ["--no-owner", "--no-privileges"]
    env = libpq_environment(dsn)
    env["PGOPTIONS"] = " ".join(f"-c {k}={v}" for k, v in RESTORE_SESSION_SETTINGS.items())
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
def table_loader(dsn: str, table: Table, encoding: str | None = None) -> Iterator[TableLoad]:
    """COPY FROM STDIN into one (new, empty) table, in its own transaction, committed when the block ends.

    The table is truncated in the same transaction first. That gives it a new file, so COPY fills pages
    strictly in order without looking for free space in earlier pages (and may freeze the rows, sparing
    a later anti-wraparound vacuum): the table then reads back in exactly the order it was loaded, which
    is what lets validation compare the SHA-256 of its COPY text with the backup's."""
    with connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        apply_settings(conn, {**session_settings(conn, encoding), **RESTORE_SESSION_SETTINGS})
        conn.autocommit = False
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


def restored_table_facts(dsn: str, tables: list[Table], psql: PgTool | None = None, jobs: int = 1,
                         encoding: str | None = None) -> list[dict[str, Any]]:
    """Row count and SHA-256 of each table's COPY text in a restored database (read in the backup's
    encoding), `jobs` tables at a time."""
    def digest(table: Table) -> dict[str, Any] | None:
        d = TableDigest()
        try:
            for chunk in read_table(dsn, table, encoding):
                d.update(chunk)
        except RegalError:
            return None  # missing or unreadable: compare_tables reports it missing
        return d.facts(table)

    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="pg-validate") as pool:
        return [facts for facts in pool.map(digest, tables) if facts is not None]
