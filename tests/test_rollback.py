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

from regal_dagster.engine.layout import checks_key
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
    done = run_cli(shop["policy_file"], "backup", "pos", "--json")
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


def _failed_after_a_good_verification(shop: dict[str, Any]) -> tuple[str, str, bytes]:
    """An older good backup, and a newer one that passed its verification and failed a later one: (older good,
    newer, the newer's first check record, genuinely sealed)."""
    good = _backup(shop)
    newer = _backup(shop)
    passed_record = _path(shop, checks_key(newer)).read_bytes()
    _corrupt(shop, newer)
    failed = run_cli(shop["policy_file"], "verify", newer)
    assert failed.returncode == 3, failed.stdout + failed.stderr
    return good, newer, passed_record


def test_a_check_record_rolled_back_after_a_failure_is_named_everywhere_and_prune_keeps_every_backup(
        shop: dict[str, Any]) -> None:
    good, newer, passed_record = _failed_after_a_good_verification(shop)
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
    good, newer, passed_record = _failed_after_a_good_verification(shop)
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
