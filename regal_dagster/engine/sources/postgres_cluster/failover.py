"""A failover as the WAL archive sees it: which of the target's servers is the primary now, and the WAL a promotion
left behind.

A promoted standby starts a new timeline at the end of the WAL it had replayed (the switch point, in the new
timeline's `.history` file). WAL the old primary wrote after that point on the old timeline is not in the new
primary's history: transactions committed there are lost at the failover. When `wal stream` had received some of it
from the old primary (its segments or the snapshot of the one in progress are stored), that range is reported as
LOST, with its bounds, by the stream when it stores the history file and by `wal status` from then on: never
silently skipped. (WAL the old primary wrote beyond what the stream received is unknown to us: nobody has it.)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import psycopg

from ...crypto import Keyring
from ...errors import RegalError
from ...layout import is_wal_segment
from ...postgresql.connection import connect, describe_dsn
from ...storage import Repository
from ...workspace import private_directory
from .wal import WalFile, fetch_wal, format_lsn, segment_number


@dataclass(frozen=True)
class Switch:
    """One timeline switch of a history file: `timeline` began where `parent` was left at `lsn`."""

    parent: int
    timeline: int
    lsn: int


def parse_history(name: str, text: str) -> Switch | None:
    """The newest switch of a `.history` file (`TTTTTTTT.history`: lines `parent<TAB>LSN<TAB>reason`)."""
    from .wal import parse_lsn

    entries = [line.split("\t") for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not entries or len(entries[-1]) < 2:
        return None
    return Switch(int(entries[-1][0]), int(name[:8], 16), parse_lsn(entries[-1][1].strip()))


def lost_range(switch: Switch, received_end: int | None) -> str | None:
    """What of the old timeline was received past the switch point, in words (None: nothing)."""
    if received_end is None or received_end <= switch.lsn:
        return None
    return (f"timeline {switch.parent} from {format_lsn(switch.lsn)} to {format_lsn(received_end)} "
            f"({received_end - switch.lsn} bytes): WAL the old primary wrote after timeline {switch.timeline} forked "
            "from it, which the new primary never received (transactions committed there are not on it; the stored "
            f"timeline {switch.parent} WAL still holds them)")


def received_end_in(files: list[WalFile], timeline: int, size: int) -> int | None:
    """The end of the stored WAL of `timeline` (its complete segments and the snapshot of one in progress)."""
    ends = []
    for f in files:
        if not f.is_segment or segment_number(f.name, size)[0] != timeline:
            continue
        number = segment_number(f.name, size)[1]
        ends.append(number * size + f.used_bytes if f.partial else (number + 1) * size)
    return max(ends, default=None)


def received_end_on_disk(directory: Path, timeline: int, size: int) -> int | None:
    """The end of the WAL of `timeline` that pg_receivewal holds in `directory` (a .partial: its last non-zero
    byte), for the moment a history file arrives (the snapshot in the repository may be seconds older)."""
    ends = []
    for path in directory.iterdir():
        name = path.name.removesuffix(".partial")
        if not is_wal_segment(name) or segment_number(name, size)[0] != timeline:
            continue
        number = segment_number(name, size)[1]
        if path.name.endswith(".partial"):
            with contextlib.suppress(OSError):
                ends.append(number * size + len(path.read_bytes().rstrip(b"\0")))
        else:
            ends.append((number + 1) * size)
    return max(ends, default=None)


def lost_at_failovers(repo: Repository, keyring: Keyring, target: str, files: list[WalFile], size: int) -> list[str]:
    """Each stored history file's switch whose old timeline was stored past the switch point: the range lost."""
    histories = [f for f in files if f.name.endswith(".history")]
    if not histories:
        return []
    lost = []
    with private_directory("wal-history") as work:
        for found in histories:
            fetch_wal(repo, keyring, target, found.name, work / found.name)
            switch = parse_history(found.name, (work / found.name).read_text(errors="replace"))
            if switch and (words := lost_range(switch, received_end_in(files, switch.parent, size))):
                lost.append(words)
    return lost


def current_primary(candidates: list[str]) -> tuple[str | None, list[str]]:
    """The first of the target's servers (its `dsn`, which may be a multi-host DSN with target_session_attrs=primary,
    then its `standbys`) that answers and is not in recovery; else None and why not, for each."""
    reasons = []
    for dsn in candidates:
        try:
            with connect(dsn, autocommit=True) as conn:
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        except RegalError as exc:
            reasons.append(f"{describe_dsn(dsn)}: {exc.message.strip().splitlines()[0]}")
            continue
        except psycopg.Error as exc:
            reasons.append(f"{describe_dsn(dsn)}: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc}")
            continue
        if row and row[0]:
            reasons.append(f"{describe_dsn(dsn)}: a standby (in recovery)")
            continue
        return dsn, reasons
    return None, reasons
