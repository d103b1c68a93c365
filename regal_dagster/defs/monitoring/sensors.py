"""Monitoring sensors, on by default, that launch no run and touch no backup:

- `cloudwatch_metrics` publishes the metrics (engine/cloudwatch.py) every `monitoring.cloudwatch.every`; a throttled
  or unreachable CloudWatch is logged and tried again at the next evaluation;
- `watchdog_heartbeat` pings the policy's dead man's switch every minute (engine/watchdog.py): when the daemon
  stops, the pings stop, and the switch's service alerts."""

from __future__ import annotations

from dagster import DefaultSensorStatus, SensorDefinition, SensorEvaluationContext, SkipReason, sensor

from ...engine.cloudwatch import publish_repository
from ...engine.errors import RegalError
from ...engine.policy import Policy
from ...engine.watchdog import heartbeat_url, ping
from ..resources import RegalEngine


def _cloudwatch_sensor(every_seconds: int) -> SensorDefinition:
    @sensor(name="cloudwatch_metrics", minimum_interval_seconds=every_seconds,
            default_status=DefaultSensorStatus.RUNNING,
            description="Publishes the Prometheus metrics to CloudWatch (PutMetricData), for the alarms of "
                        "docs/cloudwatch-alarms.json.")
    def _sensor(context: SensorEvaluationContext, regal: RegalEngine) -> SkipReason:
        try:
            published = publish_repository(regal.policy(), regal.repository(), regal.keyring())
        except RegalError as exc:
            context.log.warning(f"CloudWatch publication failed (tried again next time): {exc.message}")
            return SkipReason(f"not published: {exc.message}")
        return SkipReason(f"published {published.data_points} data points to {published.namespace} "
                          f"({published.throttled} throttled calls retried)")

    return _sensor


@sensor(name="watchdog_heartbeat", minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING,
        description="Pings the dead man's switch of monitoring.watchdog (healthchecks.io style) every minute: when "
                    "the Dagster daemon stops, the pings stop and that service alerts.")
def watchdog_heartbeat(context: SensorEvaluationContext, regal: RegalEngine) -> SkipReason:
    try:
        url = heartbeat_url(regal.policy())
        if url is None:
            return SkipReason("no heartbeat URL in the policy")
        ping(url)
    except RegalError as exc:
        context.log.warning(f"heartbeat not sent: {exc.message}")
        return SkipReason(f"heartbeat not sent: {exc.message}")
    return SkipReason("heartbeat sent")


def build_monitoring_sensors(policy: Policy) -> list[SensorDefinition]:
    sensors = []
    watchdog = policy.monitoring.watchdog
    if watchdog.heartbeat_url or watchdog.heartbeat_url_env:
        sensors.append(watchdog_heartbeat)
    if (cloudwatch := policy.monitoring.cloudwatch) is not None:
        sensors.append(_cloudwatch_sensor(max(60, int(cloudwatch.every.total_seconds()))))
    return sensors
