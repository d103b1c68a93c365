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

from regal_dagster.defs import BACKUP_JOB, VERIFY_JOB, build_definitions
from regal_dagster.defs.backups.assets import RETENTION_CLASS_TAG
from regal_dagster.engine import catalog
from regal_dagster.engine.check_record import load_check_record
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
    assert spec.group_name == "backups_default_postgres"  # backups_<zone>_<kind>
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


def test_the_checks_follow_every_successful_backup_run_on_the_backup_it_took(policy_file: Path) -> None:
    defs = build_definitions(str(policy_file))
    instance = dg.DagsterInstance.ephemeral()
    backup = defs.resolve_job_def(BACKUP_JOB).execute_in_process(instance=instance)
    assert backup.success and not backup.get_asset_check_evaluations()  # the backup run plans no checks

    success = next(e for e in instance.all_logs(backup.run_id) if e.dagster_event
                   and e.dagster_event.event_type == dg.DagsterEventType.RUN_SUCCESS)
    context = dg.build_run_status_sensor_context(sensor_name="check_new_backups", dagster_instance=instance,
                                                 dagster_run=instance.get_run_by_id(backup.run_id),
                                                 dagster_event=success.dagster_event)
    request = defs.resolve_sensor_def("check_new_backups")(context)
    assert defs.resolve_sensor_def("check_new_backups").job_name == VERIFY_JOB  # the run it asks for
    assert {k.name for k in request.asset_check_keys} == {"manifest", "integrity", "encryption", "size",
                                                         "key_cryptoperiod"}
    assert {k.asset_key for k in request.asset_check_keys} == {KEY}

    result = defs.resolve_job_def(VERIFY_JOB).execute_in_process(instance=instance)
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert set(evaluations) == {"manifest", "integrity", "encryption", "size", "key_cryptoperiod"}
    assert all(e.passed for e in evaluations.values())
    backup_id = backup.asset_materializations_for_node("postgres__pos__backup")[0].metadata["backup_id"].value
    assert evaluations["integrity"].metadata["backup_id"].value == backup_id
    policy = load_policy(policy_file)
    keyring = load_keyring(policy)
    repo = open_repository(policy)
    record = load_check_record(repo, keyring, catalog.load_manifest(repo, keyring, str(backup_id)))
    assert record is not None and record.passed and record.trigger == {"dagster_run_id": result.run_id}


def test_a_backup_that_never_happened_has_no_failed_checks(policy_file: Path) -> None:
    """A backup run that could not connect plans no checks (Dagster would show them failed); the daily
    verification before any backup skips them."""
    policy_file.write_text(policy_file.read_text().replace("port=5432", "port=1"))
    defs = build_definitions(str(policy_file))
    instance = dg.DagsterInstance.ephemeral()
    failed = defs.resolve_job_def(BACKUP_JOB).execute_in_process(instance=instance, raise_on_error=False)
    assert not failed.success
    verify = defs.resolve_job_def(VERIFY_JOB).execute_in_process(instance=instance)
    assert verify.success and verify.get_asset_check_evaluations() == []

    for name in ("manifest", "integrity", "encryption", "size", "key_cryptoperiod"):
        history = instance.event_log_storage.get_asset_check_execution_history(dg.AssetCheckKey(KEY, name), limit=10)
        assert [h.run_id for h in history] == [verify.run_id]  # none in the failed backup run
        assert history[0].status.value == "PLANNED"  # never evaluated in a run that succeeded: shown "Skipped"
        assert instance.get_run_by_id(verify.run_id).status == dg.DagsterRunStatus.SUCCESS


def _tick(defs: dg.Definitions, instance: dg.DagsterInstance, name: str, cursor: str | None) -> str | None:
    """Evaluate a sensor and report its runless asset events to the instance, as the daemon does."""
    context = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs, resources=defs.resources)
    result = defs.resolve_sensor_def(name)(context)
    for event in getattr(result, "asset_events", []) or []:
        instance.report_runless_asset_event(event)
    return getattr(result, "cursor", None) or context.cursor


def test_a_cli_backup_shows_as_the_assets_latest_materialization(policy_file: Path) -> None:
    from .conftest import verified_backup

    defs = build_definitions(str(policy_file))
    instance = dg.DagsterInstance.ephemeral()
    assert defs.resolve_job_def(BACKUP_JOB).execute_in_process(instance=instance).success  # through Dagster
    cursor = _tick(defs, instance, "backups_outside_dagster", None)
    dagster_event = instance.get_latest_materialization_event(KEY)
    assert dagster_event is not None and dagster_event.run_id  # nothing new outside Dagster: nothing reported

    backup_id = verified_backup(policy_file)  # the CLI, as an operator on another host would
    cursor = _tick(defs, instance, "backups_outside_dagster", cursor)
    latest = instance.get_latest_materialization_event(KEY)
    assert latest is not None and latest.asset_materialization is not None
    assert latest.asset_materialization.metadata["backup_id"].value == backup_id
    assert "cli backup" in str(latest.asset_materialization.metadata["taken_outside_dagster"].value)
    integrity = instance.event_log_storage.get_asset_check_execution_history(dg.AssetCheckKey(KEY, "integrity"),
                                                                            limit=1)[0]
    assert integrity.evaluation is not None and integrity.evaluation.passed  # the CLI's verification, shown

    _tick(defs, instance, "backups_outside_dagster", cursor)  # reported once
    assert len(instance.fetch_materializations(KEY, limit=10).records) == 2


def test_every_schedule_and_sensor_says_what_it_does(policy_file: Path) -> None:
    defs = build_definitions(str(policy_file))
    for definition in [*defs.schedules, *defs.sensors]:  # type: ignore[misc]
        assert definition.description and len(definition.description) > 30, definition.name
    monthly = defs.resolve_schedule_def("monthly_backups").description or ""
    assert "the first Sunday of each month at 01:00 UTC" in monthly
    assert "every Sunday at 01:00 UTC" in (defs.resolve_schedule_def("weekly_backups").description or "")
    spec = defs.resolve_assets_def(KEY).get_asset_spec(KEY)
    assert "freshness warns 40 min after the last backup and fails 1 h after it" in (spec.description or "")
    assert spec.metadata["regal/freshness_warn_after"] == "40 min"  # 45 min would read "an hour" in the UI
