"""The four checks on real backups of a real PostgreSQL, and what they catch.

Damage is done to the stored bytes on disk the way it happens in life: a flipped bit, a deleted object,
objects swapped between two backups, a plaintext file planted where a backup object should be.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from regal_dagster.engine.backup import run_backup
from regal_dagster.engine.check_record import load_check_record
from regal_dagster.engine.checks import good_backups, run_checks
from regal_dagster.engine.crypto import OBJECT_HEADER, OBJECT_MAGIC, load_keyring
from regal_dagster.engine.layout import CHECKS_NAME
from regal_dagster.engine.policy import Policy
from regal_dagster.engine.storage import open_repository

from .conftest import DatabaseFactory, load_awkward_data, make_policy
from .pg_compare import execute


@pytest.fixture
def source(system_pg: DatabaseFactory) -> str:
    dsn = system_pg.create()
    load_awkward_data(dsn)
    return dsn


@pytest.fixture
def policy(source: str, tmp_path: Path, master_key: str) -> Policy:
    return make_policy(tmp_path, {"pos": source})


def _check(policy: Policy, backup_id: str):  # type: ignore[no-untyped-def]
    return run_checks(policy, open_repository(policy), load_keyring(policy), backup_id, trigger={"cli": "test"})


def _path(policy: Policy, key: str) -> Path:
    return policy.local_repository_path() / key


def _biggest(manifest):  # type: ignore[no-untyped-def]
    return max(manifest.objects, key=lambda o: o.size)


def test_a_good_backup_passes_every_check_and_counts_as_good(policy: Policy) -> None:
    manifest = run_backup(policy, "pos").manifest
    repo = open_repository(policy)
    keyring = load_keyring(policy)
    assert good_backups(repo, keyring, "pos") == []  # not checked yet: not good yet

    record = _check(policy, manifest.backup_id)

    assert record.passed
    assert {o.name: o.passed for o in record.outcomes} == {
        "manifest": True, "integrity": True, "encryption": True, "size": True, "key_cryptoperiod": True}
    assert "schema archive lists" in record.outcome("integrity").description  # type: ignore[union-attr]
    assert load_check_record(repo, keyring, manifest) == record
    assert _path(policy, f"backups/pos/{manifest.backup_id}/{CHECKS_NAME}").is_file()
    assert [m.backup_id for m in good_backups(repo, keyring, "pos")] == [manifest.backup_id]


def test_a_flipped_byte_fails_integrity_naming_the_object(policy: Policy) -> None:
    manifest = run_backup(policy, "pos").manifest
    damaged = _biggest(manifest)
    path = _path(policy, damaged.key)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))

    record = _check(policy, manifest.backup_id)

    integrity = record.outcome("integrity")
    assert integrity is not None and not integrity.passed
    assert integrity.failing_object == damaged.key and damaged.key in integrity.description
    assert record.outcome("manifest").passed  # type: ignore[union-attr]  # same size: only a read finds it
    assert not record.passed and good_backups(open_repository(policy), load_keyring(policy), "pos") == []


def test_a_deleted_object_fails_the_manifest_check(policy: Policy) -> None:
    manifest = run_backup(policy, "pos").manifest
    gone = manifest.objects[0]
    _path(policy, gone.key).unlink()

    record = _check(policy, manifest.backup_id)

    outcome = record.outcome("manifest")
    assert outcome is not None and not outcome.passed
    assert outcome.description == f"object {gone.key} is missing" and outcome.failing_object == gone.key
    assert not record.passed


def test_objects_swapped_between_two_backups_are_detected(policy: Policy) -> None:
    first, second = run_backup(policy, "pos").manifest, run_backup(policy, "pos").manifest
    a, b = _path(policy, _biggest(first).key), _path(policy, _biggest(second).key)
    assert a.stat().st_size == b.stat().st_size  # same data: the manifests' sizes cannot tell them apart
    a_bytes = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(a_bytes)

    for manifest in (first, second):
        record = _check(policy, manifest.backup_id)
        assert record.outcome("manifest").passed  # type: ignore[union-attr]
        integrity = record.outcome("integrity")
        assert integrity is not None and not integrity.passed
        assert "fails authentication" in integrity.description and integrity.failing_object == _biggest(manifest).key


def test_a_planted_plaintext_object_fails_the_encryption_check(policy: Policy) -> None:
    manifest = run_backup(policy, "pos").manifest
    target = _biggest(manifest)
    _path(policy, target.key).write_bytes(b"1\tcustomer1@example.com\ttok_4f9Qz7LmP2xR8sVbK1wY\n")

    outcome = _check(policy, manifest.backup_id).outcome("encryption")

    assert outcome is not None and not outcome.passed
    assert outcome.failing_object == target.key and "not in the encrypted format" in outcome.description


def test_plaintext_behind_a_forged_header_is_found_too(policy: Policy) -> None:
    manifest = run_backup(policy, "pos").manifest
    target = _biggest(manifest)
    forged = OBJECT_HEADER.pack(OBJECT_MAGIC, 1, target.encryption.key_id)
    _path(policy, target.key).write_bytes(forged + b"\x00" * 100 + b"ada.lovelace@example-pos.test\n" * 3)

    outcome = _check(policy, manifest.backup_id).outcome("encryption")

    assert outcome is not None and not outcome.passed
    assert outcome.description == f"object {target.key} contains plaintext (an e-mail address)"


def test_a_sudden_size_change_is_a_warning_that_does_not_make_the_backup_bad(policy: Policy, source: str) -> None:
    for _ in range(3):
        assert _check(policy, run_backup(policy, "pos").manifest.backup_id).passed
    execute(source, 'DELETE FROM "Sales Ops"."Order ""Lines""" WHERE amount = 99999999.99')  # the 2 MB row

    record = _check(policy, run_backup(policy, "pos").manifest.backup_id)

    size = record.outcome("size")
    assert size is not None and not size.passed and size.severity == "WARN"
    assert "against the median of the last 3 good backups" in size.description
    assert record.passed  # a WARN does not stop the backup from counting


def test_the_newest_good_backup_is_found_without_reading_every_manifest(policy: Policy) -> None:
    from regal_dagster.engine.catalog import list_backups, newest_first
    from regal_dagster.engine.checks import good_newest_first
    from regal_dagster.engine.storage.local import LocalRepository

    manifests = []
    for _ in range(5):  # each in a second of its own (ids carry the second)
        time.sleep(1 - time.time() % 1)
        manifests.append(run_backup(policy, "pos").manifest)
    for manifest in manifests[:4]:
        _check(policy, manifest.backup_id)  # the newest stays unchecked: not good

    class CountingRepository(LocalRepository):
        manifest_reads = 0

        def get_bytes(self, key: str) -> bytes:
            CountingRepository.manifest_reads += key.endswith("/manifest.json")
            return super().get_bytes(key)

    repo, keyring = CountingRepository(policy.local_repository_path()), load_keyring(policy)
    assert [m.backup_id for m in newest_first(repo, keyring, "pos")] == [
        m.backup_id for m in reversed(list_backups(repo, keyring, "pos")[0])]
    CountingRepository.manifest_reads = 0
    newest_good = next(good_newest_first(repo, keyring, "pos"))
    assert newest_good.backup_id == manifests[3].backup_id
    assert CountingRepository.manifest_reads == 2  # the unchecked newest and the good one, of five
    assert [m.backup_id for m in good_backups(repo, keyring, "pos")] == [m.backup_id for m in manifests[:4]]
