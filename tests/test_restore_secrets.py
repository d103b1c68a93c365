"""Passwords never on a command line: `restore --to` takes one as ${VAR} (as the policy does) or from
PGPASSWORD, and every client program of the restore gets it in its environment, never in its argv (which
every local user can read in /proc/PID/cmdline); `init` warns about a literal password in `--audit-dsn` as
it does about a target's."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

from .conftest import DatabaseFactory, invoke_cli, run_cli, write_policy_file


class _Children:
    """Every child process started through subprocess.Popen: its argv and environment."""

    def __init__(self) -> None:
        self.started: list[tuple[list[str], dict[str, str]]] = []

    def restoring_passwords(self) -> set[str | None]:
        """PGPASSWORD of each pg_restore that loads a database (not `--list`, `--version`)."""
        return {env.get("PGPASSWORD") for argv, env in self.started
                if Path(argv[0]).name == "pg_restore" and any(a.startswith("--dbname=") for a in argv)}


@pytest.fixture
def children(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Children]:
    seen = _Children()
    real = subprocess.Popen

    class Recording(real):  # type: ignore[misc, valid-type]
        def __init__(self, args: Any, *rest: Any, **kwargs: Any) -> None:
            argv = [os.fsdecode(a) for a in ([args] if isinstance(args, str | bytes) else args)]
            env = kwargs.get("env")
            seen.started.append((argv, dict(os.environ if env is None else env)))
            super().__init__(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", Recording)
    yield seen


def _scratch_dsn(cluster: Any, dbname: str, password: str) -> str:
    """A DSN of the embedded test server (scram-sha-256 on its private socket) with `password` as written."""
    assert cluster.password, "the embedded test server must ask for a password"
    where = f"?host={quote(str(cluster.socket_dir), safe='')}&port={cluster.port}"
    return f"postgresql://postgres{':' + password if password else ''}@/{dbname}{where}"


def test_restore_to_takes_its_password_from_the_environment_never_from_argv(
        system_pg: DatabaseFactory, embedded_pg: DatabaseFactory, embedded_cluster: Any, children: _Children,
        tmp_path: Path, master_key: str) -> None:
    source = system_pg.create()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, note text); INSERT INTO t SELECT g, 'n' || g "
                     "FROM generate_series(1, 50) g")
    policy = write_policy_file(tmp_path, {"pos": source})
    made = run_cli(policy, "backup", "pos", "--json")
    assert made.returncode == 0, made.stderr
    password = embedded_cluster.password

    # ${VAR} in --to, filled from the environment: the password is on no command line
    wanted = embedded_pg.new_name("regal_secret_var")
    to = _scratch_dsn(embedded_cluster, wanted, "${RESTORE_PW}")
    done = invoke_cli(["restore", "pos", "--latest", "--to", to, "--policy", str(policy)],
                      env={**os.environ, "RESTORE_PW": password})
    assert done.returncode == 0, done.stderr
    assert "validation (full)" in done.stdout
    assert password not in done.stdout + done.stderr
    assert children.restoring_passwords() == {password}
    assert children.started and not [argv for argv, _ in children.started if any(password in a for a in argv)]

    # without a password in --to: PGPASSWORD from the environment reaches pg_restore as it does psycopg
    children.started.clear()
    wanted = embedded_pg.new_name("regal_secret_env")
    done = invoke_cli(["restore", "pos", "--latest", "--to", _scratch_dsn(embedded_cluster, wanted, ""),
                       "--policy", str(policy)], env={**os.environ, "PGPASSWORD": password})
    assert done.returncode == 0, done.stderr
    assert children.restoring_passwords() == {password}
    assert not [argv for argv, _ in children.started if any(password in a for a in argv)]

    # a variable that is not set: a usage error naming it, nothing restored
    wanted = embedded_pg.new_name("regal_secret_unset")
    done = invoke_cli(["restore", "pos", "--latest", "--to", _scratch_dsn(embedded_cluster, wanted, "${UNSET_PW}"),
                       "--policy", str(policy)], env={k: v for k, v in os.environ.items() if k != "UNSET_PW"})
    assert done.returncode == 2 and "${UNSET_PW}" in done.stderr, done.stderr


def test_init_warns_about_a_literal_password_in_the_audit_dsn(tmp_path: Path) -> None:
    secret = "audit-hunter2"
    made = invoke_cli(["init", str(tmp_path / "literal"), "--postgres-dsn", "postgresql://backup@127.0.0.1:1/pos",
                       "--audit-dsn", f"postgresql://auditor:{secret}@127.0.0.1:1/audit", "--json"])
    assert made.returncode == 0, made.stderr
    assert "audit.dsn holds a literal password" in made.stderr and "${VARIABLE}" in made.stderr
    assert secret not in made.stderr + made.stdout
    assert json.loads(made.stdout)["audit"]

    quiet = invoke_cli(["init", str(tmp_path / "variable"), "--postgres-dsn", "postgresql://backup@127.0.0.1:1/pos",
                        "--audit-dsn", "postgresql://auditor:${AUDIT_PW}@127.0.0.1:1/audit", "--json"])
    assert quiet.returncode == 0, quiet.stderr
    assert "literal password" not in quiet.stderr
