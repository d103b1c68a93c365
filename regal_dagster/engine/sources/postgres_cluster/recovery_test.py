"""The restore test of a `postgres_cluster` base backup: point-in-time recoveries from it, each into a scratch data
directory with the WAL it replays copied in, started with PostgreSQL of its version, promoted and validated.

1. When the target allows it (`restore_point_facts`, and not in a drill), a named restore point is created on the
   server first, with facts that must hold exactly at it (sources/postgres_cluster/pointfacts.py), and the test waits
   until the stream (or archive_command) has stored the WAL that holds it.
2. Recoveries, each measured from the start of its restore to the promotion (its RTO):
   - to the newest stored WAL: it must replay the newest stored record and have the newest stored commit; its RPO
     is how much the restored server lacks of what the server had when the test began;
   - to a WAL position drawn uniformly (engine/sampling.py, seed recorded) between the base backup's consistency
     point and the newest stored record: PostgreSQL must report that it stopped there;
   - to the restore point, when there is one: PostgreSQL must report stopping at it, and the facts must hold.
   Each: every database opens and pg_amcheck finds nothing.
"""

from __future__ import annotations

import re
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ...crypto import Keyring
from ...errors import MissingSoftwareError, RegalError
from ...manifest import Manifest
from ...pipeline import Progress
from ...policy import Policy
from ...postgresql.connection import connect
from ...restore import restore_to
from ...sampling import DRAW_POINT_METHOD, draw_point
from ...storage import Repository
from ...workspace import private_directory
from ..base import RestoreRequest
from ..capabilities import RESTORE_FAILED, TestFindings
from ..postgres.source import amcheck_problems
from ..registry import source_for
from .datadir import WAL_COPY
from .pitr import RecoveryGoal, plan_recovery
from .pointfacts import PointFacts, create_restore_point, facts_problems
from .recovered import database_problems, open_databases, recovered_server, server_log
from .recovery import ClusterRestoreOptions
from .wal import format_lsn, parse_lsn
from .walstatus import NewestRecords, newest_records, wal_status

RESTORE_POINT_WAIT = 120.0  # seconds for the restore point's WAL to be stored (wal stream: seconds)
_STOPPED_AT_LSN = re.compile(r'recovery stopping (?:before|after) WAL location \(LSN\) "([0-9A-F]+/[0-9A-F]+)"')


def run_recoveries(policy: Policy, repo: Repository, keyring: Keyring, manifest: Manifest, *, tested_at: datetime,
                   work_dir: Path | None, jobs: int, progress: Progress | None, touch_source: bool) -> TestFindings:
    found = TestFindings()
    target = manifest.target
    point, server_lsn, point_stored = None, None, False
    if touch_source and getattr(policy.target(target), "restore_point_facts", False):
        point, server_lsn, point_stored = _restore_point(policy, repo, keyring, target, tested_at)
        found.details["restore_point"] = point.to_json()
    try:
        with private_directory("wal-newest", work_dir) as work:
            newest = newest_records(repo, keyring, manifest, work)
    except RegalError as exc:
        found.problems.append(f"{RESTORE_FAILED}: the newest stored WAL cannot be read: {exc.message}")
        return found
    low = parse_lsn(manifest.source["stop_lsn"])
    high = parse_lsn(newest.record_lsn) if newest.record_lsn else low
    seed = secrets.token_hex(16)
    drawn = format_lsn(draw_point(low, high, seed))
    found.details["random_point"] = {"lsn": drawn, "low": format_lsn(low), "high": format_lsn(high), "seed": seed,
                                     "method": DRAW_POINT_METHOD}
    goals: list[tuple[str, RecoveryGoal]] = [("newest", RecoveryGoal()), ("random", RecoveryGoal(lsn=drawn))]
    if point is not None and point_stored:
        goals.append(("restore_point", RecoveryGoal(name=point.name)))
    outcomes = []
    for label, goal in goals:
        outcome = _recover(policy, repo, keyring, manifest, label, goal, work_dir, jobs, progress,
                           point if label == "restore_point" else None)
        outcome["problems"] += _stop_problems(label, goal, outcome, newest, point)
        if label == "newest":
            _measure_rpo(outcome, manifest, tested_at, server_lsn)
        found.problems += [f"recovery to {goal.describe().removeprefix('the ')}: {p}" for p in outcome["problems"]]
        outcomes.append(outcome)
        found.seconds.update({f"{label}_{k}": v for k, v in outcome["seconds"].items()})
    found.details["recoveries"] = outcomes
    found.details["newest_stored_commit"] = newest.commit_at.isoformat() if newest.commit_at else None
    rtos = [o["rto_seconds"] for o in outcomes if o.get("rto_seconds") is not None]
    if rtos and len(rtos) == len(outcomes):
        found.seconds["rto"] = max(rtos)  # the slowest recovery
    first = outcomes[0]
    found.details.update(rpo_seconds=first.get("rpo_seconds"), rpo_basis=first.get("rpo_basis"),
                         newest_data_at=first.get("newest_commit") or manifest.finished_at.isoformat(),
                         databases=first.get("databases", []))
    checked = next((o for o in outcomes if o["point"] == "restore_point"), None)
    if point is not None and point.facts and checked is not None:  # the tables whose facts were checked
        failing = " ".join(checked["problems"])
        found.tables = [{"schema": f"{db}:{table.partition('.')[0]}", "name": table.partition(".")[2],
                         "rows": fact["rows"], "matches": "facts_checked" in checked
                         and f"database {db}: table {table} " not in failing and f"database {db} cannot" not in failing}
                        for db, facts in point.facts.items() for table, fact in facts["sample"].items()]
    return found


