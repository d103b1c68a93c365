"""Loading a backup into a (new, empty) database: pg_restore of the archive's sections, and the tables' rows
`jobs` transactions at a time with COPY, every byte authenticated on its way in."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import psycopg

from ...errors import ToolError
from ...manifest import Manifest
from ...parallel import check, map_parallel
from ...pipeline import Progress, StoredBackup
from ...postgresql.connection import (
    apply_settings,
    connect,
    database_of,
    encoded,
    libpq_environment,
    refuses_startup_options,
    server_major,
    with_session_settings,
)
from ...postgresql.tools import PgTool, find_pg_tool
from .dump import RESTORE_SESSION_SETTINGS, Table, only_each, pg_error_reason, session_settings
from .packs import PACK_BYTES, PACK_TABLES, ExtentSplitter, text_bytes


def restore_tools(dsn: str, archive_major: int) -> tuple[PgTool, PgTool]:
    """pg_restore and psql able to read an archive of `dump_major` and talk to the target server."""
    with connect(dsn) as conn:
        major = max(server_major(conn), archive_major)
    return find_pg_tool("pg_restore", major), find_pg_tool("psql", major)


def run_pg_restore(pg_restore: PgTool, dsn: str, archive: Path, sections: list[str], *, jobs: int = 1,
                   keep_owners: bool = True, tablespaces: bool = True, exit_on_error: bool = True) -> list[str]:
    """pg_restore of some sections of an archive file, with restore-friendly session settings.

    With `exit_on_error` a failure raises ToolError; without, pg_restore goes on past failing objects (as
    it does by default) and the returned list says, for each, which statement failed and why."""
    args = [str(pg_restore.path), f"--dbname={database_of(dsn)}", "--no-password", f"--jobs={jobs}",
            *(f"--section={s}" for s in sections)]
    if exit_on_error:
        args.append("--exit-on-error")
    if not keep_owners:
        args += ["--no-owner", "--no-privileges"]
    if not tablespaces:
        args.append("--no-tablespaces")
    # the settings only make it faster: without them through a pooler that refuses them (it failed to connect)
    for settings in (RESTORE_SESSION_SETTINGS, {}):
        env = with_session_settings(libpq_environment(dsn), settings) if settings else libpq_environment(dsn)
        result = subprocess.run([*args, str(archive)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                                check=False)
        if not refuses_startup_options(result.stderr.decode(errors="replace")):
            break
    if result.returncode == 0:
        return []
    text = result.stderr.decode(errors="replace").strip()
    if exit_on_error:
        raise ToolError(f"pg_restore ({', '.join(sections)}) failed with exit code {result.returncode}: {text[-800:]}",
                        "fix the cause above, then restore again into an empty database")
    return pg_restore_errors(text) or [(f"pg_restore ({', '.join(sections)}) failed with exit code "
                                       f"{result.returncode}: {text[-800:]}")]


def pg_restore_errors(stderr: str) -> list[str]:
    """Each failed statement in pg_restore's messages: the server's error and the statement's first line."""
    errors: list[str] = []
    lines = stderr.splitlines()
    for number, line in enumerate(lines):
        if "error:" not in line or "errors ignored on restore" in line:
            continue
        reason = line.split("error:", 1)[1].strip()
        reason = reason.removeprefix("could not execute query:").strip()
        following = lines[number + 1] if number + 1 < len(lines) else ""
        if following.startswith("Command was:"):
            statement = following.removeprefix("Command was:").strip()
            reason += f" (statement: {statement[:200]})"
        errors.append(reason)
    return errors


@dataclass
class TableLoad:
    write: Callable[[bytes], None]  # takes chunks of COPY text


