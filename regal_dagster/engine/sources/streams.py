"""The byte streams sources store: a client program's output (pg_dump, git bundle), a file's content."""

from __future__ import annotations

import contextlib
import fcntl
import queue
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

from ..environment import child_environment
from ..errors import ToolError
from ..pipeline import CHUNK


def stream_command(args: Sequence[str | bytes], env: dict[str, str] | None, what: str,
                   on_started: Callable[[], None] | None = None) -> Iterator[bytes]:
    """Run a client program and yield its standard output in chunks; ToolError with its message if it fails.

    Its standard error goes to a temporary file, so a chatty program never blocks on a full pipe."""
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=errors,
                                   env=child_environment() if env is None else env)
        assert process.stdout is not None
        larger_pipe(process.stdout)
        try:
            while chunk := process.stdout.read(CHUNK):
                if on_started:
                    on_started()
                    on_started = None
                yield chunk
            code = process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stdout.close()
        if code != 0:
            errors.seek(0)
            tail = errors.read().decode(errors="replace").strip()[-800:]
            raise ToolError(f"{what} failed with exit code {code}: {tail}",
                            "fix the cause above; nothing was stored as a backup")


def larger_pipe(stream: IO[bytes]) -> None:
    """Fewer, bigger reads from a child's output pipe (Linux only; elsewhere as it is)."""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, CHUNK)


def read_ahead(stream: IO[bytes], depth: int = 16) -> Iterator[bytes]:
    """The chunks of `stream`, read by a thread of their own up to `depth` chunks ahead of the consumer: the
    program writing it (pg_basebackup) goes on while the consumer compresses, encrypts and hashes, instead of
    waiting on a full pipe. An error reading is raised in the consumer; a consumer that stops early stops the
    thread once the stream ends or is closed."""
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


def file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk
