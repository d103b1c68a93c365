"""The audit trail's anchor and spool, attacked for real on a real PostgreSQL audit database: an audit-database
superuser rewrites the trail consistently (triggers disabled, every hash recomputed) while a repository writer
without the keys deletes the checkpoint files that would reveal it; checkpoint files deleted or rolled back
alone; a second machine whose copy of the keyset is older (no false alarm); a genuine spool file put back
after it was consumed (no duplicate event)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

import regal_dagster.engine.audit as audit_module
from regal_dagster.engine.audit import DDL, AuditEvent, AuditTrail, anchor_of, verify_chain, verify_trail
from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.errors import RegalError
from regal_dagster.engine.layout import AUDIT_SPOOL, audit_checkpoint_key
from regal_dagster.engine.policy import Policy, load_policy
from regal_dagster.engine.repository_format import initialize
from regal_dagster.engine.storage import open_repository

from .conftest import DatabaseFactory, run_cli, write_policy_file


@pytest.fixture
def machine(system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> dict[str, Any]:
    audit_db = system_pg.create("regal_audit")
    policy_file = write_policy_file(tmp_path, {"pos": system_pg.create()}, audit={"dsn": audit_db})
    policy = load_policy(policy_file)
    return {"policy_file": policy_file, "policy": policy, "audit_db": audit_db, "tmp": tmp_path,
            "checkpoints": policy.local_repository_path() / "audit" / "checkpoints"}


def _trail(policy: Policy) -> AuditTrail:
    return AuditTrail(policy, open_repository(policy))


def _anchored(policy: Policy) -> int | None:
    """The entry the policy's keyset anchors for its repository."""
    anchor = anchor_of(load_keyring(policy), _trail(policy).repository_id)
    return None if anchor is None else anchor.seq


def _events(machine: dict[str, Any], count: int, label: str) -> None:
    trail = _trail(machine["policy"])
    for i in range(count):
        trail.append("test_event", f"{label}-{i}", "success", {"i": i})


def _audit_verify(policy_file: Path) -> dict[str, Any]:
    done = run_cli(policy_file, "audit", "verify", "--json")
    assert done.returncode in (0, 3), done.stderr
    return {"exit": done.returncode, **json.loads(done.stdout)}


def _head(machine: dict[str, Any]) -> int:
    verdict = _audit_verify(machine["policy_file"])
    assert verdict["exit"] == 0 and verdict["intact"], verdict
    return int(verdict["head_seq"])


def _rewrite_consistently_from(audit_db: str, first: int) -> None:
    """What a superuser of the audit database can do: triggers off, entry `first` edited, every hash from it
    on recomputed so that the chain holds again, triggers back on."""
    with psycopg.connect(audit_db, autocommit=True) as conn:
        conn.execute("ALTER TABLE regal_audit.events DISABLE TRIGGER USER")
        conn.execute("UPDATE regal_audit.events SET resource = 'forged' WHERE seq = %s", (first,))
        cursor = conn.execute("SELECT * FROM regal_audit.events ORDER BY seq")
        columns = [column.name for column in cursor.description or []]
        prev = audit_module.GENESIS
        for event in (AuditEvent(**dict(zip(columns, row, strict=True))) for row in cursor.fetchall()):
            if event.seq >= first:
                conn.execute("UPDATE regal_audit.events SET prev_hash = %s, hash = %s WHERE seq = %s",
                             (prev, event.chained_hash(prev), event.seq))
            prev = event.chained_hash(prev) if event.seq >= first else event.hash
        conn.execute("ALTER TABLE regal_audit.events ENABLE TRIGGER USER")


def test_a_consistent_rewrite_with_its_checkpoints_deleted_is_named(machine: dict[str, Any]) -> None:
    _events(machine, 4, "early")
    older = _head(machine)  # checkpoint `older`: entries up to it stay genuine
    _events(machine, 5, "late")
    anchored = _head(machine)  # checkpoint `anchored`, and the keyset's anchor
    assert _anchored(machine["policy"]) == anchored
    _events(machine, 2, "after")

    _rewrite_consistently_from(machine["audit_db"], older + 2)
    verdict = _audit_verify(machine["policy_file"])  # the database account alone: a checkpoint tells
    assert verdict["exit"] == 3 and verdict["first_bad_seq"] == anchored and "differs from its checkpoint" in \
        verdict["problem"]

    (machine["checkpoints"] / Path(audit_checkpoint_key(anchored)).name).unlink()  # the one that would tell
    assert verify_chain(_trail(machine["policy"]).events(), []).ok  # the rewrite is consistent: only checkpoints know

    verdict = _audit_verify(machine["policy_file"])
    assert verdict["exit"] == 3 and verdict["first_bad_seq"] == anchored
    assert f"rewritten from one of entries {older + 1} to {anchored}" in verdict["problem"]
    assert audit_checkpoint_key(anchored) in verdict["problem"]

    shutil.rmtree(machine["checkpoints"])  # every checkpoint file gone
    done = run_cli(machine["policy_file"], "audit", "verify")
    assert done.returncode == 3
    assert f"AUDIT TRAIL BROKEN at entry {anchored}" in done.stdout
    assert f"rewritten from one of entries 1 to {anchored}" in done.stdout


