"""A fleet on Dagster's own machinery: one run per target per tick, tagged for the run queue (its server, its
zone, a priority by class, a max runtime), and a policy that refuses a fleet Dagster could not queue."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest
import yaml

from regal_dagster.defs import build_definitions
from regal_dagster.engine.errors import PolicyError
from regal_dagster.engine.policy import load_policy

from .conftest import write_policy_file

FIVE = {"pos_eu": "postgresql://backup@db-eu.example:5432/pos", "pos_us": "host=db-us.example port=5433 dbname=pos",
        "payments": "postgresql://backup@db-eu.example:5432/payments", "ledger": "dbname=ledger",
        "customers": "postgresql://backup@${CUSTOMERS_HOST}/customers"}


@pytest.fixture(autouse=True)
def _key(master_key: str) -> None:
    """Every test here writes a keyset."""


def _fleet_policy(tmp_path: Path, **changes: object) -> Path:
    path = write_policy_file(tmp_path, {"pos_eu": FIVE["pos_eu"]}, initialize=False)
    document = yaml.safe_load(path.read_text())
    document["targets"] = {name: {"kind": "postgres", "dsn": dsn} for name, dsn in FIVE.items()}
    document["targets"]["customers"] |= {"host": "db-crm", "zone": "crm"}  # its host is a variable: given
    document["targets"]["pos_eu"] |= {"zone": "eu", "tier": "store"}
    document["targets"]["ledger"]["schedules"] = {"daily": {"cron": "0 4 * * *"}}
    document["tiers"] = {"store": {"backup_every": "15m", "rpo": "15m", "rto": "1h",
                                   "schedules": {"hourly": {"cron": "*/15 * * * *"}}}}
    document["fleet"] = {"max_runtime": {"hourly": "20m"}}
    document.update(changes)
    path.write_text(yaml.safe_dump(document))
    return path


def test_a_schedule_tick_is_one_run_per_target_tagged_for_the_queue(tmp_path: Path) -> None:
    defs = build_definitions(str(_fleet_policy(tmp_path)))
    daily = defs.resolve_schedule_def("daily_backups")
    tick = datetime(2026, 11, 24, 2, tzinfo=UTC)  # a Tuesday, 02:00: daily (and hourly, which yields to it)
    requests = daily.evaluate_tick(dg.build_schedule_context(scheduled_execution_time=tick)).run_requests or []
    by_target = {r.tags["regal/target"]: r for r in requests}
    assert set(by_target) == set(FIVE) - {"ledger"}  # ledger's daily is its own, at 04:00
    for name, request in by_target.items():
        assert request.run_key == f"daily:{tick.isoformat()}:{name}"
        assert request.asset_selection == [dg.AssetKey(["postgres", name, "backup"])]
        assert request.asset_check_keys == []  # checks follow in their own run (check_new_backups)
        assert request.tags["regal/retention_class"] == "daily"
        assert request.tags["dagster/priority"] == "20" and request.tags["dagster/max_runtime"] == str(6 * 3600)
    assert {n: (r.tags["regal/host"], r.tags["regal/zone"]) for n, r in by_target.items()} == {
        "pos_eu": ("db-eu.example:5432", "eu"), "payments": ("db-eu.example:5432", "default"),
        "pos_us": ("db-us.example:5433", "default"), "customers": ("db-crm", "crm")}

    hourly = defs.resolve_schedule_def("hourly_backups")  # the policy's hourly: every target but the store tier
    at_three = datetime(2026, 11, 24, 3, tzinfo=UTC)
    five = hourly.evaluate_tick(dg.build_schedule_context(scheduled_execution_time=at_three)).run_requests or []
    assert sorted(r.tags["regal/target"] for r in five) == sorted(set(FIVE) - {"pos_eu"})
    assert {r.tags["dagster/priority"] for r in five} == {"10"} and {r.tags["dagster/max_runtime"] for r in five} == \
        {"1200"}
    store = defs.resolve_schedule_def("hourly_backups__tier_store")  # the tier's own cron, its own schedule
    assert store.cron_schedule == "*/15 * * * *"
    quarter = datetime(2026, 11, 24, 3, 15, tzinfo=UTC)
    (request,) = store.evaluate_tick(dg.build_schedule_context(scheduled_execution_time=quarter)).run_requests or []
    assert request.run_key == f"hourly:{quarter.isoformat()}:pos_eu" and request.tags["regal/zone"] == "eu"
    ledger = defs.resolve_schedule_def("daily_backups__target_ledger")
    assert ledger.cron_schedule == "0 4 * * *"
    (request,) = ledger.evaluate_tick(dg.build_schedule_context(
        scheduled_execution_time=datetime(2026, 11, 24, 4, tzinfo=UTC))).run_requests or []
    assert request.tags["regal/host"] == "local:5432"  # no host in the DSN: libpq's socket on this machine

    verify = defs.resolve_schedule_def("daily_verification").evaluate_tick(
        dg.build_schedule_context(scheduled_execution_time=datetime(2026, 11, 24, 3, 30, tzinfo=UTC)))
    assert sorted(r.tags["regal/target"] for r in verify.run_requests or []) == sorted(FIVE)
    assert all(r.tags["dagster/priority"] == "5" and r.asset_check_keys for r in verify.run_requests or [])
    assert defs.resolve_job_def("dr_drill_job") and defs.resolve_schedule_def("quarterly_dr_drill").tags[
        "dagster/priority"] == "-5"


@pytest.mark.parametrize("change, message", [
    ({}, "the server of target(s) customers cannot be derived"),
    ({"fleet": {"max_backups_per_host": 0}}, "fleet.max_backups_per_host: Input should be greater than or equal to 1"),
    ({"fleet": {"max_runtime": {"daily": "-1h"}}}, "fleet.max_runtime.daily"),
    ({"fleet": {"max_runtime": {"daily": "0s"}}}, "daily: give a max_runtime of at least 1s"),
])
def test_the_policy_refuses_a_fleet_dagster_could_not_queue(tmp_path: Path, change: dict, message: str) -> None:
    path = _fleet_policy(tmp_path)
    document = yaml.safe_load(path.read_text())
    if not change:
        del document["targets"]["customers"]["host"]
    else:
        document["fleet"] = change["fleet"]
    document["targets"]["pos_eu"].pop("tier")
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(PolicyError) as refused:
        load_policy(path)
    assert message in str(refused.value), str(refused.value)


def test_a_run_failed_by_run_monitoring_alerts_naming_its_target_and_each_target_alerts_on_its_own(
        tmp_path: Path) -> None:
    path = write_policy_file(tmp_path, {"till_a": "postgresql://b@db-1:5432/a", "till_b": "postgresql://b@db-1:5432/b"},
                             alerts={"channels": [{"kind": "file", "path": "alerts.jsonl"}]})
    defs = build_definitions(str(path))
    instance = dg.DagsterInstance.ephemeral()
    job = defs.resolve_job_def("backup_job")
    for target, reason in (("till_b", "step failed"), ("till_a", "Exceeded maximum runtime of 1200 seconds.")):
        run = instance.create_run_for_job(job, tags={"regal/target": target, "regal/host": "db-1:5432"},
                                          asset_selection=frozenset({dg.AssetKey(["postgres", target, "backup"])}))
        instance.report_run_failed(run, reason)  # what Dagster's run monitoring does past dagster/max_runtime
    context = dg.build_sensor_context(instance=instance, definitions=defs, resources=defs.resources)
    defs.resolve_sensor_def("backup_alerts")(context)
    alerts = [yaml.safe_load(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    failed = {a["target"]: a for a in alerts if a["event"] == "backup_failed"}
    assert set(failed) == {"till_a", "till_b"}  # the newest run of the job is till_a's: till_b still alerts
    assert "of till_a failed: Exceeded maximum runtime of 1200 seconds." in failed["till_a"]["what"]
    assert failed["till_a"]["key"] == "run:backup_job:till_a" and failed["till_a"]["details"]["host"] == "db-1:5432"


def _files_fleet(tmp_path: Path, count: int) -> Path:
    path = write_policy_file(tmp_path, {"pos": FIVE["pos_eu"]})
    document = yaml.safe_load(path.read_text())
    (tmp_path / "app.conf").write_text("setting = 1\n")
    document["targets"] = {f"cfg_{i}": {"kind": "files", "paths": [str(tmp_path / "app.conf")]} for i in range(count)}
    path.write_text(yaml.safe_dump(document))
    return path


def test_sensors_read_each_manifest_once_and_a_rewritten_one_again(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The sensors' catalog cache (engine/catalog.py): a second evaluation reads no manifest again; a manifest
    rewritten since (here damaged) is read again and refused, not served from the cache. And the mirror of what
    happened outside Dagster stops taking up targets once its evaluation's budget is spent, going on next time."""
    from regal_dagster.defs.backups import mirror
    from regal_dagster.engine.backup import run_backup
    from regal_dagster.engine.catalog import list_backups
    from regal_dagster.engine.checks import run_checks
    from regal_dagster.engine.crypto import load_keyring
    from regal_dagster.engine.layout import manifest_key
    from regal_dagster.engine.storage import open_repository

    path = _files_fleet(tmp_path, 3)
    policy = load_policy(path)
    keyring, repo = load_keyring(policy), open_repository(policy)
    manifests = [run_backup(policy, t, "daily", repo=repo, keyring=keyring).manifest for t in sorted(policy.targets)]
    for manifest in manifests:
        run_checks(policy, repo, keyring, manifest.backup_id, trigger={"cli": "verify"})
    defs = build_definitions(str(path))
    instance = dg.DagsterInstance.ephemeral()
    regal = defs.resources["regal"]
    cache = regal.repository().manifest_cache
    cursor, reads = None, []
    for _ in range(2):
        context = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs, resources=defs.resources)
        defs.resolve_sensor_def("backup_alerts")(context)
        cursor = context.cursor
        reads.append(cache.reads)
    assert reads[0] >= 3 and reads[1] == reads[0] and cache.hits >= 3  # the second evaluation: none read again

    monkeypatch.setattr(mirror, "EVALUATION_BUDGET_SECONDS", 0)  # spent at once: one target per evaluation
    cursor, mirrored = None, []
    for _ in range(3):
        context = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs, resources=defs.resources)
        result = defs.resolve_sensor_def("backups_outside_dagster")(context)
        cursor = result.cursor
        mirrored.append(sorted({e.asset_key.path[1] for e in result.asset_events
                                if isinstance(e, dg.AssetMaterialization)}))
    assert mirrored == [["cfg_0"], ["cfg_1"], ["cfg_2"]]

    stored = tmp_path / "repository" / manifest_key(manifests[0].target, manifests[0].backup_id)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))  # same size, written again: a new version
    backups, damaged = list_backups(regal.repository(), keyring)
    assert manifests[0].backup_id not in {m.backup_id for m in backups}
    assert [d.backup_id for d in damaged] == [manifests[0].backup_id]


