"""Reading what the repository holds: backups are the manifests that authenticate; every other backup
directory is reported as damaged, never hidden, except one prune is deleting: its sealed deletion mark
(`deleting.json`, written before anything is deleted and removed last) authenticates, and the next prune
finishes what a killed one left."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from .crypto import Keyring
from .documents import unseal
from .errors import IntegrityError, RegalError, UsageError
from .layout import (
    BACKUPS,
    DELETING_NAME,
    checks_key,
    deleting_key,
    is_manifest_key,
    manifest_key,
    split_backup_key,
    started_of,
    target_of,
    target_prefix,
    valid_backup_id,
)
from .manifest import Manifest
from .storage import Repository, StoredObject

DELETION_KIND = "backup-deletion"  # the sealed kind of prune's deletion mark


class ManifestCache:
    """Manifests already read and authenticated, by key and stored version (a file's mtime and inode, an S3 ETag,
    from the listing that found them): a reader that lists a target every minute (the Dagster sensors at hundreds
    of targets) reads and decrypts only the manifests written or rewritten since. An object whose listing carries
    no version is never served from here. Owned by the caller (the Dagster face keeps one per policy for its
    process); bounded by the manifests' stored bytes, the least recently used dropped first."""

    def __init__(self, max_bytes: int = 256 * 1024 * 1024):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str, str], tuple[Manifest, int]] = OrderedDict()
        self._bytes = 0
        self.hits = self.reads = 0

    def manifest(self, repo: Repository, keyring: Keyring, obj: StoredObject) -> Manifest:
        """The manifest stored as `obj`, authenticated when it was read (IntegrityError when it does not)."""
        entry = (repo.location, obj.key, obj.version)
        if obj.version and (found := self._entries.get(entry)) is not None:
            self._entries.move_to_end(entry)
            self.hits += 1
            return found[0]
        self.reads += 1
        manifest = Manifest.from_bytes(repo.get_bytes(obj.key), obj.key, keyring)
        if obj.version and obj.size <= self.max_bytes // 8:
            self._entries[entry] = (manifest, obj.size)
            self._bytes += obj.size
            while self._bytes > self.max_bytes:
                _, (_, size) = self._entries.popitem(last=False)
                self._bytes -= size
        return manifest


def read_manifest(repo: Repository, keyring: Keyring, obj: StoredObject) -> Manifest:
    """The manifest listed as `obj`: through the repository's manifest cache when it has one (with_cache)."""
    cache = getattr(repo, "manifest_cache", None)
    if isinstance(cache, ManifestCache):
        return cache.manifest(repo, keyring, obj)
    return Manifest.from_bytes(repo.get_bytes(obj.key), obj.key, keyring)


def being_deleted(repo: Repository, keyring: Keyring, target: str, backup_id: str) -> bool:
    """Whether prune marked the backup for deletion: its sealed deletion mark is there and authenticates.
    From then on it is not a backup (nobody restores or keeps it) and not damage either: the prune that
    wrote the mark, or the next one, deletes what is left (objects, then the manifest, then the mark). A mark
    that does not authenticate is no mark: it hides nothing."""
    key = deleting_key(target, backup_id)
    try:
        body = unseal(keyring, DELETION_KIND, key, repo.get_bytes(key))
    except RegalError:
        return False
    return body.get("backup_id") == backup_id


def _marked(repo: Repository, keyring: Keyring, target: str, backup_id: str, names: Collection[str]) -> bool:
    return deleting_key(target, backup_id) in names and being_deleted(repo, keyring, target, backup_id)


@dataclass(frozen=True)
class DamagedBackup:
    """A backup directory the repository holds but no reader may trust: its manifest fails authentication,
    or it completed (a check record, or the audit trail, says so) and its manifest is gone. Or, when
    `unfinished`, objects without a manifest and nothing to say the backup ever completed: interrupted or
    still running (prune removes those after its grace)."""

    target: str
    backup_id: str
    key: str  # the manifest's key
    problem: str
    stored_bytes: int  # what its objects take
    has_manifest: bool
    unfinished: bool = False


