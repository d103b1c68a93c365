"""A database of every kind of object PostgreSQL 15 has, restored by Regal and by `pg_dump -Fc | pg_restore`.

Both restores go into new databases on the machine's PostgreSQL 15 beside the source; each must give back
the source's pg_dump text (owners and grants included), every table's own rows, large objects, sequence
states, materialized views populated or not, and the database's settings. The corpus is written to be
awkward: extensions, ICU collations, every user-defined type, inheritance with rows in parent and child,
nested and default partitions, identity and generated columns, exclusion constraints, deferrable foreign
keys with cyclic rows, rules, statement and constraint triggers, an event trigger, row-level security
forced on the owner, default privileges, a foreign table, float and numeric special values, text that
looks like COPY syntax, and names in every script.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from regal_dagster.engine.backup import run_backup
from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.postgresql.connection import libpq_environment
from regal_dagster.engine.postgresql.tools import find_pg_tool
from regal_dagster.engine.restore_test import run_restore_test
from regal_dagster.engine.sources.postgres.restore import restore_database
from regal_dagster.engine.storage import open_repository

from .conftest import DatabaseFactory, make_policy
from .pg_compare import execute, full_schema_text, table_contents, table_rows

CORPUS_SQL = r"""
CREATE EXTENSION hstore; CREATE EXTENSION citext; CREATE EXTENSION btree_gist; CREATE EXTENSION pg_trgm;
CREATE EXTENSION postgres_fdw;
CREATE SCHEMA app AUTHORIZATION {owner};
CREATE SCHEMA "Mixed Case ünï";
ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA app GRANT SELECT ON TABLES TO {reader};

-- types, collations, text search, operators, aggregates, casts
CREATE TYPE app.mood AS ENUM ('sad', 'ok', 'happy');
-- next transaction
ALTER TYPE app.mood ADD VALUE 'meh' BEFORE 'ok';
-- next transaction
CREATE DOMAIN app.positive AS numeric CHECK (VALUE > 0) NOT NULL;
CREATE DOMAIN app.codes AS text[] CHECK (cardinality(VALUE) < 5);
CREATE TYPE app.money_pair AS (amount numeric, currency char(3));
CREATE TYPE app.floatrange AS RANGE (subtype = float8, subtype_diff = float8mi);
CREATE COLLATION app.nocase (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
CREATE COLLATION app.german (provider = icu, locale = 'de-DE');
CREATE TEXT SEARCH CONFIGURATION app.simple_en (COPY = english);
ALTER TEXT SEARCH CONFIGURATION app.simple_en DROP MAPPING FOR email;
CREATE FUNCTION app.pair_add(app.money_pair, app.money_pair) RETURNS app.money_pair
    LANGUAGE sql IMMUTABLE AS $$ SELECT ROW($1.amount + $2.amount, $1.currency)::app.money_pair $$;
CREATE OPERATOR app.<+> (LEFTARG = app.money_pair, RIGHTARG = app.money_pair, FUNCTION = app.pair_add);
CREATE AGGREGATE app.pair_sum(app.money_pair) (SFUNC = app.pair_add, STYPE = app.money_pair);
CREATE FUNCTION app.mood_text(app.mood) RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT upper(format('%s', $1)) $$;
CREATE CAST (app.mood AS text) WITH FUNCTION app.mood_text(app.mood);
CREATE PROCEDURE app.bump(INOUT n int) LANGUAGE plpgsql AS $$ BEGIN n := n + 1; END $$;

-- tables: identity, generated, domains, every awkward value
CREATE TABLE app.things (
    id int GENERATED ALWAYS AS IDENTITY (START WITH 1000 INCREMENT BY 7) PRIMARY KEY,
    name text COLLATE app.nocase NOT NULL,
    nick citext,
    feeling app.mood DEFAULT 'ok',
    price app.positive,
    codes app.codes,
    pair app.money_pair,
    span app.floatrange,
    attrs hstore,
    doc jsonb,
    words tsvector,
    ints int[][],
    raw bytea,
    f8 float8,
    f4 real,
    n numeric,
    at timestamptz,
    d date,
    iv interval,
    cash money,
    addr inet,
    bits bit varying(16),
    u uuid,
    j json,
    x xml,
    pt point,
    ring circle,
    q tsquery,
    lsn pg_lsn,
    mac macaddr8,
    ranges int4multirange,
    shout text GENERATED ALWAYS AS (upper(name)) STORED,
    "select" text,
    "Ünïcödé ☕" text
) WITH (fillfactor = 70, autovacuum_enabled = false);
ALTER TABLE app.things ALTER COLUMN raw SET STORAGE EXTERNAL, ALTER COLUMN doc SET STATISTICS 500,
    ALTER COLUMN words SET COMPRESSION lz4;
ALTER TABLE app.things OWNER TO {owner};
INSERT INTO app.things (name, nick, feeling, price, codes, pair, span, attrs, doc, words, ints, raw, f8, f4, n, at,
                        d, iv, cash, addr, bits, u, j, x, pt, ring, q, lsn, mac, ranges, "select", "Ünïcödé ☕")
VALUES
  ('Widget', 'WIDGET', 'happy', 1.5, '{a,b}', ROW(2.5, 'EUR'), '[1.5,2.5)', 'a=>1, "b c"=>NULL',
   '{"k": [1, 2.50, null, "\u00e9"]}', to_tsvector('english', 'The quick brown foxes'), '{{1,2},{3,4}}',
   '\x00ff5c0a0d09'::bytea, 'NaN', '-Infinity', 'NaN', 'infinity', '-infinity', '1 year 2 mons -3 days 04:05:06.789',
   12.34, '2001:db8::1/64', B'1011', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
   '{"b": 1,  "a": [2, 1], "b": 3}', '<a>x</a><b/>text', '(1.5,-0)', '<(0,0),1e-300>', 'fat & !rat:*',
   '16/B374D848', '08:00:2b:01:02:03:04:05', '{[1,3), [5,7)}', E'\\.', E'line\nbreak\ttab\\back'),
  ('gadget', NULL, 'meh', 0.000001, '{}', NULL, 'empty', '', '[]', '', '{}', '', -0.0, 3.4028235e38,
   '-0.000000000000000000001', '2026-03-29 01:30:00+01', '0001-01-01 BC', '-177999999 years', -0.01, '10.0.0.0/8',
   B'', NULL, '[]', 'just text', NULL, NULL, '', '0/0', NULL, '{}', '\N', E'\\N'),
  ('Ἀθῆναι', 'ἈΘῆΝΑΙ', 'sad', 1e100, '{NULL}', ROW(NULL, NULL), '(,)', NULL, 'null', NULL, NULL,
   decode(repeat('00', 3000), 'hex'), 1e-308, 1.17549435e-38, 1e1000, '1999-12-31 23:59:59.999999+14',
   '2026-02-28', '0', 0, '::ffff:1.2.3.4', B'1111000011110000', '00000000-0000-0000-0000-000000000000',
   'null', '<?xml version="1.0"?><doc>é</doc>', '(NaN,Infinity)', NULL, 'a <-> b', 'FFFFFFFF/FFFFFFFF',
   'ff:ff:ff:ff:ff:ff:ff:ff', '{(,)}', '"quoted"', repeat('é', 5000));
CREATE INDEX things_trgm ON app.things USING gin (name gin_trgm_ops);
CREATE INDEX things_partial ON app.things (price) INCLUDE (feeling) WHERE feeling <> 'sad';
CREATE INDEX things_expr ON app.things ((lower(name)), (doc -> 'k')) WITH (fillfactor = 50);
CREATE INDEX things_brin ON app.things USING brin (at);
CREATE INDEX things_hash ON app.things USING hash (u);
ALTER TABLE app.things CLUSTER ON things_expr;
ALTER TABLE app.things REPLICA IDENTITY FULL;
CREATE STATISTICS app.things_stats (ndistinct, dependencies) ON feeling, price FROM app.things;
COMMENT ON TABLE app.things IS 'things; with ''quotes'' and a
newline';
COMMENT ON COLUMN app.things."Ünïcödé ☕" IS 'Ünïcödé';

-- inheritance with rows in the parent and the children, a child with a column of its own
CREATE TABLE app.events (id bigint, at timestamptz NOT NULL, what text);
CREATE TABLE app.click_events (x int, y int) INHERITS (app.events);
CREATE TABLE app.key_events (key text) INHERITS (app.events);
INSERT INTO app.events VALUES (1, '2026-01-01', 'parent row');
INSERT INTO app.click_events VALUES (2, '2026-01-02', 'click', 10, 20);
INSERT INTO app.key_events VALUES (3, '2026-01-03', 'key', 'Enter');

-- nested and default partitions; a partition attached from a table with another column order
CREATE TABLE app.sales (region text, sold date NOT NULL, amount numeric) PARTITION BY LIST (region);
CREATE TABLE app.sales_eu PARTITION OF app.sales FOR VALUES IN ('de', 'fr') PARTITION BY RANGE (sold);
CREATE TABLE app.sales_eu_2026 PARTITION OF app.sales_eu FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
CREATE TABLE app.sales_eu_old PARTITION OF app.sales_eu DEFAULT;
CREATE TABLE app.sales_other (amount numeric, sold date NOT NULL, region text);
ALTER TABLE app.sales ATTACH PARTITION app.sales_other DEFAULT;
INSERT INTO app.sales SELECT (ARRAY['de', 'fr', 'us', NULL])[g % 4 + 1], date '2025-12-01' + g, g * 1.1
    FROM generate_series(1, 200) g;
CREATE INDEX ON app.sales (sold);

-- constraints: exclusion, deferrable cyclic foreign keys, NOT VALID, NULLS NOT DISTINCT
CREATE TABLE app.bookings (room int, during tstzrange, EXCLUDE USING gist (room WITH =, during WITH &&));
INSERT INTO app.bookings VALUES (1, '[2026-01-01,2026-01-02)'), (1, '[2026-01-02,2026-01-03)'), (2, NULL);
CREATE TABLE app.people (id int PRIMARY KEY, partner int, email text,
                         UNIQUE NULLS NOT DISTINCT (email));
ALTER TABLE app.people ADD FOREIGN KEY (partner) REFERENCES app.people DEFERRABLE INITIALLY DEFERRED;
INSERT INTO app.people VALUES (1, 2, 'a@x'), (2, 1, NULL);
CREATE TABLE app.legacy (v int);
INSERT INTO app.legacy VALUES (-1), (5);
ALTER TABLE app.legacy ADD CONSTRAINT legacy_positive CHECK (v > 0) NOT VALID;

-- sequences in every state
CREATE SEQUENCE app.fresh;
CREATE SEQUENCE app.used INCREMENT -3 MINVALUE -100 MAXVALUE 10 START 10 CYCLE CACHE 5;
SELECT nextval('app.used'), nextval('app.used');
CREATE SEQUENCE app.not_called; SELECT setval('app.not_called', 42, false);
CREATE TABLE app.owned (id int); CREATE SEQUENCE app.owned_seq OWNED BY app.owned.id;

-- views, materialized views populated and not, rules, triggers, event trigger
CREATE VIEW app.cheap WITH (security_barrier) AS SELECT id, name FROM app.things WHERE price < 10
    WITH CASCADED CHECK OPTION;
CREATE RECURSIVE VIEW app.countdown (n) AS SELECT 3 UNION ALL SELECT n - 1 FROM countdown WHERE n > 0;
CREATE MATERIALIZED VIEW app.totals AS SELECT feeling, count(*) AS n FROM app.things GROUP BY feeling;
CREATE UNIQUE INDEX ON app.totals (feeling);
CREATE MATERIALIZED VIEW app.later AS SELECT now() AS at WITH NO DATA;
CREATE TABLE app.audit_log (at timestamptz DEFAULT now(), what text);
CREATE RULE log_legacy AS ON INSERT TO app.legacy DO ALSO INSERT INTO app.audit_log (what) VALUES ('legacy');
CREATE FUNCTION app.stamp() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.what := NEW.what || ' (stamped)'; RETURN NEW; END $$;
CREATE TRIGGER stamp BEFORE INSERT ON app.audit_log FOR EACH ROW EXECUTE FUNCTION app.stamp();
INSERT INTO app.audit_log VALUES ('2026-01-01', 'first');
CREATE FUNCTION app.no_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'no truncating'; END $$;
CREATE TRIGGER no_truncate BEFORE TRUNCATE ON app.audit_log EXECUTE FUNCTION app.no_truncate();
CREATE FUNCTION app.check_people() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER people_check AFTER INSERT ON app.people DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION app.check_people();
ALTER TABLE app.audit_log DISABLE TRIGGER stamp;
CREATE FUNCTION app.note_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$ BEGIN RAISE NOTICE 'ddl'; END $$;
CREATE EVENT TRIGGER note_ddl ON ddl_command_end EXECUTE FUNCTION app.note_ddl();

-- row-level security forced on the owner, grants, a foreign table, a large object, an unlogged table
CREATE TABLE app.secrets (id int, owner_name text, body text);
INSERT INTO app.secrets VALUES (1, 'alice', 'a'), (2, 'bob', 'b');
ALTER TABLE app.secrets ENABLE ROW LEVEL SECURITY;
ALTER TABLE app.secrets FORCE ROW LEVEL SECURITY;
CREATE POLICY mine ON app.secrets USING (owner_name = current_user) WITH CHECK (owner_name = current_user);
GRANT SELECT (id, owner_name), UPDATE (body) ON app.secrets TO {reader};
GRANT USAGE ON SCHEMA app TO {reader};
REVOKE EXECUTE ON FUNCTION app.pair_add FROM PUBLIC;
GRANT EXECUTE ON FUNCTION app.pair_add TO {reader};
CREATE SERVER elsewhere FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host '127.0.0.1', dbname 'nowhere');
CREATE USER MAPPING FOR {reader} SERVER elsewhere OPTIONS (user 'someone');
CREATE FOREIGN TABLE app.remote (id int, v text) SERVER elsewhere OPTIONS (table_name 'remote_v');
SELECT lo_from_bytea(987650, '\x00010203ff'::bytea);
COMMENT ON LARGE OBJECT 987650 IS 'a large object';
ALTER LARGE OBJECT 987650 OWNER TO {owner};
GRANT SELECT ON LARGE OBJECT 987650 TO {reader};
CREATE UNLOGGED TABLE app.scratch (k text PRIMARY KEY, v int);
INSERT INTO app.scratch VALUES ('x', 1);
CREATE TABLE "Mixed Case ünï"."Ta""ble ☕ .*" ("Col ""1"" end" text, " " int);
INSERT INTO "Mixed Case ünï"."Ta""ble ☕ .*" VALUES ('a', 1), (NULL, NULL), ('\.', 3);
CREATE PUBLICATION corpus_pub_{suffix} FOR TABLE app.things, app.sales WITH (publish = 'insert, update');
"""

DATABASE_STATE = {
    "large objects": "SELECT m.oid, pg_get_userbyid(m.lomowner), m.lomacl::text, lo_get(m.oid), "
                     "obj_description(m.oid, 'pg_largeobject') FROM pg_largeobject_metadata m ORDER BY 1",
    "sequences": "SELECT schemaname, sequencename, last_value, start_value, increment_by, cycle "
                 "FROM pg_sequences ORDER BY 1, 2",
    "sequence is_called": "SELECT is_called, last_value FROM app.used UNION ALL "
                          "SELECT is_called, last_value FROM app.not_called",
    "materialized views": "SELECT relname, relispopulated FROM pg_class WHERE relkind = 'm' ORDER BY 1",
    "materialized view rows": "SELECT feeling::text, n FROM app.totals ORDER BY 1",
    "identity": "SELECT pg_get_serial_sequence('app.things', 'id'), "
                "(SELECT last_value FROM app.things_id_seq)",
    "constraints validated": "SELECT conname, convalidated, condeferrable, condeferred FROM pg_constraint "
                             "WHERE connamespace = 'app'::regnamespace ORDER BY 1",
    "triggers enabled": "SELECT tgname, tgenabled FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1",
    "cluster index": "SELECT c.relnamespace::regnamespace::text, c.relname FROM pg_index i "
                     "JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indisclustered",
    "row security": "SELECT relname, relrowsecurity, relforcerowsecurity FROM pg_class "
                    "WHERE relnamespace = 'app'::regnamespace AND relrowsecurity",
    "unlogged": "SELECT relname FROM pg_class WHERE relpersistence = 'u' AND relkind = 'r'",
    "database settings": "SELECT array_to_string(setconfig, ';') FROM pg_db_role_setting "
                         "WHERE setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())",
}


@pytest.fixture
def corpus(system_pg: DatabaseFactory) -> Iterator[tuple[str, str]]:
    """The corpus database on the machine's PostgreSQL 15 and the suffix of its roles (dropped afterwards)."""
    suffix = uuid.uuid4().hex[:6]
    owner, reader = f"corpus_owner_{suffix}", f"corpus_reader_{suffix}"
    execute(system_pg.server_dsn, f"CREATE ROLE {owner} NOLOGIN; CREATE ROLE {reader} NOLOGIN")
    source = system_pg.create("regal_corpus")
    dbname = psycopg.conninfo.conninfo_to_dict(source)["dbname"]
    corpus_sql = CORPUS_SQL.replace("{owner}", owner).replace("{reader}", reader).replace("{suffix}", suffix)
    for transaction in corpus_sql.split("-- next transaction"):  # an enum's new value is usable once committed
        execute(source, transaction)
    # settings that change how values are written and read (the restore's sessions must not follow them)
    execute(source, f"""ALTER DATABASE "{dbname}" SET search_path = app, public;
                       ALTER DATABASE "{dbname}" SET default_text_search_config = 'app.simple_en';
                       ALTER DATABASE "{dbname}" SET IntervalStyle = 'sql_standard';
                       ALTER DATABASE "{dbname}" SET DateStyle = 'SQL, DMY';
                       ALTER DATABASE "{dbname}" SET TimeZone = 'Asia/Kathmandu';
                       ALTER DATABASE "{dbname}" SET extra_float_digits = -3;
                       ALTER DATABASE "{dbname}" SET bytea_output = 'escape';
                       ALTER DATABASE "{dbname}" SET xmloption = 'document';
                       ALTER DATABASE "{dbname}" SET default_transaction_read_only = on;""")
    yield source, suffix
    system_pg.drop_all()
    system_pg.created.clear()
    execute(system_pg.server_dsn, f"DROP ROLE {reader}; DROP ROLE {owner}")


