"""Taking a backup: lock, stream the source through the pipeline, write the manifest last."""

from __future__ import annotations

import contextlib
import getpass
import importlib.metadata
import platform
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from .audit import audited
from .crypto import Keyring, load_keyring
from .errors import RegalError
from .manifest import Manifest, ObjectRecord, backup_prefix, manifest_key, new_backup_id
from .parallel import check, map_parallel
from .pipeline import Progress, store_stream
from .policy import RETENTION_CLASSES, ConfigTarget, Policy, PostgresTarget, RedisTarget, TerraformTarget
from .repository import Repository, open_repository
from .sources import gitconfig, postgres, terraform
from .sources import redis as redis_source


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
    capture = {"postgres": _capture_postgres, "redis": _capture_redis, "terraform": _capture_terraform,
               "config": _capture_config}[target.kind]
    with audited(policy, repo, "backup", target_name, trigger) as audit, repo.lock(target_name):
        started = datetime.now(UTC)
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
            objects, facts, tools = capture(target, store)
            manifest = Manifest(
                backup_id=backup_id, target=target_name, kind=target.kind, retention_class=retention_class,
                retain_until=retain_until,
                started_at=started, finished_at=datetime.now(UTC),
                tool_versions={**tool_versions(), **tools}, source=facts, objects=objects,
                trigger={"user": getpass.getuser(), "host": platform.node(), **(trigger or {})},
                **({"object_lock": {"mode": lock.mode, "retain_until": retain_until.isoformat()}} if lock else {}),
            ).sealed()
            repo.put_bytes(manifest_key(target_name, backup_id), manifest.to_bytes(), retain_until)
        except BaseException:
            _remove_unfinished(repo, prefix)
            raise
        audit.update(bytes_stored=manifest.stored_bytes, bytes_read=manifest.plaintext_bytes,
                     seconds=round(manifest.duration_seconds, 3), key_id=keyring.primary_key_id)
    return manifest


StoreObject = Callable[[str, str, Iterable[bytes], int], ObjectRecord]  # name, content, chunks, zstd threads
Captured = tuple[list[ObjectRecord], dict[str, Any], dict[str, str]]  # objects, source facts, tool versions


def _capture_postgres(target: PostgresTarget, store: StoreObject) -> Captured:
    """One exported snapshot: the schema archive and every table's rows, tables in parallel."""
    with postgres.dump_session(target.resolved_dsn()) as session:
        jobs = min(target.jobs, max(len(session.tables), 1))
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dump-schema") as pool:
            schema_done = pool.submit(store, postgres.SCHEMA_OBJECT, postgres.SCHEMA_CONTENT,
                                      session.schema_chunks(), 0)
            stored = _dump_tables(session, store, jobs)
            schema = schema_done.result()
    stored.sort(key=lambda s: (s[1]["schema"], s[1]["name"]))
    return ([schema, *(record for record, _ in stored)],
            {**session.facts, "jobs": jobs, "tables": [facts for _, facts in stored]},
            {"pg_dump": session.pg_dump.version, "psql": session.psql.version})


def _capture_redis(target: RedisTarget, store: StoreObject) -> Captured:
    """The RDB over the replication protocol (checked with redis-check-rdb), and the AOF files when the
    server's data directory is readable here."""
    url = target.resolved_url()
    connection = redis_source.client(url)
    facts = {**redis_source.server_facts(connection), "endpoint": redis_source.describe_url(url),
             "key_sample": redis_source.key_sample(url)}
    with tempfile.TemporaryDirectory(prefix="regal-rdb-") as tmp:  # private (0700); removed at once
        copy_path = Path(tmp) / redis_source.RDB_OBJECT
        with copy_path.open("wb") as copy:
            def teed() -> Iterator[bytes]:
                for chunk in redis_source.rdb_stream(url):
                    copy.write(chunk)
                    yield chunk

            objects = [store(redis_source.RDB_OBJECT, redis_source.RDB_CONTENT, teed(), -1)]
        facts["rdb"] = redis_source.check_rdb(copy_path)
    if target.data_dir:
        objects += [store(name, "Redis append-only file", _file_chunks(path), -1)
                    for name, path in redis_source.aof_files(Path(target.data_dir), facts["persistence"])]
    return objects, facts, {"redis-check-rdb": "redis " + str(facts["server_version"])}


def _capture_terraform(target: TerraformTarget, store: StoreObject) -> Captured:
    data = terraform.read_state(target.state, region=target.region, endpoint_url=target.endpoint_url)
    record = store(terraform.STATE_OBJECT, terraform.STATE_CONTENT, [data], 0)
    return [record], {"location": target.state, "state": terraform.state_facts(data)}, {}


def _capture_config(target: ConfigTarget, store: StoreObject) -> Captured:
    repo_path = Path(target.repository).expanduser()
    facts = gitconfig.repository_facts(repo_path, target.lock_files)
    objects = [store(gitconfig.BUNDLE_OBJECT, gitconfig.BUNDLE_CONTENT, gitconfig.bundle_stream(repo_path), 0)]
    objects += [store(gitconfig.LOCK_PREFIX + name, f"dependency lock file {name}", _file_chunks(repo_path / name), 0)
                for name in facts["lock_files"]]
    return objects, facts, {"git": gitconfig.git_version()}


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            yield chunk


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
            with contextlib.suppress(Exception):  # an object under Object Lock stays until its date
                repo.delete(stored.key)