def test_a_deleted_newest_or_older_checkpoint_is_named(machine: dict[str, Any]) -> None:
    _events(machine, 3, "first")
    older = _head(machine)
    _events(machine, 3, "second")
    newest = _head(machine)
    newest_file = machine["checkpoints"] / Path(audit_checkpoint_key(newest)).name
    kept = newest_file.read_bytes()

    newest_file.unlink()  # the anchor is ahead of the repository's checkpoints: rolled back
    verdict = _audit_verify(machine["policy_file"])
    assert verdict["exit"] == 3 and verdict["first_bad_seq"] == newest
    assert f"the checkpoint {audit_checkpoint_key(newest)} of entry {newest}" in verdict["problem"]
    assert not newest_file.exists()  # a broken verdict writes no checkpoint to cover it

    newest_file.write_bytes(kept)
    assert _audit_verify(machine["policy_file"])["exit"] == 0
    (machine["checkpoints"] / Path(audit_checkpoint_key(older)).name).unlink()
    verdict = _audit_verify(machine["policy_file"])
    assert verdict["exit"] == 3 and "holds 1 audit checkpoint(s) up to entry" in verdict["problem"]
    assert "the keyset saw 2" in verdict["problem"]

    keyset = machine["tmp"] / "keyset.json"
    document = json.loads(keyset.read_text())
    document["audit_anchors"] = {repository: {**anchor, "seq": older, "checkpoints": 1}  # without the master key
                                 for repository, anchor in document["audit_anchors"].items()}
    keyset.write_text(json.dumps(document))
    refused = run_cli(machine["policy_file"], "audit", "verify")
    assert refused.returncode != 0 and "does not open the keyset" in refused.stderr


def test_entries_after_the_newest_checkpoint_are_only_as_safe_as_the_database(machine: dict[str, Any]) -> None:
    """The limit, written down: what the audit database's owner deletes from the end of the trail after the
    newest checkpoint is not seen (nothing outside the database holds those entries yet); every `audit verify`
    and report moves the checkpoint and the anchor up to the head."""
    _events(machine, 3, "checked")
    checked = _head(machine)
    _events(machine, 3, "unchecked")
    with psycopg.connect(machine["audit_db"], autocommit=True) as conn:
        conn.execute("ALTER TABLE regal_audit.events DISABLE TRIGGER USER")
        conn.execute("DELETE FROM regal_audit.events WHERE seq > %s", (checked,))
        conn.execute("ALTER TABLE regal_audit.events ENABLE TRIGGER USER")
    assert _audit_verify(machine["policy_file"])["exit"] == 0


def test_a_second_machine_with_an_older_keyset_copy_raises_no_false_alarm(machine: dict[str, Any]) -> None:
    _events(machine, 2, "a")
    first = _head(machine)
    second_dir = machine["tmp"] / "second-machine"
    second_dir.mkdir()
    shutil.copy2(machine["tmp"] / "keyset.json", second_dir / "keyset.json")  # its copy, taken now
    document = yaml.safe_load(machine["policy_file"].read_text())
    document["repository"]["url"] = str(machine["policy"].local_repository_path())
    second_file = second_dir / "regal_backup.yaml"
    second_file.write_text(yaml.safe_dump(document))
    second = load_policy(second_file)
    assert _anchored(second) == first

    _events(machine, 3, "b")
    ahead = _head(machine)  # the first machine's anchor moves on; the copy's lags
    assert ahead > first and _anchored(second) == first
    assert _audit_verify(second_file)["exit"] == 0  # a lagging anchor is older, not an alarm
    _events(machine, 2, "c")
    newest = _head({**machine, "policy_file": second_file})
    assert _anchored(second) == newest > ahead
    assert _audit_verify(machine["policy_file"])["exit"] == 0

    (machine["checkpoints"] / Path(audit_checkpoint_key(newest)).name).unlink()
    verdict = _audit_verify(second_file)  # the second machine's anchor is now the one that knows
    assert verdict["exit"] == 3 and verdict["first_bad_seq"] == newest


