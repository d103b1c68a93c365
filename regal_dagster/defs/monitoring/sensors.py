"""The CloudWatch publisher: a sensor, on by default, that publishes the metrics (engine/cloudwatch.py) every
`monitoring.cloudwatch.every`. It launches no run and touches no backup: a throttled or unreachable CloudWatch is
logged and tried again at the next evaluation."""

from __future__ import annotations

from dagster import DefaultSensorStatus, SensorDefinition, SensorEvaluationContext, SkipReason, sensor

from ...engine.cloudwatch import publish_repository
from ...engine.errors import RegalError
from ...engine.policy import Policy
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


def build_monitoring_sensors(policy: Policy) -> list[SensorDefinition]:
    sensors = []
    if (cloudwatch := policy.monitoring.cloudwatch) is not None:
        sensors.append(_cloudwatch_sensor(max(60, int(cloudwatch.every.total_seconds()))))
    return sensors
