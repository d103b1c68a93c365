"""What a git bundle does not carry: the repository's own .git/config, its hooks and its Git LFS objects are backed
up beside it, put back by a restore and compared by the restore test; what cannot be carried is named in the
manifest and the output. Real git only."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from regal_dagster.engine.backup import run_backup
from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.restore_test import run_restore_test
from regal_dagster.engine.sources.config.extras import git_lfs_version
from regal_dagster.engine.storage import open_repository

from .conftest import invoke_cli
from .test_terraform_and_config import _policy, config_repo  # noqa: F401 - the fixture

PRE_COMMIT = "#!/bin/sh\n# refuse secrets\ngrep -rq 'BEGIN PRIVATE KEY' . && exit 1\nexit 0\n"
LFS_CONTENT = b"\x89PNG pretend image kept in Git LFS\n" * 100


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def _with_hooks_and_config(repo: Path) -> None:
    _git(repo, "remote", "add", "origin", "https://git.example.test/ops/pos-config.git")
    _git(repo, "config", "branch.main.remote", "origin")
    _git(repo, "config", "pos.owner", "ops-team")
    hook = repo / ".git" / "hooks" / "pre-commit"
    hook.write_text(PRE_COMMIT)
    hook.chmod(0o755)
    (repo / ".git" / "hooks" / "commit-msg.disabled").write_text("#!/bin/sh\nexit 1\n")  # not executable


def _with_lfs(repo: Path) -> str:
    """The repository tracks *.png with Git LFS and its local LFS store holds one object (as `git lfs` leaves it):
    its oid."""
    oid = hashlib.sha256(LFS_CONTENT).hexdigest()
    (repo / ".gitattributes").write_text("*.png filter=lfs diff=lfs merge=lfs -text\n")
    (repo / "logo.png").write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\n"
                                   f"size {len(LFS_CONTENT)}\n")
    _git(repo, "-c", "user.name=Ops", "-c", "user.email=ops@example.test", "add", "-A")
    _git(repo, "-c", "user.name=Ops", "-c", "user.email=ops@example.test", "commit", "-q", "-m", "logo in LFS")
    store = repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4]
    store.mkdir(parents=True)
    (store / oid).write_bytes(LFS_CONTENT)
    return oid


def test_the_repositorys_config_and_hooks_are_carried_restored_and_compared(config_repo: Path,  # noqa: F811
                                                                            tmp_path: Path, master_key: str) -> None:
    """Failed before: a restore had neither the remotes and settings of .git/config nor the hooks."""
    _with_hooks_and_config(config_repo)
    policy = _policy(tmp_path, "config", {"kind": "config", "repository": str(config_repo)})
    manifest = run_backup(policy, "config").manifest

    assert {o.name for o in manifest.objects} >= {"git/config", "git/hooks/pre-commit",
                                                  "git/hooks/commit-msg.disabled"}
    assert manifest.source["hooks"]["pre-commit"]["executable"] is True
    assert manifest.source["hooks"]["commit-msg.disabled"]["executable"] is False
    assert manifest.source["not_carried"] == [] and manifest.source["lfs"] is None
    result = run_restore_test(policy, open_repository(policy), load_keyring(policy), manifest)
    assert result.validation_passed, result.problems

    hooks = dict(manifest.source["hooks"])
    hooks["pre-commit"] = {**hooks["pre-commit"], "sha256": "0" * 64}
    lying = manifest.model_copy(update={"source": {**manifest.source, "hooks": hooks, "git_config": "0" * 64}})
    result = run_restore_test(policy, open_repository(policy), load_keyring(policy), lying)
    assert result.problems == ["the clone's .git/config differs from the repository's",
                               "hook pre-commit is different in the clone"]

    target = tmp_path / "restored-config"
    done = invoke_cli(["restore", manifest.backup_id, "--to", str(target), "--policy",
                       str(tmp_path / "regal_backup.yaml")])
    assert done.returncode == 0, done.stderr
    assert (target / ".git" / "config").read_bytes() == (config_repo / ".git" / "config").read_bytes()
    assert _git(target, "config", "remote.origin.url").strip() == "https://git.example.test/ops/pos-config.git"
    assert _git(target, "config", "pos.owner").strip() == "ops-team"
    restored_hook = target / ".git" / "hooks" / "pre-commit"
    assert restored_hook.read_text() == PRE_COMMIT and os.access(restored_hook, os.X_OK)
    assert not os.access(target / ".git" / "hooks" / "commit-msg.disabled", os.X_OK)


def test_lfs_objects_without_git_lfs_are_carried_from_the_store_and_the_rest_is_named(
        config_repo: Path, tmp_path: Path, master_key: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """A repository that uses Git LFS, backed up where `git lfs` is not installed (PATH holds only git): the objects
    of its local store are carried, restored into the clone's store and compared; that the rest cannot be listed
    is said by name in the manifest, the backup's output and the restore's. Failed before: nothing of LFS, silently."""
    oid = _with_lfs(config_repo)
    only_git = tmp_path / "only-git"
    only_git.mkdir()
    (only_git / "git").symlink_to(shutil.which("git"))  # type: ignore[arg-type]
    monkeypatch.setenv("PATH", str(only_git))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")  # a machine without git-lfs has no system-wide LFS filters
    assert git_lfs_version() is None
    policy = _policy(tmp_path, "config", {"kind": "config", "repository": str(config_repo)})

    done = invoke_cli(["backup", "config", "--policy", str(tmp_path / "regal_backup.yaml")],
                      env={**os.environ, "PATH": str(only_git), "GIT_CONFIG_NOSYSTEM": "1"})
    assert done.returncode == 0, done.stderr
    assert "not in the backup: Git LFS objects: the repository uses Git LFS but `git lfs` is not installed" \
        in done.stderr
    from regal_dagster.engine.catalog import list_backups

    (manifest,), _ = list_backups(open_repository(policy), load_keyring(policy), "config")
    assert manifest.source["lfs"] == {"git_lfs": None, "objects": {oid: len(LFS_CONTENT)}}
    (note,) = manifest.source["not_carried"]
    assert "`git lfs version` fails" in note and "1 object(s) of its local store were carried" in note

    result = run_restore_test(policy, open_repository(policy), load_keyring(policy), manifest)
    assert result.validation_passed, result.problems
    assert result.details["not_carried"] == [note]
    objects = dict(manifest.source["lfs"]["objects"])
    objects["f" * 64] = 10
    lying = manifest.model_copy(update={"source": {**manifest.source, "lfs": {"git_lfs": None, "objects": objects}}})
    result = run_restore_test(policy, open_repository(policy), load_keyring(policy), lying)
    assert not result.validation_passed  # an object the manifest names that the backup does not hold
    assert any(f"git/lfs/{'f' * 64}" in p for p in result.problems), result.problems

    target = tmp_path / "restored-config"
    done = invoke_cli(["restore", manifest.backup_id, "--to", str(target), "--policy",
                       str(tmp_path / "regal_backup.yaml")], env={**os.environ, "PATH": str(only_git)})
    assert done.returncode == 0, done.stderr
    assert "not in the backup: Git LFS objects" in done.stdout + done.stderr
    assert (target / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid).read_bytes() == LFS_CONTENT


@pytest.mark.skipif(git_lfs_version() is None, reason="git lfs is not installed here (`git lfs version` fails)")
def test_lfs_objects_the_refs_need_but_the_store_lacks_are_named(config_repo: Path, tmp_path: Path,  # noqa: F811
                                                                master_key: str) -> None:
    """With `git lfs`: the objects any ref refers to are listed, and those the local store lacks named."""
    oid = _with_lfs(config_repo)
    shutil.rmtree(config_repo / ".git" / "lfs")
    policy = _policy(tmp_path, "config", {"kind": "config", "repository": str(config_repo)})
    manifest = run_backup(policy, "config").manifest
    assert manifest.source["lfs"]["objects"] == {} and manifest.source["lfs"]["git_lfs"]
    (note,) = manifest.source["not_carried"]
    assert oid in note and "git lfs fetch --all" in note
