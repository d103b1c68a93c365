"""Restoring a backup into a PostgreSQL database, safely and in parallel.

Order matters: the target is checked first (a non-empty database is refused unless replacing is asked
for), every object is looked up, and the backup is loaded into a temporary database, every byte
authenticated on its way in; the target is replaced only once all of it has been authenticated, loaded
and validated. Loading: pg_restore pre-data and data (tables, sequences, large objects), the tables' rows loaded
`jobs` at a time with COPY, pg_restore post-data with `jobs` parallel jobs (indexes, constraints,
triggers), and last every table is read back and compared with the manifest (row count and SHA-256).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import psycopg
from psycopg import sql

from ...crypto import Keyring
from ...errors import IntegrityError, RegalError, TargetNotEmptyError, ToolError, UsageError
from ...manifest import Manifest
from ...parallel import check, map_parallel
from ...pipeline import Progress, StoredBackup
from ...postgresql.connection import (
    apply_settings,
    connect,
    database_of,
    describe_dsn,
    libpq_environment,
    quote_ident,
    refuses_startup_options,
    server_major,
    with_dbname,
    with_session_settings,
)
from ...postgresql.tools import PgTool, find_pg_tool
from ...settings import default_jobs
from ...storage import Repository
from ...verify import absent_objects
from ...workspace import private_directory
from .dump import (
    PSQL_COPY_BYTES,
    RESTORE_SESSION_SETTINGS,
    SCHEMA_OBJECT,
    Table,
    TableDigest,
    compare_tables,
    copy_out,
    dump_major,
    pg_error_reason,
    psql_copy_out,
    session_settings,
)

logger = logging.getLogger(__name__)


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
                   drop_existing: bool = False, keep_owners: bool = True, jobs: int | None = None,
                   validation: str = "full", progress: Progress | None = None,
                   before_writing: Callable[[], None] | None = None,
                   before_publishing: Callable[[str], None] | None = None, scratch: bool = False,
                   create_roles: bool = True, tablespaces: bool = True) -> DatabaseRestore:
    """Restore one backup into `to_dsn`, atomically as seen from the target (see `StagedDatabase`): every
    object is first looked up (missing or resized ones refuse the restore before anything is created), then
    loaded into a temporary database created with the source database's properties, every byte
    authenticated on its way in, validated, and only then renamed into place; on any failure (a byte that
    does not authenticate included) the temporary database and the roles this restore created are dropped
    and the server is as it was. `before_writing` runs once the target is known to be acceptable: just
    before the first change to the server; `before_publishing` runs with the DSN of the validated temporary
    database just before it is renamed into place (GDPR erasures are re-applied there).

    The roles the backup's database referred to are created first when missing (unless `create_roles`
    is off); owners and grants are restored unless `keep_owners` is off. Tables, indexes and the database
    go into the tablespaces they were in, which must exist on the server (checked before anything is
    created), unless `tablespaces` is off (everything in the default tablespace). Like pg_restore without
    --exit-on-error, every object that can be restored is tried: what could not is listed, with the
    server's reason, in the returned problems, and the restore fails loudly with all of them.

    `scratch`: the destination is a throw-away server nobody else sees (a restore test's): loaded in place."""
    if validation not in VALIDATION:
        raise RegalError(f"unknown validation '{validation}'", f"use one of {', '.join(VALIDATION)}")
    phases = _Phases()
    jobs = jobs or default_jobs()
    properties: dict[str, Any] | None = manifest.source.get("database_properties")
    if tablespaces:
        recorded_tablespaces = manifest.source.get("tablespaces", [])
        check_tablespaces(to_dsn, recorded_tablespaces)
        default = next((t["name"] for t in recorded_tablespaces if t["database_default"]), None)
        if properties and default:
            properties = {**properties, "tablespace": default}
    recorded_roles = manifest.source.get("roles") if create_roles else None
    load_into = functools.partial(load_database, repo, keyring, manifest, keep_owners=keep_owners, jobs=jobs,
                                  validation=validation, progress=progress, tablespaces=tablespaces)
    if scratch:
        state = prepare_target_database(to_dsn, drop_existing, properties)
        if before_writing:
            before_writing()
        if state == "replace":
            reset_database(to_dsn, properties)
        role_problems = create_missing_roles(to_dsn, recorded_roles)[1] if recorded_roles else []
        report = load_into(to_dsn, state, phases, role_problems)
        if report.ok and before_publishing:
            before_publishing(to_dsn)
        return report
    created_roles: list[str] = []
    published = False
    try:
        with StagedDatabase(to_dsn) as staged:
            state = staged.target_state(drop_existing)
            if state == "empty" and properties:
                same_encoding(to_dsn, properties, drop_existing)
            kept = "the existing database was left untouched" if staged.exists else "nothing was created"
            if absent := absent_objects(repo, manifest):
                raise IntegrityError(f"backup {manifest.backup_id} is incomplete; {kept}: {'; '.join(absent)}",
                                     "restore another backup")
            phases.done("look_up")
            if before_writing:
                before_writing()
            staged.check_not_in_use()
            temporary = staged.create(properties, copying_target=state == "empty")
            created_roles, role_problems = (create_missing_roles(temporary, recorded_roles) if recorded_roles
                                            else ([], []))
            try:
                report = load_into(temporary, state, phases, role_problems)
            except IntegrityError as exc:  # a byte that does not authenticate: nothing of it is published
                raise IntegrityError(f"{exc.message}; the restored copy was dropped and {kept}",
                                     exc.hint) from None
            if report.ok:
                if before_publishing:
                    before_publishing(temporary)
                staged.publish()
                published = True
            else:
                report.validation_problems.append(
                    f"the restored copy was dropped: {describe_dsn(to_dsn)} is as it was" if staged.exists else
                    f"the restored copy was dropped: no database {staged.target} was created")
            report.target = describe_dsn(to_dsn)
    finally:
        if not published and created_roles:  # after the temporary database, which their objects were in
            drop_roles(with_dbname(to_dsn, "postgres"), created_roles)
    return report


def load_database(repo: Repository, keyring: Keyring, manifest: Manifest, to_dsn: str, state: str,
                  phases: _Phases, role_problems: list[str], *, keep_owners: bool, jobs: int, validation: str,
                  progress: Progress | None, tablespaces: bool) -> DatabaseRestore:
    """Load one backup into the (new, empty) database `to_dsn` and validate it against the manifest: schema,
    rows, post-data and the database's own properties. Every object of the backup is authenticated on the
    way (IntegrityError naming the first that is not); `role_problems`: the roles that could not be created."""
    properties: dict[str, Any] | None = manifest.source.get("database_properties")
    encoding: str | None = manifest.source.get("encoding")
    failed = list(role_problems)  # what could not be restored, and why
    pg_restore, psql = restore_tools(to_dsn, dump_major(manifest.tool_versions))
    table_facts: list[dict[str, Any]] = manifest.source.get("tables", [])
    tables = [Table.from_facts(t) for t in table_facts]
    backup = StoredBackup(repo, keyring, manifest)
    with private_directory("restore") as tmp:  # private (0700), swept by the next command if we are killed
        archive = backup.to_file(SCHEMA_OBJECT, Path(tmp) / SCHEMA_OBJECT)
        failed += run_pg_restore(pg_restore, to_dsn, archive, ["pre-data", "data"], keep_owners=keep_owners,
                                 tablespaces=tablespaces, exit_on_error=False)
        phases.done("schema")

        batches = load_batches(manifest, table_facts, tables)
        loaded = load_tables(backup, to_dsn, batches, jobs, encoding, progress)
        backup.authenticate_unread()  # a table that failed to load stopped reading its object
        phases.done("load")
        timings = [t.pop("seconds") for t in loaded]
        failed += [t["failed"] for t in loaded if "failed" in t]
        loaded = [t for t in loaded if "failed" not in t]
        breakdown = {"fetch_decrypt_decompress": sum(ours for ours, _ in timings),
                     "copy_into_server": sum(server for _, server in timings)}
        failed += run_pg_restore(pg_restore, to_dsn, archive, ["post-data"], jobs=jobs, keep_owners=keep_owners,
                                 tablespaces=tablespaces, exit_on_error=False)
        phases.done("post_data")
    if properties:
        failed += apply_database_properties(to_dsn, properties, owners=keep_owners)
    if validation == "full":
        sizes = {record.name: record.plaintext_size for record in manifest.objects}
        loaded = restored_table_facts(to_dsn, [t for batch in batches for _, t in batch], psql, jobs, encoding,
                                      {f"{t['schema']}.{t['name']}": sizes[t["object"]] for t in table_facts})
    problems = [f"not restored: {what}" for what in failed] + compare_tables(table_facts, loaded)
    phases.done("validate")
    return DatabaseRestore(manifest.backup_id, describe_dsn(to_dsn), state, len(tables),
                         sum(t["rows"] for t in table_facts), jobs, validation, phases.total(), problems,
                         breakdown)


def load_tables(backup: StoredBackup, to_dsn: str, batches: list[list[tuple[dict[str, Any], Table]]], jobs: int,
                encoding: str | None, progress: Progress | None = None) -> list[dict[str, Any]]:
    """Each table's rows from the backup into its (new, empty) table, `jobs` batches (load_batches) at a
    time. Per table: its facts with the rows loaded, or `failed` with the server's reason; `seconds`:
    (fetching, decrypting and checking the stored bytes; the server taking them in)."""
    def load_one(loading: TableLoad, facts: dict[str, Any], table: Table,
                 cancelled: threading.Event) -> dict[str, Any]:
        record = backup.manifest.object(facts["object"])
        started, in_server = time.monotonic(), 0.0

        def sink(chunk: bytes) -> None:
            nonlocal in_server
            check(cancelled)
            mark = time.monotonic()
            loading.write(chunk)
            in_server += time.monotonic() - mark

        backup.stream(record.name, sink, progress)  # raises unless every byte matches the manifest's SHA-256
        return {"schema": table.schema, "name": table.name, "loading": loading,
                "sha256": record.plaintext_sha256, "seconds": (time.monotonic() - started - in_server, in_server)}

    def load(batch: list[tuple[dict[str, Any], Table]], cancelled: threading.Event) -> list[dict[str, Any]]:
        started = time.monotonic()
        try:
            with tables_loader([table for _, table in batch], sessions, encoding) as copy_into:
                done = []
                for facts, table in batch:
                    with copy_into(table) as loading:
                        done.append(load_one(loading, facts, table, cancelled))
        except ToolError as exc:  # the server refused it (its table missing, a constraint): go on
            if len(batch) > 1:  # the whole transaction was rolled back: each table on its own, to name it
                return [result for entry in batch for result in load([entry], cancelled)]
            table = batch[0][1]
            return [{"schema": table.schema, "name": table.name, "failed": exc.message,
                     "seconds": (time.monotonic() - started, 0.0)}]
        for result in done:
            result["rows"] = result.pop("loading").rows  # known once the transaction has committed
        return done

    with loading_pool(to_dsn, encoding) as sessions:
        return [t for batch in map_parallel(load, batches, jobs, "load") for t in batch]


# --- the target database ----------------------------------------------------------------------------

STAGING_PATTERN = r"__regal_(restoring|replaced)_([0-9a-f]{8})$"
"""Names of a restore's temporary databases: `<target>__regal_restoring_<token>` (being loaded) and
`<target>__regal_replaced_<token>` (the old target, renamed aside, about to be dropped)."""
_LOCK_NAMESPACE = "regal-restore:"


def _staging_name(target: str, kind: str, token: str) -> str:
    suffix = f"__regal_{kind}_{token}"
    prefix = target.encode()[:63 - len(suffix)].decode(errors="ignore")  # identifiers hold 63 bytes
    return prefix + suffix


# What to do when the database a restore would replace has other sessions (a pooler keeps some open).
IN_USE_HINT = ("stop the application using it (for example with --pre-hook), restore to the server itself rather "
               "than through a connection pooler, and restore again")


class StagedDatabase:
    """A restore's temporary database on the target's server, and its publication under the target's name.

    While a restore runs, its maintenance connection holds a session advisory lock named after its token:
    a temporary database whose lock is free belongs to a restore that died (SIGKILL, a lost connection),
    and the next restore on that server drops it (`sweep`). Publishing renames the old target aside and
    the new database into place in ONE transaction, then drops the old one: the target's name always
    holds either the old database or the complete, validated new one. Nobody else's session is ended: a
    target in use is refused."""

    def __init__(self, dsn: str):
        dbname = database_of(dsn)
        if not dbname:
            raise RegalError("the restore DSN names no database",
                             "add the database name, e.g. .../regalpos_restored")
        if dbname in ("postgres", "template0", "template1"):
            raise UsageError(f"{dbname} is the server's own database: a restore does not replace it",
                             "restore into a database of its own name, e.g. .../pos_restored")
        self.dsn, self.target = dsn, dbname
        self.token = secrets.token_hex(4)
        self.temporary = _staging_name(dbname, "restoring", self.token)
        self.exists = False
        self.created = self.published = False
        self.conn: psycopg.Connection[Any] | None = None

    def __enter__(self) -> Self:
        # The locks live in the `postgres` database (advisory locks are per database): every restore takes
        # and tests them there.
        self.conn = connect(with_dbname(self.dsn, "postgres"), autocommit=True)
        self.conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (_LOCK_NAMESPACE + self.token,))
        self.sweep()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.conn is not None
        try:
            if self.created and not self.published:
                self._drop(self.temporary)
        finally:
            self.conn.close()

    def _execute(self, statement: sql.SQL | sql.Composed, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        assert self.conn is not None
        with self.conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else []

    def _drop(self, name: str) -> None:
        assert self.conn is not None
        force = sql.SQL(" WITH (FORCE)") if server_major(self.conn) >= 13 else sql.SQL("")
        self._execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)) + force)

    def sweep(self) -> list[str]:
        """Drop the temporary databases that restores which died left on this server; returns their names."""
        dropped = []
        for (name,) in self._execute(sql.SQL("SELECT datname FROM pg_database WHERE datname ~ %s ORDER BY 1"),
                                     (STAGING_PATTERN,)):
            key = _LOCK_NAMESPACE + name[-8:]
            if not self._execute(sql.SQL("SELECT pg_try_advisory_lock(hashtext(%s))"), (key,))[0][0]:
                continue  # its restore is still running
            try:
                self._drop(name)
                dropped.append(name)
                logger.warning("dropped %s, left by a restore that did not finish", name)
            except psycopg.Error as exc:
                logger.warning("could not drop %s, left by a restore that did not finish: %s", name,
                               str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            finally:
                self._execute(sql.SQL("SELECT pg_advisory_unlock(hashtext(%s))"), (key,))
        return dropped

    def target_state(self, drop_existing: bool) -> str:
        """'created' (the target does not exist yet: it will), 'empty' or 'replace'; refuses a non-empty
        target unless told, and a target this role may not replace."""
        rows = self._execute(sql.SQL("""SELECT pg_has_role(current_user, datdba, 'MEMBER')
                                                OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
                                        FROM pg_database WHERE datname = %s"""), (self.target,))
        self.exists = bool(rows)
        if not self.exists:
            return "created"
        if user_relation_count(self.dsn):
            if not drop_existing:
                raise TargetNotEmptyError(
                    f"the database {describe_dsn(self.dsn)} is not empty",
                    "restore into a new database name, or pass --drop-existing to replace it (it is replaced only "
                    "after the backup has been read back, authenticated, loaded aside and validated)")
            state = "replace"
        else:
            state = "empty"
        if not rows[0][0]:
            raise RegalError(f"the database {describe_dsn(self.dsn)} belongs to another role: this one may not "
                             "replace it", "restore as its owner (or a superuser), or into a new database name")
        return state

    def check_not_in_use(self) -> None:
        """Refuse to replace a database other sessions use (they are not ended on anyone's behalf)."""
        if not self.exists:
            return
        for _look in range(5):  # a session that is ending (ours, a moment ago) goes within a second
            count = self._execute(sql.SQL("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> "
                                          "pg_backend_pid() AND backend_type = 'client backend'"),  # not autovacuum
                                  (self.target,))[0][0]
            if not count:
                return
            time.sleep(0.2)
        raise RegalError(f"{count} session(s) are connected to {describe_dsn(self.dsn)}: a restore replaces a "
                         "database only when nobody uses it; nothing was changed",
                         IN_USE_HINT)

    def create(self, properties: dict[str, Any] | None, copying_target: bool = False) -> str:
        """Create the temporary database with the source database's encoding and locale; returns its DSN.
        `copying_target`: as a copy of the (empty) target, whose encoding is the backup's, so what its owner
        prepared there (extensions, functions, event triggers) is there as before."""
        assert self.conn is not None
        try:
            with self.conn.cursor() as cur:
                if copying_target:
                    create_database(cur, self.temporary, None, template=self.target)
                else:
                    create_database(cur, self.temporary, properties)
        except psycopg.errors.InsufficientPrivilege:
            raise RegalError(f"permission denied to create database: the role of {describe_dsn(self.dsn)} lacks "
                             "CREATEDB, and a restore loads into a new database first",
                             "restore as a role with CREATEDB (ALTER ROLE ... CREATEDB)") from None
        self.created = True
        return with_dbname(self.dsn, self.temporary)

    def publish(self) -> None:
        """The validated temporary database becomes the target, in one transaction; the old one is dropped."""
        assert self.conn is not None
        aside = _staging_name(self.target, "replaced", self.token)
        try:
            with self.conn.transaction():
                if self._execute(sql.SQL("SELECT 1 FROM pg_database WHERE datname = %s"), (self.target,)):
                    self._execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(self.target),
                                                                                 sql.Identifier(aside)))
                self._execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(self.temporary),
                                                                             sql.Identifier(self.target)))
        except psycopg.errors.ObjectInUse:
            raise RegalError(f"{describe_dsn(self.dsn)} came into use during the restore: it was not replaced, and "
                             "the restored copy was dropped",
                             IN_USE_HINT) from None
        except psycopg.Error as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RegalError(f"the restored database could not be renamed to {self.target}: {reason}; the target "
                             "is as it was and the restored copy was dropped", "fix the cause and restore again"
                             ) from None
        self.published = True
        try:
            self._drop(aside)
        except psycopg.Error as exc:  # the next restore's sweep drops it
            logger.warning("could not drop the replaced database %s yet: %s", aside, exc)


