"""Whole-repository verification: `verify --all` reads every backup of every target; `verify --sample N%` reads a
reproducible random share of the objects in full (as restic's --read-data-subset), recorded with its seed."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

from regal_dagster.engine import catalog
from regal_dagster.engine.check_record import load_check_record
from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.policy import load_policy
from regal_dagster.engine.storage import open_repository

from .conftest import DatabaseFactory, run_cli, verified_backup, write_policy_file


def test_every_backup_is_verified_and_a_sampled_deep_read_is_reproducible_and_finds_damage(
        system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> None:
    policy_file = write_policy_file(tmp_path, {"pos": system_pg.create(), "crm": system_pg.create()})
    cli = functools.partial(run_cli, policy_file)
    first, second = verified_backup(policy_file), verified_backup(policy_file)
    verified_backup(policy_file, "crm")

    everything = cli("verify", "--all")
    assert everything.returncode == 0, everything.stderr
    assert "3 backup(s): 3 passed, 0 failed" in everything.stdout and "TARGET" in everything.stdout
    listed = json.loads(cli("verify", "--all", "--target", "pos", "--json").stdout)
    assert [r["backup_id"] for r in listed["verified"]] == [first, second]  # oldest first, only --target's
    assert listed["summary"]["passed"] == 2 and listed["summary"]["sample"] is None

    sampled = json.loads(cli("verify", "--all", "--sample", "50%", "--seed", "audit-42", "--json").stdout)
    policy = load_policy(policy_file)
    repo, keyring = open_repository(policy), load_keyring(policy)
    manifest = catalog.load_manifest(repo, keyring, second)
    row = next(r for r in sampled["verified"] if r["backup_id"] == second)
    assert row["sample"]["seed"] == "audit-42" and row["sample"]["percent"] == 50
    assert row["objects_read"] == math.ceil(len(manifest.objects) / 2) and row["objects_total"] == len(manifest.objects)
    record = load_check_record(repo, keyring, manifest)  # the draw is in the check record, to be repeated
    assert record is not None and record.outcome("integrity").metadata["sample"]["read"] == row["sample"]["read"]
    again = json.loads(cli("verify", second, "--sample", "50%", "--seed", "audit-42", "--json").stdout)
    assert again["sample"]["read"] == row["sample"]["read"]  # same seed, same objects

    # Damage an object the draw reads: the sampled verification finds it, says which, and the summary shows it.
    victim = next(o for o in manifest.objects if o.key == row["sample"]["read"][0])
    data = bytearray(repo.get_bytes(victim.key))
    data[len(data) // 2] ^= 0x01
    repo.put_bytes(victim.key, bytes(data))
    damaged = cli("verify", "--all", "--sample", "50%", "--seed", "audit-42")
    assert damaged.returncode == 3, damaged.stdout + damaged.stderr
    assert "3 backup(s): 2 passed, 1 failed" in damaged.stdout and f"{second} FAILED verification" in damaged.stdout
    assert "seed audit-42" in damaged.stdout

    # A backup not yet good is read whole, whatever the sample says.
    unchecked = json.loads(cli("backup", "crm", "--no-verify", "--json").stdout)["backup_id"]
    whole = cli("verify", unchecked, "--sample", "10%")
    assert whole.returncode == 0 and "read in full" in whole.stdout, whole.stdout
    assert json.loads(cli("verify", unchecked, "--sample", "10%", "--json").stdout)["sample"] is not None  # good now

    # Refusals: exit 2, each saying what to do.
    for args, words in [(("--all", "--latest"), "say which backup"), (("--seed", "x", first), "--seed goes with"),
                        (("--all", "--sample", "0%"), "above 0"), (("--all", "--sample", "ten"), "not a percentage"),
                        ((first, "--target", "pos"), "--target goes with")]:
        refused = cli("verify", *args)
        assert refused.returncode == 2 and words in refused.stderr and "what to do" in refused.stderr, refused.stderr
