"""`regal-backup status`: each target's newest good backup against its RPO, recoverability, the last checks,
restore test and drill, legal holds and open alerts. A module of its own, so that `status` loads only what it
reads (issue 30)."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from .context import open_repository_of
from .output import Output, age, size


def cmd_status(args: argparse.Namespace, out: Output) -> int:
    from ..engine.status import repository_status

    policy, repo, keyring = open_repository_of(args)
    if args.alert or args.heartbeat:
        from .monitoring import watch_dagster

        return watch_dagster(args, policy, repo, keyring, out)
    with out.activity("reading the repository"):
        status = repository_status(policy, repo, keyring, datetime.now(UTC), args.target)
    lines = [f"repository {status.repository}: {size(status.repository_bytes)}"
             + (f"; {status.damaged} DAMAGED backup(s): see `regal-backup list`" if status.damaged else "")]
    if (room := status.capacity) is not None and room.free_bytes is not None:
        lines.append(f"  room {size(room.free_bytes)} free; growth {size(int(room.growth_bytes_per_day))} a day: "
                     + (f"full in {room.days_until_full:.1f} days" if room.days_until_full is not None
                        else "no growth"))
    for t in status.targets:
        good = t.newest_good
        rpo = (f"age {age(t.rpo_age_seconds)} against an RPO of {age(t.rpo_seconds)}: "
               + ("BREACHED" if t.rpo_breached else "within"))
        lines.append(f"\n{t.target} ({t.kind}): " + (f"newest good backup {good.backup_id} ({good.retention_class}), "
                                                     f"{rpo}" if good else f"NO GOOD BACKUP: RPO {age(t.rpo_seconds)} "
                                                                             "BREACHED"))
        if t.newest and (good is None or t.newest.backup_id != good.backup_id):
            lines.append(f"  newest backup     {t.newest.backup_id}: {t.newest.status}")
        if t.recoverability is not None:
            lines.append(f"  recoverability    {t.recoverability.summary}")
        if t.unrecoverable:
            lines.append(f"  UNRECOVERABLE     {t.unrecoverable}")
        v = t.last_verification
        lines.append("  last verification " + (f"{v['checked_at'][:16]} of {v['backup_id']}: "
                                                + ("passed" if not v["failed_checks"] else
                                                   "FAILED " + ", ".join(v["failed_checks"])) if v else "never"))
        r = t.last_restore_test
        lines += [f"  ROLLED BACK: {problem}" for problem in t.rolled_back]
        if r and "rolled_back" in r:
            lines.append(f"  last restore test ROLLED BACK: {r['key']} is gone")
        elif r and "refused" in r:
            lines.append(f"  last restore test REFUSED: {r['refused']}")
        else:
            lines.append("  last restore test " + (
                f"{r['tested_at'][:16]} of {r['backup_id']}: {'passed' if r['passed'] else 'FAILED'}, RTO "
                f"{age(r['rto_seconds'])} against {age(r['rto_target_seconds'])}" if r else "never"))
    d = status.last_drill
    lines.append("\nlast drill " + ("never" if d is None else f"REFUSED: {d['refused']}" if "refused" in d else
                                    f"{d['at'][:16]}: {'passed' if d['passed'] else 'FAILED'}, RTO "
                                    f"{age(d['rto_seconds'])} against {age(d['rto_target_seconds'])}"
                                    + (f"; not recovered: {', '.join(d['not_recovered'])}" if d["not_recovered"]
                                       else "")))
    lines += [f"{t.target}: LEGAL HOLD on {h['backup_id']} ({h['reason']})"
              + (f" until {h['until'][:16]}" if h["until"] else "") for t in status.targets for h in t.legal_holds]
    lines.append(f"open alerts: {len(status.open_alerts)}" + "".join(f"\n  - {a['what']}" for a in status.open_alerts))
    if status.rpo_breached:
        lines.append(f"RPO BREACHED: {', '.join(status.rpo_breached)}")
    lines += sorted({f"record rollback protection: {t.record_protection}" for t in status.targets
                     if t.record_protection.startswith("no audit trail")})
    out.result(status.to_json(), "\n".join(lines))
    return 3 if status.rpo_breached or status.rolled_back or status.unrecoverable else 0
