"""The operator's day: init with an audit trail, a status at a glance (and as a monitoring check), one backup
in full, verify --latest, Prometheus metrics, and one JSON envelope for every command; run in this process
(conftest.invoke_cli), except the metrics server and the terminal test, which are real processes."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from regal_dagster.cli.parser import build_parser

from .conftest import CLI, DatabaseFactory, invoke_cli, load_awkward_data

ENVELOPE = {"schema", "command", "ok", "exit_code", "warnings"}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return invoke_cli(args, env={**os.environ, **(env or {})})


def as_json(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The one JSON document of a command, checked against the envelope (docs/cli-json.md)."""
    document = json.loads(done.stdout)
    assert ENVELOPE <= set(document), document
    assert document["schema"] == "regal-backup-cli/1"
    assert document["exit_code"] == done.returncode and document["ok"] is (done.returncode == 0)
    return document


@pytest.fixture
def home(system_pg: DatabaseFactory, tmp_path: Path) -> tuple[Path, str]:
    """`regal-backup init` on a real database (its audit database is created beside it)."""
    source = system_pg.create()
    load_awkward_data(source)
    made = cli("init", str(tmp_path / "regal"), "--postgres-dsn", source, "--json")
    assert made.returncode == 0, made.stderr
    return Path(as_json(made)["policy"]), source


def metrics_of(text: str) -> dict[str, list[Any]]:
    """Prometheus's own parser: metric name -> its samples."""
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_version_and_help_for_every_argument() -> None:
    done = cli("--version")
    assert done.returncode == 0 and done.stdout.startswith("regal-backup ") and done.stdout.strip() != "regal-backup"

    missing = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif not isinstance(action, argparse._HelpAction | argparse._VersionAction) and not action.help:
                missing.append(f"{path}: {action.dest}")

    walk(build_parser(), "regal-backup")
    assert missing == []
    assert "Exit status" in cli("--help").stdout


def test_init_sets_up_an_audit_trail_and_a_private_policy(home: tuple[Path, str]) -> None:
    policy_file, source = home
    assert policy_file.stat().st_mode & 0o777 == 0o600
    audit_db = psycopg.conninfo.conninfo_to_dict(source)["dbname"] + "_audit"
    with psycopg.connect(psycopg.conninfo.make_conninfo(source, dbname=audit_db)) as conn:
        (first,) = conn.execute("SELECT event_type FROM regal_audit.events ORDER BY seq LIMIT 1").fetchone()
    assert first == "repository_created"
    verified = cli("audit", "verify", "--policy", str(policy_file), "--json")
    assert verified.returncode == 0 and as_json(verified)["intact"] is True  # from the first minute on


def test_init_without_an_audit_trail_warns(tmp_path: Path) -> None:
    done = cli("init", str(tmp_path / "regal"), "--postgres-dsn", "postgresql://x@db/pos", "--no-audit", "--json")
    assert done.returncode == 0
    document = as_json(done)
    assert document["audit"] is None and "no audit trail" in document["warnings"][0]
    assert "warning: no audit trail" in done.stderr


def test_status_show_and_verify_latest_tell_the_operator_where_things_stand(home: tuple[Path, str]) -> None:
    policy = ["--policy", str(home[0])]
    empty = cli("status", *policy, "--json")
    assert empty.returncode == 3  # no good backup: the RPO is breached (a monitoring check fails)
    assert as_json(empty)["rpo_breached"] == ["main"]
    assert "NO GOOD BACKUP" in cli("status", *policy).stdout

    backup_id = as_json(cli("backup", "main", "--class", "daily", "--no-verify", "--json", *policy))["backup_id"]
    unchecked = cli("status", *policy, "--json")
    assert unchecked.returncode == 3  # taken but not verified yet: not good, not counted
    latest = cli("verify", "--latest", "--target", "main", *policy, "--json")
    assert latest.returncode == 0, latest.stderr
    assert [(v["target"], v["backup_id"], v["passed"]) for v in as_json(latest)["verified"]] == [
        ("main", backup_id, True)]

    status = cli("status", *policy, "--json")
    assert status.returncode == 0, status.stdout
    (main,) = as_json(status)["targets"]
    assert main["newest_good_backup"]["backup_id"] == backup_id and main["rpo_breached"] is False
    assert 0 <= main["rpo_age_seconds"] < main["rpo_seconds"] == 3600
    assert main["last_verification"]["backup_id"] == backup_id and main["last_verification"]["passed"]
    assert main["last_restore_test"] is None and as_json(status)["open_alerts"] == []
    text = cli("status", *policy).stdout
    assert f"newest good backup {backup_id} (daily)" in text and "within" in text
    assert "last restore test never" in text and "last drill never" in text

    shown = cli("show", backup_id, *policy, "--json")
    assert shown.returncode == 0
    detail = as_json(shown)
    assert detail["status"] == "good" and {c["name"] for c in detail["checks"]} >= {"manifest", "integrity"}
    assert {t["table"]: t["rows"] for t in detail["table_rows"]}["public.customers"] == 2000
    assert detail["objects"] and all(o["key"].startswith(f"backups/main/{backup_id}/") for o in detail["objects"])
    assert detail["retention"]["keep"] is True and detail["object_lock"] is None
    text = cli("show", backup_id, *policy).stdout
    assert "retention   kept: the newest good backup" in text and "lock        none" in text
    assert "public.customers" in text and "OK    integrity" in text


