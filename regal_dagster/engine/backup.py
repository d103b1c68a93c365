"""Taking a backup: lock, stream the source through the pipeline, write the manifest last, copy it off-site.

Whoever takes the backup (the CLI, a Dagster run, a test), the same things happen in the same order: the
target's lock, the kind's capture through the one write path, the manifest (a backup without one does
not exist), the audit event, and the off-site copy when the policy has an off-site repository.
"""

from __future__ import annotations

import contextlib
import getpass
import importlib.metadata
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from .audit import audited
from .crypto import Keyring, load_keyring
from .errors import RegalError
from .gdpr import load_ledger
from .layout import backup_prefix, manifest_key, new_backup_id
from .manifest import Manifest, ObjectRecord, keyed_facts
from .offsite import copy_after_backup
from .pipeline import Progress, store_stream
from .policy import Policy
from .repository_format import open_repository_format
from .retention_classes import RETENTION_CLASSES
from .sources.registry import source_for
from .storage import Repository, open_offsite, open_repository


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def tool_versions() -> dict[str, str]:
    return {"regal-backup": _version("regal-backup"), "python": platform.python_version(),
            "tink": _version("tink"), "zstandard": _version("zstandard")}


@dataclass
class BackupResult:
    manifest: Manifest
    offsite_problem: str | None = None  # what went wrong copying it off-site (None: copied and read back, or no copy)


ARCHIVE_WAIT_SECONDS = 60.0
"""How long a backup whose kind has a continuous archive waits for the archive to reach its end (a WAL stream
stores what the server wrote every few seconds): pgBackRest's archive-timeout."""


def run_backup(policy: Policy, target_name: str, retention_class: str = "hourly", *,
               repo: Repository | None = None, keyring: Keyring | None = None,
               trigger: dict[str, str] | None = None, progress: Progress | None = None,
               incremental: bool | None = None, started_at: datetime | None = None) -> BackupResult:
    """Back up one target. The backup exists once this returns; a failed off-site copy does not undo it.
    `incremental`: on top of the target's newest good backup (None: as the policy says for this class).
    `started_at`: when the backup counts as taken (default: now; tests run retention forward in time)."""
    if retention_class not in RETENTION_CLASSES:
        raise RegalError(f"unknown retention class '{retention_class}'", f"use one of {', '.join(RETENTION_CLASSES)}")
    target = policy.target(target_name)
    source = source_for(target.kind)
    keyring = keyring or load_keyring(policy)  # fail on key problems before touching anything
    repo = repo or open_repository(policy)
    repo.check_ready()
    open_repository_format(repo, keyring)  # only `regal-backup init` creates a repository
    settings = target.model_copy(update={"jobs": policy.jobs_for(target_name)})
    if incremental is None:
        incremental = incremental_by_policy(target, retention_class)
    with audited(policy, repo, "backup", target_name, trigger) as audit, repo.lock(target_name):
        keyring = keyring.reload()  # under the lock: a key retired meanwhile is never used, a new primary is
        ledger_revision = load_ledger(repo, keyring).revision
        real_start = datetime.now(UTC)
        started = started_at or real_start
        clock_offset = started - real_start
        backup_id = new_backup_id(target_name, started)
        prefix = backup_prefix(target_name, backup_id)
        audit.update(resource=backup_id, target=target_name, retention_class=retention_class)
        # whole seconds, rounded up: stores keep Object Lock dates to the second, and never shorter
        retain_until = (policy.retention.retain_until(retention_class, started) + timedelta(seconds=1)).replace(
            microsecond=0)
        lock = policy.repository.object_lock

        def store(name: str, content: str, chunks: Iterable[bytes], zstd_threads: int) -> ObjectRecord:
            return store_stream(repo, prefix + name, chunks, keyring=keyring, backup_id=backup_id,
                                object_name=name, content=content, compression=policy.compression,
                                zstd_threads=zstd_threads, progress=progress, retain_until=retain_until)

        try:
            with repo.backend.batched_durability():  # every object on disk before the manifest refers to it
                captured = (source.capture_incremental(policy, repo, keyring, target_name, settings, store)
                            if incremental else source.capture(settings, store))
            manifest = Manifest(
                backup_id=backup_id, target=target_name, kind=target.kind, retention_class=retention_class,
                retain_until=retain_until,
                started_at=started, finished_at=datetime.now(UTC) + clock_offset,
                tool_versions={**tool_versions(), **captured.tools}, source=keyed_facts(keyring, captured.facts),
                objects=captured.objects,
                trigger={"user": getpass.getuser(), "host": platform.node(), **(trigger or {})},
                ledger_revision=ledger_revision,
                object_lock={"mode": lock.mode, "retain_until": retain_until.isoformat()} if lock else None,
            )
            repo.put_bytes(manifest_key(target_name, backup_id), manifest.to_bytes(keyring), retain_until)
        except BaseException:
            _remove_unfinished(repo, prefix)
            raise
        audit.update(bytes_stored=manifest.stored_bytes, bytes_read=manifest.plaintext_bytes,
                     seconds=round(manifest.duration_seconds, 3), key_id=keyring.primary_key_id)
        offsite_problem = copy_after_backup(repo, open_offsite(policy), manifest)  # under the lock: prune waits
    return BackupResult(manifest, offsite_problem)


def estimate_backup_bytes(policy: Policy, target_name: str) -> int | None:
    """About how many bytes a backup of the target reads, from the source's size estimate (pg_database_size,
    table sizes), for a progress display; None when the kind cannot tell or the source does not answer (the
    backup itself then says why)."""
    target = policy.target(target_name)
    try:
        return source_for(target.kind).estimate_bytes(target)
    except Exception:  # noqa: BLE001 - only a display's estimate: the backup reports the real problem
        return None


def archive_problem(policy: Policy, repo: Repository, keyring: Keyring, manifest: Manifest) -> str | None:
    """Before a backup's checks: wait for the target's continuous archive to reach the backup's end; what to say
    when it does not within the wait (the backup then restores nothing, and its checks say so, until it does).
    None: it does, or the kind has no such archive."""
    import time

    archive = source_for(manifest.kind).continuous_archive()
    started = time.monotonic()
    if archive is None or archive.wait_until_covered(policy, repo, keyring, manifest, ARCHIVE_WAIT_SECONDS):
        return None
    fed = archive.fed(policy, manifest.target)
    return (f"the {archive.noun} archive does not reach the end of {manifest.backup_id} (waited "
            f"{time.monotonic() - started:.0f} s" + ("; nothing feeds it now" if fed is False else "") + "): the "
            f"backup is not recoverable beyond its end, nor to it, until it does; run `regal-backup wal stream "
            f"{manifest.target}` as a service (or set the server's archive_command); `regal-backup check "
            f"{manifest.target}` says what is missing")


INCREMENTAL_CLASSES = ("hourly", "daily")  # weekly and monthly backups stay full: each starts a new chain


def incremental_by_policy(target: object, retention_class: str) -> bool:
    """Whether a backup of this class is incremental when nobody says: the target's `incremental` option."""
    return bool(getattr(target, "incremental", False)) and retention_class in INCREMENTAL_CLASSES


def _remove_unfinished(repo: Repository, prefix: str) -> None:
    """Best effort: the objects of a backup that failed or was stopped (it has no manifest, so it is not a
    backup). What a SIGKILL leaves behind, prune removes after a grace period."""
    with contextlib.suppress(Exception):
        for stored in list(repo.list(prefix)):
            with contextlib.suppress(Exception):  # an object under Object Lock stays until its date
                repo.delete(stored.key)
