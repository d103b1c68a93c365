"""The CLI loads only what the command asked for uses (issue 30): `--version` and `--help` start without the
engine's models, libraries or drivers; every command the parser names resolves to its function."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from regal_dagster.cli import command_function
from regal_dagster.cli.parser import build_parser

from .conftest import invoke_cli, wait_for

HEAVY = ("dagster", "pandas", "weasyprint", "boto3", "botocore", "psycopg", "pydantic", "tink", "redis",
         "zstandard", "regal_dagster.engine.policy")


def _modules_loaded_by(*argv: str) -> set[str]:
    """The modules a fresh interpreter loaded running the CLI with `argv` (its output is dropped)."""
    script = ("import sys\nfrom regal_dagster.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
              "    pass\nprint('\\n'.join(sys.modules), file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=60,
                          check=False)
    assert "Traceback" not in done.stderr, done.stderr
    return set(done.stderr.splitlines())


# What only a failed command, --json or a progress bar needs (the error log, the JSON envelope), and the installed
# package's metadata (importlib.metadata parses e-mail headers): none of it for --version or --help.
NOT_FOR_HELP = ("tempfile", "traceback", "json", "threading", "importlib.metadata", "email")


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["backup", "--help"], ["wal", "push", "--help"]])
def test_version_and_help_load_no_engine_model_library_or_driver(argv: list[str]) -> None:
    from regal_dagster.cli.version import _dist_info_version

    loaded = _modules_loaded_by(*argv)
    assert "regal_dagster.cli.parser" in loaded  # the probe saw the CLI start
    assert sorted(m for m in loaded if m.split(".")[0] in HEAVY or m in HEAVY) == []
    if _dist_info_version() is not None:  # installed with a .dist-info (else importlib.metadata is asked)
        assert sorted(m for m in loaded if any(m == n or m.startswith(n + ".") for n in NOT_FOR_HELP)) == []
    # of the engine, only its tiny leaf modules: the error types, the retention classes' names, the units' format
    assert {m for m in loaded if m.startswith("regal_dagster.engine.")} <= {"regal_dagster.engine.errors",
                                                                          "regal_dagster.engine.retention_classes",
                                                                          "regal_dagster.engine.units"}


def test_version_is_the_installed_distributions() -> None:
    """--version reads the .dist-info itself (cli/version.py); it says what importlib.metadata says."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        expected = version("regal-backup")
    except PackageNotFoundError:
        expected = "unknown (not installed)"
    done = invoke_cli(["--version"])
    assert (done.returncode, done.stdout) == (0, f"regal-backup {expected}\n")


def test_every_command_of_the_parser_resolves_to_its_function() -> None:
    parser = build_parser()
    references = []

    def walk(p: argparse.ArgumentParser) -> None:
        if (func := p.get_default("func")) is not None:
            references.append(func)
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    walk(parser)
    assert len(references) >= 25
    assert all(callable(command_function(reference)) for reference in references)


def test_wal_push_and_get_through_the_daemon_load_no_policy_model_crypto_or_driver(tmp_path: Path) -> None:
    """PostgreSQL runs `wal push` once per WAL segment and `wal get` once per segment of a recovery: with a `wal
    daemon` serving the target, they are socket clients that load none of the engine's models, Tink, boto3 or
    psycopg (the daemon does the work)."""
    made = invoke_cli(["init", str(tmp_path / "p"), "--cluster-dsn", "postgresql://postgres@127.0.0.1:1/postgres",
                       "--no-audit", "--json"])
    policy = json.loads(made.stdout)["policy"]
    log = tmp_path / "daemon.log"
    with log.open("w") as err:
        daemon = subprocess.Popen([sys.executable, "-m", "regal_dagster.cli", "--policy", policy, "wal", "daemon"],
                                  stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for(lambda: "listening on" in log.read_text() or daemon.poll() is not None, "the daemon to listen")
        segment = tmp_path / "pg_wal" / "000000010000000000000001"
        segment.parent.mkdir()
        segment.write_bytes(os.urandom(1 << 20))
        loaded = _modules_loaded_by("--policy", policy, "wal", "push", str(segment))
        assert "regal_dagster.cli.walclient" in loaded
        assert sorted(m for m in loaded if m.split(".")[0] in HEAVY or m in HEAVY) == []
        fetched = tmp_path / "RECOVERYXLOG"
        loaded = _modules_loaded_by("--policy", policy, "wal", "get", segment.name, str(fetched))
        assert sorted(m for m in loaded if m.split(".")[0] in HEAVY or m in HEAVY) == []
        assert fetched.read_bytes() == segment.read_bytes()
        assert "000000010000000000000001: archived" in log.read_text()  # the daemon did the work
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)


