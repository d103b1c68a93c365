"""Small tables stored several to an object (packs.py): exact restores, backups from before packs, damaged extents."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from regal_dagster.engine.backup import run_backup
from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.errors import IntegrityError
from regal_dagster.engine.manifest import Manifest
from regal_dagster.engine.pipeline import StoredBackup
from regal_dagster.engine.sources.postgres import packs
from regal_dagster.engine.sources.postgres.restore import restore_database
from regal_dagster.engine.sources.postgres.source import PostgresSource
from regal_dagster.engine.storage import open_repository

from .conftest import DatabaseFactory, make_policy
from .pg_compare import execute, full_schema_text, table_contents

# empty tables first, in the middle and last of the pack; an inheritance child loaded with its parent; a big
# table (analyzed: its pages known) stored alone
TABLES = """
    CREATE TABLE a_empty (x int);
    CREATE TABLE b_parent (id int, note text);
    CREATE TABLE c_child (extra bytea) INHERITS (b_parent);
    CREATE TABLE d_empty (x int);
    CREATE TABLE e_rows (id int PRIMARY KEY, t text, n numeric, at timestamptz);
    CREATE TABLE f_big (id int, filler text);
    CREATE TABLE z_empty (x int);
    INSERT INTO b_parent VALUES (1, 'parent'), (2, E'tab\\there');
    INSERT INTO c_child VALUES (3, 'child', '\\x00ff'), (4, NULL, NULL);
    INSERT INTO e_rows SELECT g, 'row ' || g, g / 3.0, '2026-01-01'::timestamptz + g * interval '1 hour'
        FROM generate_series(1, 500) g;
    INSERT INTO f_big SELECT g, repeat(md5(g::text), 8) FROM generate_series(1, 6000) g;
    ANALYZE f_big;
"""


def _backup(system_pg: DatabaseFactory, tmp_path: Path) -> tuple[str, Manifest, StoredBackup]:
    source = system_pg.create()
    execute(source, TABLES)
    policy = make_policy(tmp_path, {"pos": source})
    manifest = run_backup(policy, "pos").manifest
    return source, manifest, StoredBackup(open_repository(policy), load_keyring(policy), manifest)


def test_small_tables_share_a_pack_and_restore_exactly(system_pg: DatabaseFactory, tmp_path: Path,
                                                      master_key: str) -> None:
    source, manifest, backup = _backup(system_pg, tmp_path)
    facts = {t["name"]: t for t in manifest.source["tables"]}
    assert manifest.version == 4
    assert "offset" not in facts["f_big"] and facts["f_big"]["object"] == "tables/00001.copy"
    small = [name for name in facts if name != "f_big"]
    assert {facts[name]["object"] for name in small} == {"tables/pack-00002.copy"}
    assert [facts[name]["length"] for name in ("a_empty", "d_empty", "z_empty")] == [0, 0, 0]
    assert sorted(o.name for o in manifest.objects) == ["schema.pgdump", "tables/00001.copy", "tables/pack-00002.copy"]
    assert packs.extents_problem(manifest) is None
    assert "schema archive lists" in PostgresSource().check_structure(backup)

    for validation in ("full", "rows"):
        restored = system_pg.dsn(system_pg.new_name(f"packed_{validation}"))
        report = restore_database(backup.repo, backup.keyring, manifest, restored, validation=validation)
        assert report.ok, report.validation_problems
        assert table_contents(restored) == table_contents(source)
        assert full_schema_text(restored) == full_schema_text(source)


def test_a_backup_from_before_packs_restores(system_pg: DatabaseFactory, tmp_path: Path, master_key: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Every table its own object and no extents in the manifest (as every backup before packs, and big tables
    now): restored as before, by the code that now reads packs."""
    monkeypatch.setattr(packs, "PACK_TABLE_BYTES", 0)
    source, manifest, backup = _backup(system_pg, tmp_path)
    assert all("offset" not in t for t in manifest.source["tables"])
    assert len(manifest.objects) == 1 + len(manifest.source["tables"])
    monkeypatch.undo()
    restored = system_pg.dsn(system_pg.new_name("unpacked"))
    report = restore_database(backup.repo, backup.keyring, manifest, restored)
    assert report.ok, report.validation_problems
    assert table_contents(restored) == table_contents(source)


def test_extents_that_do_not_tile_their_pack_are_refused(system_pg: DatabaseFactory, tmp_path: Path,
                                                          master_key: str) -> None:
    """Two packed tables' offsets swapped: the integrity check names the pack, a restore refuses the backup
    (rows would go into another table) and publishes nothing."""
    _, manifest, backup = _backup(system_pg, tmp_path)
    tables = [dict(t) for t in manifest.source["tables"]]
    parent, rows = (next(t for t in tables if t["name"] == name) for name in ("b_parent", "e_rows"))
    parent["offset"], rows["offset"] = rows["offset"], parent["offset"]
    swapped = manifest.model_copy(update={"source": {**manifest.source, "tables": tables}})
    with pytest.raises(IntegrityError, match="starts at byte .* of pack tables/pack-00002.copy"):
        PostgresSource().check_structure(StoredBackup(backup.repo, backup.keyring, swapped))
    target = system_pg.new_name("swapped")
    with pytest.raises(IntegrityError, match="table public.(b_parent|e_rows) in object .*: its rows differ"):
        restore_database(backup.repo, backup.keyring, swapped, system_pg.dsn(target))
    with psycopg.connect(system_pg.dsn("postgres")) as conn:
        assert conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (f"{target}%",)).fetchall() == []
