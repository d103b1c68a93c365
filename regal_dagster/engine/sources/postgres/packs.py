"""Small tables stored several to an object (a pack), and read back out of it.

Every stored object costs the same whatever its size: a file or an upload, an encryption stream, a zstd
frame, a manifest record, a read by every check. For thousands of tables of a few rows that cost was most of a
backup (and of its checks), so tables whose rows are estimated small are stored `PACK_TABLES` to an object: their
COPY texts one after the other. Each keeps its own identity in the manifest (`source.tables[]`): its pack
(`object`), where its text starts in the pack's plaintext (`offset`), how long it is (`length`), its row count
and the SHA-256 of its own text (`sha256`, the table fingerprint, as for a table stored alone). A table with
no `offset` has its object to itself (every table of a manifest before version 4, and big tables).

A restore loads one pack in one transaction (a load batch), reading the pack once and cutting it at the
recorded extents; each table's text is checked against its SHA-256 on the way in.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from ...errors import IntegrityError
from ...manifest import Manifest, ObjectRecord
from ...parallel import check
from ..base import StoreObject
from .dump import PAGE_BYTES, TABLE_CONTENT, DumpSession, Table, TableDigest

# A table is packed when its rows are estimated (pg_class.relpages) under PACK_TABLE_BYTES; a pack holds at most
# PACK_TABLES tables and about PACK_BYTES of estimated rows. A restore loads a pack in one transaction, so
# PACK_TABLES is the load batch's limit (loading.LOAD_BATCH_TABLES): each table takes a few locks there.
PACK_TABLE_BYTES = 1 << 20
PACK_TABLES = 32
PACK_BYTES = 8 << 20
PACK_CONTENT = "COPY text rows of {count} tables, one after the other (a pack)"


def dump_groups(tables: list[Table]) -> list[list[Table]]:
    """The tables as they are stored: each big one alone, the small ones in packs; the biggest first."""
    alone = [[t] for t in tables if t.pages * PAGE_BYTES >= PACK_TABLE_BYTES]
    packs: list[list[Table]] = []
    size = 0
    for table in (t for t in tables if t.pages * PAGE_BYTES < PACK_TABLE_BYTES):
        estimate = table.pages * PAGE_BYTES
        if not packs or len(packs[-1]) >= PACK_TABLES or size + estimate > PACK_BYTES:
            packs.append([])
            size = 0
        packs[-1].append(table)
        size += estimate
    return sorted(alone, key=lambda g: -g[0].pages) + packs


def store_group(session: DumpSession, store: StoreObject, name: str, tables: list[Table], zstd_threads: int,
                cancelled: threading.Event) -> tuple[ObjectRecord, list[dict[str, Any]]]:
    """One object holding the rows of `tables` (one table: its object; more: a pack), and each table's facts."""
    facts: list[dict[str, Any]] = []

    def chunks() -> Iterator[bytes]:
        offset = 0
        for table in tables:
            digest, length = TableDigest(), 0
            for chunk in session.table_chunks(table):
                check(cancelled)
                digest.update(chunk)
                length += len(chunk)
                yield chunk
            facts.append({**digest.facts(table), **({"offset": offset, "length": length} if len(tables) > 1 else {})})
            offset += length

    content = PACK_CONTENT.format(count=len(tables)) if len(tables) > 1 else TABLE_CONTENT.format(label=tables[0].label)
    record = store(name, content, chunks(), zstd_threads)
    return record, [{**f, "object": record.name} for f in facts]


def text_bytes(facts: dict[str, Any], sizes: dict[str, int]) -> int:
    """How many bytes of COPY text a table's rows are (`sizes`: plaintext size by object name)."""
    return int(facts["length"]) if "offset" in facts else sizes[facts["object"]]


