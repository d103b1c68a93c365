"""Validating a restored database against its backup: every table read back from the server (row count and
SHA-256 of its COPY text), `jobs` tables at a time."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg

from ...crypto import Keyring
from ...errors import ToolError
from ...manifest import Manifest
from ...postgresql.connection import encoded, session_codec
from ...postgresql.tools import PgTool
from .dump import PSQL_COPY_BYTES, Table, TableDigest, copy_out, psql_copy_out, session_settings
from .loading import SessionPool
from .packs import text_bytes

VALIDATION = {
    "full": "every table read back from the server: row count and SHA-256 of its rows match the backup",
    "rows": "every table's row count, counted once the whole load is done, matches the backup (its bytes were "
            "authenticated on the way in)",
}


def restored_table_facts(dsn: str, tables: list[Table], psql: PgTool | None = None, jobs: int = 1,
                         encoding: str | None = None, sizes: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Row count and SHA-256 of each table's COPY text in a restored database (read in the backup's
    encoding), `jobs` tables at a time. A table whose backup held more than PSQL_COPY_BYTES (`sizes`: COPY
    text bytes by table label) is read by a `psql` child, the others in-process."""
    def digest(table: Table) -> dict[str, Any] | None:
        d = TableDigest()
        try:
            if psql is not None and (sizes or {}).get(table.label, 0) > PSQL_COPY_BYTES:
                conn = sessions.get()
                for chunk in psql_copy_out(psql, dsn, table, session_settings(conn, encoding), session_codec(conn),
                                           encoding):
                    d.update(chunk)
            else:
                with sessions.get().cursor() as cur:
                    for chunk in copy_out(cur, table, encoding):
                        d.update(chunk)
        except psycopg.Error:
            return None  # missing or unreadable: compare_tables reports it missing
        except ToolError as exc:
            if "does not exist" in exc.message:
                return None
            raise ToolError(f"validation could not read table {table.label} back: {exc.message}",
                            "fix the cause above (psql must reach the server like the restore did), then restore "
                            "again; the restored copy was not published") from None
        return d.facts(table)

    with SessionPool(dsn, lambda conn: session_settings(conn, encoding)) as sessions, \
            ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="pg-validate") as pool:
        return [facts for facts in pool.map(digest, tables) if facts is not None]


def counted_tables(dsn: str, loaded: list[dict[str, Any]], jobs: int, encoding: str | None) -> list[dict[str, Any]]:
    """The loaded tables with the rows each holds now, counted by the server (`SELECT count(*) FROM ONLY`, its
    own rows, not its children's), `jobs` at a time: what the whole load left, not what COPY said while loading
    (a later statement may have emptied a table loaded before). A table that cannot be read is left out
    (compare_tables reports it missing)."""
    def count(facts: dict[str, Any]) -> dict[str, Any] | None:
        table = Table.from_facts(facts)
        try:
            with sessions.get().cursor() as cur:
                cur.execute(encoded(cur.connection, f"SELECT count(*) FROM ONLY {table.dump_pattern()}"))
                return {**facts, "rows": int(cur.fetchone()[0])}  # type: ignore[index]
        except psycopg.Error:
            return None

    with SessionPool(dsn, lambda conn: session_settings(conn, encoding)) as sessions, \
            ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="pg-count") as pool:
        return [facts for facts in pool.map(count, loaded) if facts is not None]


def validated_tables(dsn: str, keyring: Keyring, manifest: Manifest, tables: list[Table], loaded: list[dict[str, Any]],
                     validation: str, psql: PgTool, jobs: int, encoding: str | None) -> list[dict[str, Any]]:
    """The facts of the restored tables to compare with the backup's, read once the whole load is done: with
    `full` validation, every table read back from the server, its SHA-256 keyed as the backup's fingerprint was
    (with the same key, so equal text means equal content); else each loaded table's rows counted (its
    fingerprint the backup's, its bytes having been authenticated on the way in)."""
    if validation != "full":
        return counted_tables(dsn, loaded, jobs, encoding)
    table_facts: list[dict[str, Any]] = manifest.source.get("tables", [])
    sizes = {record.name: record.plaintext_size for record in manifest.objects}
    recorded = {Table.from_facts(t).label: str(t["sha256"]) for t in table_facts}
    restored = restored_table_facts(dsn, tables, psql, jobs, encoding,
                                    {Table.from_facts(t).label: text_bytes(t, sizes) for t in table_facts})
    return [{**facts, "sha256": keyring.fingerprint(facts["sha256"], like=recorded.get(Table.from_facts(facts).label))}
            for facts in restored]