def pg_dump_pg_restore(source: str, factory: DatabaseFactory, scratch: Path) -> tuple[str, str]:
    """What `pg_dump -Fc` then plain `pg_restore` into a new database give: its DSN and pg_restore's stderr."""
    archive = scratch / "corpus.pgdump"
    subprocess.run([str(find_pg_tool("pg_dump", 15).path), "--format=custom", f"--file={archive}"],
                   env=libpq_environment(source), check=True, capture_output=True)
    target = factory.create("regal_corpus_pgr")
    dbname = psycopg.conninfo.conninfo_to_dict(target)["dbname"]
    restored = subprocess.run([str(find_pg_tool("pg_restore", 15).path), f"--dbname={dbname}", str(archive)],
                              env=libpq_environment(target), capture_output=True, text=True,
                              check=False)  # plain pg_restore goes on past errors: the comparison tells
    return target, restored.stderr


def test_a_database_of_every_object_type_comes_back_as_pg_dump_and_pg_restore_bring_it_back(
        corpus: tuple[str, str], system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> None:
    source, _suffix = corpus
    policy = make_policy(tmp_path, {"pos": source})
    manifest = run_backup(policy, "pos").manifest
    restored = system_pg.dsn(system_pg.new_name("regal_corpus_ours"))
    report = restore_database(open_repository(policy), load_keyring(policy), manifest, restored, jobs=3)
    assert report.ok, report.validation_problems
    by_pg_restore, pg_restore_errors = pg_dump_pg_restore(source, system_pg, tmp_path)

    schema, rows = full_schema_text(source), table_contents(source)
    assert full_schema_text(restored) == schema
    assert table_contents(restored) == rows
    for what, query in DATABASE_STATE.items():
        assert table_rows(restored, query) == table_rows(source, query), what
    # pg_dump's own round trip, for comparison: the same schema and rows, and the same state (pg_restore
    # into a database it did not create leaves the database's settings behind; Regal recreates them)
    assert full_schema_text(by_pg_restore) == schema, pg_restore_errors
    assert table_contents(by_pg_restore) == rows
    for what, query in DATABASE_STATE.items():
        if what != "database settings":
            assert table_rows(by_pg_restore, query) == table_rows(source, query), what
    assert "app.scratch" in {f"{t['schema']}.{t['name']}" for t in manifest.source["tables"]}

    # the monthly restore test of this backup: a scratch server with ICU, lz4 and the extensions, and the roles
    assert {"icu", "lz4"} <= set(manifest.source["server_needs"])
    (tmp_path / "scratch").mkdir()
    tested = run_restore_test(policy, open_repository(policy), load_keyring(policy), manifest,
                              work_dir=tmp_path / "scratch")
    assert tested.validation_passed, tested.problems
