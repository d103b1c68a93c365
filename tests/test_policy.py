"""The policy file: defaults follow the runbook, and a bad file lists every problem by its path."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from regal_dagster.engine.errors import PolicyError
from regal_dagster.engine.policy import load_policy, policy_from_dict

MINIMAL = {
    "repository": {"url": "repository"},
    "encryption": {"keyset": "keyset.json", "master_key": {"env": "KEY"}},
    "targets": {"pos": {"kind": "postgres", "dsn": "postgresql://backup:${PGPASS}@db/regalpos"}},
}


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_defaults_follow_the_runbook(tmp_path: Path) -> None:
    policy = policy_from_dict(MINIMAL, tmp_path)
    assert policy.rpo == timedelta(hours=1) and policy.rto == timedelta(hours=4)
    assert (policy.retention.hourly, policy.retention.daily, policy.retention.weekly, policy.retention.monthly) == \
        (48, 30, 26, 12)
    assert policy.schedules["daily"].cron == "0 2 * * *"
    assert policy.schedules["weekly"].cron == "0 1 * * 0"


@pytest.mark.parametrize("tick, expected", [
    (utc(2026, 11, 24, 3, 0), "hourly"),     # an ordinary hour
    (utc(2026, 11, 24, 2, 0), "daily"),      # 02:00 UTC: the daily backup, not an hourly one too
    (utc(2026, 11, 29, 1, 0), "weekly"),     # last Sunday of November, 01:00
    (utc(2026, 11, 1, 1, 0), "monthly"),     # first Sunday of November, 01:00: the archival backup
    (utc(2026, 12, 6, 1, 0), "monthly"),     # first Sunday of December
    (utc(2026, 12, 13, 1, 0), "weekly"),
    (utc(2026, 11, 24, 3, 30), None),        # not a scheduled minute
])
def test_each_tick_belongs_to_exactly_one_class(tmp_path: Path, tick: datetime, expected: str | None) -> None:
    assert policy_from_dict(MINIMAL, tmp_path).retention_class_for_tick(tick) == expected


def test_the_hourly_schedule_alone_meets_the_one_hour_rpo(tmp_path: Path) -> None:
    policy = policy_from_dict(MINIMAL, tmp_path)
    start = utc(2026, 11, 1)
    ticks = [start + timedelta(minutes=m) for m in range(7 * 24 * 60)]
    scheduled = [t for t in ticks if policy.retention_class_for_tick(t)]
    gaps = {b - a for a, b in itertools.pairwise(scheduled)}
    assert max(gaps) <= policy.rpo


def test_retain_until_per_class(tmp_path: Path) -> None:
    retention = policy_from_dict(MINIMAL, tmp_path).retention
    start = utc(2026, 1, 31, 2)
    assert retention.retain_until("hourly", start) == start + timedelta(hours=48)
    assert retention.retain_until("daily", start) == start + timedelta(days=30)
    assert retention.retain_until("weekly", start) == start + timedelta(weeks=26)
    assert retention.retain_until("monthly", start) == utc(2027, 1, 28, 2)


def test_dsn_reads_secrets_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = policy_from_dict(MINIMAL, tmp_path).target("pos")
    monkeypatch.delenv("PGPASS", raising=False)
    with pytest.raises(PolicyError, match=r"\$\{PGPASS\} but it is not set"):
        target.resolved_dsn()
    monkeypatch.setenv("PGPASS", "s3cret")
    assert target.resolved_dsn() == "postgresql://backup:s3cret@db/regalpos"


def test_a_bad_policy_lists_every_problem_by_path(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("""
repository: {url: "ftp://nowhere"}
encryption: {keyset: k.json, master_key: {env: A, file: b}}
targets:
  pos: {kind: postgres}
  Bad-Name: {kind: mysql, dsn: x}
rpo: soon
schedules:
  daily: {cron: "0 25 * * *"}
retention: {daily: -1, yearly: 7}
""")
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    problems = err.value.problems
    assert "targets.pos.dsn: missing" in problems
    assert any(p.startswith("repository.url:") for p in problems)
    assert any(p.startswith("encryption.master_key:") and "exactly one" in p for p in problems)
    assert any(p.startswith("targets.Bad-Name.kind:") for p in problems)
    assert any(p.startswith("rpo:") and "not a duration" in p for p in problems)
    assert any(p.startswith("schedules.daily.cron:") and "outside 0-23" in p for p in problems)
    assert any(p.startswith("retention.daily:") for p in problems)
    assert "retention.yearly: unknown setting" in problems
    assert str(path) in str(err.value)


def test_a_missing_policy_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="regal-backup init"):
        load_policy(tmp_path / "nope.yaml")


def test_unknown_target_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"known: pos"):
        policy_from_dict(MINIMAL, tmp_path).target("orders")
