"""Verifying a stored backup: the manifest holds, and every stored byte reads back as promised."""

from __future__ import annotations

import math
import random
import secrets
import threading
from collections.abc import Collection
from dataclasses import dataclass, field

from .crypto import Keyring
from .errors import IntegrityError, RegalError
from .layout import backup_prefix
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


@dataclass(frozen=True)
class ReadSample:
    """A deep read of a random share of a backup's objects (as `restic check --read-data-subset`): `percent` of
    them, at least one, drawn reproducibly from `seed` and the backup id; the others are checked for presence and
    size only. Recorded in the check record and the audit trail, so the draw can be repeated and checked."""

    percent: float
    seed: str

    METHOD = "random.Random(f'{seed}:{backup_id}').sample(sorted object keys, ceil(n * percent / 100))"

    @classmethod
    def parse(cls, text: str, seed: str | None) -> ReadSample:
        """`--sample 10%` (or 10): ValueError naming what is wrong."""
        try:
            percent = float(text.strip().removesuffix("%"))
        except ValueError:
            raise ValueError(f"{text!r} is not a percentage") from None
        if not 0 < percent <= 100:
            raise ValueError(f"{text!r} is not a percentage above 0 and at most 100")
        return cls(percent, seed or secrets.token_hex(8))

    def choose(self, manifest: Manifest) -> list[str]:
        """The keys of the objects read in full, sorted."""
        keys = sorted(r.key for r in manifest.objects)
        count = min(len(keys), max(1, math.ceil(len(keys) * self.percent / 100))) if keys else 0
        return sorted(random.Random(f"{self.seed}:{manifest.backup_id}").sample(keys, count))

    def to_json(self, chosen: Collection[str], total: int) -> dict[str, object]:
        return {"percent": self.percent, "seed": self.seed, "method": self.METHOD, "objects_read": len(chosen),
                "objects_total": total, "read": sorted(chosen)}


def verify_backup(repo: Repository, keyring: Keyring, manifest: Manifest, *, jobs: int | None = None,
                  progress: Progress | None = None, only: Collection[str] | None = None) -> VerifyResult:
    """Read every object in full, `jobs` at a time: authenticate, decompress and compare both SHA-256 sums.
    `only`: read just these objects in full (a sample); the others are checked for presence and size."""
    sizes = stored_sizes(repo, manifest)

    def check_object(record: ObjectRecord, cancelled: threading.Event) -> ObjectCheck:
        if absent := presence_problem(record, sizes[record.key]):
            return ObjectCheck(record.name, record.key, False, absent)
        if only is not None and record.key not in only:
            return ObjectCheck(record.name, record.key, True, f"{record.size} bytes present (not in the sample)")
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


def stored_sizes(repo: Repository, manifest: Manifest) -> dict[str, int | None]:
    """The size the repository has for every object of a backup (None: missing): its folder listed once
    (one request per 1,000 objects on S3, not one per object)."""
    prefix = backup_prefix(manifest.target, manifest.backup_id)
    listed = {stored.key: stored.size for stored in repo.list(prefix)}
    return {r.key: listed.get(r.key) if r.key.startswith(prefix) else repo.size(r.key) for r in manifest.objects}


def presence_problem(record: ObjectRecord, size: int | None) -> str | None:
    """Why an object cannot be what its manifest recorded without reading it: missing, or another size."""
    if size is None:
        return f"object {record.key} is missing"
    if size != record.size:
        return f"object {record.key} has {size} bytes, the manifest says {record.size}"
    return None


def absent_objects(repo: Repository, manifest: Manifest) -> list[str]:
    """Every object of a backup that is missing or has another size than recorded: the cheap first look a
    restore takes before changing anything (it authenticates every byte as it loads)."""
    sizes = stored_sizes(repo, manifest)
    return [problem for record in manifest.objects if (problem := presence_problem(record, sizes[record.key]))]
