"""The `postgres` source kind."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ...crypto import Keyring
from ...environment import child_environment
from ...erasure_ledger import ErasureLedger, ErasureResult
from ...errors import IntegrityError, MissingSoftwareError, RegalError, ToolError, UsageError
from ...findings import Finding
from ...manifest import Manifest, ObjectRecord
from ...parallel import map_parallel
from ...pipeline import StoredBackup
from ...postgresql.conninfo import check_dsn
from ...postgresql.installations import choose_server_binaries
from ...postgresql.locales import ClusterLocale
from ...postgresql.tools import find_pg_tool
from ...settings import ErasureSubjectConfig, TargetSettings, fill_option
from ...units import duration
from ...workspace import private_directory
from ..base import Captured, Restored, RestoredFindings, RestoreRequest, Source, StoreObject
from .target import PostgresTarget

if TYPE_CHECKING:
    from .dump import DumpSession, Table

# psycopg and what uses it (dump, restore, packs, facts, erasure, scratch servers) are imported by the methods that
# need them: `status`, `list` or a restore test's plan ask this Source about a kind without connecting anywhere.

RESTORE_TEST_DATABASE = "restore_test"
# How often a backup starts again when a schema change queued behind its locks before pg_dump took its own.
SCHEMA_ATTEMPTS = 5
# A standby exports snapshots (what every dump session imports) from PostgreSQL 10 on.
STANDBY_SNAPSHOT_VERSION = 100000


@dataclass(frozen=True)
class PostgresRestoreOptions:
    """How a database is restored, beyond where."""

    owners: bool = True  # ownership and grants as recorded (--no-owners: neither)
    create_roles: bool = True  # create the recorded roles the server lacks first
    tablespaces: bool = True  # objects in their recorded tablespaces (False: the server's default one)
    validation: str = "full"  # full | rows: what is read back to validate
    target_locale: bool = False  # the server's default provider and locale, not the backup's (--use-target-locale)


class PostgresSource(Source):
    kind = "postgres"
    label = "PostgreSQL database"
    restore_test_proves = "row counts, content SHA-256, schema objects and pg_amcheck"
    scratch_phase = "cluster"

    def estimate_bytes(self, target: TargetSettings) -> int | None:
        """The user tables' size on disk (pg_table_size: heap and TOAST, no indexes): about what COPY reads."""
        from ...postgresql.connection import connect

        with connect(cast(PostgresTarget, target).resolved_dsn(), autocommit=True) as conn:
            row = conn.execute("SELECT sum(pg_table_size(c.oid))::bigint FROM pg_class c JOIN pg_namespace n ON "
                               "n.oid = c.relnamespace WHERE c.relkind IN ('r', 'm') AND n.nspname NOT IN "
                               "('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'").fetchone()
        return int(row[0]) if row and row[0] is not None else None

    def capture(self, target: TargetSettings, store: StoreObject) -> Captured:
        """The dump, from the primary or a caught-up standby (`backup_from`: postgresql/standby.py). On a standby
        its snapshot and locks are the standby's (none on the primary); replay there may cancel it (a conflict with
        recovery): then it fails saying what to set, or, with prefer-standby, dumps the primary, saying why."""
        import psycopg

        from ...postgresql.connection import describe_dsn
        from ...postgresql.standby import BackupServer, conflict_during, recovery_conflict_error, recovery_conflicts

        settings = cast(PostgresTarget, target)
        server = settings.backup_server("dump", checkpoint=False, min_version_num=STANDBY_SNAPSHOT_VERSION)
        conflicts = recovery_conflicts(server.dsn) if server.role == "standby" else None
        try:
            captured = self._dump(settings, server.dsn, store)
        except (RegalError, psycopg.Error) as exc:
            words = conflict_during(exc, server.dsn, conflicts) if server.role == "standby" else None
            if words is None:
                raise
            conflict = recovery_conflict_error(server, words)
            if settings.backup_from != "prefer-standby":
                raise conflict from None
            primary = settings.resolved_dsn()
            server = BackupServer(primary, "primary", describe_dsn(primary),
                                  "taken from the primary after the dump on a standby was cancelled (backup_from: "
                                  f"prefer-standby): {conflict.message}")
            captured = self._dump(settings, primary, store)
        captured.facts.update(server.facts())
        return captured

    def _dump(self, settings: PostgresTarget, dsn: str, store: StoreObject) -> Captured:
        """One exported snapshot: the schema archive and every table's rows, tables in parallel. When a schema
        change queues behind the backup's locks before pg_dump has taken its own, the backup lets it through
        and starts again (SCHEMA_ATTEMPTS times)."""
        import psycopg

        from .dump import SCHEMA_CONTENT, SCHEMA_OBJECT, SchemaLockQueued, dump_session

        for _attempt in range(SCHEMA_ATTEMPTS):
            with dump_session(dsn, settings.lock_timeout, settings.role_passwords) as session:
                jobs = min(settings.jobs or 1, max(len(session.tables), 1))
                with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dump-schema") as pool:
                    schema_done = pool.submit(store, SCHEMA_OBJECT, SCHEMA_CONTENT, session.schema_chunks(), 0)
                    try:
                        session.wait_for_schema_locks()
                    except SchemaLockQueued:
                        with contextlib.suppress(ToolError):  # pg_dump, cancelled, stored nothing
                            schema_done.result()
                        continue
                    stored = _dump_tables(session, store, jobs)
                    schema = schema_done.result()
                break
        else:
            raise RegalError(f"schema changes kept queuing behind the backup's table locks before pg_dump could take "
                             f"its own ({SCHEMA_ATTEMPTS} attempts); each was let through",
                             "run the backup again once the schema change (migration) has finished")
        stored.sort(key=lambda s: (s[1]["schema"], s[1]["name"]))
        objects = {record.name: record for record, _ in stored}  # a pack once, in the order of its first table
        return Captured([schema, *objects.values()],
                        {**session.facts, "jobs": jobs, "tables": [facts for _, facts in stored]},
                        {"pg_dump": session.pg_dump.version, "libpq": str(psycopg.pq.version())})

    def preflight(self, subject: str, target: TargetSettings) -> list[Finding]:
        from .preflight import preflight

        return preflight(subject, cast(PostgresTarget, target))

    def check_structure(self, backup: StoredBackup) -> str:
        """The schema archive's table of contents parses (`pg_restore --list`)."""
        from .dump import SCHEMA_OBJECT, dump_major
        from .packs import extents_problem

        manifest = backup.manifest
        tool = find_pg_tool("pg_restore", dump_major(manifest.tool_versions))
        with private_directory("check") as tmp:
            archive = backup.to_file(SCHEMA_OBJECT, Path(tmp) / SCHEMA_OBJECT)
            listed = subprocess.run([str(tool.path), "--list", str(archive)], capture_output=True, text=True,
                                    env=child_environment(),
                                    check=False)
        if listed.returncode != 0:
            raise IntegrityError(f"object {manifest.object(SCHEMA_OBJECT).key}: pg_restore cannot read the archive's "
                                 f"table of contents: {listed.stderr.strip()[-300:]}",
                                 "this backup is damaged: use another one")
        entries = sum(1 for line in listed.stdout.splitlines() if line and not line.startswith(";"))
        if problem := extents_problem(manifest):
            raise IntegrityError(f"backup {manifest.backup_id}: {problem}", "this backup is damaged: use another one")
        return f"schema archive lists {entries} entries"

    def plaintext_needles(self, manifest: Manifest) -> list[bytes]:
        from ...postgresql.connection import name_bytes
        from .dump import Table

        names: set[bytes] = set()
        for facts in manifest.source.get("tables", []):
            table = Table.from_facts(facts)
            names.update(name_bytes(n) for n in (table.name, *table.columns))
        return sorted(n for n in names if len(n) >= 6)

    def summary(self, manifest: Manifest) -> dict[str, Any]:
        source = manifest.source
        return {"tables": len(source.get("tables", [])), "rows": sum(manifest.table_rows().values()),
                **({"taken_from": f"{source['backup_from']} {source.get('backup_server', '')}".strip()}
                   if source.get("backup_from") else {})}

    def describe_destination(self, to: str) -> str:
        from ...postgresql.connection import describe_dsn

        return describe_dsn(to)

    def restore_options(self, choices: Mapping[str, Any]) -> PostgresRestoreOptions:
        return PostgresRestoreOptions(owners=not choices.get("no_owners"),
                                      create_roles=not choices.get("no_create_roles"),
                                      tablespaces=not choices.get("no_tablespaces"),
                                      validation=choices.get("validate") or "full",
                                      target_locale=bool(choices.get("use_target_locale")))

    def restore(self, backup: StoredBackup, request: RestoreRequest) -> Restored:
        from .restore import VALIDATION, restore_database

        options = request.kind_options(PostgresRestoreOptions)
        try:
            check_dsn(request.to)
        except ValueError as exc:
            raise UsageError(f"--to is not where a PostgreSQL backup can go: {exc}",
                             "give the DSN of the database to restore into (created if missing), e.g. "
                             "postgresql://user@host:5432/pos_restored") from None
        # a password as ${VAR} (never on the command line); every client program gets it in its environment
        dsn = fill_option(request.to, "--to")
        report = restore_database(backup.repo, backup.keyring, backup.manifest, dsn,
                                  drop_existing=request.drop_existing, keep_owners=options.owners,
                                  jobs=request.jobs, validation=options.validation, progress=request.progress,
                                  before_writing=request.before_writing,
                                  before_publishing=request.before_publishing, scratch=request.scratch,
                                  create_roles=options.create_roles, tablespaces=options.tablespaces,
                                  use_target_locale=options.target_locale)
        phases = ", ".join(f"{name} {duration(s)}" for name, s in report.seconds.items() if name != "total")
        summary = (f"restored {report.backup_id} into {report.target} ({report.target_state}): {report.tables} "
                   f"tables, {report.rows} rows in {duration(report.seconds['total'])} with {report.jobs} jobs "
                   f"({phases})")
        summary += f"\ndatabase locale: {report.locale}"
        if report.ok:
            summary += f"\nvalidation ({report.validation}): {VALIDATION[report.validation]}"
        details = {"target_state": report.target_state, "tables": report.tables, "rows": report.rows,
                   "jobs": report.jobs, "validation": report.validation, "locale": report.locale,
                   "load_breakdown": report.load_breakdown}
        return Restored(report.target, summary, report.validation_problems, report.seconds, details,
                        erasable=dsn)

    @contextlib.contextmanager
    def scratch_destination(self, work_dir: Path | None, manifest: Manifest | None = None) -> Iterator[str]:
        """A scratch server whose version is at least the source's and that has what the source uses (ICU,
        xml, lz4, its extensions): the embedded PostgreSQL when it can, else the machine's own; initialised with
        the source database's encoding, collation provider and locale (MissingSoftwareError naming a locale this
        machine lacks)."""
        from ...postgresql.server import ScratchCluster

        bin_dir, locale = None, None
        if manifest is not None:
            bin_dir, why = choose_server_binaries(int(manifest.source.get("server_version_num", 0)) // 10000,
                                                  set(manifest.source.get("server_needs", [])))
            if bin_dir is None:
                raise MissingSoftwareError(why, "install a PostgreSQL server of that version with those features "
                                           "on this machine (its packaged binaries under /usr/lib/postgresql are "
                                           "used), or run restore tests where one is")
            if properties := manifest.source.get("database_properties"):
                locale = ClusterLocale.of_database(properties)
        with ScratchCluster(base_dir=work_dir, tuned_for_restore=True, bin_dir=bin_dir, locale=locale) as cluster:
            for tablespace in manifest.source.get("tablespaces", []) if manifest is not None else []:
                cluster.create_tablespace(tablespace["name"])  # where the source had its tables and indexes
            yield cluster.dsn(RESTORE_TEST_DATABASE)

    def verify_restored(self, destination: str, manifest: Manifest, keyring: Keyring, jobs: int) -> RestoredFindings:
        """The restored database's encoding, provider and locale, the schema's object counts as recorded at backup
        time, and pg_amcheck over every table and index."""
        from .dump import compare_schema_counts, restored_schema_counts

        found = RestoredFindings()
        phase = time.monotonic()
        found.details["locale"], locale_problems = restored_locale(destination, manifest)
        found.problems += locale_problems
        if expected_counts := manifest.source.get("schema_objects"):
            found.problems += compare_schema_counts(expected_counts, restored_schema_counts(destination))
        found.problems += amcheck_problems(destination, jobs)
        found.seconds["amcheck"] = time.monotonic() - phase
        return found

    def apply_erasures(self, destination: str, ledger: ErasureLedger, target: str,
                       subjects: list[ErasureSubjectConfig]) -> ErasureResult:
        from .erasure import apply_erasures

        return apply_erasures(destination, ledger, target, subjects)


