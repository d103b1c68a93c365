"""The commands: each parses nothing and decides nothing; it calls the engine and renders the result."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..engine import catalog
from ..engine.audit import completed_backups
from ..engine.checks import check_status, run_checks
from ..engine.crypto import Keyring, generate_master_key, load_keyring
from ..engine.errors import UsageError
from ..engine.policy import Policy, load_policy
from ..engine.repository_format import open_repository_format
from ..engine.selection import choose_backup
from ..engine.settings import parse_duration
from ..engine.storage import Repository, open_repository
from .output import Output, manifest_summary, size


def utc_time(text: str, option: str) -> datetime:
    """An ISO 8601 time from the command line, in UTC (a time without an offset is UTC)."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{option} {text!r} is not a time", "write it as ISO 8601, e.g. 2026-11-24T02:00:00 "
                                                             "(UTC unless it says +HH:MM)") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _open(args: argparse.Namespace) -> tuple[Policy, Repository, Keyring]:
    """The policy, its repository (once its marker authenticates) and the keys: what every command that reads
    or writes the repository starts from."""
    policy = _load_policy(args)
    repo, keyring = open_repository(policy), load_keyring(policy)
    open_repository_format(repo, keyring)
    return policy, repo, keyring


def _load_policy(args: argparse.Namespace) -> Policy:
    """The policy; with --from-offsite, the off-site copy stands in for the repository (the primary site is lost)."""
    policy = load_policy(args.policy)
    if getattr(args, "from_offsite", False):
        if policy.offsite is None:
            raise UsageError("the policy has no off-site repository", "drop --from-offsite, or add `offsite:`")
        policy = policy.model_copy(update={"repository": policy.offsite, "offsite": None})
    return policy


# --- commands ------------------------------------------------------------------------------------

def cmd_init(args: argparse.Namespace, out: Output) -> int:
    from ..engine.bootstrap import init_project

    made = init_project(Path(args.directory), args.postgres_dsn, master_key_env=args.master_key_env,
                        redis_url=args.redis_url)
    for warning in made.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    out.result(
        {"policy": str(made.policy_path), "repository": made.repository, "keyset": str(made.keyset_path),
         "master_key": made.master_key_location, "key_id": made.key_id},
        f"policy      {made.policy_path}\n"
        f"repository  {made.repository}\n"
        f"keyset      {made.keyset_path} (encrypted; key {made.key_id})\n"
        f"master key  {made.master_key_location}"
        + ("  (mode 0600: copy it to your secret store now; without it no backup can be read)"
           if not made.master_key_location.startswith("$") else "")
        + f"\n\nnext: regal-backup --policy {made.policy_path} backup main")
    return 0


def cmd_master_key(args: argparse.Namespace, out: Output) -> int:
    print(generate_master_key())
    return 0


def cmd_backup(args: argparse.Namespace, out: Output) -> int:
    from ..engine.backup import run_backup  # source client libraries are imported only where needed

    policy = _load_policy(args)
    if args.wait:
        try:
            wait = parse_duration(args.wait)
        except ValueError as exc:
            raise UsageError(f"--wait: {exc}", "e.g. --wait 10m") from None
        policy = policy.model_copy(update={"repository": policy.repository.model_copy(update={"lock_wait": wait})})
    with out.progress(f"backup {args.target}") as progress:
        result = run_backup(policy, args.target, args.retention_class, trigger={"cli": "backup"}, progress=progress)
    if result.offsite_problem:
        print(f"warning: {result.offsite_problem}\n  what to do: run `regal-backup offsite sync` once the off-site "
              "repository is reachable", file=sys.stderr)
    s = manifest_summary(result.manifest)
    out.result(s, f"backup {s['backup_id']} ({s['retention_class']}) done in {s['duration_seconds']:.1f}s: "
                  f"{size(s['bytes_read'])} read, {size(s['bytes_stored'])} stored, "
                  f"{s['tables']} tables, {s['rows']} rows, key {s['key_id']}")
    return 0


