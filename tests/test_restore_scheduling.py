"""What launches restore tests, and the DR drill: the Dagster asset and sensor, the monthly random sample,
and a drill over two targets. Real PostgreSQL sources, real scratch PostgreSQL 18 servers."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest

from regal_dagster.defs import RESTORE_TEST_JOB, build_definitions
from regal_dagster.engine.checks import good_backups
from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.documents import read_document
from regal_dagster.engine.layout import RESTORE_SAMPLES
from regal_dagster.engine.policy import load_policy
from regal_dagster.engine.sampling import SAMPLE_KIND, choose, draw_restore_sample
from regal_dagster.engine.storage import open_repository

from .conftest import DatabaseFactory, backup_then_checks, invoke_cli, load_awkward_data, write_policy_file
from .pg_compare import execute

RESTORE_KEY = dg.AssetKey(["postgres", "pos", "restore_test"])


@pytest.fixture
def policy_file(system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> Path:
    source = system_pg.create()
    load_awkward_data(source)
    return write_policy_file(tmp_path, {"pos": source}, restore_tests={"classes": ["daily"]})


def _backup(defs: dg.Definitions, instance: dg.DagsterInstance, retention_class: str) -> str:
    result, checks = backup_then_checks(defs, instance, tags={"regal/retention_class": retention_class})
    assert result.success and checks is not None and checks.success
    return str(result.asset_materializations_for_node("postgres__pos__backup")[0].metadata["backup_id"].value)


def test_the_sensor_restore_tests_each_new_good_backup_of_its_classes_once(policy_file: Path) -> None:
    defs = build_definitions(str(policy_file))
    instance = dg.DagsterInstance.ephemeral()
    _backup(defs, instance, "hourly")  # not a class the policy restore-tests
    daily = _backup(defs, instance, "daily")
    sensor = defs.resolve_sensor_def("restore_test_new_backups")

    context = dg.build_sensor_context(instance=instance, definitions=defs, resources=defs.resources)
    requests = sensor(context)
    assert [r.run_key for r in requests] == [daily]  # type: ignore[union-attr]
    assert requests[0].asset_selection == [RESTORE_KEY]  # type: ignore[index]
    again = sensor(dg.build_sensor_context(instance=instance, cursor=context.cursor, definitions=defs,
                                           resources=defs.resources))
    assert isinstance(again, dg.SkipReason)  # once per backup

    # The run the sensor asks for: the restore-test asset with its two checks.
    result = defs.resolve_job_def(RESTORE_TEST_JOB).execute_in_process(
        instance=instance, run_config=requests[0].run_config, asset_selection=[RESTORE_KEY])  # type: ignore[index]
    assert result.success
    metadata = result.asset_materializations_for_node("postgres__pos__restore_test")[0].metadata
    assert metadata["backup_id"].value == daily
    assert set(metadata["phase_seconds"].value) >= {"cluster", "load", "post_data", "validate", "amcheck", "total"}
    assert metadata["rto_seconds"].value < metadata["rto_target_seconds"].value
    assert {(e.check_name, e.passed) for e in result.get_asset_check_evaluations()} == {
        ("validation_passed", True), ("rto_within_target", True)}


def test_the_monthly_sample_is_random_recorded_and_reproducible_from_its_seed(policy_file: Path) -> None:
    defs = build_definitions(str(policy_file))
    instance = dg.DagsterInstance.ephemeral()
    for _ in range(5):
        _backup(defs, instance, "hourly")
    policy = load_policy(policy_file)
    repo = open_repository(policy)

    schedule = defs.resolve_schedule_def("monthly_restore_sample")
    tick = dg.build_schedule_context(instance=instance, scheduled_execution_time=datetime(
        2026, 12, 1, 4, 0, tzinfo=UTC), resources=defs.resources)
    requests = schedule.evaluate_tick(tick).run_requests or []

    (stored,) = list(repo.list(RESTORE_SAMPLES))
    record = read_document(repo, load_keyring(policy), SAMPLE_KIND, stored.key)
    assert stored.key.endswith("2026-12.json") and len(record["candidates"]) == 5 and len(record["chosen"]) == 2
    assert [list(c) for c in choose([tuple(c) for c in record["candidates"]], record["seed"], 2)] == record["chosen"]
    assert sorted(r.tags["regal/backup_id"] for r in requests) == sorted(c[1] for c in record["chosen"])
    assert {r.tags["regal/sample_seed"] for r in requests} == {record["seed"]}
    # the same month draws once: evaluating again returns the recorded draw
    when = datetime(2026, 12, 1, 4, 0, tzinfo=UTC)
    assert draw_restore_sample(policy, repo, load_keyring(policy), when).seed == record["seed"]
    # and different seeds draw differently across many tries (it is random, not a fixed pick)
    candidates = [("pos", m.backup_id) for m in good_backups(repo, load_keyring(load_policy(policy_file)), "pos")]
    assert len({tuple(choose(candidates, str(seed), 2)) for seed in range(40)}) > 3


def test_a_dr_drill_on_two_targets_measures_rto_and_rpo(system_pg: DatabaseFactory, tmp_path: Path,
                                                        master_key: str) -> None:
    first, second = system_pg.create(), system_pg.create()
    load_awkward_data(first)
    execute(second, "CREATE TABLE ledger (id int PRIMARY KEY, amount numeric); "
                    "INSERT INTO ledger SELECT g, g * 1.5 FROM generate_series(1, 5000) g")
    policy_file = write_policy_file(tmp_path, {"pos": first, "ledger": second})
    for target in ("pos", "ledger"):
        assert invoke_cli(["backup", target, "--policy", str(policy_file)]).returncode == 0
    # the newest backup of one target is damaged: the drill falls back to the one before
    done = invoke_cli(["backup", "pos", "--json", "--policy", str(policy_file)])
    damaged_id = json.loads(done.stdout)["backup_id"]
    victim = max((tmp_path / "repository" / "backups" / "pos" / damaged_id / "tables").glob("*.copy"),
                 key=lambda p: p.stat().st_size)  # a table's object, or a pack of small tables
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))

    drill = invoke_cli(["drill", "--json", "--policy", str(policy_file)])

    assert drill.returncode == 0, drill.stderr
    record = json.loads(drill.stdout)
    by_target = {t["target"]: t for t in record["targets"]}
    assert set(by_target) == {"pos", "ledger"} and all(t["recovered"] for t in record["targets"])
    assert [t["backup_id"] for t in by_target["pos"]["tried"]] == [damaged_id]
    assert by_target["pos"]["restored"]["backup_id"] != damaged_id
    assert 0 < by_target["ledger"]["rpo_seconds"] < by_target["pos"]["rpo_seconds"] <= 3600
    assert 0 < record["rto_seconds"] < record["rto_target_seconds"] == 4 * 3600
    assert record["rpo_seconds"] == by_target["pos"]["rpo_seconds"] and record["passed"]
    stored = open_repository(load_policy(policy_file))
    assert [o.key for o in stored.list("drills/")] == [f"drills/{record['drill_id']}.json"]


def test_the_quarterly_drill_job_runs_the_drill_in_a_fresh_process(policy_file: Path) -> None:
    defs = build_definitions(str(policy_file))
    instance = dg.DagsterInstance.ephemeral()
    _backup(defs, instance, "daily")
    assert defs.resolve_schedule_def("quarterly_dr_drill").cron_schedule == "0 5 1 1,4,7,10 *"

    result = defs.resolve_job_def("dr_drill_job").execute_in_process(instance=instance)

    assert result.success
    drills = list(open_repository(load_policy(policy_file)).list("drills/"))
    assert len(drills) == 1
