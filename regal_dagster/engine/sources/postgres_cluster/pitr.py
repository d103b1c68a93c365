"""Point-in-time recovery of a `postgres_cluster` target: which base backup can reach the point asked for,
which WAL recovery will replay (refused, naming the segment, when the archive has a gap), and the restore
itself: the data directory written and checked, and PostgreSQL configured to fetch WAL through
`regal-backup wal get` and stop at the target.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ...catalog import newest_first
from ...checks import check_status, run_checks
from ...crypto import Keyring
from ...environment import child_environment
from ...errors import IntegrityError, RegalError, UsageError
from ...manifest import Manifest
from ...policy import Policy
from ...postgresql.tools import pg_tool_for_server
from ...restore import RestoreResult, restore_backup
from ...storage import Repository
from ..base import RestoreRequest
from .recovery import ClusterRestoreOptions
from .wal import (
    WalMissingError,
    archived_names,
    fetch_wal,
    format_lsn,
    is_wal_segment,
    list_wal,
    missing_segments,
    parse_lsn,
    partial_names,
    segment_name,
    segment_name_of,
    segment_number,
)
from .walstatus import newest_records


@dataclass(frozen=True)
class RecoveryGoal:
    """Where recovery stops: the end of the archive, a time, a WAL position or a named restore point."""

    time: datetime | None = None
    lsn: str | None = None
    name: str | None = None

    @classmethod
    def chosen(cls, *, latest: bool = False, time: datetime | None = None, lsn: str | None = None,
               name: str | None = None) -> RecoveryGoal:
        """The goal the operator chose: exactly one of the end of the archive, a time, a position, a restore point."""
        chosen = [o for o, v in (("--latest", latest), ("--to-time", time), ("--to-lsn", lsn), ("--to-name", name))
                  if v]
        if len(chosen) != 1:
            raise UsageError("say where recovery stops" if not chosen
                             else f"{' and '.join(chosen)} contradict each other",
                             "give one of --latest, --to-time TIME, --to-lsn LSN, --to-name RESTORE_POINT")
        if lsn:
            parse_lsn(lsn)
        return cls(time=time, lsn=lsn, name=name)

    @property
    def latest(self) -> bool:
        return self.time is None and self.lsn is None and self.name is None

    def describe(self) -> str:
        if self.time is not None:
            return f"time {self.time.isoformat()}"
        if self.lsn is not None:
            return f"WAL position {self.lsn}"
        if self.name is not None:
            return f"restore point '{self.name}'"
        return "newest archived WAL"  # callers say "the ..."

    def settings(self) -> dict[str, str]:
        if self.time is not None:
            return {"recovery_target_time": self.time.isoformat(sep=" ")}
        if self.lsn is not None:
            return {"recovery_target_lsn": self.lsn}
        if self.name is not None:
            return {"recovery_target_name": self.name}
        return {}


@dataclass
class RecoveryPlan:
    target: str
    goal: RecoveryGoal
    base: Manifest
    first_segment: str  # the first WAL segment recovery needs (where the base backup starts)
    last_segment: str  # the newest archived segment recovery may replay up to
    segments: int  # how many segments that is
    settings: dict[str, str]
    target_lsn: str | None = None  # a named restore point's position, as found in the WAL
    notes: list[str] = field(default_factory=list)
    wal_files: list[str] = field(default_factory=list)  # the archived files recovery may replay, in order

    @property
    def chain(self) -> list[str]:
        """The base backups the restore combines, the full one first (just the base backup when it is full)."""
        return [*self.base.source.get("chain", []), self.base.backup_id]

    def to_json(self) -> dict[str, Any]:
        source = self.base.source
        return {"target": self.target, "goal": self.goal.describe(), "base_backup": self.base.backup_id,
                "base_backup_finished_at": self.base.finished_at.isoformat(), "start_lsn": source["start_lsn"],
                "stop_lsn": source["stop_lsn"], "timeline": source["timeline"], "first_segment": self.first_segment,
                "last_segment": self.last_segment, "segments_to_replay": self.segments,
                "backup_type": source.get("backup_type", "full"), "chain": self.chain,
                "target_lsn": self.target_lsn, "recovery_settings": self.settings, "notes": self.notes,
                "wal_files": len(self.wal_files)}

    def describe(self) -> str:
        """The plan for people: the base backup, the chain it is combined from, the WAL replayed, the goal."""
        source = self.base.source
        return (f"base backup {self.base.backup_id} (finished {self.base.finished_at:%Y-%m-%d %H:%M:%S} UTC, WAL "
                f"{source['start_lsn']}..{source['stop_lsn']} on timeline {source['timeline']})\n"
                + (f"incremental: combined from {' + '.join(self.chain)} (pg_combinebackup)\n" if len(self.chain) > 1
                   else "")
                + f"WAL to replay: {self.segments} segment(s), {self.first_segment} .. {self.last_segment}, "
                  f"stopping at the {self.goal.describe()}"
                + (f" (found at {self.target_lsn})" if self.target_lsn else ""))


def restore_command(policy_path: Path, target: str) -> str:
    """The restore_command of a restored server: this regal-backup fetching from the repository."""
    script = Path(sys.executable).parent / "regal-backup"
    program = [str(script)] if script.is_file() else [sys.executable, "-m", "regal_dagster.cli"]
    words = [*program, "--policy", str(policy_path.resolve()), "wal", "get", "--restore-command", "--target", target]
    return " ".join(shlex.quote(w) for w in words) + " %f %p"


def plan_recovery(policy: Policy, repo: Repository, keyring: Keyring, target: str, goal: RecoveryGoal,
                  policy_path: Path, *, backup_id: str | None = None,
                  trigger: dict[str, str] | None = None) -> RecoveryPlan:
    """The newest good base backup that can reach `goal`, and the WAL it needs (refused with the first missing
    segment's name when the archive has a gap)."""
    if policy.target(target).kind != "postgres_cluster":
        raise UsageError(f"target {target} is not a postgres_cluster target",
                         "point-in-time restores are for targets of kind postgres_cluster")
    names = archived_names(repo, target)
    partials = partial_names(repo, target)
    notes: list[str] = []
    if rolled_back := _refuse_beyond_stored(policy, repo, keyring, target, goal):
        notes.append(f"{rolled_back}; the {goal.describe()} is before the stored end: it is still reached")
    with _wal_cache(repo, keyring, target) as cache:
        for manifest in newest_first(repo, keyring, target):
            if backup_id and manifest.backup_id != backup_id:
                continue
            reach = _reaches(manifest, goal, cache)
            if reach is False:
                notes.append(f"{manifest.backup_id} ends after the {goal.describe()}: passed over")
                continue
            status = check_status(repo, keyring, manifest)
            if status.status == "unchecked":
                if not run_checks(policy, repo, keyring, manifest.backup_id, trigger=trigger).passed:
                    notes.append(f"{manifest.backup_id} was not checked: checked it now, it FAILED")
                    continue
                notes.append(f"{manifest.backup_id} was not checked: checked it now, it passed")
            elif not status.good:
                notes.append(f"{manifest.backup_id} failed its checks: passed over")
                continue
            return _plan(target, goal, manifest, names, partials, policy_path,
                         reach if isinstance(reach, str) else None, notes)
    raise RegalError(f"no good base backup of '{target}' can reach the {goal.describe()}"
                     + (f" ({'; '.join(notes)})" if notes else ""),
                     "take a base backup (`regal-backup backup TARGET`) before the point you need, or choose a later "
                     "point; `regal-backup list TARGET` shows the backups")


def _refuse_beyond_stored(policy: Policy, repo: Repository, keyring: Keyring, target: str,
                          goal: RecoveryGoal) -> str | None:
    """A point after the end of the stored WAL is one recovery never reaches (PostgreSQL stops at the first record
    at or after it, and fails to start when the WAL ends first): refused before anything is written, naming the
    newest reachable point (the newest commit and the newest record of the stored WAL, read with pg_waldump). The
    stored WAL ending before the newest proved position is a ROLLBACK (walproof.py): `--latest`, and any point
    after the stored end, are refused naming it (IntegrityError); an earlier point goes ahead, with the rollback
    returned for the notes. (When the newest segments hold no commit or record, that bound is not known here.)"""
    from ...workspace import private_directory
    from .walproof import ROLLBACK_HINT, known_position, rollback

    files = list_wal(repo, keyring, target)
    rolled_back = rollback(known_position(policy, repo, keyring, target), files, target)
    if goal.latest and rolled_back:
        raise IntegrityError(f"{rolled_back}. A restore to the newest WAL would silently recover less: refused, "
                             "nothing was written", ROLLBACK_HINT)
    newest = next(iter(newest_first(repo, keyring, target)), None)
    if newest is None or (goal.time is None and goal.lsn is None):
        return rolled_back  # no base backup: plan_recovery says so; a restore point is looked for in the WAL
    with private_directory("wal-newest") as work:
        found = newest_records(repo, keyring, newest, work, files)
    commit = (f"its newest commit is at {found.commit_at.isoformat()} (WAL position {found.commit_lsn})"
              if found.commit_at else "it holds no commit in its newest segments")
    beyond = None
    if goal.time is not None and found.commit_at is not None and goal.time > found.commit_at:
        beyond = f"the stored WAL of {target} ends before {goal.time.isoformat()}: {commit}; recovery cannot reach a " \
                 "later time"
    if goal.lsn is not None and found.record_lsn is not None and parse_lsn(goal.lsn) > parse_lsn(found.record_lsn):
        beyond = (f"the stored WAL of {target} ends before WAL position {goal.lsn}: its newest record starts at "
                  f"{found.record_lsn} and {commit}; recovery cannot reach a later position")
    if beyond is None:
        return rolled_back
    if rolled_back:
        raise IntegrityError(f"{rolled_back}. The {goal.describe()} is after the stored end ({beyond}). Nothing was "
                             "written", ROLLBACK_HINT)
    reachable = [f"--to-lsn {found.record_lsn}" if found.record_lsn else "",
                 f"--to-time {found.commit_at.isoformat()}" if found.commit_at else ""]
    raise UsageError(f"{beyond}. Nothing was written",
                     f"restore to {' or '.join(r for r in reachable if r)} or earlier, or --latest (the end of the "
                     "stored WAL); if the server has written since, wait for its WAL to be stored "
                     "(`regal-backup wal status`)")


def _plan(target: str, goal: RecoveryGoal, base: Manifest, names: set[str], partials: set[str], policy_path: Path,
          named_lsn: str | None, notes: list[str]) -> RecoveryPlan:
    source = base.source
    size, timeline = int(source["wal_segment_size"]), int(source["timeline"])
    complete = [segment_number(n, size)[1] for n in names
                if is_wal_segment(n) and segment_number(n, size)[0] >= timeline]
    after = max(complete, default=parse_lsn(source["start_lsn"]) // size - 1) + 1
    in_progress = max((p for p in partials if segment_number(p, size)[0] >= timeline
                       and segment_number(p, size)[1] == after), default=None)
    if in_progress is not None:  # the newest WAL: the snapshot of the segment being received
        names = names | {in_progress}
        notes.append(f"{in_progress} is the snapshot of the segment being received (the newest WAL)")
    start, stop = parse_lsn(source["start_lsn"]), parse_lsn(source["stop_lsn"])
    end_number = None
    if goal.lsn is not None:
        end_number = parse_lsn(goal.lsn) // size
    elif named_lsn is not None:
        end_number = parse_lsn(named_lsn) // size
    missing, newest = missing_segments(names, timeline, start, size, end_number)
    stop_number = stop // size
    if newest < stop_number and not missing:
        missing = [segment_name_of(timeline, stop_number, size)]
    if missing:
        raise RegalError(f"the WAL archive of {target} lacks {missing[0]}"
                         + (f" and {len(missing) - 1} more segment(s)" if len(missing) > 1 else "")
                         + f", which recovery from {base.backup_id} to the {goal.describe()} needs",
                         "nothing was written; `regal-backup wal status` shows the gaps: restore to a point before "
                         "the gap, or from a base backup taken after it")
    first = segment_name(timeline, start, size)
    last = max((n for n in names if is_wal_segment(n) and segment_number(n, size)[1] == newest),
               default=segment_name_of(timeline, newest, size))
    settings = {"restore_command": restore_command(policy_path, target), **goal.settings(),
                "recovery_target_action": "promote", "recovery_target_timeline": "latest",
                "archive_mode": "off"}
    wal_files = sorted(n for n in names if n.endswith(".history") and int(n[:8], 16) > timeline)
    # and the segment after the target's, when stored: recovery stops after the first record at or past a position,
    # which may begin there (a position in the padding after a WAL switch; a record crossing into it)
    copied_to = newest if end_number is None else newest + 1
    wal_files += sorted((n for n in names if is_wal_segment(n) and segment_number(n, size)[0] >= timeline
                         and start // size <= segment_number(n, size)[1] <= copied_to),
                        key=lambda n: (segment_number(n, size)[1], n))
    return RecoveryPlan(target, goal, base, first, last, newest - start // size + 1, settings, named_lsn, notes,
                        wal_files)


def _reaches(manifest: Manifest, goal: RecoveryGoal, cache: _WalCache) -> bool | str | None:
    """Whether recovery from this base backup can stop at `goal`: it must be consistent (its stop position)
    before the goal. For a named point, the position where the WAL after the backup holds it (False when
    it holds none)."""
    if goal.time is not None:
        return manifest.finished_at <= goal.time
    if goal.lsn is not None:
        return parse_lsn(manifest.source["stop_lsn"]) <= parse_lsn(goal.lsn)
    if goal.name is not None:
        found = cache.find_restore_point(manifest, goal.name)
        return found if found is not None else False
    return True


class _WalCache:
    """Archived WAL fetched (authenticated) into a private directory once, for pg_waldump."""

    def __init__(self, repo: Repository, keyring: Keyring, target: str, directory: Path):
        self.repo, self.keyring, self.target, self.directory = repo, keyring, target, directory

    def fetch_from(self, timeline: int, lsn: int, size: int) -> None:
        """The stored segments from `lsn` on, ending with the snapshot of the segment being received (if any)."""
        number = lsn // size
        names = archived_names(self.repo, self.target)
        snapshots = partial_names(self.repo, self.target)
        while True:
            name = max((n for n in names if is_wal_segment(n) and segment_number(n, size)[1] == number
                        and segment_number(n, size)[0] >= timeline), default=None)
            snapshot = name is None
            if snapshot:
                name = max((n for n in snapshots if segment_number(n, size)[1] == number
                            and segment_number(n, size)[0] >= timeline), default=None)
            if name is None:
                return
            path = self.directory / name
            if snapshot or not path.exists():  # a snapshot grows: fetched again
                try:
                    fetch_wal(self.repo, self.keyring, self.target, name, path, allow_partial=snapshot)
                except WalMissingError:
                    return
            if snapshot:
                return
            number += 1

    def find_restore_point(self, manifest: Manifest, name: str) -> str | None:
        source = manifest.source
        size, timeline, stop = int(source["wal_segment_size"]), int(source["timeline"]), parse_lsn(source["stop_lsn"])
        self.fetch_from(timeline, stop, size)
        tool = pg_tool_for_server("pg_waldump", int(source["server_version_num"]) // 10000)
        # pg_waldump reads one timeline: each run of segments of one timeline (after a promotion, the new one's
        # first segment holds the old one's WAL up to the switch too) is read with its own
        fetched = sorted((segment_number(p.name, size)[1], segment_number(p.name, size)[0])
                         for p in self.directory.iterdir() if is_wal_segment(p.name))
        runs: list[tuple[int, int, int]] = []  # (timeline, first number, last number)
        for number, tli in fetched:
            if number < stop // size:
                continue
            if runs and runs[-1][0] == tli and runs[-1][2] == number - 1:
                runs[-1] = (tli, runs[-1][1], number)
            else:
                runs.append((tli, number, number))
        for tli, first, last in runs:
            begin, end = format_lsn(max(stop, first * size)), format_lsn((last + 1) * size)
            done = subprocess.run([str(tool.path), "--path", str(self.directory), "--start", begin, "--end", end,
                                   "--timeline", str(tli), "--rmgr", "XLOG"], capture_output=True, text=True,
                                  check=False, env=child_environment(), timeout=3600)
            for line in done.stdout.splitlines():
                match = re.search(r"lsn: ([0-9A-F]+/[0-9A-F]+),.*desc: RESTORE_POINT (.*)$", line)
                if match and match.group(2).strip() == name:
                    return match.group(1)
        return None


@contextlib.contextmanager
def _wal_cache(repo: Repository, keyring: Keyring, target: str) -> Iterator[_WalCache]:
    from ...workspace import private_directory

    with private_directory("wal-scan") as directory:
        yield _WalCache(repo, keyring, target, directory)


@dataclass
class PitrResult:
    plan: RecoveryPlan
    restored: RestoreResult | None  # None: --preview

    def to_json(self) -> dict[str, Any]:
        """What `restore TARGET --to-dir DIR --json` prints: the restore's result (the plan in its `details`), or
        with --preview the plan."""
        if self.restored is None:
            return {"preview": True, **self.plan.to_json()}
        return {"preview": False, **self.restored.to_json()}


def restore_cluster(policy: Policy, repo: Repository, keyring: Keyring, target: str, goal: RecoveryGoal,
                    to_dir: Path, policy_path: Path, *, preview: bool = False, backup_id: str | None = None,
                    with_wal: bool = False, trigger: dict[str, str] | None = None) -> PitrResult:
    """Restore `target` into the new data directory `to_dir`, to recover to `goal` when started. With `with_wal`
    the WAL it replays is copied into the directory (`regal_wal/`) and restore_command reads it there: the
    server then needs neither regal-backup nor the keys."""
    plan = plan_recovery(policy, repo, keyring, target, goal, policy_path, backup_id=backup_id, trigger=trigger)
    if with_wal:
        from .datadir import WAL_COPY

        plan.settings["restore_command"] = f"cp {WAL_COPY}/%f %p"  # run in the data directory
    if preview:
        return PitrResult(plan, None)
    request = RestoreRequest(str(to_dir), jobs=1, options=ClusterRestoreOptions(
        plan.settings, plan.wal_files if with_wal else None))
    restored = restore_backup(policy, repo, keyring, plan.base, request, trigger=trigger)
    restored.details.update(plan.to_json())
    if restored.ok:
        restored.next_steps = (
            f"Start it: pg_ctl -D {to_dir} start, as the user that owns {to_dir}"
            + ("" if with_wal else f" and can read {policy_path} and its keys")
            + (" (chown -R the directory to that user first: PostgreSQL does not run as root)" if _is_root() else "")
            + f". It replays WAL from the repository to the {goal.describe()} and opens for writes. archive_mode is "
            "off in the restored server: give it its own target before turning archiving on.")
    return PitrResult(plan, restored)


def _is_root() -> bool:
    import os

    return os.geteuid() == 0
