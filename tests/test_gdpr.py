"""The GDPR erasure ledger: erased customers do not come back with a restore. Real PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest

from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.gdpr import load_ledger
from regal_dagster.engine.layout import GDPR_LEDGER
from regal_dagster.engine.policy import load_policy
from regal_dagster.engine.storage import open_repository

from .conftest import DatabaseFactory, load_awkward_data, run_cli, verified_backup, write_policy_file
from .pg_compare import execute, table_rows

ANONYMIZE = {"table": "public.customers", "match_column": "email", "action": "anonymize",
             "set": {"email": "erased+{erasure_id}@erased.invalid", "card_token": None}}


@pytest.fixture
def source(system_pg: DatabaseFactory) -> str:
    dsn = system_pg.create()
    load_awkward_data(dsn)
    return dsn


def test_erased_customers_stay_erased_after_a_restore(source: str, system_pg: DatabaseFactory, tmp_path: Path,
                                                      master_key: str) -> None:
    policy_file = write_policy_file(tmp_path, {"pos": source}, gdpr={"subjects": {"pos": [ANONYMIZE]}})
    backup_id = verified_backup(policy_file)  # taken before the requests: it still holds both customers

    for email in ("customer17@example.com", "  Customer18@EXAMPLE.com "):  # trimmed, case-insensitive
        done = run_cli(policy_file, "gdpr", "erase", "pos", email, "--requested-at", "2026-11-01T09:00:00",
                   "--reference", "DSR-17")
        assert done.returncode == 0, done.stderr
    assert run_cli(policy_file, "gdpr", "erase", "pos", "customer17@example.com").returncode == 0  # recorded once

    policy = load_policy(policy_file)
    repo = open_repository(policy)
    ledger = load_ledger(repo, load_keyring(policy))
    assert [(e.requested_at, e.reference) for e in ledger.erasures] == [("2026-11-01T09:00:00+00:00", "DSR-17")] * 2
    stored = repo.get_bytes(GDPR_LEDGER)
    assert b"customer17" not in stored and ledger.hash("customer17@example.com").encode() not in stored  # encrypted

    restored = system_pg.dsn(system_pg.new_name("regal_gdpr"))
    done = run_cli(policy_file, "restore", backup_id, "--to", restored, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["erasures"] == {"subjects": 2, "rows_erased": {"public.customers": 2},
                                  "still_present": {"public.customers": 0}, "ok": True}
    assert table_rows(restored, "SELECT count(*) FROM customers WHERE email IN "
                                "('customer17@example.com', 'customer18@example.com')") == [(0,)]
    erased = "SELECT count(*), count(card_token) FROM customers WHERE email LIKE 'erased+%'"
    assert table_rows(restored, erased) == [(2, 0)]
    assert table_rows(restored, "SELECT count(*) FROM customers") == [(2000,)]  # anonymized, not deleted

    tested = run_cli(policy_file, "restore-test", backup_id, "--json")
    assert tested.returncode == 0, tested.stderr
    assert json.loads(tested.stdout)["erasures"]["rows_erased"] == {"public.customers": 2}


def test_a_restore_test_fails_when_an_erased_customer_is_still_there(source: str, tmp_path: Path,
                                                                     master_key: str) -> None:
    leaky = {**ANONYMIZE, "set": {"card_token": None}}  # forgets to overwrite the identifier itself
    policy_file = write_policy_file(tmp_path, {"pos": source}, gdpr={"subjects": {"pos": [leaky]}})
    backup_id = verified_backup(policy_file)
    assert run_cli(policy_file, "gdpr", "erase", "pos", "customer5@example.com").returncode == 0

    tested = run_cli(policy_file, "restore-test", backup_id, "--json")

    assert tested.returncode == 3
    result = json.loads(tested.stdout)
    assert result["problems"] == [
        "1 row(s) of erased subjects still in public.customers after re-applying the erasures"]


def test_erasing_needs_the_policy_to_say_where_subjects_live(source: str, tmp_path: Path, master_key: str) -> None:
    policy_file = write_policy_file(tmp_path, {"pos": source})
    done = run_cli(policy_file, "gdpr", "erase", "pos", "someone@example.com")
    assert done.returncode == 2 and "add gdpr.subjects.pos" in done.stderr
    assert "someone@example.com" not in done.stderr


def test_erasures_and_the_restore_test_work_in_a_database_that_is_read_only_by_default(
        source: str, system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> None:
    """The source database's settings come back with it; the erasures and pg_amcheck that run in the
    restored copy must not follow its default_transaction_read_only or timeouts."""
    policy_file = write_policy_file(tmp_path, {"pos": source}, gdpr={"subjects": {"pos": [ANONYMIZE]}})
    database = psycopg.conninfo.conninfo_to_dict(source)["dbname"]
    execute(source, f"""ALTER DATABASE "{database}" SET default_transaction_read_only = on;
                        ALTER DATABASE "{database}" SET statement_timeout = '1ms';
                        ALTER DATABASE "{database}" SET idle_in_transaction_session_timeout = '1ms'""")
    backup_id = verified_backup(policy_file)
    assert run_cli(policy_file, "gdpr", "erase", "pos", "customer17@example.com").returncode == 0

    restored = system_pg.dsn(system_pg.new_name("regal_gdpr_ro"))
    done = run_cli(policy_file, "restore", backup_id, "--to", restored, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["erasures"]["rows_erased"] == {"public.customers": 1}
    assert table_rows(restored, "SHOW default_transaction_read_only") == [("on",)]  # the database's own setting

    tested = run_cli(policy_file, "restore-test", backup_id, "--json")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert json.loads(tested.stdout)["erasures"]["rows_erased"] == {"public.customers": 1}
