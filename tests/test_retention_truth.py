"""One retention truth: the date every face shows for a backup's deletion is the day the prune deletes it.

The prune schedule is run forward in time against a policy, day by day over eight months of daily, weekly and
monthly backups (the default schedules' shape): first on the planner alone (with an incremental chain too),
then on a real repository with real backups taken at chosen times, real checks and real prunes. At every
step the date shown (by `retention_verdicts`, the function `list`, `show`, `prune --dry-run/--json`, Dagster
and the report read) is compared with the day the prune actually deletes the backup."""

from __future__ import annotations

import dataclasses
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

from regal_dagster.engine.backup import run_backup
from regal_dagster.engine.checks import run_checks
from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.policy import Policy, load_policy
from regal_dagster.engine.retention import (
    BackupInfo,
    RetentionVerdict,
    plan,
    retention_verdict,
    retention_verdicts,
    run_prune,
)
from regal_dagster.engine.settings import CronExpression
from regal_dagster.engine.storage import open_repository

from .conftest import init_repository, run_cli

PRUNE_CRON = "30 2 * * *"  # the default prune schedule
COUNTS = {"hourly": 0, "daily": 7, "weekly": 4, "monthly": 3}  # small, so that every class is pruned in 8 months
DAYS = 245


def ticks(day: datetime) -> list[tuple[datetime, str]]:
    """The default schedules' backups on a day: Sunday 01:00 weekly (the first Sunday of a month: monthly), and
    every day 02:00 daily."""
    taken = [(day.replace(hour=1), "monthly" if day.day <= 7 else "weekly")] if day.weekday() == 6 else []
    return [*taken, (day.replace(hour=2), "daily")]


def verdicts_of(backups: list[BackupInfo], now: datetime) -> dict[str, RetentionVerdict]:
    return {d.backup_id: retention_verdict(d, PRUNE_CRON, now) for d in plan(backups, COUNTS, now)}


def run_forward(start: datetime, chained: bool) -> tuple[dict[str, list[datetime | None]], dict[str, datetime],
                                                        list[BackupInfo], datetime]:
    """Backups and prunes day by day; what was shown for each backup at each step, and when each went."""
    present: list[BackupInfo] = []
    shown: dict[str, list[datetime | None]] = {}
    deleted: dict[str, datetime] = {}
    now = start
    for day in (start + timedelta(days=n) for n in range(DAYS)):
        for when, retention_class in ticks(day):
            newest = max(present, key=lambda b: b.started_at, default=None)
            full = retention_class in ("weekly", "monthly") or newest is None
            chain = () if not chained or full or newest is None else (*newest.chain, newest.backup_id)
            backup = BackupInfo(f"t-{when:%Y%m%dT%H%M%S}Z", when, retention_class, "good", chain=chain)
            present.append(backup)
            for backup_id, verdict in verdicts_of(present, when).items():
                shown.setdefault(backup_id, []).append(verdict.deletion_at)
        now = day.replace(hour=2, minute=30)
        verdicts = verdicts_of(present, now)
        for backup_id, verdict in verdicts.items():
            shown[backup_id].append(verdict.deletion_at)
        newest_good = [v.backup_id for v in verdicts.values() if v.state == "newest_good"]
        assert newest_good == [max(present, key=lambda b: b.started_at).backup_id]  # one per target
        deleted.update({v.backup_id: now for v in verdicts.values() if not v.keep})
        present = [b for b in present if verdicts[b.backup_id].keep]
    return shown, deleted, present, now


def test_forward_the_deletion_date_shown_from_creation_on_is_the_day_the_prune_deletes_the_backup() -> None:
    shown, deleted, present, end = run_forward(datetime(2026, 1, 1, tzinfo=UTC), chained=False)
    assert any(b.endswith("T010000Z") for b in deleted) and any(b.endswith("T020000Z") for b in deleted)
    for backup_id, dates in shown.items():
        if backup_id in deleted:
            assert set(dates) == {deleted[backup_id]}, (backup_id, dates)  # at creation and every day after
        else:
            assert all(d is not None and d > end for d in dates), (backup_id, dates)
    assert CronExpression.parse(PRUNE_CRON).matches(next(iter(deleted.values())))
    assert {b.retention_class for b in present} == {"daily", "weekly", "monthly"}
    monthly_gone = [b for b in deleted if datetime.strptime(b[2:10], "%Y%m%d").day <= 7 and b.endswith("T010000Z")]
    assert monthly_gone, "a monthly backup aged out of its slots in eight months"


