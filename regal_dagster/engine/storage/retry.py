"""The retry wrapper: a request that failed for a passing reason is made again, with backoff and jitter.

Only `TransientStorageError` is retried (backends raise it for refused, dropped or timed-out
connections and for HTTP 5xx, SlowDown and throttling answers); every other error goes to the caller at
once. The wait before attempt n+1 is drawn from [d/2, d] with d = min(max_backoff, backoff * 2**(n-1))
("equal jitter": processes that failed together do not come back together, and each waits a while).
After the last attempt the operator gets one StorageUnavailableError naming the repository, the
operation and key, how often and how long it was tried, and what to do.

`call` is the one implementation: the `Retrying` layer uses it for every operation `Layer.around`
passes it (each one a whole, idempotent request); a backend uses it for a request inside a stream it
cannot replay as a whole (an S3 part upload). A writer's stream itself is never retried.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from .base import Repository, StorageUnavailableError, TransientStorageError
from .layer import Layer, Measure

if TYPE_CHECKING:
    from ..settings import RetryConfig

log = logging.getLogger("regal_backup.storage")

T = TypeVar("T")


def backoff(policy: RetryConfig, attempt: int) -> float:
    """Seconds to wait after failed attempt number `attempt` (1 = the first)."""
    ceiling = min(policy.max_backoff.total_seconds(), policy.backoff.total_seconds() * 2 ** (attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def call(policy: RetryConfig, op: str, key: str, location: str, request: Callable[[], T]) -> T:
    """`request()`, made again after each TransientStorageError until `policy.attempts` have been made."""
    what = f"{op} {key}" if key else op
    started = time.monotonic()
    for attempt in range(1, policy.attempts + 1):
        try:
            return request()
        except TransientStorageError as exc:
            if attempt == policy.attempts:
                elapsed = time.monotonic() - started
                where = "" if location in exc.message else f" ({location})"
                raise StorageUnavailableError(
                    f"{exc.message}{where}: {what} still failed after {attempt} attempts over {elapsed:.1f} s",
                    f"{exc.hint or 'check that the repository is reachable'}; then run the command again "
                    "(repository.retry sets how often and how long a request is tried)") from None
            wait = backoff(policy, attempt)
            log.warning("%s on %s failed (%s); attempt %d of %d in %.2f s", what, location,
                        exc.message, attempt + 1, policy.attempts, wait,
                        extra={"op": op, "key": key, "repository": location, "attempt": attempt})
            time.sleep(wait)
    raise AssertionError("unreachable: policy.attempts >= 1")


class Retrying(Layer):
    def __init__(self, inner: Repository, policy: RetryConfig):
        super().__init__(inner)
        self.policy = policy

    def around(self, op: str, key: str, request: Callable[[], T], measure: Measure | None = None) -> T:
        return call(self.policy, op, key, self.location, request)
