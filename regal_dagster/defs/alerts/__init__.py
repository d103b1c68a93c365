"""Alerts in Dagster: the RPO watch, and alerts for failed runs, failed checks, failed restore tests and
capacity, through the policy's channels (open-source Dagster shows freshness but sends nothing)."""

from __future__ import annotations

from dagster import Definitions

from ...engine.policy import Policy
from .sensors import build_alert_sensors


def alert_definitions(policy: Policy) -> Definitions:
    return Definitions(sensors=build_alert_sensors(policy))
