"""The WAL archive of `postgres_cluster` targets: every WAL file through the one write path, each with a sealed
record written last; read back authenticated for recovery; listed for status and continuity.

`push` is what PostgreSQL's archive_command runs (and what `wal stream` calls for each completed file):
pushing a file that is already archived with the same content succeeds, with other content it is refused
(two servers archiving into one target, or a restored server that kept the old archive_command).
`get` is what restore_command runs: it exits non-zero when the file is not archived, so that recovery
ends at the end of the archive. The newest snapshot of the segment `wal stream` is receiving is served
under the segment's own name when the complete segment is not archived (the last WAL recovery replays).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ...crypto import Keyring
from ...documents import read_document, write_document
from ...errors import IntegrityError, RegalError, UsageError
from ...layout import (
    PARTIAL_SUFFIX,
    WAL_PARTIAL,
    WAL_RECORD_SUFFIX,
    is_wal_segment,
    valid_wal_name,
    wal_object_key,
    wal_partial_key,
    wal_prefix,
    wal_record_key,
    wal_scope,
)
from ...manifest import ObjectRecord
from ...pipeline import CHUNK, read_stream, store_stream
from ...policy import Policy
from ...storage import Repository
from ...storage.base import ObjectMissingError

RECORD_KIND = "wal"
RECORD_FORMAT = "regal-backup-wal-record"
WAL_CONTENT = {"segment": "PostgreSQL WAL segment", "history": "PostgreSQL timeline history file",
               "backup": "PostgreSQL backup history label", "partial": "PostgreSQL WAL segment being received "
                                                                      "(snapshot of its first bytes)"}


class WalMissingError(RegalError):
    """The WAL file is not in the repository (restore_command: recovery ends here)."""


class RecoveryMustStopError(RegalError):
    """`wal get` as PostgreSQL's restore_command could not serve a WAL file that may be archived (it fails
    authentication, the repository is unreachable): an exit status above 125 makes PostgreSQL stop recovery
    with a FATAL error instead of taking the failure for the end of the archive and promoting early."""

    exit_code = 126

    @classmethod
    def because(cls, message: str, hint: str | None) -> RecoveryMustStopError:
        return cls(f"{message} (recovery stops here rather than end early and promote)", hint)


def cluster_target(policy: Policy, name: str | None) -> str:
    """The postgres_cluster target `name`, or the policy's only one when no name is given."""
    if name:
        if policy.target(name).kind != "postgres_cluster":
            raise UsageError(f"target {name} is not a postgres_cluster target",
                             "name a target of kind postgres_cluster (WAL belongs to a whole server)")
        return name
    clusters = sorted(n for n, t in policy.targets.items() if t.kind == "postgres_cluster")
    if len(clusters) != 1:
        raise UsageError("say which postgres_cluster target the WAL belongs to" if clusters else
                         "the policy has no postgres_cluster target",
                         f"add --target (one of {', '.join(clusters)})" if clusters else
                         "add a target with `kind: postgres_cluster` to the policy")
    return clusters[0]


def _kind_of(name: str) -> str:
    return "history" if name.endswith(".history") else "backup" if name.endswith(".backup") else "segment"


@dataclass
class WalFile:
    """One archived WAL file as its sealed record describes it."""

    name: str
    record: ObjectRecord
    archived_at: datetime
    partial: bool = False
    segment_size: int = 0  # a partial snapshot: the size of the whole segment
    used_bytes: int = 0  # a partial snapshot: how far it holds WAL (pg_receivewal pads the rest with zeros)

    @property
    def is_segment(self) -> bool:
        return is_wal_segment(self.name)


def _record_body(target: str, name: str, record: ObjectRecord, partial: bool, segment_size: int,
                 used_bytes: int) -> dict[str, Any]:
    return {"format": RECORD_FORMAT, "version": 1, "target": target, "name": name, "partial": partial,
            "segment_size": segment_size, "used_bytes": used_bytes, "archived_at": datetime.now(UTC).isoformat(),
            "object": record.model_dump(mode="json")}


def _load_record(repo: Repository, keyring: Keyring, key: str) -> WalFile | None:
    try:
        body = read_document(repo, keyring, RECORD_KIND, key)
    except ObjectMissingError:
        return None
    if body.get("format") != RECORD_FORMAT:
        raise IntegrityError(f"{key} is not a WAL record", "do not trust it; investigate who wrote it")
    return WalFile(str(body["name"]), ObjectRecord.model_validate(body["object"]),
                   datetime.fromisoformat(body["archived_at"]), bool(body.get("partial")),
                   int(body.get("segment_size") or 0), int(body.get("used_bytes") or 0))


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    for chunk in _file_chunks(path):
        digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Pushed:
    name: str
    already: bool  # it was archived before with the same content
    plaintext_bytes: int
    stored_bytes: int


