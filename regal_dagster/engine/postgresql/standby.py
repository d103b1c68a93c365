"""Where a backup reads from: the primary, or one of its streaming standbys (`backup_from`), so that the primary does
not pay for the backup's reads: a base backup (`postgres_cluster`) or a dump (`postgres`).

A standby qualifies when it answers, is in recovery, belongs to the primary's cluster (system identifier), receives
the primary's timeline, does not have replay paused, and replays the primary's current WAL position within
`standby_max_lag` (the wait is the measure of its lag: a standby that is idle but caught up passes at once). Before
a base backup, the primary is asked for a CHECKPOINT (best effort: it needs pg_checkpoint or a superuser), so that
the standby's restartpoint, where a backup of it starts, is recent.

A backup of a standby (`pg_basebackup -X none` there) ends at the standby's minimum recovery point; PostgreSQL does
not wait for archiving on a standby (archive_mode = on archives nothing during recovery), so its WAL comes from
the primary's archive (`wal stream` or archive_command), which the backup then waits for as for any other backup.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import psycopg

from ..errors import RegalError
from .connection import connect, describe_dsn

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


def _primary_position(dsn: str, checkpoint: bool) -> tuple[str, int, int]:
    """The primary's system identifier, current timeline and WAL position, after a CHECKPOINT when asked and
    allowed."""
    with connect(dsn, autocommit=True) as conn:
        if checkpoint:
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
                    max_lag_seconds: float, min_version_num: int = 0) -> str | None:
    """Why this standby cannot take the backup now, or None when it is healthy and caught up (and at least
    `min_version_num`). Replay may cancel even these short queries (a conflict with recovery: any snapshot on a
    standby can be older than what the primary's VACUUM removed): they say nothing of the backup's chances, so
    they are asked again, within `max_lag_seconds`."""
    deadline = time.monotonic() + max_lag_seconds
    while True:
        try:
            return _standby_problem(dsn, system_identifier, timeline, primary_lsn, max_lag_seconds, min_version_num)
        except psycopg.Error as exc:
            words = recovery_conflict(exc)
            if words is None:
                raise
            if time.monotonic() >= deadline:
                return (f"cancels even its health queries by conflicts with recovery ({words}) for longer than "
                        f"standby_max_lag ({max_lag_seconds:g} s)")
            time.sleep(POLL_SECONDS)


def _standby_problem(dsn: str, system_identifier: str, timeline: int, primary_lsn: int,
                     max_lag_seconds: float, min_version_num: int) -> str | None:
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
            "CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() END, "
            "current_setting('server_version_num')::int").fetchone()
        assert row is not None
        in_recovery, identifier, received_tli, paused, version = row
        if version < min_version_num:
            return (f"runs PostgreSQL {version // 10000}: a dump's snapshot can be exported on a standby from "
                    f"PostgreSQL {min_version_num // 10000} on")
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


def _answer(dsn: str) -> str:
    """Whether a server answers: "answers" or why not."""
    try:
        with connect(dsn, autocommit=True):
            return "answers"
    except RegalError as exc:
        return exc.message.split(": ", 1)[-1]


def _lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def backup_server(primary: str, standbys: list[str], backup_from: str, max_lag_seconds: float, *,
                  what: str = "base backup", checkpoint: bool = True, min_version_num: int = 0) -> BackupServer:
    """The server `what` (the next base backup, or dump) reads from, as `backup_from` says; a standby that does not
    qualify is named with its reason (the backup fails with `standby`, goes to the primary with `prefer-standby`).
    `checkpoint`: ask the primary for a CHECKPOINT first (a base backup of a standby starts at its restartpoint)."""
    if backup_from == "primary":
        return BackupServer(primary, "primary", describe_dsn(primary))
    try:
        identifier, timeline, position = _primary_position(primary, checkpoint)
    except RegalError as exc:
        if not exc.message.startswith("cannot connect"):
            raise
        standby_words = [f"standby {describe_dsn(dsn)}: {_answer(dsn)}" for dsn in standbys]
        raise RegalError(f"the {what} cannot start: the primary {exc.message.removeprefix('cannot connect to ')}"
                         "; " + "; ".join(standby_words),
                         "start the primary (a standby is only used when it has caught up with it); after a "
                         "failover point `dsn` at the new primary, or give a multi-host DSN with "
                         "target_session_attrs=primary, which follows it") from None
    reasons: list[str] = []
    for dsn in standbys:
        problem = standby_problem(dsn, identifier, timeline, position, max_lag_seconds, min_version_num)
        if problem is None:
            return BackupServer(dsn, "standby", describe_dsn(dsn))
        reasons.append(f"standby {describe_dsn(dsn)} {problem}")
    why = "; ".join(reasons)
    if backup_from == "standby":
        raise RegalError(f"no standby can take the {what} (backup_from: standby): {why}",
                         "repair or resume the standby (or raise standby_max_lag), or set backup_from: "
                         "prefer-standby to fall back to the primary")
    return BackupServer(primary, "primary", describe_dsn(primary),
                        f"taken from the primary instead of a standby (backup_from: prefer-standby): {why}")


RECOVERY_CONFLICT = "due to conflict with recovery"  # "canceling statement ..." / "terminating connection ..."


def recovery_conflict(exc: BaseException) -> str | None:
    """The server's words when `exc` is a query on a standby cancelled (or its session ended) because replaying the
    primary's WAL needed what it held (row versions its snapshot still sees, a lock), else None."""
    text = getattr(exc, "message", None) or str(exc)
    for line in text.splitlines():
        if RECOVERY_CONFLICT in line:
            return line.strip()
    return None


def recovery_conflicts(dsn: str) -> int | None:
    """How many queries replay has cancelled (or sessions ended) in the standby's database so far
    (pg_stat_database_conflicts, every cause summed); None when it cannot be read."""
    try:
        with connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_stat_clear_snapshot()")
            row = conn.execute("SELECT coalesce(sum(value::bigint), 0) FROM pg_stat_database_conflicts c, "
                               "jsonb_each_text(to_jsonb(c) - 'datid' - 'datname') "
                               "WHERE c.datname = current_database()").fetchone()
    except (RegalError, psycopg.Error):
        return None
    return int(row[0]) if row else None


def conflict_during(exc: BaseException, dsn: str, before: int | None, wait: float = 3.0) -> str | None:
    """The words of a conflict with recovery behind `exc`, a failed dump on the standby `dsn`: the server's own, or,
    when replay ended the session holding the dump's snapshot (its workers then read "snapshot ... does not
    exist"), the standby's count of conflicts having grown since `before`."""
    if words := recovery_conflict(exc):
        return words
    if before is None:
        return None
    deadline = time.monotonic() + wait  # the ended session's statistics arrive a moment later
    while True:
        after = recovery_conflicts(dsn)
        if after is not None and after > before:
            text = getattr(exc, "message", None) or str(exc)
            return (f"{_first_line(text)}, after replay ended a session of the dump (pg_stat_database_conflicts: "
                    f"{after - before} more)")
        if time.monotonic() >= deadline:
            return None
        time.sleep(POLL_SECONDS)


def recovery_conflict_error(server: BackupServer, words: str) -> RegalError:
    """The clear error of a dump on a standby that replay cancelled: the standby's settings that decide it, and
    what to set."""
    settings = "its settings could not be read"
    try:
        with connect(server.dsn, autocommit=True) as conn:
            row = conn.execute("SELECT current_setting('max_standby_streaming_delay'), "
                               "current_setting('hot_standby_feedback')").fetchone()
        if row is not None:
            settings = f"it has max_standby_streaming_delay = {row[0]}, hot_standby_feedback = {row[1]}"
    except (RegalError, psycopg.Error):
        pass
    return RegalError(f"the dump on standby {server.server} was cancelled by a conflict with recovery ({words}): "
                      f"replaying the primary's WAL (VACUUM removing row versions, a lock) needed what the dump's "
                      f"snapshot still used, and the standby waits at most max_standby_streaming_delay before it "
                      f"cancels the query ({settings})",
                      "on the standby set hot_standby_feedback = on (the primary keeps the rows a standby's query "
                      "still sees; it bloats the primary a little while a dump runs) or a larger "
                      "max_standby_streaming_delay (-1: replay waits for the dump, the standby falls behind), then "
                      "run the backup again; or set backup_from: prefer-standby to dump the primary when it happens")
