"""Application configuration kept in git: a bundle of all refs, plus the dependency lock files.

`git bundle create - --all` streams every ref and the objects they reach, plus the older stash entries
(they live only in the reflog of refs/stash, which no bundle carries as refs); the manifest records each
ref, the stash entries and HEAD's commit. The lock files the runbook names (requirements.txt, poetry.lock, uv.lock when
present) are stored as their own objects, with their SHA-256 in the manifest. `git bundle verify`
checks a stored bundle; a restore clones from it.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...environment import child_environment
from ...errors import RegalError, ToolError
from ..streams import stream_command

BUNDLE_OBJECT = "config.bundle"
BUNDLE_CONTENT = "git bundle of all refs"
LOCK_PREFIX = "lock/"


def _git(repo: Path, *args: str) -> str:
    try:
        run = subprocess.run(["git", "-C", str(repo), *args], env=child_environment(), capture_output=True, text=True,
                             check=False)
    except FileNotFoundError:
        raise ToolError("git is not installed", "install git") from None
    if run.returncode != 0:
        raise RegalError(f"git {args[0]} failed in {repo}: {run.stderr.strip()[-300:]}",
                         "check the target's `repository` path: it must be a git repository")
    return run.stdout


def git_version() -> str:
    run = subprocess.run(["git", "--version"], env=child_environment(), capture_output=True, text=True, check=False)
    return run.stdout.strip().removeprefix("git version ")


def refs(repo: Path) -> dict[str, str]:
    """ref name -> commit, for every branch and tag (tags peeled to their commits)."""
    out = _git(repo, "for-each-ref", "--format=%(refname) %(objectname) %(*objectname)", "refs/heads", "refs/tags")
    found = {}
    for line in out.splitlines():
        name, obj, peeled = (line.split(" ") + [""])[:3]
        found[name] = peeled or obj
    return found


def all_refs(repo: Path) -> dict[str, str]:
    """Every ref under refs/ (branches, tags, notes, stash, remote-tracking and custom refs) -> the object
    it points at (not peeled): everything `git bundle create --all` carries."""
    out = _git(repo, "for-each-ref", "--format=%(refname) %(objectname)", "refs/")
    return dict(line.rsplit(" ", 1) for line in out.splitlines() if line)


def stash_entries(repo: Path) -> list[dict[str, str]]:
    """`git stash list`, newest first: each entry's commit and message (stash@{0} is refs/stash itself)."""
    if not all_refs(repo).get("refs/stash"):
        return []
    out = _git(repo, "log", "-g", "--format=%H %gs", "refs/stash", "--")
    return [{"commit": commit, "message": message}
            for commit, _, message in (line.partition(" ") for line in out.splitlines() if line)]


def restore_stash_entries(clone: Path, entries: list[dict[str, str]]) -> None:
    """Rebuild refs/stash's reflog in a clone holding the bundle's objects: oldest entry first, as
    `git stash store` pushes each one on top."""
    _git(clone, "update-ref", "-d", "refs/stash")
    for entry in reversed(entries):
        _git(clone, "stash", "store", "-m", entry["message"], entry["commit"])


def head(repo: Path) -> str:
    return _git(repo, "rev-parse", "HEAD").strip()


def repository_facts(repo: Path, lock_files: list[str]) -> dict[str, Any]:
    head = _git(repo, "rev-parse", "HEAD").strip()
    branch = _git(repo, "symbolic-ref", "--quiet", "--short", "HEAD").strip() if _has_branch(repo) else None
    locks = {name: hashlib.sha256((repo / name).read_bytes()).hexdigest()
             for name in lock_files if (repo / name).is_file()}
    return {"repository": str(repo), "head": head, "branch": branch, "refs": refs(repo), "all_refs": all_refs(repo),
            "stash": stash_entries(repo), "lock_files": locks}


def _has_branch(repo: Path) -> bool:
    return subprocess.run(["git", "-C", str(repo), "symbolic-ref", "--quiet", "HEAD"], env=child_environment(),
                          capture_output=True, check=False).returncode == 0


