"""What Dagster's UI shows, read through its GraphQL API (the webserver's own queries' fields), with the code
location loaded from workspace.yaml's module in a code server as `dagster dev` does: the freshness windows in
words the UI writes exactly, the monthly schedule ticking only on the first Sunday, and restore-test assets not
"Unsynced" after a backup that is never restore-tested."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest
from dagster_graphql.test.utils import define_out_of_process_context, execute_dagster_graphql

from regal_dagster.defs import RESTORE_TEST_JOB, build_definitions
from regal_dagster.defs.backups.assets import dagster_renders_exactly, dagster_ui_duration, freshness_windows

from .conftest import DatabaseFactory, backup_then_checks, load_awkward_data, write_policy_file

ROOT = Path(__file__).resolve().parents[1]
BACKUP = ["postgres", "pos", "backup"]
RESTORE_TEST = ["postgres", "pos", "restore_test"]

QUERY = """
query {
  assetNodes { assetKey { path } staleStatus
    internalFreshnessPolicy { ... on TimeWindowFreshnessPolicy { failWindowSeconds warnWindowSeconds } } }
  repositoriesOrError { ... on RepositoryConnection { nodes { name schedules { name cronSchedule description
    futureTicks(limit: 4) { results { timestamp } } } } } }
}
"""


@pytest.fixture
def policy_file(system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> Path:
    source = system_pg.create()
    load_awkward_data(source)
    return write_policy_file(tmp_path, {"pos": source}, restore_tests={"classes": ["daily"]})


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as test_instance:
        yield test_instance


def _ui(policy_file: Path, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setenv("REGAL_POLICY", str(policy_file))
    with define_out_of_process_context(str(ROOT / "workspace.yaml"), None, instance) as context:
        result = execute_dagster_graphql(context, QUERY)
    assert not result.errors, result.errors
    return result.data


@pytest.mark.parametrize("window, words", [
    (timedelta(minutes=45), "an hour"), (timedelta(minutes=40), "40 minutes"), (timedelta(hours=1), "an hour"),
    (timedelta(minutes=90), "2 hours"), (timedelta(hours=24), "24 hours"), (timedelta(days=2), "2 days"),
    (timedelta(seconds=30), "30 seconds"), (timedelta(minutes=1), "a minute"),
])
def test_the_uis_words_for_a_window_as_dayjs_with_dagsters_thresholds_writes_them(window: timedelta,
                                                                                   words: str) -> None:
    assert dagster_ui_duration(window) == words


@pytest.mark.parametrize("rpo, warn", [
    (timedelta(hours=1), timedelta(minutes=40)), (timedelta(hours=24), timedelta(hours=18)),
    (timedelta(minutes=15), timedelta(minutes=10)), (timedelta(days=7), timedelta(days=5)),
    (timedelta(seconds=30), None),
])
def test_the_warning_window_is_one_the_ui_writes_exactly(rpo: timedelta, warn: timedelta | None) -> None:
    fail, chosen = freshness_windows(rpo)
    assert chosen == warn and (chosen is None or dagster_renders_exactly(chosen))
    assert fail == max(rpo, timedelta(minutes=1))


def test_the_ui_shows_exact_freshness_a_first_sunday_monthly_schedule_and_synced_restore_tests(
        policy_file: Path, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> None:
    defs = build_definitions(str(policy_file))
    backup, checks = backup_then_checks(defs, instance, tags={"regal/retention_class": "daily"})
    assert backup.success and checks is not None and checks.success
    tested = defs.resolve_job_def(RESTORE_TEST_JOB).execute_in_process(instance=instance)
    assert tested.success
    hourly, _ = backup_then_checks(defs, instance, tags={"regal/retention_class": "hourly"})  # never restore-tested
    assert hourly.success

    data = _ui(policy_file, instance, monkeypatch)
    nodes = {tuple(n["assetKey"]["path"]): n for n in data["assetNodes"]}
    assert nodes[tuple(RESTORE_TEST)]["staleStatus"] == "FRESH"  # the UI shows no "Unsynced" tag
    freshness = nodes[tuple(BACKUP)]["internalFreshnessPolicy"]
    assert freshness == {"failWindowSeconds": 3600, "warnWindowSeconds": 2400}
    assert dagster_ui_duration(timedelta(seconds=freshness["warnWindowSeconds"])) == "40 minutes"

    (repository,) = data["repositoriesOrError"]["nodes"]
    schedules = {s["name"]: s for s in repository["schedules"]}
    monthly = schedules["monthly_backups"]
    assert monthly["cronSchedule"] == "0 1 * * 0#1"  # the UI (cronstrue): "on the first Sunday of the month"
    assert "the first Sunday of each month" in monthly["description"]
    ticks = [datetime.fromtimestamp(t["timestamp"], UTC) for t in monthly["futureTicks"]["results"]]
    assert len(ticks) == 4 and all(t.weekday() == 6 and t.day <= 7 and t.hour == 1 for t in ticks)
    assert schedules["weekly_backups"]["cronSchedule"] == "0 1 * * 0"


OWNERS_QUERY = """
query {
  assetNodes { assetKey { path } dependencyKeys { path } description
    owners { ... on UserAssetOwner { email } ... on TeamAssetOwner { team } } }
  repositoriesOrError { ... on RepositoryConnection { nodes { schedules { name defaultStatus } } } }
}
"""


def test_owners_on_every_asset_the_report_judges_its_upstream_and_drills_stay_off_in_the_demo(
        system_pg: DatabaseFactory, tmp_path: Path, master_key: str, instance: dg.DagsterInstance,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Owners from the policy (the runbook's contacts by default, a target's own), the compliance report
    downstream of the backups and restore tests it judges with each framework's verdict as metadata and a
    check that fails when a framework does not pass, and the drill schedules off when the policy says stopped
    (as the demo's does) while production's default runs them."""
    import yaml

    from regal_dagster.defs import REPORT_JOB
    from regal_dagster.engine.compliance.report import Period

    from .conftest import invoke_cli

    source = system_pg.create()
    policy_file = write_policy_file(tmp_path, {"pos": source, "erp": source}, audit={"dsn": system_pg.create()})
    document = yaml.safe_load(policy_file.read_text())
    document["targets"]["erp"]["owners"] = ["team:erp", "erp-lead@company.com"]
    document["dagster"] = {"drill_schedules": "stopped"}
    policy_file.write_text(yaml.safe_dump(document))

    monkeypatch.setenv("REGAL_POLICY", str(policy_file))
    with define_out_of_process_context(str(ROOT / "workspace.yaml"), None, instance) as context:
        result = execute_dagster_graphql(context, OWNERS_QUERY)
    assert not result.errors, result.errors
    nodes = {"/".join(n["assetKey"]["path"]): n for n in result.data["assetNodes"]}
    owners = {key: [o.get("email") or f"team:{o['team']}" for o in n["owners"]] for key, n in nodes.items()}
    assert owners == {"postgres/pos/backup": ["ops@company.com", "dba@company.com"],
                      "postgres/pos/restore_test": ["ops@company.com", "dba@company.com"],
                      "postgres/erp/backup": ["team:erp", "erp-lead@company.com"],
                      "postgres/erp/restore_test": ["team:erp", "erp-lead@company.com"],
                      "compliance/report": ["security@company.com", "ops@company.com"]}
    assert sorted("/".join(k["path"]) for k in nodes["compliance/report"]["dependencyKeys"]) == [
        "postgres/erp/backup", "postgres/erp/restore_test", "postgres/pos/backup", "postgres/pos/restore_test"]
    (repository,) = result.data["repositoriesOrError"]["nodes"]
    status = {s["name"]: s["defaultStatus"] for s in repository["schedules"]}
    assert status["quarterly_dr_drill"] == status["monthly_restore_sample"] == "STOPPED"
    assert status["daily_backups"] == status["monthly_compliance_report"] == "RUNNING"
    document.pop("dagster")  # production: the default
    policy_file.write_text(yaml.safe_dump(document))
    production = build_definitions(str(policy_file))
    assert production.resolve_schedule_def("quarterly_dr_drill").default_status == dg.DefaultScheduleStatus.RUNNING

    # No backup yet: the report's frameworks cannot pass, and its check says which (a FAIL is an error)
    this_month = Period.parse(datetime.now(UTC).strftime("%Y-%m"))
    report = production.resolve_job_def(REPORT_JOB).execute_in_process(
        instance=instance, run_config={"ops": {"compliance__report": {"config": {"period": this_month.label}}}})
    assert report.success
    metadata = report.asset_materializations_for_node("compliance__report")[0].metadata
    verdicts = {k: v.value for k, v in metadata.items() if k.startswith("verdict/")}
    assert set(verdicts) == {"verdict/PCI DSS 4.0.1", "verdict/SOX ITGC", "verdict/GDPR"}, metadata.keys()
    (check,) = report.get_asset_check_evaluations()
    assert check.check_name == "frameworks_pass" and check.passed is False
    # (a trail with nothing in it yet: the policy never took effect, so the period is OUT OF SCOPE, never PASS)
    assert "PASS" not in verdicts.values() and check.severity == (
        dg.AssetCheckSeverity.ERROR if "FAIL" in verdicts.values() else dg.AssetCheckSeverity.WARN)
    assert all(f"{name.removeprefix('verdict/')}: {v}" in (check.description or "")
               for name, v in verdicts.items() if v != "PASS")

    document["targets"]["erp"]["owners"] = ["Erp Team"]
    policy_file.write_text(yaml.safe_dump(document))
    refused = invoke_cli(["list", "--policy", str(policy_file)])
    assert refused.returncode == 2 and "neither an e-mail address nor team:NAME" in refused.stderr
    assert "erp" in refused.stderr and "Traceback" not in refused.stderr