def test_metrics_for_prometheus_and_node_exporter(home: tuple[Path, str], tmp_path: Path) -> None:
    policy = ["--policy", str(home[0])]
    backup_id = as_json(cli("backup", "main", "--class", "daily", "--json", *policy))["backup_id"]
    assert cli("verify", backup_id, *policy).returncode == 0

    textfile = tmp_path / "textfile" / "regal_backup.prom"
    written = cli("metrics", "--textfile", str(textfile), *policy)
    assert written.returncode == 0, written.stderr
    found = metrics_of(textfile.read_text())
    (success,) = found["regal_backup_last_success_timestamp_seconds"]
    assert success.labels == {"target": "main", "kind": "postgres", "retention_class": "daily"}
    assert abs(success.value - time.time()) < 600
    assert found["regal_backup_last_success_stored_bytes"][0].value > 0
    assert found["regal_backup_last_success_duration_seconds"][0].value > 0
    assert found["regal_backup_rpo_breached"][0].value == 0
    assert found["regal_backup_rpo_target_seconds"][0].value == 3600
    assert 0 <= found["regal_backup_rpo_age_seconds"][0].value < 3600
    assert found["regal_backup_last_verification_success"][0].value == 1
    assert found["regal_backup_repository_bytes"][0].value > 0
    assert "regal_backup_open_alerts" in found and found["regal_backup_open_alerts"] == []  # none open
    assert found["regal_backup_up"][0].value == 1
    dashboard = (Path(__file__).resolve().parents[1] / "docs" / "grafana-dashboard.json").read_text()
    used = set(re.findall(r"regal_backup_[a-z_]+", json.dumps([p["targets"] for p in json.loads(dashboard)["panels"]])))
    assert used and used <= set(found)  # the dashboard shows only metrics we serve

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([*CLI, "metrics", "--listen", f"127.0.0.1:{port}", *policy],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        body = ""
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                    body = response.read().decode()
                break
            except OSError:
                time.sleep(0.2)
        served = metrics_of(body)
        assert served["regal_backup_last_success_timestamp_seconds"][0].value == success.value
        assert served["regal_backup_target_backups"][0].value == 1
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_every_command_speaks_one_json_envelope(home: tuple[Path, str], tmp_path: Path) -> None:
    policy = ["--policy", str(home[0])]
    backup_id = as_json(cli("backup", "main", "--json", *policy))["backup_id"]
    commands = [["list"], ["verify", backup_id], ["show", backup_id], ["status"], ["prune", "--dry-run"],
                ["prune", "--check"], ["keys", "list"], ["gdpr", "list"], ["audit", "verify"],
                ["restore", backup_id, "--to", "postgresql://postgres@127.0.0.1:1/nowhere"]]
    names = []
    for command in commands:
        done = cli(*command, "--json", *policy)
        document = as_json(done)
        names.append(document["command"])
        if "target" in document:
            assert document["target"] == "main"  # `target` is always the policy's target, never a destination
    assert names == ["list", "verify", "show", "status", "prune", "prune", "keys list", "gdpr list", "audit verify",
                     "restore"]
    failed = as_json(cli("show", "main-20200101T000000Z-abcdef", "--json", *policy))
    assert failed["ok"] is False and failed["error"]["message"].startswith("no backup main-20200101T000000Z-abcdef")
    assert failed["error"]["hint"]


def test_long_commands_show_progress_on_a_terminal_only(home: tuple[Path, str]) -> None:
    import pty

    policy = ["--policy", str(home[0])]
    backup_id = as_json(cli("backup", "main", "--json", *policy))["backup_id"]
    for command, label in ((["verify", backup_id], f"verify {backup_id}"),
                           (["restore-test", "--target", "main"], f"restore test of {backup_id}"),
                           (["prune", "--dry-run"], "reading the repository")):
        controller, terminal = pty.openpty()  # stderr is a terminal, as for a person at a shell
        try:
            done = subprocess.run([*CLI, *command, *policy], stdout=subprocess.PIPE, stderr=terminal, text=True,
                                  timeout=300, check=False)
            os.close(terminal)
            shown = b""
            while True:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                shown += chunk
        finally:
            os.close(controller)
        assert done.returncode == 0, (command, done.stdout)
        assert f"\r{label}:".encode() in shown, shown[-500:]  # redrawn in place, with the elapsed time
        piped = cli(*command, *policy)  # not a terminal: no progress display
        assert "\r" not in piped.stderr


def _serving(policy: Path, *listen: str) -> tuple[str, str]:
    """`metrics --listen ...` started, what it printed on stderr until it served (the address line), stopped."""
    server = subprocess.Popen([*CLI, "metrics", "--listen", *listen, "--policy", str(policy)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr is not None
        said = ""
        while "serving Prometheus metrics on" not in said:
            line = server.stderr.readline()
            assert line, f"it stopped: {said}"
            said += line
        where = re.search(r"serving Prometheus metrics on (\S+)/metrics", said)
        assert where is not None
        with urllib.request.urlopen(f"{where.group(1).replace('0.0.0.0', '127.0.0.1')}/metrics", timeout=30) as got:
            assert "regal_backup_up 1" in got.read().decode()
        return where.group(1), said
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_metrics_listen_on_this_machine_only_unless_told_and_say_the_endpoint_has_no_authentication(
        home: tuple[Path, str]) -> None:
    policy = home[0]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    where, said = _serving(policy, str(port))  # a port alone: 127.0.0.1
    assert where == f"http://127.0.0.1:{port}" and "no authentication" not in said
    where, said = _serving(policy, f"0.0.0.0:{port}")
    assert where == f"http://0.0.0.0:{port}"
    assert "note: /metrics on 0.0.0.0 can be reached from other machines and has no authentication" in said
    assert build_parser().parse_args(["metrics", "--listen"]).listen == "127.0.0.1:9464"
