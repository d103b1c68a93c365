"""The daily verification covers every unchecked backup of each target, not only the newest: through the CLI
(`verify --unchecked`, `verify --latest` keeps its meaning) and through Dagster (the daily_verification run)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest

from regal_dagster.defs import BACKUP_JOB, VERIFY_JOB, build_definitions
from regal_dagster.engine import catalog
from regal_dagster.engine.checks import check_status
from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.policy import load_policy
from regal_dagster.engine.storage import open_repository

from .conftest import DatabaseFactory, load_awkward_data, run_cli, write_policy_file


@pytest.fixture
def policy_file(system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> Path:
    source = system_pg.create()
    load_awkward_data(source)
    return write_policy_file(tmp_path, {"pos": source})


def _unchecked_backup(policy_file: Path) -> str:
    done = run_cli(policy_file, "backup", "pos", "--no-verify", "--json")
    assert done.returncode == 0, done.stderr
    return str(json.loads(done.stdout)["backup_id"])


def _statuses(policy_file: Path) -> dict[str, str]:
    policy = load_policy(policy_file)
    repo, keyring = open_repository(policy), load_keyring(policy)
    backups, _ = catalog.list_backups(repo, keyring, "pos")
    return {m.backup_id: check_status(repo, keyring, m).status for m in backups}


def test_verify_unchecked_checks_every_unchecked_backup_and_latest_only_the_newest(policy_file: Path) -> None:
    first, second, third = (_unchecked_backup(policy_file) for _ in range(3))
    latest = run_cli(policy_file, "verify", "--latest", "--json")
    assert latest.returncode == 0, latest.stderr
    assert [r["backup_id"] for r in json.loads(latest.stdout)["verified"]] == [third]
    assert _statuses(policy_file) == {first: "unchecked", second: "unchecked", third: "good"}

    unchecked = run_cli(policy_file, "verify", "--unchecked", "--target", "pos", "--json")
    assert unchecked.returncode == 0, unchecked.stderr
    assert [r["backup_id"] for r in json.loads(unchecked.stdout)["verified"]] == [first, second]  # oldest first
    assert set(_statuses(policy_file).values()) == {"good"}

    again = run_cli(policy_file, "verify", "--unchecked")
    assert again.returncode == 0 and "pos: no unchecked backup" in again.stdout


def test_verify_without_a_choice_says_what_to_give(policy_file: Path) -> None:
    done = run_cli(policy_file, "verify", "--target", "pos")
    assert done.returncode == 2 and "--unchecked" in done.stderr


def test_the_daily_dagster_verification_checks_every_unchecked_backup(policy_file: Path) -> None:
    defs = build_definitions(str(policy_file))
    instance = dg.DagsterInstance.ephemeral()
    older = [_unchecked_backup(policy_file), _unchecked_backup(policy_file)]
    backup = defs.resolve_job_def(BACKUP_JOB).execute_in_process(instance=instance)
    newest = str(backup.asset_materializations_for_node("postgres__pos__backup")[0].metadata["backup_id"].value)

    after_backup = defs.resolve_job_def(VERIFY_JOB).execute_in_process(instance=instance)  # check_new_backups' run
    assert after_backup.success
    assert _statuses(policy_file) == {older[0]: "unchecked", older[1]: "unchecked", newest: "good"}

    schedule = defs.resolve_schedule_def("daily_verification")
    tick = schedule.evaluate_tick(dg.build_schedule_context(scheduled_execution_time=datetime(2026, 11, 24, 3, 30,
                                                                                            tzinfo=UTC)))
    (request,) = tick.run_requests or []
    daily = defs.resolve_job_def(VERIFY_JOB).execute_in_process(instance=instance, tags=request.tags)
    assert daily.success
    assert set(_statuses(policy_file).values()) == {"good"}
    evaluations = daily.get_asset_check_evaluations()
    assert evaluations and {e.metadata["backup_id"].value for e in evaluations} == {newest}  # the asset: its newest
