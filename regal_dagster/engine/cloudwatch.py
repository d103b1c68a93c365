"""CloudWatch: the Prometheus metrics (engine/metrics.py), published with PutMetricData.

Nothing is computed twice: the data points are the metric families `metrics.families` builds from one reading of
the repository (engine/status.py, which reads the recoverability model), renamed for CloudWatch (`PUBLISHED`), a
Unix time turned into an age at the reading's time. The labels target, retention_class and event become the
dimensions Target, RetentionClass and Event, with the policy's own (`monitoring.cloudwatch.dimensions`) added to
every metric. Credentials come from boto3's chain (environment, profile, instance or task role); the policy holds
none. A throttled call is retried with exponential backoff, then given up: publication runs beside the backups (a
sensor, a CLI command), never in their way. docs/cloudwatch-alarms.json holds alarms on these metrics matching the
alert conditions (engine/alerts.py).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .crypto import Keyring
from .errors import RegalError, UsageError
from .metrics import Family, families
from .monitoring_config import CloudWatchConfig
from .policy import Policy
from .status import repository_status
from .storage import Repository

log = logging.getLogger("regal_backup.cloudwatch")

# Prometheus family -> (CloudWatch metric, unit, a Unix time published as its age in seconds)
PUBLISHED: dict[str, tuple[str, str, bool]] = {
    "last_success_timestamp_seconds": ("LastSuccessAgeSeconds", "Seconds", True),
    "last_success_duration_seconds": ("BackupDurationSeconds", "Seconds", False),
    "last_success_stored_bytes": ("BackupStoredBytes", "Bytes", False),
    "last_success_read_bytes": ("BackupReadBytes", "Bytes", False),
    "rpo_age_seconds": ("RpoAgeSeconds", "Seconds", False),
    "rpo_breached": ("RpoBreached", "Count", False),
    "recoverable": ("Recoverable", "Count", False),
    "last_verification_timestamp_seconds": ("LastVerificationAgeSeconds", "Seconds", True),
    "last_verification_success": ("LastVerificationSuccess", "Count", False),
    "last_restore_test_timestamp_seconds": ("LastRestoreTestAgeSeconds", "Seconds", True),
    "last_restore_test_success": ("LastRestoreTestSuccess", "Count", False),
    "restore_test_rto_seconds": ("RestoreTestRtoSeconds", "Seconds", False),
    "last_drill_success": ("LastDrillSuccess", "Count", False),
    "wal_lag_bytes": ("WalLagBytes", "Bytes", False),
    "wal_lag_seconds": ("WalLagSeconds", "Seconds", False),
    "wal_gaps": ("WalGaps", "Count", False),
    "wal_stream_up": ("WalStreamUp", "Count", False),
    "target_stored_bytes": ("TargetStoredBytes", "Bytes", False),
    "repository_bytes": ("RepositoryBytes", "Bytes", False),
    "repository_free_bytes": ("RepositoryFreeBytes", "Bytes", False),
    "repository_growth_bytes_per_day": ("RepositoryGrowthBytesPerDay", "Bytes", False),
    "repository_days_until_full": ("RepositoryDaysUntilFull", "None", False),
    "damaged_backups": ("DamagedBackups", "Count", False),
    "open_alerts": ("OpenAlerts", "Count", False),
}
DIMENSIONS = {"target": "Target", "retention_class": "RetentionClass", "event": "Event"}
THROTTLED = {"Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException",
             "ServiceUnavailable", "InternalFailure"}
BATCH = 150  # data points per PutMetricData (CloudWatch takes up to 1000 and 1 MB)


def metric_names() -> set[str]:
    """Every CloudWatch metric regal-backup publishes (the alarms in docs/ must name one of these)."""
    return {name for name, _unit, _age in PUBLISHED.values()}


def datums(families: list[Family], at: datetime, extra: dict[str, str]) -> list[dict[str, Any]]:
    """The CloudWatch data points of the families (non-finite values, such as an age of +Inf for a target with
    nothing recoverable, are left out: RpoBreached says it)."""
    found = []
    for family in families:
        if family.name not in PUBLISHED:
            continue
        name, unit, as_age = PUBLISHED[family.name]
        for labels, value in family.samples:
            if as_age:
                value = max(0.0, at.timestamp() - value)
            if not math.isfinite(value):
                continue
            dimensions = [{"Name": DIMENSIONS[k], "Value": v} for k, v in labels.items() if k in DIMENSIONS]
            dimensions += [{"Name": k, "Value": v} for k, v in sorted(extra.items())]
            found.append({"MetricName": name, "Dimensions": dimensions, "Timestamp": at, "Value": float(value),
                          "Unit": unit})
    return found


@dataclass
class Publication:
    namespace: str
    data_points: int
    calls: int
    throttled: int  # calls retried after a throttling answer

    def to_json(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "data_points": self.data_points, "calls": self.calls,
                "throttled": self.throttled}


def client(config: CloudWatchConfig) -> Any:
    """A CloudWatch client from boto3's credential chain; botocore's own retries off (ours back off)."""
    import boto3
    from botocore.config import Config

    return boto3.client("cloudwatch", region_name=config.region, endpoint_url=config.endpoint_url,
                        config=Config(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=5,
                                      read_timeout=15))


def publish(config: CloudWatchConfig, families: list[Family], at: datetime, *, cloudwatch: Any = None,
            sleep: Callable[[float], None] = time.sleep) -> Publication:
    """Publish the families; RegalError (saying what to do) when CloudWatch cannot be reached or refuses."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError

    points = datums(families, at, config.dimensions)
    try:
        cloudwatch = cloudwatch or client(config)
    except NoRegionError:
        raise RegalError("CloudWatch: no AWS region", "set monitoring.cloudwatch.region in the policy, or "
                         "AWS_REGION") from None
    calls = throttled = 0
    for start in range(0, len(points), BATCH):
        batch = points[start:start + BATCH]
        for attempt in range(1, config.max_attempts + 1):
            calls += 1
            try:
                cloudwatch.put_metric_data(Namespace=config.namespace, MetricData=batch)
                break
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code not in THROTTLED or attempt == config.max_attempts:
                    raise RegalError(f"CloudWatch refused the metrics: {code or exc}",
                                     "check the role's cloudwatch:PutMetricData permission, the region and the "
                                     "namespace" if code not in THROTTLED else
                                     f"still throttled after {attempt} tries: the next publication tries "
                                     "again") from None
                throttled += 1
                delay = min(8.0, 0.25 * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
                log.warning("CloudWatch throttled PutMetricData (%s); retrying in %.1f s", code, delay)
                sleep(delay)
            except NoCredentialsError:
                raise RegalError("CloudWatch: no AWS credentials", "give this process AWS credentials the "
                                 "usual way (an instance or task role, a profile, AWS_ACCESS_KEY_ID)") from None
            except BotoCoreError as exc:
                raise RegalError(f"CloudWatch unreachable: {exc}", "check the network path to CloudWatch, or "
                                 "monitoring.cloudwatch.endpoint_url") from None
    return Publication(config.namespace, len(points), calls, throttled)


def publish_repository(policy: Policy, repo: Repository, keyring: Keyring, **options: Any) -> Publication:
    """Read the repository once (as a Prometheus scrape does) and publish what it says."""
    config = policy.monitoring.cloudwatch
    if config is None:
        raise UsageError("the policy has no monitoring.cloudwatch section",
                         "add `monitoring: {cloudwatch: {namespace: RegalBackup, region: eu-west-1}}` (docs/policy.md)")
    started = time.monotonic()
    status = repository_status(policy, repo, keyring, datetime.now(UTC))
    return publish(config, families(status, time.monotonic() - started), status.at, **options)
