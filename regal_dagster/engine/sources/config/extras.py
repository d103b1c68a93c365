"""What a git bundle does not carry, carried beside it: the repository's own `.git/config` (its remotes, branch
tracking, settings), its hooks (every file of its hooks directory but git's `*.sample` files, with the executable
bit) and its Git LFS objects (the files of its local LFS store, `.git/lfs/objects`, each named by its content's
SHA-256). What cannot be carried is said by name in the manifest (`not_carried`), the backup's output and the
restore's summary: LFS objects the repository refers to that its local store lacks, or the whole of LFS when
`git lfs` is not installed to list them.

A restore puts them back in the clone (`install_extras`); a restore test compares them (`extras_problems`).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...environment import child_environment
from ...manifest import ObjectRecord
from ..streams import file_chunks

GIT_CONFIG_OBJECT = "git/config"
HOOK_PREFIX = "git/hooks/"
LFS_PREFIX = "git/lfs/"
_LFS_OID = re.compile(r"[0-9a-f]{64}")

StoreFile = Callable[[str, str, Path], ObjectRecord]
"""Stores one file of the repository: (object name, what it is, path) -> its record."""
InstallObject = Callable[[str, Path], object]
"""Writes one stored object to a path (authenticated on the way)."""


def _git_path(repo: Path, name: str) -> Path:
    """A path inside the repository's git directory as git resolves it (core.hooksPath for hooks, a worktree's
    common directory)."""
    run = subprocess.run(["git", "-C", str(repo), "rev-parse", "--path-format=absolute", "--git-path", name],
                         env=child_environment(), capture_output=True, text=True, check=False)
    return Path(run.stdout.strip()) if run.returncode == 0 and run.stdout.strip() else repo / ".git" / name


def git_lfs_version() -> str | None:
    """`git lfs version`, None when Git LFS is not installed."""
    try:
        run = subprocess.run(["git", "lfs", "version"], env=child_environment(), capture_output=True, text=True,
                             check=False, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return run.stdout.strip() if run.returncode == 0 else None


def _lfs_used(repo: Path) -> bool:
    """Whether the repository uses Git LFS: an LFS store, or a .gitattributes at HEAD naming the lfs filter."""
    if _git_path(repo, "lfs").is_dir():
        return True
    run = subprocess.run(["git", "-C", str(repo), "grep", "-q", "filter=lfs", "HEAD", "--", ".gitattributes",
                          "**/.gitattributes"], env=child_environment(), capture_output=True, check=False)
    return run.returncode == 0


def _lfs_referenced(repo: Path) -> set[str] | None:
    """Every LFS object any ref refers to (`git lfs ls-files --all --long`); None without git lfs."""
    run = subprocess.run(["git", "-C", str(repo), "lfs", "ls-files", "--all", "--long"], env=child_environment(),
                         capture_output=True, text=True, check=False)
    if run.returncode != 0:
        return None
    return {line.split()[0] for line in run.stdout.splitlines() if line.split() and _LFS_OID.fullmatch(line.split()[0])}


def _lfs_store(repo: Path) -> dict[str, Path]:
    """The local LFS store's objects: oid -> file (`lfs/objects/<oid[:2]>/<oid[2:4]>/<oid>`)."""
    root = _git_path(repo, "lfs") / "objects"
    if not root.is_dir():
        return {}
    return {path.name: path for path in sorted(root.glob("??/??/*"))
            if _LFS_OID.fullmatch(path.name) and path.is_file() and not path.is_symlink()}


def capture_extras(repo: Path, store: StoreFile) -> tuple[list[ObjectRecord], dict[str, Any]]:
    """Store the repository's .git/config, hooks and LFS objects; (their records, the manifest's facts:
    `git_config`, `hooks`, `lfs`, `not_carried`)."""
    records: list[ObjectRecord] = []
    not_carried: list[str] = []
    config = _git_path(repo, "config")
    facts: dict[str, Any] = {"git_config": None, "hooks": {}, "lfs": None, "not_carried": not_carried}
    if config.is_file():
        records.append(store(GIT_CONFIG_OBJECT, "the repository's own .git/config", config))
        facts["git_config"] = records[-1].plaintext_sha256
    hooks = _git_path(repo, "hooks")
    for path in sorted(hooks.iterdir()) if hooks.is_dir() else []:
        if path.name.endswith(".sample"):
            continue
        if not path.is_file() or path.is_symlink():
            not_carried.append(f"hook {path.name}: not a regular file ({path}), not carried")
            continue
        records.append(store(HOOK_PREFIX + path.name, f"hook {path.name}", path))
        facts["hooks"][path.name] = {"sha256": records[-1].plaintext_sha256,
                                     "executable": bool(path.stat().st_mode & stat.S_IXUSR)}
    if _lfs_used(repo):
        records += _capture_lfs(repo, store, facts, not_carried)
    return records, facts