def test_status_and_list_load_no_driver_or_library_they_do_not_use(tmp_path: Path) -> None:
    """`status` and `list` of a local repository whose policy holds a `postgres` and a `postgres_cluster` target
    load the policy's models, Tink (the manifests) and the local backend, and nothing of Dagster, pandas,
    WeasyPrint, boto3 (no S3 repository), Redis, or psycopg where no server is asked (`list`; `status` asks the
    cluster's server how far its WAL is and may load it), nor another kind's Source."""
    made = invoke_cli(["init", str(tmp_path / "p"), "--postgres-dsn", "postgresql://postgres@127.0.0.1:1/pos",
                       "--cluster-dsn", "postgresql://postgres@127.0.0.1:1/postgres", "--no-audit", "--json"])
    policy = json.loads(made.stdout)["policy"]
    never = ("dagster", "pandas", "weasyprint", "boto3", "botocore", "redis",
             "regal_dagster.engine.sources.redis.source", "regal_dagster.engine.sources.terraform.source",
             "regal_dagster.engine.compliance", "regal_dagster.defs")
    # and none of the other commands, the restore path, the mail, HTTP and TLS clients of the alert channels
    never += ("regal_dagster.cli.commands", "regal_dagster.cli.pitr", "regal_dagster.engine.restore",
              "regal_dagster.engine.restore_test", "regal_dagster.engine.sources.postgres_cluster.standby",
              "smtplib", "urllib.request", "http.client")
    for argv, unused in ((["list"], ("psycopg", "ssl")), (["list", "--json"], ("psycopg", "ssl")), (["status"], ())):
        loaded = _modules_loaded_by("--policy", policy, *argv)
        assert "regal_dagster.engine.policy" in loaded and "tink" in loaded, argv  # the probe saw it work
        heavy = sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in (*never, *unused)))
        assert heavy == [], (argv, heavy)
    # without a postgres_cluster target no server is asked: status loads no psycopg either
    made = invoke_cli(["init", str(tmp_path / "q"), "--postgres-dsn", "postgresql://postgres@127.0.0.1:1/pos",
                       "--no-audit", "--json"])
    loaded = _modules_loaded_by("--policy", json.loads(made.stdout)["policy"], "status")
    assert "regal_dagster.engine.sources.postgres.target" in loaded  # the probe saw it work
    assert sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in (*never, "psycopg", "ssl"))) == []


def test_a_cluster_source_loads_no_driver_until_it_reaches_a_server() -> None:
    """`list` of a cluster's base backups and `status` use the postgres_cluster Source (how far a backup
    recovers); it loads psycopg (and the standby selection) only in the methods that connect."""
    script = ("import sys\nfrom regal_dagster.engine.sources.registry import source_for\n"
              "source_for('postgres_cluster').continuous_archive()\nprint('\\n'.join(sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    loaded = set(done.stdout.splitlines())
    assert "regal_dagster.engine.sources.postgres_cluster.source" in loaded
    assert sorted(m for m in loaded if m.split(".")[0] == "psycopg" or m.endswith(".standby")) == []


@pytest.mark.parametrize("dsn", [
    "postgresql://backup:${PGPASS}@127.0.0.1:5432/regalpos", "postgres://u@[::1]:5/d", "postgresql://",
    "postgresql:///db?host=/var/run/postgresql", "postgresql://u%41@h/d%2Fe?sslmode=require&application_name=a%20b",
    "postgresql://u:@h", "postgresql://:p@h", "postgresql://u@/db", "postgresql://h/d?host=x&host=y",
    "postgresql://h/d?sslmode=", "postgresql://h//d", "postgresql://h:abc/db", "postgresql://a,b:3/d",
    "postgresql://h:/d", "postgresql://h/d#f", "postgresql://u:p?q@h/d", "postgresql://u%zz@h", "postgresql://h/d?x",
    "postgresql://h/d?a=b=c", "postgresql://h/d?user=a%40b", "host=a port=x", "host = a  dbname= 'x y'",
    "host= dbname=x", "host=", "dbname='a\\'b'", "", "   ", "dbname=a=b", "x", "host=a b", "host=a\tdbname=b",
    "host='unterminated", "host=a\\ b", "frobnicate=1", "host=db dbname=pos frobnicate=1"])
def test_a_policy_dsn_is_read_as_libpq_reads_it_without_libpq(dsn: str) -> None:
    """The policy's DSNs are checked without psycopg when they are plain (conninfo.py); what that reading
    returns is what libpq returns, and what it cannot read goes to libpq, so a DSN is accepted or refused,
    with the same words, as before."""
    from psycopg.conninfo import conninfo_to_dict

    from regal_dagster.engine.postgresql.connection import check_dsn_with_libpq
    from regal_dagster.engine.postgresql.conninfo import check_dsn, simple_conninfo

    read = simple_conninfo(dsn)
    if read is not None:
        assert read == conninfo_to_dict(dsn)  # libpq reads it so too (never accepted where libpq refuses)
    assert _verdict(check_dsn, dsn) == _verdict(check_dsn_with_libpq, dsn)


def _verdict(check: Callable[[str], None], dsn: str) -> str | None:
    """None when `check` accepts the DSN, else its refusal."""
    try:
        check(dsn)
    except ValueError as exc:
        return str(exc)
    return None
