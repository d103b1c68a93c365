"""Restore tests into a scratch PostgreSQL 18, and the operator's restore with hooks: real servers only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from regal_dagster.engine.alerts import restore_test_conditions
from regal_dagster.engine.backup import run_backup
from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.documents import read_document
from regal_dagster.engine.layout import restore_test_prefix
from regal_dagster.engine.restore_test import RESTORE_TEST_KIND, run_restore_test
from regal_dagster.engine.storage import open_repository

from .conftest import DatabaseFactory, invoke_cli, load_awkward_data, make_policy, write_policy_file
from .pg_compare import execute, table_rows

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "regal_dagster.cli"]


@pytest.fixture
def backed_up(system_pg: DatabaseFactory, tmp_path: Path, master_key: str):  # type: ignore[no-untyped-def]
    source = system_pg.create()
    load_awkward_data(source)
    policy = make_policy(tmp_path, {"pos": source})
    return policy, run_backup(policy, "pos").manifest


def test_a_restore_test_of_a_real_backup_passes_and_reports_timings(backed_up, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    policy, manifest = backed_up
    repo = open_repository(policy)
    work = tmp_path / "scratch"
    work.mkdir()

    result = run_restore_test(policy, repo, load_keyring(policy), manifest, work_dir=work)

    assert result.validation_passed, result.problems
    assert result.rto_within_target and result.rto_target_seconds == 4 * 3600
    assert set(result.seconds) == {"cluster", "schema", "load", "post_data", "validate", "amcheck", "total"}
    assert result.seconds["total"] >= sum(v for k, v in result.seconds.items() if k != "total") * 0.99
    assert result.backup_age_seconds >= 0
    assert set(result.load_breakdown) == {"fetch_decrypt_decompress", "copy_into_server"}
    assert all(v > 0 for v in result.load_breakdown.values())
    assert [(t["name"], t["rows"], t["matches"]) for t in result.tables] == [
        ('Order "Lines"', 4, True), ("customers", 2000, True)]
    assert list(work.iterdir()) == []  # the scratch server and its files are gone
    (stored,) = list(repo.list(restore_test_prefix("pos")))
    evidence = read_document(repo, load_keyring(policy), RESTORE_TEST_KIND, stored.key)
    assert evidence["backup_id"] == manifest.backup_id and evidence["validation_passed"] is True
    assert evidence["passed"] is True  # the outcome, named as every result names it (docs/cli-json.md)


def test_a_restore_that_differs_from_the_manifest_fails_and_names_the_table(backed_up) -> None:  # type: ignore[no-untyped-def]
    policy, manifest = backed_up
    tables = [dict(t) for t in manifest.source["tables"]]
    tables[1]["sha256"] = "0" * 64  # the manifest describes other data than the backup holds
    counts = {**manifest.source["schema_objects"]}
    counts["indexes"] += 1
    lying = manifest.model_copy(update={"source": {**manifest.source, "tables": tables}})

    # found while loading: that table's rows, read out of their pack, do not have the manifest's SHA-256
    result = run_restore_test(policy, open_repository(policy), load_keyring(policy), lying)

    assert not result.validation_passed
    (problem,) = result.problems
    assert problem.startswith("the restore failed: table public.customers in object ")
    assert "its rows differ from the manifest's SHA-256" in problem
    # the stored result raises an alert until a later restore test of the target passes
    (condition,) = restore_test_conditions(policy, open_repository(policy), load_keyring(policy))
    assert condition.event == "restore_test_failed" and condition.target == "pos"
    assert "table public.customers in object" in condition.details["finding"]

    # what the restored database holds, against the manifest's schema object counts
    miscounted = manifest.model_copy(update={"source": {**manifest.source, "schema_objects": counts}})
    result = run_restore_test(policy, open_repository(policy), load_keyring(policy), miscounted)
    assert not result.validation_passed
    indexes = counts["indexes"]
    assert result.problems == [f"the backup had {indexes} indexes, the restored database has {indexes - 1}"]
    assert [t["matches"] for t in result.tables] == [True, True]
    run_restore_test(policy, open_repository(policy), load_keyring(policy), manifest)
    assert restore_test_conditions(policy, open_repository(policy), load_keyring(policy)) == []


def _scratch_servers(work: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            if proc.info["name"] == "postgres" and str(work) in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def test_an_interrupted_restore_test_leaves_no_cluster_or_temp_files(system_pg: DatabaseFactory, tmp_path: Path,
                                                                     master_key: str) -> None:
    source = system_pg.create()
    execute(source, "CREATE TABLE sales AS SELECT g AS id, md5(g::text) || md5((g * 7)::text) AS payload "
                    "FROM generate_series(1, 1500000) g; CREATE INDEX ON sales (payload)")
    policy_file = write_policy_file(tmp_path, {"pos": source})
    backup = invoke_cli(["backup", "pos", "--json", "--policy", str(policy_file)])
    backup_id = json.loads(backup.stdout)["backup_id"]
    # restore-test takes the newest good backup
    assert invoke_cli(["verify", backup_id, "--policy", str(policy_file)]).returncode == 0
    work = tmp_path / "scratch"
    work.mkdir()
    process = subprocess.Popen([*CLI, "restore-test", "--target", "pos", "--policy", str(policy_file),
                                "--work-dir", str(work)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=os.environ.copy())
    deadline = time.monotonic() + 60
    while not _scratch_servers(work) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert _scratch_servers(work), process.communicate()[1].decode()[-2000:]
    time.sleep(1.0)  # the restore is under way
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert b"Traceback" not in process.stderr.read()  # type: ignore[union-attr]
    assert _scratch_servers(work) == []
    assert list(work.iterdir()) == []


def test_restore_runs_the_operators_hooks_around_a_validated_restore(backed_up, system_pg: DatabaseFactory,  # type: ignore[no-untyped-def]
                                                                    tmp_path: Path) -> None:
    policy, manifest = backed_up
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(json.dumps({
        "repository": {"url": str(policy.local_repository_path())},
        "encryption": {"keyset": str(policy.resolve_path("keyset.json")),
                       "master_key": {"env": "REGAL_TEST_MASTER_KEY"}},
        "targets": {"pos": {"kind": "postgres", "dsn": "postgresql://unused@127.0.0.1:1/x"}}}))
    marks = tmp_path / "marks.txt"
    occupied = system_pg.create()
    execute(occupied, "CREATE TABLE precious (id int); INSERT INTO precious VALUES (1)")

    failed = invoke_cli(["restore", manifest.backup_id, "--to", occupied, "--drop-existing",
                         "--policy", str(policy_file), "--pre-hook", f"echo stop >> {marks}; exit 7",
                         "--post-hook", f"echo start >> {marks}"])
    assert failed.returncode == 1 and "--pre-hook failed with exit code 7" in failed.stderr
    assert table_rows(occupied, "SELECT id FROM precious") == [(1,)]  # nothing was touched

    done = invoke_cli(["restore", manifest.backup_id, "--to", occupied, "--drop-existing",
                       "--policy", str(policy_file), "--pre-hook", f"echo stop >> {marks}",
                       "--post-hook", f"echo start >> {marks}"])
    assert done.returncode == 0, done.stderr
    assert marks.read_text().split() == ["stop", "stop", "start"]
    assert table_rows(occupied, "SELECT count(*) FROM customers") == [(2000,)]


def test_pg_amcheck_that_cannot_check_says_so_and_claims_no_corruption(system_pg: DatabaseFactory) -> None:
    """pg_amcheck exits 2 when it finds corruption and 1 when it could not check: only the first is corruption."""
    from regal_dagster.engine.sources.postgres.source import amcheck_problems

    problems = amcheck_problems(system_pg.dsn("regal_no_such_database"), jobs=1)
    assert len(problems) == 1
    assert problems[0].startswith("pg_amcheck could not check the restored database (exit code 1): ")
    assert "regal_no_such_database" in problems[0] and "corruption" not in problems[0]
    assert amcheck_problems(system_pg.create(), jobs=1) == []


def test_a_restore_test_without_a_server_that_can_hold_the_source_is_an_environment_error(
        system_pg: DatabaseFactory, tmp_path: Path, master_key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A source using an extension that no PostgreSQL installation of this machine ships: the restore test cannot
    run here. That says nothing about the backup: no failed restore-test record, no alert, exit 1 naming what is
    missing (not 3, a validation failure)."""
    from regal_dagster.engine.sources.postgres import dump

    source = system_pg.create()
    execute(source, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
    policy_file = write_policy_file(tmp_path, {"pos": source})
    real_needs = dump.server_needs
    with monkeypatch.context() as patched:  # as if the source had an extension installed that nobody else has
        patched.setattr(dump, "server_needs", lambda conn: [*real_needs(conn), "extension:regal_nowhere"])
        made = invoke_cli(["backup", "pos", "--json", "--policy", str(policy_file)])
    assert made.returncode == 0, made.stderr

    done = invoke_cli(["restore-test", "--target", "pos", "--policy", str(policy_file)])

    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "no PostgreSQL installation here can hold this database" in done.stderr
    assert "extension:regal_nowhere" in done.stderr and "install a PostgreSQL server" in done.stderr
    assert "VALIDATION FAILED" not in done.stdout + done.stderr
    from regal_dagster.engine.policy import load_policy

    policy = load_policy(policy_file)
    repo = open_repository(policy)
    assert list(repo.list(restore_test_prefix("pos"))) == []
    assert restore_test_conditions(policy, repo, load_keyring(policy)) == []
