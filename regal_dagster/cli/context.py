"""What the commands start from: the policy (or its off-site stand-in), the repository once its marker
authenticates, the keys; times and paths from the command line."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

from ..engine.crypto import Keyring, load_keyring
from ..engine.errors import UsageError
from ..engine.policy import Policy, load_policy, policy_file
from ..engine.repository_format import open_repository_format
from ..engine.storage import Repository, open_repository


def utc_time(text: str, option: str) -> datetime:
    """An ISO 8601 time from the command line, in UTC (a time without an offset is UTC)."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{option} {text!r} is not a time", "write it as ISO 8601, e.g. 2026-11-24T02:00:00 "
                                                             "(UTC unless it says +HH:MM)") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def open_repository_of(args: argparse.Namespace) -> tuple[Policy, Repository, Keyring]:
    """The policy, its repository (once its marker authenticates) and the keys: what every command that reads
    or writes the repository starts from."""
    policy = load_policy_of(args)
    repo, keyring = open_repository(policy), load_keyring(policy)
    open_repository_format(repo, keyring)
    return policy, repo, keyring


def load_policy_of(args: argparse.Namespace) -> Policy:
    """The policy; with --from-offsite, the off-site copy stands in for the repository (the primary site is lost)."""
    policy = load_policy(args.policy)
    if getattr(args, "from_offsite", False):
        if policy.offsite is None:
            raise UsageError("the policy has no off-site repository", "drop --from-offsite, or add `offsite:`")
        policy = policy.model_copy(update={"repository": policy.offsite, "offsite": None})
    return policy


def policy_path(args: argparse.Namespace) -> Path:
    """The policy file as load_policy finds it (--policy, $REGAL_POLICY, ./regal_backup.yaml), absolute."""
    return policy_file(args.policy).resolve()


def stop_on_signals(doing: str) -> threading.Event:
    """For a command that runs until stopped (`wal stream`, `wal daemon`): an event SIGTERM and SIGINT set, after
    saying on stderr that it is `doing` that first."""
    stop = threading.Event()

    def stopping(signum: int, _frame: object) -> None:
        print(f"{signal.Signals(signum).name}: {doing}, then stopping", file=sys.stderr, flush=True)
        stop.set()

    signal.signal(signal.SIGTERM, stopping)
    signal.signal(signal.SIGINT, stopping)
    return stop
