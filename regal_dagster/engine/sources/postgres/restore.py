"""Restoring a backup into a PostgreSQL database, safely and in parallel.

Order matters: the target is checked first (a non-empty database is refused unless replacing is asked
for), every object is looked up, and the backup is loaded into a temporary database, every byte
authenticated on its way in; the target is replaced only once all of it has been authenticated, loaded
and validated. Loading: pg_restore pre-data and data (tables, sequences, large objects), the tables' rows loaded
`jobs` at a time with COPY, pg_restore post-data with `jobs` parallel jobs (indexes, constraints,
triggers), and last every table is read back and compared with the manifest (row count and SHA-256).

This module runs those phases; the target and its temporary database are `database`'s, the roles and the
database's own properties `roles`', the loading `loading`'s and the reading back `validate`'s.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...crypto import Keyring
from ...errors import IntegrityError, RegalError
from ...manifest import Manifest
from ...pipeline import Progress, StoredBackup, announce_phase
from ...postgresql.connection import describe_dsn, with_dbname
from ...settings import default_jobs
from ...storage import Repository
from ...verify import absent_objects
from ...workspace import private_directory
from .database import (
    StagedDatabase,
    check_tablespaces,
    prepare_target_database,
    reset_database,
    same_encoding,
)
from .dump import SCHEMA_OBJECT, Table, compare_tables, dump_major
from .loading import load_batches, load_tables, restore_tools, run_pg_restore
from .locales import check_target_locale, describe_locale, without_locale
from .roles import apply_database_properties, create_missing_roles, drop_roles
from .validate import VALIDATION, validated_tables

__all__ = ["VALIDATION", "DatabaseRestore", "load_database", "restore_database"]


@dataclass
class DatabaseRestore:
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
    locale: str = ""  # the database's encoding and locale, and whose (the backup's or the target's defaults)

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


def restore_database(repo: Repository, keyring: Keyring, manifest: Manifest, to_dsn: str, *,
                   drop_existing: bool = False, keep_owners: bool = True, jobs: int | None = None,
                   validation: str = "full", progress: Progress | None = None,
                   before_writing: Callable[[], None] | None = None,
                   before_publishing: Callable[[str], None] | None = None, scratch: bool = False,
                   create_roles: bool = True, tablespaces: bool = True,
                   use_target_locale: bool = False) -> DatabaseRestore:
    """Restore one backup into `to_dsn`, atomically as seen from the target (see `StagedDatabase`): every
    object is first looked up (missing or resized ones refuse the restore before anything is created), then
    loaded into a temporary database created with the source database's properties, every byte
    authenticated on its way in, validated, and only then renamed into place; on any failure (a byte that
    does not authenticate included) the temporary database and the roles this restore created are dropped
    and the server is as it was. `before_writing` runs once the target is known to be acceptable: just
    before the first change to the server; `before_publishing` runs with the DSN of the validated temporary
    database just before it is renamed into place (GDPR erasures are re-applied there).

    The roles the backup's database referred to are created first when missing (unless `create_roles`
    is off); owners and grants are restored unless `keep_owners` is off. Tables, indexes and the database
    go into the tablespaces they were in, which must exist on the server (checked before anything is
    created), unless `tablespaces` is off (everything in the default tablespace). The database is created
    with the backup's encoding and locale (collation provider, collation, ctype, ICU or builtin locale, ICU
    rules) whatever the server's defaults; a server that cannot provide that locale is refused before
    anything is created, unless `use_target_locale` (the server's defaults, said in the report). Like
    pg_restore without
    --exit-on-error, every object that can be restored is tried: what could not is listed, with the
    server's reason, in the returned problems, and the restore fails loudly with all of them.

    `scratch`: the destination is a throw-away server nobody else sees (a restore test's): loaded in place."""
    if validation not in VALIDATION:
        raise RegalError(f"unknown validation '{validation}'", f"use one of {', '.join(VALIDATION)}")
    phases = _Phases()
    jobs = jobs or default_jobs()
    properties = _database_properties(manifest, to_dsn, tablespaces, use_target_locale)
    recorded_roles = manifest.source.get("roles") if create_roles else None
    load_into = functools.partial(load_database, repo, keyring, manifest, keep_owners=keep_owners, jobs=jobs,
                                  validation=validation, progress=progress, tablespaces=tablespaces)
    plan = _Plan(properties, recorded_roles, phases, load_into, before_writing, before_publishing)
    report = (_restore_in_place(plan, to_dsn, drop_existing) if scratch
              else _restore_aside(plan, repo, manifest, to_dsn, drop_existing))
    report.locale = _locale_report(manifest, use_target_locale)
    return report


def _locale_report(manifest: Manifest, use_target_locale: bool) -> str:
    recorded: dict[str, Any] | None = manifest.source.get("database_properties")
    if not recorded:
        return "the target server's defaults (the backup recorded no locale)"
    if use_target_locale:
        return (f"the target server's default locale (--use-target-locale), not the backup's: "
                f"{describe_locale(recorded)}")
    return f"the backup's: {describe_locale(recorded)}"


@dataclass
class _Plan:
    """What every phase of one restore needs, settled before the server is changed."""
    properties: dict[str, Any] | None  # the source database's, to create the restored one with
    roles: dict[str, Any] | None  # the roles to create when missing (None: none)
    phases: _Phases
    load_into: Callable[[str, str, _Phases, list[str]], DatabaseRestore]  # (dsn, state, phases, role problems)
    before_writing: Callable[[], None] | None
    before_publishing: Callable[[str], None] | None


def _database_properties(manifest: Manifest, to_dsn: str, tablespaces: bool,
                         use_target_locale: bool) -> dict[str, Any] | None:
    """The source database's properties, to create the restored one with. The server must be able to give it
    the source's locale (refused before anything is created), unless `use_target_locale`: then it gets the
    server's defaults. With `tablespaces`, the server must have every tablespace the backup's objects were in
    (refused before anything is created too), and the database goes into the one it was in."""
    properties: dict[str, Any] | None = manifest.source.get("database_properties")
    if properties and use_target_locale:
        properties = without_locale(properties)
    elif properties:
        check_target_locale(to_dsn, properties)
    if not tablespaces:
        return properties
    recorded_tablespaces = manifest.source.get("tablespaces", [])
    check_tablespaces(to_dsn, recorded_tablespaces)
    default = next((t["name"] for t in recorded_tablespaces if t["database_default"]), None)
    if properties and default:
        properties = {**properties, "tablespace": default}
    return properties


def _restore_in_place(plan: _Plan, to_dsn: str, drop_existing: bool) -> DatabaseRestore:
    """A scratch server's restore: the target (re)created and loaded where it is."""
    state = prepare_target_database(to_dsn, drop_existing, plan.properties)
    if plan.before_writing:
        plan.before_writing()
    if state == "replace":
        reset_database(to_dsn, plan.properties)
    role_problems = create_missing_roles(to_dsn, plan.roles)[1] if plan.roles else []
    report = plan.load_into(to_dsn, state, plan.phases, role_problems)
    if report.ok and plan.before_publishing:
        plan.before_publishing(to_dsn)
    return report


def _restore_aside(plan: _Plan, repo: Repository, manifest: Manifest, to_dsn: str,
                   drop_existing: bool) -> DatabaseRestore:
    """Look up, load into a temporary database, validate, publish; on any failure the temporary database
    and the roles this restore created are dropped (the latter after the former, which their objects
    were in)."""
    created_roles: list[str] = []
    published = False
    try:
        with StagedDatabase(to_dsn) as staged:
            state, kept = _look_up(staged, repo, manifest, to_dsn, plan.properties, drop_existing)
            plan.phases.done("look_up")
            if plan.before_writing:
                plan.before_writing()
            staged.check_not_in_use()
            temporary = staged.create(plan.properties, copying_target=state == "empty")
            created_roles, role_problems = (create_missing_roles(temporary, plan.roles) if plan.roles
                                            else ([], []))
            report = _load_aside(plan, temporary, state, role_problems, kept)
            published = _publish(plan, staged, temporary, report, to_dsn)
            report.target = describe_dsn(to_dsn)
    finally:
        if not published and created_roles:
            drop_roles(with_dbname(to_dsn, "postgres"), created_roles)
    return report


def _look_up(staged: StagedDatabase, repo: Repository, manifest: Manifest, to_dsn: str,
             properties: dict[str, Any] | None, drop_existing: bool) -> tuple[str, str]:
    """Before anything is created: the target's state ('created', 'empty', 'replace'; an empty target of
    another encoding, or one that may not be replaced, is refused), and every object of the backup present
    at its size. (state, what a failure leaves of the target)."""
    state = staged.target_state(drop_existing)
    if state == "empty" and properties:
        same_encoding(to_dsn, properties, drop_existing)
    kept = "the existing database was left untouched" if staged.exists else "nothing was created"
    if absent := absent_objects(repo, manifest):
        raise IntegrityError(f"backup {manifest.backup_id} is incomplete; {kept}: {'; '.join(absent)}",
                             "restore another backup")
    return state, kept


def _load_aside(plan: _Plan, temporary: str, state: str, role_problems: list[str], kept: str) -> DatabaseRestore:
    try:
        return plan.load_into(temporary, state, plan.phases, role_problems)
    except IntegrityError as exc:  # a byte that does not authenticate: nothing of it is published
        raise IntegrityError(f"{exc.message}; the restored copy was dropped and {kept}", exc.hint) from None


def _publish(plan: _Plan, staged: StagedDatabase, temporary: str, report: DatabaseRestore, to_dsn: str) -> bool:
    """The validated copy renamed into place (GDPR erasures re-applied to it first, by `before_publishing`);
    a copy that failed validation is not, and its report says so. Whether it was published."""
    if not report.ok:
        report.validation_problems.append(
            f"the restored copy was dropped: {describe_dsn(to_dsn)} is as it was" if staged.exists else
            f"the restored copy was dropped: no database {staged.target} was created")
        return False
    if plan.before_publishing:
        plan.before_publishing(temporary)
    staged.publish()
    return True


def load_database(repo: Repository, keyring: Keyring, manifest: Manifest, to_dsn: str, state: str,
                  phases: _Phases, role_problems: list[str], *, keep_owners: bool, jobs: int, validation: str,
                  progress: Progress | None, tablespaces: bool) -> DatabaseRestore:
    """Load one backup into the (new, empty) database `to_dsn` and validate it against the manifest: schema,
    rows, post-data and the database's own properties. Every object of the backup is authenticated on the
    way (IntegrityError naming the first that is not); `role_problems`: the roles that could not be created."""
    properties: dict[str, Any] | None = manifest.source.get("database_properties")
    encoding: str | None = manifest.source.get("encoding")
    failed = list(role_problems)  # what could not be restored, and why
    pg_restore, psql = restore_tools(to_dsn, dump_major(manifest.tool_versions))
    table_facts: list[dict[str, Any]] = manifest.source.get("tables", [])
    tables = [Table.from_facts(t) for t in table_facts]
    backup = StoredBackup(repo, keyring, manifest)
    with private_directory("restore") as tmp:  # private (0700), swept by the next command if we are killed
        announce_phase(progress, "creating the schema")
        archive = backup.to_file(SCHEMA_OBJECT, Path(tmp) / SCHEMA_OBJECT, progress)
        failed += run_pg_restore(pg_restore, to_dsn, archive, ["pre-data", "data"], keep_owners=keep_owners,
                                 tablespaces=tablespaces, exit_on_error=False)
        phases.done("schema")

        batches = load_batches(manifest, table_facts, tables)
        announce_phase(progress, "loading tables")
        loaded = load_tables(backup, to_dsn, batches, jobs, encoding, progress)
        backup.authenticate_unread(progress)  # a table that failed to load stopped reading its object
        phases.done("load")
        failed += [t["failed"] for t in loaded if "failed" in t]
        loaded, breakdown = _load_breakdown(loaded)
        announce_phase(progress, "indexes and constraints")
        failed += run_pg_restore(pg_restore, to_dsn, archive, ["post-data"], jobs=jobs, keep_owners=keep_owners,
                                 tablespaces=tablespaces, exit_on_error=False)
        phases.done("post_data")
    announce_phase(progress, "validating")
    if properties:
        failed += apply_database_properties(to_dsn, properties, owners=keep_owners)
    loaded = validated_tables(to_dsn, keyring, manifest, [t for batch in batches for _, t in batch], loaded,
                              validation, psql, jobs, encoding)
    problems = [f"not restored: {what}" for what in failed] + compare_tables(table_facts, loaded)
    phases.done("validate")
    return DatabaseRestore(manifest.backup_id, describe_dsn(to_dsn), state, len(tables),
                         sum(t["rows"] for t in table_facts), jobs, validation, phases.total(), problems,
                         breakdown)


def _load_breakdown(loaded: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The tables that loaded (their timings taken out), and the load's time summed over the workers:
    fetching, decrypting, decompressing and checksumming the stored bytes, against the server taking them in."""
    timings = [t.pop("seconds") for t in loaded]
    breakdown = {"fetch_decrypt_decompress": sum(ours for ours, _ in timings),
                 "copy_into_server": sum(server for _, server in timings)}
    return [t for t in loaded if "failed" not in t], breakdown
