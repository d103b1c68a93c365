"""Check records and restore-test records bound to their target's sequence, which a repository writer without
the keys cannot rewind.

A seal stops a forged record, not an old genuine one put back. So every check record
(`backups/<target>/<id>/checks.json`) and restore-test record (`restore-tests/<target>/...`) carries
`sequence`, one more than the newest record its target had, and `previous` (that record's key and sequence).
Each write, under the target's records lock, is known to two witnesses besides the record itself: the audit
trail (the `verification` or `restore_test` event names the `record` and its `sequence`) and the sealed record
state `records/<target>.json` (the newest check record of every backup, the newest restore-test record).

A reader compares what it finds with what the witnesses know (`KnownRecords`): a check record older than the
newest one known for its backup, or gone while one is known, and the newest restore-test record known but gone
from the repository, are *rolled back*: not good, named, alerted, and prune keeps every backup of the target.
A fresh record (verify the backup again; run a restore test) is newer than anything known, and resolves it.

The sealed state is a file of the repository too: put back together with the records it describes, or deleted
with them, it shows nothing. The audit trail lives in PostgreSQL, out of that writer's reach: without one,
that limit stands (`status` says so). docs/formats.md, "Record sequence".
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

from .audit import AuditTrail
from .crypto import Keyring
from .documents import read_document, write_document
from .errors import IntegrityError, LockedError, RegalError
from .layout import record_state_key, records_lock_name
from .policy import Policy
from .storage import Repository

RECORD_STATE_KIND = "record-state"
RECORD_STATE_FORMAT = "regal-backup-record-state"
TRAIL, STATE = "the audit trail", "the sealed record state"
LOCK_PATIENCE_SECONDS = 120.0  # how long a record waits for another one of its target being written
NO_TRAIL_LIMIT = ("no audit trail: a check or restore-test record put back together with the sealed record "
                  "state (records/<target>.json) goes unseen; configure audit.dsn")


@dataclass(frozen=True)
class KnownRecord:
    key: str
    sequence: int
    passed: bool
    witness: str  # TRAIL or STATE

    def describe(self) -> str:
        return f"{self.witness} knows record {self.sequence} of it ({'passed' if self.passed else 'FAILED'})"


@dataclass
class KnownRecords:
    """What the witnesses know of a target's records."""

    target: str
    checks: dict[str, KnownRecord] = field(default_factory=dict)  # backup id -> its newest check record
    restore_test: KnownRecord | None = None  # the target's newest restore-test record
    sequence: int = 0  # the highest sequence known
    audit_trail: bool = False  # the audit trail was read (else the sealed state alone)
    problems: list[str] = field(default_factory=list)  # the state refused, the trail unreachable

    def learn(self, backup_id: str | None, known: KnownRecord) -> None:
        """One witness's record (backup_id None: a restore-test record); the newer wins, the trail on a tie."""
        self.sequence = max(self.sequence, known.sequence)
        current = self.restore_test if backup_id is None else self.checks.get(backup_id)
        if current is not None and (current.sequence, current.witness == TRAIL) >= (known.sequence,
                                                                                     known.witness == TRAIL):
            return
        if backup_id is None:
            self.restore_test = known
        else:
            self.checks[backup_id] = known

    def check_rollback(self, backup_id: str, key: str, sequence: int | None) -> str | None:
        """Why the backup's check record (`sequence`: None when there is none) is rolled back; None if it is not."""
        known = self.checks.get(backup_id)
        if known is None:
            return None
        if sequence is None:
            return f"check record rolled back: {key} is gone, but {known.describe()}"
        if sequence >= known.sequence:
            return None
        later = ("; the audit trail records a later failed verification"
                 if known.witness == TRAIL and not known.passed else "")
        return f"check record rolled back: {key} is record {sequence}, but {known.describe()}{later}"

    def restore_test_rollback(self, keys: Collection[str]) -> str | None:
        """Why the target's restore-test records (`keys`, as listed) are rolled back; None if they are not."""
        known = self.restore_test
        if known is None or known.key in keys:
            return None
        return f"restore-test record rolled back: {known.key} is gone, but {known.describe()}"

    @property
    def protection(self) -> str:
        return "audit trail and sealed record state" if self.audit_trail else NO_TRAIL_LIMIT


def _state(repo: Repository, keyring: Keyring, target: str) -> tuple[dict[str, Any], str | None]:
    """The target's sealed record state (empty when there is none), and why it is refused."""
    key = record_state_key(target)
    empty: dict[str, Any] = {"format": RECORD_STATE_FORMAT, "version": 1, "target": target, "sequence": 0,
                             "newest": None, "checks": {}, "restore_test": None}
    if repo.size(key) is None:
        return empty, None
    try:
        body = read_document(repo, keyring, RECORD_STATE_KIND, key)
    except IntegrityError as exc:
        return empty, exc.message
    if body.get("format") != RECORD_STATE_FORMAT or body.get("target") != target:
        return empty, f"{key} is not the record state of {target}"
    return body, None