def push_wal(policy: Policy, repo: Repository, keyring: Keyring, target: str, path: Path, *,
             name: str | None = None, partial: bool = False, segment_size: int = 0) -> Pushed:
    """Archive one WAL file (name: the file's name in the archive, default the path's)."""
    name = name or path.name
    if not valid_wal_name(name):
        raise UsageError(f"{name} is not a WAL file name", "give the path PostgreSQL passes as %p (pg_wal/<segment>)")
    if partial and not is_wal_segment(name):
        raise UsageError(f"{name} is not a WAL segment name", "only a segment in progress has a snapshot")
    record_key = (wal_partial_key(target, name) if partial else wal_object_key(target, name)) + WAL_RECORD_SUFFIX
    # a snapshot is replaced often: each one is a new object, and its record (written last) switches to it, so a
    # stream killed between the two leaves the previous snapshot whole (never a record over another's object)
    object_key = f"{wal_partial_key(target, name)}.{time.time_ns():x}" if partial else wal_object_key(target, name)
    if not path.is_file():
        raise RegalError(f"{path} does not exist", "give the path PostgreSQL passes as %p")
    if not partial and (existing := _load_record(repo, keyring, record_key)) is not None:
        if keyring.fingerprint_matches(existing.record.plaintext_sha256, _sha256(path)):
            return Pushed(name, True, existing.record.plaintext_size, existing.record.size)
        raise RegalError(f"{name} is already archived for target {target} with other content",
                         "two servers archive into one target, or a restored server kept the old archive_command: "
                         "give each server its own postgres_cluster target")
    used = [0]

    def chunks() -> Iterator[bytes]:  # and where the data ends: a snapshot is padded with zeros
        offset = 0
        for chunk in _file_chunks(path):
            if (stripped := len(chunk.rstrip(b"\0"))) > 0:
                used[0] = offset + stripped
            offset += len(chunk)
            yield chunk

    # the object, then its record: a reader never sees a record whose object is not complete
    record = store_stream(repo, object_key, chunks(), keyring=keyring, backup_id=wal_scope(target),
                          object_name=(WAL_PARTIAL + name) if partial else name,
                          content=WAL_CONTENT["partial" if partial else _kind_of(name)],
                          compression=policy.compression)
    write_document(repo, keyring, RECORD_KIND, record_key, _record_body(target, name, record, partial, segment_size,
                                                                       used[0]))
    if partial:
        remove_snapshot(repo, target, name, keep=object_key)
    return Pushed(name, False, record.plaintext_size, record.size)


SNAPSHOT_READS = 3  # a snapshot replaced while it was read is read again, at most this often


def fetch_wal(repo: Repository, keyring: Keyring, target: str, name: str, destination: Path, *,
              allow_partial: bool = True) -> WalFile:
    """One archived WAL file, authenticated, at `destination` (it appears only complete). A segment not
    archived whole is served from the newest snapshot of it being received, when there is one."""
    if not valid_wal_name(name):
        raise UsageError(f"{name} is not a WAL file name", "give the file name PostgreSQL passes as %f")
    for attempt in range(SNAPSHOT_READS):
        found = _load_record(repo, keyring, wal_record_key(target, name))
        if found is None and allow_partial and is_wal_segment(name):
            found = _load_record(repo, keyring, wal_partial_key(target, name) + WAL_RECORD_SUFFIX)
        if found is None:
            raise WalMissingError(f"{name} is not in the WAL archive of target {target}",
                                  "none: recovery ends at the end of the archive")
        try:
            _write_wal(repo, keyring, target, found, destination)
            return found
        except (ObjectMissingError, IntegrityError):
            if not found.partial or attempt + 1 == SNAPSHOT_READS:
                raise  # a snapshot is replaced by the stream now and then (a new object, then its record,
                # then the old object goes): the newest record is read again
    raise AssertionError("unreachable")


def _write_wal(repo: Repository, keyring: Keyring, target: str, found: WalFile, destination: Path) -> None:
    scratch = destination.with_name(destination.name + PARTIAL_SUFFIX)
    try:
        with scratch.open("wb") as f:
            read_stream(repo, found.record, keyring=keyring, backup_id=wal_scope(target), sink=f.write)
            if found.partial:  # a segment has its full size: the rest is zeros, as in pg_receivewal's .partial
                f.truncate(max(found.record.plaintext_size, found.segment_size))
        scratch.replace(destination)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise


def list_wal(repo: Repository, keyring: Keyring, target: str) -> list[WalFile]:
    """Every archived WAL file of the target (sealed records authenticated), partial snapshots last."""
    files: list[WalFile] = []
    for stored in repo.list(wal_prefix(target)):
        if stored.key.endswith(WAL_RECORD_SUFFIX):
            found = _load_record(repo, keyring, stored.key)
            if found is not None:
                files.append(found)
    return sorted(files, key=lambda f: (f.partial, f.name))


def archived_names(repo: Repository, target: str) -> set[str]:
    """The names of archived WAL files (by their records' keys: cheap, not authenticated)."""
    prefix = wal_prefix(target)
    return {stored.key[len(prefix):-len(WAL_RECORD_SUFFIX)] for stored in repo.list(prefix)
            if stored.key.endswith(WAL_RECORD_SUFFIX) and not stored.key[len(prefix):].startswith(WAL_PARTIAL)}


