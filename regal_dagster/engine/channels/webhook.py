"""A generic webhook: the notification's JSON payload POSTed to a URL (given, or from the environment)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, Literal

from pydantic import Field, model_validator

from ..settings import Duration
from .base import ChannelSettings, Notification, post_json, secret


class WebhookChannel(ChannelSettings):
    kind: Literal["webhook"]
    url: str | None = None
    url_env: str | None = Field(None, description="environment variable holding the URL, when it is a secret")
    timeout: Duration = timedelta(seconds=15)

    @model_validator(mode="after")
    def _one_url(self) -> WebhookChannel:
        if (self.url is None) == (self.url_env is None):
            raise ValueError("give exactly one of url or url_env")
        return self


CHANNEL = WebhookChannel


def send(channel: WebhookChannel, notification: Notification, resolve_path: Callable[[str], Any]) -> None:
    url = channel.url or secret(channel.url_env or "", "webhook URL")
    post_json(url, notification.payload, channel.timeout.total_seconds(), "webhook")
