"""The server's own WAL archiver, watched during a base backup.

`pg_basebackup -X none` ends only once the server has archived the last segment the backup needs (with
archive_mode on). When the server's archive_command fails, or archive_mode is on with nothing to archive
with, PostgreSQL waits for it forever ("still waiting for all required WAL segments to be archived") and so
does the backup. So: refused up front when the archiver is failing already or has no command, and stopped
with the archiver's own facts (pg_stat_archiver) when it keeps failing while the backup waits.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from ...errors import RegalError
from ...postgresql.connection import connect

FAILING_FOR_SECONDS = 15.0  # the archiver failing this long while the backup runs: the backup would wait forever
POLL_SECONDS = 2.0


@dataclass(frozen=True)
class ArchiverState:
    archive_mode: str
    has_command: bool  # archive_command or (15+) archive_library set
    standby: bool  # a standby archives (and a backup of it waits) only with archive_mode = always
    failed_count: int
    last_failed_wal: str | None
    last_failed_time: datetime | None
    last_archived_time: datetime | None

    @property
    def failing(self) -> bool:
        """The newest archiving attempt failed (the archiver retries the same file until it succeeds)."""
        return self.archive_mode != "off" and self.last_failed_time is not None and (
            self.last_archived_time is None or self.last_failed_time > self.last_archived_time)

    def describe(self) -> str:
        return (f"the server's archive_command fails: {self.failed_count} failure(s), the newest archiving "
                f"{self.last_failed_wal} at {self.last_failed_time.isoformat() if self.last_failed_time else '?'}")


def archiver_state(dsn: str) -> ArchiverState:
    with connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT current_setting('archive_mode'), current_setting('archive_command') <> '' OR "
            "coalesce(current_setting('archive_library', true), '') <> '', pg_is_in_recovery(), failed_count, "
            "last_failed_wal, last_failed_time, last_archived_time FROM pg_stat_archiver").fetchone()
    assert row is not None
    return ArchiverState(*row)


HINT = ("fix the server's archive_command (its log says why it fails; pg_stat_archiver shows the count), or set "
        "archive_mode = off when `regal-backup wal stream` stores the WAL; then take the backup again")


def refuse_stuck_archiver(dsn: str) -> None:
    """Before a base backup: the server would make it wait for archiving that does not happen."""
    state = archiver_state(dsn)
    if state.archive_mode == "off" or (state.standby and state.archive_mode != "always"):
        return
    if not state.has_command:
        raise RegalError("the server has archive_mode = on but no archive_command: a base backup would wait forever "
                         "for its WAL to be archived", HINT)
    if state.failing:
        raise RegalError(f"{state.describe()}: a base backup would wait forever for its WAL to be archived", HINT)


@contextlib.contextmanager
def watch_archiver(dsn: str, process: subprocess.Popen[bytes]) -> Iterator[list[str]]:
    """While the backup runs: when the archiver keeps failing FAILING_FOR_SECONDS, stop pg_basebackup; the list
    yielded then holds why (for the error that replaces pg_basebackup's own)."""
    reasons: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        failing_since: float | None = None
        waited = 0.0
        while not stop.wait(POLL_SECONDS):
            waited += POLL_SECONDS
            try:
                state = archiver_state(dsn)
            except Exception:  # noqa: BLE001, S112 - the server's trouble is pg_basebackup's to report
                continue
            if not state.failing:
                failing_since = None
                continue
            failing_since = waited if failing_since is None else failing_since
            if waited - failing_since >= FAILING_FOR_SECONDS:
                reasons.append(state.describe())
                process.kill()
                return

    thread = threading.Thread(target=watch, name="archiver-watch", daemon=True)
    thread.start()
    try:
        yield reasons
    finally:
        stop.set()
        thread.join()


def stuck_archiver_error(reasons: list[str]) -> RegalError:
    return RegalError(f"{reasons[0]}, for more than {FAILING_FOR_SECONDS:.0f} s while the base backup waited for "
                      "its WAL to be archived: the backup was stopped (nothing was kept)", HINT)
