"""A local file: alerts appended as JSON lines (mode 0600), for a log shipper or an on-host agent."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field

from .base import ChannelError, ChannelSettings, Notification


class FileChannel(ChannelSettings):
    """Alerts appended as JSON lines to a local file (mode 0600), for a log shipper or an on-host agent to
    pick up; the demo uses it."""

    kind: Literal["file"]
    path: str = Field(description="the file (relative to the policy file); created if missing")


CHANNEL = FileChannel


def send(channel: FileChannel, notification: Notification, resolve_path: Callable[[str], Any]) -> None:
    path = resolve_path(channel.path)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(descriptor, "a") as alerts_file:
            alerts_file.write(json.dumps(notification.payload, sort_keys=True) + "\n")
    except OSError as exc:
        raise ChannelError(f"alert file {path}: {exc.strerror}") from None