def known_records(policy: Policy | None, repo: Repository, keyring: Keyring, target: str) -> KnownRecords:
    """What the sealed record state and, when the policy keeps one (and it answers), the audit trail know."""
    known = KnownRecords(target)
    state, refused = _state(repo, keyring, target)
    if refused:
        known.problems.append(f"the sealed record state is refused: {refused}")
    known.sequence = int(state["sequence"])
    for backup_id, entry in state["checks"].items():
        known.learn(backup_id, KnownRecord(entry["key"], int(entry["sequence"]), bool(entry["passed"]), STATE))
    if (entry := state["restore_test"]) is not None:
        known.learn(None, KnownRecord(entry["key"], int(entry["sequence"]), bool(entry["passed"]), STATE))
    if policy is None or policy.audit is None:
        return known
    try:
        events = AuditTrail(policy, repo, keyring).sequenced_records(target)
    except RegalError as exc:
        known.problems.append(f"the audit trail cannot be read ({exc.message}): the sealed record state alone "
                              "is compared")
        return known
    known.audit_trail = True
    for event_type, backup_id, outcome, details in events:
        record = KnownRecord(str(details.get("record", "")), int(details["sequence"]), outcome == "success", TRAIL)
        known.learn(backup_id if event_type == "verification" else None, record)
    return known


@dataclass
class RecordSlot:
    """The place of one record in its target's sequence; the writer says whether it passed once it is written."""

    key: str
    sequence: int
    previous: dict[str, Any] | None
    passed: bool | None = None  # set by the writer once the record is stored

    @property
    def fields(self) -> dict[str, Any]:
        """What the record carries, and what its audit event names."""
        return {"sequence": self.sequence, "previous": self.previous}

    @property
    def audit_details(self) -> dict[str, Any]:
        return {"record": self.key, "sequence": self.sequence}


@contextlib.contextmanager
def _records_lock(repo: Repository, target: str) -> Iterator[None]:
    """The target's records lock, waited for (another record of the target takes a moment, not minutes)."""
    deadline = time.monotonic() + LOCK_PATIENCE_SECONDS
    with contextlib.ExitStack() as stack:
        while True:
            try:
                stack.enter_context(repo.lock(records_lock_name(target)))
                break
            except LockedError:
                if time.monotonic() >= deadline:
                    raise LockedError(f"another check or restore-test record of '{target}' has been written for "
                                      f"{LOCK_PATIENCE_SECONDS:.0f}s", "try again; if it persists, look for a "
                                      f"hung regal-backup process holding the lock {records_lock_name(target)}"
                                      ) from None
                time.sleep(0.2)
        yield


@contextlib.contextmanager
def next_record(policy: Policy, repo: Repository, keyring: Keyring, target: str, key: str,
                check_of: str | None) -> Iterator[RecordSlot]:
    """Under the target's records lock, the next sequence for the record the block writes at `key` (and records
    in the audit trail: `slot.audit_details`): the check record of backup `check_of`, or (None) a restore-test
    record. Once the block set `slot.passed`, the sealed record state learns it (a crash before that leaves the
    state behind, never ahead: no false alarm)."""
    with _records_lock(repo, target):
        known = known_records(policy, repo, keyring, target)
        state, _ = _state(repo, keyring, target)  # a refused state is replaced by one that starts from here
        slot = RecordSlot(key, known.sequence + 1, state["newest"])
        yield slot
        if slot.passed is None:
            return
        entry = {"key": key, "sequence": slot.sequence, "passed": slot.passed}
        if check_of is None:
            state["restore_test"] = entry
        else:
            state["checks"][check_of] = entry
        state.update(sequence=slot.sequence, newest={"key": key, "sequence": slot.sequence})
        write_document(repo, keyring, RECORD_STATE_KIND, record_state_key(target), state)


def forget_backups(repo: Repository, keyring: Keyring, target: str, backup_ids: Collection[str]) -> None:
    """Prune deleted these backups: the sealed state stops listing their check records (the trail keeps them)."""
    if not backup_ids:
        return
    with _records_lock(repo, target):
        state, refused = _state(repo, keyring, target)
        if refused is None and any(b in state["checks"] for b in backup_ids):
            state["checks"] = {b: e for b, e in state["checks"].items() if b not in backup_ids}
            write_document(repo, keyring, RECORD_STATE_KIND, record_state_key(target), state)