def user_relation_count(dsn: str) -> int:
    with connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("""SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                       WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
                         AND n.nspname !~ '^pg_toast' AND n.nspname !~ '^pg_temp'""")
        return int(cur.fetchone()[0])  # type: ignore[index]


def create_database_statement(dbname: str, properties: dict[str, Any] | None,
                              template: str = "template0") -> sql.Composed:
    """CREATE DATABASE with the source database's encoding, locale and collation provider (from template0,
    the only template any encoding and locale can be copied from), or as a copy of `template`."""
    statement = [sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(dbname), sql.Identifier(template))]
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
        if properties.get("tablespace"):
            statement.append(sql.SQL("TABLESPACE {}").format(sql.Identifier(properties["tablespace"])))
    return sql.SQL(" ").join(statement)


def describe_locale(properties: dict[str, Any]) -> str:
    provider = properties.get("locale_provider") or "libc"
    locale = f"LC_COLLATE {properties['lc_collate']}, LC_CTYPE {properties['lc_ctype']}"
    if provider != "libc":
        locale += f", {provider} locale {properties.get('locale')}"
    return f"encoding {properties['encoding']}, {locale}"


def create_database(cur: psycopg.Cursor[Any], dbname: str, properties: dict[str, Any] | None,
                    template: str = "template0") -> None:
    try:
        cur.execute(create_database_statement(dbname, properties, template))
    except psycopg.errors.InsufficientPrivilege:
        raise
    except psycopg.Error as exc:
        what = describe_locale(properties) if properties else "the server's defaults"
        raise RegalError(f"cannot create database {dbname} as the backup's was ({what}): "
                         f"{pg_error_reason(exc)}",
                         "restore onto a server that has that locale (and ICU, when the backup's database uses "
                         "it)") from None


def check_tablespaces(dsn: str, recorded: list[dict[str, Any]]) -> None:
    """Refuse, before anything is created, a server that lacks a tablespace the backup's tables, indexes or
    database were in (pg_restore would put them in the default one, and say so only in its error output)."""
    if not recorded:
        return
    with connect(with_dbname(dsn, "postgres"), autocommit=True) as conn:
        existing = {name for (name,) in conn.execute("SELECT spcname FROM pg_tablespace").fetchall()}
    missing = [t for t in recorded if t["name"] not in existing]
    if missing:
        listed = ", ".join(f"{t['name']} (at {t['location']} on the backed-up server)" for t in missing)
        create = "; ".join(f"CREATE TABLESPACE {t['name']} LOCATION '<an empty directory the server owns>'"
                           for t in missing)
        raise RegalError(f"the server of {describe_dsn(dsn)} has no tablespace {listed}, which the backup's "
                         "tables, indexes or database were in; nothing was restored",
                         f"create it first ({create}), or restore with --no-tablespaces to put everything "
                         "in the server's default tablespace")


def database_encoding(dsn: str) -> str:
    with connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_encoding_to_char(encoding) FROM pg_database "
                           "WHERE datname = current_database()").fetchone()
    assert row is not None
    return str(row[0])


def prepare_target_database(dsn: str, drop_existing: bool, properties: dict[str, Any] | None = None) -> str:
    """Check a scratch server's target; returns 'created', 'empty' or 'replace' (the drop happens later, in
    `reset_database`). Refuses a non-empty database unless told, and
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
        if properties and not same_encoding(dsn, properties, drop_existing):
            return "replace"
        return "empty"
    if not drop_existing:
        raise TargetNotEmptyError(
            f"the database {describe_dsn(dsn)} is not empty",
            "restore into a new database name, or pass --drop-existing to replace it")
    return "replace"


def same_encoding(dsn: str, properties: dict[str, Any], drop_existing: bool) -> bool:
    """Whether the existing (empty) database `dsn` has the backup's encoding; refuses when it has not,
    unless it may be replaced (its text would not come back byte for byte)."""
    have = database_encoding(dsn)
    if have != properties["encoding"] and not drop_existing:
        raise RegalError(f"the database {describe_dsn(dsn)} has the encoding {have}, the backup's database "
                         f"had {properties['encoding']}: its text would not come back byte for byte",
                         "restore into a new database name (it is created with the backup's encoding and "
                         "locale), or pass --drop-existing to recreate this one")
    return have == properties["encoding"]


def reset_database(dsn: str, properties: dict[str, Any] | None = None) -> None:
    dbname = database_of(dsn)
    assert dbname is not None  # prepare_target_database refused a DSN without one
    with connect(with_dbname(dsn, "postgres"), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
        create_database(cur, dbname, properties)


# --- roles and the database's own properties ------------------------------------------------------

# Settings whose value is a list of (quoted) names: each element is its own literal, as pg_dumpall writes them.
_LIST_SETTINGS = {"search_path", "temp_tablespaces", "session_preload_libraries", "shared_preload_libraries",
                  "local_preload_libraries", "unix_socket_directories"}


def set_clause(config: str) -> sql.Composed:
    """`SET name = value` for one pg_db_role_setting entry ("name=value")."""
    name, _, value = config.partition("=")
    if name.lower() in _LIST_SETTINGS:
        items = [item.strip() for item in value.split(",")] if value.strip() else []
        items = [item[1:-1].replace('""', '"') if len(item) >= 2 and item[0] == item[-1] == '"' else item
                 for item in items]
        values = sql.SQL(", ").join(sql.Literal(item) for item in items) if items else sql.Literal("")
    else:
        values = sql.Literal(value)
    return sql.SQL("SET {} = {}").format(sql.Identifier(name), values)


def _attempt(conn: psycopg.Connection[Any], statement: sql.Composed, what: str, problems: list[str]) -> bool:
    try:
        conn.execute(statement)
    except psycopg.Error as exc:
        problems.append(f"{what}: {pg_error_reason(exc)}")
        return False
    return True


def create_missing_roles(dsn: str, recorded: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Create the roles the backup's database referred to that this server lacks, with their attributes,
    settings and memberships (roles that exist already are left as they are). (created, problems)."""
    created: list[str] = []
    problems: list[str] = []
    with connect(dsn, autocommit=True) as conn:
        existing = {name for (name,) in conn.execute("SELECT rolname FROM pg_roles").fetchall()}
        for role in recorded.get("roles", []):
            name = role["name"]
            if name in existing or role.get("builtin"):
                continue
            options = [("SUPERUSER" if role["super"] else "NOSUPERUSER"), ("INHERIT" if role["inherit"] else "NOINHERIT"),
                       ("CREATEROLE" if role["createrole"] else "NOCREATEROLE"),
                       ("CREATEDB" if role["createdb"] else "NOCREATEDB"), ("LOGIN" if role["canlogin"] else "NOLOGIN"),
                       ("REPLICATION" if role["replication"] else "NOREPLICATION"),
                       ("BYPASSRLS" if role["bypassrls"] else "NOBYPASSRLS")]
            statement = sql.SQL("CREATE ROLE {} WITH {}").format(sql.Identifier(name), sql.SQL(" ".join(options)))
            if role.get("connection_limit", -1) != -1:
                statement = sql.SQL("{} CONNECTION LIMIT {}").format(statement, sql.Literal(role["connection_limit"]))
            if role.get("valid_until"):
                statement = sql.SQL("{} VALID UNTIL {}").format(statement, sql.Literal(role["valid_until"]))
            if role.get("password_hash"):
                statement = sql.SQL("{} PASSWORD {}").format(statement, sql.Literal(role["password_hash"]))
            if not _attempt(conn, statement, f"role {name} could not be created", problems):
                continue
            created.append(name)
            existing.add(name)
            for config in role.get("settings", []):
                _attempt(conn, sql.SQL("ALTER ROLE {} {}").format(sql.Identifier(name), set_clause(config)),
                         f"role {name}: setting {config}", problems)
            if role.get("comment"):
                _attempt(conn, sql.SQL("COMMENT ON ROLE {} IS {}").format(sql.Identifier(name),
                                                                          sql.Literal(role["comment"])),
                         f"role {name}: comment", problems)
        for membership in recorded.get("memberships", []):
            role, member = membership["role"], membership["member"]
            if member not in created or role not in existing:
                continue  # memberships of roles that were already there are theirs to keep
            grant = sql.SQL("GRANT {} TO {}").format(sql.Identifier(role), sql.Identifier(member))
            if membership.get("admin_option"):
                grant = sql.SQL("{} WITH ADMIN OPTION").format(grant)
            _attempt(conn, grant, f"membership of {member} in {role}", problems)
    return created, problems


def drop_roles(dsn: str, names: list[str]) -> None:
    """Drop the roles a failed restore created (its temporary database, which their objects were in, is gone
    already); one that cannot be dropped is named in the log and left."""
    with contextlib.suppress(psycopg.Error), connect(dsn, autocommit=True) as conn:
        for name in reversed(names):
            try:
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
            except psycopg.Error as exc:
                logger.warning("the role %s, created for a restore that failed, could not be dropped: %s", name,
                               pg_error_reason(exc))


_DATABASE_PRIVILEGES = {"C": "CREATE", "T": "TEMPORARY", "c": "CONNECT"}


def _acl_grants(dbname: str, acl: list[str]) -> list[tuple[sql.Composed, str]]:
    """GRANT statements for a database's aclitems (`grantee=privileges/grantor`, empty grantee: PUBLIC)."""
    grants = []
    for item in acl:
        left, _, _grantor = item.rpartition("/")
        grantee, _, privileges = left.rpartition("=")
        if grantee.startswith('"') and grantee.endswith('"'):
            grantee = grantee[1:-1].replace('""', '"')
        target = sql.SQL("PUBLIC") if not grantee else sql.Identifier(grantee)
        plain = [p for i, p in enumerate(privileges) if p in _DATABASE_PRIVILEGES
                 and privileges[i + 1:i + 2] != "*"]
        granting = [p for i, p in enumerate(privileges) if p in _DATABASE_PRIVILEGES
                    and privileges[i + 1:i + 2] == "*"]
        for letters, suffix in ((plain, ""), (granting, " WITH GRANT OPTION")):
            if letters:
                grants.append((sql.SQL("GRANT {} ON DATABASE {} TO {}" + suffix).format(
                    sql.SQL(", ").join(sql.SQL(_DATABASE_PRIVILEGES[p]) for p in letters),
                    sql.Identifier(dbname), target), f"grant {item}"))
    return grants


def apply_database_properties(dsn: str, properties: dict[str, Any], owners: bool = True) -> list[str]:
    """The database's own owner, comment, connection limit, settings and grants, as the backup recorded
    them (owner and grants only with `owners`, as pg_restore's --no-owner / --no-privileges). Problems."""
    dbname = database_of(dsn)
    assert dbname is not None
    problems: list[str] = []
    database = sql.Identifier(dbname)
    with connect(with_dbname(dsn, "postgres"), autocommit=True) as conn:
        if owners and properties.get("owner"):
            _attempt(conn, sql.SQL("ALTER DATABASE {} OWNER TO {}").format(database,
                                                                          sql.Identifier(properties["owner"])),
                     f"database owner {properties['owner']}", problems)
        if properties.get("comment") is not None:
            _attempt(conn, sql.SQL("COMMENT ON DATABASE {} IS {}").format(database, sql.Literal(properties["comment"])),
                     "database comment", problems)
        if properties.get("connection_limit", -1) != -1:
            _attempt(conn, sql.SQL("ALTER DATABASE {} CONNECTION LIMIT {}").format(
                database, sql.Literal(properties["connection_limit"])), "database connection limit", problems)
        for entry in properties.get("settings", []):
            for config in entry["settings"]:
                if entry["role"] is None:
                    statement = sql.SQL("ALTER DATABASE {} {}").format(database, set_clause(config))
                else:
                    statement = sql.SQL("ALTER ROLE {} IN DATABASE {} {}").format(
                        sql.Identifier(entry["role"]), database, set_clause(config))
                _attempt(conn, statement, f"database setting {config}" + (
                    f" for role {entry['role']}" if entry["role"] else ""), problems)
        if owners and properties.get("acl"):
            _attempt(conn, sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(database),
                     "database grants", problems)
            for statement, what in _acl_grants(dbname, properties["acl"]):
                _attempt(conn, statement, f"database {what}", problems)
    return problems


def restore_tools(dsn: str, archive_major: int) -> tuple[PgTool, PgTool]:
    """pg_restore and psql able to read an archive of `dump_major` and talk to the target server."""
    with connect(dsn) as conn:
        major = max(server_major(conn), archive_major)
    return find_pg_tool("pg_restore", major), find_pg_tool("psql", major)


def run_pg_restore(pg_restore: PgTool, dsn: str, archive: Path, sections: list[str], *, jobs: int = 1,
                   keep_owners: bool = True, tablespaces: bool = True, exit_on_error: bool = True) -> list[str]:
    """pg_restore of some sections of an archive file, with restore-friendly session settings.

    With `exit_on_error` a failure raises ToolError; without, pg_restore goes on past failing objects (as
    it does by default) and the returned list says, for each, which statement failed and why."""
    args = [str(pg_restore.path), f"--dbname={database_of(dsn)}", "--no-password", f"--jobs={jobs}",
            *(f"--section={s}" for s in sections)]
    if exit_on_error:
        args.append("--exit-on-error")
    if not keep_owners:
        args += ["--no-owner", "--no-privileges"]
    if not tablespaces:
        args.append("--no-tablespaces")
    # the settings only make it faster: without them through a pooler that refuses them (it failed to connect)
    for settings in (RESTORE_SESSION_SETTINGS, {}):
        env = with_session_settings(libpq_environment(dsn), settings) if settings else libpq_environment(dsn)
        result = subprocess.run([*args, str(archive)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                                check=False)
        if not refuses_startup_options(result.stderr.decode(errors="replace")):
            break
    if result.returncode == 0:
        return []
    text = result.stderr.decode(errors="replace").strip()
    if exit_on_error:
        raise ToolError(f"pg_restore ({', '.join(sections)}) failed with exit code {result.returncode}: {text[-800:]}",
                        "fix the cause above, then restore again into an empty database")
    return pg_restore_errors(text) or [(f"pg_restore ({', '.join(sections)}) failed with exit code "
                                       f"{result.returncode}: {text[-800:]}")]


def pg_restore_errors(stderr: str) -> list[str]:
    """Each failed statement in pg_restore's messages: the server's error and the statement's first line."""
    errors: list[str] = []
    lines = stderr.splitlines()
    for number, line in enumerate(lines):
        if "error:" not in line or "errors ignored on restore" in line:
            continue
        reason = line.split("error:", 1)[1].strip()
        reason = reason.removeprefix("could not execute query:").strip()
        following = lines[number + 1] if number + 1 < len(lines) else ""
        if following.startswith("Command was:"):
            statement = following.removeprefix("Command was:").strip()
            reason += f" (statement: {statement[:200]})"
        errors.append(reason)
    return errors


@dataclass
class TableLoad:
    write: Callable[[bytes], None]  # takes chunks of COPY text
    rows: int = -1  # rows the server loaded, once the load has committed


class SessionPool:
    """One connection per worker thread, with the COPY session settings applied once: hundreds of small
    tables cost a statement each, not a connection each."""

    def __init__(self, dsn: str, settings: Callable[[psycopg.Connection[Any]], dict[str, str]]):
        self.dsn, self.settings = dsn, settings
        self._local = threading.local()
        self._all: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()

    def get(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken:
            conn = connect(self.dsn, autocommit=True)
            with self._lock:
                self._all.append(conn)
            apply_settings(conn, self.settings(conn))
            self._local.conn = conn
        return conn

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                with contextlib.suppress(Exception):
                    conn.close()
            self._all.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def loading_pool(dsn: str, encoding: str | None) -> SessionPool:
    return SessionPool(dsn, lambda conn: {**session_settings(conn, encoding), **RESTORE_SESSION_SETTINGS})


# Small tables are loaded several to a transaction (one TRUNCATE, one commit): for hundreds of small
# tables the per-transaction round trips and commits cost more than their rows. A batch holds at most
# LOAD_BATCH_TABLES tables (each takes a few locks: well within max_locks_per_transaction) and about
# LOAD_BATCH_BYTES of COPY text; a bigger table is loaded alone.
LOAD_BATCH_TABLES = 32
LOAD_BATCH_BYTES = 8 << 20


def load_batches(manifest: Manifest, table_facts: list[dict[str, Any]],
                 tables: list[Table]) -> list[list[tuple[dict[str, Any], Table]]]:
    """The tables grouped into load transactions, the biggest first."""
    sizes = {record.name: record.plaintext_size for record in manifest.objects}
    biggest_first = sorted(zip(table_facts, tables, strict=True), key=lambda t: -sizes[t[0]["object"]])
    batches: list[list[tuple[dict[str, Any], Table]]] = []
    size = 0
    for entry in biggest_first:
        plaintext = sizes[entry[0]["object"]]
        if not batches or size + plaintext > LOAD_BATCH_BYTES or len(batches[-1]) >= LOAD_BATCH_TABLES:
            batches.append([])
            size = 0
        batches[-1].append(entry)
        size += plaintext
    return batches


@contextlib.contextmanager
def tables_loader(tables: list[Table], pool: SessionPool,
                  encoding: str | None) -> Iterator[Callable[[Table], contextlib.AbstractContextManager[TableLoad]]]:
    """One transaction that loads (new, empty) tables: the block calls `copy_into(table)` for each, a COPY
    FROM STDIN; all of them commit together when the block ends, or none (ToolError naming the table).

    The tables are truncated in the same transaction first. That gives each a new file, so COPY fills pages
    strictly in order without looking for free space in earlier pages (and may freeze the rows, sparing
    a later anti-wraparound vacuum): the table then reads back in exactly the order it was loaded, which
    is what lets validation compare the SHA-256 of its COPY text with the backup's. (Even a table just
    created needs it: without, COPY records each full page's free space and may put a later, shorter row
    into an earlier page.)"""
    conn = pool.get()
    current = tables[0]

    @contextlib.contextmanager
    def copy_into(table: Table) -> Iterator[TableLoad]:
        nonlocal current
        current = table
        with cur.copy(table.copy_statement("FROM STDIN", encoding, "FREEZE")) as copy:
            load = TableLoad(copy.write)
            yield load
        load.rows = cur.rowcount

    with conn.cursor() as cur:
        try:
            with conn.transaction():
                cur.execute("TRUNCATE ONLY " + ", ".join(
                    f"{quote_ident(t.schema)}.{quote_ident(t.name)}" for t in tables))
                yield copy_into
        except psycopg.Error as exc:
            which = current.label if len(tables) == 1 else f"{current.label} (with {len(tables) - 1} others)"
            raise ToolError(f"loading table {which} failed: {pg_error_reason(exc)}",
                            "fix the cause above, then restore again into an empty database") from None


def restored_table_facts(dsn: str, tables: list[Table], psql: PgTool | None = None, jobs: int = 1,
                         encoding: str | None = None, sizes: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Row count and SHA-256 of each table's COPY text in a restored database (read in the backup's
    encoding), `jobs` tables at a time. A table whose backup held more than PSQL_COPY_BYTES (`sizes`: COPY
    text bytes by table label) is read by a `psql` child, the others in-process."""
    def digest(table: Table) -> dict[str, Any] | None:
        d = TableDigest()
        try:
            if psql is not None and (sizes or {}).get(table.label, 0) > PSQL_COPY_BYTES:
                conn = sessions.get()
                for chunk in psql_copy_out(psql, dsn, table, session_settings(conn, encoding), conn.info.encoding,
                                           encoding):
                    d.update(chunk)
            else:
                with sessions.get().cursor() as cur:
                    for chunk in copy_out(cur, table, encoding):
                        d.update(chunk)
        except psycopg.Error:
            return None  # missing or unreadable: compare_tables reports it missing
        except ToolError as exc:
            if "does not exist" in exc.message:
                return None
            raise ToolError(f"validation could not read table {table.label} back: {exc.message}",
                            "fix the cause above (psql must reach the server like the restore did), then restore "
                            "again; the restored copy was not published") from None
        return d.facts(table)

    with SessionPool(dsn, lambda conn: session_settings(conn, encoding)) as sessions, \
            ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="pg-validate") as pool:
        return [facts for facts in pool.map(digest, tables) if facts is not None]
