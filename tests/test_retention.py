"""Retention: the grandfather-father-son planner (property tests with hypothesis) and prune on a real
repository with real backups."""

from __future__ import annotations

import dataclasses
import functools
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from regal_dagster.engine.backup import run_backup
from regal_dagster.engine.catalog import list_backups
from regal_dagster.engine.checks import run_checks
from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.documents import read_document
from regal_dagster.engine.policy import RETENTION_CLASSES, load_policy
from regal_dagster.engine.retention import PRUNE_LOG_KIND, PRUNE_SLACK, BackupInfo, plan, run_prune
from regal_dagster.engine.settings import CronExpression
from regal_dagster.engine.storage import open_repository

from .conftest import DatabaseFactory, load_awkward_data, make_policy, run_cli

NOW = datetime(2026, 11, 24, 12, 30, tzinfo=UTC)

backups_strategy = st.lists(
    st.builds(lambda minutes, cls, status, n, lock_days: BackupInfo(
                  f"t-{n:05d}", NOW - timedelta(minutes=minutes), cls, status,
                  None if lock_days is None else NOW - timedelta(minutes=minutes) + timedelta(days=lock_days)),
              st.integers(0, 60 * 24 * 800), st.sampled_from(RETENTION_CLASSES),
              st.sampled_from(["good", "good", "good", "failed", "unchecked"]), st.integers(0, 99999),
              st.none() | st.integers(1, 400)),
    max_size=80, unique_by=lambda b: b.backup_id)
counts_strategy = st.fixed_dictionaries({name: st.integers(0, 40) for name in RETENTION_CLASSES})


@settings(max_examples=300, deadline=None)
@given(backups_strategy, counts_strategy)
def test_no_class_keeps_more_than_the_policy_allows(backups: list[BackupInfo], counts: dict[str, int]) -> None:
    decisions = plan(backups, counts, NOW)
    for name in RETENTION_CLASSES:
        kept_for = [d for d in decisions if any(r.startswith(f"{name} slot ") for r in d.reasons)]
        assert len(kept_for) <= counts[name]


@settings(max_examples=300, deadline=None)
@given(backups_strategy, counts_strategy)
def test_the_newest_good_backup_always_stays(backups: list[BackupInfo], counts: dict[str, int]) -> None:
    decisions = {d.backup_id: d for d in plan(backups, counts, NOW)}
    good = [b for b in backups if b.status == "good"]
    if good:
        newest = max(good, key=lambda b: (b.started_at, b.backup_id))
        assert decisions[newest.backup_id].keep


@settings(max_examples=200, deadline=None)
@given(backups_strategy, counts_strategy)
def test_a_kept_backup_goes_at_its_planned_deletion_date(backups: list[BackupInfo], counts: dict[str, int]) -> None:
    """The date the prune log gives for a kept backup (what the compliance report judges retention by) is the
    moment the plan stops keeping it, if nothing newer comes, once what keeps it beyond any date (the newest
    good backup, unchecked, a rollback, an incremental that needs it: its condition) is over; a backup kept by
    its condition alone has none."""
    for backup, decision in zip(backups, plan(backups, counts, NOW), strict=True):
        if not decision.keep:
            assert decision.delete_after is None
            continue
        if decision.delete_after is None:
            assert decision.condition is not None
            continue
        before = plan(backups, counts, decision.delete_after - timedelta(seconds=1))[backups.index(backup)]
        at = plan(backups, counts, decision.delete_after)[backups.index(backup)]
        assert before.keep, decision
        assert not at.keep or (decision.condition and at.condition and at.delete_after is None), (decision, at)


@settings(max_examples=200, deadline=None)
@given(backups_strategy, counts_strategy)
def test_a_deleted_backup_was_kept_until_it_became_due(backups: list[BackupInfo], counts: dict[str, int]) -> None:
    """The moment the plan stopped keeping a backup (from which its deletion date follows) is in the past, and
    just before it the plan still kept the backup."""
    for backup, decision in zip(backups, plan(backups, counts, NOW), strict=True):
        if decision.keep:
            assert decision.due_since is None
            continue
        assert decision.due_since is not None and backup.started_at <= decision.due_since <= NOW
        if decision.due_since > backup.started_at:  # the repository as it was just before then
            then = decision.due_since - timedelta(microseconds=1)
            existing = [b for b in backups if b.started_at <= then]
            before = plan(existing, counts, then)
            assert before[existing.index(backup)].keep, decision


@settings(max_examples=300, deadline=None)
@given(backups_strategy, counts_strategy)
def test_the_plan_is_stable_when_run_twice(backups: list[BackupInfo], counts: dict[str, int]) -> None:
    first = plan(backups, counts, NOW)
    kept = [b for b, d in zip(backups, first, strict=True) if d.keep]
    again = plan(kept, counts, NOW)
    assert all(d.keep for d in again)
    assert [d.reasons for d in again] == [d.reasons for d in first if d.keep]


