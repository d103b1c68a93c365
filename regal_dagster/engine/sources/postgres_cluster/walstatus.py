"""What the WAL archive of a `postgres_cluster` target holds, against the server: the newest stored WAL
position and when it was stored, the lag in bytes and seconds (the RPO as a measured number), and any gap
from the oldest base backup's start (a segment whose record or object is missing), and a ROLLBACK: the stored WAL
ends before the newest position proved (walproof.py). `wal_continuity` is walcontinuity.py."""

from __future__ import annotations

import re
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ...catalog import newest_first
from ...crypto import Keyring
from ...environment import child_environment
from ...errors import RegalError
from ...manifest import Manifest
from ...policy import Policy
from ...postgresql.tools import pg_tool_for_server
from ...storage import Repository
from .failover import lost_at_failovers
from .wal import (
    WalFile,
    fetch_wal,
    format_lsn,
    list_wal,
    missing_segments,
    parse_lsn,
    segment_number,
)
from .walproof import absent_objects, known_position, rollback, stored_end


@dataclass
class WalStatus:
    target: str
    segments: int  # complete segments stored
    newest_segment: str | None
    newest_lsn: str | None  # the newest position stored (the end of what the newest segment or snapshot holds)
    newest_stored_at: str | None
    snapshot: str | None  # the segment being received, of which a snapshot is stored
    server_lsn: str | None  # None: the server could not be asked
    server_problem: str | None
    lag_bytes: int | None
    lag_seconds: float | None  # how old the newest stored WAL is while the server has written more (0: caught up)
    oldest_base_backup: str | None
    gaps: list[str] = field(default_factory=list)  # segments missing from the oldest base backup's start on
    newest_commit_at: str | None = None  # the newest COMMIT record's time in the stored WAL (with_commit_time)
    newest_commit_lsn: str | None = None
    newest_record_lsn: str | None = None  # where the newest complete record of the stored WAL starts
    rollback: str | None = None  # the stored WAL ends before the newest proved position: what is missing (walproof)
    proved_lsn: str | None = None  # the newest position `wal_continuity` proved (walproof), and its newest commit
    proved_commit_at: str | None = None
    lost: list[str] = field(default_factory=list)  # old-timeline WAL stored past a promotion's switch (failover.py)
    fed: bool | None = None  # the server hands its WAL over now: the slot held by `wal stream`, or archive_command
    # archiving without failing since its last success; None: the server could not be asked

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def wal_status(policy: Policy, repo: Repository, keyring: Keyring, target: str, now: datetime | None = None,
               ask_server: bool = True, with_commit_time: bool = False) -> WalStatus:
    """`with_commit_time`: also read the newest stored WAL with pg_waldump for its newest commit (fetches a
    segment or more: the CLI asks for it, the minute-by-minute watches do not)."""
    now = now or datetime.now(UTC)
    files = list_wal(repo, keyring, target)
    complete = [f for f in files if f.is_segment and not f.partial]
    bases = list(newest_first(repo, keyring, target))
    oldest = bases[-1] if bases else None
    size = int(oldest.source["wal_segment_size"]) if oldest else 16 * 1024 * 1024
    newest = max(complete, key=lambda f: (segment_number(f.name, size)[1], f.name), default=None)
    end = stored_end(files, size)
    newest_lsn = end.lsn if end else None
    stored_at = end.stored_at if end else None
    snapshot = end.name if end and end.snapshot else None
    gaps: list[str] = []
    if oldest is not None:
        names = {f.name for f in complete} | ({snapshot} if snapshot else set())
        start = parse_lsn(oldest.source["start_lsn"])
        gaps, _ = missing_segments(names, int(oldest.source["timeline"]), start, size)
        needed = [f for f in complete if segment_number(f.name, size)[1] >= start // size]
        gaps += [name for name, _problem in absent_objects(repo, target, needed) if name not in gaps]
    lost = lost_at_failovers(repo, keyring, target, files, size)
    known = known_position(policy, repo, keyring, target)
    rolled_back = rollback(known, files, target)
    server_lsn, problem, lag_bytes, lag_seconds, fed = None, None, None, None, None
    if ask_server:
        try:
            server_lsn, fed = server_position(policy, target)
        except RegalError as exc:
            problem = exc.message
    if server_lsn is not None and newest_lsn is not None:
        lag_bytes = max(0, parse_lsn(server_lsn) - newest_lsn)
        lag_seconds = round((now - stored_at).total_seconds(), 3) if lag_bytes and stored_at else 0.0
    status = WalStatus(target, len(complete), newest.name if newest else None,
                       format_lsn(newest_lsn) if newest_lsn is not None else None,
                       stored_at.isoformat() if stored_at else None, snapshot, server_lsn, problem, lag_bytes,
                       lag_seconds, oldest.backup_id if oldest else None, gaps, rollback=rolled_back,
                       proved_lsn=known.position.lsn if known.position else None,
                       proved_commit_at=known.position.commit_at if known.position else None, lost=lost, fed=fed)
    if with_commit_time and oldest is not None:
        from ...workspace import private_directory

        with private_directory("wal-newest") as work:
            found = newest_records(repo, keyring, oldest, work, files)
        status.newest_commit_at = found.commit_at.isoformat() if found.commit_at else None
        status.newest_commit_lsn, status.newest_record_lsn = found.commit_lsn, found.record_lsn
    return status


# --- the newest records of the stored WAL ----------------------------------------------------------------

COMMIT_LOOKBACK = 4  # segments read back from the newest for its newest commit
_RECORD = re.compile(r"rmgr: (\w+)\s+len .*?lsn: ([0-9A-F]+/[0-9A-F]+), prev [0-9A-F/]+, desc: (.*)$")
_COMMIT = re.compile(r"^COMMIT(?:_PREPARED)?\b.*?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC")


@dataclass
class NewestRecords:
    record_lsn: str | None = None  # the newest complete record stored: where it starts
    commit_lsn: str | None = None  # the newest COMMIT (or COMMIT PREPARED) record
    commit_at: datetime | None = None  # its commit time, as the server wrote it


def newest_records(repo: Repository, keyring: Keyring, base: Manifest, work_dir: Path,
                   files: list[WalFile] | None = None) -> NewestRecords:
    """The newest complete record of `base`'s target's stored WAL (newest segment, or the snapshot of the one being
    received) and its newest commit, read with pg_waldump from the newest segment back (at most COMMIT_LOOKBACK
    segments). Nothing found: None fields."""
    target, source = base.target, base.source
    size = int(source["wal_segment_size"])
    files = files if files is not None else list_wal(repo, keyring, target)
    by_number: dict[int, str] = {}
    for f in files:
        if f.is_segment and segment_number(f.name, size)[0] >= int(source["timeline"]):
            number = segment_number(f.name, size)[1]
            by_number[number] = max(by_number.get(number, ""), f.name)
    tool = pg_tool_for_server("pg_waldump", int(source["server_version_num"]) // 10000)
    found = NewestRecords()
    for number in sorted(by_number, reverse=True)[:COMMIT_LOOKBACK]:
        name = by_number[number]
        fetch_wal(repo, keyring, target, name, work_dir / name)
        done = subprocess.run([str(tool.path), "--path", str(work_dir), "--timeline", str(int(name[:8], 16)),
                               "--start", format_lsn(number * size), "--end", format_lsn((number + 1) * size)],
                              capture_output=True, text=True, check=False, env=child_environment(TZ="UTC"),
                              timeout=600)
        for line in done.stdout.splitlines():
            match = _RECORD.search(line)
            if match is None:
                continue
            rmgr, lsn, desc = match.group(1), format_lsn(parse_lsn(match.group(2))), match.group(3)
            if found.record_lsn is None or parse_lsn(lsn) > parse_lsn(found.record_lsn):
                found.record_lsn = lsn
            commit = _COMMIT.match(desc) if rmgr == "Transaction" else None
            if commit and (found.commit_lsn is None or parse_lsn(lsn) > parse_lsn(found.commit_lsn)):
                found.commit_lsn = lsn
                found.commit_at = datetime.fromisoformat(commit.group(1)).replace(tzinfo=UTC)
        if found.commit_at is not None:
            break
    return found


def server_position(policy: Policy, target: str) -> tuple[str, bool]:
    """The server's WAL position, and whether it hands its WAL over now: the target's slot is held (by `wal
    stream`), or archive_command archives (archive_mode on, no failure since its last success)."""
    from ...postgresql.connection import connect
    from .failover import current_primary

    settings = policy.target(target)
    dsn = settings.resolved_dsn()  # type: ignore[attr-defined]
    if standbys := settings.resolved_standbys():  # type: ignore[attr-defined]
        dsn = current_primary([dsn, *standbys])[0] or dsn  # after a failover: the promoted one
    with connect(dsn) as conn:
        row = conn.execute(
            "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END::text, "
            "coalesce((SELECT active FROM pg_replication_slots WHERE slot_name = %s), false) OR "
            "(current_setting('archive_mode') <> 'off' AND (a.last_failed_time IS NULL OR "
            "a.last_failed_time < coalesce(a.last_archived_time, '-infinity'))) FROM pg_stat_archiver a",
            (settings.slot,)).fetchone()  # type: ignore[attr-defined]
    assert row is not None
    return str(row[0]), bool(row[1])
