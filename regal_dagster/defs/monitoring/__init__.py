"""Monitoring beyond the alert channels: CloudWatch publication (when the policy has monitoring.cloudwatch)."""

from __future__ import annotations

from dagster import Definitions

from ...engine.policy import Policy
from .sensors import build_monitoring_sensors


def monitoring_definitions(policy: Policy) -> Definitions:
    return Definitions(sensors=build_monitoring_sensors(policy))