def list_backups(repo: Repository, keyring: Keyring, target: str | None = None, *,
                 completed: Collection[str] = ()) -> tuple[list[Manifest], list[DamagedBackup]]:
    """All backups (oldest first), and every backup directory that cannot be trusted, never hidden.
    `completed`: backup ids the audit trail saw complete (a missing manifest there is damage, not a crash)."""
    backups, damaged = [], []
    for (name, backup_id), stored in _backup_directories(repo, target).items():
        key = manifest_key(name, backup_id)
        names = {o.key for o in stored}
        size = sum(o.size for o in stored if o.key != key)
        if _marked(repo, keyring, name, backup_id, names):
            continue  # being deleted: neither a backup nor damage
        if key not in names:
            if checks_key(backup_id) in names or backup_id in completed:
                damaged.append(DamagedBackup(name, backup_id, key, "the backup completed but its manifest is gone "
                                             "(deleted?)", size, has_manifest=False))
            continue
        try:
            backups.append(read_manifest(repo, keyring, next(o for o in stored if o.key == key)))
        except IntegrityError as exc:
            damaged.append(DamagedBackup(name, backup_id, key, exc.message, size, has_manifest=True))
    backups.sort(key=lambda m: (m.started_at, m.backup_id))
    return backups, damaged


def unfinished_backups(repo: Repository, target: str | None = None, *,
                       completed: Collection[str] = ()) -> list[DamagedBackup]:
    """Backup directories with objects and no manifest, and nothing to say they ever completed: not backups.
    And those a killed prune was deleting (a deletion mark, not authenticated here: this only describes)."""
    found = []
    for (name, backup_id), stored in _backup_directories(repo, target).items():
        names = {o.key for o in stored}
        if deleting_key(name, backup_id) in names:
            found.append(DamagedBackup(name, backup_id, manifest_key(name, backup_id), "being deleted: an "
                                       "interrupted prune; the next prune finishes it", sum(o.size for o in stored),
                                       has_manifest=manifest_key(name, backup_id) in names, unfinished=True))
        elif (manifest_key(name, backup_id) not in names and checks_key(backup_id) not in names
                and backup_id not in completed):
            found.append(DamagedBackup(name, backup_id, manifest_key(name, backup_id), "no manifest: interrupted, "
                                       "or still running", sum(o.size for o in stored), has_manifest=False,
                                       unfinished=True))
    return found


def _backup_directories(repo: Repository, target: str | None) -> dict[tuple[str, str], list[StoredObject]]:
    """(target, backup id) -> the objects under that backup's prefix, from one listing."""
    found: dict[tuple[str, str], list[StoredObject]] = {}
    for obj in repo.list(target_prefix(target) if target else BACKUPS):
        if (parts := split_backup_key(obj.key)) is not None:
            found.setdefault(parts[:2], []).append(obj)
    return dict(sorted(found.items()))


def newest_first(repo: Repository, keyring: Keyring, target: str) -> Iterator[Manifest]:
    """A target's trustworthy backups, newest first, each manifest read only when the caller gets to it: one
    listing, then as many reads as the caller needs (the newest good backup: usually one or two), where
    `list_backups` reads them all. Backup ids carry their start to the second; within a second the
    manifests' own start times decide. Manifests that fail authentication are left out (list_backups
    reports them)."""
    by_second: dict[datetime, list[StoredObject]] = {}
    marked: set[str] = set()  # backup ids with a deletion mark
    for obj in repo.list(target_prefix(target)):
        if is_manifest_key(obj.key):
            started = started_of(obj.key.split("/")[-2]) or datetime.min.replace(tzinfo=UTC)
            by_second.setdefault(started, []).append(obj)
        elif obj.key.endswith("/" + DELETING_NAME):
            marked.add(obj.key.split("/")[-2])
    for second in sorted(by_second, reverse=True):
        same_second = []
        for obj in by_second[second]:
            backup_id = obj.key.split("/")[-2]
            if backup_id in marked and being_deleted(repo, keyring, target, backup_id):
                continue
            with contextlib.suppress(IntegrityError):
                same_second.append(read_manifest(repo, keyring, obj))
        yield from sorted(same_second, key=lambda m: (m.started_at, m.backup_id), reverse=True)


def load_manifest(repo: Repository, keyring: Keyring, backup_id: str) -> Manifest:
    if not valid_backup_id(backup_id):
        raise UsageError(f"'{backup_id}' is not a backup id", "backup ids look like main-20261124T020000Z-a1b2c3; "
                                                              "run `regal-backup list` to see them")
    key = manifest_key(target_of(backup_id), backup_id)
    if repo.size(key) is None:
        raise UsageError(f"no backup {backup_id} in {repo.location}", "run `regal-backup list` to see the backups")
    if being_deleted(repo, keyring, target_of(backup_id), backup_id):
        raise UsageError(f"backup {backup_id} is being deleted by prune (an interrupted prune: the next one "
                         "finishes it)", "run `regal-backup list` to see the backups")
    return Manifest.from_bytes(repo.get_bytes(key), key, keyring)
