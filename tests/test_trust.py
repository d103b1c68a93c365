"""An attacker who can write the repository but holds no key: every attack is refused or detected, the
target database untouched. Each test reads like the attack it tries."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from regal_dagster.engine import crypto
from regal_dagster.engine.audit import AuditTrail
from regal_dagster.engine.backup import run_backup
from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.documents import canonical
from regal_dagster.engine.layout import GDPR_LEDGER, REPOSITORY_MARKER, checks_key, manifest_key
from regal_dagster.engine.policy import load_policy
from regal_dagster.engine.storage import open_repository

from .conftest import CLI, DatabaseFactory, run_cli, write_policy_file
from .old_formats import body_of, with_bare_digests

CARDS = """
CREATE TABLE card_blocklist (token text PRIMARY KEY, reason text);
CREATE TABLE card_allowlist (token text PRIMARY KEY, merchant text);
INSERT INTO card_blocklist SELECT 'tok_stolen_' || g, 'reported stolen' FROM generate_series(1, 50) g;
INSERT INTO card_allowlist SELECT 'tok_vip_' || g, 'store ' || g FROM generate_series(1, 40) g;
CREATE TABLE customers (id serial PRIMARY KEY, email text UNIQUE NOT NULL, name text);
INSERT INTO customers (email, name) SELECT 'customer' || g || '@example.com', 'Customer ' || g
  FROM generate_series(1, 300) g;
