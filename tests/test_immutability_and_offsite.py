"""S3 Object Lock and off-site copies against a real S3 API (a moto server over HTTP) and a real PostgreSQL.

The primary repository is an Object Lock bucket (COMPLIANCE); the off-site copy is another bucket in
another region, or a local path: both kinds of second repository are exercised.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest

from regal_dagster.engine.backup import run_backup
from regal_dagster.engine.catalog import list_backups, load_manifest
from regal_dagster.engine.checks import run_checks
from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.errors import ObjectLockedError, RegalError
from regal_dagster.engine.keys import retire_key, rotate_key
from regal_dagster.engine.offsite import copy_after_backup
from regal_dagster.engine.policy import load_policy
from regal_dagster.engine.retention import run_prune
from regal_dagster.engine.storage import open_offsite, open_repository

from .conftest import DatabaseFactory, load_awkward_data, run_cli, write_policy_file


def _bucket(endpoint: str, region: str = "us-east-1", *, object_lock: bool = False) -> str:
    name = f"regal-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client("s3", region_name=region, endpoint_url=endpoint)
    extra: dict[str, Any] = {} if region == "us-east-1" else {
        "CreateBucketConfiguration": {"LocationConstraint": region}}
    s3.create_bucket(Bucket=name, ObjectLockEnabledForBucket=object_lock, **extra)
    return name


def _policy_file(tmp_path: Path, source: str, repository: dict[str, Any], offsite: dict[str, Any] | None,
                 initialize: bool = True, **settings: Any) -> Path:
    return write_policy_file(tmp_path, {"pos": source}, repository, initialize=initialize,
                             **({"offsite": offsite} if offsite else {}), **settings)


@pytest.fixture
def source(system_pg: DatabaseFactory) -> str:
    dsn = system_pg.create()
    load_awkward_data(dsn)
    return dsn


def test_object_lock_makes_backups_immutable_until_their_retention_date(
        source: str, tmp_path: Path, master_key: str, moto_endpoint: str) -> None:
    bucket = _bucket(moto_endpoint, object_lock=True)
    policy_file = _policy_file(tmp_path, source, {
        "url": f"s3://{bucket}/regal", "endpoint_url": moto_endpoint, "region": "us-east-1",
        "part_size_mb": 5, "object_lock": {"mode": "COMPLIANCE"}}, None)
    policy = load_policy(policy_file)
    repo = open_repository(policy)
    manifest = run_backup(policy, "pos", "daily", repo=repo).manifest
    assert run_checks(policy, repo, load_keyring(policy), manifest.backup_id).passed

    s3 = boto3.client("s3", region_name="us-east-1", endpoint_url=moto_endpoint)
    expected = manifest.retain_until
    assert timedelta(days=30) <= expected - manifest.started_at <= timedelta(days=30, seconds=1)  # a daily: 30 days
    for key in [o.key for o in manifest.objects] + [f"backups/pos/{manifest.backup_id}/manifest.json"]:
        head = s3.head_object(Bucket=bucket, Key=f"regal/{key}")
        assert head["ObjectLockMode"] == "COMPLIANCE" and head["ObjectLockRetainUntilDate"] == expected
    assert manifest.locked_until == expected

    with pytest.raises(ObjectLockedError, match="under Object Lock until"):
        repo.delete(manifest.objects[0].key)
    assert repo.size(manifest.objects[0].key) == manifest.objects[0].size  # still there, every version

    # Retention would drop it (no slot keeps a daily any more), but the lock has 30 days to run.
    policy = policy.model_copy(update={"retention": policy.retention.model_copy(update={"daily": 0, "hourly": 0})})
    second = run_backup(policy, "pos", "daily", repo=repo).manifest
    run_checks(policy, repo, load_keyring(policy), second.backup_id)
    report = run_prune(policy, repo, datetime.now(UTC))
    decision = next(d for d in report.decisions["pos"] if d.backup_id == manifest.backup_id)
    assert decision.keep and decision.reasons == (f"object lock until {expected:%Y-%m-%d %H:%M}",)
    assert report.deleted == [] and len(list_backups(repo, load_keyring(policy), "pos")[0]) == 2
    refused = run_cli(policy_file, "delete", manifest.backup_id)  # nor can an operator by hand, and is told why
    assert refused.returncode == 2 and "under S3 Object Lock until" in refused.stderr, refused.stderr

    # A leftover under lock (an interrupted backup's object) is reported and left for after its date.
    leftover = "backups/pos/pos-20260101T000000Z-0a0a0a/tables/00001.copy"
    repo.put_bytes(leftover, b"RGLB interrupted", datetime.now(UTC) + timedelta(days=1))
    report = run_prune(policy, repo, datetime.now(UTC))
    assert report.locked == [leftover] and repo.size(leftover) is not None

    # Retiring the key re-encrypts the backups; Object Lock keeps the old objects of the locked one
    # (unreadable once the key is gone) until their date, and says so. The second backup's lock (retention
    # 0 days) is over: its old objects go, its new ones are written unlocked.
    old_key = manifest.objects[0].encryption.key_id
    time.sleep(max(0.0, (second.retain_until - datetime.now(UTC)).total_seconds()))  # its lock: the next whole second
    rotate_key(policy)
    retired = retire_key(policy, old_key, reencrypt=True, repo=repo)
    assert sorted(retired.reencrypted) == sorted([manifest.backup_id, second.backup_id])
    assert sorted(retired.locked_leftovers) == sorted(o.key for o in manifest.objects)
    second_object = load_manifest(repo, load_keyring(policy), second.backup_id).objects[0].key
    assert "ObjectLockMode" not in s3.head_object(Bucket=bucket, Key=f"regal/{second_object}")
    rekeyed = load_manifest(repo, load_keyring(policy), manifest.backup_id)
    assert all(o.key.endswith(f".k{load_keyring(policy).primary_key_id}") for o in rekeyed.objects)
    for record in rekeyed.objects:
        head = s3.head_object(Bucket=bucket, Key=f"regal/{record.key}")
        assert head["ObjectLockMode"] == "COMPLIANCE" and head["ObjectLockRetainUntilDate"] == expected
    assert run_checks(policy, repo, load_keyring(policy), manifest.backup_id).passed


def test_a_deleted_object_is_gone_in_every_version_once_its_lock_ends(
        source: str, tmp_path: Path, master_key: str, moto_endpoint: str) -> None:
    bucket = _bucket(moto_endpoint, object_lock=True)
    policy = load_policy(_policy_file(tmp_path, source, {
        "url": f"s3://{bucket}", "endpoint_url": moto_endpoint, "object_lock": {"mode": "GOVERNANCE"}}, None))
    repo = open_repository(policy)
    repo.put_bytes("prune/probe.json", b"v1", datetime.now(UTC) + timedelta(seconds=2))
    repo.put_bytes("prune/probe.json", b"v2")  # a second version, not locked
    with pytest.raises(ObjectLockedError):
        repo.delete("prune/probe.json")
    time.sleep(2.5)
    repo.delete("prune/probe.json")
    versions = boto3.client("s3", region_name="us-east-1", endpoint_url=moto_endpoint).list_object_versions(
        Bucket=bucket, Prefix="prune/probe.json")
    assert not versions.get("Versions") and not versions.get("DeleteMarkers")  # really gone (PCI DSS 3.2.1)


def test_object_lock_on_a_bucket_without_it_is_a_clear_error(
        source: str, tmp_path: Path, master_key: str, moto_endpoint: str) -> None:
    bucket = _bucket(moto_endpoint)
    policy = load_policy(_policy_file(tmp_path, source, {
        "url": f"s3://{bucket}", "endpoint_url": moto_endpoint, "object_lock": {"mode": "COMPLIANCE"}}, None,
        initialize=False))
    with pytest.raises(RegalError, match=f"bucket {bucket} does not have it enabled"):
        run_backup(policy, "pos")
    from regal_dagster.engine.errors import PolicyError

    (tmp_path / "local").mkdir()
    with pytest.raises(PolicyError, match="object_lock needs an s3:// repository"):
        load_policy(_policy_file(tmp_path / "local", source, {"url": "repo", "object_lock": {}}, None))


@pytest.mark.parametrize("offsite_kind", ["s3", "local"])
def test_every_backup_is_copied_off_site_and_verified_there(
        offsite_kind: str, source: str, tmp_path: Path, master_key: str, moto_endpoint: str,
        system_pg: DatabaseFactory) -> None:
    if offsite_kind == "s3":  # primary local, copy in another region's bucket
        repository = {"url": "repository"}
        offsite = {"url": f"s3://{_bucket(moto_endpoint, 'eu-west-1')}/copy", "region": "eu-west-1",
                   "endpoint_url": moto_endpoint}
    else:  # primary an S3 bucket, copy on a local path
        repository = {"url": f"s3://{_bucket(moto_endpoint)}", "endpoint_url": moto_endpoint}
        offsite = {"url": str(tmp_path / "offsite")}
    policy_file = _policy_file(tmp_path, source, repository, offsite)

    cli = functools.partial(run_cli, policy_file)

    done = cli("backup", "pos", "--json")
    assert done.returncode == 0 and "warning" not in done.stderr, done.stderr
    backup_id = json.loads(done.stdout)["backup_id"]
    verified = json.loads(cli("verify", backup_id, "--json").stdout)
    offsite_check = next(c for c in verified["checks"] if c["name"] == "offsite_copy")
    assert offsite_check["passed"], offsite_check

    policy = load_policy(policy_file)
    repo, secondary = open_repository(policy), open_offsite(policy)
    assert secondary is not None
    (copied,) = list_backups(secondary, load_keyring(policy), "pos")[0]
    assert copied.backup_id == backup_id
    assert secondary.size(f"backups/pos/{backup_id}/checks.json") is not None  # a restore from there knows it

    # Damage one object there and lose another: the check names them; sync repairs; the check passes.
    biggest, smallest = max(copied.objects, key=lambda o: o.size), min(copied.objects, key=lambda o: o.size)
    data = bytearray(secondary.get_bytes(biggest.key))
    data[len(data) // 2] ^= 0x01
    secondary.put_bytes(biggest.key, bytes(data))
    secondary.delete(smallest.key)
    record = run_checks(policy, repo, load_keyring(policy), backup_id)
    outcome = record.outcome("offsite_copy")
    assert outcome is not None and not outcome.passed and outcome.severity == "ERROR"
    assert "2 object(s) missing or different" in outcome.description and "offsite sync" in outcome.description
    assert record.passed  # the backup itself is good: the copy is what is wrong

    synced = cli("offsite", "sync")
    assert synced.returncode == 0 and "1 of 1 backups copied and read back" in synced.stdout, synced.stdout
    record = run_checks(policy, repo, load_keyring(policy), backup_id)
    assert record.outcome("offsite_copy").passed  # type: ignore[union-attr]

    # Retention applies to the copy too.
    second = json.loads(cli("backup", "pos", "--json").stdout)["backup_id"]
    assert cli("verify", second).returncode == 0
    report = run_prune(policy, repo, datetime.now(UTC) + timedelta(hours=3))
    assert report.deleted == [backup_id] and report.offsite_deleted == [backup_id]
    assert [m.backup_id for m in list_backups(secondary, load_keyring(policy), "pos")[0]] == [second]

    # The primary site is lost: everything needed comes from the copy.
    if offsite_kind == "s3":
        import shutil

        shutil.rmtree(tmp_path / "repository")
        listing = json.loads(cli("list", "--from-offsite", "--json").stdout)
        assert [(b["backup_id"], b["status"]) for b in listing["backups"]] == [(second, "good")]
        target = system_pg.create("regal_from_offsite")
        restored = cli("restore", "--from-offsite", "--target", "pos", "--latest", "--to", target)
        assert restored.returncode == 0, restored.stderr


def test_an_unreachable_offsite_repository_does_not_fail_the_backup(
        source: str, tmp_path: Path, master_key: str, moto_endpoint: str) -> None:
    policy_file = _policy_file(tmp_path, source, {"url": "repository"},
                               {"url": "s3://nowhere-bucket", "endpoint_url": "http://127.0.0.1:9",
                                "region": "us-east-1"})
    policy = load_policy(policy_file)
    repo = open_repository(policy)
    manifest = run_backup(policy, "pos", repo=repo).manifest
    problem = copy_after_backup(repo, open_offsite(policy), manifest)
    assert problem is not None and "cannot reach s3://nowhere-bucket" in problem
    record = run_checks(policy, repo, load_keyring(policy), manifest.backup_id)
    assert record.passed and not record.outcome("offsite_copy").passed  # type: ignore[union-attr]


def test_prune_removes_abandoned_uploads_and_partial_files(
        source: str, tmp_path: Path, master_key: str, moto_endpoint: str) -> None:
    bucket = _bucket(moto_endpoint)
    policy = load_policy(_policy_file(tmp_path, source, {"url": f"s3://{bucket}/p", "endpoint_url": moto_endpoint},
                                      {"url": str(tmp_path / "offsite")}))
    s3 = boto3.client("s3", region_name="us-east-1", endpoint_url=moto_endpoint)
    upload = s3.create_multipart_upload(Bucket=bucket, Key="p/backups/pos/pos-20260101T000000Z-0b0b0b/x.copy")
    partial = tmp_path / "offsite" / "backups" / "pos" / "x.copy.1234abcd.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"half an object")
    old = time.time() - 3 * 86400
    import os

    os.utime(partial, (old, old))
    report = run_prune(policy, open_repository(policy), datetime.now(UTC))
    assert f"backups/pos/pos-20260101T000000Z-0b0b0b/x.copy?uploadId={upload['UploadId']}" in report.leftovers
    assert "backups/pos/x.copy.1234abcd.partial" in report.leftovers
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads") and not partial.exists()


def test_dagster_copies_each_backup_off_site_and_checks_the_copy(source: str, tmp_path: Path, master_key: str) -> None:
    import dagster as dg

    from regal_dagster.defs import build_definitions

    from .conftest import backup_then_checks

    policy_file = _policy_file(tmp_path, source, {"url": "repository"}, {"url": str(tmp_path / "second-site")})
    defs = build_definitions(str(policy_file))
    specs = {s.name: s for c in defs.asset_checks or [] for s in c.check_specs}  # type: ignore[union-attr]
    assert not specs["offsite_copy"].blocking and not specs["key_cryptoperiod"].blocking

    result, checks = backup_then_checks(defs, dg.DagsterInstance.ephemeral())

    assert result.success and checks is not None
    (materialization,) = result.asset_materializations_for_node("postgres__pos__backup")
    assert materialization.metadata["offsite_copy"].value == "copied and read back"
    evaluations = {e.check_name: e for e in checks.get_asset_check_evaluations()}
    assert evaluations["offsite_copy"].passed and evaluations["key_cryptoperiod"].passed
