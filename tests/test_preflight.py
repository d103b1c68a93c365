"""`regal-backup check` (issue 29): each thing a backup relies on, checked against real servers, with its fix;
exit 0 when all pass, 1 when one fails, 2 for an unknown target."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .conftest import DatabaseFactory, run_cli, write_policy_file


def _findings(policy_file: Path, *args: str) -> tuple[int, dict[tuple[str, str], dict[str, Any]]]:
    done = run_cli(policy_file, "check", *args, "--json")
    document = json.loads(done.stdout)
    assert document["exit_code"] == done.returncode and "Traceback" not in done.stderr
    return done.returncode, {(f["subject"], f["check"]): f for f in document["findings"]}


def _with_targets(policy_file: Path, **targets: dict[str, Any]) -> None:
    document = yaml.safe_load(policy_file.read_text())
    document["targets"].update(targets)
    policy_file.write_text(yaml.safe_dump(document))


def test_a_ready_setup_passes_every_check_and_says_what_it_saw(system_pg: DatabaseFactory, tmp_path: Path,
                                                               master_key: str) -> None:
    policy_file = write_policy_file(tmp_path, {"pos": system_pg.create()})
    _with_targets(policy_file, files={"kind": "files", "paths": [str(tmp_path)]})

    code, found = _findings(policy_file)

    assert code == 0, [f for f in found.values() if not f["passed"]]
    assert not found[("audit trail", "configured")]["passed"] and not found[("audit trail", "configured")]["required"]
    assert found[("repository", "writable")]["passed"] and "deleted" in found[("repository", "writable")]["detail"]
    assert "format" in found[("repository", "reachable")]["detail"]
    assert found[("target pos", "privileges")]["detail"] == "the role can read every table"
    assert "clock is" in found[("target pos", "clock")]["detail"]
    assert ("target files", f"path {tmp_path}") in found
    assert not list((tmp_path / "repository" / "locks").glob("preflight*"))  # the probe is gone
    text = run_cli(policy_file, "check", "pos")
    assert text.returncode == 0 and "1 warning(s)" in text.stdout and "WARN audit trail" in text.stdout
    assert "target files" not in text.stdout


def test_each_failure_is_named_with_its_fix(system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> None:
    source = system_pg.create()
    database = conninfo_to_dict(source)["dbname"]
    role = f"regal_reader_{secrets.token_hex(4)}"
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.secret_orders (id int)")
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT CONNECT ON DATABASE {database} TO {role}")
    try:
        as_reader = make_conninfo(source, user=role)
        policy_file = write_policy_file(tmp_path, {"pos": as_reader})
        _with_targets(policy_file,
                      cluster={"kind": "postgres_cluster", "dsn": as_reader,
                               "slot": f"regal_nosuch_{secrets.token_hex(3)}"},
                      files={"kind": "files", "paths": [str(tmp_path / "not-there")]},
                      cache={"kind": "redis", "url": "redis://127.0.0.1:1/0"})

        code, found = _findings(policy_file)

        assert code == 1
        privileges = found[("target pos", "privileges")]
        assert not privileges["passed"] and "public.secret_orders" in privileges["detail"]
        assert f"GRANT pg_read_all_data TO {role}" in privileges["fix"]
        replication = found[("target cluster", "replication privilege")]
        assert not replication["passed"] and f"ALTER ROLE {role} REPLICATION" in replication["fix"]
        slot = found[("target cluster", "replication slot")]
        assert not slot["passed"] and "wal stream" in slot["fix"]
        assert not found[("target files", f"path {tmp_path / 'not-there'}")]["passed"]
        assert not found[("target cache", "reachable")]["passed"]
        assert found[("repository", "writable")]["passed"]  # the rest is still checked
    finally:
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute(f"REVOKE ALL ON DATABASE {database} FROM {role}")
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute("DROP TABLE public.secret_orders")
            conn.execute(f"DROP ROLE {role}")


def test_keys_that_do_not_open_are_a_failure_and_an_unknown_target_a_usage_error(
        system_pg: DatabaseFactory, tmp_path: Path, master_key: str, monkeypatch: Any) -> None:
    policy_file = write_policy_file(tmp_path, {"pos": system_pg.create()})
    assert run_cli(policy_file, "check", "nosuchtarget").returncode == 2
    from regal_dagster.engine.crypto import generate_master_key

    monkeypatch.setenv("REGAL_TEST_MASTER_KEY", generate_master_key())  # another master key
    code, found = _findings(policy_file)
    assert code == 1 and not found[("keys", "keyset and master key")]["passed"]
    assert found[("repository", "writable")]["passed"]
