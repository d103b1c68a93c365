"""The policy's `monitoring:` section: CloudWatch publication and the watchdog of the Dagster daemon (Sentry is an
alert channel: engine/channels/sentry.py). No secret is ever written here: AWS credentials come from boto3's chain,
a heartbeat URL that carries a token from an environment variable."""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field, field_validator

from .settings import Duration, Settings


class CloudWatchConfig(Settings):
    namespace: str = Field("RegalBackup", min_length=1, max_length=255,
                           description="the CloudWatch namespace the metrics are published in")
    region: str | None = Field(None, description="AWS region (default: boto3's: AWS_REGION, the profile)")
    endpoint_url: str | None = Field(None, description="another CloudWatch endpoint (a VPC endpoint, a test server)")
    dimensions: dict[str, str] = Field(default_factory=dict, description="dimensions added to every metric "
                                       "(e.g. Environment: prod); Target, RetentionClass and Event are ours")
    every: Duration = Field(timedelta(minutes=5), description="how often the Dagster sensor publishes")
    max_attempts: int = Field(5, ge=1, le=10, description="tries of one PutMetricData when throttled (backoff)")

    @field_validator("dimensions")
    @classmethod
    def _few_dimensions(cls, dimensions: dict[str, str]) -> dict[str, str]:
        if len(dimensions) > 27:  # CloudWatch takes 30 per metric; ours are up to 3
            raise ValueError("at most 27 dimensions")
        for name, value in dimensions.items():
            if name in ("Target", "RetentionClass", "Event"):
                raise ValueError(f"'{name}' is a dimension regal-backup sets itself")
            if not name or not value:
                raise ValueError("dimension names and values must not be empty")
        return dimensions


class WatchdogConfig(Settings):
    """`regal-backup status --alert` (a cron job or systemd timer outside Dagster) alerts when Dagster is silent."""

    silent_after: Duration = Field(timedelta(minutes=5), description="the daemon is silent when its newest "
                                   "heartbeat, or the sensor's newest evaluation, is older than this")
    daemons: list[str] = Field(default_factory=lambda: ["SENSOR", "SCHEDULER"],
                               description="the Dagster daemons whose heartbeats are watched")
    sensor: str | None = Field("rpo_watch", description="the sensor whose newest evaluation is watched (null: "
                               "the daemons' heartbeats only)")
    state_file: str = Field(".regal-watchdog.json", description="what `status --alert` has told (relative to "
                            "the policy file): each alert is sent once and resolved once")
    heartbeat_url: str | None = Field(None, description="a dead man's switch (healthchecks.io style) the "
                                      "`watchdog_heartbeat` sensor pings every minute")
    heartbeat_url_env: str | None = Field(None, description="the same, from an environment variable (a URL that "
                                          "carries a token)")


class MonitoringConfig(Settings):
    cloudwatch: CloudWatchConfig | None = None
    watchdog: WatchdogConfig = WatchdogConfig()
