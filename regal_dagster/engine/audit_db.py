"""The audit database's connections: one per call, or, inside `shared_reads`, one shared by a thread's per-target
reads of the trail."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from .errors import RegalError


def _connect(dsn: str):
    import psycopg

    try:
        return psycopg.connect(dsn, connect_timeout=5, application_name="regal-backup-audit")
    except psycopg.OperationalError as exc:
        from .postgresql.connection import describe_dsn

        raise RegalError(f"cannot reach the audit database {describe_dsn(dsn)}: {str(exc).strip().splitlines()[-1]}",
                         "start it or fix audit.dsn; events wait in the repository meanwhile") from None


_SHARED = threading.local()  # dsn -> the connection the per-target reads share, inside `shared_reads`


@contextlib.contextmanager
def shared_reads(dsn: str) -> Iterator[None]:
    """While inside, this thread's per-target reads of the trail (`sequenced_records`, `events_about`: the
    recoverability model of each target of a fleet) share one connection instead of one each. Unreachable: each
    read connects as it would (and says so as it would)."""
    readers: dict[str, Any] = _SHARED.__dict__.setdefault("readers", {})
    if dsn in readers:
        yield
        return
    try:
        conn = _connect(dsn)
    except RegalError:
        yield
        return
    readers[dsn] = conn
    try:
        yield
    finally:
        readers.pop(dsn, None)
        conn.close()


@contextlib.contextmanager
def _reader(dsn: str) -> Iterator[Any]:
    shared = _SHARED.__dict__.get("readers", {}).get(dsn)
    if shared is None:
        with _connect(dsn) as conn:
            yield conn
        return
    try:
        yield shared
    finally:
        shared.rollback()  # reads only: end the transaction
