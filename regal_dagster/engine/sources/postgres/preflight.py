"""`regal-backup check` for a `postgres` target: the server is reachable with the policy's DSN, its clock
agrees with ours, the role can read every table (and the password hashes when the policy asks for them), and
this machine has a pg_dump that can read the server."""

from __future__ import annotations

from typing import Any

import psycopg

from ...errors import RegalError
from ...findings import Finding, clock_finding, finding, first_line
from ...postgresql.connection import connect, describe_dsn, readable_name, server_major
from ...postgresql.tools import find_pg_tool
from .target import PostgresTarget

_UNREADABLE = """
    SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p', 'm', 'S') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
      AND n.nspname !~ '^pg_toast' AND NOT has_table_privilege(c.oid, 'SELECT') ORDER BY 1"""


def connection_findings(subject: str, dsn: str) -> tuple[list[Finding], psycopg.Connection[Any] | None]:
    """Whether the server answers (and its clock), with the open connection for the kind's next checks."""
    try:
        conn = connect(dsn, autocommit=True)
    except (RegalError, psycopg.Error) as exc:
        message = exc.message if isinstance(exc, RegalError) else first_line(exc)
        return [Finding(subject, "reachable", False, message, "check the DSN, the server, pg_hba.conf and the "
                        "password (a ${VAR} must be set in this environment)")], None
    now = conn.execute("SELECT now()").fetchone()
    version = conn.execute("SELECT current_setting('server_version')").fetchone()
    found = [Finding(subject, "reachable", True, f"{describe_dsn(dsn)}: PostgreSQL {version[0] if version else '?'}")]
    if now:
        found.append(clock_finding(subject, now[0]))
    return found, conn


def preflight(subject: str, settings: PostgresTarget) -> list[Finding]:
    found, conn = connection_findings(subject, settings.resolved_dsn())
    if conn is None:
        return found
    with conn:
        role, superuser = conn.execute("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user"
                                       ).fetchone() or ("?", False)
        if conn.info.parameter_status("server_encoding") == "SQL_ASCII":  # names as its own bytes, as dump.py
            conn.execute("SET client_encoding = 'SQL_ASCII'")
        unreadable = [readable_name(row[0]) for row in conn.execute(_UNREADABLE)]
        found.append(Finding(subject, "privileges", not unreadable,
                             "the role can read every table" if not unreadable else
                             f"{role} cannot read {len(unreadable)} relation(s): {', '.join(unreadable[:5])}"
                             + (" ..." if len(unreadable) > 5 else ""),
                             "" if not unreadable else f"GRANT pg_read_all_data TO {role} (PostgreSQL 14+), or "
                             "GRANT SELECT on those relations"))
        if settings.role_passwords:
            found.append(Finding(subject, "role passwords", bool(superuser),
                                 "the role is a superuser: it can read the password hashes" if superuser else
                                 f"role_passwords is on but {role} is not a superuser (pg_authid is unreadable)",
                                 "" if superuser else "back up as a superuser, or set role_passwords: false"))
        major = server_major(conn)
    found.append(finding(subject, "pg_dump", lambda: f"{find_pg_tool('pg_dump', major).path} reads PostgreSQL "
                         f"{major}", f"install PostgreSQL {major} client tools"))
    return found