def test_assets_are_grouped_by_zone_and_kind_and_every_job_still_selects_its_assets(tmp_path: Path) -> None:
    """500 targets stay navigable in the UI: each asset's group is its domain, its target's zone and its kind;
    the jobs select assets by key, so a schedule's one-target request stays inside its job."""
    path = _fleet_policy(tmp_path)
    document = yaml.safe_load(path.read_text())
    document["targets"]["cache"] = {"kind": "redis", "url": "redis://cache-eu.example:6379/0", "zone": "eu-west"}
    document["targets"]["etc"] = {"kind": "files", "paths": [str(tmp_path)], "zone": "eu"}
    path.write_text(yaml.safe_dump(document))
    defs = build_definitions(str(path))
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    groups = {key.to_user_string(): graph.get(key).group_name for key in graph.get_all_asset_keys()}
    assert {k: g for k, g in groups.items() if k.endswith("/backup")} == {
        "postgres/pos_eu/backup": "backups_eu_postgres", "postgres/payments/backup": "backups_default_postgres",
        "postgres/pos_us/backup": "backups_default_postgres", "postgres/ledger/backup": "backups_default_postgres",
        "postgres/customers/backup": "backups_crm_postgres",
        "redis/cache/backup": "backups_eu_west_redis",  # a zone's '-' cannot be in a group name
        "files/etc/backup": "backups_eu_files"}
    assert groups["redis/cache/restore_test"] == "restore_tests_eu_west_redis"
    assert groups["postgres/pos_eu/restore_test"] == "restore_tests_eu_postgres"
    backups = {k for k, g in groups.items() if g.startswith("backups_")}
    tests = {k for k, g in groups.items() if g.startswith("restore_tests_")}
    assert len(backups) == len(tests) == 7

    def selected(job: str) -> set[str]:
        return {k.to_user_string() for k in defs.resolve_job_def(job).asset_layer.selected_asset_keys}

    assert selected("backup_job") == backups and selected("restore_test_job") == tests
    verify = defs.resolve_job_def("verify_job").asset_layer.asset_graph.asset_check_keys
    assert {c.asset_key.to_user_string() for c in verify} == backups
    repository = defs.get_repository_def()  # every job resolves, and every schedule and sensor names one of them
    jobs = {job.name for job in repository.get_all_jobs()}
    assert {"backup_job", "verify_job", "restore_test_job", "dr_drill_job"} <= jobs
    assert {s.job_name for s in repository.schedule_defs} <= jobs
    assert {t.job_name for s in repository.sensor_defs for t in s.targets} <= jobs
    tick = datetime(2026, 11, 24, 2, tzinfo=UTC)
    daily = defs.resolve_schedule_def("daily_backups").evaluate_tick(
        dg.build_schedule_context(scheduled_execution_time=tick)).run_requests or []
    assert {r.tags["regal/target"] for r in daily} == {"pos_eu", "payments", "pos_us", "customers", "cache", "etc"}
    for request in daily:  # a per-target request selects inside backup_job: the run's subset resolves
        (key,) = request.asset_selection or []
        assert key.to_user_string() in backups
        assert defs.resolve_job_def("backup_job").get_subset(asset_selection={key})
