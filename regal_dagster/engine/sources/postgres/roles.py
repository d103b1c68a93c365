"""What a database's restore recreates around its objects: the roles it referred to (attributes, settings,
memberships) and the database's own owner, comment, connection limit, settings and grants."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import psycopg
from psycopg import sql

from ...postgresql.connection import connect, database_of, with_dbname
from .dump import pg_error_reason

logger = logging.getLogger(__name__)


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


def _create_role_statement(role: dict[str, Any]) -> sql.Composed:
    """CREATE ROLE with the recorded role's attributes, connection limit, expiry and password hash."""
    name = role["name"]
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
    return statement


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
            statement = _create_role_statement(role)
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