def partial_names(repo: Repository, target: str) -> set[str]:
    """The segments of which a snapshot (of the segment being received) is stored."""
    prefix = wal_prefix(target) + WAL_PARTIAL
    return {stored.key[len(prefix):-len(WAL_RECORD_SUFFIX)] for stored in repo.list(prefix)
            if stored.key.endswith(WAL_RECORD_SUFFIX)}


# --- WAL positions ------------------------------------------------------------------------------------

def parse_lsn(text: str) -> int:
    try:
        high, low = text.strip().split("/")
        return (int(high, 16) << 32) | int(low, 16)
    except ValueError:
        raise UsageError(f"{text!r} is not a WAL position", "write it as PostgreSQL does, e.g. 0/3000148") from None


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def segment_name(timeline: int, lsn: int, segment_size: int) -> str:
    """The WAL segment holding `lsn` on `timeline` (as pg_walfile_name)."""
    number = lsn // segment_size
    per_id = 0x100000000 // segment_size
    return f"{timeline:08X}{number // per_id:08X}{number % per_id:08X}"


def segment_number(name: str, segment_size: int) -> tuple[int, int]:
    """(timeline, segment number) of a segment name."""
    per_id = 0x100000000 // segment_size
    return int(name[:8], 16), int(name[8:16], 16) * per_id + int(name[16:24], 16)


def segment_name_of(timeline: int, number: int, segment_size: int) -> str:
    per_id = 0x100000000 // segment_size
    return f"{timeline:08X}{number // per_id:08X}{number % per_id:08X}"


def missing_segments(names: set[str], timeline: int, start_lsn: int, segment_size: int,
                     end_number: int | None = None) -> tuple[list[str], int]:
    """The segments missing between the one holding `start_lsn` and the newest archived one (on the backup's
    timeline or a later one, whichever holds each number), and that newest number."""
    by_number: dict[int, int] = {}
    for name in names:
        if is_wal_segment(name):
            tli, number = segment_number(name, segment_size)
            if tli >= timeline:
                by_number[number] = max(by_number.get(number, 0), tli)
    first = start_lsn // segment_size
    newest = end_number if end_number is not None else max(by_number, default=first - 1)
    missing = [segment_name_of(timeline, n, segment_size) for n in range(first, newest + 1) if n not in by_number]
    if newest < first:  # not even the backup's first segment is archived
        missing = [segment_name_of(timeline, first, segment_size)]
    return missing, newest


def remove_snapshot(repo: Repository, target: str, segment: str, *, keep: str | None = None) -> None:
    """The snapshot of `segment` (its record first: a reader never finds a record without its object); with
    `keep`, only the objects of older snapshots (or of one a killed stream stored without its record)."""
    key = wal_partial_key(target, segment)
    if keep is None:
        repo.delete(key + WAL_RECORD_SUFFIX)
    for stored in list(repo.list(wal_prefix(target) + WAL_PARTIAL)):
        if stored.key.startswith(key) and stored.key not in (keep, key + WAL_RECORD_SUFFIX):
            repo.delete(stored.key)


def remove_wal(repo: Repository, target: str, name: str) -> None:
    """One archived WAL file and its record (retention): the record first, so it is never half there."""
    for key in (wal_record_key(target, name), wal_object_key(target, name)):
        repo.delete(key)


def prune_wal(repo: Repository, keyring: Keyring, target: str, kept: set[str], *, dry_run: bool) -> int | None:
    """The WAL older than the start of the oldest base backup retention keeps (`kept`): no restore can replay it;
    how many files (a dry run: would be) removed. With no base backup kept, all WAL stays (None). Timeline history
    files always stay (tiny, and recovery follows them)."""
    from ...catalog import newest_first

    oldest = None
    for manifest in newest_first(repo, keyring, target):
        if manifest.backup_id in kept:
            oldest = manifest
    if oldest is None:
        return None
    size = int(oldest.source["wal_segment_size"])
    first = parse_lsn(oldest.source["start_lsn"]) // size
    prefix = wal_prefix(target)
    doomed: list[tuple[str, bool]] = []
    for stored in repo.list(prefix):
        if not stored.key.endswith(WAL_RECORD_SUFFIX):
            continue
        name = stored.key[len(prefix):-len(WAL_RECORD_SUFFIX)]
        partial = name.startswith(WAL_PARTIAL)
        name = name.removeprefix(WAL_PARTIAL)
        if len(name) >= 24 and all(c in "0123456789ABCDEF" for c in name[:24]) and \
                segment_number(name[:24], size)[1] < first:
            doomed.append((name, partial))
    if not dry_run:
        for name, partial in doomed:
            if partial:
                remove_snapshot(repo, target, name)
            else:
                remove_wal(repo, target, name)
    return len(doomed)
