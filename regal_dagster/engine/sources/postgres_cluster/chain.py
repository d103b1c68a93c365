"""Incremental base backups (PostgreSQL 17+): the parent an incremental is taken on top of, and the chain
(the full backup, then each incremental) a restore fetches and combines with pg_combinebackup."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import IntegrityError, RegalError, ToolError, UsageError
from ...manifest import Manifest
from ...pipeline import StoredBackup
from .datadir import verify_data_directory

if TYPE_CHECKING:
    from ...crypto import Keyring
    from ...policy import Policy
    from ...storage import Repository

MANIFEST_OBJECT = "backup_manifest"
TAR_OBJECT = "base.tar"
FIRST_INCREMENTAL_MAJOR = 17
ANOTHER_BASE = "restore from another base backup (`regal-backup list TARGET`; --base-backup ID), e.g. a full one"


def require_wal_summaries(facts: dict[str, Any]) -> None:
    """An incremental backup needs PostgreSQL 17+ summarizing its WAL: refused, saying what to change, else."""
    if int(facts["server_version_num"]) < FIRST_INCREMENTAL_MAJOR * 10000:
        raise UsageError(f"the server runs PostgreSQL {facts['server_version']}: incremental base backups need "
                         f"PostgreSQL {FIRST_INCREMENTAL_MAJOR} or newer",
                         "take full base backups (leave out --incremental; set incremental: false in the policy)")
    if facts.get("summarize_wal") != "on":
        raise UsageError("the server does not summarize its WAL (summarize_wal is off): PostgreSQL cannot take an "
                         "incremental base backup", "set summarize_wal = on and reload; the first incremental needs a "
                         "full backup taken after that (`regal-backup backup TARGET --full`)")


@dataclass(frozen=True)
class ParentLink:
    """The backup an incremental is taken on top of, with its PostgreSQL backup_manifest fetched (authenticated)."""

    manifest: Manifest
    backup_manifest: Path

    def facts(self) -> dict[str, Any]:
        """What the incremental's manifest records: its parent, the chain from the full backup, and the SHA-256
        of the parent's backup_manifest it was taken against."""
        return {"backup_type": "incremental", "parent_backup_id": self.manifest.backup_id,
                "chain": [*self.manifest.source.get("chain", []), self.manifest.backup_id],
                "parent_manifest_sha256": self.manifest.source["manifest_sha256"]}