def _capture_lfs(repo: Path, store: StoreFile, facts: dict[str, Any], not_carried: list[str]) -> list[ObjectRecord]:
    stored = _lfs_store(repo)
    version = git_lfs_version()
    records = [store(LFS_PREFIX + oid, f"Git LFS object {oid}", path) for oid, path in stored.items()]
    facts["lfs"] = {"git_lfs": version, "objects": {oid: path.stat().st_size for oid, path in stored.items()}}
    if version is None:
        not_carried.append(f"Git LFS objects: the repository uses Git LFS but `git lfs` is not installed here "
                           f"(`git lfs version` fails), so which objects its refs need cannot be listed; only the "
                           f"{len(stored)} object(s) of its local store were carried. Install git-lfs on the backup "
                           "host to have them checked")
        return records
    missing = sorted((_lfs_referenced(repo) or set()) - set(stored))
    if missing:
        not_carried.append(f"Git LFS objects {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
                           f"({len(missing)} in all): the repository's refs refer to them but its local store lacks "
                           "them (run `git lfs fetch --all` in the repository before the backup)")
    return records


def _clone_git_dir(clone: Path) -> Path:
    """A restored clone's git directory: where its config, hooks and LFS store go (never where the carried config's
    core.hooksPath points: a restore writes inside its destination only)."""
    run = subprocess.run(["git", "-C", str(clone), "rev-parse", "--absolute-git-dir"], env=child_environment(),
                         capture_output=True, text=True, check=False)
    return Path(run.stdout.strip()) if run.returncode == 0 and run.stdout.strip() else clone / ".git"


def install_extras(destination: Path, facts: dict[str, Any], install: InstallObject) -> None:
    """Put the carried hooks, LFS objects and .git/config (last) into the restored clone `destination`."""
    git_dir = _clone_git_dir(destination)
    for name, hook in facts.get("hooks", {}).items():
        path = git_dir / "hooks" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        install(HOOK_PREFIX + name, path)
        os.chmod(path, 0o755 if hook["executable"] else 0o644)
    for oid in (facts.get("lfs") or {}).get("objects", {}):
        path = git_dir / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
        path.parent.mkdir(parents=True, exist_ok=True)
        install(LFS_PREFIX + oid, path)
    if facts.get("git_config"):
        install(GIT_CONFIG_OBJECT, git_dir / "config")


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    for chunk in file_chunks(path):
        digest.update(chunk)
    return digest.hexdigest()


def extras_problems(clone: Path, facts: dict[str, Any], matches: Callable[[str, str], bool]) -> list[str]:
    """Where the restored clone's .git/config, hooks and LFS objects differ from the backed-up repository's
    (`matches(recorded fingerprint, SHA-256 of the clone's file)`: the keyring's fingerprint_matches)."""
    def same(recorded: str, path: Path) -> bool:
        digest = _sha256(path)
        return digest is not None and matches(recorded, digest)

    problems = []
    git_dir = _clone_git_dir(clone)
    if facts.get("git_config") and not same(facts["git_config"], git_dir / "config"):
        problems.append("the clone's .git/config differs from the repository's")
    for name, hook in sorted(facts.get("hooks", {}).items()):
        path = git_dir / "hooks" / name
        if not same(hook["sha256"], path):
            problems.append(f"hook {name} is {'missing' if not path.exists() else 'different'} in the clone")
        elif bool(path.stat().st_mode & stat.S_IXUSR) != hook["executable"]:
            problems.append(f"hook {name} is {'not ' if hook['executable'] else ''}executable in the clone")
    for oid in sorted((facts.get("lfs") or {}).get("objects", {})):
        if _sha256(git_dir / "lfs" / "objects" / oid[:2] / oid[2:4] / oid) != oid:
            problems.append(f"Git LFS object {oid} is missing or damaged in the clone")
    return problems
