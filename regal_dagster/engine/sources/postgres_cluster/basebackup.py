"""pg_basebackup as a stream: the tar of the data directory on its stdout, never on local disk; the backup
manifest PostgreSQL appends to that stream picked out as it passes; the WAL range from its report."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ...errors import IntegrityError, ToolError
from ...pipeline import read_ahead
from ...postgresql.tools import PgTool
from ..streams import larger_pipe

BLOCK = 512
# pg_basebackup's words when the server cannot build an incremental backup on the given manifest
# A failover while the backup ran: the standby it read was promoted, or the server went away under it.
_TOPOLOGY_CHANGED = re.compile(r"promoted during online backup|server closed the connection unexpectedly|"
                               r"terminating connection due to administrator command|the database system is shutting")
_INCREMENTAL_REFUSAL = re.compile(r"WAL summar|incremental backup|system identifier in backup manifest|"
                                  r"manifest requires WAL", re.IGNORECASE)
MANIFEST_MEMBER = "backup_manifest"


class TarWatcher:
    """Follows a tar stream chunk by chunk and keeps the content of one member (small: the manifest)."""

    def __init__(self, wanted: str):
        self.wanted = wanted
        self.found: bytes | None = None
        self._header = bytearray()
        self._content_left = 0
        self._pad_left = 0
        self._capture: bytearray | None = None
        self._long_name: bytearray | None = None
        self._next_name: str | None = None
        self._ended = False

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        i = 0
        while i < len(view) and not self._ended:
            if self._content_left:
                n = min(self._content_left, len(view) - i)
                if self._capture is not None:
                    self._capture += view[i:i + n]
                self._content_left -= n
                i += n
                if not self._content_left:
                    self._member_done()
            elif self._pad_left:
                n = min(self._pad_left, len(view) - i)
                self._pad_left -= n
                i += n
            else:
                n = min(BLOCK - len(self._header), len(view) - i)
                self._header += view[i:i + n]
                i += n
                if len(self._header) == BLOCK:
                    self._start_member(bytes(self._header))
                    self._header.clear()

    def _start_member(self, header: bytes) -> None:
        if header == b"\0" * BLOCK:
            self._ended = True
            return
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if header[257:262] == b"ustar" and (prefix := header[345:500].split(b"\0", 1)[0]):
            name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        if self._next_name is not None:
            name, self._next_name = self._next_name, None
        size_field = header[124:136]
        if size_field[0] & 0x80:  # base-256 (GNU) for sizes of 8 GiB and more
            size = int.from_bytes(bytes([size_field[0] & 0x7F]) + size_field[1:], "big")
        else:
            size = int(size_field.split(b"\0", 1)[0].strip() or b"0", 8)
        typeflag = header[156:157]
        self._content_left, self._pad_left = size, (BLOCK - size % BLOCK) % BLOCK
        self._capture = None
        self._long_name = None
        if typeflag == b"L":
            self._long_name = self._capture = bytearray()
        elif typeflag in (b"0", b"\0") and name == self.wanted:
            self._capture = bytearray()
        if not size:
            self._member_done()

    def _member_done(self) -> None:
        if self._long_name is not None:
            self._next_name = bytes(self._long_name).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif self._capture is not None:
            self.found = bytes(self._capture)
        self._capture = self._long_name = None


@dataclass
class BaseBackupRun:
    manifest: bytes = b""
    report: str = ""  # pg_basebackup's own words (-v), for the facts and for errors
    facts: dict[str, Any] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None  # pg_basebackup, while it runs


@contextlib.contextmanager
def basebackup_stream(tool: PgTool, env: dict[str, str], run: BaseBackupRun,
                      incremental_from: Path | None = None) -> Iterator[Iterator[bytes]]:
    """The chunks of pg_basebackup's tar stream; `run` is filled in once the stream has ended. A failure of
    pg_basebackup is an error naming its last words; leaving early stops it. `incremental_from`: the parent
    backup's backup_manifest, for an incremental backup."""
    command = [str(tool.path), "-D", "-", "-F", "t", "-X", "none", "--manifest-checksums=SHA256",
               "--checkpoint=fast", "--no-password", "--verbose", "--label=regal-backup"]
    if incremental_from is not None:
        command.append(f"--incremental={incremental_from}")
    watcher = TarWatcher(MANIFEST_MEMBER)
    with tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=env)
        run.process = process
        assert process.stdout is not None
        stdout: IO[bytes] = process.stdout

        larger_pipe(stdout)

        def chunks() -> Iterator[bytes]:
            for chunk in read_ahead(stdout):  # pg_basebackup goes on while we compress and encrypt
                watcher.feed(chunk)
                yield chunk
            if process.wait() != 0:
                err.seek(0)
                words = err.read().strip().splitlines()
                if incremental_from is not None and any(_INCREMENTAL_REFUSAL.search(w) for w in words):
                    raise ToolError("pg_basebackup refused the incremental backup: "
                                    + " / ".join(w for w in words if _INCREMENTAL_REFUSAL.search(w))[:600],
                                    "the server lacks the WAL summaries from the parent backup's start (summarize_wal "
                                    "was off, or they were removed after wal_summary_keep_time): take a full backup "
                                    "(`regal-backup backup TARGET --full`), then incrementals on top of it")
                if any(_TOPOLOGY_CHANGED.search(w) for w in words):  # a failover in the middle of it
                    raise ToolError(f"pg_basebackup failed with exit code {process.returncode}: the server's role "
                                    "changed during the backup (a failover): " + " / ".join(words[-3:]),
                                    "nothing was stored; take the backup again: it goes to the servers as they are "
                                    "now (after a failover point `dsn` at the new primary, or use a multi-host DSN "
                                    "with target_session_attrs=primary)")
                raise ToolError(f"pg_basebackup failed with exit code {process.returncode}: "
                                + " / ".join(words[-3:]),
                                "check that the DSN's role may replicate (REPLICATION), that pg_hba.conf has a "
                                "`replication` line for it, that max_wal_senders has a free sender, and that the "
                                "server has a single tablespace")
            err.seek(0)
            run.report = err.read()
            if watcher.found is None:
                raise ToolError("pg_basebackup wrote no backup manifest into its stream",
                                f"use pg_basebackup 13 or newer (this one is {tool.version})")
            run.manifest = watcher.found
            run.facts = wal_range(run.report, run.manifest)

        try:
            yield chunks()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            stdout.close()