def _restore_point(policy: Policy, repo: Repository, keyring: Keyring, target: str,
                   tested_at: datetime) -> tuple[PointFacts, str | None, bool]:
    """The restore point and its facts, the server's WAL position before it (None: not reachable), and whether the
    repository holds the WAL up to the restore point (waited for)."""
    name = f"regal_restore_test_{tested_at:%Y%m%dT%H%M%SZ}_{secrets.token_hex(2)}"
    dsn = policy.target(target).resolved_dsn()  # type: ignore[attr-defined]
    try:
        with connect(dsn, autocommit=True) as conn:
            row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        server_lsn = str(row[0]) if row else None
        point = create_restore_point(dsn, name)
    except RegalError as exc:
        return PointFacts(name, note=f"no restore point: {exc.message}"), None, False
    if point.lsn is None:
        return point, server_lsn, False
    deadline = time.monotonic() + RESTORE_POINT_WAIT
    while True:
        stored = wal_status(policy, repo, keyring, target, ask_server=False).newest_lsn
        if stored is not None and parse_lsn(stored) >= parse_lsn(point.lsn):
            return point, server_lsn, True
        if time.monotonic() > deadline:
            point.note += (f"; its WAL was not stored within {RESTORE_POINT_WAIT:.0f} s (is `wal stream` running?): "
                           "not recovered to it")
            return point, server_lsn, False
        time.sleep(0.5)


def _recover(policy: Policy, repo: Repository, keyring: Keyring, manifest: Manifest, label: str, goal: RecoveryGoal,
             work_dir: Path | None, jobs: int, progress: Progress | None, point: PointFacts | None) -> dict[str, Any]:
    """One recovery of `manifest` to `goal` in a scratch data directory: what it reached and what was wrong (with
    `point`: the facts recorded at it, checked)."""
    outcome: dict[str, Any] = {"point": label, "goal": goal.describe(), "problems": [], "seconds": {}}
    started = time.monotonic()
    try:
        with source_for(manifest.kind).scratch_destination(work_dir, manifest) as destination:
            plan = plan_recovery(policy, repo, keyring, manifest.target, goal, policy.base_dir,
                                 backup_id=manifest.backup_id)
            recovery = {**plan.settings, "restore_command": f"cp {WAL_COPY}/%f %p"}  # the WAL copied in
            restored = restore_to(policy, repo, keyring, manifest, RestoreRequest(
                destination, jobs=jobs, progress=progress, scratch=True,
                options=ClusterRestoreOptions(recovery, plan.wal_files)))
            outcome["problems"] += restored.problems
            outcome["seconds"] = {k: v for k, v in restored.seconds.items() if k != "total"}
            outcome.update(target_lsn=plan.target_lsn or goal.lsn, wal_files=len(plan.wal_files))
            with recovered_server(Path(destination), manifest) as cluster:
                outcome["rto_seconds"] = time.monotonic() - started
                with connect(cluster.dsn()) as conn:
                    row = conn.execute("SELECT pg_last_wal_replay_lsn()::text, pg_last_xact_replay_timestamp()"
                                       ).fetchone()
                assert row is not None
                outcome["replayed_to_lsn"] = row[0]
                outcome["newest_commit"] = row[1].astimezone(UTC).isoformat() if row[1] else None
                outcome["log"] = [line.split("LOG:", 1)[-1].strip() for line in server_log(cluster).splitlines()
                                  if "recovery stopping" in line or "last completed transaction" in line]
                outcome["databases"] = open_databases(cluster)
                outcome["problems"] += database_problems(outcome["databases"], manifest)
                phase = time.monotonic()
                outcome["problems"] += amcheck_problems(cluster.dsn(), jobs, all_databases=True)
                outcome["seconds"]["amcheck"] = time.monotonic() - phase
                if point is not None and point.facts:
                    outcome["problems"] += facts_problems(cluster.dsn, point)
                    outcome["facts_checked"] = sum(1 + len(f["sample"]) for f in point.facts.values())
    except MissingSoftwareError:  # this machine cannot run the test: nothing is known about the backup
        raise
    except RegalError as exc:
        outcome["problems"].append(f"{RESTORE_FAILED}: {exc.message}")
    return outcome


