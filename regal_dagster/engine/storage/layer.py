"""A repository around another one: the base of the retry and logging wrappers (base.py describes them).

Every operation of the interface goes to the repository inside through `around(op, key, request,
measure)`, which a wrapper overrides: `request` makes the whole operation once (a listing is read to
its end inside it, so that a retry starts it again), `measure` tells the bytes it moved. Writers and
readers are streams: `around` opens a reader, and `stream_in` / `stream_out` may wrap the stream.
Anything a backend offers beyond the interface (`client`, `versioned`, `root`, ...) is reached through
the wrapper as it is.
"""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, BinaryIO, TypeVar

from .base import ObjectWriter, Repository, StoredObject

T = TypeVar("T")
Measure = Callable[[Any], int | None]


def _length(data: bytes) -> int:
    return len(data)


class Layer(Repository):
    def __init__(self, inner: Repository):
        self.inner = inner

    def around(self, op: str, key: str, request: Callable[[], T], measure: Measure | None = None) -> T:
        return request()

    def stream_in(self, key: str, stream: BinaryIO) -> BinaryIO:
        return stream

    def stream_out(self, key: str, writer: ObjectWriter) -> ObjectWriter:
        return writer

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    # --- what the store is ---------------------------------------------------------------------------

    @property
    def location(self) -> str:  # type: ignore[override]
        return self.inner.location

    @property
    def encrypts_at_rest(self) -> bool:  # type: ignore[override]
        return self.inner.encrypts_at_rest

    @property
    def locks_objects(self) -> bool:  # type: ignore[override]
        return self.inner.locks_objects

    @property
    def backend(self) -> Repository:
        return self.inner.backend

    # --- save ------------------------------------------------------------------------------------------

    def writer(self, key: str, retain_until: datetime | None = None) -> ObjectWriter:
        return self.stream_out(key, self.inner.writer(key, retain_until))

    def put_bytes(self, key: str, data: bytes, retain_until: datetime | None = None) -> None:
        self.around("put_bytes", key, lambda: self.inner.put_bytes(key, data, retain_until), lambda _: len(data))

    # --- load ------------------------------------------------------------------------------------------

    def reader(self, key: str) -> BinaryIO:
        return self.stream_in(key, self.around("reader", key, lambda: self.inner.reader(key)))

    def get_bytes(self, key: str) -> bytes:
        return self.around("get_bytes", key, lambda: self.inner.get_bytes(key), _length)

    def read_range(self, key: str, start: int, length: int) -> bytes:
        return self.around("read_range", key, lambda: self.inner.read_range(key, start, length), _length)

    # --- stat ------------------------------------------------------------------------------------------

    def size(self, key: str) -> int | None:
        return self.around("size", key, lambda: self.inner.size(key), lambda size: size)

    def locked_until(self, key: str) -> datetime | None:
        return self.around("locked_until", key, lambda: self.inner.locked_until(key))

    def server_side_encryption(self, key: str) -> str | None:
        return self.around("server_side_encryption", key, lambda: self.inner.server_side_encryption(key))

    # --- list ------------------------------------------------------------------------------------------

    def list(self, prefix: str) -> Iterator[StoredObject]:
        listing = self.around("list", prefix, lambda: builtins.list(self.inner.list(prefix)),
                              lambda objects: sum(o.size for o in objects))
        return iter(listing)

    def usage_bytes(self) -> int:
        return self.around("usage_bytes", "", self.inner.usage_bytes, lambda used: used)

    def free_bytes(self) -> tuple[int, int] | None:
        return self.around("free_bytes", "", self.inner.free_bytes)

    # --- remove ----------------------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        self.around("delete", key, lambda: self.inner.delete(key))

    def abandoned_uploads(self, before: datetime) -> builtins.list[str]:
        return self.around("abandoned_uploads", "", lambda: self.inner.abandoned_uploads(before))

    def discard_upload(self, upload: str) -> None:
        self.around("discard_upload", upload, lambda: self.inner.discard_upload(upload))

    # --- lock and the rest -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Taking the lock goes through `around`; holding and releasing it are the backend's own."""
        with contextlib.ExitStack() as held:
            self.around("lock", name, lambda: held.enter_context(self.inner.lock(name)))
            yield

    def ensure_initialized(self) -> None:
        self.around("ensure_initialized", "", self.inner.ensure_initialized)