def test_one_keyset_for_two_repositories_keeps_an_anchor_for_each(machine: dict[str, Any]) -> None:
    """A keyset (discouraged, but possible) shared by two repositories, one audit trail: each repository's
    checkpoints are compared with its own anchor, never with the other's."""
    other_dir = machine["tmp"] / "other"
    other_dir.mkdir()
    document = yaml.safe_load(machine["policy_file"].read_text())
    document["encryption"]["keyset"] = str(machine["tmp"] / "keyset.json")
    other_file = other_dir / "regal_backup.yaml"
    other_file.write_text(yaml.safe_dump(document))
    other = load_policy(other_file)
    initialize(open_repository(other), load_keyring(other))

    _events(machine, 2, "a")
    first = _head(machine)
    _events(machine, 2, "b")
    second = _head({**machine, "policy_file": other_file})
    assert (_anchored(machine["policy"]), _anchored(other)) == (first, second)
    assert _audit_verify(machine["policy_file"])["exit"] == 0  # the other repository lacks `first`: no matter
    (other_dir / "repository" / audit_checkpoint_key(second)).unlink()
    assert _audit_verify(other_file)["exit"] == 3


def test_a_consumed_spool_file_put_back_adds_no_duplicate_event(machine: dict[str, Any]) -> None:
    policy = machine["policy"]
    trail = _trail(policy)
    trail.append("first", "r1", "success", {})
    down = policy.model_copy(update={"audit": policy.audit.model_copy(
        update={"dsn": "postgresql://postgres@127.0.0.1:9/regal_audit"})})
    with pytest.raises(RegalError, match="cannot reach the audit database"):
        AuditTrail(down, trail.repo).append("while_down", "r2", "success", {"n": 1})
    (spooled,) = trail.repo.list(AUDIT_SPOOL)
    copy = trail.repo.get_bytes(spooled.key)  # what a repository writer keeps
    trail.append("after", "r3", "success", {})
    (original,) = [e for e in trail.events() if e.event_type == "while_down"]

    trail.repo.put_bytes(spooled.key, copy)  # the genuine, sealed file put back
    audit_module._SPOOL_CHECKED.clear()  # a fresh process lists the spool
    trail.append("later", "r4", "success", {})

    events = trail.events()
    assert [e.seq for e in events if e.event_type == "while_down"] == [original.seq]
    (replayed,) = [e for e in events if e.event_type == "audit_spool_replayed"]
    details = json.loads(replayed.details)
    assert replayed.outcome == "failure" and replayed.resource == spooled.key
    assert details["chained_as"] == original.seq and details["event_id"] == original.event_id
    assert not list(trail.repo.list(AUDIT_SPOOL)) and verify_trail(trail).ok
    with psycopg.connect(machine["audit_db"], autocommit=True) as conn, pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("INSERT INTO regal_audit.events SELECT seq + 1000, at, actor, event_type, outcome, host, "
                     "process, run_id, resource, details, prev_hash, hash, event_id FROM regal_audit.events "
                     "WHERE seq = %s", (original.seq,))


def test_a_trail_from_before_event_ids_gets_its_column_and_still_verifies(machine: dict[str, Any]) -> None:
    """An audit database made by the previous version (no event_id column, entries hashed without one): the
    schema is migrated on the next event, old and new entries verify together, and a spooled event from
    before event ids, put back after it was consumed, is still recognised."""
    old_ddl = "\n".join(line for line in DDL.splitlines() if "event_id" not in line)
    with psycopg.connect(machine["audit_db"], autocommit=True) as conn:
        conn.execute(old_ddl)
        prev = audit_module.GENESIS
        for seq in (1, 2):
            old = AuditEvent(seq, audit_module.datetime.now(audit_module.UTC), "user:old", "old_event", "success",
                             "host", "regal-backup[1]", None, f"old-{seq}",
                             audit_module.canonical_details({"spooled": True}))
            conn.execute(f"INSERT INTO regal_audit.events ({', '.join(audit_module.FIELDS)}, prev_hash, hash) "
                         f"VALUES ({', '.join(['%s'] * (len(audit_module.FIELDS) + 2))})",
                         [getattr(old, n) for n in audit_module.FIELDS] + [prev, old.chained_hash(prev)])
            prev = old.chained_hash(prev)
    audit_module._SCHEMA_READY.clear()  # a fresh process
    trail = _trail(machine["policy"])
    legacy = {k: v for k, v in old.to_json().items() if k != "event_id"} | {"details": {}}  # as spooled then
    audit_module.write_document(trail.repo, trail.keyring, audit_module.SPOOL_KIND,
                                f"{AUDIT_SPOOL}20260101T000000.000000Z-0ld0ld0l.json", legacy)
    audit_module._SPOOL_CHECKED.clear()
    trail.append("new_event", "new", "success", {})

    events = trail.events()
    assert [e.event_id is None for e in events][:2] == [True, True] and events[-1].event_id
    assert [e.event_type for e in events].count("old_event") == 2  # the legacy replay was not chained again
    assert any(e.event_type == "audit_spool_replayed" for e in events)
    assert verify_chain(events, []).ok
