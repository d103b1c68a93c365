"""A backup's record of checks (`checks.json` next to its manifest, sealed) and what the repository says of it:
good, failed, unchecked or rolled_back. Reading it needs neither the checks themselves nor the object pipeline,
so that `list`, `status`, retention and the alerts start without them (engine/checks.py runs the checks)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from .crypto import Keyring
from .documents import seal, unseal
from .errors import IntegrityError
from .layout import checks_key
from .manifest import Manifest
from .outcomes import CheckOutcome, bounds_recovery, check_spec
from .record_sequence import KnownRecords, known_records
from .storage import Repository

CHECKS_KIND = "checks"


@dataclass
class CheckRecord:
    backup_id: str
    checked_at: datetime
    outcomes: list[CheckOutcome]
    trigger: dict[str, str] = field(default_factory=dict)  # dagster_run_id, or cli
    manifest_digest: str = ""  # the manifest these checks read (Manifest.fingerprint): another one is not checked
    sequence: int = 0  # its place in its target's records (0: written before records had one)
    previous: dict[str, Any] | None = None  # the key and sequence of the target's record before it

    @property
    def passed(self) -> bool:
        """Good: every check that decides it passed."""
        return all(o.passed for o in self.outcomes if check_spec(o.name).decides_good)

    def outcome(self, name: str) -> CheckOutcome | None:
        return next((o for o in self.outcomes if o.name == name), None)

    @property
    def recovery_bound(self) -> CheckOutcome | None:
        """A failed check that names what recovery cannot pass (a WAL segment): every point past it is
        unrecoverable, though the backup itself may be good (engine/recoverability.py)."""
        return next((o for o in self.outcomes if not o.passed and bounds_recovery(o.name)), None)

    @property
    def checks_recovery(self) -> bool:
        """Whether this record holds a check of what recovery passes through (the WAL archive)."""
        return any(bounds_recovery(o.name) for o in self.outcomes)

    def body(self) -> dict[str, Any]:
        return {"format": "regal-backup-checks", "version": 3, "backup_id": self.backup_id,
                "checked_at": self.checked_at.isoformat(), "passed": self.passed, "trigger": self.trigger,
                "manifest_digest": self.manifest_digest, "sequence": self.sequence, "previous": self.previous,
                "outcomes": [{**asdict(o), "severity": o.severity} for o in self.outcomes]}

    def to_bytes(self, keyring: Keyring) -> bytes:
        return seal(keyring, CHECKS_KIND, checks_key(self.backup_id), self.body())

    @classmethod
    def from_bytes(cls, data: bytes, keyring: Keyring, backup_id: str) -> CheckRecord:
        body = unseal(keyring, CHECKS_KIND, checks_key(backup_id), data)
        outcomes = [CheckOutcome(o["name"], o["passed"], o["description"], o.get("failing_object"),
                                 o.get("metadata", {}), o.get("level")) for o in body["outcomes"]]
        return cls(body["backup_id"], datetime.fromisoformat(body["checked_at"]), outcomes, body.get("trigger", {}),
                   body.get("manifest_digest", ""), int(body.get("sequence", 0)), body.get("previous"))


@dataclass(frozen=True)
class CheckStatus:
    """What the repository says of a backup's checks: good, failed, unchecked (never checked, checked in
    another version of its manifest, or a check record that fails authentication: `problem` says which), or
    rolled_back (an older record put back, or the record deleted: `problem` names it)."""

    status: str  # good | failed | unchecked | rolled_back
    record: CheckRecord | None = None
    problem: str | None = None

    @property
    def good(self) -> bool:
        return self.status == "good"


def check_status(repo: Repository, keyring: Keyring, manifest: Manifest,
                 known: KnownRecords | None = None) -> CheckStatus:
    """`known`: what the target's witnesses know (record_sequence.known_records, with the audit trail); None:
    the sealed record state alone is read."""
    key = checks_key(manifest.backup_id)
    known = known if known is not None else known_records(None, repo, keyring, manifest.target)
    if repo.size(key) is None:
        gone = known.check_rollback(manifest.backup_id, key, None)
        return CheckStatus("rolled_back", problem=gone) if gone else CheckStatus("unchecked")
    try:
        record = CheckRecord.from_bytes(repo.get_bytes(key), keyring, manifest.backup_id)
    except (IntegrityError, ValueError, KeyError, TypeError) as exc:
        problem = exc.message if isinstance(exc, IntegrityError) else f"{key} cannot be read"
        return CheckStatus("unchecked", problem=f"its check record is refused: {problem}")
    if rolled_back := known.check_rollback(manifest.backup_id, key, record.sequence):
        return CheckStatus("rolled_back", record, rolled_back)
    if not keyring.fingerprint_matches(record.manifest_digest, manifest.digest()):
        return CheckStatus("unchecked", record, f"{key} checked another version of its manifest")
    return CheckStatus("good" if record.passed else "failed", record)


def load_check_record(repo: Repository, keyring: Keyring, manifest: Manifest) -> CheckRecord | None:
    """The backup's check record when it authenticates and is about this manifest."""
    status = check_status(repo, keyring, manifest)
    return status.record if status.problem is None else None
