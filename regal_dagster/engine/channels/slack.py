"""Slack: an incoming webhook, whose URL (a secret) comes from an environment variable."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, Literal

from pydantic import Field

from ..settings import Duration
from .base import ChannelSettings, Notification, post_json, secret


class SlackChannel(ChannelSettings):
    kind: Literal["slack"]
    webhook_url_env: str = Field(description="environment variable holding the incoming-webhook URL (a secret)")
    timeout: Duration = timedelta(seconds=15)


CHANNEL = SlackChannel


def send(channel: SlackChannel, notification: Notification, resolve_path: Callable[[str], Any]) -> None:
    post_json(secret(channel.webhook_url_env, "Slack webhook URL"), {"text": notification.text},
              channel.timeout.total_seconds(), "Slack webhook")
