"""Reading what the repository holds: backups are the manifests; nothing else counts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .errors import IntegrityError, RegalError
from .manifest import MANIFEST_NAME, Manifest, manifest_key, target_of
from .repository import Repository


@dataclass(frozen=True)
class DamagedManifest:
    key: str
    problem: str


def list_backups(repo: Repository, target: str | None = None) -> tuple[list[Manifest], list[DamagedManifest]]:
    """All backups (oldest first) and the manifests that could not be read."""
    prefix = f"backups/{target}/" if target else "backups/"
    backups, damaged = [], []
    for obj in repo.list(prefix):
        if not obj.key.endswith("/" + MANIFEST_NAME):
            continue
        try:
            backups.append(Manifest.from_bytes(repo.get_bytes(obj.key), obj.key))
        except IntegrityError as exc:
            damaged.append(DamagedManifest(obj.key, exc.message))
    backups.sort(key=lambda m: (m.started_at, m.backup_id))
    return backups, damaged


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
    backups, _ = list_backups(repo, target)
    if before is not None:
        backups = [m for m in backups if m.started_at < before]
    if not backups or not (latest or before):
        when = f" before {before.isoformat()}" if before else ""
        raise RegalError(f"no backup of '{target}'{when} in {repo.location}", "run `regal-backup list` to see the backups")
    return backups[-1]
