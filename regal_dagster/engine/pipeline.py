"""The data path of every backup object, in one place.

write: plaintext chunks -> SHA-256 (plaintext) -> zstd -> Tink streaming AEAD -> SHA-256 (stored) -> store
read:  store -> SHA-256 (stored) -> Tink (authenticates) -> zstd -> SHA-256 (plaintext) -> sink

Memory is bounded by the chunk size, zstd's window and the store's part buffers, whatever the size.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import queue
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, BinaryIO, cast

import tink
import zstandard

from .crypto import OBJECT_FORMAT_VERSION, STREAMING_TEMPLATE_NAME, Keyring, NonClosingWriter
from .errors import IntegrityError
from .layout import PARTIAL_SUFFIX
from .manifest import CompressionInfo, EncryptionInfo, Manifest, ObjectRecord
from .settings import CompressionConfig
from .storage import ObjectWriter, Repository

CHUNK = 1024 * 1024

Progress = Callable[[int], None]  # called with the number of plaintext bytes just processed


def announce_phase(progress: Progress | None, name: str) -> None:
    """Tell a progress display which step is under way ("starting a scratch server", "validating"), when it
    has a `phase` method (the CLI's does); a plain byte counter is left alone."""
    if progress is not None and (phase := getattr(progress, "phase", None)) is not None:
        phase(name)


class StoredBytes(io.RawIOBase):
    """Counts and hashes what goes to the store. Tink calls `write` and wraps whatever it raises in a
    TinkError: the store's own error (a full disk, an unreachable endpoint) is kept in `failure`."""

    def __init__(self, target: ObjectWriter):
        self.target = target
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.failure: BaseException | None = None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = bytes(data)
        self.sha256.update(data)
        self.size += len(data)
        try:
            self.target.write(data)
        except BaseException as exc:
            self.failure = exc
            raise
        return len(data)

    def close(self) -> None:  # the repository writer commits, not Tink
        pass


class _HashingReader(io.RawIOBase):
    """Counts and hashes what is read from the store."""

    def __init__(self, source: BinaryIO):
        self.source = source
        self.sha256 = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.source.readinto(buffer)  # type: ignore[attr-defined]
        self.sha256.update(memoryview(buffer)[:n])
        self.size += n
        return n

    def drain(self) -> None:
        while self.source.read(CHUNK):
            pass


def store_stream(repo: Repository, key: str, chunks: Iterable[bytes], *, keyring: Keyring, backup_id: str,
                 object_name: str, content: str, compression: CompressionConfig | None = None,
                 zstd_threads: int = 0, progress: Progress | None = None,
                 retain_until: datetime | None = None) -> ObjectRecord:
    """Compress, encrypt and store a stream of plaintext chunks as one object (locked until `retain_until`
    where the repository locks objects).

    `zstd_threads`: 0 compresses in the calling thread (right when several objects are stored at once),
    -1 uses one zstd worker per core (right for a single big stream)."""
    compression = compression or CompressionConfig()
    plain_sha = hashlib.sha256()
    plain_size = 0
    params = zstandard.ZstdCompressionParameters.from_level(
        compression.level, threads=zstd_threads, write_checksum=True,
        **({"hash_log": compression.hash_log} if compression.hash_log else {}))
    with repo.writer(key, retain_until) as writer:
        stored = StoredBytes(writer)
        try:
            encrypted = keyring.encrypting_stream(stored, backup_id, object_name)
            compressor = zstandard.ZstdCompressor(compression_params=params)
            with compressor.stream_writer(cast(BinaryIO, NonClosingWriter(encrypted)), write_size=CHUNK,
                                          closefd=False) as compressed:
                for chunk in chunks:
                    plain_sha.update(chunk)
                    plain_size += len(chunk)
                    compressed.write(chunk)
                    if progress:
                        progress(len(chunk))
            encrypted.close()
        except (tink.TinkError, zstandard.ZstdError):
            if stored.failure is not None:  # the store's error, not Tink's wrapping of it
                raise stored.failure from None
            raise
    return ObjectRecord(
        name=object_name, key=key, content=content, size=stored.size, stored_sha256=stored.sha256.hexdigest(),
        plaintext_size=plain_size, plaintext_sha256=keyring.fingerprint(plain_sha.hexdigest()),
        compression=CompressionInfo(level=compression.level, hash_log=compression.hash_log),
        encryption=EncryptionInfo(scheme=f"tink-streaming-aead/{STREAMING_TEMPLATE_NAME}",
                                  key_id=keyring.primary_key_id, object_format=OBJECT_FORMAT_VERSION),
    )


# Objects of this size and more are decrypted by a thread of their own while they are decompressed; for a
# smaller one the thread costs more than it saves.
READ_AHEAD_BYTES = 4 << 20


def _chunks_of(stream: IO[bytes]) -> Generator[bytes, None, None]:
    while chunk := stream.read(CHUNK):
        yield chunk


class _ChunksReader(io.RawIOBase):
    """A readable file over an iterator of chunks (zstd's stream_reader reads from one)."""

    def __init__(self, chunks: Iterator[bytes]):
        self.chunks, self.pending = chunks, b""

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if not self.pending:
            self.pending = next(self.chunks, b"")
        if size < 0 or size >= len(self.pending):
            data, self.pending = self.pending, b""
        else:
            data, self.pending = self.pending[:size], self.pending[size:]
        return data


def read_ahead(stream: IO[bytes], depth: int = 16) -> Generator[bytes, None, None]:
    """The chunks of `stream`, read by a thread of their own up to `depth` chunks ahead of the consumer: the
    program writing it (pg_basebackup) goes on while the consumer compresses, encrypts and hashes, instead of
    waiting on a full pipe; a stored object is authenticated and decrypted while the consumer decompresses.
    An error reading is raised in the consumer; a consumer that stops early stops the thread once the stream
    ends or is closed."""
    chunks: queue.Queue[bytes | BaseException | None] = queue.Queue(depth)
    stopped = threading.Event()

    def put(item: bytes | BaseException | None) -> None:
        while not stopped.is_set():
            with contextlib.suppress(queue.Full):
                chunks.put(item, timeout=0.1)
                return

    def reader() -> None:
        try:
            while not stopped.is_set() and (chunk := stream.read(CHUNK)):
                put(chunk)
            put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            put(exc)

    thread = threading.Thread(target=reader, name="read-ahead", daemon=True)
    thread.start()
    try:
        while (item := chunks.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stopped.set()


def read_stream(repo: Repository, record: ObjectRecord, *, keyring: Keyring, backup_id: str,
                sink: Callable[[bytes], object] | None = None, progress: Progress | None = None) -> None:
    """Read one object back, authenticate and decompress every byte, check both SHA-256 sums.

    Plaintext goes to `sink` as it is authenticated. Raises IntegrityError naming the object. The stored
    bytes of a big object are read, hashed, authenticated and decrypted by a thread of their own (read_ahead)
    while this one decompresses and hashes the plaintext: two cores for one object.
    """
    where = f"object {record.key}"
    with repo.reader(record.key) as raw:
        stored = _HashingReader(raw)
        try:
            decrypted = keyring.decrypting_stream(stored, backup_id, record.name,
                                                  expected_key_id=record.encryption.key_id)
            compressed = (read_ahead(cast(IO[bytes], decrypted), depth=4) if record.size >= READ_AHEAD_BYTES
                          else _chunks_of(cast(IO[bytes], decrypted)))
            try:
                reader = zstandard.ZstdDecompressor().stream_reader(
                    cast(IO[bytes], _ChunksReader(compressed)), read_size=CHUNK, read_across_frames=True)
                plain_sha, plain_size = hashlib.sha256(), 0
                while chunk := reader.read(CHUNK):
                    plain_sha.update(chunk)
                    plain_size += len(chunk)
                    if sink is not None:
                        sink(chunk)
                    if progress:
                        progress(len(chunk))
            finally:
                compressed.close()  # stops the reading thread when the sink stopped early
            stored.drain()
        except tink.TinkError:
            raise IntegrityError(f"{where} fails authentication: its bytes were changed, truncated, or moved "
                                 "from another backup", "this backup is damaged: use another one") from None
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"{where} does not decompress ({exc})",
                                 "this backup is damaged: use another one") from None
    if stored.size != record.size or stored.sha256.hexdigest() != record.stored_sha256:
        raise IntegrityError(f"{where}: stored bytes differ from the manifest ({stored.size} bytes read, "
                             f"{record.size} expected)", "this backup is damaged: use another one")
    if plain_size != record.plaintext_size or not keyring.fingerprint_matches(record.plaintext_sha256,
                                                                            plain_sha.hexdigest()):
        raise IntegrityError(f"{where}: content differs from the manifest's fingerprint",
                             "this backup is damaged: use another one")


@dataclass(frozen=True)
class StoredBackup:
    """One backup's objects as the restore and check paths read them: authenticated, decompressed and
    checked against the manifest's SHA-256 sums on the way."""

    repo: Repository
    keyring: Keyring
    manifest: Manifest
    # the objects read to their end and found to match the manifest (a restore authenticates the rest)
    read_in_full: set[str] = field(default_factory=set, compare=False)

    def stream(self, name: str, sink: Callable[[bytes], object], progress: Progress | None = None) -> None:
        read_stream(self.repo, self.manifest.object(name), keyring=self.keyring, backup_id=self.manifest.backup_id,
                    sink=sink, progress=progress)
        self.read_in_full.add(name)

    def authenticate_unread(self, progress: Progress | None = None) -> None:
        """Read every object not yet read in full, so that all of the backup has been authenticated."""
        for record in self.manifest.objects:
            if record.name not in self.read_in_full:
                self.stream(record.name, lambda _chunk: None, progress)

    def to_file(self, name: str, path: Path, progress: Progress | None = None) -> Path:
        """An object into `path` (put it in a private directory)."""
        with path.open("wb") as f:
            self.stream(name, f.write, progress)
        return path

    def install(self, name: str, path: Path) -> Path:
        """An object at `path`, which appears only once every byte is authenticated (written beside it first)."""
        return self.to_file(name, path.with_name(path.name + PARTIAL_SUFFIX)).replace(path)

    def read(self, name: str) -> bytes:
        """A small object (a state file), in memory."""
        chunks: list[bytes] = []
        self.stream(name, chunks.append)
        return b"".join(chunks)
