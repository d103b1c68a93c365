"""The Dagster code location: it loads, its assets take real backups, its schedules pick the right class."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from regal_dagster.defs import BACKUP_JOB, build_definitions
from regal_dagster.defs.backups.assets import RETENTION_CLASS_TAG
from regal_dagster.engine import catalog
from regal_dagster.engine.checks import load_check_record
from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.policy import load_policy
from regal_dagster.engine.storage import open_repository

from .conftest import DatabaseFactory, load_awkward_data, write_policy_file

ROOT = Path(__file__).resolve().parents[1]
KEY = dg.AssetKey(["postgres", "pos", "backup"])


@pytest.fixture
def policy_file(system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> Path:
    source = system_pg.create()
    load_awkward_data(source)
    return write_policy_file(tmp_path, {"pos": source})


def test_workspace_validates_with_the_dagster_cli(policy_file: Path) -> None:
    env = {**os.environ, "REGAL_POLICY": str(policy_file), "DAGSTER_HOME": str(policy_file.parent)}
    dagster = shutil.which("dagster", path=str(Path(sys.executable).parent))
    result = subprocess.run([dagster, "definitions", "validate", "-w", "workspace.yaml"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "passed validation" in result.stderr + result.stdout


def test_each_backup_asset_carries_the_rpo_as_freshness_policy(policy_file: Path) -> None:
    defs = build_definitions(str(policy_file))
    dg.Definitions.validate_loadable(defs)
    spec = defs.resolve_assets_def(KEY).get_asset_spec(KEY)
    assert spec.freshness_policy.fail_window.to_timedelta() == timedelta(hours=1)
    assert spec.group_name == "backups"
    assert spec.kinds == {"postgres", "filesystem"}


def test_materializing_the_asset_takes_a_backup_with_operator_metadata(policy_file: Path) -> None:
    defs = build_definitions(str(policy_file))
    instance = dg.DagsterInstance.ephemeral()
    result = defs.resolve_job_def(BACKUP_JOB).execute_in_process(
        instance=instance, tags={RETENTION_CLASS_TAG: "weekly"})
    assert result.success

    (event,) = result.get_asset_materialization_events()
    metadata = event.materialization.metadata
    policy = load_policy(policy_file)
    backups, _ = catalog.list_backups(open_repository(policy), load_keyring(policy), "pos")
    (manifest,) = backups
    assert metadata["backup_id"].value == manifest.backup_id
    assert metadata["retention_class"].value == "weekly" == manifest.retention_class
    assert manifest.trigger["dagster_run_id"] == result.run_id
    assert metadata["bytes_stored"].value == manifest.stored_bytes > 0
    assert metadata["dagster/row_count"].value == 2004
    assert {r.data["table"]: r.data["rows"] for r in metadata["row_counts"].value.records} == \
        {'Sales Ops.Order "Lines"': 4, "public.customers": 2000}
    assert "REGAL_TEST_MASTER_KEY" not in str(metadata) and os.environ["REGAL_TEST_MASTER_KEY"] not in str(metadata)


def test_a_failed_backup_fails_the_run_with_the_reason(policy_file: Path, system_pg: DatabaseFactory) -> None:
    text = policy_file.read_text()
    assert "port=5432" in text
    policy_file.write_text(text.replace("port=5432", "port=1"))
    result = build_definitions(str(policy_file)).resolve_job_def(BACKUP_JOB).execute_in_process(
        instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "cannot connect to PostgreSQL at 127.0.0.1:1" in failure.step_failure_data.error.to_string()


@pytest.mark.parametrize("schedule, tick, runs", [
    ("hourly_backups", datetime(2026, 11, 24, 3, tzinfo=UTC), True),
    ("hourly_backups", datetime(2026, 11, 24, 2, tzinfo=UTC), False),
    ("daily_backups", datetime(2026, 11, 24, 2, tzinfo=UTC), True),
    ("weekly_backups", datetime(2026, 11, 1, 1, tzinfo=UTC), False),
    ("monthly_backups", datetime(2026, 11, 1, 1, tzinfo=UTC), True),
    ("monthly_backups", datetime(2026, 11, 8, 1, tzinfo=UTC), False),
])
def test_schedules_run_one_backup_per_tick_with_its_class(policy_file: Path, schedule: str, tick: datetime,
                                                          runs: bool) -> None:
    definition = build_definitions(str(policy_file)).resolve_schedule_def(schedule)
    assert definition.default_status == dg.DefaultScheduleStatus.RUNNING
    data = definition.evaluate_tick(dg.build_schedule_context(scheduled_execution_time=tick))
    if runs:
        (request,) = data.run_requests
        assert request.tags[RETENTION_CLASS_TAG] == schedule.removesuffix("_backups")
    else:
        assert not data.run_requests and data.skip_message


def test_instance_storage_on_postgres_with_the_documented_dagster_yaml(
        policy_file: Path, system_pg: DatabaseFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dagster_db = system_pg.new_name("regal_dagster")
    with psycopg.connect(system_pg.server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{dagster_db}"')
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "docs" / "dagster-postgres.yaml", home / "dagster.yaml")
    for name, value in {"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": "5432", "DAGSTER_PG_USER": "postgres",
                        "DAGSTER_PG_PASSWORD": "", "DAGSTER_PG_DB": dagster_db}.items():
        monkeypatch.setenv(name, value)

    with dg.DagsterInstance.from_config(str(home)) as instance:
        result = build_definitions(str(policy_file)).resolve_job_def(BACKUP_JOB).execute_in_process(instance=instance)
        assert result.success
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert instance.get_latest_materialization_event(KEY) is not None

    with psycopg.connect(system_pg.dsn(dagster_db)) as conn:
        stored = conn.execute("SELECT count(*) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'"
                              ).fetchone()
    assert stored == (1,)


def test_checks_sensors_and_verify_job_are_defined_as_an_operator_expects(policy_file: Path) -> None:
    defs = build_definitions(str(policy_file))
    specs = {s.name: s for c in defs.asset_checks or [] for s in c.check_specs}  # type: ignore[union-attr]
    assert {name: s.blocking for name, s in specs.items()} == {
        "manifest": True, "integrity": True, "encryption": True, "size": False, "key_cryptoperiod": False}
    assert all(s.asset_key == KEY for s in specs.values())
    for name in ("rpo_watch", "backup_alerts"):
        assert defs.resolve_sensor_def(name).default_status == dg.DefaultSensorStatus.RUNNING
    verification = defs.resolve_schedule_def("daily_verification")
    assert verification.job_name == "verify_job" and verification.default_status == dg.DefaultScheduleStatus.RUNNING


def test_the_backup_run_checks_the_backup_it_took(policy_file: Path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    result = build_definitions(str(policy_file)).resolve_job_def(BACKUP_JOB).execute_in_process(instance=instance)
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert set(evaluations) == {"manifest", "integrity", "encryption", "size", "key_cryptoperiod"}
    assert all(e.passed for e in evaluations.values())
    backup_id = result.asset_materializations_for_node("postgres__pos__backup")[0].metadata["backup_id"].value
    assert evaluations["integrity"].metadata["backup_id"].value == backup_id
    policy = load_policy(policy_file)
    keyring = load_keyring(policy)
    repo = open_repository(policy)
    record = load_check_record(repo, keyring, catalog.load_manifest(repo, keyring, str(backup_id)))
    assert record is not None and record.passed and record.trigger == {"dagster_run_id": result.run_id}
