"""Off-site copies: every backup, as stored (still encrypted), in a second repository, verified there.

The second repository is another bucket (and region) or another path: `offsite` in the policy, with the
same settings as `repository` (its own Object Lock included). A copy is verified by reading every object
back from the second repository and comparing its SHA-256 with the manifest's `stored_sha256`; the
manifest must be byte-for-byte the primary's. `sync_backup` copies only what is missing or different, so
it is also the repair after the second repository was unreachable. Nothing here needs the keys.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

from .errors import IntegrityError, ObjectLockedError, RegalError
from .layout import CHECKS_NAME, GDPR_LEDGER, REPOSITORY_MARKER, backup_prefix, manifest_key
from .manifest import Manifest
from .pipeline import CHUNK
from .storage import Repository


@dataclass(frozen=True)
class CopyProblem:
    key: str
    problem: str  # "missing", "N bytes, the manifest says M", "different bytes"


def _stored_sha256(repo: Repository, key: str) -> str:
    digest = hashlib.sha256()
    with repo.reader(key) as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def compare_copy(primary: Repository, secondary: Repository, manifest: Manifest) -> list[CopyProblem]:
    """What is missing or different in the second repository (every byte there is read)."""
    problems = []
    key = manifest_key(manifest.target, manifest.backup_id)
    if secondary.size(key) is None:
        problems.append(CopyProblem(key, "missing"))
    elif secondary.get_bytes(key) != primary.get_bytes(key):
        problems.append(CopyProblem(key, "different bytes"))
    for record in manifest.objects:
        size = secondary.size(record.key)
        if size is None:
            problems.append(CopyProblem(record.key, "missing"))
        elif size != record.size:
            problems.append(CopyProblem(record.key, f"{size} bytes, the manifest says {record.size}"))
        elif _stored_sha256(secondary, record.key) != record.stored_sha256:
            problems.append(CopyProblem(record.key, "different bytes"))
    return problems


def _copy_object(primary: Repository, secondary: Repository, key: str, expected_sha256: str,
                 manifest: Manifest, source_name: str = "primary") -> None:
    digest = hashlib.sha256()
    with primary.reader(key) as source, secondary.writer(key, manifest.retain_until) as target:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
            target.write(chunk)
        if digest.hexdigest() != expected_sha256:  # raising here aborts the write: nothing damaged is copied
            raise IntegrityError(f"object {key} in the {source_name} repository differs from its manifest",
                                 f"verify the backup there; it cannot be copied from the {source_name} repository "
                                 "as it is")


def primary_damage(primary: Repository, manifest: Manifest) -> list[CopyProblem]:
    """What is missing or different in the primary repository against the manifest's stored SHA-256 (every byte
    there is read): damage `offsite repair` can mend from a good copy."""
    problems = []
    for record in manifest.objects:
        size = primary.size(record.key)
        if size is None:
            problems.append(CopyProblem(record.key, "missing"))
        elif size != record.size:
            problems.append(CopyProblem(record.key, f"{size} bytes, the manifest says {record.size}"))
        elif _stored_sha256(primary, record.key) != record.stored_sha256:
            problems.append(CopyProblem(record.key, "different bytes"))
    return problems


def copy_is_good(secondary: Repository, manifest: Manifest, keys: list[str]) -> bool:
    """Whether the off-site copy holds these objects of the backup as the manifest recorded them."""
    records = {r.key: r for r in manifest.objects}
    return all(secondary.size(k) == records[k].size and _stored_sha256(secondary, k) == records[k].stored_sha256
               for k in keys)


def repair_primary(primary: Repository, secondary: Repository, manifest: Manifest) -> list[str]:
    """Put back every damaged or missing object of the primary copy from the off-site one, each checked against
    the manifest's stored SHA-256 as it is copied (a damaged copy is refused, naming the object). The repaired keys."""
    records = {r.key: r for r in manifest.objects}
    damaged = [p.key for p in primary_damage(primary, manifest)]
    for key in damaged:
        _copy_object(secondary, primary, key, records[key].stored_sha256, manifest, "off-site")
    return damaged


def sync_backup(primary: Repository, secondary: Repository, manifest: Manifest) -> list[CopyProblem]:
    """Copy what the second repository lacks of a backup, then read it all back there.

    Objects first, the manifest last (as in a backup); objects under the backup's prefix there that the
    manifest does not name (left by a re-encryption) go. Returns what is still wrong (nothing, normally)."""
    records = {r.key: r for r in manifest.objects}
    mkey = manifest_key(manifest.target, manifest.backup_id)
    problems = compare_copy(primary, secondary, manifest)
    for problem in problems:
        if problem.key in records:
            _copy_object(primary, secondary, problem.key, records[problem.key].stored_sha256, manifest)
    if any(p.key == mkey for p in problems):
        secondary.put_bytes(mkey, primary.get_bytes(mkey), manifest.retain_until)
    named = {*records, mkey}
    for stored in list(secondary.list(backup_prefix(manifest.target, manifest.backup_id))):
        if stored.key not in named and not stored.key.endswith("/" + CHECKS_NAME):
            with contextlib.suppress(ObjectLockedError):  # locked there: prune removes it after its date
                secondary.delete(stored.key)
    return compare_copy(primary, secondary, manifest) if problems else []


def sync_repository_documents(primary: Repository, secondary: Repository) -> None:
    """What a restore from the copy needs besides the backups: the repository's marker and the GDPR erasure
    ledger (a restore re-applies its erasures), as stored, when the copy's differ."""
    for key in (REPOSITORY_MARKER, GDPR_LEDGER):
        if primary.size(key) is not None and (secondary.size(key) is None
                                              or secondary.get_bytes(key) != primary.get_bytes(key)):
            secondary.put_bytes(key, primary.get_bytes(key))


def copy_after_backup(primary: Repository, secondary: Repository | None, manifest: Manifest) -> str | None:
    """The copy a new backup gets. The backup stands whatever happens here: a problem is returned, for
    the caller to report, and the `offsite_copy` check keeps failing until a sync repairs it."""
    if secondary is None:
        return None
    try:
        sync_repository_documents(primary, secondary)
        problems = sync_backup(primary, secondary, manifest)
    except RegalError as exc:
        return f"the off-site copy of {manifest.backup_id} failed: {exc.message}"
    if problems:
        return f"the off-site copy of {manifest.backup_id} is incomplete: " + "; ".join(
            f"{p.key} {p.problem}" for p in problems[:3])
    return None