def bundle_stream(repo: Path, stash: list[dict[str, str]]) -> Iterator[bytes]:
    """Every ref and what it reaches, and the older stash entries' commits (objects only: no ref names them)."""
    older_stashes = [entry["commit"] for entry in stash[1:]]
    return stream_command(["git", "-C", str(repo), "bundle", "create", "-", "--all", *older_stashes],
                          child_environment(), "git bundle")


def verify_bundle(bundle: Path) -> None:
    """`git bundle verify`, inside an empty repository (git wants one to check prerequisites against)."""
    scratch = bundle.parent / "verify-repository"
    subprocess.run(["git", "init", "-q", str(scratch)], env=child_environment(), capture_output=True, check=True)
    run = subprocess.run(["git", "-C", str(scratch), "bundle", "verify", str(bundle)], env=child_environment(),
                         capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise ToolError(f"git bundle verify rejects the bundle: {run.stderr.strip()[-300:]}",
                        "the backup is damaged: use another one")


NO_LFS_FILTER = ("-c", "filter.lfs.process=", "-c", "filter.lfs.smudge=cat", "-c", "filter.lfs.required=false")
"""A checkout from a bundle leaves Git LFS pointer files as they are, whatever the machine's git config says (a
system-wide `git lfs install` would otherwise fetch each object from a server a restore must not depend on,
or fail where git-lfs is missing): the objects themselves are carried beside the bundle (extras.py)."""


def clone(bundle: Path, destination: Path, every_ref: bool = False) -> dict[str, Any]:
    """Clone the bundle into `destination`; returns the clone's refs and HEAD. With `every_ref`, the clone
    then holds exactly the bundle's refs (every branch, tag, note, stash and custom ref, as refs of its
    own; no remote-tracking refs of the bundle), as the repository backed up had them."""
    run = subprocess.run(["git", *NO_LFS_FILTER, "clone", "--quiet", str(bundle), str(destination)],
                         env=child_environment(), capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise ToolError(f"git clone from the bundle failed: {run.stderr.strip()[-300:]}", "use another backup")
    if not every_ref:
        return clone_refs(destination)
    _git(destination, "remote", "remove", "origin")
    fetched = subprocess.run(["git", "-C", str(destination), "fetch", "--quiet", "--update-head-ok", "--no-tags",
                              str(bundle), "+refs/*:refs/*"], env=child_environment(), capture_output=True, text=True,
                             check=False)
    if fetched.returncode != 0:
        raise ToolError(f"git fetch of every ref from the bundle failed: {fetched.stderr.strip()[-300:]}",
                        "use another backup")
    return {"refs": all_refs(destination), "head": _git(destination, "rev-parse", "HEAD").strip()}


def cloned_state(clone: Path) -> dict[str, Any]:
    """A full clone's every ref (branches and tags peeled as `refs` has them), stash entries and HEAD."""
    return {"refs": {**all_refs(clone), **refs(clone)}, "stash": stash_entries(clone), "head": head(clone)}


def clone_refs(clone: Path) -> dict[str, Any]:
    """A clone's refs as they were in the repository it was cloned from (its branches are remote-tracking
    refs of `origin` there), and its HEAD."""
    heads = {f"refs/heads/{name.removeprefix('refs/remotes/origin/')}": commit
             for name, commit in _remote_refs(clone).items()}
    tags = {name: commit for name, commit in refs(clone).items() if name.startswith("refs/tags/")}
    return {"refs": {**heads, **tags}, "head": _git(clone, "rev-parse", "HEAD").strip()}


def _remote_refs(repo: Path) -> dict[str, str]:
    out = _git(repo, "for-each-ref", "--format=%(refname) %(objectname)", "refs/remotes/origin")
    return {name: obj for name, obj in (line.split(" ") for line in out.splitlines())
            if not name.endswith("/HEAD")}