def _dump_tables(session: DumpSession, store: StoreObject, jobs: int) -> list[tuple[ObjectRecord, dict[str, Any]]]:
    """Every table's rows, `jobs` objects at a time, the biggest first: a big table as its own object, small ones
    several to an object (packs.py). (object, table facts) per table."""
    from .packs import dump_groups, store_group

    def store_one(numbered: tuple[int, list[Table]], cancelled: threading.Event) -> list[tuple[ObjectRecord,
                                                                                               dict[str, Any]]]:
        number, group = numbered
        name = f"tables/{number:05d}.copy" if len(group) == 1 else f"tables/pack-{number:05d}.copy"
        record, facts = store_group(session, store, name, group, 0 if jobs > 1 else -1, cancelled)
        return [(record, f) for f in facts]

    groups = list(enumerate(dump_groups(session.tables), 1))
    return [stored for group in map_parallel(store_one, groups, jobs, "dump") for stored in group]


LOCALE_PROPERTIES = ("encoding", "locale_provider", "lc_collate", "lc_ctype", "locale", "icu_rules")
"""What makes a database's text, sort order and indexes what they are: a restore test tests them as they were."""


def restored_locale(dsn: str, manifest: Manifest) -> tuple[dict[str, Any], list[str]]:
    """The restored database's encoding, collation provider and locales, and where they differ from the backed-up
    database's (then it was tested under another collation than its own)."""
    from ...postgresql.connection import connect
    from .facts import database_properties

    with connect(dsn, autocommit=True) as conn:
        restored = database_properties(conn)
    have = {k: restored.get(k) for k in LOCALE_PROPERTIES}
    recorded = manifest.source.get("database_properties") or {}
    problems = [f"the restored database has {name} {have[name]!r}, the backed-up database had {recorded.get(name)!r}"
                for name in LOCALE_PROPERTIES
                if name in recorded and (recorded.get(name) or None) != (have[name] or None)]
    return have, problems


def amcheck_problems(dsn: str, jobs: int, *, all_databases: bool = False) -> list[str]:
    """pg_amcheck over every table and B-tree index of the restored database (`all_databases`: of every database of
    the server `dsn` reaches)."""
    from ...postgresql.connection import OWN_SESSION_SETTINGS, libpq_environment, with_session_settings

    tool = find_pg_tool("pg_amcheck", 14)
    run = subprocess.run([str(tool.path), "--install-missing", f"--jobs={jobs}", "--no-password",
                          *(["--all"] if all_databases else [])],
                         capture_output=True, text=True, check=False,
                         env=with_session_settings(libpq_environment(dsn), OWN_SESSION_SETTINGS))
    if run.returncode == 0:
        return []
    detail = (run.stdout + run.stderr).strip().splitlines()[:20]
    if run.returncode == 2:  # pg_amcheck's exit status when a check found corruption
        return [f"pg_amcheck found corruption: {line}" for line in detail] or ["pg_amcheck found corruption"]
    # anything else: it could not check (the restored data is not known to be corrupt, nor known to be sound)
    return [f"pg_amcheck could not check the restored database (exit code {run.returncode})"
            + (f": {' / '.join(detail)}" if detail else "")]
