"""Taking a backup: lock, stream the source through the pipeline, write the manifest last."""

from __future__ import annotations

import getpass
import importlib.metadata
import platform
from datetime import UTC, datetime

from .crypto import Keyring, load_keyring
from .errors import RegalError
from .manifest import Manifest, backup_prefix, manifest_key, new_backup_id
from .pipeline import Progress, store_stream
from .policy import RETENTION_CLASSES, Policy
from .repository import Repository, open_repository
from .sources import postgres


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def tool_versions() -> dict[str, str]:
    return {"regal-backup": _version("regal-backup"), "python": platform.python_version(),
            "tink": _version("tink"), "zstandard": _version("zstandard")}


def run_backup(policy: Policy, target_name: str, retention_class: str = "hourly", *,
               repo: Repository | None = None, keyring: Keyring | None = None,
               trigger: dict[str, str] | None = None, progress: Progress | None = None) -> Manifest:
    """Back up one target. Returns the manifest; the backup exists once this returns."""
    if retention_class not in RETENTION_CLASSES:
        raise RegalError(f"unknown retention class '{retention_class}'", f"use one of {', '.join(RETENTION_CLASSES)}")
    target = policy.target(target_name)
    keyring = keyring or load_keyring(policy)  # fail on key problems before touching anything
    repo = repo or open_repository(policy)
    repo.ensure_initialized()
    dsn = target.resolved_dsn()
    with repo.lock(target_name):
        started = datetime.now(UTC)
        backup_id = new_backup_id(target_name, started)
        prefix = backup_prefix(target_name, backup_id)
        with postgres.dump_session(dsn) as session:
            record = store_stream(repo, prefix + postgres.DUMP_OBJECT, session.chunks(), keyring=keyring,
                                  backup_id=backup_id, object_name=postgres.DUMP_OBJECT,
                                  content=postgres.DUMP_CONTENT, progress=progress)
            facts = session.facts()
        manifest = Manifest(
            backup_id=backup_id, target=target_name, kind=target.kind, retention_class=retention_class,
            retain_until=policy.retention.retain_until(retention_class, started),
            started_at=started, finished_at=datetime.now(UTC),
            tool_versions={**tool_versions(), "pg_dump": session.pg_dump.version},
            source=facts, objects=[record],
            trigger={"user": getpass.getuser(), "host": platform.node(), **(trigger or {})},
        ).sealed()
        repo.put_bytes(manifest_key(target_name, backup_id), manifest.to_bytes())
    return manifest
