"""Terraform state (a local file and a versioned S3 bucket on moto) and application configuration (a real
git repository with lock files): round trips, their checks, restore tests and restores."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from regal_dagster.engine.backup import run_backup
from regal_dagster.engine.checks import run_checks
from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.policy import Policy, load_policy
from regal_dagster.engine.restore_test import run_restore_test
from regal_dagster.engine.storage import open_repository

from .conftest import init_repository, invoke_cli


def _policy(tmp_path: Path, name: str, target: dict[str, Any]) -> Policy:
    path = tmp_path / "regal_backup.yaml"
    path.write_text(yaml.safe_dump({
        "repository": {"url": "repository"},
        "encryption": {"keyset": "keyset.json", "master_key": {"env": "REGAL_TEST_MASTER_KEY"}},
        "targets": {name: target}}))
    policy = load_policy(path)
    init_repository(policy)
    return policy


def _state(serial: int, lineage: str = "6f1c-lineage", resources: int = 2) -> bytes:
    return json.dumps({
        "version": 4, "terraform_version": "1.9.5", "serial": serial, "lineage": lineage,
        "outputs": {"bucket": {"value": "regal-pos-assets", "type": "string"}},
        "resources": [{"mode": "managed", "type": "aws_s3_bucket", "name": f"b{i}", "provider": "aws",
                       "instances": [{"attributes": {"id": f"bucket-{i}"}}]} for i in range(resources)],
    }).encode()


def _checked(policy: Policy, target: str):  # type: ignore[no-untyped-def]
    manifest = run_backup(policy, target).manifest
    return manifest, run_checks(policy, open_repository(policy), load_keyring(policy), manifest.backup_id)


def test_terraform_state_round_trip_and_a_rolled_back_serial(tmp_path: Path, master_key: str) -> None:
    state_file = tmp_path / "terraform.tfstate"
    state_file.write_bytes(_state(5))
    policy = _policy(tmp_path, "infra", {"kind": "terraform", "state": str(state_file)})

    first, record = _checked(policy, "infra")
    assert record.passed
    expected = {"serial": 5, "lineage": "6f1c-lineage", "resources": 2, "terraform_version": "1.9.5",
                "outputs": ["bucket"]}
    assert {k: first.source["state"][k] for k in expected} == expected
    assert record.outcome("serial_monotonic").description == "serial 5 (first backup of this lineage)"  # type: ignore[union-attr]

    state_file.write_bytes(_state(7, resources=3))
    _, record = _checked(policy, "infra")
    assert record.passed and "up from 5" in record.outcome("serial_monotonic").description  # type: ignore[union-attr]

    state_file.write_bytes(_state(6))  # someone pushed an old state
    _, record = _checked(policy, "infra")
    rolled = record.outcome("serial_monotonic")
    assert rolled is not None and not rolled.passed and rolled.severity == "ERROR"
    assert "serial 6 is lower than 7" in rolled.description and not record.passed

    state_file.write_bytes(b"{not json")
    _, record = _checked(policy, "infra")
    assert not record.outcome("state_valid").passed and not record.passed  # type: ignore[union-attr]

    result = run_restore_test(policy, open_repository(policy), load_keyring(policy), first)
    assert result.validation_passed and result.details["serial"] == 5
    restored = tmp_path / "restored.tfstate"
    done = invoke_cli(["restore", first.backup_id, "--to", str(restored), "--policy",
                       str(tmp_path / "regal_backup.yaml")])
    assert done.returncode == 0, done.stderr
    assert restored.read_bytes() == _state(5) and f"terraform state push {restored}" in done.stdout


def test_terraform_state_from_a_versioned_s3_bucket_takes_the_newest(tmp_path: Path, master_key: str,
                                                                     moto_endpoint: str) -> None:
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="tf-state")
    s3.put_bucket_versioning(Bucket="tf-state", VersioningConfiguration={"Status": "Enabled"})
    for serial in (3, 4):
        s3.put_object(Bucket="tf-state", Key="pos/terraform.tfstate", Body=_state(serial))
    policy = _policy(tmp_path, "infra", {"kind": "terraform", "state": "s3://tf-state/pos/terraform.tfstate",
                                         "endpoint_url": moto_endpoint, "region": "us-east-1"})
    manifest, record = _checked(policy, "infra")
    assert manifest.source["state"]["serial"] == 4 and record.passed


@pytest.fixture
def config_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "pos-config"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "Ops", "GIT_AUTHOR_EMAIL": "ops@example.test",
           "GIT_COMMITTER_NAME": "Ops", "GIT_COMMITTER_EMAIL": "ops@example.test"}

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, env=env)

    git("init", "-q", "-b", "main")
    (repo / "app.yaml").write_text("tax_rate: 0.2\nstores: 50\n")
    (repo / "requirements.txt").write_text("dagster==1.13.27\nredis==5.2.1\n")
    (repo / "poetry.lock").write_text("# lock\n[[package]]\nname = \"redis\"\nversion = \"5.2.1\"\n")
    git("add", "-A")
    git("commit", "-q", "-m", "config v1")
    git("tag", "-a", "v1", "-m", "release 1")
    git("checkout", "-q", "-b", "staging")
    (repo / "app.yaml").write_text("tax_rate: 0.21\nstores: 51\n")
    git("commit", "-q", "-am", "staging change")
    git("checkout", "-q", "main")
    return repo


def test_configuration_repository_round_trip(config_repo: Path, tmp_path: Path, master_key: str) -> None:
    policy = _policy(tmp_path, "config", {"kind": "config", "repository": str(config_repo)})

    manifest, record = _checked(policy, "config")

    assert [o.name for o in manifest.objects] == ["config.bundle", "lock/requirements.txt", "lock/poetry.lock",
                                                  "git/config"]  # git init made no hooks but samples
    assert set(manifest.source["refs"]) == {"refs/heads/main", "refs/heads/staging", "refs/tags/v1"}
    assert manifest.source["branch"] == "main" and set(manifest.source["lock_files"]) == {"requirements.txt",
                                                                                          "poetry.lock"}
    assert record.passed and "git bundle verify accepts 3 refs" in record.outcome("integrity").description  # type: ignore[union-attr]

    result = run_restore_test(policy, open_repository(policy), load_keyring(policy), manifest)
    assert result.validation_passed, result.problems
    assert result.details["head"] == manifest.source["head"]

    refs = {**manifest.source["refs"], "refs/heads/staging": "0" * 40}
    lying = manifest.model_copy(update={"source": {**manifest.source, "refs": refs}})
    result = run_restore_test(policy, open_repository(policy), load_keyring(policy), lying)
    staging = manifest.source["refs"]["refs/heads/staging"]
    assert result.problems == [f"ref refs/heads/staging is {staging} in the clone, {'0' * 40} in the backup"]

    target = tmp_path / "restored-config"
    done = invoke_cli(["restore", manifest.backup_id, "--to", str(target), "--policy",
                       str(tmp_path / "regal_backup.yaml")])
    assert done.returncode == 0, done.stderr
    assert (target / "app.yaml").read_text() == "tax_rate: 0.2\nstores: 50\n"
    assert (target / "restored-lock-files" / "poetry.lock").read_text() == (config_repo / "poetry.lock").read_text()
