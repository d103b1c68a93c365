"""Wrong input and broken surroundings get a clear message and the documented exit code, never a traceback;
nothing is written by a command that was refused; child processes never see the keys.

Exit status (README): 0 success, 1 operational failure, 2 bad usage or policy (no repository where the
policy points), 3 a verification, validation or audit-trail check failed."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from regal_dagster.engine.environment import child_environment
from regal_dagster.engine.policy import load_policy
from regal_dagster.engine.postgresql.connection import libpq_environment

from .conftest import (
    DatabaseFactory,
    invoke_cli,
    load_awkward_data,
    run_cli,
    run_cli_process,
    write_policy_file,
)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return invoke_cli(args, env={**os.environ, **(env or {})})


def _clear(done: subprocess.CompletedProcess[str]) -> None:
    """One message with what to do, and no Python in sight."""
    assert "error: " in done.stderr and "what to do:" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr + done.stdout and 'File "' not in done.stderr


@pytest.fixture
def setup(system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> dict[str, Any]:
    source = system_pg.create()
    load_awkward_data(source)
    (tmp_path / "regal").mkdir()
    policy_file = write_policy_file(tmp_path / "regal", {"pos": source})
    done = run_cli(policy_file, "backup", "pos", "--json")
    assert done.returncode == 0, done.stderr
    return {"policy_file": policy_file, "backup_id": json.loads(done.stdout)["backup_id"], "pg": system_pg,
            "source": source}


def test_every_command_exits_as_documented(setup: dict[str, Any], tmp_path: Path) -> None:
    policy_file, backup_id, pg = setup["policy_file"], setup["backup_id"], setup["pg"]
    restored = pg.dsn(pg.new_name("regal_codes"))
    table = [  # (arguments, exit code)
        (["list"], 0),
        (["verify", backup_id], 0),
        (["verify", "pos-20991231T000000Z-abcdef"], 2),  # no such backup
        (["verify", "../../x"], 2),  # not a backup id
        (["verify"], 2),  # neither a backup id nor --latest
        (["verify", backup_id, "--target", "pos"], 2),  # --target goes with --latest
        (["verify", "--latest", "--target", "nosuchtarget"], 2),  # not "the policy file is invalid"
        (["backup", "nosuchtarget"], 2),
        (["backup", "pos", "--wait", "soon"], 2),
        (["restore", backup_id, "--to", restored], 0),
        (["restore", backup_id, "--to", restored], 2),  # not empty: refused, nothing touched
        (["restore", "--target", "pos", "--before", "last tuesday", "--to", restored], 2),
        (["restore", "--target", "pos", "--to", restored], 2),  # neither --latest nor --before
        (["restore", backup_id, "--to", "/a/path"], 2),  # not a DSN: said so, nothing created
        (["restore", backup_id, "--to", "postgresql://u:pw@127.0.0.1/x?frobnicate=1"], 2),
        (["restore-test", backup_id], 0),
        (["restore-test", "--target", "nosuchtarget"], 2),
        (["gdpr", "erase", "pos", "x@example.com", "--requested-at", "yesterday"], 2),
        (["gdpr", "erase", "pos", "x@example.com"], 2),  # the policy has no gdpr section (like offsite, audit)
        (["prune", "--dry-run"], 0),
        (["prune", "--check"], 0),
        (["keys", "list"], 0),
        (["keys", "retire", "12345"], 1),  # no such key
        (["offsite", "sync"], 2),  # the policy has no off-site repository
        (["audit", "verify"], 2),  # the policy has no audit trail
        (["report", "--period", "2026-11"], 2),
        (["upgrade"], 0),
        (["list", "--nosuchoption"], 2),
        (["restore-test"], 0),  # no --target: the policy's only one
    ]
    for args, code in table:
        done = run_cli(policy_file, *args)
        assert done.returncode == code, (args, done.stdout[-500:], done.stderr[-1500:])
        if code:
            assert "Traceback" not in done.stderr, (args, done.stderr)
            _clear(done)


def test_a_restore_to_something_that_is_not_a_dsn_says_what_to_give(setup: dict[str, Any]) -> None:
    done = run_cli(setup["policy_file"], "restore", setup["backup_id"], "--to", "/a/path")
    assert done.returncode == 2
    _clear(done)
    assert "not a PostgreSQL DSN" in done.stderr and "postgresql://" in done.stderr
    secret = run_cli(setup["policy_file"], "restore", setup["backup_id"], "--to",
                     "postgresql://u:hunter2@127.0.0.1/x?frobnicate=1")
    assert secret.returncode == 2 and "frobnicate" in secret.stderr and "hunter2" not in secret.stderr


def test_no_such_backup_writes_nothing(setup: dict[str, Any]) -> None:
    repository = setup["policy_file"].parent / "repository"
    before = sorted(p.relative_to(repository) for p in repository.rglob("*"))
    for name in ("pos-20991231T000000Z-abcdef", "../../x", "pos"):
        done = run_cli(setup["policy_file"], "verify", name)
        assert done.returncode == 2 and ("no backup" in done.stderr or "not a backup id" in done.stderr)
    assert sorted(p.relative_to(repository) for p in repository.rglob("*")) == before


def test_a_wrong_repository_path_is_not_an_empty_repository(setup: dict[str, Any], tmp_path: Path) -> None:
    policy_file = setup["policy_file"]
    document = yaml.safe_load(policy_file.read_text())
    unmounted = tmp_path / "mnt" / "backups"
    document["repository"]["url"] = str(unmounted)
    policy_file.write_text(yaml.safe_dump(document))
    for args in (["list"], ["backup", "pos"], ["prune"], ["restore-test"]):
        done = run_cli(policy_file, *args)
        assert done.returncode == 2, (args, done.stderr)
        _clear(done)
        assert "holds no regal-backup repository" in done.stderr and "regal-backup init" in done.stderr
    assert not unmounted.exists() and not (tmp_path / "mnt").exists()  # nothing created


def test_init_checks_its_input_before_writing_anything(tmp_path: Path) -> None:
    home = tmp_path / "regal"
    for dsn, said in (("not a dsn", "not a PostgreSQL DSN"), ("host=db dbname=pos frobnicate=1", "frobnicate")):
        done = _cli("init", str(home), "--postgres-dsn", dsn)
        assert done.returncode == 2 and said in done.stderr, done.stderr
        _clear(done)
        assert not home.exists()

    made = _cli("init", str(home), "--postgres-dsn", "postgresql://backup:hunter2@db:5432/pos", "--json")
    assert made.returncode == 0, made.stderr
    assert "literal password" in made.stderr and "${VARIABLE}" in made.stderr and "hunter2" not in made.stderr
    assert stat.S_IMODE((home / "regal_backup.yaml").stat().st_mode) == 0o600

    again = _cli("init", str(home), "--postgres-dsn", "postgresql://x@db/pos")
    assert again.returncode == 2 and "already holds" in again.stderr
    _clear(again)


def test_an_unsupported_dsn_parameter_is_a_policy_error(setup: dict[str, Any]) -> None:
    policy_file = setup["policy_file"]
    document = yaml.safe_load(policy_file.read_text())
    document["targets"]["pos"]["dsn"] += " frobnicate=1"
    policy_file.write_text(yaml.safe_dump(document))
    done = run_cli(policy_file, "backup", "pos")
    assert done.returncode == 2 and "targets.pos.dsn" in done.stderr and "frobnicate" in done.stderr
    _clear(done)


def test_a_restore_as_a_role_without_createdb_is_refused_clearly(setup: dict[str, Any]) -> None:
    pg = setup["pg"]
    with psycopg.connect(pg.server_dsn, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS regal_no_createdb")
        conn.execute("CREATE ROLE regal_no_createdb LOGIN")
    try:
        target = f"postgresql://regal_no_createdb@127.0.0.1:5432/{pg.new_name('regal_denied')}"
        done = run_cli(setup["policy_file"], "restore", setup["backup_id"], "--to", target)
        assert done.returncode == 1 and "permission denied to create database" in done.stderr, done.stderr
        _clear(done)
    finally:
        with psycopg.connect(pg.server_dsn, autocommit=True) as conn:
            conn.execute("DROP ROLE regal_no_createdb")


def test_audit_and_report_exit_codes(setup: dict[str, Any]) -> None:
    pg, policy_file = setup["pg"], setup["policy_file"]
    document = yaml.safe_load(policy_file.read_text())
    document["audit"] = {"dsn": pg.create("regal_audit")}
    policy_file.write_text(yaml.safe_dump(document))
    assert run_cli(policy_file, "verify", setup["backup_id"]).returncode == 0
    assert run_cli(policy_file, "audit", "verify").returncode == 0  # writes a checkpoint
    for period, code in (("2026-13", 2), ("next month", 2), ("2099-01", 2)):
        done = run_cli(policy_file, "report", "--period", period)
        assert done.returncode == code, (period, done.stderr)
        _clear(done)
    (checkpoint,) = (policy_file.parent / "repository" / "audit" / "checkpoints").iterdir()
    damaged = bytearray(checkpoint.read_bytes())
    damaged[-1] ^= 0x01
    checkpoint.write_bytes(bytes(damaged))  # damaged
    verified = run_cli(policy_file, "audit", "verify")
    assert verified.returncode == 3 and f"audit/checkpoints/{checkpoint.name}" in verified.stdout
    assert "Traceback" not in verified.stderr
    report = run_cli(policy_file, "report")
    assert report.returncode == 3 and "THE AUDIT TRAIL IS BROKEN" in report.stdout, report.stderr


def test_an_unexpected_error_prints_one_line_and_keeps_the_trace_private(
        setup: dict[str, Any], tmp_path: Path) -> None:
    keyset = setup["policy_file"].parent / "keyset.json"
    document = json.loads(keyset.read_text())
    keyset.write_text(json.dumps({**document, "keys": ["not", "a", "mapping"]}))  # an edit nobody foresaw
    state = tmp_path / "state"
    done = invoke_cli(["list", "--policy", str(setup["policy_file"])],
                      env={**os.environ, "XDG_STATE_HOME": str(state)})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "unexpected" in done.stderr and "what to do:" in done.stderr
    (log,) = (state / "regal-backup" / "errors").iterdir()
    assert str(log) in done.stderr and stat.S_IMODE(log.stat().st_mode) == 0o600
    assert "Traceback" in log.read_text()


def test_child_processes_never_see_the_master_key(setup: dict[str, Any], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    secret = os.environ["REGAL_TEST_MASTER_KEY"]
    monkeypatch.setenv("REGAL_TEST_DB_PASSWORD", "s3cr3t-db")
    assert "REGAL_TEST_MASTER_KEY" not in child_environment()
    assert secret not in json.dumps(libpq_environment(setup["source"]))
    assert "PATH" in child_environment()

    policy_file = setup["policy_file"]
    document = yaml.safe_load(policy_file.read_text())
    document["targets"]["other"] = {"kind": "postgres", "dsn": "postgresql://x:${REGAL_TEST_DB_PASSWORD}@h/db"}
    policy_file.write_text(yaml.safe_dump(document))
    seen = tmp_path / "hook-env.txt"
    restored = setup["pg"].dsn(setup["pg"].new_name("regal_hooked"))
    done = run_cli_process(policy_file, "restore", setup["backup_id"], "--to", restored,  # its child's env
                           "--pre-hook", f"env > {seen}")
    assert done.returncode == 0, done.stderr
    environment = seen.read_text()
    assert "PATH=" in environment  # the operator's own environment
    assert secret not in environment and "REGAL_TEST_MASTER_KEY" not in environment
    assert "s3cr3t-db" not in environment  # a ${VAR} the policy reads a secret from
    assert load_policy(policy_file).encryption.master_key.env == "REGAL_TEST_MASTER_KEY"


def test_json_gets_its_envelope_for_a_bad_command_line_too(setup: dict[str, Any]) -> None:
    for args in (["list", "--nosuchoption"], ["restore", "--jobs", "many"], ["verify", "--latest", "--target"]):
        done = run_cli(setup["policy_file"], *args, "--json")
        assert done.returncode == 2, (args, done.stderr)
        document = json.loads(done.stdout)
        assert document["schema"] == "regal-backup-cli/1" and document["ok"] is False and document["exit_code"] == 2
        assert document["error"]["message"] and "usage:" in done.stderr, document


def test_an_unknown_target_is_named_as_such_not_as_an_invalid_policy(setup: dict[str, Any]) -> None:
    done = run_cli(setup["policy_file"], "restore-test", "--target", "nosuchtarget")
    assert done.returncode == 2
    assert "no target named 'nosuchtarget' (its targets: pos)" in done.stderr and "is invalid" not in done.stderr


def test_a_reader_that_closes_the_pipe_ends_the_command_quietly(setup: dict[str, Any]) -> None:
    """`regal-backup list | head -1`, here with a reader that is gone before the command writes (`true` exits at
    once; the command takes longer than that to start): no error message about a broken pipe."""
    program = Path(sys.executable).parent / "regal-backup"
    done = subprocess.run(["bash", "-c", f"{program} list --policy {setup['policy_file']} | true"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.stderr == "", done.stderr


def _fields(document: Any) -> set[str]:
    """Every key of a JSON document, at any depth."""
    if isinstance(document, dict):
        return set(document) | {k for v in document.values() for k in _fields(v)}
    if isinstance(document, list):
        return {k for v in document for k in _fields(v)}
    return set()


def test_json_prints_one_envelope_per_command_and_names_every_outcome_passed(setup: dict[str, Any]) -> None:
    """The exit-code and JSON table with --json: one envelope whose exit_code is the exit status and `ok` is true
    exactly at 0, errors included; the outcome of verify and restore is `passed` (docs/cli-json.md: one name for
    one fact; `validated` is gone; restore-test's `passed`: test_restore_test.py)."""
    policy_file, backup_id, pg = setup["policy_file"], setup["backup_id"], setup["pg"]
    restored = pg.dsn(pg.new_name("regal_json"))
    table = [(["verify", backup_id], 0), (["verify"], 2), (["backup", "nosuchtarget"], 2),
             (["restore", backup_id, "--to", restored], 0), (["restore", backup_id, "--to", restored], 2),
             (["status"], 0), (["keys", "retire", "12345"], 1)]  # restore-test: test_restore_test.py
    outcomes: dict[str, bool] = {}
    for args, code in table:
        done = run_cli(policy_file, *args, "--json")
        document = json.loads(done.stdout)  # one document, nothing else on stdout
        assert (done.returncode, document["exit_code"], document["ok"]) == (code, code, code == 0), (args, document)
        assert document["schema"] == "regal-backup-cli/1" and document["command"].split()[0] == args[0]
        assert "validated" not in _fields(document), (args, document)
        if code:
            assert document["error"]["message"] and document["error"]["hint"], (args, document)
        elif args[0] in ("verify", "restore"):
            outcomes[args[0]] = document["passed"]
    assert outcomes == {"verify": True, "restore": True}
