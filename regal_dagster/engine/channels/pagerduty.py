"""PagerDuty Events API v2: an alert or a reminder triggers (PagerDuty keeps one incident per dedup key),
"resolved" resolves it. The routing key (a secret) comes from an environment variable."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, Literal

from pydantic import Field

from ..settings import Duration
from .base import ChannelSettings, Notification, post_json, secret


class PagerDutyChannel(ChannelSettings):
    """PagerDuty Events API v2: an alert triggers (or updates) an incident, "resolved" resolves it."""

    kind: Literal["pagerduty"]
    routing_key_env: str = Field(description="environment variable holding the integration's routing key "
                                             "(a secret)")
    events_url: str = Field("https://events.pagerduty.com/v2/enqueue",
                            description="the Events API v2 endpoint (change it only for a proxy or a test receiver)")
    severity: Literal["critical", "error", "warning", "info"] | None = Field(
        None, description="one severity for every alert (default: critical for a breached RPO, a failed backup, "
                          "a failed verification and damage; error for the rest; warning for capacity and keys)")
    timeout: Duration = timedelta(seconds=15)


CHANNEL = PagerDutyChannel

PAGERDUTY_SEVERITY = {"rpo_breach": "critical", "backup_failed": "critical", "verification_failed": "critical",
                      "damaged_backup": "critical", "document_refused": "critical", "capacity": "warning",
                      "key_cryptoperiod": "warning"}


def pagerduty_event(channel: PagerDutyChannel, routing_key: str, notification: Notification) -> dict[str, Any]:
    """The Events API v2 body: an alert or a reminder triggers (PagerDuty keeps one incident per dedup key),
    "resolved" resolves it."""
    c = notification.condition
    dedup_key = f"regal-backup:{c['key']}"
    if notification.status == "resolved":
        return {"routing_key": routing_key, "event_action": "resolve", "dedup_key": dedup_key}
    severity = channel.severity or PAGERDUTY_SEVERITY.get(c["event"], "error")
    return {
        "routing_key": routing_key, "event_action": "trigger", "dedup_key": dedup_key, "client": "regal-backup",
        "client_url": c["link"], "links": [{"href": c["link"], "text": "Open in Dagster"}],
        "payload": {"summary": notification.subject[:1024], "source": f"regal-backup/{c['target']}",
                    "severity": severity, "timestamp": notification.at, "component": c["target"],
                    "group": "backups", "class": c["event"],
                    "custom_details": {"what": c["what"], "since": notification.since,
                                       "first_step": c["first_step"], "status": notification.status,
                                       **c.get("details", {})}},
    }


def send(channel: PagerDutyChannel, notification: Notification, resolve_path: Callable[[str], Any]) -> None:
    body = pagerduty_event(channel, secret(channel.routing_key_env, "PagerDuty routing key"), notification)
    post_json(channel.events_url, body, channel.timeout.total_seconds(), "PagerDuty Events API")