class SessionPool:
    """One connection per worker thread, with the COPY session settings applied once: hundreds of small
    tables cost a statement each, not a connection each."""

    def __init__(self, dsn: str, settings: Callable[[psycopg.Connection[Any]], dict[str, str]]):
        self.dsn, self.settings = dsn, settings
        self._local = threading.local()
        self._all: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()

    def get(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken:
            conn = connect(self.dsn, autocommit=True)
            with self._lock:
                self._all.append(conn)
            apply_settings(conn, self.settings(conn))
            self._local.conn = conn
        return conn

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                with contextlib.suppress(Exception):
                    conn.close()
            self._all.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def loading_pool(dsn: str, encoding: str | None) -> SessionPool:
    return SessionPool(dsn, lambda conn: {**session_settings(conn, encoding), **RESTORE_SESSION_SETTINGS})


# Small tables are loaded several to a transaction (one TRUNCATE, one commit): for hundreds of small
# tables the per-transaction round trips and commits cost more than their rows. A pack (packs.py) is one
# transaction; tables stored alone (big ones, and every table of a backup before packs) are batched: at most
# LOAD_BATCH_TABLES tables (each takes a few locks: well within max_locks_per_transaction) and about
# LOAD_BATCH_BYTES of COPY text; a bigger table is loaded alone.
LOAD_BATCH_TABLES = PACK_TABLES
LOAD_BATCH_BYTES = PACK_BYTES


def load_batches(manifest: Manifest, table_facts: list[dict[str, Any]],
                 tables: list[Table]) -> list[list[tuple[dict[str, Any], Table]]]:
    """The tables grouped into load transactions, the biggest first: each pack's tables together, in the order
    they are in it; the tables stored alone by size."""
    sizes = {record.name: record.plaintext_size for record in manifest.objects}
    packs: dict[str, list[tuple[dict[str, Any], Table]]] = {}
    alone: list[tuple[dict[str, Any], Table]] = []
    for entry in zip(table_facts, tables, strict=True):
        if "offset" in entry[0]:
            packs.setdefault(entry[0]["object"], []).append(entry)
        else:
            alone.append(entry)
    batches: list[list[tuple[dict[str, Any], Table]]] = []
    size = 0
    for entry in sorted(alone, key=lambda t: -sizes[t[0]["object"]]):
        plaintext = sizes[entry[0]["object"]]
        if not batches or size + plaintext > LOAD_BATCH_BYTES or len(batches[-1]) >= LOAD_BATCH_TABLES:
            batches.append([])
            size = 0
        batches[-1].append(entry)
        size += plaintext
    batches += [sorted(packed, key=lambda t: t[0]["offset"]) for packed in packs.values()]
    return sorted(batches, key=lambda batch: -sum(text_bytes(facts, sizes) for facts, _ in batch))


@contextlib.contextmanager
def tables_loader(tables: list[Table], pool: SessionPool,
                  encoding: str | None) -> Iterator[Callable[[Table], contextlib.AbstractContextManager[TableLoad]]]:
    """One transaction that loads (new, empty) tables: the block calls `copy_into(table)` for each, a COPY
    FROM STDIN; all of them commit together when the block ends, or none (ToolError naming the table).

    The tables are truncated in the same transaction first. That gives each a new file, so COPY fills pages
    strictly in order without looking for free space in earlier pages (and may freeze the rows, sparing
    a later anti-wraparound vacuum): the table then reads back in exactly the order it was loaded, which
    is what lets validation compare the SHA-256 of its COPY text with the backup's. (Even a table just
    created needs it: without, COPY records each full page's free space and may put a later, shorter row
    into an earlier page.)"""
    conn = pool.get()
    current = tables[0]

    @contextlib.contextmanager
    def copy_into(table: Table) -> Iterator[TableLoad]:
        nonlocal current
        current = table
        with cur.copy(encoded(conn, table.copy_statement("FROM STDIN", encoding, "FREEZE"))) as copy:
            yield TableLoad(copy.write)

    with conn.cursor() as cur:
        try:
            with conn.transaction():
                # ONLY binds to the one name after it: said for each table, or the later ones are truncated
                # with their inheritance children (loaded by an earlier batch, perhaps)
                cur.execute(encoded(conn, f"TRUNCATE {only_each(tables)}"))
                yield copy_into
        except psycopg.Error as exc:
            which = current.label if len(tables) == 1 else f"{current.label} (with {len(tables) - 1} others)"
            raise ToolError(f"loading table {which} failed: {pg_error_reason(exc)}",
                            "fix the cause above, then restore again into an empty database") from None


def load_tables(backup: StoredBackup, to_dsn: str, batches: list[list[tuple[dict[str, Any], Table]]], jobs: int,
                encoding: str | None, progress: Progress | None = None) -> list[dict[str, Any]]:
    """Each table's rows from the backup into its (new, empty) table, `jobs` batches (load_batches) at a
    time. Per table: its name and SHA-256 once its batch has committed, or `failed` with the server's reason;
    `seconds`: (fetching, decrypting and checking the stored bytes; the server taking them in). What the tables
    hold is counted once the whole load is done (validate.py), never taken from COPY while loading."""
    def load_object(copy_into: Callable[[Table], contextlib.AbstractContextManager[TableLoad]], name: str,
                    wanted: list[tuple[dict[str, Any], Table]], cancelled: threading.Event) -> list[dict[str, Any]]:
        """The tables of `wanted` out of object `name` (one table's, or a pack), reading it once."""
        record = backup.manifest.object(name)
        started, in_server = time.monotonic(), 0.0

        @contextlib.contextmanager
        def timed_copy(table: Table) -> Iterator[TableLoad]:
            def write(chunk: bytes) -> None:
                nonlocal in_server
                check(cancelled)
                mark = time.monotonic()
                loading.write(chunk)
                in_server += time.monotonic() - mark

            with copy_into(table) as loading:
                yield TableLoad(write)

        with contextlib.ExitStack() as copies:
            splitter = ExtentSplitter(record, wanted, timed_copy, copies, backup.keyring.fingerprint_matches)
            backup.stream(record.name, splitter.feed, progress)  # raises unless every byte matches the manifest's
            splitter.finish()
        seconds = [(time.monotonic() - started - in_server, in_server)] + [(0.0, 0.0)] * (len(splitter.done) - 1)
        return [{**{key: facts[key] for key in ("schema", "name", "columns", "name_bytes") if key in facts},
                 "sha256": facts["sha256"], "seconds": spent}
                for facts, spent in zip(splitter.done, seconds, strict=True)]

    def load(batch: list[tuple[dict[str, Any], Table]], cancelled: threading.Event) -> list[dict[str, Any]]:
        started = time.monotonic()
        try:
            with tables_loader([table for _, table in batch], sessions, encoding) as copy_into:
                by_object: dict[str, list[tuple[dict[str, Any], Table]]] = {}
                for facts, table in batch:
                    by_object.setdefault(facts["object"], []).append((facts, table))
                done = [loaded for name, wanted in by_object.items()
                        for loaded in load_object(copy_into, name, wanted, cancelled)]
        except ToolError as exc:  # the server refused it (its table missing, a constraint): go on
            if len(batch) > 1:  # the whole transaction was rolled back: each table on its own, to name it
                return [result for entry in batch for result in load([entry], cancelled)]
            table = batch[0][1]
            return [{**table.facts(), "failed": exc.message,
                     "seconds": (time.monotonic() - started, 0.0)}]
        return done

    with loading_pool(to_dsn, encoding) as sessions:
        return [t for batch in map_parallel(load, batches, jobs, "load") for t in batch]
