"""Rolling back check records and restore-test records: an attacker who can write the repository but holds no
key puts back an older, genuinely sealed record (or deletes a newer one) to silence a failure. Each record
carries its target's sequence; the audit trail and the sealed record state know the newest: every face names
the rollback, an alert fires, and prune keeps every backup of the target until a fresh record resolves it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest

from regal_dagster.engine.layout import checks_key, record_state_key, restore_test_prefix
from regal_dagster.engine.policy import load_policy

from .conftest import DatabaseFactory, run_cli, write_policy_file

# Every backup but the newest good one is due: an older good backup goes as soon as a newer one is good.
ONLY_THE_NEWEST = {"hourly": 0, "daily": 0, "weekly": 0, "monthly": 0}


def _sql(dsn: str, statement: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement)


def _shop(system_pg: DatabaseFactory, tmp_path: Path, *, audit: bool) -> dict[str, Any]:
    source = system_pg.create()
    _sql(source, "CREATE TABLE orders (id int PRIMARY KEY, total numeric);"
                 "INSERT INTO orders SELECT g, g * 1.5 FROM generate_series(1, 20000) g")
    settings: dict[str, Any] = {"retention": ONLY_THE_NEWEST}
    if audit:
        settings["audit"] = {"dsn": system_pg.create("regal_audit")}
    policy_file = write_policy_file(tmp_path, {"pos": source}, **settings)
    return {"source": source, "policy_file": policy_file, "policy": load_policy(policy_file)}


@pytest.fixture
def shop(system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> dict[str, Any]:
    return _shop(system_pg, tmp_path, audit=True)


@pytest.fixture
def shop_without_trail(system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> dict[str, Any]:
    return _shop(system_pg, tmp_path, audit=False)


def _path(shop: dict[str, Any], key: str) -> Path:
    return Path(shop["policy"].local_repository_path()) / key


def _backup(shop: dict[str, Any]) -> str:
    done = run_cli(shop["policy_file"], "backup", "pos", "--no-verify", "--json")  # checked once, below
    assert done.returncode == 0, done.stderr
    backup_id = str(json.loads(done.stdout)["backup_id"])
    verified = run_cli(shop["policy_file"], "verify", backup_id)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    return backup_id


def _corrupt(shop: dict[str, Any], backup_id: str) -> None:
    biggest = max(_path(shop, f"backups/pos/{backup_id}").rglob("*.copy"), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0x01
    biggest.write_bytes(bytes(data))


def _listing(shop: dict[str, Any]) -> tuple[int, dict[str, dict[str, Any]]]:
    listed = run_cli(shop["policy_file"], "list", "--json")
    return listed.returncode, {b["backup_id"]: b for b in json.loads(listed.stdout)["backups"]}


def _status(shop: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    status = run_cli(shop["policy_file"], "status", "--json")
    return status.returncode, json.loads(status.stdout)


def _failed_after_a_good_verification(shop: dict[str, Any]) -> tuple[str, str, bytes, bytes]:
    """An older good backup, and a newer one that passed its verification and failed a later one: (older good,
    newer, the newer's first check record and the sealed record state of then, both genuine)."""
    good = _backup(shop)
    newer = _backup(shop)
    passed_record = _path(shop, checks_key(newer)).read_bytes()
    passed_state = _path(shop, record_state_key("pos")).read_bytes()
    _corrupt(shop, newer)
    failed = run_cli(shop["policy_file"], "verify", newer)
    assert failed.returncode == 3, failed.stdout + failed.stderr
    return good, newer, passed_record, passed_state


def test_a_check_record_rolled_back_after_a_failure_is_named_everywhere_and_prune_keeps_every_backup(
        shop: dict[str, Any]) -> None:
    good, newer, passed_record, _ = _failed_after_a_good_verification(shop)
    _path(shop, checks_key(newer)).write_bytes(passed_record)  # the attack: a genuine, older record put back

    code, backups = _listing(shop)
    assert code == 3
    assert backups[good]["status"] == "good"
    assert backups[newer]["status"] == "rolled_back" and checks_key(newer) in backups[newer]["status_note"]

    shown = run_cli(shop["policy_file"], "show", newer)
    assert shown.returncode == 3 and "rolled_back" in shown.stdout and checks_key(newer) in shown.stdout

    code, status = _status(shop)
    assert code == 3
    (target,) = status["targets"]
    assert target["newest_good_backup"]["backup_id"] == good and target["rolled_back"]
    (alert,) = [a for a in status["open_alerts"] if a["event"] == "record_rolled_back"]
    assert "check record rolled back" in alert["what"] and checks_key(newer) in alert["what"]

    pruned = run_cli(shop["policy_file"], "prune", "--json")
    assert pruned.returncode == 0, pruned.stderr
    assert json.loads(pruned.stdout)["deleted"] == []
    _, backups = _listing(shop)
    assert set(backups) == {good, newer}  # the good backup is still there to restore


def test_reverifying_a_rolled_back_backup_resolves_the_rollback(shop: dict[str, Any]) -> None:
    good, newer, passed_record, _ = _failed_after_a_good_verification(shop)
    _path(shop, checks_key(newer)).write_bytes(passed_record)
    assert _listing(shop)[1][newer]["status"] == "rolled_back"

    assert run_cli(shop["policy_file"], "verify", newer).returncode == 3  # a fresh record: still corrupt
    code, backups = _listing(shop)
    assert code == 0 and backups[newer]["status"] == "failed" and backups[newer]["status_note"] is None
    _, status = _status(shop)
    assert not [a for a in status["open_alerts"] if a["event"] == "record_rolled_back"]
    assert [a for a in status["open_alerts"] if a["event"] == "verification_failed"]
    assert not status["targets"][0]["rolled_back"]
    assert status["targets"][0]["newest_good_backup"]["backup_id"] == good


def test_a_legitimate_newer_check_is_not_flagged_and_records_chain(shop: dict[str, Any]) -> None:
    first = _backup(shop)
    second = _backup(shop)
    for _ in range(2):
        assert run_cli(shop["policy_file"], "verify", first).returncode == 0
    code, backups = _listing(shop)
    assert code == 0 and {b["status"] for b in backups.values()} == {"good"}
    code, status = _status(shop)
    assert code == 0 and not status["open_alerts"] and not status["targets"][0]["rolled_back"]

    record = json.loads(_path(shop, checks_key(first)).read_text())
    assert record["version"] == 3 and record["sequence"] == 4  # second's check was 2, first's earlier ones 1, 3
    assert record["previous"] == {"key": checks_key(first), "sequence": 3}
    assert json.loads(_path(shop, checks_key(second)).read_text())["sequence"] == 2

    pruned = run_cli(shop["policy_file"], "prune", "--json")
    assert json.loads(pruned.stdout)["deleted"] == [first]  # retention as usual: only the newest good stays


def test_a_check_record_put_back_with_the_sealed_state_is_still_caught_by_the_audit_trail(shop: dict[str, Any]) -> None:
    good, newer, passed_record, passed_state = _failed_after_a_good_verification(shop)
    _path(shop, checks_key(newer)).write_bytes(passed_record)  # both genuine, both from before the failure
    _path(shop, record_state_key("pos")).write_bytes(passed_state)

    code, backups = _listing(shop)
    assert code == 3 and backups[newer]["status"] == "rolled_back"
    assert "the audit trail knows record 3" in backups[newer]["status_note"]
    assert "later failed verification" in backups[newer]["status_note"]
    assert json.loads(run_cli(shop["policy_file"], "prune", "--json").stdout)["deleted"] == []
    assert set(_listing(shop)[1]) == {good, newer}


def test_a_deleted_check_record_is_rolled_back_not_unchecked(shop: dict[str, Any]) -> None:
    """Deleting a good backup's record would make it "unchecked", and prune deletes unchecked backups after a day."""
    backup_id = _backup(shop)
    _path(shop, checks_key(backup_id)).unlink()
    code, backups = _listing(shop)
    assert code == 3 and backups[backup_id]["status"] == "rolled_back"
    assert f"{checks_key(backup_id)} is gone" in backups[backup_id]["status_note"]


def test_without_an_audit_trail_the_sealed_state_alone_catches_a_record_put_back_and_status_says_the_limit(
        shop_without_trail: dict[str, Any]) -> None:
    shop = shop_without_trail
    _, newer, passed_record, passed_state = _failed_after_a_good_verification(shop)
    _path(shop, checks_key(newer)).write_bytes(passed_record)
    code, backups = _listing(shop)
    assert code == 3 and "the sealed record state knows record 3" in backups[newer]["status_note"]

    # the limit, as documented: the state put back with the record (both genuine) shows nothing
    _path(shop, record_state_key("pos")).write_bytes(passed_state)
    code, backups = _listing(shop)
    assert code == 0 and backups[newer]["status"] == "good"
    status = run_cli(shop["policy_file"], "status")
    assert "record rollback protection: no audit trail" in status.stdout


def test_a_forged_record_state_is_refused_and_alerted(shop: dict[str, Any]) -> None:
    _backup(shop)
    path = _path(shop, record_state_key("pos"))
    state = json.loads(path.read_text())
    state["checks"] = {}  # forget every record, says the forger
    path.write_text(json.dumps(state))
    _, status = _status(shop)
    (alert,) = [a for a in status["open_alerts"] if a["event"] == "document_refused"]
    assert record_state_key("pos") in alert["what"]


def _restore_test(shop: dict[str, Any], backup_id: str) -> str:
    """A restore test of the backup; the key of its record."""
    before = set(_path(shop, restore_test_prefix("pos")).glob("*.json")) if _path(
        shop, restore_test_prefix("pos")).exists() else set()
    run_cli(shop["policy_file"], "restore-test", backup_id, "--target", "pos")
    (new,) = set(_path(shop, restore_test_prefix("pos")).glob("*.json")) - before
    return restore_test_prefix("pos") + new.name


def test_deleting_failed_restore_test_records_is_a_rollback_until_a_new_restore_test(shop: dict[str, Any]) -> None:
    good = _backup(shop)
    damaged = _backup(shop)
    passed = _restore_test(shop, good)
    _corrupt(shop, damaged)  # its checks passed before: only the restore test finds it
    failed = _restore_test(shop, damaged)
    _, status = _status(shop)
    assert [a["event"] for a in status["open_alerts"]] == ["restore_test_failed"]

    _path(shop, failed).unlink()  # the attack: the older, passing record is the newest again
    code, status = _status(shop)
    assert code == 3 and status["targets"][0]["last_restore_test"]["passed"] is False
    (alert,) = status["open_alerts"]
    assert alert["event"] == "record_rolled_back" and "restore-test record rolled back" in alert["what"]
    assert failed in alert["what"]
    _path(shop, passed).unlink()  # every record gone: still the same rollback, named
    code, status = _status(shop)
    assert code == 3 and failed in status["open_alerts"][0]["what"]

    # prune keeps every backup (without the hold, only the newest "good" one, the damaged one, would stay)
    assert json.loads(run_cli(shop["policy_file"], "prune", "--json").stdout)["deleted"] == []
    assert set(_listing(shop)[1]) == {good, damaged}

    _restore_test(shop, good)  # a fresh record, newer than anything known: resolved
    code, status = _status(shop)
    assert code == 0 and status["open_alerts"] == [] and status["targets"][0]["rolled_back"] == []


def test_records_written_at_once_take_distinct_sequences_and_raise_no_false_alarm(shop: dict[str, Any]) -> None:
    import subprocess

    from .conftest import CLI

    first, second = _backup(shop), _backup(shop)
    runs = [subprocess.Popen([*CLI, "verify", backup_id, "--policy", str(shop["policy_file"])],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for backup_id in (first, second, first, second)]
    assert all(run.wait(timeout=300) == 0 for run in runs), [run.stderr.read() for run in runs if run.stderr]
    code, backups = _listing(shop)
    assert code == 0 and {b["status"] for b in backups.values()} == {"good"}
    state = json.loads(_path(shop, record_state_key("pos")).read_text())
    assert state["sequence"] == 6  # two checks before, four now: none took another's number
    assert {state["checks"][b]["sequence"] for b in (first, second)} <= {3, 4, 5, 6}
    for backup_id in (first, second):
        assert json.loads(_path(shop, checks_key(backup_id)).read_text())["sequence"] == state["checks"][backup_id][
            "sequence"]