"""


def _sql(dsn: str, statement: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(statement)
        return cur.fetchall() if cur.description else []


@pytest.fixture
def shop(system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> dict[str, Any]:
    source = system_pg.create()
    _sql(source, CARDS)
    policy_file = write_policy_file(
        tmp_path, {"pos": source}, audit={"dsn": system_pg.create("regal_audit")},
        gdpr={"subjects": {"pos": [{"table": "public.customers", "match_column": "email", "action": "delete"}]}})
    return {"source": source, "policy_file": policy_file, "policy": load_policy(policy_file), "pg": system_pg}


def _backup(shop: dict[str, Any]) -> str:
    done = run_cli(shop["policy_file"], "backup", "pos", "--json")
    assert done.returncode == 0, done.stderr
    backup_id = str(json.loads(done.stdout)["backup_id"])
    assert run_cli(shop["policy_file"], "verify", backup_id).returncode == 0
    return backup_id


def _repo_path(shop: dict[str, Any], key: str) -> Path:
    return shop["policy"].local_repository_path() / key


def _reseal_v2_style(shop: dict[str, Any], key: str, edit: Any) -> None:
    """What an attacker can do without the keys: write the manifest's JSON (here taken from the genuine one,
    which they cannot read) edited, and recompute any checksum anyone can."""
    path = _repo_path(shop, key)
    document = body_of(shop["policy"], key)
    edit(document)
    document.pop("seal", None)
    document["manifest_sha256"] = hashlib.sha256(canonical(document)).hexdigest()
    path.write_text(json.dumps(document))


def _occupied(shop: dict[str, Any]) -> str:
    """A live database someone would restore over with --drop-existing."""
    dsn = shop["pg"].create("regal_live")
    _sql(dsn, "CREATE TABLE precious (id int); INSERT INTO precious VALUES (42)")
    return dsn


def _untouched(dsn: str) -> bool:
    return _sql(dsn, "SELECT id FROM precious") == [(42,)]


@pytest.mark.parametrize("tampering", ["swap the tables' objects", "drop a table", "rename a column"])
def test_a_resealed_manifest_is_refused_everywhere_and_nothing_is_dropped(shop: dict[str, Any], tampering: str) -> None:
    backup_id = _backup(shop)

    def edit(document: dict[str, Any]) -> None:
        tables = {t["name"]: t for t in document["source"]["tables"]}
        if tampering == "swap the tables' objects":  # blocklisted tokens would come back as allowed
            _swap_locations(tables["card_blocklist"], tables["card_allowlist"])
        elif tampering == "drop a table":  # the customers would come back empty
            document["source"]["tables"] = [t for t in document["source"]["tables"] if t["name"] != "customers"]
        else:
            tables["customers"]["columns"][1] = "email; DROP TABLE precious"

    key = manifest_key("pos", backup_id)
    _reseal_v2_style(shop, key, edit)

    verified = run_cli(shop["policy_file"], "verify", backup_id, "--json")
    assert verified.returncode == 3
    manifest_check = next(c for c in json.loads(verified.stdout)["checks"] if c["name"] == "manifest")
    assert not manifest_check["passed"] and key in manifest_check["description"]

    live = _occupied(shop)
    restored = run_cli(shop["policy_file"], "restore", backup_id, "--to", live, "--drop-existing")
    assert restored.returncode != 0 and key in restored.stderr and "Traceback" not in restored.stderr
    assert _untouched(live)

    tested = run_cli(shop["policy_file"], "restore-test", backup_id)
    assert tested.returncode != 0 and key in tested.stderr

    listing = json.loads(run_cli(shop["policy_file"], "list", "--json").stdout)
    assert listing["backups"] == [] and [d["backup_id"] for d in listing["damaged"]] == [backup_id]


def test_a_manifest_copied_over_another_backups_is_refused_and_latest_says_so(shop: dict[str, Any]) -> None:
    older = _backup(shop)
    _sql(shop["source"], "INSERT INTO card_blocklist VALUES ('tok_new_theft', 'reported today')")
    newer = _backup(shop)
    older_manifest = _repo_path(shop, manifest_key("pos", older)).read_bytes()
    _repo_path(shop, manifest_key("pos", newer)).write_bytes(older_manifest)  # a genuine, sealed document

    verified = run_cli(shop["policy_file"], "verify", newer, "--json")
    assert verified.returncode == 3 and "fails authentication" in verified.stdout

    listing = json.loads(run_cli(shop["policy_file"], "list", "--json").stdout)
    assert [b["backup_id"] for b in listing["backups"]] == [older]  # not "older" twice, "newer" not hidden
    assert [d["backup_id"] for d in listing["damaged"]] == [newer]

    target = shop["pg"].dsn(shop["pg"].new_name("regal_latest"))
    restored = run_cli(shop["policy_file"], "restore", "--target", "pos", "--latest", "--to", target)
    assert restored.returncode == 0, restored.stderr
    assert f"{newer} cannot be trusted" in restored.stderr  # the older state comes back, but not silently


def test_a_forged_check_record_does_not_make_a_corrupt_backup_good(shop: dict[str, Any]) -> None:
    good = _backup(shop)
    corrupt = _backup(shop)
    biggest = max(_repo_path(shop, f"backups/pos/{corrupt}").rglob("*.copy"), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0x01
    biggest.write_bytes(bytes(data))
    record_path = _repo_path(shop, checks_key(corrupt))
    record = body_of(shop["policy"], checks_key(corrupt))
    record_path.write_text(json.dumps({**record, "passed": True}))  # "good", says the forger

    listing = json.loads(run_cli(shop["policy_file"], "list", "--json").stdout)
    status = {b["backup_id"]: (b["status"], b["status_note"]) for b in listing["backups"]}
    assert status[good] == ("good", None)
    assert status[corrupt][0] == "unchecked" and checks_key(corrupt) in status[corrupt][1]

    target = shop["pg"].dsn(shop["pg"].new_name("regal_latest"))
    restored = run_cli(shop["policy_file"], "restore", "--target", "pos", "--latest", "--to", target)
    assert restored.returncode == 0, restored.stderr
    assert f"{corrupt} was not checked" in restored.stderr and "it FAILED" in restored.stderr
    assert f"restored {good}" in restored.stdout


def test_a_check_record_rolled_back_after_a_failed_verification_is_caught(shop: dict[str, Any]) -> None:
    good = _backup(shop)
    corrupt = _backup(shop)
    old_record = _repo_path(shop, checks_key(corrupt)).read_bytes()  # authentic: it passed back then
    biggest = max(_repo_path(shop, f"backups/pos/{corrupt}").rglob("*.copy"), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0x01
    biggest.write_bytes(bytes(data))
    assert run_cli(shop["policy_file"], "verify", corrupt).returncode == 3  # recorded as failed, and audited
    _repo_path(shop, checks_key(corrupt)).write_bytes(old_record)  # rolled back

    target = shop["pg"].dsn(shop["pg"].new_name("regal_latest"))
    restored = run_cli(shop["policy_file"], "restore", "--target", "pos", "--latest", "--to", target)
    assert restored.returncode == 0, restored.stderr
    assert "later failed verification" in restored.stderr and f"restored {good}" in restored.stdout


def test_a_rolled_back_or_deleted_erasure_ledger_stops_the_restore_naming_the_erasures(shop: dict[str, Any]) -> None:
    _backup(shop)  # before the requests
    assert run_cli(shop["policy_file"], "gdpr", "erase", "pos", "customer7@example.com",
                   "--reference", "DSR-7").returncode == 0
    old_ledger = _repo_path(shop, GDPR_LEDGER).read_bytes()
    assert run_cli(shop["policy_file"], "gdpr", "erase", "pos", "customer8@example.com",
                   "--reference", "DSR-8").returncode == 0
    backup_id = _backup(shop)  # taken after both erasures were recorded: its manifest saw revision 2

    for attack in ("roll back", "delete"):
        if attack == "roll back":
            _repo_path(shop, GDPR_LEDGER).write_bytes(old_ledger)
        else:
            _repo_path(shop, GDPR_LEDGER).unlink()
        live = _occupied(shop)
        refused = run_cli(shop["policy_file"], "restore", backup_id, "--to", live, "--drop-existing")
        assert refused.returncode == 3, refused.stderr
        assert "was rolled back or replaced" in refused.stderr and "DSR-8" in refused.stderr
        assert _untouched(live)
        tested = run_cli(shop["policy_file"], "restore-test", backup_id, "--json")
        assert tested.returncode == 3 and "rolled back" in tested.stdout

    accepted = run_cli(shop["policy_file"], "restore", backup_id, "--to", _occupied(shop), "--drop-existing",
                       "--accept-ledger-rollback")
    assert accepted.returncode == 0, accepted.stderr
    trail = AuditTrail(shop["policy"], open_repository(shop["policy"]))
    assert trail.last_outcome("gdpr_ledger_rollback_accepted", backup_id) == "failure"  # on the record


def test_a_deleted_manifest_shows_as_damaged_and_prune_leaves_its_objects(shop: dict[str, Any]) -> None:
    kept, victim = _backup(shop), _backup(shop)
    objects = sorted(p.name for p in _repo_path(shop, f"backups/pos/{victim}").rglob("*") if p.is_file())
    _repo_path(shop, manifest_key("pos", victim)).unlink()
    _repo_path(shop, checks_key(victim)).unlink()  # the attacker covers the tracks too: the audit trail remembers

    listing = run_cli(shop["policy_file"], "list")
    assert listing.returncode == 1 and f"{victim}" in listing.stdout and "DAMAGED" in listing.stdout

    pruned = run_cli(shop["policy_file"], "prune", "--json")
    assert pruned.returncode == 0, pruned.stderr
    assert victim in json.loads(pruned.stdout)["damaged"]
    assert sorted(p.name for p in _repo_path(shop, f"backups/pos/{victim}").rglob("*") if p.is_file()) == [
        o for o in objects if o not in ("manifest.json", "checks.json")]
    assert kept in run_cli(shop["policy_file"], "list").stdout


def test_an_event_planted_in_the_audit_spool_is_refused_not_chained(shop: dict[str, Any]) -> None:
    _backup(shop)
    planted = _plant_spool_event(shop)
    _backup(shop)  # the next audited operation finds it

    events = AuditTrail(shop["policy"], open_repository(shop["policy"])).events()
    assert not [e for e in events if e.resource == "pos-forged"]
    (refused,) = [e for e in events if e.event_type == "audit_spool_refused"]
    assert refused.resource == planted and "carries no seal" in json.loads(refused.details)["reason"]
    assert run_cli(shop["policy_file"], "audit", "verify").returncode == 0  # the chain itself is intact


def test_a_forged_audit_checkpoint_is_named_not_blamed_on_the_database(shop: dict[str, Any]) -> None:
    _backup(shop)
    assert run_cli(shop["policy_file"], "audit", "verify").returncode == 0  # writes a checkpoint
    (checkpoint,) = _repo_path(shop, "audit/checkpoints").iterdir()
    body = body_of(shop["policy"], f"audit/checkpoints/{checkpoint.name}")
    checkpoint.write_text(json.dumps({**body, "hash": "0" * 64}))

    verified = run_cli(shop["policy_file"], "audit", "verify")
    assert verified.returncode == 3 and f"audit/checkpoints/{checkpoint.name}" in verified.stdout


def test_two_key_rotations_at_once_both_keep_their_keys(shop: dict[str, Any]) -> None:
    backups = {}
    for trial in range(8):
        before = load_keyring(shop["policy"]).key_ids
        rotations = [subprocess.Popen([*CLI, "keys", "rotate", "--json", "--policy", str(shop["policy_file"])],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outcomes = [(r.wait(timeout=120), r.stdout.read(), r.stderr.read()) for r in rotations]  # type: ignore[union-attr]
        succeeded = [json.loads(out)["primary_key_id"] for code, out, _ in outcomes if code == 0]
        refused = [err for code, _, err in outcomes if code != 0]
        # a clear refusal naming what holds the lock and what to do, or success
        assert all("key rotation or retirement is running" in err and "--wait" in err for err in refused), refused
        after = load_keyring(shop["policy"]).key_ids
        assert after == before | set(succeeded) and len(after) == len(before) + len(succeeded)
        if trial % 3 == 0:
            backups[_backup(shop)] = load_keyring(shop["policy"]).primary_key_id
    for backup_id in backups:  # every backup taken under any of those keys still reads back in full
        assert run_cli(shop["policy_file"], "verify", backup_id).returncode == 0


def test_a_backup_never_encrypts_with_a_key_retired_since_its_keyring_was_read(shop: dict[str, Any]) -> None:
    policy = shop["policy"]
    stale = load_keyring(policy)  # read before the rotation and retirement below
    _backup(shop)
    assert run_cli(shop["policy_file"], "keys", "rotate").returncode == 0
    retired = run_cli(shop["policy_file"], "keys", "retire", str(stale.primary_key_id), "--reencrypt")
    assert retired.returncode == 0, retired.stderr

    manifest = run_backup(policy, "pos", keyring=stale).manifest

    assert {o.encryption.key_id for o in manifest.objects} == {load_keyring(policy).primary_key_id}


def test_prune_during_a_stalled_backup_leaves_its_objects(shop: dict[str, Any]) -> None:
    _backup(shop)
    _sql(shop["source"], "CREATE TABLE bulk AS SELECT g, md5(g::text) AS h FROM generate_series(1, 1000000) g")
    document = shop["policy_file"].read_text().replace("targets:", "prune:\n  orphan_grace: 0s\ntargets:")
    shop["policy_file"].write_text(document)
    backup = subprocess.Popen([*CLI, "backup", "pos", "--policy", str(shop["policy_file"])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    prefix = _repo_path(shop, "backups/pos")

    def storing() -> Path | None:  # the new backup's directory, once it holds a file
        unfinished = [d for d in prefix.iterdir() if not (d / "manifest.json").exists()]
        return unfinished[0] if unfinished and any(f.is_file() for f in unfinished[0].rglob("*")) else None

    deadline = time.monotonic() + 60
    while (running := storing()) is None:
        assert time.monotonic() < deadline and backup.poll() is None, "the backup did not start storing"
        time.sleep(0.01)
    os.kill(backup.pid, signal.SIGSTOP)  # stalled, holding the target's lock
    try:
        stored = sorted(p.name for p in running.rglob("*") if p.is_file())
        pruned = run_cli(shop["policy_file"], "prune", "--json")
        assert pruned.returncode == 0, pruned.stderr
        assert json.loads(pruned.stdout)["running"] == ["pos"]
        assert sorted(p.name for p in running.rglob("*") if p.is_file()) == stored
    finally:
        os.kill(backup.pid, signal.SIGCONT)
    assert backup.wait(timeout=120) == 0, backup.stderr.read()  # type: ignore[union-attr]
    backup_id = running.name
    assert run_cli(shop["policy_file"], "verify", backup_id).returncode == 0


def test_a_manifest_put_back_after_a_reencryption_is_caught_and_prune_keeps_the_live_objects(
        shop: dict[str, Any]) -> None:
    backup_id = _backup(shop)
    path = _repo_path(shop, manifest_key("pos", backup_id))
    before_rekey = path.read_bytes()
    old_key = load_keyring(shop["policy"]).primary_key_id
    assert run_cli(shop["policy_file"], "keys", "rotate").returncode == 0
    assert run_cli(shop["policy_file"], "keys", "retire", str(old_key), "--reencrypt").returncode == 0
    live_objects = sorted(p.name for p in path.parent.iterdir() if ".k" in p.name)
    path.write_bytes(before_rekey)  # authentic, but older

    verified = run_cli(shop["policy_file"], "verify", backup_id, "--json")
    assert verified.returncode == 3 and "older version put back" in verified.stdout
    document = shop["policy_file"].read_text().replace("targets:", "prune:\n  orphan_grace: 0s\ntargets:")
    shop["policy_file"].write_text(document)
    pruned = run_cli(shop["policy_file"], "prune", "--json")
    assert pruned.returncode == 0 and "retired key" in json.loads(pruned.stdout)["damaged"][backup_id]
    assert sorted(p.name for p in path.parent.iterdir() if ".k" in p.name) == live_objects


def test_a_forged_restore_test_record_and_a_planted_sample_are_refused(shop: dict[str, Any]) -> None:
    from regal_dagster.engine.alerts import restore_test_conditions
    from regal_dagster.engine.sampling import draw_restore_sample

    policy = shop["policy"]
    backup_id = _backup(shop)
    key = f"restore-tests/pos/20991231T000000.000000Z-{backup_id}.json"
    _repo_path(shop, key).parent.mkdir(parents=True, exist_ok=True)
    _repo_path(shop, key).write_text(json.dumps({"backup_id": backup_id, "validation_passed": True,
                                                 "rto_within_target": True}))
    (condition,) = restore_test_conditions(policy, open_repository(policy), load_keyring(policy))
    assert condition.event == "document_refused" and key in condition.what

    sample = "restore-tests/samples/2099-01.json"
    _repo_path(shop, sample).parent.mkdir(parents=True, exist_ok=True)
    _repo_path(shop, sample).write_text(json.dumps({"month": "2099-01", "seed": "chosen-by-me", "chosen": []}))
    with pytest.raises(Exception, match=f"{sample} carries no seal"):
        from datetime import UTC, datetime

        draw_restore_sample(policy, open_repository(policy), load_keyring(policy), datetime(2099, 1, 15, tzinfo=UTC))


def test_an_unsealed_or_forged_repository_marker_is_refused(shop: dict[str, Any]) -> None:
    _backup(shop)
    marker = _repo_path(shop, REPOSITORY_MARKER)
    body = body_of(shop["policy"], REPOSITORY_MARKER)
    marker.write_text(json.dumps({**body, "created_at": "2001-01-01T00:00:00+00:00"}))
    listed = run_cli(shop["policy_file"], "list")
    assert listed.returncode != 0 and REPOSITORY_MARKER in listed.stderr


def test_the_threat_model_is_written_down() -> None:
    formats = (Path(__file__).resolve().parents[1] / "docs" / "formats.md").read_text()
    assert "## Threat model" in formats
    for actor in ("repository write access", "the keys", "database superuser"):
        assert actor in formats


def _as_format_1_manifest(document: dict[str, Any]) -> None:
    """A manifest body as format 1 wrote it: no seal, version 2, its own SHA-256 (which anyone can recompute)."""
    document.pop("seal", None)
    document.pop("ledger_revision", None)
    document.pop("manifest_sha256", None)
    document["version"] = 2
    document["manifest_sha256"] = hashlib.sha256(canonical(document)).hexdigest()


def _format_1_marker(shop: dict[str, Any]) -> None:
    """The marker as format 1 wrote it, in plain JSON (what anyone who can write the repository can write)."""
    marker = body_of(shop["policy"], REPOSITORY_MARKER)
    _repo_path(shop, REPOSITORY_MARKER).write_text(json.dumps({"format": marker["format"], "version": 1,
                                                               "created_at": marker["created_at"]}))


def _make_format_1(shop: dict[str, Any], backup_ids: list[str]) -> None:
    """Turn a repository back into what an earlier regal-backup left (manifests, check records, marker and a
    version 2 keyset without document keys): a genuine format 1 repository."""
    policy = shop["policy"]
    keyring = load_keyring(policy)
    repo = open_repository(policy)
    for backup_id in backup_ids:  # written back the way format 1 wrote them
        path = _repo_path(shop, manifest_key("pos", backup_id))
        body = with_bare_digests(repo, keyring, body_of(policy, manifest_key("pos", backup_id)), backup_id)
        body.pop("ledger_revision")
        body["version"] = 2
        body["manifest_sha256"] = hashlib.sha256(canonical(body)).hexdigest()
        path.write_text(json.dumps(body))
        record = body_of(policy, checks_key(backup_id))
        record.pop("manifest_digest")
        _repo_path(shop, checks_key(backup_id)).write_text(json.dumps({**record, "version": 1}))
    _format_1_marker(shop)
    keyset_path = policy.resolve_path(policy.encryption.keyset)
    master = keyring.origin.master  # type: ignore[union-attr]
    history = keyring.stream.history
    keyset_path.write_text(json.dumps({
        "format": "regal-backup-keyset", "version": 2, "template": crypto.STREAMING_TEMPLATE_NAME,
        "primary_key_id": keyring.primary_key_id, "keys": {str(k): v.to_json() for k, v in history.items()},
        "encrypted_keyset": crypto.tink.json_proto_keyset_format.serialize_encrypted(
            keyring.stream.handle, master, crypto._keyset_aad_v2(history))}))


def test_a_format_1_repository_is_upgraded_and_a_tampered_manifest_stays_damaged(
        shop: dict[str, Any], tmp_path: Path) -> None:
    """A repository as an earlier regal-backup left it: self-checksummed manifests, plain documents, a plain
    marker, a keyset without document keys. `regal-backup upgrade` seals it; an edited manifest stays out."""
    policy = shop["policy"]
    first, second = _backup(shop), _backup(shop)
    _make_format_1(shop, [first, second])
    tampered = _repo_path(shop, manifest_key("pos", second))
    tampered.write_text(tampered.read_text().replace('"daily"', '"monthly"').replace('"hourly"', '"monthly"'))

    before = run_cli(shop["policy_file"], "list")
    assert before.returncode != 0 and "regal-backup upgrade" in before.stderr

    upgraded = run_cli(shop["policy_file"], "upgrade", "--json")
    assert upgraded.returncode == 3, upgraded.stderr
    report = json.loads(upgraded.stdout)
    assert report["keyset_upgraded"] and report["manifests_sealed"] == [first]
    assert list(report["refused"]) == [manifest_key("pos", second)]
    assert load_keyring(policy).macs is not None

    listing = json.loads(run_cli(shop["policy_file"], "list", "--json").stdout)
    assert [(b["backup_id"], b["status"]) for b in listing["backups"]] == [(first, "good")]
    assert [d["backup_id"] for d in listing["damaged"]] == [second]
    target = shop["pg"].dsn(shop["pg"].new_name("regal_upgraded"))
    assert run_cli(shop["policy_file"], "restore", first, "--to", target).returncode == 0
    assert _sql(target, "SELECT count(*) FROM card_blocklist") == [(50,)]
    again = run_cli(shop["policy_file"], "upgrade")
    assert again.returncode == 0 and "nothing to do" in again.stdout


def _plant_spool_event(shop: dict[str, Any]) -> str:
    """An audit event planted in the spool, unsealed: a restore test that never happened."""
    forged = {"seq": 0, "at": "2026-01-01T00:00:00+00:00", "actor": "user:auditor", "event_type": "restore_test",
              "outcome": "success", "host": "x", "process": "x[1]", "run_id": None, "resource": "pos-forged",
              "details": {"rto_seconds": 1}, "prev_hash": "", "hash": ""}
    planted = "audit/spool/20260101T000000.000000Z-deadbeef.json"
    _repo_path(shop, planted).parent.mkdir(parents=True, exist_ok=True)
    _repo_path(shop, planted).write_text(json.dumps(forged))
    import regal_dagster.engine.audit as audit_module

    audit_module._SPOOL_CHECKED.clear()  # a fresh process would list the spool
    return planted


def _swap_tables_objects(document: dict[str, Any]) -> None:
    """Blocklisted tokens would come back as allowed: the two card tables' objects swapped."""
    tables = {t["name"]: t for t in document["source"]["tables"]}
    _swap_locations(tables["card_blocklist"], tables["card_allowlist"])


