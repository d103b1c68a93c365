"""`regal-backup init`: a policy file, a local repository and a new encrypted keyset, in one directory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from .crypto import create_keyset, generate_master_key, write_master_key_file
from .errors import RegalError
from .policy import Policy, load_policy
from .repository_format import initialize
from .storage import open_repository

POLICY_NAME = "regal_backup.yaml"
KEYSET_NAME = "keyset.json"
MASTER_KEY_NAME = "master.key"


@dataclass
class InitResult:
    policy_path: Path
    repository: str
    keyset_path: Path
    master_key_location: str  # a file path or "$VARIABLE"
    key_id: int


def init_project(directory: Path, postgres_dsn: str, *, master_key_env: str | None = None,
                 target_name: str = "main", redis_url: str | None = None) -> InitResult:
    """Write DIR/regal_backup.yaml with one postgres target, a repository under DIR/repository and a keyset.

    The master key goes to DIR/master.key (0600), or, with `master_key_env`, is read from that variable
    (which must already hold a key: `regal-backup master-key` prints a new one).
    """
    directory = directory.resolve()
    policy_path = directory / POLICY_NAME
    if policy_path.exists():
        raise RegalError(f"{policy_path} already exists", "choose another directory, or edit the existing policy")
    directory.mkdir(parents=True, exist_ok=True)
    if master_key_env:
        if not os.environ.get(master_key_env):
            raise RegalError(f"the environment variable {master_key_env} holds no master key",
                             f"export {master_key_env}=\"$(regal-backup master-key)\" and keep a copy in your secret store")
        master_key = {"env": master_key_env}
        location = f"${master_key_env}"
    else:
        key_path = directory / MASTER_KEY_NAME
        write_master_key_file(key_path, generate_master_key())
        master_key = {"file": MASTER_KEY_NAME}
        location = str(key_path)
    document = {
        "version": 1,
        "repository": {"url": "repository"},
        "encryption": {"keyset": KEYSET_NAME, "master_key": master_key},
        "targets": {target_name: {"kind": "postgres", "dsn": postgres_dsn},
                    **({"cache": {"kind": "redis", "url": redis_url}} if redis_url else {})},
        "rpo": "1h",
        "rto": "4h",
        "schedules": {
            "hourly": {"cron": "0 * * * *"},
            "daily": {"cron": "0 2 * * *"},
            "weekly": {"cron": "0 1 * * 0"},
            "monthly": {"cron": "0 1 * * 0", "first_in_month": True},
        },
        "retention": {"hourly": 48, "daily": 30, "weekly": 26, "monthly": 12},
    }
    header = ("# Regal Backup policy (docs/policy.md explains every setting).\n"
              "# Put passwords in the environment and write them here as ${VARIABLE}.\n")
    policy_path.write_text(header + yaml.safe_dump(document, sort_keys=False))
    policy: Policy = load_policy(policy_path)
    keyring = create_keyset(policy)
    repo = open_repository(policy)
    initialize(repo, keyring)
    return InitResult(policy_path, repo.location, policy.resolve_path(KEYSET_NAME), location, keyring.primary_key_id)
