"""The recovery configuration of a restored data directory: settings appended to postgresql.auto.conf (read
last, so they win over the backed-up configuration) and recovery.signal."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

AUTO_CONF = "postgresql.auto.conf"
SIGNAL = "recovery.signal"


def conf_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def write_recovery_settings(root: Path, settings: dict[str, str]) -> None:
    lines = ["", "# Regal Backup: point-in-time recovery of this restored data directory"]
    lines += [f"{name} = {conf_quote(value)}" for name, value in settings.items()]
    with (root / AUTO_CONF).open("a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    (root / SIGNAL).touch(mode=0o600)


@dataclass(frozen=True)
class ClusterRestoreOptions:
    """How a restored data directory recovers (pitr.py decides it). None: to this backup's own end, with its own WAL
    copied in (self-contained)."""

    recovery: dict[str, str] | None = None  # the recovery settings to write
    wal_files: list[str] | None = None  # WAL files to copy into the data directory first
