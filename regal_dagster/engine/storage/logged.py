"""The logging wrapper: every storage operation at DEBUG on "regal_backup.storage".

Each record says op, key, bytes and milliseconds (also as the record's attributes `op`, `key`,
`bytes`, `ms` and `repository`, for structured handlers). Nothing else goes in: the repository's
location never holds credentials, and neither do keys or RegalError messages.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, TypeVar

from .base import ObjectWriter
from .layer import Layer, Measure

log = logging.getLogger("regal_backup.storage")
log.addHandler(logging.NullHandler())  # a library's logger: the application decides where records go

T = TypeVar("T")


class Logged(Layer):
    def record(self, op: str, key: str, size: int | None, started: float, error: BaseException | None = None) -> None:
        if not log.isEnabledFor(logging.DEBUG):
            return
        ms = (time.monotonic() - started) * 1000
        fields = {"op": op, "key": key, "bytes": size, "ms": round(ms, 1), "repository": self.location}
        if error is None:
            log.debug("%s %s: %s bytes in %.1f ms", op, key or "-", "-" if size is None else size, ms, extra=fields)
        else:
            log.debug("%s %s failed after %.1f ms: %s: %s", op, key or "-", ms, type(error).__name__,
                      str(error).splitlines()[0] if str(error) else "", extra=fields)

    def around(self, op: str, key: str, request: Callable[[], T], measure: Measure | None = None) -> T:
        started = time.monotonic()
        try:
            result = request()
        except BaseException as exc:
            self.record(op, key, None, started, exc)
            raise
        self.record(op, key, measure(result) if measure else None, started)
        return result

    def stream_in(self, key: str, stream: BinaryIO) -> BinaryIO:
        return _LoggedReader(self, key, stream)  # type: ignore[return-value]

    def stream_out(self, key: str, writer: ObjectWriter) -> ObjectWriter:
        return _LoggedWriter(self, key, writer)

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        with super().lock(name):
            held = time.monotonic()
            try:
                yield
            finally:
                self.record("unlock", name, None, held)


class _LoggedReader(io.RawIOBase):
    """An object's stream; its bytes and time are logged when it is closed (op "read")."""

    def __init__(self, repo: Logged, key: str, stream: BinaryIO):
        self.repo, self.key, self.stream = repo, key, stream
        self.started, self.count = time.monotonic(), 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.count += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        n: int = self.stream.readinto(buffer)  # type: ignore[attr-defined]
        self.count += n
        return n

    def close(self) -> None:
        if not self.closed:
            self.stream.close()
            self.repo.record("read", self.key, self.count, self.started)
        super().close()


class _LoggedWriter(ObjectWriter):
    """An object being written; logged when it is committed (op "save") or aborted (op "abort")."""

    def __init__(self, repo: Logged, key: str, writer: ObjectWriter):
        self.repo, self.key, self.writer = repo, key, writer
        self.started = time.monotonic()

    @property
    def bytes_written(self) -> int:  # type: ignore[override]
        return self.writer.bytes_written

    def write(self, data: bytes) -> int:
        return self.writer.write(data)

    def commit(self) -> None:
        try:
            self.writer.commit()
        except BaseException as exc:
            self.repo.record("save", self.key, self.bytes_written, self.started, exc)
            raise
        self.repo.record("save", self.key, self.bytes_written, self.started)

    def abort(self) -> None:
        self.writer.abort()
        self.repo.record("abort", self.key, self.bytes_written, self.started)

    def __getattr__(self, name: str) -> Any:
        if name == "writer":
            raise AttributeError(name)
        return getattr(self.writer, name)
