"""Verifying a stored backup: the manifest holds, and every stored byte reads back as promised."""

from __future__ import annotations

from dataclasses import dataclass, field

from .crypto import Keyring
from .errors import IntegrityError, RegalError
from .manifest import Manifest
from .pipeline import Progress, read_stream
from .repository import Repository


@dataclass
class ObjectCheck:
    name: str
    key: str
    ok: bool
    detail: str


@dataclass
class VerifyResult:
    backup_id: str
    objects: list[ObjectCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.objects)

    @property
    def problems(self) -> list[str]:
        return [o.detail for o in self.objects if not o.ok]


def verify_backup(repo: Repository, keyring: Keyring, manifest: Manifest,
                  progress: Progress | None = None) -> VerifyResult:
    """Read every object in full: authenticate, decompress and compare both SHA-256 sums."""
    result = VerifyResult(manifest.backup_id)
    for record in manifest.objects:
        size = repo.size(record.key)
        if size is None:
            result.objects.append(ObjectCheck(record.name, record.key, False, f"object {record.key} is missing"))
            continue
        if size != record.size:
            result.objects.append(ObjectCheck(record.name, record.key, False,
                                              f"object {record.key} has {size} bytes, the manifest says {record.size}"))
            continue
        try:
            read_stream(repo, record, keyring=keyring, backup_id=manifest.backup_id, progress=progress)
        except (IntegrityError, RegalError) as exc:
            result.objects.append(ObjectCheck(record.name, record.key, False, exc.message))
            continue
        result.objects.append(ObjectCheck(record.name, record.key, True,
                                          f"{record.size} bytes authenticated, SHA-256 matches"))
    return result
