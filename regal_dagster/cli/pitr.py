"""The commands of point-in-time recovery (`postgres_cluster` targets): a restore to a point, and the WAL
archive (`wal push/get/status/stream`). They parse and render; the engine decides."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

from ..engine.errors import RegalError, UsageError
from .context import open_repository_of, policy_path, stop_on_signals, utc_time
from .output import Output, age, restored_text, size


def restore_to_point(args: argparse.Namespace, out: Output) -> int:
    from ..engine.sources.postgres_cluster.pitr import RecoveryGoal, restore_cluster

    target = args.backup_id or args.target
    if not args.to_dir or not target:
        raise UsageError("a point-in-time restore needs the target and a new data directory",
                         "regal-backup restore TARGET --to-dir DIR with --latest, --to-time, --to-lsn or --to-name")
    if args.to or args.before:
        raise UsageError("--to and --before do not go with --to-dir", "use --to-time for a point in time")
    goal = RecoveryGoal.chosen(latest=args.latest, time=utc_time(args.to_time, "--to-time") if args.to_time else None,
                               lsn=args.to_lsn, name=args.to_name)
    policy, repo, keyring = open_repository_of(args)
    with out.activity(f"restore {target} to the {goal.describe()}"):
        result = restore_cluster(policy, repo, keyring, target, goal, Path(args.to_dir).absolute(), policy_path(args),
                                 preview=args.preview, backup_id=args.base_backup, with_wal=args.with_wal,
                                 trigger={"cli": "restore"})
    for note in result.plan.notes:
        out.note(note)
    if result.restored is None:
        out.result(result.to_json(), "PREVIEW (nothing written)\n" + result.plan.describe())
        return 0
    out.result(result.to_json(), restored_text(result.restored, result.plan.describe()))
    return 0 if result.restored.ok else 3


def cmd_wal_push(args: argparse.Namespace, out: Output) -> int:
    from ..engine.sources.postgres_cluster.wal import cluster_target, push_wal

    policy, repo, keyring = open_repository_of(args)
    target = cluster_target(policy, args.target)
    pushed = push_wal(policy, repo, keyring, target, Path(args.path))
    out.result({"target": target, **pushed.__dict__},
               f"{pushed.name}: " + ("already archived with the same content" if pushed.already else
                                     f"archived ({size(pushed.plaintext_bytes)} -> {size(pushed.stored_bytes)})"))
    return 0


def cmd_wal_get(args: argparse.Namespace, out: Output) -> int:
    from ..engine.sources.postgres_cluster.wal import (
        RecoveryMustStopError,
        WalMissingError,
        cluster_target,
        fetch_wal,
    )

    try:
        policy, repo, keyring = open_repository_of(args)
        target = cluster_target(policy, args.target)
        found = fetch_wal(repo, keyring, target, args.name, Path(args.destination))
    except WalMissingError:
        raise  # exit 1: recovery ends at the end of the archive
    except (RegalError, OSError) as exc:
        if not args.serving_recovery:
            raise
        from .os_errors import describe_os_error

        message, hint = (exc.message, exc.hint) if isinstance(exc, RegalError) else describe_os_error(exc)
        raise RecoveryMustStopError.because(message, hint) from exc
    out.result({"target": target, "name": found.name, "partial": found.partial,
                "bytes": found.record.plaintext_size},
               f"{found.name}{' (snapshot of the segment being received)' if found.partial else ''}: "
               f"{size(found.record.plaintext_size)} to {args.destination}")
    return 0


def cmd_wal_status(args: argparse.Namespace, out: Output) -> int:
    from ..engine.recoverability import target_recoverability
    from ..engine.sources.postgres_cluster.wal import cluster_target
    from ..engine.sources.postgres_cluster.walstatus import COMMIT_LOOKBACK, wal_status

    policy, repo, keyring = open_repository_of(args)
    target = cluster_target(policy, args.target)
    status = wal_status(policy, repo, keyring, target, with_commit_time=True)
    model = target_recoverability(policy, repo, keyring, target, datetime.now(UTC))
    lines = [f"{target}: {status.segments} WAL segment(s) stored; newest "
             + (f"{status.newest_segment}, position {status.newest_lsn} stored {status.newest_stored_at}"
                if status.newest_lsn else "NONE")
             + (f" (from the snapshot of {status.snapshot}, being received)" if status.snapshot else "")]
    if status.newest_lsn:
        lines.append("newest commit stored: " + (f"{status.newest_commit_at} (at {status.newest_commit_lsn})"
                                                 if status.newest_commit_at else
                                                 f"none in the newest {COMMIT_LOOKBACK} segment(s)"))
    if status.server_lsn is not None:
        lines.append(f"server at {status.server_lsn}: " + (
            "caught up" if not status.lag_bytes else f"LAG {size(status.lag_bytes or 0)}, "
                                                     f"{age(status.lag_seconds or 0)} behind"))
    else:
        lines.append(f"server not reachable: {status.server_problem}")
    lines.append(f"oldest base backup {status.oldest_base_backup or 'NONE'}; "
                 + ("no gap" if not status.gaps else f"GAP: {len(status.gaps)} segment(s) missing, first "
                                                     f"{status.gaps[0]}"))
    if status.rollback:
        lines.append(status.rollback)
    lines += [f"LOST AT A FAILOVER: {lost}" for lost in status.lost]
    lines.append(f"recoverability: {model.summary}")
    if model.unrecoverable:
        lines.append(f"UNRECOVERABLE: {model.unrecoverable}")
    out.result({**status.to_json(), "recoverability": model.to_json()}, "\n".join(lines))
    return 3 if status.gaps or status.rollback or model.unrecoverable else 0


def cmd_wal_stream(args: argparse.Namespace, out: Output) -> int:
    from ..engine.sources.postgres_cluster.wal import cluster_target
    from ..engine.sources.postgres_cluster.walstream import run_stream

    policy, repo, keyring = open_repository_of(args)
    target = cluster_target(policy, args.target)
    stop = stop_on_signals("storing what was received")
    stored = run_stream(policy, repo, keyring, target, work_dir=Path(args.work_dir) if args.work_dir else None,
                        snapshot_seconds=args.snapshot_seconds, stop=stop,
                        say=out.info)
    out.result({"target": target, "stored": stored}, f"stopped: {stored} WAL file(s) stored by this run")
    return 0