def cmd_list(args: argparse.Namespace, out: Output) -> int:
    policy, repo, keyring = _open(args)
    completed = completed_backups(policy, repo)
    backups, damaged = catalog.list_backups(repo, keyring, args.target, completed=completed)
    unfinished = catalog.unfinished_backups(repo, args.target, completed=completed)
    rows = []
    for manifest in backups:
        status = check_status(repo, keyring, manifest)
        rows.append({**manifest_summary(manifest), "status": status.status, "status_note": status.problem})
    lines = [f"{'BACKUP':40} {'CLASS':8} {'STARTED (UTC)':20} {'STORED':>10} {'ROWS':>10}  STATUS"]
    lines += [f"{r['backup_id']:40} {r['retention_class']:8} {r['started_at'][:19]:20} "
              f"{size(r['bytes_stored']):>10} {r['rows']:>10}  {r['status']}"
              + (f" ({r['status_note']})" if r["status_note"] else "") for r in rows]
    lines += [f"{d.backup_id:40} {'?':8} {'?':20} {size(d.stored_bytes):>10} {'?':>10}  DAMAGED: {d.problem}"
              for d in damaged]
    if unfinished:
        lines.append(f"({len(unfinished)} unfinished backup(s), interrupted or running, "
                     f"{size(sum(u.stored_bytes for u in unfinished))}: not backups; prune removes them after "
                     f"{policy.prune.orphan_grace})")
    out.result({"backups": rows, "damaged": [d.__dict__ for d in damaged],
                "unfinished": [u.__dict__ for u in unfinished]},
               "\n".join(lines) if rows or damaged or unfinished else "no backups yet")
    return 1 if damaged else 0


def cmd_verify(args: argparse.Namespace, out: Output) -> int:
    policy, repo, keyring = _open(args)
    record = run_checks(policy, repo, keyring, args.backup_id, jobs=args.jobs, trigger={"cli": "verify"})
    checks = [{"name": o.name, "passed": o.passed, "severity": o.severity, "description": o.description,
               "failing_object": o.failing_object} for o in record.outcomes]
    text = "\n".join(f"{'OK  ' if o.passed else o.severity:5} {o.name:10} {o.description}" for o in record.outcomes)
    around = [o.name for o in record.outcomes if not o.passed and o.severity == "ERROR"]  # key, off-site copy
    verdict = ("FAILED verification" if not record.passed else
               f"verified, but {' and '.join(around)} failed" if around else "verified: every check passed")
    out.result({"backup_id": record.backup_id, "ok": record.passed, "checks": checks},
               f"{text}\nbackup {record.backup_id}: {verdict}")
    return 3 if not record.passed else 1 if around else 0


def cmd_restore(args: argparse.Namespace, out: Output) -> int:
    from ..engine.restore import restore_backup
    from ..engine.sources.base import RestoreRequest

    policy, repo, keyring = _open(args)
    if not args.backup_id and not args.target:
        raise UsageError("say which backup to restore", "give a BACKUP_ID, or --target with --latest or --before")
    if not args.backup_id and not (args.latest or args.before):
        raise UsageError("say which backup of the target to restore", "add --latest, or --before TIME")
    before = utc_time(args.before, "--before") if args.before else None
    selected = choose_backup(policy, repo, keyring, args.target or "", backup_id=args.backup_id, before=before,
                             trigger={"cli": "restore"})
    for note in selected.notes:
        print(f"note: {note}", file=sys.stderr)
    manifest = selected.manifest
    with out.progress(f"restore {manifest.backup_id}") as progress:
        request = RestoreRequest(args.to, jobs=args.jobs or policy.jobs_for(manifest.target),
                                 drop_existing=args.drop_existing, keep_owners=args.keep_owners,
                                 validation=args.validate, keys=args.keys,
                                 accept_ledger_rollback=args.accept_ledger_rollback, progress=progress)
        result = restore_backup(policy, repo, keyring, manifest, request, pre_hook=args.pre_hook,
                                post_hook=args.post_hook, trigger={"cli": "restore"})
    payload = {"backup_id": result.backup_id, "kind": result.kind, **result.details, "ok": result.ok,
               **({"problems": result.problems} if result.problems else {}),
               **({"erasures": result.erasures.to_json()} if result.erasures else {})}
    text = result.summary
    if result.problems:
        text += "\nVALIDATION FAILED:\n" + "\n".join(f"  - {p}" for p in result.problems)
    if result.erasures and result.erasures.subjects:
        text += (f"\nGDPR: {result.erasures.subjects} erasure(s) re-applied, rows erased: "
                 + ", ".join(f"{t} {n}" for t, n in result.erasures.rows_erased.items()))
    if result.next_steps and result.ok:
        text += "\n" + result.next_steps
    out.result(payload, text)
    return 0 if result.ok else 3