def newest_parent(policy: Policy, repo: Repository, keyring: Keyring, target: str,
                  facts: dict[str, Any]) -> tuple[Manifest | None, str]:
    """The target's newest good base backup (full or incremental; an unchecked one is checked now), when it is of
    this server (system identifier, timeline, major version) and its own chain is whole. Else None, and why."""
    from ...catalog import newest_first
    from ...checks import check_status, run_checks

    for manifest in newest_first(repo, keyring, target):
        status = check_status(repo, keyring, manifest).status
        if status == "unchecked":
            status = "good" if run_checks(policy, repo, keyring, manifest.backup_id,
                                          trigger={"reason": "parent of an incremental"}).passed else "failed"
        if status != "good":
            continue
        source = manifest.source
        same_server = (str(source.get("system_identifier")) == str(facts["system_identifier"])
                       and int(source.get("timeline", -1)) == int(facts["timeline"])
                       and int(source["server_version_num"]) // 10000 == int(facts["server_version_num"]) // 10000)
        if not same_server:
            return None, (f"the newest good base backup, {manifest.backup_id}, is of another server or timeline "
                          f"(system identifier {source.get('system_identifier')}, timeline {source.get('timeline')})")
        try:
            chain_of(StoredBackup(repo, keyring, manifest))
        except RegalError as exc:
            return None, f"the chain of the newest good base backup is broken: {exc.message}"
        return manifest, ""
    return None, "there is no good base backup of this target yet"


@contextlib.contextmanager
def fetched_parent(repo: Repository, keyring: Keyring, parent: Manifest) -> Iterator[ParentLink]:
    """The parent's backup_manifest in a private temporary file, authenticated and matching the SHA-256 its
    manifest recorded."""
    from ...workspace import private_directory

    with private_directory("incremental-parent") as work:
        path = StoredBackup(repo, keyring, parent).to_file(MANIFEST_OBJECT, work / MANIFEST_OBJECT)
        if hashlib.sha256(path.read_bytes()).hexdigest() != parent.source.get("manifest_sha256"):
            raise IntegrityError(f"object {parent.object(MANIFEST_OBJECT).key} differs from the backup manifest "
                                 f"{parent.backup_id} recorded", "take a full backup (`--full`)")
        yield ParentLink(parent, path)


def chain_of(backup: StoredBackup) -> list[StoredBackup]:
    """The backups a restore of `backup` combines, the full one first, `backup` last: each one's manifest
    authenticated, none failed its checks. Refused naming the backup that is missing or failed."""
    from ...catalog import load_manifest
    from ...checks import check_status

    members = [backup]
    for parent_id in reversed(backup.manifest.source.get("chain", [])):
        child = members[0].manifest
        try:
            parent = load_manifest(backup.repo, backup.keyring, parent_id)
        except RegalError as exc:
            raise IntegrityError(f"{child.backup_id} is incremental on top of {parent_id}, which cannot be read: "
                                 f"{exc.message}", ANOTHER_BASE) from None
        if child.source.get("parent_backup_id") != parent_id:
            raise IntegrityError(f"{child.backup_id} records its parent as {child.source.get('parent_backup_id')}, "
                                 f"its chain says {parent_id}", ANOTHER_BASE)
        if check_status(backup.repo, backup.keyring, parent).status == "failed":
            raise IntegrityError(f"{parent_id}, a parent of {backup.manifest.backup_id}, failed its checks",
                                 ANOTHER_BASE)
        members.insert(0, StoredBackup(backup.repo, backup.keyring, parent))
    if members[0].manifest.is_incremental:
        raise IntegrityError(f"the chain of {backup.manifest.backup_id} starts at {members[0].manifest.backup_id}, "
                             "which is incremental, not a full backup", ANOTHER_BASE)
    return members


def check_link(child: Manifest, parent_backup_manifest: bytes, parent: Manifest) -> None:
    """The parent's backup_manifest, as read back now, is the one the incremental was taken against."""
    if hashlib.sha256(parent_backup_manifest).hexdigest() != child.source.get("parent_manifest_sha256"):
        raise IntegrityError(f"object {parent.object(MANIFEST_OBJECT).key}: the backup manifest of {parent.backup_id} "
                             f"is not the one {child.backup_id} was taken on top of", ANOTHER_BASE)


def extract(backup: StoredBackup, directory: Path) -> None:
    """A backup's tar stream unpacked into `directory` (authenticated on the way), its backup_manifest beside."""
    from ..files.source import plaintext_pipe

    with plaintext_pipe(backup, TAR_OBJECT) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        tar.extractall(directory, filter="tar")
    if not (directory / MANIFEST_OBJECT).exists():
        backup.install(MANIFEST_OBJECT, directory / MANIFEST_OBJECT)


def combine_chain(chain: list[StoredBackup], root: Path, server_major: int) -> list[str]:
    """Every backup of the chain unpacked into a private directory inside `root` (so on its filesystem, a mount
    point's too), each checked with pg_verifybackup and its link to its parent, then pg_combinebackup into a
    directory inside `root` whose entries are then moved up into it. The private directories go, also on
    failure. The findings of pg_verifybackup on the members (empty: all hold)."""
    from ...postgresql.tools import pg_tool_for_server
    from ...workspace import private_directory

    problems: list[str] = []
    with contextlib.ExitStack() as stack:
        directories: list[Path] = []
        for position, member in enumerate(chain):
            directory = stack.enter_context(private_directory("chain", root)) / "data"
            directory.mkdir(mode=0o700)
            try:
                extract(member, directory)
            except RegalError as exc:
                raise IntegrityError(f"{member.manifest.backup_id} (in the chain of {chain[-1].manifest.backup_id}): "
                                     f"{exc.message}", ANOTHER_BASE) from None
            if position:
                check_link(member.manifest, (directories[-1] / MANIFEST_OBJECT).read_bytes(),
                           chain[position - 1].manifest)
            problems += [f"{member.manifest.backup_id}: {p}"
                         for p in verify_data_directory(directory, server_major, None)]
            directories.append(directory)
        if problems:
            return problems
        tool = pg_tool_for_server("pg_combinebackup", server_major)
        combined = Path(stack.enter_context(private_directory("combined", root))) / "data"
        _run_combine(tool.path, tool.major, directories, combined)
        for entry in list(combined.iterdir()):
            entry.rename(root / entry.name)
    return []


def _run_combine(program: Path, major: int, directories: list[Path], root: Path) -> None:
    from ...environment import child_environment, die_with_parent

    link = ["--link"] if major >= 18 else []  # hard links from the unpacked chain, which goes right after
    done = subprocess.run([str(program), *link, "--manifest-checksums=SHA256", "-o", str(root),
                           *map(str, directories)], capture_output=True, text=True, check=False,
                          env=child_environment(), timeout=24 * 3600,
                          preexec_fn=die_with_parent)  # only prctl: safe in a threaded parent
    if done.returncode != 0:
        words = [w.strip() for w in (done.stderr or done.stdout).splitlines() if w.strip()]
        raise ToolError(f"pg_combinebackup failed with exit code {done.returncode}: " + " / ".join(words[-3:]),
                        ANOTHER_BASE)