def _swap_locations(one: dict[str, Any], other: dict[str, Any]) -> None:
    """Two tables' rows swapped: their objects, and where in them (both small: in one pack, at their offsets)."""
    for key in ("object", "offset", "length"):
        one[key], other[key] = other.get(key), one.get(key)


def _chained_resources(shop: dict[str, Any]) -> list[str]:
    return [e.resource for e in AuditTrail(shop["policy"], open_repository(shop["policy"])).events()]


def test_a_downgraded_marker_does_not_launder_a_forged_manifest_and_spool_event(shop: dict[str, Any]) -> None:
    """The attack: a current repository's marker set back to format 1, a forged unsealed manifest (tables
    swapped) and a spooled event planted; the operator runs `regal-backup upgrade` as every command tells
    them. The keyset remembers format 3: upgrade is refused as a downgrade, naming the marker, and seals
    nothing; once the marker is put back, verify still refuses the forgery; the event never joins the chain."""
    backup_id = _backup(shop)
    key = manifest_key("pos", backup_id)
    genuine_marker = _repo_path(shop, REPOSITORY_MARKER).read_bytes()
    manifest = body_of(shop["policy"], key)
    _swap_tables_objects(manifest)
    _as_format_1_manifest(manifest)
    _repo_path(shop, key).write_text(json.dumps(manifest))
    _format_1_marker(shop)
    planted = _plant_spool_event(shop)
    forged_bytes, marker_bytes = _repo_path(shop, key).read_bytes(), _repo_path(shop, REPOSITORY_MARKER).read_bytes()

    listed = run_cli(shop["policy_file"], "list")
    assert listed.returncode == 3 and REPOSITORY_MARKER in listed.stderr and "rewrote the marker" in listed.stderr
    assert "`regal-backup upgrade` once" not in listed.stderr  # it does not send the operator to launder it

    upgraded = run_cli(shop["policy_file"], "upgrade")
    assert upgraded.returncode == 3, upgraded.stdout + upgraded.stderr
    assert REPOSITORY_MARKER in upgraded.stderr and "says format 1" in upgraded.stderr
    assert "downgrade" in upgraded.stderr and "off-site" in upgraded.stderr
    assert _repo_path(shop, key).read_bytes() == forged_bytes  # nothing sealed
    assert _repo_path(shop, REPOSITORY_MARKER).read_bytes() == marker_bytes
    assert "seal" not in json.loads(_repo_path(shop, key).read_text())

    _repo_path(shop, REPOSITORY_MARKER).write_bytes(genuine_marker)  # what the refusal says to do
    verified = run_cli(shop["policy_file"], "verify", backup_id, "--json")
    assert verified.returncode == 3
    manifest_check = next(c for c in json.loads(verified.stdout)["checks"] if c["name"] == "manifest")
    assert not manifest_check["passed"] and key in manifest_check["description"]
    resources = _chained_resources(shop)
    assert "pos-forged" not in resources and planted in resources  # only as the record of its refusal


