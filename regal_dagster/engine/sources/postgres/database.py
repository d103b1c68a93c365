"""The database a restore goes into: the target checked, the temporary database it is loaded into created with
the backup's encoding, locale and tablespace, and published under the target's name (`StagedDatabase`); a
scratch server's target created or recreated in place."""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any, Self

import psycopg
from psycopg import sql

from ...errors import RegalError, TargetNotEmptyError, UsageError
from ...postgresql.connection import connect, database_of, describe_dsn, server_major, with_dbname
from .dump import pg_error_reason
from .locales import LOCALE_KEYS, USE_TARGET_LOCALE_HINT, database_locale, describe_locale, locale_clause

logger = logging.getLogger(__name__)

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
            # A restore killed just before this one started may still have held its lock then (its server
            # session ends when the server notices the closed socket): sweep again on the way out.
            self.sweep()
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


def create_database_statement(dbname: str, properties: dict[str, Any] | None, template: str = "template0",
                              server_major_version: int = 15) -> sql.Composed:
    """CREATE DATABASE with the source database's encoding, locale and collation provider, said in full whatever
    the server's defaults (locales.locale_clause; from template0, the only template any encoding and locale can
    be copied from), or as a copy of `template`."""
    statement: list[sql.Composable] = [sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
        sql.Identifier(dbname), sql.Identifier(template))]
    if properties:
        statement.append(sql.SQL("ENCODING {}").format(sql.Literal(properties["encoding"])))
        statement += locale_clause(properties, server_major_version)
        if properties.get("tablespace"):
            statement.append(sql.SQL("TABLESPACE {}").format(sql.Identifier(properties["tablespace"])))
    return sql.SQL(" ").join(statement)


def create_database(cur: psycopg.Cursor[Any], dbname: str, properties: dict[str, Any] | None,
                    template: str = "template0") -> None:
    try:
        cur.execute(create_database_statement(dbname, properties, template, server_major(cur.connection)))
    except psycopg.errors.InsufficientPrivilege:
        raise
    except psycopg.Error as exc:
        what = describe_locale(properties) if properties else "the server's defaults"
        raise RegalError(f"cannot create database {dbname} as the backup's was ({what}): "
                         f"{pg_error_reason(exc)}", USE_TARGET_LOCALE_HINT) from None


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


def database_encoding(conn: psycopg.Connection[Any]) -> str:
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
    """Whether the existing (empty) database `dsn` has the backup's encoding and locale (unless the properties
    leave the locale to the target: --use-target-locale); refuses when it has not, unless it may be replaced
    (its text would not come back byte for byte, or would not sort as it did)."""
    with connect(dsn, autocommit=True) as conn:
        have = {"encoding": database_encoding(conn), **database_locale(conn)}
    if drop_existing:
        pass
    elif have["encoding"] != properties["encoding"]:
        raise RegalError(f"the database {describe_dsn(dsn)} has the encoding {have['encoding']}, the backup's "
                         f"database had {properties['encoding']}: its text would not come back byte for byte",
                         "restore into a new database name (it is created with the backup's encoding and "
                         "locale), or pass --drop-existing to recreate this one")
    elif not same_locale(have, properties):
        raise RegalError(f"the database {describe_dsn(dsn)} has {describe_locale(have)}, the backup's database had "
                         f"{describe_locale(properties)}: its text would not sort and compare as it did",
                         "restore into a new database name (it is created with the backup's locale), pass "
                         "--drop-existing to recreate this one, or --use-target-locale to load into it as it is")
    return have["encoding"] == properties["encoding"] and same_locale(have, properties)


def same_locale(have: dict[str, Any], properties: dict[str, Any]) -> bool:
    """Whether a database's locale is the one `properties` ask for (any, when they leave it to the target)."""
    return all((properties[key] or None) == (have[key] or None) for key in LOCALE_KEYS if key in properties)


def reset_database(dsn: str, properties: dict[str, Any] | None = None) -> None:
    dbname = database_of(dsn)
    assert dbname is not None  # prepare_target_database refused a DSN without one
    with connect(with_dbname(dsn, "postgres"), autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
        create_database(cur, dbname, properties)
