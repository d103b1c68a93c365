"""The repository layout: every path prefix and name the engine writes, in one place.

Keys are '/'-separated and relative to the repository root; docs/formats.md shows the tree. A backup
lives under `backups/<target>/<backup id>/`; everything else the repository holds (locks, the audit
spool and checkpoints, the GDPR ledger, restore-test and drill records, prune logs, reports) has its
own top-level prefix here.
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime

REPOSITORY_MARKER = "regal-repository.json"
PARTIAL_SUFFIX = ".partial"  # an object being written (local repositories): never listed, swept by prune

BACKUPS = "backups/"
MANIFEST_NAME = "manifest.json"
CHECKS_NAME = "checks.json"  # the outcome of a backup's checks, next to its manifest
DELETING_NAME = "deleting.json"  # prune's sealed mark: the backup is being deleted (written first, removed last)

LOCKS = "locks/"
KEYS_LOCK = "keys"  # key rotation and retirement; prune's sweep waits for a re-encryption
LEDGER_LOCK = "gdpr-ledger"  # recording an erasure
AUDIT_SPOOL = "audit/spool/"
AUDIT_CHECKPOINTS = "audit/checkpoints/"
GDPR_LEDGER = "gdpr/erasure-ledger"
RESTORE_TESTS = "restore-tests/"
RESTORE_TEST_KIND = "restore-test"  # the sealed kind of a restore test's record (engine/restore_test.py)
RESTORE_SAMPLES = "restore-tests/samples/"
DRILLS = "drills/"
DRILL_KIND = "drill"  # the sealed kind of a drill's record (engine/drill.py)
PRUNE_LOGS = "prune/"
COMPLIANCE_REPORTS = "compliance-reports/"
RECORD_STATE = "records/"  # the sealed record state of each target (engine/record_sequence.py)
HOLDS = "holds/"  # the legal holds (pins) and annotations of each target's backups (engine/holds.py)


def stamp(when: datetime) -> str:
    """A UTC time as it appears in keys: sorts as text in time order, to the microsecond."""
    return f"{when.astimezone(UTC):%Y%m%dT%H%M%S.%fZ}"


# --- backups -----------------------------------------------------------------------------------------

def target_prefix(target: str) -> str:
    return f"{BACKUPS}{target}/"


def backup_prefix(target: str, backup_id: str) -> str:
    return f"{BACKUPS}{target}/{backup_id}/"


def manifest_key(target: str, backup_id: str) -> str:
    return backup_prefix(target, backup_id) + MANIFEST_NAME


def checks_key(backup_id: str) -> str:
    return backup_prefix(target_of(backup_id), backup_id) + CHECKS_NAME


def deleting_key(target: str, backup_id: str) -> str:
    return backup_prefix(target, backup_id) + DELETING_NAME


def is_manifest_key(key: str) -> bool:
    return key.startswith(BACKUPS) and key.endswith("/" + MANIFEST_NAME)


def split_backup_key(key: str) -> tuple[str, str, str] | None:
    """(target, backup id, object name) of a key under backups/, or None for any other key."""
    parts = key.split("/", 3)
    if len(parts) < 4 or parts[0] + "/" != BACKUPS:
        return None
    return parts[1], parts[2], parts[3]


def new_backup_id(target: str, started_at: datetime) -> str:
    """`<target>-<UTC time>-<random>`: sorts by time within a target; target names have no '-'."""
    return f"{target}-{started_at.astimezone(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


_BACKUP_ID = re.compile(r"[a-z][a-z0-9_]{0,62}-\d{8}T\d{6}Z-[0-9a-f]{6}")


def valid_backup_id(backup_id: str) -> bool:
    """A name shaped like a backup id (so it can never name a path outside its backup's directory)."""
    return _BACKUP_ID.fullmatch(backup_id) is not None


def target_of(backup_id: str) -> str:
    return backup_id.split("-", 1)[0]


def started_of(backup_id: str) -> datetime | None:
    """The start time a backup id carries (None for a name that is not a backup id)."""
    try:
        return datetime.strptime(backup_id.split("-")[1], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except (IndexError, ValueError):
        return None


# --- everything else -----------------------------------------------------------------------------------

def lock_key(name: str, suffix: str) -> str:
    return f"{LOCKS}{name}{suffix}"


def audit_spool_key(at: datetime, unique: str) -> str:
    return f"{AUDIT_SPOOL}{stamp(at)}-{unique}.json"


def audit_checkpoint_key(seq: int) -> str:
    return f"{AUDIT_CHECKPOINTS}{seq:012d}.json"


def restore_test_prefix(target: str) -> str:
    return f"{RESTORE_TESTS}{target}/"


def restore_test_key(target: str, tested_at: datetime, backup_id: str) -> str:
    return f"{restore_test_prefix(target)}{stamp(tested_at)}-{backup_id}.json"


def record_state_key(target: str) -> str:
    return f"{RECORD_STATE}{target}.json"


def holds_key(target: str) -> str:
    return f"{HOLDS}{target}.json"


def records_lock_name(target: str) -> str:
    """The lock under which a target's next check or restore-test record takes its sequence."""
    return f"records-{target}"


def restore_sample_key(month: str) -> str:
    return f"{RESTORE_SAMPLES}{month}.json"


def drill_key(drill_id: str) -> str:
    return f"{DRILLS}{drill_id}.json"


def prune_log_key(at: datetime) -> str:
    return f"{PRUNE_LOGS}{stamp(at)}.json"


def report_key(period: str, report_id: str) -> str:
    return f"{COMPLIANCE_REPORTS}{period}/{report_id}.pdf"


def report_oscal_key(period: str, report_id: str) -> str:
    """The report's results as OSCAL Assessment Results JSON, next to its PDF."""
    return f"{COMPLIANCE_REPORTS}{period}/{report_id}.oscal-ar.json"


# --- the WAL archive of postgres_cluster targets ------------------------------------------------------
# wal/<target>/<file>       one archived WAL file (a segment, a timeline's .history, a .backup label),
#                           encrypted through the pipeline like any backup object
# wal/<target>/<file>.json  its sealed record (sizes and SHA-256 sums): written last, a file without one
#                           is not archived (as a backup without a manifest)
# wal/<target>/partial/<segment>.json     the record of the newest snapshot of the segment `wal stream` is receiving;
# wal/<target>/partial/<segment>.<ns hex> its object (each snapshot a new one: the record, written last, switches)

WAL = "wal/"
WAL_RECORD_SUFFIX = ".json"
WAL_PARTIAL = "partial/"

_WAL_FILE = re.compile(r"[0-9A-F]{24}|[0-9A-F]{24}\.[0-9A-F]{8}\.backup|[0-9A-F]{8}\.history")
_WAL_SEGMENT = re.compile(r"[0-9A-F]{24}")


def valid_wal_name(name: str) -> bool:
    """A file name PostgreSQL archives: a segment, a backup history label or a timeline history file."""
    return _WAL_FILE.fullmatch(name) is not None


def is_wal_segment(name: str) -> bool:
    return _WAL_SEGMENT.fullmatch(name) is not None


def wal_prefix(target: str) -> str:
    return f"{WAL}{target}/"


def wal_object_key(target: str, name: str) -> str:
    return f"{wal_prefix(target)}{name}"


def wal_record_key(target: str, name: str) -> str:
    return wal_object_key(target, name) + WAL_RECORD_SUFFIX


def wal_partial_key(target: str, segment: str) -> str:
    return f"{wal_prefix(target)}{WAL_PARTIAL}{segment}"


def wal_scope(target: str) -> str:
    """What a WAL object's encryption is bound to (with its file name): the archive of this target."""
    return f"wal-{target}"
