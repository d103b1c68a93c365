"""Where a base backup runs: the primary, or one of its streaming standbys (`backup_from`), so that the primary does
not pay for the backup's reads.

A standby qualifies when it answers, is in recovery, belongs to the primary's cluster (system identifier), receives
the primary's timeline, does not have replay paused, and replays the primary's current WAL position within
`standby_max_lag` (the wait is the measure of its lag: a standby that is idle but caught up passes at once). Before
that, the primary is asked for a CHECKPOINT (best effort: it needs pg_checkpoint or a superuser), so that the
standby's restartpoint, where a backup of it starts, is recent.

A backup of a standby (`pg_basebackup -X none` there) ends at the standby's minimum recovery point; PostgreSQL does
not wait for archiving on a standby (archive_mode = on archives nothing during recovery), so its WAL comes from
the primary's archive (`wal stream` or archive_command), which the backup then waits for as for any other backup.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import psycopg

from ...errors import RegalError
from ...postgresql.connection import connect, describe_dsn
from .target import PostgresClusterTarget

POLL_SECONDS = 0.2


@dataclass(frozen=True)
class BackupServer:
    """The server a base backup is taken from."""

    dsn: str
    role: str  # primary | standby
    server: str  # describe_dsn: host:port/dbname as user, never a password
    note: str | None = None  # why a standby was not used (prefer-standby fell back to the primary)

    def facts(self) -> dict[str, Any]:
        return {"backup_from": self.role, "backup_server": self.server,
                **({"backup_from_note": self.note} if self.note else {})}


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "no reason given"


def _primary_position(dsn: str) -> tuple[str, int, int]:
    """The primary's system identifier, current timeline and WAL position, after a CHECKPOINT when allowed."""
    with connect(dsn, autocommit=True) as conn:
        try:
            conn.execute("CHECKPOINT")
        except psycopg.Error:
            pass  # without pg_checkpoint: the standby's restartpoint is the last regular one (an older start)
        row = conn.execute(
            "SELECT (SELECT system_identifier::text FROM pg_control_system()), pg_is_in_recovery(), "
            "('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int, "
            "pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
    assert row is not None
    if row[1]:
        raise RegalError("the target's `dsn` is in recovery (a standby), not the primary",
                         "point `dsn` at the primary (after a failover: at the new primary, or use a multi-host DSN "
                         "with target_session_attrs=primary)")
    return str(row[0]), int(row[2]), int(row[3])


def standby_problem(dsn: str, system_identifier: str, timeline: int, primary_lsn: int,
                    max_lag_seconds: float) -> str | None:
    """Why this standby cannot take the backup now, or None when it is healthy and caught up."""
    try:
        conn = connect(dsn, autocommit=True)
    except RegalError as exc:
        return f"unreachable ({_first_line(exc.message)})"
    except psycopg.Error as exc:
        return f"unreachable ({_first_line(str(exc))})"
    with conn:
        row = conn.execute(
            "SELECT pg_is_in_recovery(), (SELECT system_identifier::text FROM pg_control_system()), "
            "(SELECT received_tli FROM pg_stat_wal_receiver), "
            "CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() END").fetchone()
        assert row is not None
        in_recovery, identifier, received_tli, paused = row
        if not in_recovery:
            return "is not in recovery: it is a primary itself (promoted?)"
        if identifier != system_identifier:
            return f"belongs to another cluster (system identifier {identifier}, the primary's is {system_identifier})"
        if received_tli is not None and int(received_tli) != timeline:
            return f"receives timeline {received_tli}, the primary is on timeline {timeline}"
        if paused:
            return "has WAL replay paused (pg_wal_replay_pause)"
        deadline = time.monotonic() + max_lag_seconds
        while True:
            replayed = conn.execute("SELECT pg_last_wal_replay_lsn() - '0/0'::pg_lsn").fetchone()
            replay = int(replayed[0]) if replayed and replayed[0] is not None else 0
            if replay >= primary_lsn:
                return None
            if time.monotonic() >= deadline:
                return (f"lags: it replayed up to {_lsn(replay)}, {primary_lsn - replay} bytes behind the primary's "
                        f"{_lsn(primary_lsn)}, and did not catch up within standby_max_lag ({max_lag_seconds:g} s)")
            time.sleep(POLL_SECONDS)


def _lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def backup_server(target: PostgresClusterTarget) -> BackupServer:
    """The server the target's next base backup is taken from, as `backup_from` says; a standby that does not
    qualify is named with its reason (the backup fails with `standby`, goes to the primary with `prefer-standby`)."""
    primary = target.resolved_dsn()
    if target.backup_from == "primary":
        return BackupServer(primary, "primary", describe_dsn(primary))
    identifier, timeline, position = _primary_position(primary)
    reasons: list[str] = []
    for dsn in target.resolved_standbys():
        problem = standby_problem(dsn, identifier, timeline, position, target.standby_max_lag.total_seconds())
        if problem is None:
            return BackupServer(dsn, "standby", describe_dsn(dsn))
        reasons.append(f"standby {describe_dsn(dsn)} {problem}")
    why = "; ".join(reasons)
    if target.backup_from == "standby":
        raise RegalError(f"no standby can take the base backup (backup_from: standby): {why}",
                         "repair or resume the standby (or raise standby_max_lag), or set backup_from: "
                         "prefer-standby to fall back to the primary")
    return BackupServer(primary, "primary", describe_dsn(primary),
                        f"taken from the primary instead of a standby (backup_from: prefer-standby): {why}")