@settings(max_examples=200, deadline=None)
@given(backups_strategy, counts_strategy)
def test_nothing_under_object_lock_is_planned_for_deletion(backups: list[BackupInfo], counts: dict[str, int]) -> None:
    for backup, decision in zip(backups, plan(backups, counts, NOW), strict=True):
        if backup.locked_until is not None and backup.locked_until > NOW:
            assert decision.keep and any(r.startswith("object lock until") for r in decision.reasons)


@settings(max_examples=200, deadline=None)
@given(backups_strategy, counts_strategy)
def test_failed_backups_fill_no_slot(backups: list[BackupInfo], counts: dict[str, int]) -> None:
    for backup, decision in zip(backups, plan(backups, counts, NOW), strict=True):
        if backup.status != "good":
            assert not any(" slot " in r or "newest good" in r for r in decision.reasons)


@settings(max_examples=300, deadline=None)
@given(backups_strategy, counts_strategy, st.lists(st.integers(-1, 79), min_size=80, max_size=80))
def test_a_kept_incremental_keeps_every_backup_it_is_built_on(backups: list[BackupInfo], counts: dict[str, int],
                                                               parents: list[int]) -> None:
    """Each backup incremental on top of an earlier one (or full: -1, or a choice not earlier): whatever the
    slots say, no backup a kept incremental is built on is deleted, and it is kept at least as long."""
    ordered = sorted(backups, key=lambda b: (b.started_at, b.backup_id))
    chained: list[BackupInfo] = []
    for i, backup in enumerate(ordered):
        choice = parents[i]
        chain = (*chained[choice].chain, chained[choice].backup_id) if 0 <= choice < i else ()
        chained.append(dataclasses.replace(backup, chain=chain))
    decisions = {d.backup_id: d for d in plan(chained, counts, NOW)}
    for backup in chained:
        if decisions[backup.backup_id].keep:
            for parent in backup.chain:
                kept = decisions[parent]
                # named after a kept incremental built on it (this one, or one built on this one: chains are whole)
                built_on_it = {f"parent of the incremental {b.backup_id}" for b in chained
                               if parent in b.chain and decisions[b.backup_id].keep}
                assert kept.keep and built_on_it & set(kept.reasons)
                # as long: a date no earlier than the incremental's, or a condition keeping it beyond any date
                child_end = decisions[backup.backup_id].delete_after
                assert kept.condition is not None if child_end is None else (
                    kept.condition is not None and kept.delete_after is None or kept.delete_after >= child_end)


def test_grandfather_father_son_over_a_year_of_daily_backups() -> None:
    days = [NOW - timedelta(days=d) for d in range(400)]
    backups = [BackupInfo(f"t-{i:05d}", when, "monthly" if when.day <= 7 and when.weekday() == 6 else
                          "weekly" if when.weekday() == 6 else "daily", "good") for i, when in enumerate(days)]
    decisions = plan(backups, {"hourly": 48, "daily": 30, "weekly": 26, "monthly": 12}, NOW)
    kept = [b for b, d in zip(backups, decisions, strict=True) if d.keep]
    assert all(NOW - b.started_at < timedelta(days=30) or b.retention_class != "daily" for b in kept)
    assert len([b for b in kept if b.retention_class == "monthly"]) == 12
    assert max(NOW - b.started_at for b in kept) < timedelta(days=366)
    oldest = max(kept, key=lambda b: NOW - b.started_at)
    assert next(d for d in decisions if d.backup_id == oldest.backup_id).reasons[0].startswith("monthly slot ")


def test_prune_deletes_what_retention_no_longer_keeps_and_records_it(system_pg: DatabaseFactory, tmp_path: Path,
                                                                     master_key: str) -> None:
    source = system_pg.create()
    load_awkward_data(source)
    policy = make_policy(tmp_path, {"pos": source})
    policy = policy.model_copy(update={"retention": policy.retention.model_copy(update={"hourly": 1, "daily": 0,
                                                                                       "weekly": 0, "monthly": 0})})
    repo, keyring = open_repository(policy), load_keyring(policy)
    manifests = [run_backup(policy, "pos", repo=repo).manifest for _ in range(3)]
    for manifest in manifests:
        assert run_checks(policy, repo, keyring, manifest.backup_id).passed
    # an interrupted backup's leftovers, two days old
    repo.put_bytes("backups/pos/pos-20261001T000000Z-abcdef/tables/00001.copy", b"RGLB...")
    later = datetime.now(UTC) + timedelta(hours=3)  # three hours on: only the newest stays (RPO guard)

    dry = run_prune(policy, repo, later, dry_run=True)
    assert len(list_backups(repo, load_keyring(policy), "pos")[0]) == 3 and dry.leftovers
    report = run_prune(policy, repo, later)

    assert report.deleted == [m.backup_id for m in manifests[:2]]
    remaining, _ = list_backups(repo, load_keyring(policy), "pos")
    assert [m.backup_id for m in remaining] == [manifests[2].backup_id]
    assert not list(repo.list(f"backups/pos/{manifests[0].backup_id}/"))  # every object gone, checks.json too
    assert report.leftovers == ["backups/pos/pos-20261001T000000Z-abcdef/tables/00001.copy"]
    assert not list(repo.list("backups/pos/pos-20261001T000000Z-abcdef/"))
    (log,) = list(repo.list("prune/"))
    logged = read_document(repo, load_keyring(policy), PRUNE_LOG_KIND, log.key)  # encrypted (no bucket reader)
    assert logged["deleted"] == report.deleted and logged["leftovers_deleted"] == report.leftovers
    assert run_prune(policy, repo, later, dry_run=True).past_retention == []  # nothing past retention remains