def test_a_keyset_from_before_the_format_record_learns_it_on_the_next_open(shop: dict[str, Any]) -> None:
    """A keyset without the format record (null, as one from before it) records it on the next command: from
    then on the repository cannot be downgraded, whatever the audit trail says."""
    _backup(shop)
    policy = shop["policy"]
    keyring = load_keyring(policy)
    assert keyring.repository_format == 3
    path = policy.resolve_path(policy.encryption.keyset)
    crypto.save_keyring(keyring._changed(repository_format=None))
    assert json.loads(path.read_text())["version"] == crypto.KEYSET_VERSION
    assert load_keyring(policy).repository_format is None

    assert run_cli(shop["policy_file"], "list").returncode == 0
    assert load_keyring(policy).repository_format == 3
    document = json.loads(path.read_text())
    document["repository_format"] = 1  # lowering it by hand breaks the keyset
    path.write_text(json.dumps(document))
    refused = run_cli(shop["policy_file"], "list")
    assert refused.returncode != 0 and "does not open the keyset" in refused.stderr


def test_a_forgery_planted_in_a_genuine_format_1_repository_is_not_sealed(shop: dict[str, Any]) -> None:
    """A genuine format 1 repository, with a forged manifest (tables' objects swapped, its own SHA-256
    recomputed) and a spooled event planted before the upgrade: upgrade seals what it can authenticate by
    another route (the genuine backup: its objects; its check record: the audit trail) and lists the rest,
    which stays refused; exit 3."""
    first, second = _backup(shop), _backup(shop)
    _make_format_1(shop, [first, second])
    key = manifest_key("pos", second)
    manifest = json.loads(_repo_path(shop, key).read_text())
    _swap_tables_objects(manifest)
    _as_format_1_manifest(manifest)
    _repo_path(shop, key).write_text(json.dumps(manifest))
    planted = _plant_spool_event(shop)
    forged_record = json.loads(_repo_path(shop, checks_key(second)).read_text())

    upgraded = run_cli(shop["policy_file"], "upgrade", "--json")
    assert upgraded.returncode == 3, upgraded.stderr
    report = json.loads(upgraded.stdout)
    assert report["manifests_sealed"] == [first]
    assert sorted(report["refused"]) == sorted([key, planted])
    assert "swapped" in report["refused"][key] and "what to do" in report["refused"][planted]
    text = run_cli(shop["policy_file"], "upgrade").stdout  # the marker is current now: nothing more to do
    assert "nothing to do" in text
    assert "seal" not in json.loads(_repo_path(shop, key).read_text())
    assert json.loads(_repo_path(shop, checks_key(second)).read_text()) == forged_record

    listing = json.loads(run_cli(shop["policy_file"], "list", "--json").stdout)
    assert [(b["backup_id"], b["status"]) for b in listing["backups"]] == [(first, "good")]
    assert [d["backup_id"] for d in listing["damaged"]] == [second]
    assert run_cli(shop["policy_file"], "verify", second).returncode == 3
    assert "pos-forged" not in _chained_resources(shop)


