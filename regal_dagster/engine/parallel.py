"""Running one step over many items on a few threads, and stopping them all when one fails.

Every worker gets a `cancelled` event and checks it between chunks: after the first failure (or a
KeyboardInterrupt / SIGTERM in the caller) the others stop at their next chunk, closing their streams,
which ends their child processes, instead of running to the end for nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Cancelled(Exception):
    """Raised inside a worker that stops because another one failed."""


def map_parallel(fn: Callable[[T, threading.Event], R], items: Sequence[T], jobs: int,
                       name: str) -> list[R]:
    """fn(item, cancelled) for every item, `jobs` at a time; results in the order of `items`.

    The first exception (other than Cancelled) is re-raised after every worker has stopped."""
    cancelled = threading.Event()
    with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(items))), thread_name_prefix=name) as pool:
        futures = [pool.submit(fn, item, cancelled) for item in items]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
            for future in futures:
                if future.done() and future.exception() is not None:
                    raise future.exception()  # type: ignore[misc]
        except BaseException:
            cancelled.set()
            for future in futures:
                future.cancel()
            wait(futures)
            real = [exc for f in futures if f.done() and not f.cancelled()
                    and (exc := f.exception()) is not None and not isinstance(exc, Cancelled)]
            if real:
                raise real[0] from None
            raise
    return [f.result() for f in futures]


def check(cancelled: threading.Event) -> None:
    if cancelled.is_set():
        raise Cancelled()
