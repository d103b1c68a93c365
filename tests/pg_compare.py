"""Comparing two PostgreSQL databases the way an auditor would: schema text and table contents."""

from __future__ import annotations

import subprocess

import psycopg

from regal_dagster.engine.postgresql.connection import libpq_environment
from regal_dagster.engine.postgresql.tools import find_pg_tool


def schema_text(dsn: str, *, owners_and_grants: bool = False) -> str:
    """pg_dump's schema text (of the server's major version), without owners and grants unless asked."""
    with psycopg.connect(dsn) as conn:
        major = conn.info.server_version // 10000
    leave_out = [] if owners_and_grants else ["--no-owner", "--no-privileges"]
    out = subprocess.run([str(find_pg_tool("pg_dump", major).path), "--schema-only", *leave_out, "--encoding=UTF8"],
                         env=libpq_environment(dsn), capture_output=True, text=True, check=True).stdout
    # Comments name the database; \restrict lines carry a random key per run.
    return "\n".join(line for line in out.splitlines()
                     if line and not line.startswith(("--", "\\restrict", "\\unrestrict")))


def schema_bytes(dsn: str) -> bytes:
    """pg_dump's schema text in the database's own encoding, as bytes (a SQL_ASCII database's names may be valid
    in no encoding: pg_dump cannot convert them to UTF-8), without owners and grants."""
    with psycopg.connect(dsn) as conn:
        major = conn.info.server_version // 10000
    out = subprocess.run([str(find_pg_tool("pg_dump", major).path), "--schema-only", "--no-owner", "--no-privileges"],
                         env=libpq_environment(dsn), capture_output=True, check=True).stdout
    return b"\n".join(line for line in out.splitlines()
                       if line and not line.startswith((b"--", b"\\restrict", b"\\unrestrict")))


def pg_dump_restore(source: str, target: str) -> str:
    """`pg_dump -Fc` of `source` then plain `pg_restore` into the (new, empty) database `target`, with the tools of
    the target's server: pg_restore's messages (it goes on past errors, as an operator's plain run does)."""
    with psycopg.connect(target) as conn:
        major = conn.info.server_version // 10000
    dump = subprocess.run([str(find_pg_tool("pg_dump", major).path), "--format=custom"], env=libpq_environment(source),
                          capture_output=True, check=True).stdout
    dbname = psycopg.conninfo.conninfo_to_dict(target)["dbname"]
    restored = subprocess.run([str(find_pg_tool("pg_restore", major).path), f"--dbname={dbname}"], input=dump,
                              env=libpq_environment(target), capture_output=True, check=False)
    return restored.stderr.decode(errors="replace")


def table_contents(dsn: str) -> dict[str, list[str]]:
    """Every user table's own rows (not its children's) as text, sorted, by schema-qualified name (in the
    database's own encoding; a SQL_ASCII database's rows as bytes, its names' bytes that are not UTF-8 as
    surrogates, Python's surrogateescape)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        encoding = conn.execute("SELECT pg_encoding_to_char(encoding) FROM pg_database "
                                "WHERE datname = current_database()").fetchone()[0]  # type: ignore[index]
        encoding = encoding.decode() if isinstance(encoding, bytes) else encoding  # SQL_ASCII: text comes as bytes
        conn.execute(f"SET client_encoding = '{encoding}'")
        codec = "utf-8" if encoding == "SQL_ASCII" else conn.info.encoding
        # the same text for the same values whatever the database or role sets
        conn.execute("SET search_path = ''; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; "
                     "SET TimeZone = 'UTC'; SET extra_float_digits = 3; SET bytea_output = 'hex'")
        names = conn.execute("""
            SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
              AND n.nspname !~ '^pg_toast' ORDER BY 1""").fetchall()
        names = [(name.decode(codec, "surrogateescape") if isinstance(name, bytes) else name,) for (name,) in names]
        return {name: [row[0] for row in conn.execute(
                    f"SELECT t::text FROM ONLY {name} t ORDER BY 1".encode(codec, "surrogateescape")).fetchall()]
                for (name,) in names}


def full_schema_text(dsn: str) -> str:
    """pg_dump's schema text with owners and grants."""
    return schema_text(dsn, owners_and_grants=True)


def table_rows(dsn: str, query: str) -> list[tuple[object, ...]]:
    """The query's rows, read without the database's own timeouts (a test database may set 1 ms ones: on a
    loaded machine they would end this session between BEGIN and the query) and outside a transaction."""
    with psycopg.connect(dsn, autocommit=True,
                         options="-c statement_timeout=0 -c idle_in_transaction_session_timeout=0") as conn:
        return conn.execute(query).fetchall()


def execute(dsn: str, statement: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement)
