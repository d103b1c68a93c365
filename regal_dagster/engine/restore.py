"""Restoring a backup into a PostgreSQL database, safely and in parallel.

Order matters: the target is checked first (a non-empty database is refused unless replacing is asked
for); when replacing, the whole backup is read back and authenticated BEFORE the old database is
dropped. Then: pg_restore pre-data and data (tables, sequences, large objects), the tables' rows loaded
`jobs` at a time with COPY, pg_restore post-data with `jobs` parallel jobs (indexes, constraints,
triggers), and last every table is read back and compared with the manifest (row count and SHA-256).
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .crypto import Keyring
from .errors import IntegrityError, RegalError
from .manifest import Manifest
from .parallel import check, map_parallel
from .pipeline import Progress, read_object_to_file, read_stream
from .repository import Repository
from .sources import postgres
from .verify import verify_backup


@dataclass
class RestoreReport:
    backup_id: str
    target: str  # where it went, without credentials
    target_state: str  # created | empty | replace
    tables: int
    rows: int
    jobs: int
    validation: str  # full | rows (see VALIDATION)
    seconds: dict[str, float] = field(default_factory=dict)
    validation_problems: list[str] = field(default_factory=list)
    # Inside the load phase, summed over the parallel workers: fetching, decrypting, decompressing and
    # checksumming the stored bytes, against the server taking the rows in (the two overlap in time).
    load_breakdown: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.validation_problems


class _Phases:
    def __init__(self) -> None:
        self.start = self.mark = time.monotonic()
        self.seconds: dict[str, float] = {}

    def done(self, name: str) -> None:
        now = time.monotonic()
        self.seconds[name] = now - self.mark
        self.mark = now

    def total(self) -> dict[str, float]:
        return {**self.seconds, "total": time.monotonic() - self.start}


VALIDATION = {
    "full": "every table read back from the server: row count and SHA-256 of its rows match the backup",
    "rows": "every table's loaded row count matches the backup (its bytes were authenticated on the way in)",
}


def restore_backup(repo: Repository, keyring: Keyring, manifest: Manifest, to_dsn: str, *,
                   drop_existing: bool = False, keep_owners: bool = False, jobs: int = 2,
                   validation: str = "full", progress: Progress | None = None,
                   before_writing: Callable[[], None] | None = None) -> RestoreReport:
    """Restore one backup into `to_dsn`. `before_writing` runs once the target is known to be acceptable
    and, when replacing, the backup has been authenticated: just before the first change to the target."""
    if manifest.kind != "postgres":
        raise RegalError(f"backup {manifest.backup_id} is a {manifest.kind} backup", "restore it with its own tool")
    if validation not in VALIDATION:
        raise RegalError(f"unknown validation '{validation}'", f"use one of {', '.join(VALIDATION)}")
    phases = _Phases()
    state = postgres.prepare_target_database(to_dsn, drop_existing)
    if state == "replace":
        verified = verify_backup(repo, keyring, manifest, jobs=jobs)
        phases.done("authenticate")
        if not verified.ok:
            raise IntegrityError(f"backup {manifest.backup_id} failed verification; the existing database was "
                                 f"left untouched: {'; '.join(verified.problems)}", "restore another backup")
    if before_writing:
        before_writing()
    if state == "replace":
        postgres.reset_database(to_dsn)
    dump_major = int(manifest.tool_versions.get("pg_dump", "0").split(".")[0] or 0)
    pg_restore, psql = postgres.restore_tools(to_dsn, dump_major)
    table_facts: list[dict[str, Any]] = manifest.source.get("tables", [])
    tables = [postgres.Table.from_facts(t) for t in table_facts]
    with tempfile.TemporaryDirectory(prefix="regal-restore-") as tmp:  # private (0700), removed afterwards
        archive = read_object_to_file(repo, keyring, manifest, postgres.SCHEMA_OBJECT,
                                      Path(tmp) / postgres.SCHEMA_OBJECT)
        postgres.run_pg_restore(pg_restore, to_dsn, archive, ["pre-data", "data"], keep_owners=keep_owners)
        phases.done("schema")

        def load(numbered: tuple[dict[str, Any], postgres.Table], cancelled: threading.Event) -> dict[str, Any]:
            facts, table = numbered
            record = manifest.object(facts["object"])
            started, in_server = time.monotonic(), 0.0
            with postgres.table_loader(to_dsn, table) as loading:
                def sink(chunk: bytes) -> None:
                    nonlocal in_server
                    check(cancelled)
                    mark = time.monotonic()
                    loading.write(chunk)
                    in_server += time.monotonic() - mark

                read_stream(repo, record, keyring=keyring, backup_id=manifest.backup_id, sink=sink,
                            progress=progress)  # raises unless every byte matches the manifest's SHA-256
            return {"schema": table.schema, "name": table.name, "rows": loading.rows,
                    "sha256": record.plaintext_sha256,
                    "seconds": (time.monotonic() - started - in_server, in_server)}

        biggest_first = sorted(zip(table_facts, tables, strict=True), key=lambda t: -t[0]["rows"])
        loaded = map_parallel(load, biggest_first, jobs, "load")
        phases.done("load")
        timings = [t.pop("seconds") for t in loaded]
        breakdown = {"fetch_decrypt_decompress": sum(ours for ours, _ in timings),
                     "copy_into_server": sum(server for _, server in timings)}
        postgres.run_pg_restore(pg_restore, to_dsn, archive, ["post-data"], jobs=jobs, keep_owners=keep_owners)
        phases.done("post_data")
    if validation == "full":
        loaded = postgres.restored_table_facts(to_dsn, [t for _, t in biggest_first], psql, jobs)
    problems = postgres.compare_tables(table_facts, loaded)
    phases.done("validate")
    return RestoreReport(manifest.backup_id, postgres.describe_dsn(to_dsn), state, len(tables),
                         sum(t["rows"] for t in table_facts), jobs, validation, phases.total(), problems,
                         breakdown)
