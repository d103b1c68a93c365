"""Repair from the off-site copy: a damaged object in the primary repository is named by `offsite sync` (never
copied over the good copy), and `offsite repair` puts it back from the copy, verifies the backup, and audits it."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from regal_dagster.engine import catalog
from regal_dagster.engine.audit import AuditTrail
from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.policy import load_policy
from regal_dagster.engine.storage import open_offsite, open_repository

from .conftest import DatabaseFactory, load_awkward_data, run_cli, verified_backup, write_policy_file


def _flip(repo, key: str) -> None:  # type: ignore[no-untyped-def]
    data = bytearray(repo.get_bytes(key))
    data[len(data) // 2] ^= 0x01
    repo.put_bytes(key, bytes(data))


def test_a_damaged_primary_copy_is_found_by_sync_and_repaired_from_the_good_offsite_copy(
        system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> None:
    source = system_pg.create()
    load_awkward_data(source)
    policy_file = write_policy_file(tmp_path, {"pos": source}, offsite={"url": str(tmp_path / "offsite")},
                                    audit={"dsn": system_pg.create("audit")})
    cli = functools.partial(run_cli, policy_file)
    backup_id = verified_backup(policy_file)
    policy = load_policy(policy_file)
    repo, secondary = open_repository(policy), open_offsite(policy)
    assert secondary is not None
    (victim, *_) = catalog.load_manifest(repo, load_keyring(policy), backup_id).objects
    _flip(repo, victim.key)  # bit rot in the primary repository

    synced = cli("offsite", "sync")
    assert synced.returncode == 3, synced.stdout + synced.stderr
    assert f"PRIMARY COPY DAMAGED {backup_id}: {victim.key}: different bytes" in synced.stdout
    assert f"the off-site copy is good: run `regal-backup offsite repair {backup_id}`" in synced.stdout
    assert secondary.get_bytes(victim.key) != repo.get_bytes(victim.key)  # the damage was not copied off-site
    row = json.loads(cli("offsite", "sync", "--json").stdout)["backups"][0]
    assert row["repairable"] and not row["in_step"]
    assert cli("verify", backup_id).returncode == 3  # what verify says too

    repaired = cli("offsite", "repair", backup_id, "--json")
    assert repaired.returncode == 0, repaired.stderr
    body = json.loads(repaired.stdout)
    assert body["repaired"] == [victim.key] and body["verification"]["passed"]
    assert repo.get_bytes(victim.key) == secondary.get_bytes(victim.key)
    assert "1 of 1 backups copied and read back" in cli("offsite", "sync").stdout
    assert "nothing to repair" in cli("offsite", "repair", backup_id).stdout
    events = [e for e in AuditTrail(policy, repo).events() if e.event_type == "offsite_repair"]
    assert [e.outcome for e in events] == ["success", "success"] and victim.key in events[0].details

    # Both copies damaged: sync says it cannot be repaired from there; repair refuses, naming the object.
    _flip(repo, victim.key)
    _flip(secondary, victim.key)
    assert "cannot be repaired from it" in cli("offsite", "sync").stdout
    refused = cli("offsite", "repair", backup_id)
    assert refused.returncode == 3 and f"object {victim.key} in the off-site repository differs" in refused.stderr
    assert AuditTrail(policy, repo).events()[-1].outcome == "failure"
    unknown = cli("offsite", "repair", "pos-20010101T000000Z-abcdef")
    assert unknown.returncode == 2 and "what to do" in unknown.stderr
