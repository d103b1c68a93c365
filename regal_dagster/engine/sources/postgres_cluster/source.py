"""The `postgres_cluster` source kind: physical base backups of a whole server."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

from ...errors import IntegrityError, MissingSoftwareError, RegalError, ToolError
from ...findings import Finding
from ...manifest import Manifest
from ...outcomes import ERROR, CheckOutcome, CheckSpec
from ...pipeline import CHUNK, StoredBackup
from ...postgresql.tools import pg_tool_for_server
from ...settings import PolicyView, TargetSettings
from ...workspace import owner_record, recorded_owner_alive, sweep
from ..base import Captured, Restored, RestoredFindings, RestoreRequest, Source, StoreObject
from ..files.source import plaintext_pipe
from .basebackup import (
    MANIFEST_MEMBER,
    BaseBackupRun,
    basebackup_stream,
    manifest_checksum_holds,
    manifest_files,
)
from .chain import (
    ParentLink,
    chain_of,
    check_link,
    combine_chain,
    extract,
    fetched_parent,
    newest_parent,
    require_wal_summaries,
)
from .datadir import RESTORING_MARKER, WAL_COPY, verify_data_directory
from .recovery import ClusterRestoreOptions, write_recovery_settings
from .target import PostgresClusterTarget
from .wal import fetch_wal

if TYPE_CHECKING:
    from ...crypto import Keyring
    from ...policy import Policy
    from ...storage import Repository
    from ..capabilities import ContinuousArchive

TAR_OBJECT = "base.tar"
TAR_CONTENT = "pg_basebackup tar of the data directory (-Ft, WAL from the archive)"
MANIFEST_OBJECT = "backup_manifest"
MANIFEST_CONTENT = "PostgreSQL backup manifest (SHA-256 of every file)"
logger = logging.getLogger(__name__)


def server_facts(dsn: str) -> dict[str, Any]:
    from ...postgresql.connection import connect  # psycopg: only where a server is reached

    with connect(dsn) as conn:
        row = conn.execute(
            "SELECT current_setting('server_version_num')::int, current_setting('server_version'), "
            "(SELECT system_identifier::text FROM pg_control_system()), "
            "current_setting('wal_segment_size'), current_setting('wal_level'), "
            "(SELECT timeline_id FROM pg_control_checkpoint()), current_setting('summarize_wal', true)").fetchone()
        databases = [r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE datallowconn ORDER BY datname").fetchall()]
    assert row is not None
    return {"server_version_num": row[0], "server_version": row[1], "system_identifier": row[2],
            "wal_segment_size": _bytes(row[3]), "wal_level": row[4], "timeline": row[5], "summarize_wal": row[6],
            "databases": databases}


def _bytes(setting: str) -> int:
    units = {"kB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3}
    for unit, factor in units.items():
        if setting.endswith(unit):
            return int(setting[:-len(unit)]) * factor
    return int(setting)


class PostgresClusterSource(Source):
    kind = "postgres_cluster"
    label = "PostgreSQL server (physical)"
    checks: ClassVar[dict[str, CheckSpec]] = {
        "wal_continuity": CheckSpec(
            ERROR, False, "The WAL archive holds every segment from the oldest kept base backup's start to the newest "
                          "stored one, and pg_waldump reads every record of it: a restore can reach any point.",
            bounds_recovery=True),
    }
    restore_test_proves = ("every file of the data directory against PostgreSQL's backup manifest (pg_verifybackup); "
                           "recoveries to the newest point, a random earlier one and a named restore point (its "
                           "facts exact), each promoted where asked, every database opened and pg_amcheck clean")

    def capture(self, target: TargetSettings, store: StoreObject) -> Captured:
        from .standby import backup_server  # psycopg: only where a server is reached

        server = backup_server(cast(PostgresClusterTarget, target))
        return self._capture(server.dsn, {**server_facts(server.dsn), **server.facts()}, store, None)

    def capture_incremental(self, policy: PolicyView, repo: Repository, keyring: Keyring, target_name: str,
                            target: TargetSettings, store: StoreObject) -> Captured:
        """pg_basebackup --incremental on top of the target's newest good base backup of this server; a full
        backup (saying so in `incremental_note`) when there is none, as pgBackRest does."""
        from .standby import backup_server

        server = backup_server(cast(PostgresClusterTarget, target))
        dsn = server.dsn
        facts = {**server_facts(dsn), **server.facts()}
        require_wal_summaries(facts)
        parent, why_not = newest_parent(cast("Policy", policy), repo, keyring, target_name, facts)  # the whole one
        if parent is None:
            facts["incremental_note"] = f"{why_not}: took a full base backup instead of an incremental"
            return self._capture(dsn, facts, store, None)
        with fetched_parent(repo, keyring, parent) as link:
            return self._capture(dsn, facts, store, link)

    def _capture(self, dsn: str, facts: dict[str, Any], store: StoreObject, parent: ParentLink | None) -> Captured:
        from ...postgresql.connection import libpq_environment
        from .archiver import refuse_stuck_archiver, stuck_archiver_error, watch_archiver

        tool = pg_tool_for_server("pg_basebackup", facts["server_version_num"] // 10000)
        run = BaseBackupRun()
        refuse_stuck_archiver(dsn)
        with basebackup_stream(tool, libpq_environment(dsn), run,
                               parent.backup_manifest if parent else None) as chunks, \
                watch_archiver(dsn, cast("subprocess.Popen[bytes]", run.process)) as stuck:
            try:
                tar = store(TAR_OBJECT, TAR_CONTENT, chunks, -1)
            except ToolError as exc:
                raise (stuck_archiver_error(stuck) if stuck else exc) from exc
        manifest = store(MANIFEST_OBJECT, MANIFEST_CONTENT, [run.manifest], 0)
        files = manifest_files(run.manifest)
        facts.update(run.facts)
        facts.update(parent.facts() if parent else {"backup_type": "full"})
        facts.update(files=len(files), bytes=sum(int(f.get("Size", 0)) for f in files.values()),
                     manifest_sha256=hashlib.sha256(run.manifest).hexdigest())
        return Captured([tar, manifest], facts, {"pg_basebackup": tool.version})

    def preflight(self, subject: str, target: TargetSettings) -> list[Finding]:
        from .preflight import preflight

        return preflight(subject, cast(PostgresClusterTarget, target))

    def check_structure(self, backup: StoredBackup) -> str:
        """Every file of the tar stream against PostgreSQL's backup manifest (sizes and SHA-256), and the
        manifest's own checksum: what pg_verifybackup proves, without writing the data directory anywhere."""
        manifest = backup.read(MANIFEST_OBJECT)
        where = f"object {backup.manifest.object(TAR_OBJECT).key}"
        if not manifest_checksum_holds(manifest):
            raise IntegrityError(f"object {backup.manifest.object(MANIFEST_OBJECT).key}: the backup manifest's own "
                                 "checksum does not hold", "this backup is damaged: use another one")
        expected = manifest_files(manifest)
        seen = 0
        try:
            with plaintext_pipe(backup, TAR_OBJECT) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    if not member.isfile() or member.name == MANIFEST_MEMBER:
                        continue
                    facts = expected.pop(member.name, None)
                    if facts is None:
                        raise IntegrityError(f"{where} holds {member.name}, which the backup manifest does not list",
                                             "this backup is damaged: use another one")
                    content = tar.extractfile(member)
                    assert content is not None
                    digest = hashlib.sha256()
                    while chunk := content.read(CHUNK):
                        digest.update(chunk)
                    if member.size != int(facts["Size"]) or digest.hexdigest() != facts.get("Checksum"):
                        raise IntegrityError(f"{where}: {member.name} differs from the backup manifest's size and "
                                             "SHA-256", "this backup is damaged: use another one")
                    seen += 1
        except tarfile.TarError as exc:
            raise IntegrityError(f"{where} is not a readable tar stream ({exc})",
                                 "this backup is damaged: use another one") from None
        if expected:
            raise IntegrityError(f"{where} lacks {len(expected)} file(s) the backup manifest lists, first "
                                 f"{min(expected)}", "this backup is damaged: use another one")
        held = f"the tar stream holds the {seen} files of PostgreSQL's backup manifest with their SHA-256"
        if len(chain := chain_of(backup)) > 1:
            check_link(backup.manifest, chain[-2].read(MANIFEST_OBJECT), chain[-2].manifest)
            held += (f"; incremental on top of {chain[-2].manifest.backup_id}, whose backup manifest is the one it was "
                     f"taken against; its chain ({len(chain) - 1} backup(s) down to the full "
                     f"{chain[0].manifest.backup_id}) is in the repository")
        return held

    def kind_checks(self, policy: PolicyView, target: str, manifest: Manifest,
                    earlier_good: Iterator[Manifest], trigger: Mapping[str, str]) -> list[CheckOutcome]:
        from ...catalog import newest_first
        from ...crypto import load_keyring
        from ...storage import open_repository
        from ...workspace import private_directory
        from .walcontinuity import check_continuity

        repo, keyring = open_repository(policy), load_keyring(policy)
        oldest = manifest
        for kept in newest_first(repo, keyring, target):
            oldest = kept
        try:
            with private_directory("wal-continuity") as work:
                found = check_continuity(cast("Policy", policy), repo, keyring, oldest, work, trigger)
        except RegalError as exc:
            return [CheckOutcome("wal_continuity", False, f"the WAL could not be checked: {exc.message}")]
        return [CheckOutcome("wal_continuity", found.ok, found.description, failing_object=found.missing,
                             metadata={"parsed_to": found.parsed_to, "from_backup": oldest.backup_id,
                                       **found.metadata, **({"integrity_failure": True} if found.damaged else {})})]

    def plaintext_needles(self, manifest: Manifest) -> list[bytes]:
        return [b"PostgreSQL-Backup-Manifest-Version", b"postgresql.auto.conf"]

    def summary(self, manifest: Manifest) -> dict[str, Any]:
        source = manifest.source
        return {"start_lsn": source.get("start_lsn"), "stop_lsn": source.get("stop_lsn"),
                "timeline": source.get("timeline"), "databases": len(source.get("databases", [])),
                "backup_type": source.get("backup_type", "full"), "parent_backup_id": source.get("parent_backup_id"),
                "taken_from": (f"{source['backup_from']} {source.get('backup_server', '')}".strip()
                               if source.get("backup_from") else None)}

    def restore(self, backup: StoredBackup, request: RestoreRequest) -> Restored:
        """The data directory at `request.to`, checked with pg_verifybackup, configured to recover from the WAL
        archive as its options say (pitr.py decides them)."""
        options = request.kind_options(ClusterRestoreOptions)
        recovery, recovery_wal = options.recovery, options.wal_files
        if recovery is None:  # this backup as it was when it ended, its own WAL copied in: self-contained
            recovery = {"restore_command": f"cp {WAL_COPY}/%f %p", "recovery_target": "immediate",
                        "recovery_target_action": "promote", "archive_mode": "off"}
            recovery_wal = own_wal(backup)
        root = Path(request.to)
        _clear_killed_restore(root)
        if root.exists() and any(root.iterdir()):
            raise RegalError(f"{root} is not empty", "give a new or empty directory for the data directory")
        created = not root.exists()
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        root.chmod(0o700)
        major = backup.manifest.source["server_version_num"] // 10000
        chain = chain_of(backup)  # refused before anything is written when a parent is missing or failed
        with _discarded_on_failure(root, created):
            (root / RESTORING_MARKER).write_text(json.dumps(owner_record()))  # removed last
            if request.before_writing:
                request.before_writing()
            started = time.monotonic()
            if len(chain) == 1:
                extract(backup, root)
            elif problems := combine_chain(chain, root, major):
                return Restored(str(root), f"the chain of {backup.manifest.backup_id} failed pg_verifybackup: "
                                           "nothing was combined", problems, {"extract": time.monotonic() - started},
                                {"chain": [m.manifest.backup_id for m in chain]})
            (root / "pg_wal" / "archive_status").mkdir(parents=True, exist_ok=True)
            seconds = {"extract" if len(chain) == 1 else "extract_and_combine": time.monotonic() - started}
            wal_dir = None
            if recovery_wal is not None:
                started = time.monotonic()
                wal_dir = root / WAL_COPY
                wal_dir.mkdir(mode=0o700)
                for name in recovery_wal:
                    fetch_wal(backup.repo, backup.keyring, backup.manifest.target, name, wal_dir / name)
                seconds["copy_wal"] = time.monotonic() - started
            started = time.monotonic()
            problems = verify_data_directory(root, major, wal_dir)
            seconds["pg_verifybackup"] = time.monotonic() - started
            for runtime in root.glob(".s.PGSQL.*"):  # the lock of a socket that lived in the data directory: a
                runtime.unlink()  # server's runtime state, which would stop the restored server from starting
            write_recovery_settings(root, recovery)
            (root / RESTORING_MARKER).unlink()  # the last step: from now on it is a restored data directory
        combined = (f", combined with pg_combinebackup from {' + '.join(m.manifest.backup_id for m in chain)}"
                    if len(chain) > 1 else "")
        return Restored(str(root), f"restored {backup.manifest.backup_id} into {root}{combined}: "
                                   f"{backup.manifest.source.get('files', 0)} files, checked with pg_verifybackup; "
                                   "recovery configured", problems, seconds,
                        {"data_directory": str(root), "chain": [m.manifest.backup_id for m in chain]})

    def backup_asset_path(self, target: str) -> list[str]:
        return ["postgres", target, "base_backup"]  # a server's physical base backups; its WAL is postgres/<target>/wal

    def continuous_archive(self) -> ContinuousArchive:
        from .continuous_archive import WalArchive

        return WalArchive()

    @contextlib.contextmanager
    def scratch_destination(self, work_dir: Path | None, manifest: Manifest | None = None) -> Iterator[str]:
        from ...workspace import private_directory

        with private_directory("cluster-test", work_dir) as tmp:
            yield str(tmp / "data")

    def verify_restored(self, destination: str, manifest: Manifest, keyring: Keyring, jobs: int) -> RestoredFindings:
        """Start PostgreSQL of the backup's major version on the restored data directory (a scratch server on a
        private socket): it recovers to the backup's end and is promoted; then every database the backup held
        accepts connections."""
        from .recovered import database_problems, open_databases, recovered_server

        started = time.monotonic()
        problems: list[str] = []
        details: dict[str, Any] = {}
        try:
            with recovered_server(Path(destination), manifest) as cluster:
                promoted = time.monotonic() - started
                found = open_databases(cluster)
                problems += database_problems(found, manifest)
                details = {"databases": found}
        except MissingSoftwareError:  # this machine cannot start it: nothing is known about the backup
            raise
        except RegalError as exc:
            problems.append(exc.message)
            promoted = time.monotonic() - started
        return RestoredFindings(problems, details, {"recovery_to_promotion": promoted})


