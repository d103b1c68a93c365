"""`regal-backup check` for a `postgres_cluster` target: the role may replicate, the server's WAL settings
allow base backups and a stream, the replication slot exists and is held by a running `wal stream`, the
archive_command (when one is set) is ours, incremental backups have their WAL summaries, and this machine has
pg_basebackup and pg_receivewal for the server's version."""

from __future__ import annotations

import functools

from ...findings import Finding, finding
from ...postgresql.connection import server_major
from ...postgresql.tools import pg_tool_for_server
from ..postgres.preflight import connection_findings
from .target import PostgresClusterTarget


def preflight(subject: str, settings: PostgresClusterTarget) -> list[Finding]:
    found, conn = connection_findings(subject, settings.resolved_dsn())
    if conn is None:
        return found
    with conn:
        def setting(name: str) -> str:
            row = conn.execute("SELECT current_setting(%s, true)", (name,)).fetchone()
            return str(row[0]) if row and row[0] is not None else ""

        role, may = conn.execute("SELECT current_user, rolreplication OR rolsuper FROM pg_roles "
                                 "WHERE rolname = current_user").fetchone() or ("?", False)
        found.append(Finding(subject, "replication privilege", bool(may), f"{role} may replicate" if may else
                             f"{role} has neither REPLICATION nor SUPERUSER",
                             "" if may else f"ALTER ROLE {role} REPLICATION (and allow it in pg_hba.conf)"))
        level = setting("wal_level")
        found.append(Finding(subject, "wal_level", level in ("replica", "logical"), f"wal_level = {level}",
                             "" if level in ("replica", "logical") else "set wal_level = replica and restart"))
        senders = int(setting("max_wal_senders") or 0)
        found.append(Finding(subject, "max_wal_senders", senders >= 2, f"max_wal_senders = {senders}",
                             "" if senders >= 2 else "set max_wal_senders to at least 2 (a stream and a base "
                             "backup at once) and restart"))
        slot = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (settings.slot,)).fetchone()
        if slot is None:
            found.append(Finding(subject, "replication slot", False, f"no slot {settings.slot}: the server keeps no "
                                 "WAL for us and none is streamed", "run `regal-backup wal stream` for this target "
                                 "(as a service, docs/pitr.md); it creates the slot"))
        else:
            found.append(Finding(subject, "replication slot", bool(slot[0]), f"slot {settings.slot} "
                                 + ("is held by a running stream" if slot[0] else "exists but no stream holds it: "
                                    "WAL piles up on the server and nothing new is archived"),
                                 "" if slot[0] else "start `regal-backup wal stream` for this target"))
        archive_mode, archive_command = setting("archive_mode"), setting("archive_command")
        if archive_mode in ("on", "always"):
            ours = "wal push" in archive_command
            found.append(Finding(subject, "archive_command", ours, f"archive_mode = {archive_mode}, archive_command "
                                 f"= {archive_command or '(empty)'}", "" if ours else "use `regal-backup wal push "
                                 "--policy ... TARGET %p` (docs/pitr.md), or rely on `wal stream` and archive_mode "
                                 "= off"))
        major = server_major(conn)
        if settings.incremental:
            summaries = major >= 17 and setting("summarize_wal") == "on"
            found.append(Finding(subject, "summarize_wal", summaries, f"PostgreSQL {major}, summarize_wal = "
                                 f"{setting('summarize_wal') or '(none)'}", "" if summaries else
                                 "incremental base backups need PostgreSQL 17+ with summarize_wal = on"))
    for program in ("pg_basebackup", "pg_receivewal"):
        found.append(finding(subject, program, functools.partial(_tool, program, major),
                             f"install PostgreSQL {major} client tools"))
    return found


def _tool(program: str, major: int) -> str:
    return f"{pg_tool_for_server(program, major).path} for PostgreSQL {major}"