def test_forward_with_incremental_chains_the_parents_go_with_the_last_backup_that_needs_them() -> None:
    """Dailies are incremental on the newest backup, weekly and monthly ones full. A parent's date grows while
    its chain grows, never past the day it goes; once a full backup closes the chain, it is that day."""
    shown, deleted, present, end = run_forward(datetime(2026, 1, 1, tzinfo=UTC), chained=True)
    for backup_id, dates in shown.items():
        actual = deleted.get(backup_id)
        assert all(d is None or actual is None or d <= actual for d in dates), (backup_id, dates, actual)
        if actual is not None:
            assert dates[-1] == actual
    kept = {d.backup_id: d for d in plan(present, COUNTS, end)}
    newest = max(present, key=lambda b: b.started_at)
    verdicts = verdicts_of(present, end)
    for parent in newest.chain:
        assert verdicts[parent].state in ("needed_by", "scheduled") and kept[parent].keep
        assert verdicts[parent].state != "newest_good"
    needed = [v for v in verdicts.values() if v.state == "needed_by"]
    assert needed and all(v.needed_by and v.summary.startswith(f"kept: needed by {v.needed_by}") for v in needed)
    assert verdicts[newest.backup_id].summary.startswith("kept: the newest good backup")


def test_an_unchecked_backup_is_never_pruned_before_it_has_been_checked_once() -> None:
    start = datetime(2026, 3, 1, 2, tzinfo=UTC)
    backups = [BackupInfo(f"t-{n:03d}", start + timedelta(days=n), "daily", "unchecked" if n == 1 else "good")
               for n in range(60)]
    for later in (start + timedelta(days=2), start + timedelta(days=59, hours=1)):
        verdict = verdicts_of([b for b in backups if b.started_at <= later], later)["t-001"]
        assert verdict.keep and verdict.state == "unchecked" and verdict.deletion_at is None
        assert verdict.summary.startswith("kept: unchecked, until checked")
    at = start + timedelta(days=59, hours=1)
    checked = [dataclasses.replace(b, status="good", checked_at=at) if b.backup_id == "t-001" else b for b in backups]
    verdict = verdicts_of(checked, at)["t-001"]  # checked at last: its daily slot is long gone
    assert not verdict.keep and verdict.deletion_at == CronExpression.parse(PRUNE_CRON).next_match(at)


# --- on a real repository --------------------------------------------------------------------------

def _policy(tmp_path: Path) -> Path:
    state = tmp_path / "terraform.tfstate"
    state.write_text(json.dumps({"version": 4, "terraform_version": "1.9.5", "serial": 1, "lineage": "l",
                                 "outputs": {}, "resources": []}))
    path = tmp_path / "regal_backup.yaml"
    path.write_text(yaml.safe_dump({
        "repository": {"url": "repository"},
        "encryption": {"keyset": "keyset.json", "master_key": {"env": "REGAL_TEST_MASTER_KEY"}},
        "retention": COUNTS, "prune": {"cron": PRUNE_CRON},
        "targets": {"infra": {"kind": "terraform", "state": str(state)}}}))
    init_repository(load_policy(path))
    return path


def _empty_directories(root: Path) -> list[str]:
    return [d for d, dirs, files in os.walk(root / "backups") if not dirs and not files]


def _corrupt(policy: Policy, backup_id: str) -> None:
    root = policy.resolve_path("repository")
    victim = next(p for p in (root / "backups" / "infra" / backup_id).rglob("*") if p.is_file()
                  and p.name not in ("manifest.json", "checks.json"))
    victim.write_bytes(b"not what was stored")