def _clear_killed_restore(root: Path) -> None:
    """Empty `root` when a restore that was killed (SIGKILL, a power cut) left it half-written, and remove the
    chain directories such a restore left beside it: the next restore needs no cleaning up by hand."""
    if root.parent.is_dir():
        sweep(root.parent)
    marker = root / RESTORING_MARKER
    if not marker.exists():
        return
    if recorded_owner_alive(marker):
        raise RegalError(f"{root} is being restored by another process", "wait for it, or restore elsewhere")
    logger.warning("%s was left half-restored by a restore that did not finish: emptied", root)
    _empty(root)


def _empty(root: Path) -> None:
    for child in list(root.iterdir()):
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


@contextlib.contextmanager
def _discarded_on_failure(root: Path, created: bool) -> Iterator[None]:
    """A restore that fails (a WAL file that fails authentication, a stopped extraction) leaves no data directory
    that looks restored: what it wrote is removed (the directory too when the restore made it)."""
    try:
        yield
    except BaseException:
        if created:
            shutil.rmtree(root, ignore_errors=True)
        else:
            _empty(root)
        raise


def own_wal(backup: StoredBackup) -> list[str]:
    """The archived WAL this base backup needs to be consistent (its start to its stop position) and the timeline
    history files: refused, naming the first missing segment, when the archive lacks one."""
    from .wal import archived_names, parse_lsn, segment_name_of

    source = backup.manifest.source
    size, timeline = int(source["wal_segment_size"]), int(source["timeline"])
    names = archived_names(backup.repo, backup.manifest.target)
    needed = [segment_name_of(timeline, n, size)
              for n in range(parse_lsn(source["start_lsn"]) // size, parse_lsn(source["stop_lsn"]) // size + 1)]
    missing = [n for n in needed if n not in names]
    if missing:
        raise RegalError(f"the WAL archive of {backup.manifest.target} lacks {missing[0]}, which "
                         f"{backup.manifest.backup_id} needs to be consistent", "restore from another base backup")
    return sorted(n for n in names if n.endswith(".history")) + needed