def wal_range(report: str, manifest: bytes) -> dict[str, Any]:
    """Start and stop WAL position and timeline: from the manifest's WAL-Ranges, cross-checked with -v's report."""
    ranges = json.loads(manifest).get("WAL-Ranges") or []
    if not ranges:
        raise IntegrityError("the backup manifest has no WAL range", "take the backup again")
    start = re.search(r"write-ahead log start point: ([0-9A-F]+/[0-9A-F]+) on timeline (\d+)", report)
    end = re.search(r"write-ahead log end point: ([0-9A-F]+/[0-9A-F]+)", report)
    facts = {"timeline": int(ranges[-1]["Timeline"]), "start_lsn": str(ranges[0]["Start-LSN"]),
             "stop_lsn": str(ranges[-1]["End-LSN"])}
    if start and (start.group(1) != facts["start_lsn"] or int(start.group(2)) != int(ranges[0]["Timeline"])):
        raise IntegrityError("pg_basebackup reported another start point than its manifest records",
                             "take the backup again")
    if end and end.group(1) != facts["stop_lsn"]:
        raise IntegrityError("pg_basebackup reported another end point than its manifest records",
                             "take the backup again")
    return facts


def manifest_checksum_holds(manifest: bytes) -> bool:
    """The manifest's own SHA-256 (over everything before its `Manifest-Checksum` line) matches."""
    marker = manifest.rfind(b'"Manifest-Checksum"')
    if marker < 0:
        return False
    body = manifest[:manifest.rfind(b"\n", 0, marker) + 1]
    recorded = re.search(rb'"Manifest-Checksum"\s*:\s*"([0-9a-f]{64})"', manifest[marker:])
    return recorded is not None and hashlib.sha256(body).hexdigest() == recorded.group(1).decode()


def manifest_files(manifest: bytes) -> dict[str, dict[str, Any]]:
    return {str(f.get("Path") or f.get("Encoded-Path")): f for f in json.loads(manifest).get("Files", [])}
