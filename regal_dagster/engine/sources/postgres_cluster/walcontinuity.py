"""`wal_continuity`: the WAL from the oldest kept base backup's start to the newest stored position is there, segment
after segment, authenticated, and pg_waldump reads every record of it; and what was proved before is read again.

- New WAL is proved once, from the record boundary the last proof ended at (the sealed continuity state).
- Every segment's object is there with its recorded size (one listing, each run): a deleted or truncated object is
  found the next run.
- WAL proved before is read again: each run downloads, authenticates and parses (pg_waldump) the segments whose
  last read is the oldest, at least 1/7 of them, and every one last read 6 days ago or more: with the daily
  verification, each segment is read again at least weekly. `verify --all-wal` (trigger {"wal": "all"}) reads all.
- The newest position proved (walproof.py) is recorded in the sealed state and the verification's audit event; a
  stored end before it is a ROLLBACK.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ...crypto import Keyring
from ...environment import child_environment
from ...errors import RegalError
from ...layout import wal_prefix
from ...manifest import Manifest
from ...policy import Policy
from ...postgresql.tools import pg_tool_for_server
from ...storage import Repository
from ...storage.base import ObjectMissingError
from .wal import WalFile, fetch_wal, format_lsn, list_wal, missing_segments, parse_lsn, segment_number
from .walproof import (
    AUDIT_FIELD,
    ProvedPosition,
    absent_objects,
    known_position,
    load_state,
    newer,
    rollback,
    save_state,
    stored_end,
)
from .walstatus import newest_records

REREAD_SHARE = 7  # at least 1/7 of the proved segments each run
REREAD_DUE = timedelta(days=6)  # and every segment last read this long ago: with daily runs, each one weekly
READ_ALL = ("wal", "all")  # the trigger entry that asks for every proved segment


@dataclass
class Continuity:
    ok: bool
    description: str
    missing: str | None = None  # the segment that is missing or fails (the first one)
    parsed_to: str | None = None
    damaged: bool = False  # tampering or damage (a rollback, an object missing or failing), not just a gap
    metadata: dict[str, Any] = field(default_factory=dict)


def check_continuity(policy: Policy, repo: Repository, keyring: Keyring, manifest: Manifest, work_dir: Path,
                     trigger: Mapping[str, str] | None = None) -> Continuity:
    """The proof of the WAL from `manifest`'s start (the oldest kept base backup) to the newest stored position."""
    target, source = manifest.target, manifest.source
    size, timeline = int(source["wal_segment_size"]), int(source["timeline"])
    start = parse_lsn(source["start_lsn"])
    files = list_wal(repo, keyring, target)
    complete = [f for f in files if f.is_segment and not f.partial]
    missing, newest = missing_segments({f.name for f in complete}, timeline, start, size)
    if missing:
        return Continuity(False, f"the WAL archive lacks {missing[0]}"
                          + (f" and {len(missing) - 1} more segment(s)" if len(missing) > 1 else "")
                          + f" after the start of {manifest.backup_id} ({source['start_lsn']}): recovery stops there",
                          missing[0])
    by_number = _segments_by_number(complete, timeline, start // size, newest, size)
    if absent := absent_objects(repo, target, [f for f in complete if f.name in set(by_number.values())]):
        name, problem = absent[0]
        return Continuity(False, f"{_whose(name, manifest)}: {problem}", name, damaged=True)
    state = load_state(repo, keyring, target)
    known = known_position(policy, repo, keyring, target, state)
    if found := rollback(known, files, target):
        return Continuity(False, found, known.position.segment if known.position else None, damaged=True,
                          metadata={"audit": {AUDIT_FIELD: known.position.to_json()}} if known.position else {})
    now = datetime.now(UTC)
    proved_to = state.get("parsed_to_lsn") if state.get("timeline") == timeline else None
    begin = max(start, parse_lsn(proved_to)) if proved_to else start
    end = newest * size  # up to the newest segment, which holds the end of the records that cross into it
    fresh = {n for n in by_number if n >= begin // size} if begin < end else set()
    for run in _runs(sorted(fresh), by_number):
        if failure := _read_run(repo, keyring, manifest, work_dir / "new", by_number, run, max(begin, run[0] * size),
                                _run_end(run, by_number, newest, size)):
            name, problem = failure
            return Continuity(False, f"pg_waldump cannot read the WAL after {format_lsn(begin)} ({name}): {problem}",
                              name)
    last_read = {str(k): str(v) for k, v in (state.get("read") or {}).items()}
    due = _due(by_number, fresh, last_read, state.get("at"), now, READ_ALL in (trigger or {}).items())
    for run in _runs(due, by_number):
        failure = _read_run(repo, keyring, manifest, work_dir / "again", by_number, run, run[0] * size,
                            _run_end(run, by_number, newest, size))
        if failure:
            name, problem = failure
            return Continuity(False, f"{_whose(name, manifest)}, proved before, fails when read again: {problem}",
                              name, damaged=True, metadata={"reread": [by_number[n] for n in due]})
    proved = _newest_proved(repo, keyring, manifest, work_dir / "newest", files, size, now)
    best = newer(known.position, proved)
    stamp = now.isoformat()
    read = {by_number[n]: last_read.get(by_number[n], state.get("at") or stamp) for n in by_number}
    read.update({by_number[n]: stamp for n in [*fresh, *due]})
    save_state(repo, keyring, target, {"timeline": timeline, "parsed_to_lsn": format_lsn(max(begin, end)),
                                       "at": now.isoformat(), "proved": best.to_json() if best else None,
                                       "read": read})
    reread = [by_number[n] for n in due]
    metadata: dict[str, Any] = {"reread": reread, "proved": best.lsn if best else None,
                                **({"audit": {AUDIT_FIELD: best.to_json()}} if best else {})}
    return Continuity(True, f"WAL complete and parsed by pg_waldump from {source['start_lsn']} to {format_lsn(end)} "
                            f"({len(fresh)} new segment(s) read, {len(reread)} proved before read again"
                            + (": all" if due and len(due) == len(set(by_number) - fresh) else "") + "); newest stored "
                            f"position {best.lsn if best else 'none'}", parsed_to=format_lsn(max(begin, end)),
                      metadata=metadata)


def _segments_by_number(complete: list[WalFile], timeline: int, first: int, newest: int, size: int) -> dict[int, str]:
    """The segment recovery replays for each number from `first` to `newest` (the newest timeline holding it)."""
    by_number: dict[int, str] = {}
    for f in complete:
        tli, number = segment_number(f.name, size)
        if tli >= timeline and first <= number <= newest:
            by_number[number] = max(by_number.get(number, ""), f.name)
    return by_number


def _whose(name: str, manifest: Manifest) -> str:
    return (f"WAL segment {name} (timeline {int(name[:8], 16)}; recovery from {manifest.backup_id} and the later "
            "base backups that start before it replays it)")


def _due(by_number: dict[int, str], fresh: set[int], last_read: dict[str, str], proved_at: str | None,
         now: datetime, read_all: bool) -> list[int]:
    """The segments proved before that this run reads again: all (asked), else the oldest-read 1/REREAD_SHARE and
    every one read REREAD_DUE ago or more."""
    earlier = [n for n in by_number if n not in fresh]
    if read_all:
        return sorted(earlier)

    def read_at(n: int) -> datetime:
        stamp = last_read.get(by_number[n]) or proved_at
        return datetime.fromisoformat(stamp) if stamp else datetime.min.replace(tzinfo=UTC)

    oldest_first = sorted(earlier, key=lambda n: (read_at(n), n))
    share = oldest_first[:math.ceil(len(earlier) / REREAD_SHARE)]
    overdue = [n for n in oldest_first if read_at(n) <= now - REREAD_DUE]
    return sorted(set(share) | set(overdue))


def _runs(numbers: list[int], by_number: dict[int, str]) -> list[list[int]]:
    """Consecutive numbers on one timeline, each read with one pg_waldump."""
    runs: list[list[int]] = []
    for n in sorted(numbers):
        if runs and runs[-1][-1] == n - 1 and by_number[n][:8] == by_number[n - 1][:8]:
            runs[-1].append(n)
        else:
            runs.append([n])
    return runs


def _run_end(run: list[int], by_number: dict[int, str], newest: int, size: int) -> int:
    """Where pg_waldump stops for a run: the end of its last segment, when the next one (which holds the end of a
    record crossing into it) is stored on the same timeline; else the start of the last one (then only
    authenticated, and the next run, or the next proof, parses it)."""
    after = run[-1] + 1
    if after <= newest and after in by_number and by_number[after][:8] == by_number[run[-1]][:8]:
        return after * size
    return run[-1] * size


def _read_run(repo: Repository, keyring: Keyring, manifest: Manifest, directory: Path, by_number: dict[int, str],
              numbers: list[int], begin: int, end: int) -> tuple[str, str] | None:
    """Segments `numbers` (and the one after, for the records that cross into it) fetched and authenticated into
    `directory`, and pg_waldump over `begin`..`end`; the first failing segment and why (None: all hold). The
    directory is emptied after."""
    source = manifest.source
    size = int(source["wal_segment_size"])
    directory.mkdir(mode=0o700, exist_ok=True)
    try:
        for n in [*numbers, *([numbers[-1] + 1] if numbers[-1] + 1 in by_number else [])]:
            try:
                fetch_wal(repo, keyring, manifest.target, by_number[n], directory / by_number[n], allow_partial=False)
            except ObjectMissingError:
                return by_number[n], f"its object {wal_prefix(manifest.target)}{by_number[n]} is missing"
            except RegalError as exc:
                return by_number[n], exc.message
        if end <= begin:
            return None
        tool = pg_tool_for_server("pg_waldump", int(source["server_version_num"]) // 10000)
        first = by_number[numbers[0]]
        done = subprocess.run([str(tool.path), "--path", str(directory), "--timeline", str(int(first[:8], 16)),
                               "--start", format_lsn(begin), "--end", format_lsn(end), "--quiet"],
                              capture_output=True, text=True, check=False, env=child_environment(), timeout=3600)
        if done.returncode != 0:
            words = (done.stderr or done.stdout).strip().splitlines()
            return _named_in(words[-1] if words else "", by_number, numbers, size), (
                words[-1] if words else f"pg_waldump exit code {done.returncode}")
        return None
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _named_in(message: str, by_number: dict[int, str], numbers: list[int], size: int) -> str:
    """The segment pg_waldump's message names (by name or by a position in it), else the run's first."""
    for n in numbers:
        if by_number[n] in message:
            return by_number[n]
    import re

    for found in re.findall(r"[0-9A-F]+/[0-9A-F]+", message):
        number = parse_lsn(found) // size
        if number in by_number:
            return by_number[number]
    return by_number[numbers[0]]


def _newest_proved(repo: Repository, keyring: Keyring, manifest: Manifest, directory: Path, files: list[WalFile],
                   size: int, now: datetime) -> ProvedPosition | None:
    """The stored end of the WAL, its snapshot (when that is the end) authenticated, with its newest commit."""
    end = stored_end(files, size)
    if end is None:
        return None
    directory.mkdir(mode=0o700, exist_ok=True)
    try:
        if end.snapshot:
            fetch_wal(repo, keyring, manifest.target, end.name, directory / end.name)
        found = newest_records(repo, keyring, manifest, directory, files)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return ProvedPosition(manifest.target, int(end.name[:8], 16), format_lsn(end.lsn), end.name, end.snapshot, size,
                          found.commit_lsn, found.commit_at.isoformat() if found.commit_at else None,
                          now.isoformat(timespec="seconds"))

