"""The newest proved WAL position of a `postgres_cluster` target, kept where a repository writer without the keys
cannot rewind it unseen, and what the archive holds now against it.

`wal_continuity` (walcontinuity.py) proves the stored WAL and records the newest position it proved (timeline,
WAL position, the segment or snapshot holding it, its newest commit) in the sealed continuity state
(`wal/<target>/continuity/state`) and, when the policy keeps an audit trail, in the details of the verification
event (`wal_proved`): an append-only record outside the repository. `wal status`, `verify` and a restore compare
the stored end of the archive with the newest of the two: anything less is a ROLLBACK (the newest segments or the
snapshot deleted, an older snapshot put back), named, never a silently shorter recovery.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from ...crypto import Keyring
from ...documents import read_document, write_document
from ...errors import RegalError
from ...layout import wal_prefix
from ...policy import Policy
from ...storage import Repository
from ...storage.base import ObjectMissingError
from .wal import WalFile, format_lsn, parse_lsn, segment_name_of, segment_number

CONTINUITY_KIND = "wal-continuity"
CONTINUITY_FORMAT = "regal-backup-wal-continuity"
CONTINUITY_VERSION = 2  # 2: the newest proved position and when each segment was last read; 1 is still read
AUDIT_FIELD = "wal_proved"  # in the details of a verification event


def continuity_key(target: str) -> str:
    return f"{wal_prefix(target)}continuity/state"  # no .json: not a WAL record


def load_state(repo: Repository, keyring: Keyring, target: str) -> dict[str, Any]:
    """The sealed continuity state ({} when there is none yet)."""
    try:
        return read_document(repo, keyring, CONTINUITY_KIND, continuity_key(target))
    except ObjectMissingError:
        return {}


def save_state(repo: Repository, keyring: Keyring, target: str, body: dict[str, Any]) -> None:
    write_document(repo, keyring, CONTINUITY_KIND, continuity_key(target),
                   {**body, "format": CONTINUITY_FORMAT, "version": CONTINUITY_VERSION})


@dataclass(frozen=True)
class StoredEnd:
    """How far the stored WAL reaches: the end of the newest complete segment, or the last byte of WAL in the
    snapshot of the segment after it (the one `wal stream` is receiving)."""

    lsn: int
    name: str  # the segment holding it
    snapshot: bool
    stored_at: datetime


def stored_end(files: list[WalFile], size: int) -> StoredEnd | None:
    """The end of the stored WAL as its sealed records say (None: no segment stored)."""
    complete = [f for f in files if f.is_segment and not f.partial]
    newest = max(complete, key=lambda f: (segment_number(f.name, size)[1], f.name), default=None)
    end = None
    if newest is not None:
        end = StoredEnd((segment_number(newest.name, size)[1] + 1) * size, newest.name, False, newest.archived_at)
    newest_number = segment_number(newest.name, size)[1] if newest is not None else -1
    after = [f for f in files if f.partial and segment_number(f.name, size)[1] > newest_number]
    if after:
        latest = max(after, key=lambda f: (segment_number(f.name, size)[1], f.name))
        end = StoredEnd(segment_number(latest.name, size)[1] * size + latest.used_bytes, latest.name, True,
                        latest.archived_at)
    return end


def absent_objects(repo: Repository, target: str, segments: list[WalFile]) -> list[tuple[str, str]]:
    """The segments whose object is missing or has another size than their record says, and how (one listing)."""
    listed = {stored.key: stored.size for stored in repo.list(wal_prefix(target))}
    found = []
    for f in sorted(segments, key=lambda f: f.name):
        size = listed.get(f.record.key)
        if size is None:
            found.append((f.name, f"its object {f.record.key} is missing (its record remains): recovery stops there"))
        elif size != f.record.size:
            found.append((f.name, f"its object {f.record.key} has {size} bytes, its record says {f.record.size}"))
    return found


@dataclass(frozen=True)
class ProvedPosition:
    """The newest WAL position `wal_continuity` proved stored and readable."""

    target: str
    timeline: int
    lsn: str
    segment: str  # the segment holding it (its snapshot when `snapshot`)
    snapshot: bool
    segment_size: int
    commit_lsn: str | None  # the newest commit in the WAL then stored, and its time
    commit_at: str | None
    proved_at: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, body: Any) -> ProvedPosition | None:
        if not isinstance(body, dict):
            return None
        try:
            return cls(str(body["target"]), int(body["timeline"]), format_lsn(parse_lsn(str(body["lsn"]))),
                       str(body["segment"]), bool(body["snapshot"]), int(body["segment_size"]),
                       body.get("commit_lsn"), body.get("commit_at"), str(body["proved_at"]))
        except (KeyError, TypeError, ValueError, RegalError):
            return None

    def describe(self) -> str:
        holder = f"the snapshot of {self.segment}" if self.snapshot else f"segment {self.segment}"
        commit = f", newest commit {self.commit_at} at {self.commit_lsn}" if self.commit_at else ""
        return f"{self.lsn} ({holder}, timeline {self.timeline}{commit}), proved {self.proved_at}"


def newer(a: ProvedPosition | None, b: ProvedPosition | None) -> ProvedPosition | None:
    if a is None or b is None:
        return a or b
    return a if parse_lsn(a.lsn) >= parse_lsn(b.lsn) else b


@dataclass(frozen=True)
class Known:
    position: ProvedPosition | None
    sources: list[str]  # where it is recorded: the sealed continuity state, the audit trail


def known_position(policy: Policy, repo: Repository, keyring: Keyring, target: str,
                   state: dict[str, Any] | None = None) -> Known:
    """The newest proved position the sealed state and the audit trail (when the policy keeps one and it can be
    reached) record for the target."""
    state = load_state(repo, keyring, target) if state is None else state
    sealed = ProvedPosition.from_json(state.get("proved"))
    audited = _audited_position(policy, repo, keyring, target)
    best = newer(sealed, audited)
    sources = [name for name, found in (("the sealed continuity state", sealed), ("the audit trail", audited))
               if found is not None and best is not None and found.lsn == best.lsn]
    return Known(best, sources)


def _audited_position(policy: Policy, repo: Repository, keyring: Keyring, target: str) -> ProvedPosition | None:
    if policy.audit is None:
        return None
    import psycopg

    from ...audit import AuditTrail

    with contextlib.suppress(RegalError, psycopg.Error):  # the audit database down: only the sealed state counts
        details = AuditTrail(policy, repo, keyring).newest_details_about("verification", AUDIT_FIELD, target)
        if details is not None:
            return ProvedPosition.from_json(details.get(AUDIT_FIELD))
    return None


def rollback(known: Known, files: list[WalFile], target: str) -> str | None:
    """Why the stored WAL is less than the newest proved position (None: it is not), naming what is missing or
    older."""
    proved = known.position
    if proved is None:
        return None
    size = proved.segment_size
    end = stored_end(files, size)
    proved_lsn = parse_lsn(proved.lsn)
    if end is not None and end.lsn >= proved_lsn:
        return None
    stored = {f.name for f in files if f.is_segment and not f.partial}
    numbers = {segment_number(n, size)[1] for n in stored}
    first = (end.lsn // size) if end is not None else 0
    last = segment_number(proved.segment, size)[1] - (1 if proved.snapshot else 0)
    gone = [segment_name_of(proved.timeline, n, size) for n in range(first, last + 1) if n not in numbers]
    lacking: list[str] = []
    if gone:
        lacking.append(f"segment(s) {gone[0]}" + (f" to {gone[-1]}" if len(gone) > 1 else "") + " deleted")
    if proved.snapshot:
        now = next((f for f in files if f.partial and f.name == proved.segment), None)
        if now is None:
            lacking.append(f"the snapshot of {proved.segment} deleted")
        else:
            lacking.append(f"the snapshot of {proved.segment} is an older one (WAL to "
                           f"{format_lsn(segment_number(now.name, size)[1] * size + now.used_bytes)})")
    reach = f"{format_lsn(end.lsn)} ({'the snapshot of ' if end.snapshot else ''}{end.name})" if end else "nothing"
    return (f"ROLLBACK: the WAL archive of {target} now ends at {reach}, but WAL to {proved.describe()} was "
            f"stored and proved (recorded in {' and '.join(known.sources)}): " + "; ".join(lacking or ["WAL deleted"]))


ROLLBACK_HINT = ("someone with write access to the repository deleted or put back WAL: nothing newer than the "
                 "stored end can be recovered from here. Put the newer WAL back from the off-site copy, investigate "
                 "who wrote the repository; a restore to a point before the stored end still works")
