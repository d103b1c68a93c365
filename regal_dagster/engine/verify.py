"""Verifying a stored backup: the manifest holds, and every stored byte reads back as promised."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .crypto import Keyring
from .errors import IntegrityError, RegalError
from .manifest import Manifest, ObjectRecord
from .parallel import check, map_parallel
from .pipeline import Progress, read_stream
from .settings import default_jobs
from .storage import Repository


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


def verify_backup(repo: Repository, keyring: Keyring, manifest: Manifest, *, jobs: int | None = None,
                  progress: Progress | None = None) -> VerifyResult:
    """Read every object in full, `jobs` at a time: authenticate, decompress and compare both SHA-256 sums."""
    def check_object(record: ObjectRecord, cancelled: threading.Event) -> ObjectCheck:
        size = repo.size(record.key)
        if size is None:
            return ObjectCheck(record.name, record.key, False, f"object {record.key} is missing")
        if size != record.size:
            return ObjectCheck(record.name, record.key, False,
                               f"object {record.key} has {size} bytes, the manifest says {record.size}")
        try:
            read_stream(repo, record, keyring=keyring, backup_id=manifest.backup_id,
                        sink=lambda _chunk: check(cancelled), progress=progress)
        except (IntegrityError, RegalError) as exc:
            return ObjectCheck(record.name, record.key, False, exc.message)
        return ObjectCheck(record.name, record.key, True, f"{record.size} bytes authenticated, SHA-256 matches")

    biggest_first = sorted(manifest.objects, key=lambda r: -r.size)
    jobs = jobs or default_jobs()
    checks = {c.key: c for c in map_parallel(check_object, biggest_first, jobs, "verify")}
    return VerifyResult(manifest.backup_id, [checks[r.key] for r in manifest.objects])