def test_forward_on_a_real_repository_list_show_and_prune_tell_the_date_the_prune_deletes(tmp_path: Path,
                                                                                          master_key: str) -> None:
    """Real backups taken at chosen times over eight months, checked as the CLI does (one left unchecked for
    three weeks, one failing its checks), pruned every day at the prune schedule's time: every backup goes on
    the day shown when it was checked, no directory is left behind, the unchecked one stays until checked;
    `list`, `show` and `prune --dry-run --json` show one retention object per backup, the same."""
    policy_file = _policy(tmp_path)
    policy = load_policy(policy_file)
    repo, keyring = open_repository(policy), load_keyring(policy)
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start = today - timedelta(days=DAYS + 1)
    shown: dict[str, datetime | None] = {}
    deleted: dict[str, datetime] = {}
    unchecked: str | None = None
    failed: str | None = None
    for n in range(DAYS):
        day = start + timedelta(days=n)
        for when, retention_class in ticks(day):
            backup_id = run_backup(policy, "infra", retention_class, repo=repo, keyring=keyring,
                                   started_at=when).manifest.backup_id
            if n == 40 and retention_class == "daily":
                unchecked = backup_id
                continue
            if n == 50 and retention_class == "daily":
                failed = backup_id
                _corrupt(policy, backup_id)
            assert run_checks(policy, repo, keyring, backup_id).passed == (backup_id != failed)
            shown[backup_id] = retention_verdicts(policy, repo, keyring, when, "infra")[backup_id].deletion_at
        if n == 61:  # the daily verification checks it at last (its own slot is long gone)
            assert unchecked and run_checks(policy, repo, keyring, unchecked).passed
            shown[unchecked] = retention_verdicts(policy, repo, keyring, day, "infra")[unchecked].deletion_at
        now = day.replace(hour=2, minute=30)
        verdicts = retention_verdicts(policy, repo, keyring, now, "infra")
        for backup_id, verdict in verdicts.items():
            if backup_id == unchecked and n < 61:
                assert verdict.keep and verdict.state == "unchecked" and verdict.deletion_at is None
            else:
                assert verdict.deletion_at == shown[backup_id], (n, backup_id, verdict)
        assert [v.state for v in verdicts.values()].count("newest_good") == 1
        report = run_prune(policy, repo, now, keyring=keyring)
        deleted.update({b: now for b in report.deleted})
        assert _empty_directories(policy.resolve_path("repository")) == []
    assert unchecked in deleted and failed in deleted
    assert deleted[failed] == CronExpression.parse(PRUNE_CRON).next_match(
        datetime.strptime(failed.split("-")[1], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC) + policy.prune.failed_grace)
    for backup_id, when in deleted.items():
        assert shown[backup_id] == when, backup_id

    # the faces, at the real now: one schema, the same values
    listed = {b["backup_id"]: b["retention"] for b in json.loads(run_cli(policy_file, "list", "--json").stdout)
              ["backups"]}
    dry = json.loads(run_cli(policy_file, "prune", "--dry-run", "--json").stdout)
    pruned = {d["backup_id"]: d for d in dry["decisions"]["infra"]}
    assert set(listed) == set(pruned) and len(listed) > 10
    for backup_id, retention in listed.items():
        assert retention == pruned[backup_id] and retention["backup_id"] == backup_id
        assert set(retention) == {"backup_id", "target", "keep", "state", "summary", "deletion_at", "needed_by",
                                  "reasons", "due_since", "past_retention"}
    some = next(iter(listed))
    assert json.loads(run_cli(policy_file, "show", some, "--json").stdout)["retention"] == listed[some]
    table = run_cli(policy_file, "list").stdout
    assert table.count("kept: the newest good backup") == 1


def test_dagster_shows_the_retention_list_shows_not_the_class_count(tmp_path: Path, master_key: str) -> None:
    """The backup asset's metadata gave `retain_until` (the class's count from its start: 30 days for a daily)
    while prune deleted it at another date; now it and the checks' metadata give the verdict `list` gives."""
    import dagster as dg

    from regal_dagster.defs import build_definitions

    from .conftest import backup_then_checks

    policy_file = _policy(tmp_path)
    defs = build_definitions(str(policy_file))
    instance = dg.DagsterInstance.ephemeral()
    backup, checks = backup_then_checks(defs, instance, tags={"regal/retention_class": "daily"})
    assert checks is not None and checks.success
    (event,) = backup.get_asset_materialization_events()
    metadata = event.materialization.metadata
    assert "retain_until" not in metadata
    assert metadata["retention"].value == "kept: unchecked, until checked"  # as it was: its checks came next
    (listed,) = json.loads(run_cli(policy_file, "list", "--json").stdout)["backups"]
    manifest_check = next(e for e in checks.get_asset_check_evaluations() if e.check_name == "manifest")
    assert manifest_check.metadata["retention"].value == listed["retention"]["summary"]
    assert listed["retention"]["summary"].startswith("kept: the newest good backup, then until the prune of ")
    deletion_at = datetime.fromisoformat(listed["retention"]["deletion_at"])
    assert manifest_check.metadata["retention_deletion_at"].value == deletion_at.timestamp()
    assert listed["retain_until"] is None  # no Object Lock: no second date
