"""`regal-backup init`: a policy file (mode 0600), a local repository, a new encrypted keyset and the audit
trail, in one directory.

The audit trail is on by default, so that everything from the first backup on is in the reports: its own
database on the target's server (`<database>_audit`), created here when the server can be reached, or
the one `audit_dsn` names. Without it (`audit=False`) nothing is recorded until `audit.dsn` is added."""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .crypto import Keyring, create_keyset, generate_master_key, write_master_key_file
from .errors import RegalError, UsageError
from .policy import Policy, load_policy, policy_from_dict
from .repository_format import initialize
from .settings import TargetSettings
from .storage import Repository, open_repository

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
    audit: str | None = None  # where the audit trail is (host:port/dbname as user), None: no audit trail
    audit_problem: str | None = None  # why it could not be set up now (events wait in the repository's spool)


def audit_dsn_for(postgres_dsn: str) -> str:
    """The DSN of `<database>_audit` on the target's server, in the form the target's DSN has (a URI stays a
    URI; ${VAR} references stay as they are)."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    if postgres_dsn.startswith(("postgresql://", "postgres://")):
        parts = urllib.parse.urlsplit(postgres_dsn)
        database = urllib.parse.unquote(parts.path.lstrip("/")) or urllib.parse.unquote(
            parts.username or "") or "postgres"
        return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(_audit_name(database))))
    params = conninfo_to_dict(postgres_dsn)
    database = str(params.get("dbname") or params.get("user") or "postgres")
    return make_conninfo(postgres_dsn, dbname=_audit_name(database))


def _audit_name(database: str) -> str:
    return f"{database[:57]}_audit"  # PostgreSQL names are at most 63 bytes


def create_audit_database(audit_dsn: str) -> None:
    """Create the audit database when it does not exist (connecting to the server's `postgres` database)."""
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict

    from .postgresql.connection import connect, with_dbname
    from .settings import fill_environment

    dsn = fill_environment(audit_dsn, "audit.dsn")
    name = str(conninfo_to_dict(dsn)["dbname"])
    with connect(with_dbname(dsn, "postgres"), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


CLUSTER_TARGET = "cluster"


def init_project(directory: Path, postgres_dsn: str | None, *, master_key_env: str | None = None,
                 target_name: str = "main", redis_url: str | None = None, audit: bool = True,
                 audit_dsn: str | None = None, cluster_dsn: str | None = None) -> InitResult:
    """Write DIR/regal_backup.yaml with one postgres target (and/or, with `cluster_dsn`, a postgres_cluster
    target named `cluster`: the whole server, backed up physically for point-in-time recovery), a repository
    under DIR/repository and a keyset.

    The master key goes to DIR/master.key (0600), or, with `master_key_env`, is read from that variable
    (which must already hold a key: `regal-backup master-key` prints a new one).
    """
    if not postgres_dsn and not cluster_dsn:
        raise UsageError("say what to back up", "give --postgres-dsn (one database, logically), --cluster-dsn (the "
                                                "whole server, physically, for point-in-time recovery), or both")
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
        "targets": {**({target_name: {"kind": "postgres", "dsn": postgres_dsn}} if postgres_dsn else {}),
                    **({CLUSTER_TARGET: {"kind": "postgres_cluster", "dsn": cluster_dsn, "slot": "regal_backup"}}
                       if cluster_dsn else {}),
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
    checked = policy_from_dict(document, base_dir=directory, source=str(policy_path))  # every problem before any file
    written_audit_dsn = None
    if audit:  # derived from the target's DSN once that one is known to be well-formed
        written_audit_dsn = audit_dsn or audit_dsn_for(str(postgres_dsn or cluster_dsn))
        document["audit"] = {"dsn": written_audit_dsn}
        policy_from_dict(document, base_dir=directory, source=str(policy_path))
    warnings = literal_secrets(checked.targets, written_audit_dsn)
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
    made = InitResult(policy_path, repo.location, policy.resolve_path(KEYSET_NAME), location, keyring.primary_key_id,
                      warnings)
    if policy.audit is not None:
        made.audit, made.audit_problem = _start_audit_trail(policy, repo, keyring)
    return made


def _start_audit_trail(policy: Policy, repo: Repository, keyring: Keyring) -> tuple[str, str | None]:
    """Create the audit database and its schema, and record the repository's creation as the first event.
    A server that cannot be reached now is not fatal: the events wait in the repository's spool."""
    from .audit import AuditTrail
    from .postgresql.connection import describe_dsn

    assert policy.audit is not None
    where = describe_dsn(policy.audit.dsn)
    try:
        create_audit_database(policy.audit.dsn)
        trail = AuditTrail(policy, repo, keyring)
        trail.ensure_schema()
        trail.append("repository_created", repo.location, "success", {"key_id": keyring.primary_key_id})
    except RegalError as exc:
        return where, exc.message
    return where, None


def literal_secrets(targets: Mapping[str, TargetSettings], audit_dsn: str | None = None) -> list[str]:
    """A warning for each password written into the policy itself instead of a ${VARIABLE}: the targets' and
    the audit trail's DSN's."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    written = {f"targets.{name}": target.written_password() for name, target in targets.items()}
    if audit_dsn:
        try:
            written["audit.dsn"] = str(conninfo_to_dict(audit_dsn).get("password") or "")
        except ProgrammingError:  # the policy's check says what is wrong with it
            pass
    return [f"{setting} holds a literal password: anyone who can read the policy file can read it; write it as "
            f"${{VARIABLE}} and set the variable where backups run"
            for setting, password in written.items() if password and not password.startswith("${")]
