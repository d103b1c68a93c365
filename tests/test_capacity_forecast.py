"""Storage capacity forecast: a generated history of backups (45 days, in an S3 repository on a
real moto server with a quota in the policy) is extrapolated at the last 30 days' growth, minus what the prunes
delete on their backups' retention dates (as `list` shows them); the capacity alert fires under the policy's
threshold, and status and the metrics show the forecast."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import boto3

from regal_dagster.engine.alerts import capacity_conditions
from regal_dagster.engine.backup import run_backup
from regal_dagster.engine.catalog import list_backups
from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.policy import load_policy
from regal_dagster.engine.storage import open_repository

from .conftest import DatabaseFactory, run_cli, write_policy_file


def test_the_repository_is_forecast_full_at_the_last_30_days_growth_and_alerts_under_the_threshold(
        system_pg: DatabaseFactory, tmp_path: Path, master_key: str, moto_endpoint: str) -> None:
    boto3.client("s3", region_name="us-east-1", endpoint_url=moto_endpoint).create_bucket(Bucket="regal-cap")
    repository = {"url": "s3://regal-cap/repo", "endpoint_url": moto_endpoint, "region": "us-east-1"}
    quota = 200_000
    policy_file = write_policy_file(tmp_path, {"pos": system_pg.create()}, repository,
                                    alerts={"capacity": {"s3_quota_bytes": quota, "min_days_until_full": 100_000}})
    policy = load_policy(policy_file)
    repo, keyring = open_repository(policy), load_keyring(policy)
    now = dt.datetime.now(dt.UTC)
    for days_ago in (45, 25, 15, 5):  # the history: three inside the window, one before it
        taken = run_backup(policy, "pos", "daily", repo=repo, keyring=keyring,
                           started_at=now - dt.timedelta(days=days_ago))
        if days_ago > 20:  # checked, so that retention dates its deletion (an unchecked backup is never pruned)
            assert run_cli(policy_file, "verify", taken.manifest.backup_id).returncode == 0

    manifests = list_backups(repo, keyring, "pos")[0]
    in_window = [m.stored_bytes for m in manifests if m.started_at >= now - dt.timedelta(days=30)]
    assert len(in_window) == 3
    used = repo.usage_bytes()
    # what the prunes will delete, as `list` dates it: freed from its date on (a date past: the next prune)
    listed = json.loads(run_cli(policy_file, "list", "pos", "--json").stdout)["backups"]
    sizes = {m.backup_id: m.stored_bytes for m in manifests}
    deletions = sorted((max(0.0, (dt.datetime.fromisoformat(b["retention"]["deletion_at"]) - now).total_seconds()
                            / 86400), sizes[b["backup_id"]]) for b in listed if b["retention"]["deletion_at"])
    assert deletions and deletions[0][0] < 30, listed  # the oldest daily is due: the steady state deletes it
    per_day, room = sum(in_window) / 30, quota - used
    for day, size in deletions:  # the growth against the room, the room growing by each deletion as it comes
        if per_day * day >= room:
            break
        room += size
    expected_days = room / per_day
    assert expected_days > (quota - used) / per_day

    [condition] = capacity_conditions(policy, repo, keyring, now)
    assert condition.key == "capacity" and "forecast to be full in" in condition.what
    assert abs(condition.details["days_until_full"] - expected_days) < 0.01 * expected_days
    assert condition.details["free_bytes"] == quota - used
    relaxed = policy.model_copy(update={"alerts": policy.alerts.model_copy(update={
        "capacity": policy.alerts.capacity.model_copy(update={"min_days_until_full": expected_days / 2})})})
    assert capacity_conditions(relaxed, repo, keyring, now) == []  # full later than the threshold: no alert

    status = json.loads(run_cli(policy_file, "status", "--json").stdout)
    room = status["capacity"]
    assert room["free_bytes"] == quota - used and room["capacity_bytes"] == quota and room["window_days"] == 30
    assert abs(room["days_until_full"] - expected_days) < 0.01 * expected_days + 0.01
    assert any(a["key"] == "capacity" for a in status["open_alerts"])
    assert "full in" in run_cli(policy_file, "status").stdout
    textfile = tmp_path / "regal.prom"
    assert run_cli(policy_file, "metrics", "--textfile", str(textfile)).returncode == 0
    days = next(float(line.split()[1]) for line in textfile.read_text().splitlines()
                if line.startswith("regal_backup_repository_days_until_full "))
    assert abs(days - expected_days) < 0.01 * expected_days + 0.01
