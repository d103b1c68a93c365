"""`regal-backup init`: a policy file, a local repository and a new encrypted keyset, in one directory."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from .crypto import create_keyset, generate_master_key, write_master_key_file
from .errors import UsageError
from .policy import Policy, load_policy, policy_from_dict
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
    warnings: list[str] = field(default_factory=list)


def init_project(directory: Path, postgres_dsn: str, *, master_key_env: str | None = None,
                 target_name: str = "main", redis_url: str | None = None) -> InitResult:
    """Write DIR/regal_backup.yaml with one postgres target, a repository under DIR/repository and a keyset.

    The master key goes to DIR/master.key (0600), or, with `master_key_env`, is read from that variable
    (which must already hold a key: `regal-backup master-key` prints a new one).
    """
    directory = directory.resolve()
    policy_path = directory / POLICY_NAME
    if policy_path.exists() or (directory / KEYSET_NAME).exists() or (directory / MASTER_KEY_NAME).exists():
        raise UsageError(f"{directory} already holds a Regal Backup setup",
                         "choose another directory, or edit the existing policy (nothing was changed)")
    if master_key_env and not os.environ.get(master_key_env):
        raise UsageError(f"the environment variable {master_key_env} holds no master key",
                         f"export {master_key_env}=\"$(regal-backup master-key)\" and keep a copy in your secret store")
    master_key = {"env": master_key_env} if master_key_env else {"file": MASTER_KEY_NAME}
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
    policy_from_dict(document, base_dir=directory, source=str(policy_path))  # every problem before any file
    warnings = literal_secrets(document)
    directory.mkdir(parents=True, exist_ok=True)
    if master_key_env:
        location = f"${master_key_env}"
    else:
        key_path = directory / MASTER_KEY_NAME
        write_master_key_file(key_path, generate_master_key())
        location = str(key_path)
    header = ("# Regal Backup policy (docs/policy.md explains every setting).\n"
              "# Put passwords in the environment and write them here as ${VARIABLE}.\n")
    fd = os.open(policy_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # it may name secrets' variables
    with os.fdopen(fd, "w") as f:
        f.write(header + yaml.safe_dump(document, sort_keys=False))
    policy: Policy = load_policy(policy_path)
    keyring = create_keyset(policy)
    repo = open_repository(policy)
    initialize(repo, keyring)
    return InitResult(policy_path, repo.location, policy.resolve_path(KEYSET_NAME), location, keyring.primary_key_id,
                      warnings)


def literal_secrets(document: dict[str, Any]) -> list[str]:
    """A warning for each password written into the policy itself instead of a ${VARIABLE}."""
    from psycopg.conninfo import conninfo_to_dict

    found = []
    for name, target in document.get("targets", {}).items():
        if target.get("kind") == "postgres":
            password = str(conninfo_to_dict(target["dsn"]).get("password") or "")
        else:
            password = urlsplit(str(target.get("url", ""))).password or ""
        if password and not password.startswith("${"):
            found.append(f"targets.{name} holds a literal password: anyone who can read the policy file can read "
                         f"it; write it as ${{VARIABLE}} and set the variable where backups run")
    return found
