"""The byte streams sources store: a client program's output (pg_dump, git bundle), a file's content."""

from __future__ import annotations

import contextlib
import fcntl
import subprocess
import tempfile
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


def file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk
