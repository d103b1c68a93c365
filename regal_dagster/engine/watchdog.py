"""A watchdog for the watcher: when the Dagster daemon stops, every schedule, check and alert sensor stops with it,
silently. Two guards, both outside the daemon's own judgement:

- a dead man's switch: the `watchdog_heartbeat` sensor (and `regal-backup status --heartbeat URL`) pings a
  healthchecks.io-style URL every minute; the service alerts when the pings stop;
- `regal-backup status --alert`, run by cron or a systemd timer (docs/watchdog.md), reads the daemon's heartbeats and
  the alert sensor's newest evaluation from the Dagster instance (the face reads them: the engine never imports
  Dagster) and, when one is older than `monitoring.watchdog.silent_after`, raises "daemon silent" and the RPO alerts
  itself (engine/alerts.py `rpo_conditions`: the recoverability model) through the policy's channels. Its alert book
  lives in a file: each alert is sent once, reminded after `alerts.remind_after`, and resolved once the daemon is
  back (from then on the sensors alert).
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from .alerts import AlertBook, Condition, evaluate_and_notify, rpo_conditions
from .crypto import Keyring
from .errors import RegalError
from .policy import Policy
from .storage import Repository

FIRST_STEP = ("Start the Dagster daemon again (`systemctl start dagster-daemon`, or `dagster-daemon run` with the same "
              "DAGSTER_HOME) and read its log: until it runs, no backup schedule, check or alert sensor runs. "
              "`regal-backup status` shows the protection meanwhile; take backups by hand if an RPO is near.")


@dataclass
class DagsterLiveness:
    """What the Dagster instance says of its daemon (read by the face that can import Dagster)."""

    instance: str  # where: $DAGSTER_HOME
    heartbeats: dict[str, datetime | None]  # daemon type -> its newest heartbeat (None: never)
    sensor: str | None = None
    sensor_evaluated_at: datetime | None = None  # the sensor's newest tick
    sensor_known: bool = False  # the instance has a state for the sensor (it was ever started)

    def to_json(self) -> dict[str, Any]:
        return {"instance": self.instance,
                "heartbeats": {k: v.isoformat() if v else None for k, v in self.heartbeats.items()},
                "sensor": self.sensor,
                "sensor_evaluated_at": self.sensor_evaluated_at.isoformat() if self.sensor_evaluated_at else None}


@dataclass
class WatchdogResult:
    silent: list[str]  # what is silent, one line each (empty: the daemon runs)
    liveness: DagsterLiveness
    sent: list[dict[str, str]] = field(default_factory=list)  # status, key, what
    open: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"silent": self.silent, "dagster": self.liveness.to_json(), "sent": self.sent, "open": self.open,
                "failures": self.failures}


def _age(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    return f"{seconds // 60} min" if seconds >= 60 else f"{seconds} s"


def silence(policy: Policy, liveness: DagsterLiveness, now: datetime) -> list[str]:
    bound = policy.monitoring.watchdog.silent_after
    found = []
    for daemon, at in sorted(liveness.heartbeats.items()):
        if at is None:
            found.append(f"the {daemon} daemon has never sent a heartbeat")
        elif now - at > bound:
            found.append(f"the {daemon} daemon's newest heartbeat is {_age(now - at)} old (bound {_age(bound)})")
    evaluated = liveness.sensor_evaluated_at
    if liveness.sensor and liveness.sensor_known and (evaluated is None or now - evaluated > bound):
        found.append(f"the sensor {liveness.sensor} " + ("has never been evaluated" if evaluated is None else
                                                         f"was last evaluated {_age(now - evaluated)} ago"))
    return found


def daemon_silent_condition(policy: Policy, liveness: DagsterLiveness, silent: list[str]) -> Condition:
    known = [at for at in liveness.heartbeats.values() if at is not None]
    since = min(known) + policy.monitoring.watchdog.silent_after if known else None
    return Condition("watchdog:daemon_silent", "daemon_silent", "dagster",
                     "the Dagster daemon is silent: " + "; ".join(silent) + " (schedules, checks and alert sensors "
                     "are not running)", f"{policy.dagster.base_url.rstrip('/')}/health", FIRST_STEP, since,
                     {"dagster_home": liveness.instance, **liveness.to_json()["heartbeats"]})


def watch(policy: Policy, repo: Repository, keyring: Keyring, liveness: DagsterLiveness, now: datetime,
          state: Path) -> WatchdogResult:
    """One evaluation: while the daemon is silent, "daemon silent" and the RPO breaches are alerts of this book;
    once it is back they resolve. The book is read from and written back to `state`."""
    silent = silence(policy, liveness, now)
    conditions = []
    if silent:
        conditions = [daemon_silent_condition(policy, liveness, silent), *rpo_conditions(policy, repo, keyring, now)]
    book = load_book(state)
    before = {key: entry["condition"]["what"] for key, entry in book.open.items()}
    failures = evaluate_and_notify(policy, book, conditions, now)
    save_book(state, book)
    sent = [{"status": "alert", "key": key, "what": entry["condition"]["what"]} for key, entry in book.open.items()
            if key not in before]
    sent += [{"status": "resolved", "key": key, "what": what} for key, what in before.items() if key not in book.open]
    return WatchdogResult(silent, liveness, sent, sorted(book.open), failures)


def load_book(state: Path) -> AlertBook:
    try:
        return AlertBook.from_json(state.read_text())
    except FileNotFoundError:
        return AlertBook()
    except (OSError, ValueError) as exc:
        raise RegalError(f"cannot read the watchdog's state {state}: {exc}",
                         "fix or delete the file (an open alert is then sent again)") from None


def save_book(state: Path, book: AlertBook) -> None:
    """Atomically, readable only by this user (alert details name targets and backups)."""
    state.parent.mkdir(parents=True, exist_ok=True)
    partial = state.with_name(f".{state.name}.{os.getpid()}.tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(book.to_json())
    os.replace(partial, state)


def state_path(policy: Policy) -> Path:
    return policy.resolve_path(policy.monitoring.watchdog.state_file)


def heartbeat_url(policy: Policy) -> str | None:
    """The dead man's switch the policy names (None: none)."""
    watchdog = policy.monitoring.watchdog
    if watchdog.heartbeat_url_env:
        url = os.environ.get(watchdog.heartbeat_url_env)
        if not url:
            raise RegalError(f"the environment variable {watchdog.heartbeat_url_env} (the heartbeat URL) is not set",
                             "set it where the Dagster daemon and the code location run")
        return url
    return watchdog.heartbeat_url


def ping(url: str, timeout: float = 10.0) -> None:
    """One ping of a dead man's switch (a GET, as healthchecks.io and its peers take it); RegalError without the URL
    (it may carry a token)."""
    if not url.startswith(("http://", "https://")):
        raise RegalError("the heartbeat URL must start with http:// or https://", "give the URL your "
                         "healthchecks.io (or peer) check shows")
    request = urllib.request.Request(url, method="GET", headers={"User-Agent": "regal-backup"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        raise RegalError(f"the heartbeat URL answered HTTP {exc.code}", "check the URL of the check") from None
    except (OSError, urllib.error.URLError) as exc:
        raise RegalError(f"the heartbeat URL is unreachable: {getattr(exc, 'reason', exc)}",
                         "check the network path to the dead man's switch") from None
