"""Key rotation, retirement with re-encryption, the key inventory and the cryptoperiod check, on real
backups of a real PostgreSQL database in a local repository, through the CLI an operator uses."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from regal_dagster.engine.check_record import load_check_record
from regal_dagster.engine.checks import check_cryptoperiod
from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.errors import EncryptionKeyError, IntegrityError
from regal_dagster.engine.gdpr import load_ledger
from regal_dagster.engine.keys import object_key_id, retire_key, rotate_key
from regal_dagster.engine.layout import GDPR_LEDGER, manifest_key
from regal_dagster.engine.manifest import Manifest
from regal_dagster.engine.policy import load_policy
from regal_dagster.engine.sources.postgres.restore import restore_database
from regal_dagster.engine.storage import open_repository

from .conftest import DatabaseFactory, load_awkward_data, run_cli, verified_backup, write_policy_file


@pytest.fixture
def policy_file(system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> Path:
    source = system_pg.create()
    load_awkward_data(source)
    return write_policy_file(tmp_path, {"pos": source},
                             encryption={"keyset": "keyset.json", "master_key": {"env": "REGAL_TEST_MASTER_KEY"},
                                         "cryptoperiod": "90d", "cryptoperiod_warning": "14d"},
                             gdpr={"subjects": {"pos": [{"table": "public.customers", "match_column": "email",
                                                         "action": "delete"}]}})


def _manifest(policy_file: Path, backup_id: str) -> Manifest:
    policy = load_policy(policy_file)
    key = manifest_key("pos", backup_id)
    return Manifest.from_bytes(open_repository(policy).get_bytes(key), key, load_keyring(policy))


def test_rotate_then_retire_with_reencryption(policy_file: Path, system_pg: DatabaseFactory) -> None:
    policy = load_policy(policy_file)
    repo = open_repository(policy)
    first_key = load_keyring(policy).primary_key_id
    old = verified_backup(policy_file)
    assert run_cli(policy_file, "gdpr", "erase", "pos", "ada@example.test").returncode == 0  # the ledger uses a key too

    rotated = run_cli(policy_file, "keys", "rotate", "--json")
    assert rotated.returncode == 0, rotated.stderr
    second_key = json.loads(rotated.stdout)["primary_key_id"]
    assert second_key != first_key
    new = verified_backup(policy_file)
    assert {o.encryption.key_id for o in _manifest(policy_file, new).objects} == {second_key}
    assert run_cli(policy_file, "verify", old).returncode == 0  # older backups stay readable

    inventory = {k["key_id"]: k for k in json.loads(run_cli(policy_file, "keys", "list", "--json").stdout)["keys"]}
    assert inventory[first_key]["status"] == "decrypt-only" and inventory[first_key]["backups"] == [old]
    assert inventory[first_key]["gdpr_ledger"] and inventory[first_key]["primary_until"]
    assert inventory[second_key]["status"] == "primary" and inventory[second_key]["backups"] == [new]

    refused = run_cli(policy_file, "keys", "retire", str(first_key))
    assert refused.returncode == 1 and old in refused.stderr and "--reencrypt" in refused.stderr
    primary = run_cli(policy_file, "keys", "retire", str(second_key))
    assert primary.returncode == 1 and "keys rotate" in primary.stderr

    old_objects = {o.key for o in _manifest(policy_file, old).objects}
    retired = run_cli(policy_file, "keys", "retire", str(first_key), "--reencrypt")
    assert retired.returncode == 0, retired.stderr
    assert old in retired.stdout and "GDPR erasure ledger" in retired.stdout

    rekeyed = _manifest(policy_file, old)
    assert {o.encryption.key_id for o in rekeyed.objects} == {second_key}
    assert rekeyed.model_extra and rekeyed.model_extra["rekeyed"][0]["from_key"] == first_key
    assert not old_objects & {s.key for s in repo.list(f"backups/pos/{old}/")}  # the old objects are gone
    assert object_key_id(repo, GDPR_LEDGER) == second_key
    keyring = load_keyring(policy)
    assert first_key not in keyring.key_ids  # the material is destroyed
    assert len(load_ledger(repo, keyring).erasures) == 1
    record = load_check_record(repo, keyring, _manifest(policy_file, old))
    assert record is not None and record.passed and record.trigger == {"cli": f"keys retire {first_key}"}
    target = system_pg.create("regal_rekeyed")
    report = restore_database(repo, keyring, rekeyed, target)  # full validation: every table's fingerprint
    assert report.tables > 0 and not report.validation_problems

    inventory = {k["key_id"]: k for k in json.loads(run_cli(policy_file, "keys", "list", "--json").stdout)["keys"]}
    assert inventory[first_key]["status"] == "retired" and inventory[first_key]["backups"] == []
    assert sorted(inventory[second_key]["backups"]) == sorted([old, new])
    again = run_cli(policy_file, "keys", "retire", str(first_key))
    assert again.returncode == 1 and "was retired" in again.stderr


def test_a_damaged_backup_is_not_reencrypted_and_nothing_is_lost(policy_file: Path) -> None:
    policy = load_policy(policy_file)
    repo = open_repository(policy)
    old = verified_backup(policy_file)
    first_key = load_keyring(policy).primary_key_id
    rotate_key(policy)
    manifest = _manifest(policy_file, old)
    damaged = max(manifest.objects, key=lambda o: o.size)
    path = policy.local_repository_path() / damaged.key
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    with pytest.raises(IntegrityError, match=damaged.key):
        retire_key(policy, first_key, reencrypt=True)

    assert first_key in load_keyring(policy).key_ids  # the key stays
    assert _manifest(policy_file, old) == manifest  # the manifest still names the old objects, all there
    assert all(repo.size(o.key) == o.size for o in manifest.objects)
    assert not [s.key for s in repo.list(f"backups/pos/{old}/") if ".k" in s.key.rsplit("/", 1)[-1]]


def test_the_cryptoperiod_check_warns_as_it_nears_and_fails_past_it(policy_file: Path) -> None:
    policy = load_policy(policy_file)
    keyring = load_keyring(policy)
    since = datetime.fromisoformat(keyring.history[keyring.primary_key_id].primary_since or "")

    fresh = check_cryptoperiod(policy, keyring, since + timedelta(days=10))
    near = check_cryptoperiod(policy, keyring, since + timedelta(days=80))
    past = check_cryptoperiod(policy, keyring, since + timedelta(days=91))

    assert fresh.passed and "80 days of its cryptoperiod left" in fresh.description
    assert not near.passed and near.severity == "WARN" and "ends in 10 days" in near.description
    assert not past.passed and past.severity == "ERROR" and "keys rotate" in past.description
    rotated = rotate_key(policy)
    assert check_cryptoperiod(policy, rotated, datetime.now(UTC) + timedelta(days=1)).passed


def test_editing_the_key_dates_to_dodge_the_cryptoperiod_breaks_the_keyset(policy_file: Path) -> None:
    policy = load_policy(policy_file)
    keyset = policy.resolve_path("keyset.json")
    document = json.loads(keyset.read_text())
    for dates in document["keys"].values():
        dates["primary_since"] = (datetime.now(UTC) + timedelta(days=300)).isoformat(timespec="seconds")
    keyset.write_text(json.dumps(document))
    with pytest.raises(EncryptionKeyError, match="key dates were edited"):
        load_keyring(policy)
