"""Restoring a backup into a PostgreSQL database, safely.

Order matters: the target is checked first (a non-empty database is refused unless replacing is asked
for); when replacing, the whole backup is read back and authenticated BEFORE the old database is
dropped; after pg_restore, the restored tables are compared with the manifest's facts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .crypto import Keyring
from .errors import IntegrityError, RegalError
from .manifest import Manifest
from .pipeline import Progress, read_stream
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
    seconds: dict[str, float] = field(default_factory=dict)
    validation_problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.validation_problems


def restore_backup(repo: Repository, keyring: Keyring, manifest: Manifest, to_dsn: str, *,
                   drop_existing: bool = False, keep_owners: bool = False,
                   progress: Progress | None = None) -> RestoreReport:
    if manifest.kind != "postgres":
        raise RegalError(f"backup {manifest.backup_id} is a {manifest.kind} backup", "restore it with its own tool")
    seconds: dict[str, float] = {}
    start = time.monotonic()
    state = postgres.prepare_target_database(to_dsn, drop_existing)
    if state == "replace":
        verified = verify_backup(repo, keyring, manifest)
        seconds["authenticate"] = time.monotonic() - start
        if not verified.ok:
            raise IntegrityError(f"backup {manifest.backup_id} failed verification; the existing database was "
                                 f"left untouched: {'; '.join(verified.problems)}", "restore another backup")
        postgres.reset_database(to_dsn)
    record = next(o for o in manifest.objects if o.name == postgres.DUMP_OBJECT)
    dump_major = int(manifest.tool_versions.get("pg_dump", "0").split(".")[0] or 0)
    phase = time.monotonic()
    restorer = postgres.PgRestoreProcess(to_dsn, dump_major, keep_owners=keep_owners)
    try:
        read_stream(repo, record, keyring=keyring, backup_id=manifest.backup_id, sink=restorer.feed,
                    progress=progress)
        restorer.finish()
    except BaseException:
        restorer.kill()
        raise
    seconds["restore"] = time.monotonic() - phase
    phase = time.monotonic()
    problems = postgres.compare_tables(manifest.source.get("tables", []), postgres.restored_table_facts(to_dsn))
    seconds["validate"] = time.monotonic() - phase
    seconds["total"] = time.monotonic() - start
    tables = manifest.source.get("tables", [])
    return RestoreReport(manifest.backup_id, postgres.describe_dsn(to_dsn), state, len(tables),
                         sum(t["rows"] for t in tables), seconds, problems)
