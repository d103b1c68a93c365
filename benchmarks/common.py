"""What the benchmark scripts share: a generated database to measure on, and the table they print."""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import psycopg

from regal_dagster.demo.datagen import create_pos_database
from regal_dagster.engine.postgresql.server import ScratchCluster


@contextlib.contextmanager
def generated_database(base_dir: Path, scale: float) -> Iterator[str]:
    """The point-of-sale database at `scale` in a scratch PostgreSQL 18, stopped afterwards. Vacuumed and
    checkpointed, else autovacuum and the checkpointer do it during the first timed steps."""
    with ScratchCluster(base_dir=base_dir, tuned_for_restore=False) as cluster:
        dsn = cluster.create_database("regalpos")
        create_pos_database(dsn, scale)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("VACUUM")
            conn.execute("CHECKPOINT")
        yield dsn


def wait_promoted(cluster: ScratchCluster, timeout: float = 3600) -> None:
    """Until a restored server has recovered and been promoted (open for writes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(cluster.dsn(), autocommit=True, connect_timeout=5) as conn:
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
            if row is not None and not row[0]:
                return
        except psycopg.OperationalError:  # still starting up
            pass
        time.sleep(0.1)
    raise SystemExit("the restored server was not promoted in time")


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A markdown table (the first column left-aligned, the rest right-aligned), then this process's peak RSS."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\npeak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB")