def test_upgrade_refuses_a_downgrade_the_audit_trail_saw_even_with_an_older_keyset(shop: dict[str, Any]) -> None:
    """A genuine format 1 repository upgraded; later its marker is set back to format 1 and the keyset is one
    restored from a key backup made before the upgrade: the audit trail's record of the upgrade refuses it."""
    backup_id = _backup(shop)
    _make_format_1(shop, [backup_id])
    policy = shop["policy"]
    keyset = policy.resolve_path(policy.encryption.keyset)
    old_keyset = keyset.read_text()
    assert run_cli(shop["policy_file"], "upgrade").returncode == 0
    sealed = _repo_path(shop, manifest_key("pos", backup_id)).read_bytes()
    _format_1_marker(shop)
    refused = run_cli(shop["policy_file"], "upgrade")
    assert refused.returncode == 3 and "this keyset has opened format 3" in refused.stderr
    keyset.write_text(old_keyset)  # no document keys, no format: only the trail remembers
    refused = run_cli(shop["policy_file"], "upgrade")
    assert refused.returncode == 3 and REPOSITORY_MARKER in refused.stderr
    assert "the audit trail records an upgrade" in refused.stderr
    assert _repo_path(shop, manifest_key("pos", backup_id)).read_bytes() == sealed


def _swap_smallest_and_biggest_tables(shop: dict[str, Any], backup_id: str) -> tuple[str, str]:
    document = body_of(shop["policy"], manifest_key("pos", backup_id))
    tables = sorted((o for o in document["objects"] if o["name"] != "schema"), key=lambda o: o["size"])
    small, big = tables[0]["key"], tables[-1]["key"]
    small_path, big_path = _repo_path(shop, small), _repo_path(shop, big)
    small_bytes, big_bytes = small_path.read_bytes(), big_path.read_bytes()
    assert len(small_bytes) < len(big_bytes)
    small_path.write_bytes(big_bytes)
    big_path.write_bytes(small_bytes)
    return small, big


