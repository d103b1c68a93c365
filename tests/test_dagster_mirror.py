"""Dagster mirrors what happens to backups outside it, failures as well as successes: one tick of the
`backups_outside_dagster` sensor after a CLI backup shows its materialization and passed checks; after a CLI
verify that found damage, a failed check evaluation for that backup, and the asset's newest good backup follows."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from regal_dagster.defs import build_definitions
from regal_dagster.engine.policy import load_policy

from .conftest import DatabaseFactory, load_awkward_data, run_cli, write_policy_file

KEY = dg.AssetKey(["postgres", "pos", "backup"])
SENSOR = "backups_outside_dagster"


@pytest.fixture
def policy_file(system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> Path:
    source = system_pg.create()
    load_awkward_data(source)
    return write_policy_file(tmp_path, {"pos": source})


def _tick(defs: dg.Definitions, instance: dg.DagsterInstance, cursor: str | None) -> str | None:
    """One evaluation of the sensor, its runless events reported to the instance as the daemon does."""
    context = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs, resources=defs.resources)
    result = defs.resolve_sensor_def(SENSOR)(context)
    assert isinstance(result, dg.SensorResult)
    for event in result.asset_events or []:
        instance.report_runless_asset_event(event)
    return result.cursor


def _latest(instance: dg.DagsterInstance, check: str) -> dg.AssetCheckEvaluation:
    key = dg.AssetCheckKey(KEY, check)
    record = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
    assert record.evaluation is not None
    return record.evaluation


def _newest_good(instance: dg.DagsterInstance) -> str:
    records = instance.fetch_observations(KEY, limit=10).records
    observed = [r.asset_observation for r in records if r.asset_observation is not None
                and "newest_good_backup" in r.asset_observation.metadata]
    return str(observed[0].metadata["newest_good_backup"].value)


def _corrupt(policy_file: Path, backup_id: str) -> None:
    folder = Path(load_policy(policy_file).local_repository_path()) / "backups" / "pos" / backup_id
    biggest = max((p for p in folder.rglob("*") if p.is_file() and p.suffix not in (".json",)),
                  key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0x01
    biggest.write_bytes(bytes(data))


def _cli_backup(policy_file: Path, *options: str) -> tuple[int, str]:
    done = run_cli(policy_file, "backup", "pos", "--json", *options)
    return done.returncode, str(json.loads(done.stdout)["backup_id"])


def test_a_cli_backup_and_then_a_cli_verify_failure_are_mirrored_within_one_tick(policy_file: Path) -> None:
    defs = build_definitions(str(policy_file))
    instance = dg.DagsterInstance.ephemeral()
    cursor = _tick(defs, instance, None)
    assert _newest_good(instance) == "none"

    status, first = _cli_backup(policy_file)  # the CLI's backup runs its checks
    assert status == 0
    cursor = _tick(defs, instance, cursor)
    latest = instance.get_latest_materialization_event(KEY)
    assert latest is not None and latest.asset_materialization is not None
    assert latest.asset_materialization.metadata["backup_id"].value == first
    for check in ("manifest", "integrity", "encryption", "size", "key_cryptoperiod"):
        evaluation = _latest(instance, check)
        assert evaluation.passed and evaluation.metadata["backup_id"].value == first, check
    assert _newest_good(instance) == first

    _corrupt(policy_file, first)
    verify = run_cli(policy_file, "verify", first)
    assert verify.returncode == 3, verify.stdout + verify.stderr
    cursor = _tick(defs, instance, cursor)
    integrity = _latest(instance, "integrity")
    assert not integrity.passed and integrity.metadata["backup_id"].value == first
    assert integrity.severity == dg.AssetCheckSeverity.ERROR
    assert "checked_outside_dagster" in integrity.metadata
    assert _latest(instance, "manifest").passed  # each check as the CLI found it
    assert _newest_good(instance) == "none"  # the only backup is no longer good

    before = len(instance.event_log_storage.get_asset_check_execution_history(dg.AssetCheckKey(KEY, "integrity"),
                                                                             limit=50))
    _tick(defs, instance, cursor)  # reported once
    assert len(instance.event_log_storage.get_asset_check_execution_history(dg.AssetCheckKey(KEY, "integrity"),
                                                                           limit=50)) == before


def test_a_cli_backup_whose_checks_fail_shows_failed_checks_and_no_fresh_materialization(policy_file: Path) -> None:
    defs = build_definitions(str(policy_file))
    instance = dg.DagsterInstance.ephemeral()
    status, good = _cli_backup(policy_file)
    assert status == 0
    cursor = _tick(defs, instance, None)
    status, unchecked = _cli_backup(policy_file, "--no-verify")
    assert status == 0
    _corrupt(policy_file, unchecked)
    assert run_cli(policy_file, "verify", unchecked).returncode == 3

    _tick(defs, instance, cursor)
    integrity = _latest(instance, "integrity")
    assert not integrity.passed and integrity.metadata["backup_id"].value == unchecked
    latest = instance.get_latest_materialization_event(KEY)
    assert latest is not None and latest.asset_materialization is not None
    assert latest.asset_materialization.metadata["backup_id"].value == good  # a failed backup freshens nothing
    assert _newest_good(instance) == good


def test_a_pass_on_an_older_backup_does_not_hide_the_newest_backups_failure(policy_file: Path) -> None:
    defs = build_definitions(str(policy_file))
    instance = dg.DagsterInstance.ephemeral()
    _, older = _cli_backup(policy_file)
    _, newest = _cli_backup(policy_file)
    cursor = _tick(defs, instance, None)
    _corrupt(policy_file, newest)
    assert run_cli(policy_file, "verify", newest).returncode == 3
    assert run_cli(policy_file, "verify", older).returncode == 0
    _tick(defs, instance, cursor)
    integrity = _latest(instance, "integrity")
    assert not integrity.passed and integrity.metadata["backup_id"].value == newest
    assert _newest_good(instance) == older
