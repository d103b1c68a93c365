"""Taking a backup: lock, stream the source through the pipeline, write the manifest last."""

from __future__ import annotations

import contextlib
import getpass
import importlib.metadata
import platform
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from .crypto import Keyring, load_keyring
from .errors import RegalError
from .manifest import Manifest, ObjectRecord, backup_prefix, manifest_key, new_backup_id
from .parallel import check, map_parallel
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

        def store(name: str, content: str, chunks: Iterable[bytes], zstd_threads: int) -> ObjectRecord:
            return store_stream(repo, prefix + name, chunks, keyring=keyring, backup_id=backup_id,
                                object_name=name, content=content, compression=policy.compression,
                                zstd_threads=zstd_threads, progress=progress)

        try:
            with postgres.dump_session(dsn) as session:
                jobs = min(target.jobs, max(len(session.tables), 1))
                with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dump-schema") as pool:
                    schema_done = pool.submit(store, postgres.SCHEMA_OBJECT, postgres.SCHEMA_CONTENT,
                                              session.schema_chunks(), 0)
                    stored = _dump_tables(session, store, jobs)
                    schema = schema_done.result()
            stored.sort(key=lambda s: (s[1]["schema"], s[1]["name"]))
            manifest = Manifest(
                backup_id=backup_id, target=target_name, kind=target.kind, retention_class=retention_class,
                retain_until=policy.retention.retain_until(retention_class, started),
                started_at=started, finished_at=datetime.now(UTC),
                tool_versions={**tool_versions(), "pg_dump": session.pg_dump.version, "psql": session.psql.version},
                source={**session.facts, "jobs": jobs, "tables": [facts for _, facts in stored]},
                objects=[schema, *(record for record, _ in stored)],
                trigger={"user": getpass.getuser(), "host": platform.node(), **(trigger or {})},
            ).sealed()
            repo.put_bytes(manifest_key(target_name, backup_id), manifest.to_bytes())
        except BaseException:
            _remove_unfinished(repo, prefix)
            raise
    return manifest


StoreObject = Callable[[str, str, Iterable[bytes], int], ObjectRecord]  # name, content, chunks, zstd threads


def _dump_tables(session: postgres.DumpSession, store: StoreObject,
                 jobs: int) -> list[tuple[ObjectRecord, dict[str, Any]]]:
    """Every table's rows as its own object, `jobs` tables at a time, the biggest first."""
    def store_table(numbered: tuple[int, postgres.Table],
                    cancelled: threading.Event) -> tuple[ObjectRecord, dict[str, Any]]:
        number, table = numbered
        rows = 0

        def counted() -> Iterator[bytes]:
            nonlocal rows
            for chunk in session.table_chunks(table):
                check(cancelled)
                rows += chunk.count(b"\n")  # COPY text: one line per row
                yield chunk

        record = store(f"tables/{number:05d}.copy", postgres.TABLE_CONTENT.format(label=table.label),
                       counted(), 0 if jobs > 1 else -1)
        return record, {"schema": table.schema, "name": table.name, "columns": list(table.columns),
                        "rows": rows, "sha256": record.plaintext_sha256, "object": record.name}

    biggest_first = sorted(enumerate(session.tables, 1), key=lambda t: -t[1].pages)
    return map_parallel(store_table, biggest_first, jobs, "dump")


def _remove_unfinished(repo: Repository, prefix: str) -> None:
    """Best effort: the objects of a backup that failed or was stopped (it has no manifest, so it is not a
    backup). What a SIGKILL leaves behind, prune removes after a grace period."""
    with contextlib.suppress(Exception):
        for stored in list(repo.list(prefix)):
            repo.delete(stored.key)