def test_two_objects_of_one_backup_swapped_are_an_integrity_failure_naming_an_object(shop: dict[str, Any]) -> None:
    """A keyless writer swaps the biggest and the smallest table objects of one backup (the size a manifest
    records is smaller than what is stored at its key, and the other way round). Not checked yet: `restore
    --latest` checks it, passes it over naming the object, and `verify` fails naming it (exit 3). Checked
    good before the swap: `restore --latest` takes it and stops naming the object (exit 3). Never a
    traceback or an "unexpected" error."""
    _sql(shop["source"], "CREATE TABLE bulk AS SELECT g, md5(g::text) AS h FROM generate_series(1, 20000) g")
    done = run_cli(shop["policy_file"], "backup", "pos", "--no-verify", "--json")
    assert done.returncode == 0, done.stderr
    unchecked = json.loads(done.stdout)["backup_id"]
    small, big = _swap_smallest_and_biggest_tables(shop, unchecked)

    target = shop["pg"].dsn(shop["pg"].new_name("regal_swapped"))
    restored = run_cli(shop["policy_file"], "restore", "--target", "pos", "--latest", "--to", target)
    assert restored.returncode == 1, (restored.stdout, restored.stderr)  # no good backup to restore
    assert "Traceback" not in restored.stderr and "unexpected" not in restored.stderr
    assert f"{unchecked} was not checked" in restored.stderr and "FAILED" in restored.stderr
    assert small in restored.stderr or big in restored.stderr

    verified = run_cli(shop["policy_file"], "verify", unchecked)
    assert verified.returncode == 3, (verified.stdout, verified.stderr)
    assert "Traceback" not in verified.stderr and (small in verified.stdout or big in verified.stdout)

    good = _backup(shop)
    small, big = _swap_smallest_and_biggest_tables(shop, good)
    restored = run_cli(shop["policy_file"], "restore", "--target", "pos", "--latest", "--to", target)
    assert restored.returncode == 3, (restored.stdout, restored.stderr)
    assert "Traceback" not in restored.stderr and (small in restored.stderr or big in restored.stderr)


