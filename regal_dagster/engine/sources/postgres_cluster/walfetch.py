"""Archived WAL fetched ahead, in parallel: one mechanism for the wal daemon's prefetch queue (`restore_command =
wal get`) and for the WAL a restore copies into the data directory (`restore --with-wal`, cluster restore tests).

Each file is fetched by `wal.fetch_wal`, authenticated as `wal get` does: it appears in the directory only whole
and authenticated (a file that fails authentication is never written there), so nothing that failed is ever handed
to PostgreSQL. A fetch that failed stays failed in the queue: whoever takes it sees the error (naming the file).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path

from ...crypto import Keyring
from ...storage import Repository
from .wal import WalFile, fetch_wal

WORKERS = 4  # parallel fetches of a restore (the daemon has its own --workers)
AHEAD = 16  # files fetched ahead of the one being waited for (256 MB of 16 MB segments)


class WalFetchQueue:
    """Files of one target's WAL archive being fetched ahead into `directory` (each at directory/<name>)."""

    def __init__(self, repo: Repository, keyring: Keyring, target: str, directory: Path, pool: Executor, *,
                 allow_partial: bool = False):
        self.repo, self.keyring, self.target, self.directory = repo, keyring, target, directory
        self.pool, self.allow_partial = pool, allow_partial
        self.lock = threading.Lock()
        self.queue: dict[str, Future[WalFile]] = {}

    def _fetch(self, name: str) -> WalFile:
        return fetch_wal(self.repo, self.keyring, self.target, name, self.directory / name,
                         allow_partial=self.allow_partial)

    def _drop(self, name: str, fetch: Future[WalFile]) -> None:
        fetch.cancel()  # not started: never fetched; under way: its file is removed once written
        fetch.add_done_callback(lambda _f: (self.directory / name).unlink(missing_ok=True))

    def keep(self, names: Sequence[str]) -> None:
        """Exactly `names` fetched ahead: the new ones queued in this order, the others dropped (and removed)."""
        with self.lock:
            for stale in [n for n in self.queue if n not in names]:
                self._drop(stale, self.queue.pop(stale))
            for name in names:
                if name not in self.queue:
                    self.queue[name] = self.pool.submit(self._fetch, name)

    def take(self, name: str) -> Future[WalFile] | None:
        """The fetch of `name`, out of the queue (None: not queued). Its result is the authenticated file at
        directory/<name>; its exception, why it could not be fetched."""
        with self.lock:
            return self.queue.pop(name, None)

    def close(self) -> None:
        """Every queued fetch dropped."""
        with self.lock:
            for name, fetch in self.queue.items():
                self._drop(name, fetch)
            self.queue.clear()


def fetch_wal_files(repo: Repository, keyring: Keyring, target: str, names: Sequence[str], directory: Path, *,
                    workers: int = WORKERS, ahead: int = AHEAD) -> list[WalFile]:
    """Every file of `names` at directory/<name>, authenticated, `ahead` files fetched ahead of the one waited for,
    by `workers` threads. The first file (in this order) that cannot be fetched raises its error, which names it;
    nothing is fetched after it, and no fetch is still running when this returns or raises."""
    fetched: list[WalFile] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wal-fetch") as pool:
        queue = WalFetchQueue(repo, keyring, target, directory, pool, allow_partial=True)
        try:
            for i, name in enumerate(names):
                queue.keep(names[i:i + 1 + ahead])
                fetch = queue.take(name)
                assert fetch is not None
                fetched.append(fetch.result())
        finally:
            queue.close()
    return fetched
