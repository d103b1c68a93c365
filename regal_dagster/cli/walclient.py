"""`wal push` and `wal get` as PostgreSQL runs them, once per WAL file: through the resident `wal daemon` when one
serves the target (a UNIX socket; nothing but the standard library is loaded), else synchronously in this process,
saying so on stderr (PostgreSQL's log). `wal daemon` itself: the resident archiver and prefetcher.

The durability rule (docs/pitr.md): `wal push` exits 0 only once the WAL file is sealed in the repository, its
object and then its sealed record written, by the daemon or by this process; never for a file that is only on
local disk."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..engine.errors import RegalError
from ..engine.policy_location import policy_file
from ..engine.wal_daemon_socket import DaemonAbsent, ask_daemon, find_socket
from .output import Output, size


class _Refused(RegalError):
    """The daemon's refusal, with the exit status it chose."""

    def __init__(self, reply: dict[str, Any]):
        super().__init__(str(reply.get("error") or "the wal daemon refused"), reply.get("hint"))
        self.exit_code = int(reply.get("exit_code") or 1)


def _ask(args: argparse.Namespace, request: dict[str, Any], doing: str) -> dict[str, Any] | None:
    """The daemon's answer, or None (said on stderr) when no daemon serves this policy and target."""
    policy = policy_file(args.policy).absolute()
    path = find_socket(policy, args.target)
    try:
        if path is None:
            target = args.target or "(the policy's only postgres_cluster one)"
            raise DaemonAbsent(f"no `regal-backup wal daemon` runs for this policy and target {target}")
        return ask_daemon(path, {**request, "target": args.target})
    except DaemonAbsent as absent:
        print(f"regal-backup wal {request['op']}: {absent}: {doing} synchronously in this process", file=sys.stderr,
              flush=True)
        return None


def cmd_wal_push(args: argparse.Namespace, out: Output) -> int:
    reply = _ask(args, {"op": "push", "path": str(Path(args.path).absolute())}, "archiving")
    if reply is None:
        from .pitr import cmd_wal_push as push_here

        return push_here(args, out)
    if not reply.get("ok"):
        raise _Refused(reply)
    out.result({"target": reply["target"], "name": reply["name"], "already": reply["already"],
                "plaintext_bytes": reply["plaintext_bytes"], "stored_bytes": reply["stored_bytes"], "daemon": True},
               f"{reply['name']}: " + ("already archived with the same content" if reply["already"] else
                                       f"archived by the wal daemon ({size(reply['plaintext_bytes'])} -> "
                                       f"{size(reply['stored_bytes'])})"))
    return 0


def cmd_wal_get(args: argparse.Namespace, out: Output) -> int:
    reply = _ask(args, {"op": "get", "name": args.name, "destination": str(Path(args.destination).absolute()),
                        "serving_recovery": args.serving_recovery}, "fetching")
    if reply is None:
        from .pitr import cmd_wal_get as get_here

        return get_here(args, out)
    if not reply.get("ok"):
        raise _Refused(reply)
    out.result({"target": reply["target"], "name": reply["name"], "partial": reply["partial"],
                "bytes": reply["bytes"], "prefetched": reply["prefetched"], "daemon": True},
               f"{reply['name']}{' (snapshot of the segment being received)' if reply['partial'] else ''}: "
               f"{size(reply['bytes'])} to {args.destination}"
               + (" (from the prefetch queue)" if reply["prefetched"] else ""))
    return 0


def cmd_wal_daemon(args: argparse.Namespace, out: Output) -> int:
    from ..engine.sources.postgres_cluster.wal import cluster_target
    from ..engine.sources.postgres_cluster.waldaemon import WalDaemon
    from .context import open_repository_of, policy_path, stop_on_signals

    policy, repo, keyring = open_repository_of(args)
    target = cluster_target(policy, args.target)
    stop = stop_on_signals("finishing the uploads under way")
    daemon = WalDaemon(policy, repo, keyring, target, policy_path(args), workers=args.workers,
                       prefetch=args.prefetch, say=out.info)
    counts = daemon.run(stop)
    out.result({"target": target, **counts},
               f"stopped: {counts['pushed']} WAL file(s) archived ({counts['pushed_ahead']} ahead of PostgreSQL's "
               f"request), {counts['served']} served to recovery ({counts['served_prefetched']} from the prefetch "
               "queue)")
    return 0