def _work_dir(args: argparse.Namespace, policy: Policy) -> Path | None:
    """Where scratch servers go: --work-dir, else the policy's restore_tests.work_dir, else the temp dir."""
    chosen = args.work_dir or policy.restore_tests.work_dir
    return policy.resolve_path(chosen) if chosen else None


def cmd_restore_test(args: argparse.Namespace, out: Output) -> int:
    from ..engine.restore_test import run_restore_test
    from ..engine.sources.registry import source_for

    policy, repo, keyring = _open(args)
    selected = choose_backup(policy, repo, keyring, args.target, backup_id=args.backup_id,
                             trigger={"cli": "restore-test"})
    for note in selected.notes:
        print(f"note: {note}", file=sys.stderr)
    manifest = selected.manifest
    result = run_restore_test(policy, repo, keyring, manifest, jobs=args.jobs,
                              work_dir=_work_dir(args, policy), trigger={"cli": "restore-test"})
    phases = ", ".join(f"{name} {s:.1f}s" for name, s in result.seconds.items() if name != "total")
    passed = source_for(manifest.kind).restore_test_proves
    verdict = (f"validation passed: {passed}"
               if result.validation_passed else "VALIDATION FAILED:\n" + "\n".join(f"  - {p}" for p in result.problems))
    text = (f"restore test of {result.backup_id} (age {result.backup_age_seconds / 3600:.1f} h): RTO "
            f"{result.rto_seconds:.1f}s against a target of {result.rto_target_seconds / 3600:.1f} h "
            f"({'within' if result.rto_within_target else 'OVER'}) ({phases})\n{verdict}")
    out.result(result.to_json(), text)
    return 0 if result.validation_passed and result.rto_within_target else 3


def cmd_drill(args: argparse.Namespace, out: Output) -> int:
    from ..engine.drill import run_drill

    policy, repo, keyring = _open(args)
    record = run_drill(policy, repo, keyring, jobs=args.jobs,
                       work_dir=_work_dir(args, policy))
    lines = [f"drill {record['drill_id']}: everything but the repository and the keys lost at {record['loss_at']}"]
    for t in record["targets"]:
        if t["recovered"]:
            lines.append(f"  {t['target']}: restored {t['restored']['backup_id']} in {t['restored']['restore_seconds']:.1f}s;"
                         f" RPO {t['rpo_seconds']:.0f}s against {t['rpo_target_seconds']:.0f}s"
                         + ("" if t["rpo_within_target"] else " (MISSED)") + (
                             f"; {len(t['tried'])} newer backup(s) did not restore" if t["tried"] else ""))
        else:
            lines.append(f"  {t['target']}: NOT RECOVERED ({len(t['tried'])} backup(s) tried)")
    lines.append(f"RTO {record['rto_seconds']:.1f}s against {record['rto_target_seconds']:.0f}s: "
                 + ("PASSED" if record["passed"] else "FAILED"))
    out.result(record, "\n".join(lines))
    return 0 if record["passed"] else 3


def cmd_gdpr_erase(args: argparse.Namespace, out: Output) -> int:
    from ..engine.gdpr import record_erasure

    requested = utc_time(args.requested_at, "--requested-at") if args.requested_at else datetime.now(UTC)
    policy, repo, keyring = _open(args)
    erasure = record_erasure(policy, repo, keyring, args.target, args.subject,
                             requested_at=requested, reference=args.reference or "")
    out.result(erasure.__dict__, f"erasure recorded for target {erasure.target} (subject {erasure.subject_hash[:12]}…, "
                                 f"requested {erasure.requested_at}); it is re-applied after every restore")
    return 0


