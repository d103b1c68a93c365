"""A `files` target (TLS certificates and configuration outside git): backed up as one tar stream, checked,
restore-tested and restored file by file, with modes, links and every byte as they were."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import yaml

from regal_dagster.engine.backup import run_backup
from regal_dagster.engine.checks import run_checks
from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.errors import RegalError
from regal_dagster.engine.policy import Policy, load_policy
from regal_dagster.engine.restore_test import run_restore_test
from regal_dagster.engine.sources.files.archive import Walked, tar_stream
from regal_dagster.engine.storage import open_repository

from .conftest import init_repository, run_cli

CERT = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ2VydGlmaWNhdGUgZm9yIHJlZ2Fs\n-----END CERTIFICATE-----\n"


@pytest.fixture
def config_tree(tmp_path: Path) -> Path:
    """What a host keeps outside git: certificates (a private key 0600), settings, a link, a large file."""
    root = tmp_path / "host" / "etc" / "regal"
    (root / "tls").mkdir(parents=True)
    (root / "tls" / "server-cert.pem").write_text(CERT)
    key = root / "tls" / "server-key.pem"
    key.write_text(CERT.replace("CERTIFICATE", "PRIVATE KEY"))
    key.chmod(0o600)
    (root / "tls" / "current.pem").symlink_to("server-cert.pem")
    (root / "pos.conf").write_text("tax_rate = 0.2\nstores = 50\n")
    (root / "Café menu é.conf").write_text("menu = ☕\n")
    (root / "geoip.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (root / "empty").mkdir()
    (root / "scratch.tmp").write_text("left out")
    os.mkfifo(root / "control.fifo")
    return root


def _policy(tmp_path: Path, tree: Path) -> tuple[Path, Policy]:
    path = tmp_path / "regal_backup.yaml"
    path.write_text(yaml.safe_dump({
        "repository": {"url": "repository"},
        "encryption": {"keyset": "keyset.json", "master_key": {"env": "REGAL_TEST_MASTER_KEY"}},
        "targets": {"tls": {"kind": "files", "paths": [str(tree)], "exclude": ["*.tmp"]}}}))
    policy = load_policy(path)
    init_repository(policy)
    return path, policy


def _tree(root: Path) -> dict[str, tuple[str, str]]:
    """path -> (mode, content or link target) for everything under root."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory) / name
            relative = str(path.relative_to(root))
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                found[relative] = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                found[relative] = (f"{stat.S_IMODE(info.st_mode):o}", path.read_bytes().hex())
            elif stat.S_ISDIR(info.st_mode):
                found[relative] = (f"{stat.S_IMODE(info.st_mode):o}", "dir")
    return found


def test_files_round_trip_with_checks_restore_test_and_restore(config_tree: Path, tmp_path: Path,
                                                              master_key: str) -> None:
    policy_file, policy = _policy(tmp_path, config_tree)

    manifest = run_backup(policy, "tls").manifest

    assert [o.name for o in manifest.objects] == ["files.tar"]
    assert manifest.source["files"] == 5 and manifest.source["skipped"] == [str(config_tree / "control.fifo")]
    by_path = {e["path"]: e for e in manifest.source["entries"]}
    assert str(config_tree / "scratch.tmp") not in by_path  # excluded
    assert by_path[str(config_tree / "tls" / "server-key.pem")]["mode"] == "0600"
    link = by_path[str(config_tree / "tls" / "current.pem")]
    assert link["type"] == "symlink" and link["target"] == "server-cert.pem"

    repo, keyring = open_repository(policy), load_keyring(policy)
    record = run_checks(policy, repo, keyring, manifest.backup_id)
    assert record.passed, [o.description for o in record.outcomes if not o.passed]
    assert "holds the 9 recorded members" in record.outcome("integrity").description  # type: ignore[union-attr]
    assert record.outcome("encryption").passed  # type: ignore[union-attr]  # no PEM text in the stored bytes

    tested = run_restore_test(policy, repo, keyring, manifest)
    assert tested.validation_passed, tested.problems

    target = tmp_path / "restored"
    done = run_cli(policy_file, "restore", manifest.backup_id, "--to", str(target), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ok"] is True
    expected = {k: v for k, v in _tree(config_tree).items() if k not in ("scratch.tmp",)}
    assert _tree(target / str(config_tree).lstrip("/")) == expected

    again = run_cli(policy_file, "restore", manifest.backup_id, "--to", str(target))
    assert again.returncode == 1 and "--drop-existing" in again.stderr


def test_a_restore_test_names_the_file_the_backup_does_not_match(config_tree: Path, tmp_path: Path,
                                                                 master_key: str) -> None:
    _, policy = _policy(tmp_path, config_tree)
    manifest = run_backup(policy, "tls").manifest
    entries = [dict(e) for e in manifest.source["entries"]]
    conf = next(e for e in entries if e["path"].endswith("pos.conf"))
    conf["sha256"] = "0" * 64
    lying = manifest.model_copy(update={"source": {**manifest.source, "entries": entries}})

    result = run_restore_test(policy, open_repository(policy), load_keyring(policy), lying)

    assert result.problems == [f"{conf['path']} has other content than the backup (SHA-256 differs)"]


def test_a_damaged_archive_fails_integrity_naming_the_object(config_tree: Path, tmp_path: Path,
                                                            master_key: str) -> None:
    _, policy = _policy(tmp_path, config_tree)
    manifest = run_backup(policy, "tls").manifest
    (stored,) = (tmp_path / "repository").rglob("files.tar")
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))

    record = run_checks(policy, open_repository(policy), load_keyring(policy), manifest.backup_id)

    integrity = record.outcome("integrity")
    assert integrity is not None and not integrity.passed and not record.passed
    assert "files.tar" in integrity.description and "fails authentication" in integrity.description


def test_a_file_that_changes_while_it_is_read_stops_the_backup(tmp_path: Path) -> None:
    growing = tmp_path / "growing.log"
    growing.write_bytes(b"x" * 4096)
    stream = tar_stream([str(growing)], [], Walked())
    next(stream)  # the header, with the size as it was
    with growing.open("ab") as f:
        f.write(b"appended meanwhile")
    with pytest.raises(RegalError, match="changed while it was being backed up"):
        list(stream)


def test_paths_must_be_absolute(tmp_path: Path, master_key: str) -> None:
    path = tmp_path / "regal_backup.yaml"
    path.write_text(yaml.safe_dump({
        "repository": {"url": "repository"},
        "encryption": {"keyset": "keyset.json", "master_key": {"env": "REGAL_TEST_MASTER_KEY"}},
        "targets": {"tls": {"kind": "files", "paths": ["etc/regal"]}}}))
    with pytest.raises(RegalError, match="targets.tls.paths: 'etc/regal' is not an absolute path"):
        load_policy(path)
