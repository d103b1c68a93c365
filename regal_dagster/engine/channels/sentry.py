"""Sentry: failures (a backup, a check, a restore test, a drill, a CLI command) as Sentry events, through
`sentry-sdk`.

The policy names the environment variable holding the DSN (`dsn_env`), never the DSN. Each new alert becomes one
event (reminders and "resolved" do not: Sentry groups and resolves issues itself), grouped by the condition's key,
tagged with the target, the backup id and the event; `regal-backup` reports a failed command (cli/monitoring.py)
the same way. No secret leaves in an event: every string is scrubbed of the values of the environment variables
that hold secrets (the policy's, and any named like a key, password, token, secret or DSN), of passwords in URLs
and libpq DSNs, and of the DSN itself; no local variables, request data, breadcrumbs or default integrations.
Events leave from sentry-sdk's background thread: an unreachable Sentry never slows or fails a backup, and is
logged once per process.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import traceback
from collections.abc import Callable, Iterable
from typing import Any, Literal

from pydantic import Field

from .base import ChannelSettings, Notification, secret

log = logging.getLogger("regal_backup.sentry")

SECRET_NAME = re.compile(r"KEY|SECRET|PASSW|TOKEN|DSN|CREDENTIAL|PGPASS|AUTH", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*:)[^@\s/]+@")
_KEY_VALUE = re.compile(r"(?P<head>\b(?:password|passwd|pwd|secret|token|sslpassword)\s*[=:]\s*)('[^']*'|\S+)",
                        re.IGNORECASE)
FILTERED = "[Filtered]"
WARNING_EVENTS = {"capacity", "key_cryptoperiod", "daemon_silent"}


class SentryChannel(ChannelSettings):
    kind: Literal["sentry"]
    dsn_env: str = Field(description="environment variable holding the Sentry DSN (the policy never holds it)")
    environment: str | None = Field(None, description="Sentry's environment (e.g. production)")
    flush_timeout: float = Field(2.0, gt=0, le=30, description="seconds a CLI command waits at its end for its "
                                 "events to leave")


CHANNEL = SentryChannel


def secret_values(names: Iterable[str] = ()) -> list[str]:
    """The values a Sentry event must never carry: of the named variables and of every variable named like a
    secret (longest first, so that a secret holding another is filtered whole)."""
    found = {os.environ.get(n, "") for n in names}
    found |= {value for name, value in os.environ.items() if SECRET_NAME.search(name)}
    return sorted((v for v in found if len(v) >= 4), key=len, reverse=True)


def scrub_text(text: str, secrets: list[str]) -> str:
    for value in secrets:
        text = text.replace(value, FILTERED)
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + FILTERED + "@", text)
    return _KEY_VALUE.sub(lambda m: m.group("head") + FILTERED, text)


def scrub(value: Any, secrets: list[str]) -> Any:
    """`value` (an event, or part of one) with every secret filtered out."""
    if isinstance(value, str):
        return scrub_text(value, secrets)
    if isinstance(value, dict):
        return {k: FILTERED if isinstance(k, str) and SECRET_NAME.search(k) and isinstance(v, str) and v
                else scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v, secrets) for v in value]
    return value


def _release() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("regal-backup")
    except PackageNotFoundError:
        return "unknown"


_clients: dict[tuple[str, str | None], Any] = {}  # one sentry-sdk client (and its sending thread) per DSN
_lock = threading.Lock()


def client(channel: SentryChannel, secret_names: Iterable[str] = ()) -> Any:
    """This process's sentry-sdk client for the channel's DSN (ChannelError when its variable is not set)."""
    dsn = secret(channel.dsn_env, "Sentry DSN")
    names = {channel.dsn_env, *secret_names}
    with _lock:
        if (found := _clients.get((dsn, channel.environment))) is not None:
            return found
        import sentry_sdk
        from sentry_sdk.transport import HttpTransport

        sdk_log = logging.getLogger("sentry_sdk.errors")  # its own failures: our one warning says them
        sdk_log.propagate = False
        sdk_log.addHandler(logging.NullHandler())

        class LoggedOnce(HttpTransport):
            told = False

            def on_dropped_event(self, reason: str) -> None:
                if not LoggedOnce.told:
                    LoggedOnce.told = True
                    log.warning("Sentry could not be reached (%s): its events are dropped; backups are not "
                                "affected. Check the DSN in $%s and the network path to Sentry", reason,
                                channel.dsn_env)

        def before_send(event: Any, _hint: dict[str, Any]) -> Any:
            return scrub(event, secret_values(names))

        found = sentry_sdk.Client(
            dsn=dsn, environment=channel.environment, release=f"regal-backup@{_release()}", transport=LoggedOnce,
            default_integrations=False, auto_enabling_integrations=False, max_breadcrumbs=0, attach_stacktrace=False,
            data_collection={"user_info": False, "stack_frame_variables": False, "frame_context_lines": 0,
                             "http_bodies": [], "database_query_data": False},
            before_send=before_send, shutdown_timeout=2, send_client_reports=False)
        _clients[(dsn, channel.environment)] = found
        return found


def capture(channel: SentryChannel, message: str, tags: dict[str, str], *, level: str = "error",
            fingerprint: list[str] | None = None, extra: dict[str, Any] | None = None,
            error: BaseException | None = None, secret_names: Iterable[str] = ()) -> str | None:
    """Queue one event (its id); a failure to send is sentry-sdk's thread's, logged once."""
    sentry = client(channel, secret_names)
    event: dict[str, Any] = {"message": message, "level": level, "tags": {k: v for k, v in tags.items() if v},
                             "extra": extra or {}, "fingerprint": fingerprint or ["{{ default }}"]}
    if error is not None:  # where it happened (files, functions, lines), never the values in the frames
        frames = [{"filename": f.filename, "function": f.name, "lineno": f.lineno, "in_app": "regal_dagster" in
                   f.filename} for f in traceback.extract_tb(error.__traceback__)]
        event["exception"] = {"values": [{"type": type(error).__name__, "module": type(error).__module__,
                                          "value": str(error), "stacktrace": {"frames": frames}}]}
    event_id: str | None = sentry.capture_event(event)
    return event_id


def flush(channel: SentryChannel) -> None:
    """Wait (at most the channel's flush_timeout) for queued events to leave: at the end of a CLI command."""
    dsn = os.environ.get(channel.dsn_env)
    if dsn and (found := _clients.get((dsn, channel.environment))) is not None:
        found.flush(timeout=channel.flush_timeout)


def send(channel: SentryChannel, notification: Notification, resolve_path: Callable[[str], Any]) -> None:
    if notification.status != "alert":
        return  # Sentry groups repeats and resolves issues itself
    c = notification.condition
    details = c.get("details", {})
    backup = details.get("backup") or details.get("newest_good_backup") or details.get("backup_id") or ""
    capture(channel, c["what"], {"target": c["target"], "backup_id": str(backup), "event": c["event"],
                                 "dagster_run_id": str(details.get("run_id") or ""), "source": "regal-backup"},
            level="warning" if c["event"] in WARNING_EVENTS else "error", fingerprint=["regal-backup", c["key"]],
            extra={"key": c["key"], "since": notification.since, "link": c["link"], "first_step": c["first_step"],
                   "details": details})
