"""The `config` source kind."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

from ...crypto import Keyring
from ...errors import IntegrityError, RegalError
from ...findings import Finding, finding
from ...manifest import Manifest
from ...pipeline import StoredBackup
from ...settings import TargetSettings
from ...workspace import private_directory
from ..base import Captured, Restored, RestoredFindings, RestoreRequest, Source, StoreObject
from ..streams import file_chunks
from .extras import capture_extras, extras_problems, install_extras
from .git import (
    BUNDLE_CONTENT,
    BUNDLE_OBJECT,
    LOCK_PREFIX,
    bundle_stream,
    clone,
    clone_refs,
    cloned_state,
    git_version,
    head,
    repository_facts,
    restore_stash_entries,
    verify_bundle,
)
from .target import ConfigTarget

LOCK_FILES_DIR = "restored-lock-files"


class ConfigSource(Source):
    kind = "config"
    label = "configuration repository"
    restore_test_proves = "every ref and HEAD of a clone, its .git/config, hooks and Git LFS objects"

    def capture(self, target: TargetSettings, store: StoreObject) -> Captured:
        settings = cast(ConfigTarget, target)
        repo_path = Path(settings.repository).expanduser()
        facts = repository_facts(repo_path, settings.lock_files)
        objects = [store(BUNDLE_OBJECT, BUNDLE_CONTENT, bundle_stream(repo_path, facts["stash"]), 0)]
        objects += [store(LOCK_PREFIX + name, f"dependency lock file {name}", file_chunks(repo_path / name), 0)
                    for name in facts["lock_files"]]
        # the keyed fingerprint of each lock file's object: never a bare SHA-256 of data in the repository
        facts["lock_files"] = {name: record.plaintext_sha256 for name, record in zip(
            facts["lock_files"], objects[1:], strict=True)}
        extras, extra_facts = capture_extras(repo_path, lambda name, what, path: store(name, what, file_chunks(path),
                                                                                         0))
        tools = {"git": git_version(), **({"git-lfs": extra_facts["lfs"]["git_lfs"]}
                                          if extra_facts["lfs"] and extra_facts["lfs"]["git_lfs"] else {})}
        return Captured(objects + extras, {**facts, **extra_facts}, tools)

    def preflight(self, subject: str, target: TargetSettings) -> list[Finding]:
        settings = cast(ConfigTarget, target)
        return [finding(subject, "git", git_version, "install git"),
                finding(subject, "repository", lambda: f"{settings.repository} at {head(Path(settings.repository))}",
                        "fix repository: in the policy (a git repository this user can read)")]

    def check_structure(self, backup: StoredBackup) -> str:
        manifest = backup.manifest
        with private_directory("check") as tmp:
            verify_bundle(backup.to_file(BUNDLE_OBJECT, Path(tmp) / BUNDLE_OBJECT))
        for name, digest in manifest.source.get("lock_files", {}).items():
            if manifest.object(LOCK_PREFIX + name).plaintext_sha256 != digest:
                raise IntegrityError(f"lock file {name}: its object and the manifest's hash differ",
                                     "this backup is damaged: use another one")
        return f"git bundle verify accepts {len(manifest.source.get('refs', {}))} refs"

    def summary(self, manifest: Manifest) -> dict[str, Any]:
        return {"refs": len(manifest.source.get("refs", {}))}

    def restore(self, backup: StoredBackup, request: RestoreRequest) -> Restored:
        """A clone of the bundle (every ref), and the lock files as they were beside it."""
        manifest = backup.manifest
        destination = Path(request.to)
        if destination.exists() and any(destination.iterdir()):
            raise RegalError(f"{destination} is not empty", "clone into a new directory")
        started = time.monotonic()
        if request.before_writing:
            request.before_writing()
        with private_directory("restore") as tmp:
            cloned = clone(backup.to_file(BUNDLE_OBJECT, Path(tmp) / BUNDLE_OBJECT), destination,
                               every_ref="all_refs" in manifest.source)
            if stash := manifest.source.get("stash"):
                restore_stash_entries(destination, stash)
        install_extras(destination, manifest.source, backup.install)
        for name in manifest.source.get("lock_files", {}):
            path = destination / LOCK_FILES_DIR / name
            path.parent.mkdir(parents=True, exist_ok=True)
            backup.install(LOCK_PREFIX + name, path)
        not_carried = "".join(f"\nnot in the backup: {note}" for note in manifest.source.get("not_carried", []))
        return Restored(str(destination), f"restored {manifest.backup_id}: cloned {len(cloned['refs'])} refs into "
                                          f"{destination} (HEAD {cloned['head'][:12]}) with its .git/config, "
                                          f"{len(manifest.source.get('hooks', {}))} hook(s) and "
                                          f"{len((manifest.source.get('lfs') or {}).get('objects', {}))} Git LFS "
                                          f"object(s); lock files as they were in {LOCK_FILES_DIR}/{not_carried}",
                        seconds={"clone": time.monotonic() - started}, details={"path": str(destination), **cloned})

    @contextlib.contextmanager
    def scratch_destination(self, work_dir: Path | None, manifest: Manifest | None = None) -> Iterator[str]:
        with private_directory("config-test", work_dir) as tmp:
            yield str(Path(tmp) / "clone")

    def verify_restored(self, destination: str, manifest: Manifest, keyring: Keyring, jobs: int) -> RestoredFindings:
        """Every ref, stash entry and HEAD of the clone as recorded (every ref: notes, stash and custom ones too)."""
        cloned: dict[str, Any]
        if "all_refs" in manifest.source:  # branches and tags peeled to their commits, as `refs` has them
            expected = {**manifest.source["all_refs"], **manifest.source["refs"]}
            cloned = cloned_state(Path(destination))
        else:  # backups from before every ref was recorded: branches and tags
            cloned = clone_refs(Path(destination))
            expected = manifest.source["refs"]
        problems = [f"ref {name} is {cloned['refs'].get(name)} in the clone, {commit} in the backup"
                    for name, commit in sorted(expected.items()) if cloned["refs"].get(name) != commit]
        problems += [f"the clone has {name}, which the backup did not record"
                     for name in sorted(set(cloned["refs"]) - set(expected))]
        if "stash" in manifest.source and cloned["stash"] != manifest.source["stash"]:
            problems.append(f"the clone's stash has {len(cloned['stash'])} entries "
                            f"{[e['commit'][:12] for e in cloned['stash']]}, the backup's "
                            f"{len(manifest.source['stash'])} {[e['commit'][:12] for e in manifest.source['stash']]}")
        if cloned["head"] != manifest.source["head"]:
            problems.append(f"HEAD is {cloned['head']} in the clone, {manifest.source['head']} in the backup")
        problems += extras_problems(Path(destination), manifest.source, keyring.fingerprint_matches)
        return RestoredFindings(problems, {**cloned, "not_carried": manifest.source.get("not_carried", [])})