def extents_problem(manifest: Manifest) -> str | None:
    """Where the packed tables' extents do not tile their packs exactly (each pack's plaintext cut, in order,
    into its tables' texts with nothing left over), said in one sentence; None when they do."""
    by_pack: dict[str, list[dict[str, Any]]] = {}
    for facts in manifest.source.get("tables", []):
        if "offset" in facts:
            by_pack.setdefault(facts["object"], []).append(facts)
    for name, packed in by_pack.items():
        position = 0
        for facts in sorted(packed, key=lambda f: (f["offset"], f["length"])):
            if facts["offset"] != position or facts["length"] < 0:
                return (f"table {facts['schema']}.{facts['name']} starts at byte {facts['offset']} of pack {name}, "
                        f"where byte {position} was expected")
            position += facts["length"]
        if position != manifest.object(name).plaintext_size:
            return f"the tables of pack {name} hold {position} bytes, the pack {manifest.object(name).plaintext_size}"
    return None


class ExtentSplitter:
    """Cuts one object's plaintext, fed chunk by chunk (`feed`), into the texts of some of the tables it holds
    (`wanted`, each (facts, table)), skipping the others: each table's text goes to the COPY `open_copy(table)`
    gives, and is checked against its keyed fingerprint (`matches(fingerprint, SHA-256)`: the keyring's
    fingerprint_matches; IntegrityError naming the table and object when it differs). `finish` once the object
    has been read. A whole-object table is the extent (0, the object's plaintext size)."""

    def __init__(self, record: ObjectRecord, wanted: list[tuple[dict[str, Any], Table]],
                 open_copy: Callable[[Table], contextlib.AbstractContextManager[Any]], copies: contextlib.ExitStack,
                 matches: Callable[[str, str], bool]):
        self.record, self.open_copy, self.copies, self.matches = record, open_copy, copies, matches
        self.entries = sorted(((self._extent(facts), facts, table) for facts, table in wanted), key=lambda e: e[0])
        self.packed = any("offset" in facts for facts, _ in wanted)  # a whole object's SHA-256 is read_stream's
        self.next = 0  # the entry being (or about to be) loaded
        self.position = 0  # of the next byte fed, in the object's plaintext
        self.writer: Callable[[bytes], Any] | None = None
        self.digest = hashlib.sha256()
        self.done: list[dict[str, Any]] = []

    def _extent(self, facts: dict[str, Any]) -> tuple[int, int]:
        if "offset" not in facts and facts["sha256"] != self.record.plaintext_sha256:
            raise IntegrityError(f"the manifest gives table {facts['schema']}.{facts['name']} another SHA-256 than its "
                                 f"object {self.record.key}", "the manifest is damaged: use another backup")
        offset, length = ((int(facts["offset"]), int(facts["length"])) if "offset" in facts
                          else (0, self.record.plaintext_size))
        if offset < 0 or length < 0 or offset + length > self.record.plaintext_size:
            raise IntegrityError(f"the manifest places table {facts['schema']}.{facts['name']} at bytes {offset} to "
                                 f"{offset + length} of object {self.record.key}, which holds "
                                 f"{self.record.plaintext_size}", "the manifest is damaged: use another backup")
        return offset, length

    def feed(self, chunk: bytes) -> None:
        start, end = self.position, self.position + len(chunk)
        self.position = end
        while self.next < len(self.entries):
            (offset, length), facts, table = self.entries[self.next]
            if offset > end or (offset == end and length > 0):
                return  # starts in a later chunk
            if self.writer is None:
                self.writer = self.copies.enter_context(self.open_copy(table)).write
                self.digest = hashlib.sha256()
            low, high = max(offset, start) - start, min(offset + length, end) - start
            if high > low:
                piece = chunk[low:high] if (low, high) != (0, len(chunk)) else chunk
                if self.packed:
                    self.digest.update(piece)
                self.writer(piece)
            if offset + length > end:
                return  # goes on in the next chunk
            if self.packed and not self.matches(facts["sha256"], self.digest.hexdigest()):  # before the COPY ends
                raise IntegrityError(f"table {table.label} in object {self.record.key}: its rows differ from the "
                                     "manifest's SHA-256", "this backup is damaged: use another one")
            self.copies.close()  # this table's COPY ends
            self.writer = None
            self.done.append(facts)
            self.next += 1

    def finish(self) -> None:
        self.feed(b"")  # the tables with no rows at the very end
        if self.next < len(self.entries):
            raise IntegrityError(f"object {self.record.key} ends before its table "
                                 f"{self.entries[self.next][2].label} does", "this backup is damaged: use another one")
