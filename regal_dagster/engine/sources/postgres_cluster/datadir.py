"""A restored data directory: what marks it while it is written, where its own WAL goes, and pg_verifybackup on it
(for a restore and for each member of an incremental chain)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ...environment import child_environment
from ...postgresql.tools import pg_tool_for_server

WAL_COPY = "regal_wal"  # in a restored data directory: the WAL recovery replays, copied in (--with-wal)
# In a data directory being restored, until the restore has finished: the restoring process (as a private
# directory's owner file). A directory holding it whose owner is dead is what a killed restore left.
RESTORING_MARKER = ".regal-restoring"


def verify_data_directory(root: Path, server_major: int, wal_dir: Path | None) -> list[str]:
    """pg_verifybackup on a restored data directory: every file against the backup manifest and, when the WAL
    was copied in, the WAL the backup needs parses (else recovery checks it as it fetches it). Its findings."""
    tool = pg_tool_for_server("pg_verifybackup", server_major)
    wal = ["--ignore", WAL_COPY, "--wal-directory", str(wal_dir)] if wal_dir else ["--no-parse-wal"]
    done = subprocess.run([str(tool.path), *wal, "--ignore", RESTORING_MARKER, "--quiet", str(root)],
                          capture_output=True, text=True, check=False, env=child_environment(), timeout=3600)
    if done.returncode == 0:
        return []
    return [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()][:20] or [
        f"pg_verifybackup failed with exit code {done.returncode}"]
