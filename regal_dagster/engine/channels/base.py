"""What every alert channel shares: its settings' base, the message it delivers, its error, and the
helpers for secrets from the environment and JSON over HTTP."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from ..settings import Settings


class ChannelSettings(Settings):
    """One entry of `alerts.channels`; a channel's module subclasses it with `kind: Literal["<kind>"]`."""

    kind: str


class ChannelError(Exception):
    """Why one message could not be delivered on one channel (never with a secret in it)."""


@dataclass
class Notification:
    status: str  # alert | reminder | resolved
    condition: dict[str, Any]  # a Condition as JSON
    since: str
    at: str

    @property
    def subject(self) -> str:
        label = {"alert": "ALERT", "reminder": "STILL FAILING", "resolved": "RESOLVED"}[self.status]
        return f"[Regal Backup] {label}: {self.condition['what']}"

    @property
    def text(self) -> str:
        c = self.condition
        lines = [self.subject, "", f"What:    {c['what']}", f"Target:  {c['target']}", f"Since:   {self.since}"]
        if self.status == "resolved":
            lines.append(f"Cleared: {self.at}")
        lines.append(f"Link:    {c['link']}")
        if self.status != "resolved":
            lines += ["", f"First step: {c['first_step']}"]
        for name, value in c.get("details", {}).items():
            lines.append(f"{name}: {value}")
        return "\n".join(lines)

    @property
    def payload(self) -> dict[str, Any]:
        c = self.condition
        return {"source": "regal-backup", "status": self.status, "event": c["event"], "key": c["key"],
                "target": c["target"], "what": c["what"], "since": self.since, "at": self.at,
                "link": c["link"], "first_step": c["first_step"], "details": c.get("details", {})}


def secret(env: str, what: str) -> str:
    value = os.environ.get(env)
    if not value:
        raise ChannelError(f"the environment variable {env} ({what}) is not set")
    return value


def post_json(url: str, body: dict[str, Any], timeout: float, label: str) -> None:
    import urllib.error  # here: loading the policy does not load an HTTP client (and ssl)
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "regal-backup"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        raise ChannelError(f"{label} answered HTTP {exc.code}") from None
    except (OSError, urllib.error.URLError) as exc:
        raise ChannelError(f"{label} unreachable: {getattr(exc, 'reason', exc)}") from None