def cmd_gdpr_list(args: argparse.Namespace, out: Output) -> int:
    from ..engine.gdpr import load_ledger

    _, repo, keyring = _open(args)
    ledger = load_ledger(repo, keyring)
    lines = [f"{e.target:12} {e.subject_hash[:16]}  requested {e.requested_at}  {e.reference}" for e in ledger.erasures]
    out.result({"erasures": [e.__dict__ for e in ledger.erasures]}, "\n".join(lines) or "no erasures recorded")
    return 0


def cmd_prune(args: argparse.Namespace, out: Output) -> int:
    from ..engine.retention import run_prune

    policy, repo, keyring = _open(args)
    report = run_prune(policy, repo, datetime.now(UTC), dry_run=args.dry_run or args.check, keyring=keyring)
    lines = []
    for decisions in report.decisions.values():
        for d in decisions:
            verb = "keep  " if d.keep else ("would delete" if report.dry_run else "deleted")
            lines.append(f"{verb:12} {d.backup_id:40} {'; '.join(d.reasons)}")
    lines.append(f"{len(report.leftovers)} object(s) no backup needs {'to remove' if report.dry_run else 'removed'}"
                 + (f"; {len(report.locked)} kept by Object Lock until their date" if report.locked else "")
                 + (f"; {len(report.offsite_deleted)} backup(s) removed off-site" if report.offsite_deleted else ""))
    if args.check:
        lines.append("retention holds: nothing is kept past its retention" if not report.past_retention
                     else f"PAST RETENTION: {', '.join(report.past_retention)}")
    out.result(report.to_json(), "\n".join(lines))
    return 3 if args.check and report.past_retention else 0


def cmd_keys_list(args: argparse.Namespace, out: Output) -> int:
    from ..engine.keys import key_inventory

    policy, repo, keyring = _open(args)
    keys = key_inventory(policy, repo, keyring)
    lines = [f"{'KEY':>10}  {'STATUS':12} {'CREATED':25} {'PRIMARY SINCE':25} {'RETIRED':25} BACKUPS"]
    lines += [f"{k['key_id']:>10}  {k['status']:12} {k['created_at'] or '?':25} {k['primary_since'] or '-':25} "
              f"{k['retired_at'] or '-':25} {len(k['backups'])}{' + GDPR ledger' if k['gdpr_ledger'] else ''}"
              for k in keys]
    out.result({"keys": keys}, "\n".join(lines))
    return 0


def cmd_keys_rotate(args: argparse.Namespace, out: Output) -> int:
    from ..engine.keys import rotate_key

    keyring = rotate_key(_load_policy(args))
    out.result({"primary_key_id": keyring.primary_key_id},
               f"key {keyring.primary_key_id} is now primary: new backups use it; older backups stay readable "
               "with the earlier keys (retire one with `regal-backup keys retire KEY_ID`)")
    return 0


def cmd_keys_retire(args: argparse.Namespace, out: Output) -> int:
    from ..engine.keys import retire_key

    report = retire_key(_load_policy(args), args.key_id, reencrypt=args.reencrypt)
    text = [f"key {report.key_id} retired: its material is destroyed"]
    if report.reencrypted:
        text.append(f"re-encrypted and verified under the primary key: {', '.join(report.reencrypted)}")
    if report.ledger_reencrypted:
        text.append("the GDPR erasure ledger was re-encrypted too")
    if report.locked_leftovers:
        text.append(f"{len(report.locked_leftovers)} old object(s) stay under Object Lock until their date "
                    "(unreadable now; prune removes them then)")
    out.result(report.__dict__, "\n".join(text))
    return 0


def cmd_offsite_sync(args: argparse.Namespace, out: Output) -> int:
    from ..engine.offsite import sync_backup, sync_repository_documents
    from ..engine.storage import open_offsite

    policy, repo, keyring = _open(args)
    secondary = open_offsite(policy)
    if secondary is None:
        raise UsageError("the policy has no off-site repository", "add `offsite:` (like `repository:`) to the policy")
    rows: list[dict[str, Any]] = []
    sync_repository_documents(repo, secondary)
    for target in sorted(policy.targets):
        for manifest in catalog.list_backups(repo, keyring, target)[0]:
            problems = sync_backup(repo, secondary, manifest)
            rows.append({"backup_id": manifest.backup_id, "in_step": not problems,
                         "problems": [f"{p.key}: {p.problem}" for p in problems]})
    bad = [r for r in rows if not r["in_step"]]
    out.result({"offsite": secondary.location, "backups": rows},
               f"{len(rows) - len(bad)} of {len(rows)} backups copied and read back in {secondary.location}"
               + "".join(f"\nNOT IN STEP {r['backup_id']}: {'; '.join(r['problems'])}" for r in bad))
    return 1 if bad else 0


