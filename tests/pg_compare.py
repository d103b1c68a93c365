"""Comparing two PostgreSQL databases the way an auditor would: schema text and table contents."""

from __future__ import annotations

import subprocess

import psycopg

from regal_dagster.engine.postgresql.connection import libpq_environment
from regal_dagster.engine.postgresql.tools import find_pg_tool


def schema_text(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        major = conn.info.server_version // 10000
    tool = find_pg_tool("pg_dump", major)
    out = subprocess.run([str(tool.path), "--schema-only", "--no-owner", "--no-privileges", "--encoding=UTF8"],
                         env=libpq_environment(dsn), capture_output=True, text=True, check=True).stdout
    # Comments name the database; \restrict lines carry a random key per run.
    return "\n".join(line for line in out.splitlines()
                     if line and not line.startswith("--") and not line.startswith(("\\restrict", "\\unrestrict")))


def table_rows(dsn: str, query: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(query).fetchall()


def execute(dsn: str, statement: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement)
