"""The WAL archive of a `postgres_cluster` target as the generic verbs see it (sources/capabilities.py): its RPO
age (walstatus.py), what retention removes from it (wal.py), the restore test's recoveries (recovery_test.py) and
its Dagster asset, `postgres/<target>/wal`."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from ..capabilities import ArchiveAsset, ArchiveReach, ArchiveState, ContinuousArchive, TestFindings

if TYPE_CHECKING:
    from ...crypto import Keyring
    from ...manifest import Manifest
    from ...pipeline import Progress
    from ...policy import Policy
    from ...storage import Repository

WATCH_SENSOR = "wal_stream_watch"


class WalArchive(ContinuousArchive):
    noun = "WAL"

    def state(self, policy: Policy, repo: Repository, keyring: Keyring, target: str, now: datetime) -> ArchiveState:
        from .wal import parse_lsn
        from .walstatus import wal_status

        status = wal_status(policy, repo, keyring, target, now)
        details = {k: v for k, v in status.to_json().items() if k in ("newest_lsn", "newest_stored_at", "server_lsn",
                                                                       "lag_bytes", "lag_seconds", "gaps")}
        metadata: dict[str, str | int | float] = {
            "newest_lsn": status.newest_lsn or "", "newest_segment": status.newest_segment or "",
            "newest_stored_at": status.newest_stored_at or "", "server_lsn": status.server_lsn or "unreachable",
            "lag_bytes": status.lag_bytes or 0, "lag_seconds": float(status.lag_seconds or 0.0),
            "gaps": len(status.gaps), **({"first_gap": status.gaps[0]} if status.gaps else {})}
        stored_at = datetime.fromisoformat(status.newest_stored_at) if status.newest_stored_at else None
        gaps = [*([status.rollback] if status.rollback else []), *status.gaps]  # a rollback alerts as a gap does
        if status.rollback:
            details["rollback"] = status.rollback
        proved_commit = status.proved_commit_at if status.proved_lsn == status.newest_lsn else None
        return ArchiveState(status.newest_lsn, stored_at, status.lag_bytes, gaps, details, metadata,
                            parse_lsn(status.newest_lsn) if status.newest_lsn else None,
                            datetime.fromisoformat(proved_commit) if proved_commit else None, status.fed,
                            status.lost)

    def reach(self, manifest: Manifest, state: ArchiveState, broken: str | None) -> ArchiveReach:
        """A base backup recovers through the WAL from its start: to its end it needs every segment from its start
        to its stop position; past it, as far as the stored WAL goes before the first segment missing (a gap) or
        unreadable (`broken`). A WAL rollback (walproof.py) is a gap at the stored end."""
        from ...layout import is_wal_segment
        from .wal import format_lsn, parse_lsn, segment_number

        source = manifest.source
        size = int(source["wal_segment_size"])
        start, stop = parse_lsn(str(source["start_lsn"])), parse_lsn(str(source["stop_lsn"]))
        stoppers = sorted((segment_number(name, size)[1], name) for name in
                          [*state.details.get("gaps", []), *([broken] if broken else [])]
                          if is_wal_segment(name) and segment_number(name, size)[1] >= start // size)
        newest = state.newest_number
        if newest is None or newest < stop:
            return ArchiveReach(False, None, "not recoverable beyond its end (nor to it): the WAL archive does not "
                                             f"reach its end ({source['stop_lsn']}); `regal-backup wal stream "
                                             f"{manifest.target}` (a service) stores it")
        if stoppers and stoppers[0][0] <= stop // size:
            return ArchiveReach(False, None, f"NOT RECOVERABLE: WAL segment {stoppers[0][1]}, which it needs to reach "
                                             "its end, is missing or unreadable")
        if stoppers:
            number, name = stoppers[0]
            return ArchiveReach(True, format_lsn(number * size),
                                f"recoverable to {format_lsn(number * size)}, NOT PAST WAL segment {name} (missing or "
                                "unreadable)", number * size)
        rolled_back = state.details.get("rollback")
        return ArchiveReach(True, state.newest_position,
                            f"recoverable to {state.newest_position}, the newest stored WAL"
                            + (f" (ROLLED BACK: {rolled_back})" if rolled_back else ""), newest)

    def covers(self, policy: Policy, repo: Repository, keyring: Keyring, manifest: Manifest) -> bool:
        from .wal import parse_lsn
        from .walstatus import wal_status

        status = wal_status(policy, repo, keyring, manifest.target, datetime.now(UTC))
        stop = manifest.source.get("stop_lsn")
        return bool(stop and status.newest_lsn and not status.gaps and not status.rollback
                    and parse_lsn(status.newest_lsn) >= parse_lsn(str(stop)))

    def fed(self, policy: Policy, target: str) -> bool | None:
        from ...errors import RegalError
        from .walstatus import server_position

        try:
            return server_position(policy, target)[1]
        except RegalError:
            return None

    def hurry(self, policy: Policy, manifest: Manifest) -> None:
        """Close the WAL segment holding the backup's end (pg_switch_wal, as pgBackRest's archive check does), so
        that an archive_command archives it now, not when the segment fills; a stream stores it whole at once.
        Without the privilege (EXECUTE on pg_switch_wal), the archive gets there when the segment fills."""
        import contextlib

        import psycopg

        from ...errors import RegalError
        from ...postgresql.connection import connect
        from .target import PostgresClusterTarget

        target = policy.target(manifest.target)
        assert isinstance(target, PostgresClusterTarget)
        with contextlib.suppress(RegalError, psycopg.Error), connect(target.resolved_dsn(), autocommit=True) as conn:
            conn.execute("SELECT pg_switch_wal()")

    def first_steps(self, target: str, state: ArchiveState) -> str:
        steps = (f"Check the WAL stream (`systemctl status regal-wal-stream@{target}`, `regal-backup wal status "
                 f"{target}`) or the server's archive_command in its log; restart it: the slot keeps the WAL "
                 "meanwhile.")
        if state.newest_stored_at is not None and state.gaps:
            return f"Take a base backup now (`regal-backup backup {target}`): restores start after the gap. " + steps
        return steps

    def prune(self, policy: Policy, repo: Repository, keyring: Keyring, target: str, kept: set[str], *,
              dry_run: bool) -> int | None:
        from .wal import prune_wal

        return prune_wal(repo, keyring, target, kept, dry_run=dry_run)

    def test_recoveries(self, policy: Policy, repo: Repository, keyring: Keyring, manifest: Manifest, *,
                        tested_at: datetime, work_dir: Path | None, jobs: int, progress: Progress | None,
                        touch_source: bool) -> TestFindings:
        from .recovery_test import run_recoveries

        return run_recoveries(policy, repo, keyring, manifest, tested_at=tested_at, work_dir=work_dir, jobs=jobs,
                              progress=progress, touch_source=touch_source)

    def asset(self, target: str) -> ArchiveAsset:
        return ArchiveAsset(
            ("postgres", target, "wal"), "wal", frozenset({"postgres"}),
            f"The WAL of the server '{target}' in the repository (`regal-backup wal stream`, or `wal push` as "
            "archive_command): what a point-in-time restore replays. Freshness is the RPO ({rpo}): the age of the "
            f"newest stored WAL while the server writes more, reported each minute by the {WATCH_SENSOR} sensor.",
            WATCH_SENSOR, "Each minute: `wal status` of every postgres_cluster target; newer WAL stored (or the "
                          "archive caught up with the server) is a materialization of postgres/<target>/wal.")
