"""A restored data directory started: PostgreSQL of the backup's major version on it (a scratch server on a private
socket), recovered and promoted; what it holds checked (restore tests, point-in-time recoveries)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import MissingSoftwareError, RegalError
from ...manifest import Manifest
from ...postgresql.connection import connect

if TYPE_CHECKING:
    from ...postgresql.server import ScratchCluster


@contextlib.contextmanager
def recovered_server(root: Path, manifest: Manifest) -> Iterator[ScratchCluster]:
    """PostgreSQL of the backup's major version started on the restored data directory `root` (a scratch server on a
    private socket), yielded once it has recovered and been promoted; stopped on exit. RegalError when there is no
    such server here, it does not start, or it is not promoted within 10 minutes (naming the log's FATAL line)."""
    from ...postgresql.installations import installation_major, server_installations
    from ...postgresql.server import ScratchCluster

    major = manifest.source["server_version_num"] // 10000
    bin_dir = next((b for b in server_installations() if installation_major(b) == major), None)
    if bin_dir is None:
        raise MissingSoftwareError(f"no PostgreSQL {major} server is installed here to start the restored data "
                                   "directory (a physical backup starts only on its own major version)",
                                   "install it, or run restore tests where it is")
    prepare_scratch_start(root)
    cluster = ScratchCluster.persistent(root, bin_dir=bin_dir)
    try:
        try:
            cluster.start()
            deadline = time.monotonic() + 600
            while _in_recovery(cluster.dsn()):
                if time.monotonic() > deadline:
                    raise RegalError("the restored server was not promoted within 10 minutes",
                                     "read its log: recovery may be waiting for WAL")
                time.sleep(0.2)
        except RegalError as exc:
            fatal = [line for line in server_log(cluster).splitlines() if "FATAL:" in line]
            raise RegalError(f"the restored server did not start: {exc.message}"
                             + (f" ({fatal[-1].strip()})" if fatal else ""), exc.hint) from None
        yield cluster
    finally:
        cluster.stop()


def server_log(cluster: ScratchCluster) -> str:
    path = cluster.log_path
    return path.read_text(errors="replace") if path is not None and path.exists() else ""


def open_databases(cluster: ScratchCluster) -> list[str]:
    """The databases of a running restored server, each opened and its catalog read."""
    with connect(cluster.dsn()) as conn:
        found = [r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE datallowconn ORDER BY datname").fetchall()]
    for name in found:
        with connect(cluster.dsn(name)) as conn:
            conn.execute("SELECT count(*) FROM pg_class").fetchone()
    return found


def database_problems(found: list[str], manifest: Manifest) -> list[str]:
    expected = manifest.source.get("databases", [])
    return [] if found == expected else [f"the restored server has the databases {found}, the backup had {expected}"]


def prepare_scratch_start(root: Path) -> None:
    """A restored data directory made startable as a scratch server: the server's own configuration files may
    live outside the data directory (Debian keeps them in /etc): the scratch server's settings (its private socket,
    its own pg_hba file) are included last."""
    from ...postgresql.server import SETTINGS_FILE

    conf = root / "postgresql.conf"
    text = conf.read_text() if conf.exists() else ""
    if SETTINGS_FILE not in text:
        with conf.open("a") as f:
            f.write("\n# Regal Backup restore test: the scratch server's settings\n"
                    f"include_if_exists = '{SETTINGS_FILE}'\n")


def _in_recovery(dsn: str) -> bool:
    with connect(dsn) as conn:
        row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    return bool(row and row[0])