def test_list_show_dry_run_and_check_tell_one_retention_truth(system_pg: DatabaseFactory, tmp_path: Path,
                                                              master_key: str) -> None:
    """Two backups in one hour: the hourly slot keeps the newer, and the older is due for deletion by the next
    run of the prune schedule. `list`, `show`, `prune --dry-run` and `prune --check` give the same decision and
    date; the check calls the backup past its retention only once that prune has run and left it."""
    from .conftest import write_policy_file

    policy_file = write_policy_file(tmp_path, {"pos": system_pg.create()})

    cli = functools.partial(run_cli, policy_file)

    ids = [json.loads(cli("backup", "pos", "--json").stdout)["backup_id"] for _ in range(2)]
    for backup_id in ids:
        assert cli("verify", backup_id).returncode == 0
    listed = {b["backup_id"]: b["retention"] for b in json.loads(cli("list", "--json").stdout)["backups"]}
    older = listed[ids[0]]
    assert older["keep"] is False and older["deletion_at"] is not None and older["past_retention"] is False
    assert listed[ids[1]]["keep"] is True and "the newest good backup" in listed[ids[1]]["reasons"]
    assert json.loads(cli("show", ids[0], "--json").stdout)["retention"] == older
    dry = json.loads(cli("prune", "--dry-run", "--json").stdout)
    assert next(d for d in dry["decisions"]["pos"] if d["backup_id"] == ids[0])["deletion_at"] == older["deletion_at"]
    deletion_at = datetime.fromisoformat(older["deletion_at"])
    assert CronExpression.parse("30 2 * * *").matches(deletion_at)  # the policy's prune schedule (default)
    assert datetime.now(UTC) < deletion_at <= datetime.now(UTC) + timedelta(days=1)

    check = cli("prune", "--check")  # due, not past: the prune that deletes it has not run yet
    assert check.returncode == 0, check.stdout
    assert f"would delete {ids[0]}" in check.stdout and "hourly slot" in check.stdout
    assert "1 backup(s) due for deletion by the next prune" in check.stdout
    policy = load_policy(policy_file)
    late = run_prune(policy, open_repository(policy), deletion_at + PRUNE_SLACK + timedelta(minutes=1), dry_run=True)
    assert late.past_retention == [ids[0]]  # had that prune run and left it, retention would not hold

    assert cli("prune").returncode == 0  # a real prune deletes what the plan no longer keeps
    assert [b["backup_id"] for b in json.loads(cli("list", "--json").stdout)["backups"]] == [ids[1]]
    assert cli("prune", "--check").returncode == 0


def test_the_prune_job_and_the_quarterly_retention_check_run_in_dagster(system_pg: DatabaseFactory, tmp_path: Path,
                                                                        master_key: str) -> None:
    import dagster as dg

    from regal_dagster.defs import build_definitions

    from .conftest import write_policy_file

    policy_file = write_policy_file(tmp_path, {"pos": system_pg.create()})
    defs = build_definitions(str(policy_file))
    instance = dg.DagsterInstance.ephemeral()
    for _ in range(2):
        assert defs.resolve_job_def("backup_job").execute_in_process(instance=instance).success
    audit = defs.resolve_schedule_def("quarterly_retention_check")
    check_config = audit.evaluate_tick(dg.build_schedule_context(
        instance=instance, scheduled_execution_time=datetime(2027, 1, 1, 6, tzinfo=UTC))).run_requests[0].run_config

    # the older backup of the hour is due for deletion by the next prune, not past its retention: the proof holds
    assert defs.resolve_job_def("prune_job").execute_in_process(instance=instance, run_config=check_config).success
    assert defs.resolve_job_def("prune_job").execute_in_process(instance=instance).success  # prunes it
    assert defs.resolve_job_def("prune_job").execute_in_process(instance=instance, run_config=check_config).success
