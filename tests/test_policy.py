"""The policy file: defaults follow the runbook, and a bad file lists every problem by its path."""

from __future__ import annotations

import itertools
import re
import typing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel

from regal_dagster.engine.errors import PolicyError, UsageError
from regal_dagster.engine.policy import Policy, load_policy, policy_file, policy_from_dict

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


def test_each_backend_brings_its_own_repository_settings(tmp_path: Path) -> None:
    """The URL's scheme picks the backend's settings: an S3 repository takes its bucket's settings, a file
    repository refuses them (they used to pass silently) and says what to remove."""
    s3 = {"url": "s3://regal/pos", "region": "eu-west-1", "endpoint_url": "http://127.0.0.1:9000",
          "server_side_encryption": "aws:kms", "sse_kms_key_id": "alias/regal", "lock_lease": "2m"}
    policy = policy_from_dict({**MINIMAL, "repository": s3, "offsite": {"url": "offsite"}}, tmp_path)
    assert policy.repository.store_encryption() == "aws:kms" and policy.offsite is not None
    assert policy.offsite.store_encryption() is None
    assert policy.local_repository_path(policy.offsite) == tmp_path / "offsite"  # from the policy's folder

    file_with_s3 = {"url": "file:///srv/regal", "endpoint_url": "http://127.0.0.1:9000", "region": "eu-west-1",
                    "server_side_encryption": "aws:kms", "lock_wait": "10m"}
    with pytest.raises(PolicyError) as err:
        policy_from_dict({**MINIMAL, "repository": file_with_s3, "offsite": {"url": "dr", "part_size_mb": 8}},
                         tmp_path)
    problems = err.value.problems
    for setting in ("endpoint_url", "region", "server_side_encryption"):
        assert f"repository: {setting} needs an s3:// repository; this one is a filesystem repository " \
               f"(file:///path or a plain path), which has no such setting: remove {setting}" in problems
    assert any(p.startswith("offsite: part_size_mb needs an s3:// repository") for p in problems)
    assert not any("lock_wait" in p for p in problems)  # every repository has that one
    assert len(problems) == 4
    with pytest.raises(PolicyError, match=r"repository\.colour: unknown setting"):
        policy_from_dict({**MINIMAL, "repository": {"url": "repository", "colour": "blue"}}, tmp_path)


def test_the_policy_file_is_found_one_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--policy, else $REGAL_POLICY, else ./regal_backup.yaml: the CLI, Dagster and load_policy all ask policy_file."""
    monkeypatch.delenv("REGAL_POLICY", raising=False)
    assert policy_file() == Path("regal_backup.yaml")
    monkeypatch.setenv("REGAL_POLICY", str(tmp_path / "from-env.yaml"))
    assert policy_file() == tmp_path / "from-env.yaml"
    assert policy_file(tmp_path / "given.yaml") == tmp_path / "given.yaml"
    assert policy_file("~/p.yaml") == Path.home() / "p.yaml"


def test_a_missing_policy_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="regal-backup init"):
        load_policy(tmp_path / "nope.yaml")


def test_unknown_target_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"no target named 'orders' \(its targets: pos\)"):
        policy_from_dict(MINIMAL, tmp_path).target("orders")


def _setting_models(annotation: object, found: set[type[BaseModel]]) -> None:
    """Every settings model reachable from `annotation`: fields, unions of kinds, channels and backends."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if annotation not in found:
            found.add(annotation)
            for field in annotation.model_fields.values():
                _setting_models(field.annotation, found)
        return
    for argument in typing.get_args(annotation):
        _setting_models(argument, found)


def test_docs_policy_names_every_setting() -> None:
    """docs/policy.md says "every setting": each field of every settings model a policy can hold (every target
    kind's, alert channel's and repository backend's, found through their registries) is named there."""
    found: set[type[BaseModel]] = set()
    _setting_models(Policy, found)
    doc = (Path(__file__).parent.parent / "docs" / "policy.md").read_text()
    missing = [f"{model.__name__}.{field.alias or name}"
               for model in found for name, field in model.model_fields.items()
               if not field.exclude and not re.search(rf"\b{re.escape(field.alias or name)}\b", doc)]
    assert len(found) > 25
    assert not missing, f"docs/policy.md does not name these settings: {sorted(missing)}"