def test_a_forged_deletion_mark_hides_nothing(shop: dict[str, Any]) -> None:
    """Prune's deletion mark hides a backup from readers only when its seal holds: a keyless writer planting one
    (or moving a genuine one from another backup) neither hides a good backup nor turns damage into a deletion."""
    from regal_dagster.engine.layout import deleting_key

    kept, victim = _backup(shop), _backup(shop)
    _repo_path(shop, manifest_key("pos", victim)).unlink()
    _repo_path(shop, checks_key(victim)).unlink()
    for backup_id in (kept, victim):
        _repo_path(shop, deleting_key("pos", backup_id)).write_text(json.dumps(
            {"format": "regal-backup-deletion", "version": 1, "backup_id": backup_id, "at": "2026-01-01T00:00:00+00:00",
             "reason": "forged"}))

    listing = json.loads(run_cli(shop["policy_file"], "list", "--json").stdout)
    assert [b["backup_id"] for b in listing["backups"]] == [kept]
    assert [d["backup_id"] for d in listing["damaged"]] == [victim]
    assert run_cli(shop["policy_file"], "verify", kept).returncode == 0
    pruned = run_cli(shop["policy_file"], "prune", "--json")
    assert pruned.returncode == 0 and victim in json.loads(pruned.stdout)["damaged"]
    assert json.loads(pruned.stdout)["deletions_finished"] == []
    assert _repo_path(shop, f"backups/pos/{victim}").is_dir()  # evidence, left alone
