"""Where the policy file is: the one rule every face (CLI, Dagster, load_policy, the `wal push` client that
must start in a blink) finds it by. Standard library only."""

from __future__ import annotations

import os
from pathlib import Path

POLICY_ENV = "REGAL_POLICY"
DEFAULT_POLICY_FILE = "regal_backup.yaml"


def policy_file(path: str | os.PathLike[str] | None = None) -> Path:
    """The policy file: `path` (--policy), else $REGAL_POLICY, else ./regal_backup.yaml (`~` expanded)."""
    return Path(path or os.environ.get(POLICY_ENV) or DEFAULT_POLICY_FILE).expanduser()
