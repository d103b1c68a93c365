"""Legal holds (pins) and annotations of backups, one sealed document per target: `holds/<target>.json`.

A pin (`regal-backup pin BACKUP_ID --reason TEXT [--until DATE]`) keeps a backup whatever retention says, until
its date or until `unpin`; an annotation is free text an operator attaches to a backup (`annotate`). Both are
shown by list, show, status and the report.

The document is encrypted and bound to its key like every document (engine/documents.py): nobody without the keys
can forge a pin or lift one by editing it. A seal does not stop an old document from being put back (a pin lifted
by rollback), so the document carries `sequence`, one more on every change, and every change is an audit event
(`backup_pinned`, `backup_unpinned`, `backup_annotated`) naming that sequence and the whole change. A reader
replays the trail: a trail that knows a later sequence than the document means the document was rolled back
(or deleted): the holds are taken from the trail, and retention keeps every backup of the target until the next
change writes a fresh document. Without an audit trail that limit stands, as for check records
(record_sequence.NO_TRAIL_LIMIT).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .audit import AuditTrail, record
from .crypto import Keyring
from .documents import read_document, write_document
from .errors import IntegrityError, LockedError, RegalError
from .layout import holds_key
from .policy import Policy
from .storage import Repository

HOLDS_KIND = "backup-holds"
HOLDS_FORMAT = "regal-backup-holds"
EVENTS = ("backup_pinned", "backup_unpinned", "backup_annotated")
LOCK_PATIENCE_SECONDS = 60.0


@dataclass(frozen=True)
class Pin:
    backup_id: str
    reason: str
    pinned_at: datetime
    until: datetime | None = None  # None: until unpinned

    def active(self, now: datetime) -> bool:
        return self.until is None or now < self.until

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason, "pinned_at": self.pinned_at.isoformat(),
                "until": self.until.isoformat() if self.until else None}

    @classmethod
    def from_json(cls, backup_id: str, body: dict[str, Any]) -> Pin:
        until = body.get("until")
        return cls(backup_id, str(body["reason"]), datetime.fromisoformat(str(body["pinned_at"])),
                   datetime.fromisoformat(str(until)) if until else None)

    @property
    def summary(self) -> str:
        return f"LEGAL HOLD ({self.reason})" + (f" until {self.until:%Y-%m-%d %H:%M} UTC" if self.until else "")


@dataclass
class Holds:
    """What is known of a target's pins and annotations, and whether the document was rolled back."""

    target: str
    sequence: int = 0
    pins: dict[str, Pin] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    problem: str | None = None  # the document refused or rolled back: every backup of the target is kept

    def pin_of(self, backup_id: str, now: datetime) -> Pin | None:
        pin = self.pins.get(backup_id)
        return pin if pin is not None and pin.active(now) else None

    def to_document(self) -> dict[str, Any]:
        return {"format": HOLDS_FORMAT, "version": 1, "target": self.target, "sequence": self.sequence,
                "pins": {b: p.to_json() for b, p in sorted(self.pins.items())},
                "notes": dict(sorted(self.notes.items()))}


def _document(repo: Repository, keyring: Keyring, target: str) -> tuple[Holds, str | None]:
    key = holds_key(target)
    holds = Holds(target)
    if repo.size(key) is None:
        return holds, None
    try:
        body = read_document(repo, keyring, HOLDS_KIND, key)
    except IntegrityError as exc:
        return holds, exc.message
    if body.get("format") != HOLDS_FORMAT or body.get("target") != target:
        return holds, f"{key} is not the holds document of {target}"
    holds.sequence = int(body["sequence"])
    holds.pins = {b: Pin.from_json(b, p) for b, p in body["pins"].items()}
    holds.notes = {b: str(n) for b, n in body["notes"].items()}
    return holds, None


def _replay(target: str, events: list[tuple[str, str, dict[str, Any]]]) -> Holds:
    """The holds as the audit trail's events built them."""
    holds = Holds(target)
    for event_type, backup_id, details in events:
        holds.sequence = max(holds.sequence, int(details.get("sequence", 0)))
        if event_type == "backup_pinned":
            holds.pins[backup_id] = Pin.from_json(backup_id, details)
        elif event_type == "backup_unpinned":
            holds.pins.pop(backup_id, None)
        else:
            holds.notes[backup_id] = str(details.get("text", ""))
    return holds


def load_holds(policy: Policy | None, repo: Repository, keyring: Keyring, target: str) -> Holds:
    """The target's holds: the sealed document, checked against the audit trail when the policy keeps one."""
    holds, refused = _document(repo, keyring, target)
    if refused:
        holds.problem = f"the legal holds document is refused: {refused}"
    if policy is None or policy.audit is None:
        return holds
    try:
        events = AuditTrail(policy, repo, keyring).events_about(EVENTS, target)
    except RegalError:
        return holds  # the trail unreachable: the sealed document alone
    trail = _replay(target, events)
    if trail.sequence > holds.sequence:
        trail.problem = (holds.problem or f"the legal holds of {target} were rolled back: {holds_key(target)} is "
                         f"change {holds.sequence}, the audit trail knows change {trail.sequence}")
        return trail
    return holds


@contextlib.contextmanager
def _locked(repo: Repository, target: str) -> Iterator[None]:
    deadline = time.monotonic() + LOCK_PATIENCE_SECONDS
    with contextlib.ExitStack() as stack:
        while True:
            try:
                stack.enter_context(repo.lock(f"holds-{target}"))
                break
            except LockedError:
                if time.monotonic() >= deadline:
                    raise LockedError(f"another pin or annotation of '{target}' is being written",
                                      "try again in a minute") from None
                time.sleep(0.2)
        yield


def change_holds(policy: Policy, repo: Repository, keyring: Keyring, target: str, backup_id: str, event_type: str,
                 details: dict[str, Any], trigger: dict[str, str]) -> Holds:
    """One change (pin, unpin, annotate), under the target's holds lock: the next sequence, the document written
    sealed, then the audit event naming the sequence and the change."""
    with _locked(repo, target):
        holds = load_holds(policy, repo, keyring, target)
        holds.sequence += 1
        holds.problem = None
        if event_type == "backup_pinned":
            holds.pins[backup_id] = Pin.from_json(backup_id, details)
        elif event_type == "backup_unpinned":
            holds.pins.pop(backup_id, None)
        elif details.get("text"):
            holds.notes[backup_id] = str(details["text"])
        else:
            holds.notes.pop(backup_id, None)
        write_document(repo, keyring, HOLDS_KIND, holds_key(target), holds.to_document())
        record(policy, repo, event_type, backup_id, "success", {**details, "sequence": holds.sequence}, trigger)
    return holds


def pin_details(reason: str, until: datetime | None) -> dict[str, Any]:
    return Pin("", reason, datetime.now(UTC), until).to_json()
