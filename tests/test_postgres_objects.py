"""The per-table dump and the parallel restore against every kind of object a real schema has.

Real PostgreSQL 15 (system) and 18 (embedded); nothing mocked. The source has generated and dropped
columns, a table without columns, an empty table, a partitioned table, a sequence moved past its rows,
a large object, a materialized view, a trigger that would reject the restore's own inserts, and a table
whose physical row order differs from its key order (rows deleted and re-inserted, varying widths).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from regal_dagster.engine.backup import run_backup
from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.parallel import Cancelled, check, map_parallel
from regal_dagster.engine.postgresql.connection import describe_dsn
from regal_dagster.engine.sources.postgres.restore import restore_database
from regal_dagster.engine.storage import open_repository

from .conftest import DatabaseFactory, make_policy
from .pg_compare import execute, schema_text, table_rows

OBJECTS_SQL = r"""
CREATE TABLE priced (id int PRIMARY KEY, price numeric(10, 2), doubled numeric GENERATED ALWAYS AS (price * 2) STORED);
INSERT INTO priced (id, price) SELECT g, g * 1.25 FROM generate_series(1, 500) g;
CREATE TABLE thinned (a int, gone text, c text);
INSERT INTO thinned SELECT g, 'x', 'c' || g FROM generate_series(1, 100) g;
ALTER TABLE thinned DROP COLUMN gone;
CREATE TABLE no_columns ();
INSERT INTO no_columns DEFAULT VALUES; INSERT INTO no_columns DEFAULT VALUES; INSERT INTO no_columns DEFAULT VALUES;
CREATE TABLE nothing_yet (id int);
CREATE TABLE readings (at date NOT NULL, v int) PARTITION BY RANGE (at);
CREATE TABLE readings_2025 PARTITION OF readings FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE readings_2026 PARTITION OF readings FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
INSERT INTO readings SELECT date '2025-06-01' + g, g FROM generate_series(0, 399) g;
CREATE SEQUENCE ticket_seq;
SELECT setval('ticket_seq', 4242);
SELECT lo_from_bytea(424242, convert_to('large object bytes', 'UTF8') || '\x00ff'::bytea);
CREATE MATERIALIZED VIEW priced_total AS SELECT sum(price) AS total FROM priced;
CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'no inserts'; END $$;
CREATE TABLE guarded (id int);
INSERT INTO guarded VALUES (1), (2);
CREATE TRIGGER no_inserts BEFORE INSERT ON guarded FOR EACH ROW EXECUTE FUNCTION refuse();
CREATE TABLE shuffled (id int PRIMARY KEY, body text);
INSERT INTO shuffled SELECT g, repeat('w', (g * 37) % 300) FROM generate_series(1, 3000) g;
DELETE FROM shuffled WHERE id % 3 = 0;
INSERT INTO shuffled SELECT g, repeat('n', (g * 11) % 90) FROM generate_series(3001, 4000) g;
"""

CHECKS = {
    "generated column": "SELECT id, price, doubled FROM priced ORDER BY id",
    "dropped column": "SELECT * FROM thinned ORDER BY a",
    "table without columns": "SELECT count(*) FROM no_columns",
    "empty table": "SELECT count(*) FROM nothing_yet",
    "partitions": "SELECT tableoid::regclass::text, at, v FROM readings ORDER BY at",
    "sequence value": "SELECT last_value, is_called FROM ticket_seq",
    "large object": "SELECT lo_get(424242)",
    "materialized view": "SELECT total FROM priced_total",
    "table with a trigger": "SELECT id FROM guarded ORDER BY id",
    "reordered table": "SELECT id, body FROM shuffled ORDER BY id",
}


@pytest.mark.parametrize("server", ["system_pg", "embedded_pg"])
def test_every_kind_of_object_round_trips_and_validates(server: str, request: pytest.FixtureRequest,
                                                        tmp_path: Path, master_key: str) -> None:
    factory: DatabaseFactory = request.getfixturevalue(server)
    source = factory.create()
    execute(source, OBJECTS_SQL)
    policy = make_policy(tmp_path, {"pos": source})
    manifest = run_backup(policy, "pos").manifest

    # One object per table with rows to dump (partitioned parents hold none: their partitions do).
    tables = {f"{t['schema']}.{t['name']}": t for t in manifest.source["tables"]}
    assert set(tables) == {"public.priced", "public.thinned", "public.no_columns", "public.nothing_yet",
                           "public.readings_2025", "public.readings_2026", "public.guarded", "public.shuffled"}
    assert tables["public.priced"]["columns"] == ["id", "price"]  # the generated column is recomputed
    assert tables["public.thinned"]["columns"] == ["a", "c"]
    assert tables["public.no_columns"]["rows"] == 3 and tables["public.nothing_yet"]["rows"] == 0
    assert tables["public.shuffled"]["rows"] == 3000

    repo, keyring = open_repository(policy), load_keyring(policy)
    for validation in ("full", "rows"):
        restored = factory.dsn(factory.new_name("regal_objects"))
        report = restore_database(repo, keyring, manifest, restored, jobs=3, validation=validation)
        assert report.ok, report.validation_problems
        assert report.validation == validation
        assert set(report.seconds) >= {"schema", "load", "post_data", "validate", "total"}
        assert schema_text(restored) == schema_text(source)
        for what, query in CHECKS.items():
            assert table_rows(restored, query) == table_rows(source, query), what


def test_full_validation_catches_a_row_changed_after_loading(system_pg: DatabaseFactory, tmp_path: Path,
                                                             master_key: str) -> None:
    """Full validation reads the restored tables back from the server, so it sees what the server holds."""
    source = system_pg.create()
    execute(source, "CREATE TABLE t (id int, v text); INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 50) g")
    policy = make_policy(tmp_path, {"pos": source})
    manifest = run_backup(policy, "pos").manifest
    # A target where an event trigger adds a row-changing trigger to every new table: the restore's
    # loads then store other values than the backup holds.
    target = system_pg.create()
    execute(target, """
        CREATE FUNCTION shout() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.v := upper(NEW.v); RETURN NEW; END $$;
        CREATE FUNCTION add_shout() RETURNS event_trigger LANGUAGE plpgsql AS $$
        DECLARE r record;
        BEGIN
          FOR r IN SELECT * FROM pg_event_trigger_ddl_commands() WHERE command_tag = 'CREATE TABLE' LOOP
            EXECUTE format('CREATE TRIGGER shout BEFORE INSERT ON %s FOR EACH ROW EXECUTE FUNCTION public.shout()',
                           r.object_identity);
          END LOOP;
        END $$;
        CREATE EVENT TRIGGER add_shout ON ddl_command_end EXECUTE FUNCTION add_shout();
    """)

    # (the target holds functions, not tables, so it counts as empty)
    report = restore_database(open_repository(policy), load_keyring(policy), manifest, target, validation="full")
    assert not report.ok
    assert report.validation_problems == ["table public.t has the same row count but different content",
                                          f"the restored copy was dropped: {describe_dsn(target)} is as it was"]
    # the copy that differs was never published: the target is as it was (its event trigger, no table)
    assert table_rows(target, "SELECT count(*) FROM pg_tables WHERE tablename = 't'") == [(0,)]
    assert table_rows(target, "SELECT evtname FROM pg_event_trigger") == [("add_shout",)]


def test_one_failing_worker_stops_the_others_and_its_error_is_raised() -> None:
    first_three = threading.Barrier(3)
    stopped: list[int] = []
    finished: list[int] = []

    def work(item: int, cancelled: threading.Event) -> int:
        if item < 3:
            first_three.wait(timeout=5)  # 0, 1 and 2 run at the same time
        if item == 0:
            raise ValueError("table 0 is broken")
        deadline = time.monotonic() + 10
        try:
            while time.monotonic() < deadline:  # a long stream, chunk by chunk
                check(cancelled)
                time.sleep(0.01)
        except Cancelled:
            stopped.append(item)
            raise
        finished.append(item)
        return item

    start = time.monotonic()
    with pytest.raises(ValueError, match="table 0 is broken"):
        map_parallel(work, [0, 1, 2, 3, 4], jobs=3, name="test")
    assert time.monotonic() - start < 5  # the others stopped at their next chunk, not after 10 s
    assert {1, 2} <= set(stopped) and finished == []


def test_results_come_back_in_the_order_of_the_items() -> None:
    def work(item: int, cancelled: threading.Event) -> int:
        time.sleep(0.01 * (5 - item))
        return item * 10

    assert map_parallel(work, [1, 2, 3, 4], jobs=4, name="test") == [10, 20, 30, 40]