def cmd_audit_verify(args: argparse.Namespace, out: Output) -> int:
    from ..engine.audit import AuditTrail, verify_trail

    policy, repo, keyring = _open(args)
    trail = AuditTrail(policy, repo, keyring)
    trail.ensure_schema()
    verdict = verify_trail(trail)
    trail.checkpoint(verdict)
    if verdict.ok:
        text = (f"audit trail intact: {verdict.entries} entries, head {verdict.head_hash} (entry {verdict.head_seq}), "
                f"{verdict.checkpoints} checkpoint(s) match")
    else:
        text = f"AUDIT TRAIL BROKEN at entry {verdict.first_bad_seq}: {verdict.problem}"
    if verdict.spooled:
        text += f"\n{verdict.spooled} event(s) wait in the repository's spool for the audit database"
    out.result(verdict.to_json(), text)
    return 0 if verdict.ok else 3


def cmd_report(args: argparse.Namespace, out: Output) -> int:
    from ..engine.report import Period, build_report

    policy = _load_policy(args)
    period = Period.parse(args.period) if args.period else Period.previous_month(datetime.now(UTC))
    result = build_report(policy, period, trigger={"cli": "report"})  # a future period: exit 2
    written = []
    if args.output:
        pdf_path = Path(args.output)
        oscal_path = pdf_path.with_name(pdf_path.stem + ".oscal-ar.json")
        pdf_path.write_bytes(result.pdf)
        oscal_path.write_bytes(result.oscal)
        written = [str(pdf_path), str(oscal_path)]
    failed = [c.control_id for c in result.controls if c.result == "FAIL"]
    untested = [c.control_id for c in result.controls if c.result == "NOT TESTED"]
    out.result({"report_id": result.report_id, "key": result.key, "oscal_key": result.oscal_key,
                "sha256": result.sha256, "evidence_sha256": result.evidence_sha256,
                "chain_ok": result.chain_ok, "interim": result.interim, "frameworks": result.frameworks,
                "exceptions": len(result.exceptions),
                "controls": {c.control_id: c.result for c in result.controls}, "written": written},
               f"report {result.report_id}{' (INTERIM: the period has not ended)' if result.interim else ''}"
               f" stored as {result.key} (SHA-256 {result.sha256}), OSCAL results as {result.oscal_key}"
               + (f"; written to {' and '.join(written)}" if written else "")
               + "\n" + ", ".join(f"{name} {verdict}" for name, verdict in result.frameworks.items())
               + f"\n{len(result.exceptions)} exception(s); controls failed: {', '.join(failed) or 'none'}; "
               f"not tested: {', '.join(untested) or 'none'}"
               + ("" if result.chain_ok else "\nTHE AUDIT TRAIL IS BROKEN: see `regal-backup audit verify`"))
    return 0 if result.chain_ok else 3


def cmd_upgrade(args: argparse.Namespace, out: Output) -> int:
    from ..engine.upgrade import upgrade_repository

    report = upgrade_repository(_load_policy(args))
    if report.already_current:
        text = "the repository is current (format 2: every document sealed); nothing to do"
    else:
        text = (f"sealed {len(report.manifests_sealed)} manifest(s) and {report.documents_sealed} other "
                "document(s); the repository is now format 2")
    if report.keyset_upgraded:
        text += "\nthe keyset gained document keys (keep a copy of the new keyset file with your key backups)"
    text += "".join(f"\nNOT SEALED {key}: {why}" for key, why in report.refused.items())
    out.result(report.__dict__, text)
    return 3 if report.refused else 0


def cmd_demo(args: argparse.Namespace, out: Output) -> int:
    from .demo import run_demo

    summary = run_demo(Path(args.dir), scale=args.scale, keep_running=args.keep_running, echo=not args.json)
    out.result(summary, summary["text"])
    return 0 if summary["verified"] else 3


# --- wiring --------------------------------------------------------------------------------------

