"""Reading what the repository holds: backups are the manifests; nothing else counts."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from .errors import IntegrityError, RegalError
from .layout import BACKUPS, is_manifest_key, manifest_key, started_of, target_of, target_prefix
from .manifest import Manifest
from .storage import Repository


@dataclass(frozen=True)
class DamagedManifest:
    key: str
    problem: str


def list_backups(repo: Repository, target: str | None = None) -> tuple[list[Manifest], list[DamagedManifest]]:
    """All backups (oldest first) and the manifests that could not be read."""
    prefix = target_prefix(target) if target else BACKUPS
    backups, damaged = [], []
    for obj in repo.list(prefix):
        if not is_manifest_key(obj.key):
            continue
        try:
            backups.append(Manifest.from_bytes(repo.get_bytes(obj.key), obj.key))
        except IntegrityError as exc:
            damaged.append(DamagedManifest(obj.key, exc.message))
    backups.sort(key=lambda m: (m.started_at, m.backup_id))
    return backups, damaged


def newest_first(repo: Repository, target: str) -> Iterator[Manifest]:
    """A target's readable backups, newest first, each manifest read only when the caller gets to it: one
    listing, then as many reads as the caller needs (the newest good backup: usually one or two), where
    `list_backups` reads them all. Backup ids carry their start to the second; within a second the
    manifests' own start times decide."""
    by_second: dict[datetime, list[str]] = {}
    for obj in repo.list(target_prefix(target)):
        if is_manifest_key(obj.key):
            started = started_of(obj.key.split("/")[-2]) or datetime.min.replace(tzinfo=UTC)
            by_second.setdefault(started, []).append(obj.key)
    for second in sorted(by_second, reverse=True):
        same_second = []
        for key in by_second[second]:
            with contextlib.suppress(IntegrityError):  # list_backups reports damaged manifests
                same_second.append(Manifest.from_bytes(repo.get_bytes(key), key))
        yield from sorted(same_second, key=lambda m: (m.started_at, m.backup_id), reverse=True)


def load_manifest(repo: Repository, backup_id: str) -> Manifest:
    key = manifest_key(target_of(backup_id), backup_id)
    if repo.size(key) is None:
        raise RegalError(f"no backup {backup_id} in {repo.location}", "run `regal-backup list` to see the backups")
    return Manifest.from_bytes(repo.get_bytes(key), key)


def choose_backup(repo: Repository, target: str, *, backup_id: str | None = None, latest: bool = False,
                  before: datetime | None = None) -> Manifest:
    """The backup a restore asks for: by id, the newest, or the newest started before a time."""
    if backup_id:
        return load_manifest(repo, backup_id)
    chosen = next((m for m in newest_first(repo, target) if before is None or m.started_at < before), None)
    if chosen is None or not (latest or before):
        when = f" before {before.isoformat()}" if before else ""
        raise RegalError(f"no backup of '{target}'{when} in {repo.location}", "run `regal-backup list` to see the backups")
    return chosen