def _stop_problems(label: str, goal: RecoveryGoal, outcome: dict[str, Any], newest: NewestRecords,
                   point: PointFacts | None) -> list[str]:
    """Where recovery stopped, against where it was asked to (PostgreSQL's own report in its log, and the position
    it replayed to): the newest stored record and commit, the drawn position, the restore point."""
    replayed = outcome.get("replayed_to_lsn")
    if replayed is None:
        return []  # it did not start: already a problem
    problems: list[str] = []
    log = " ".join(outcome.get("log", []))
    if label == "newest":
        if newest.record_lsn and parse_lsn(replayed) <= parse_lsn(newest.record_lsn):
            problems.append(f"it replayed to {replayed}, short of the newest stored WAL record at {newest.record_lsn}")
        if newest.commit_at and (outcome["newest_commit"] is None
                                 or datetime.fromisoformat(outcome["newest_commit"]) < newest.commit_at):
            problems.append(f"its newest commit is {outcome['newest_commit']}, the stored WAL holds one of "
                            f"{newest.commit_at.isoformat()}")
        if "recovery stopping" in log:
            problems.append(f"PostgreSQL stopped before the end of the WAL: {log}")
    elif goal.lsn is not None:
        stopped = _STOPPED_AT_LSN.search(log)
        if stopped is None or parse_lsn(stopped.group(1)) < parse_lsn(goal.lsn):
            problems.append(f"PostgreSQL did not report stopping at {goal.lsn} (its log: {log or 'nothing'})")
        elif parse_lsn(replayed) < parse_lsn(goal.lsn):
            problems.append(f"it replayed to {replayed} only, before {goal.lsn}")
    elif goal.name is not None and point is not None:
        if f'recovery stopping at restore point "{goal.name}"' not in log:
            problems.append(f"PostgreSQL did not report stopping at restore point '{goal.name}' (its log: "
                            f"{log or 'nothing'})")
        elif point.lsn and parse_lsn(replayed) != parse_lsn(point.lsn):
            problems.append(f"it replayed to {replayed}, the restore point ends at {point.lsn}")
    return problems


def _measure_rpo(outcome: dict[str, Any], manifest: Manifest, tested_at: datetime, server_lsn: str | None) -> None:
    """The RPO the newest-point recovery achieved: none lost when it replayed past the server's position at the
    test's start; else the age, at the test's start, of its newest commit (of the base backup's end when it has
    none): an upper bound."""
    replayed = outcome.get("replayed_to_lsn")
    if replayed is None:
        return
    if server_lsn is not None and parse_lsn(replayed) >= parse_lsn(server_lsn):
        outcome.update(rpo_seconds=0.0, rpo_basis=f"replayed past {server_lsn}, the server's WAL position when the "
                                                  "test began: nothing it had written was lost")
        return
    newest = datetime.fromisoformat(outcome["newest_commit"]) if outcome.get("newest_commit") else manifest.finished_at
    outcome.update(rpo_seconds=max(0.0, (tested_at - newest).total_seconds()),
                   rpo_basis="the age of the newest restored commit when the test began (an upper bound: "
                             + ("the server was not asked)" if server_lsn is None else
                                f"the server was at {server_lsn})"))
