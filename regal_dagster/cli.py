"""`regal-backup`: the operator's CLI. Same engine as the Dagster assets; works when Dagster is down.

Exit status: 0 success, 1 operational failure, 2 bad usage or policy, 3 a backup failed verification.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .engine import catalog
from .engine.audit import audited
from .engine.checks import load_check_record, run_checks
from .engine.crypto import generate_master_key, load_keyring
from .engine.errors import RegalError
from .engine.manifest import Manifest
from .engine.offsite import copy_after_backup
from .engine.pipeline import Progress
from .engine.policy import RETENTION_CLASSES, Policy, default_jobs, fill_environment, load_policy
from .engine.repository import Repository, open_offsite, open_repository


class Output:
    """Human text on a terminal, or one JSON document with --json."""

    def __init__(self, as_json: bool):
        self.as_json = as_json

    def result(self, payload: Any, text: str) -> None:
        if self.as_json:
            print(json.dumps(payload, indent=2, default=str))
        else:
            print(text)

    def progress(self, description: str) -> _ProgressBar:
        return _ProgressBar(description, enabled=not self.as_json and sys.stderr.isatty())


class _ProgressBar:
    def __init__(self, description: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(desc=description, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)

    def __enter__(self) -> Progress | None:
        return self.bar.update if self.bar is not None else None

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def manifest_summary(m: Manifest) -> dict[str, Any]:
    return {
        "backup_id": m.backup_id, "target": m.target, "kind": m.kind, "retention_class": m.retention_class,
        "started_at": m.started_at.isoformat(), "finished_at": m.finished_at.isoformat(),
        "duration_seconds": round(m.duration_seconds, 3), "bytes_read": m.plaintext_bytes,
        "bytes_stored": m.stored_bytes, "key_id": m.objects[0].encryption.key_id if m.objects else None,
        "tables": len(m.source.get("tables", [])), "rows": sum(m.table_rows().values()),
        "retain_until": m.retain_until.isoformat(),
    }


def _load_policy(args: argparse.Namespace) -> Policy:
    """The policy; with --from-offsite, the off-site copy stands in for the repository (the primary site is lost)."""
    policy = load_policy(args.policy)
    if getattr(args, "from_offsite", False):
        if policy.offsite is None:
            raise RegalError("the policy has no off-site repository", "drop --from-offsite, or add `offsite:`")
        policy = policy.model_copy(update={"repository": policy.offsite, "offsite": None})
    return policy


# --- commands ------------------------------------------------------------------------------------

def cmd_init(args: argparse.Namespace, out: Output) -> int:
    from .engine.bootstrap import init_project

    made = init_project(Path(args.directory), args.postgres_dsn, master_key_env=args.master_key_env,
                        redis_url=args.redis_url)
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
    from .engine.backup import run_backup  # PostgreSQL client code is imported only where needed

    policy = _load_policy(args)
    with out.progress(f"backup {args.target}") as progress:
        manifest = run_backup(policy, args.target, args.retention_class, trigger={"cli": "backup"},
                              progress=progress)
    problem = copy_after_backup(open_repository(policy), open_offsite(policy), manifest)
    if problem:
        print(f"warning: {problem}\n  what to do: run `regal-backup offsite sync` once the off-site repository "
              "is reachable", file=sys.stderr)
    s = manifest_summary(manifest)
    out.result(s, f"backup {s['backup_id']} ({s['retention_class']}) done in {s['duration_seconds']:.1f}s: "
                  f"{_size(s['bytes_read'])} read, {_size(s['bytes_stored'])} stored, "
                  f"{s['tables']} tables, {s['rows']} rows, key {s['key_id']}")
    return 0


def cmd_list(args: argparse.Namespace, out: Output) -> int:
    policy = _load_policy(args)
    repo = open_repository(policy)
    backups, damaged = catalog.list_backups(repo, args.target)
    rows = [{**manifest_summary(m), "status": _status(repo, m.backup_id)} for m in backups]
    lines = [f"{'BACKUP':40} {'CLASS':8} {'STARTED (UTC)':20} {'STORED':>10} {'ROWS':>10}  STATUS"]
    lines += [f"{r['backup_id']:40} {r['retention_class']:8} {r['started_at'][:19]:20} "
              f"{_size(r['bytes_stored']):>10} {r['rows']:>10}  {r['status']}" for r in rows]
    lines += [f"DAMAGED {d.key}: {d.problem}" for d in damaged]
    out.result({"backups": rows, "damaged": [d.__dict__ for d in damaged]},
               "\n".join(lines) if rows or damaged else "no backups yet")
    return 1 if damaged else 0


def _status(repo: Repository, backup_id: str) -> str:
    """good (its checks passed), failed, or unchecked."""
    record = load_check_record(repo, backup_id)
    return "unchecked" if record is None else "good" if record.passed else "failed"


def cmd_verify(args: argparse.Namespace, out: Output) -> int:
    policy = _load_policy(args)
    repo = open_repository(policy)
    keyring = load_keyring(policy)
    record = run_checks(policy, repo, keyring, args.backup_id, jobs=args.jobs, trigger={"cli": "verify"})
    checks = [{"name": o.name, "passed": o.passed, "severity": o.severity, "description": o.description,
               "failing_object": o.failing_object} for o in record.outcomes]
    text = "\n".join(f"{'OK  ' if c['passed'] else c['severity']:5} {c['name']:10} {c['description']}" for c in checks)
    around = [c["name"] for c in checks if not c["passed"] and c["severity"] == "ERROR"]  # key, off-site copy
    verdict = ("FAILED verification" if not record.passed else
               f"verified, but {' and '.join(around)} failed" if around else "verified: every check passed")
    out.result({"backup_id": record.backup_id, "ok": record.passed, "checks": checks},
               f"{text}\nbackup {record.backup_id}: {verdict}")
    return 3 if not record.passed else 1 if around else 0


def _describe_destination(to: str | None) -> str | None:
    """Where a restore went, for the audit trail: never a password."""
    from .engine.sources import redis as redis_source
    from .engine.sources.postgres import describe_dsn

    if not to or "://" not in to and "=" not in to:
        return to  # a path
    return redis_source.describe_url(to) if to.startswith(("redis://", "rediss://")) else describe_dsn(to)


def cmd_restore(args: argparse.Namespace, out: Output) -> int:
    policy = _load_policy(args)
    repo = open_repository(policy)
    if not args.backup_id and not args.target:
        raise RegalError("say which backup to restore", "give a BACKUP_ID, or --target with --latest or --before")
    before = datetime.fromisoformat(args.before).replace(tzinfo=UTC) if args.before else None
    manifest = catalog.choose_backup(repo, args.target or "", backup_id=args.backup_id, latest=args.latest,
                                     before=before)
    keyring = load_keyring(policy)
    with audited(policy, repo, "restore", manifest.backup_id, {"cli": "restore"}) as details:
        details["to"] = _describe_destination(args.to)
        code = (_restore_to_files(repo, keyring, manifest, args, out) if manifest.kind != "postgres"
                else _restore_postgres(policy, repo, keyring, manifest, args, out))
        details["outcome"] = "success" if code == 0 else "failure"
    return code


def _restore_postgres(policy: Policy, repo: Repository, keyring: Any, manifest: Manifest, args: argparse.Namespace,
                      out: Output) -> int:
    from .engine.gdpr import apply_erasures, load_ledger
    from .engine.restore import VALIDATION, restore_backup

    with out.progress(f"restore {manifest.backup_id}") as progress:
        report = restore_backup(repo, keyring, manifest, args.to, drop_existing=args.drop_existing, jobs=args.jobs,
                                keep_owners=args.keep_owners, validation=args.validate, progress=progress,
                                before_writing=lambda: _hook("pre-hook", args.pre_hook))
    erasures = None
    if report.ok:
        erasures = apply_erasures(policy, load_ledger(repo, keyring), manifest.target, args.to)
        if not erasures.ok:
            raise RegalError(f"erased subjects are still present after re-applying the erasures: {erasures.still_present}",
                             "check gdpr.subjects in the policy; do not start the application before this is fixed")
        _hook("post-hook", args.post_hook)
    payload = {**report.__dict__, "ok": report.ok, "erasures": erasures.to_json() if erasures else None}
    phases = ", ".join(f"{name} {s:.1f}s" for name, s in report.seconds.items() if name != "total")
    text = (f"restored {report.backup_id} into {report.target} ({report.target_state}): {report.tables} tables, "
            f"{report.rows} rows in {report.seconds['total']:.1f}s with {report.jobs} jobs ({phases})\n"
            + (f"validation ({report.validation}): {VALIDATION[report.validation]}" if report.ok
               else "VALIDATION FAILED:\n" + "\n".join(f"  - {p}" for p in report.validation_problems)))
    if erasures and erasures.subjects:
        text += (f"\nGDPR: {erasures.subjects} erasure(s) re-applied, rows erased: "
                 + ", ".join(f"{t} {n}" for t, n in erasures.rows_erased.items()))
    out.result(payload, text)
    return 0 if report.ok else 3


def _restore_to_files(repo: Repository, keyring: Any, manifest: Manifest, args: argparse.Namespace,
                      out: Output) -> int:
    """Redis: an RDB for a stopped server; Terraform: a state file for `terraform state push`; configuration:
    a clone of the git bundle. Each is authenticated in full before it takes its final name."""
    from .engine.pipeline import read_object_to_file
    from .engine.sources import gitconfig, terraform
    from .engine.sources import redis as redis_source

    def fetch(name: str, path: Path) -> None:
        if path.exists() and not args.drop_existing:
            raise RegalError(f"{path} exists", "choose another place, or pass --drop-existing to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
        read_object_to_file(repo, keyring, manifest, name, path.with_name(path.name + ".partial")).replace(path)

    destination = Path(args.to)
    if manifest.kind == "redis" and args.to.startswith(("redis://", "rediss://")):
        if not args.keys:
            raise RegalError("say which keys to copy back", "add --keys PATTERN (a Redis glob, e.g. 'session:*')")
        with tempfile.TemporaryDirectory(prefix="regal-restore-") as tmp:
            fetch(redis_source.RDB_OBJECT, Path(tmp) / redis_source.RDB_OBJECT)
            scratch = redis_source.ScratchRedis(Path(tmp))
            with scratch:
                counts = redis_source.copy_keys(scratch.url, fill_environment(args.to, "--to"), args.keys,
                                                replace=args.drop_existing)
        out.result({"backup_id": manifest.backup_id, "kind": "redis", **counts, "ok": True},
                   f"copied {counts['copied']} keys matching {args.keys!r} from {manifest.backup_id} into "
                   f"{redis_source.describe_url(args.to)}; {counts['skipped_existing']} existing keys left alone"
                   + ("" if args.drop_existing else " (--drop-existing replaces them)"))
        return 0
    if manifest.kind == "redis":
        path = destination / redis_source.RDB_OBJECT
        fetch(redis_source.RDB_OBJECT, path)
        rdb = manifest.source["rdb"]
        text = (f"restored {manifest.backup_id} to {path} ({rdb['keys']} keys, RDB version {rdb['rdb_version']})\n"
                + redis_source.RESTORE_STEPS.format(path=path))
    elif manifest.kind == "terraform":
        path = destination
        fetch(terraform.STATE_OBJECT, path)
        state = manifest.source["state"]
        text = (f"restored {manifest.backup_id} to {path} (serial {state.get('serial')}, lineage "
                f"{state.get('lineage')}, {state.get('resources')} resources)\n"
                f"Review it, then: terraform state push {path}  (add -force only if the remote serial is higher "
                "and you mean to roll back)")
    else:
        if destination.exists() and any(destination.iterdir()):
            raise RegalError(f"{destination} is not empty", "clone into a new directory")
        with tempfile.TemporaryDirectory(prefix="regal-restore-") as tmp:
            bundle = Path(tmp) / gitconfig.BUNDLE_OBJECT
            fetch(gitconfig.BUNDLE_OBJECT, bundle)
            cloned = gitconfig.clone(bundle, destination)
        for name in manifest.source.get("lock_files", {}):
            fetch(gitconfig.LOCK_PREFIX + name, destination / "restored-lock-files" / name)
        path = destination
        text = (f"restored {manifest.backup_id}: cloned {len(cloned['refs'])} refs into {destination} (HEAD "
                f"{cloned['head'][:12]}); lock files as they were in restored-lock-files/")
    out.result({"backup_id": manifest.backup_id, "kind": manifest.kind, "path": str(path), "ok": True}, text)
    return 0


def _hook(name: str, command: str | None) -> None:
    """An operator's command (e.g. stop or start the application); a failure stops the restore."""
    if not command:
        return
    print(f"running --{name}: {command}", file=sys.stderr, flush=True)
    done = subprocess.run(command, shell=True, check=False)
    if done.returncode != 0:
        raise RegalError(f"--{name} failed with exit code {done.returncode}",
                         "fix it and run the restore again" if name == "pre-hook" else
                         "the database is restored and validated; start the application by hand")


def _work_dir(args: argparse.Namespace, policy: Policy) -> Path | None:
    """Where scratch servers go: --work-dir, else the policy's restore_tests.work_dir, else the temp dir."""
    chosen = args.work_dir or policy.restore_tests.work_dir
    return policy.resolve_path(chosen) if chosen else None


def cmd_restore_test(args: argparse.Namespace, out: Output) -> int:
    from .engine.checks import good_newest_first
    from .engine.restore_test import run_restore_test

    policy = _load_policy(args)
    repo = open_repository(policy)
    if args.backup_id:
        manifest = catalog.load_manifest(repo, args.backup_id)
    else:
        policy.target(args.target)  # a clear error for an unknown target
        newest = next(good_newest_first(repo, args.target), None)
        if newest is None:
            raise RegalError(f"no good backup of '{args.target}' to test",
                             f"take one and check it: regal-backup backup {args.target}, then verify it")
        manifest = newest
    result = run_restore_test(policy, repo, load_keyring(policy), manifest, jobs=args.jobs,
                              work_dir=_work_dir(args, policy), trigger={"cli": "restore-test"})
    phases = ", ".join(f"{name} {s:.1f}s" for name, s in result.seconds.items() if name != "total")
    passed = ("key counts, TTL counts and the key sample" if manifest.kind == "redis"
              else "row counts, content SHA-256, schema objects and pg_amcheck")
    verdict = (f"validation passed: {passed}"
               if result.validation_passed else "VALIDATION FAILED:\n" + "\n".join(f"  - {p}" for p in result.problems))
    text = (f"restore test of {result.backup_id} (age {result.backup_age_seconds / 3600:.1f} h): RTO "
            f"{result.rto_seconds:.1f}s against a target of {result.rto_target_seconds / 3600:.1f} h "
            f"({'within' if result.rto_within_target else 'OVER'}) ({phases})\n{verdict}")
    out.result(result.to_json(), text)
    return 0 if result.validation_passed and result.rto_within_target else 3


def cmd_drill(args: argparse.Namespace, out: Output) -> int:
    from .engine.drill import run_drill

    policy = _load_policy(args)
    record = run_drill(policy, open_repository(policy), load_keyring(policy), jobs=args.jobs,
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
    from .engine.gdpr import record_erasure

    policy = _load_policy(args)
    requested = datetime.fromisoformat(args.requested_at).replace(tzinfo=UTC) if args.requested_at else datetime.now(UTC)
    erasure = record_erasure(policy, open_repository(policy), load_keyring(policy), args.target, args.subject,
                             requested_at=requested, reference=args.reference or "")
    out.result(erasure.__dict__, f"erasure recorded for target {erasure.target} (subject {erasure.subject_hash[:12]}…, "
                                 f"requested {erasure.requested_at}); it is re-applied after every restore")
    return 0


def cmd_gdpr_list(args: argparse.Namespace, out: Output) -> int:
    from .engine.gdpr import load_ledger

    policy = _load_policy(args)
    ledger = load_ledger(open_repository(policy), load_keyring(policy))
    lines = [f"{e.target:12} {e.subject_hash[:16]}  requested {e.requested_at}  {e.reference}" for e in ledger.erasures]
    out.result({"erasures": [e.__dict__ for e in ledger.erasures]}, "\n".join(lines) or "no erasures recorded")
    return 0


def cmd_prune(args: argparse.Namespace, out: Output) -> int:
    from .engine.retention import run_prune

    policy = _load_policy(args)
    report = run_prune(policy, open_repository(policy), datetime.now(UTC), dry_run=args.dry_run or args.check)
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
    from .engine.keys import key_inventory

    policy = _load_policy(args)
    keys = key_inventory(policy, open_repository(policy))
    lines = [f"{'KEY':>10}  {'STATUS':12} {'CREATED':25} {'PRIMARY SINCE':25} {'RETIRED':25} BACKUPS"]
    lines += [f"{k['key_id']:>10}  {k['status']:12} {k['created_at'] or '?':25} {k['primary_since'] or '-':25} "
              f"{k['retired_at'] or '-':25} {len(k['backups'])}{' + GDPR ledger' if k['gdpr_ledger'] else ''}"
              for k in keys]
    out.result({"keys": keys}, "\n".join(lines))
    return 0


def cmd_keys_rotate(args: argparse.Namespace, out: Output) -> int:
    from .engine.keys import rotate_key

    keyring = rotate_key(_load_policy(args))
    out.result({"primary_key_id": keyring.primary_key_id},
               f"key {keyring.primary_key_id} is now primary: new backups use it; older backups stay readable "
               "with the earlier keys (retire one with `regal-backup keys retire KEY_ID`)")
    return 0


def cmd_keys_retire(args: argparse.Namespace, out: Output) -> int:
    from .engine.keys import retire_key

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
    from .engine.offsite import sync_backup
    from .engine.repository import open_offsite

    policy = _load_policy(args)
    secondary = open_offsite(policy)
    if secondary is None:
        raise RegalError("the policy has no off-site repository", "add `offsite:` (like `repository:`) to the policy")
    repo = open_repository(policy)
    rows = []
    for target in sorted(policy.targets):
        for manifest in catalog.list_backups(repo, target)[0]:
            problems = sync_backup(repo, secondary, manifest)
            rows.append({"backup_id": manifest.backup_id, "in_step": not problems,
                         "problems": [f"{p.key}: {p.problem}" for p in problems]})
    bad = [r for r in rows if not r["in_step"]]
    out.result({"offsite": secondary.location, "backups": rows},
               f"{len(rows) - len(bad)} of {len(rows)} backups copied and read back in {secondary.location}"
               + "".join(f"\nNOT IN STEP {r['backup_id']}: {'; '.join(r['problems'])}" for r in bad))
    return 1 if bad else 0


def cmd_audit_verify(args: argparse.Namespace, out: Output) -> int:
    from .engine.audit import AuditTrail, verify_trail

    policy = _load_policy(args)
    trail = AuditTrail(policy, open_repository(policy))
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
    from .engine.report import Period, build_report

    policy = _load_policy(args)
    period = Period.parse(args.period) if args.period else Period.previous_month(datetime.now(UTC))
    result = build_report(policy, period, trigger={"cli": "report"})
    if args.output:
        Path(args.output).write_bytes(result.pdf)
    failed = [c.control_id for c in result.controls if c.result == "FAIL"]
    out.result({"report_id": result.report_id, "key": result.key, "sha256": result.sha256,
                "evidence_sha256": result.evidence_sha256, "chain_ok": result.chain_ok,
                "controls": {c.control_id: c.result for c in result.controls}},
               f"report {result.report_id} stored as {result.key} (SHA-256 {result.sha256})"
               + (f"; written to {args.output}" if args.output else "")
               + f"\ncontrols failed: {', '.join(failed) or 'none'}"
               + ("" if result.chain_ok else "\nTHE AUDIT TRAIL IS BROKEN: see `regal-backup audit verify`"))
    return 0


def cmd_demo(args: argparse.Namespace, out: Output) -> int:
    from .demo import run_demo

    summary = run_demo(Path(args.dir), scale=args.scale, keep_running=args.keep_running, echo=not args.json)
    out.result(summary, summary["text"])
    return 0 if summary["verified"] else 3


# --- wiring --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    def options(parser: argparse.ArgumentParser, default: Any) -> argparse.ArgumentParser:
        parser.add_argument("--policy", default=default, help="policy file (default: $REGAL_POLICY or ./regal_backup.yaml)")
        parser.add_argument("--json", action="store_true", default=default if default is argparse.SUPPRESS else False,
                            help="machine-readable output")
        parser.add_argument("--from-offsite", action="store_true",
                            default=default if default is argparse.SUPPRESS else False,
                            help="use the off-site repository instead of the primary one (disaster recovery)")
        return parser

    # The options are accepted before and after the command; the command's copy must not reset them.
    common = options(argparse.ArgumentParser(add_help=False), argparse.SUPPRESS)
    parser = options(argparse.ArgumentParser(prog="regal-backup",
                                             description="Back up, verify and restore the Regal POS backend."), None)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", parents=[common], help="create a policy, a local repository and a keyset")
    p.add_argument("directory")
    p.add_argument("--postgres-dsn", required=True, help="DSN of the database to back up; use ${VAR} for secrets")
    p.add_argument("--master-key-env", help="keep the master key in this environment variable instead of a file")
    p.add_argument("--redis-url", help="also back up this Redis server, as the target `cache` (${VAR} for secrets)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("master-key", parents=[common], help="print a new master key (for --master-key-env)")
    p.set_defaults(func=cmd_master_key)

    p = sub.add_parser("backup", parents=[common], help="back up one target now")
    p.add_argument("target")
    p.add_argument("--class", dest="retention_class", choices=RETENTION_CLASSES, default="hourly")
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("list", parents=[common], help="list backups")
    p.add_argument("target", nargs="?")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("verify", parents=[common], help="read back and authenticate every byte of a backup")
    p.add_argument("backup_id")
    p.add_argument("--jobs", type=int, default=2 * default_jobs(),
                   help="objects read at once (default: twice the CPU cores, which evens out unequal objects)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("restore", parents=[common], help="restore a backup into a database")
    p.add_argument("backup_id", nargs="?")
    p.add_argument("--to", required=True, help="PostgreSQL: DSN of the database to restore into (created if missing); "
                                               "Redis: the directory for dump.rdb, or redis://... with --keys; "
                                               "Terraform: the state file to write; config: a new directory to "
                                               "clone into")
    p.add_argument("--target", help="with --latest or --before: the target whose backups to choose from")
    p.add_argument("--latest", action="store_true")
    p.add_argument("--before", help="newest backup started before this UTC time (ISO 8601)")
    p.add_argument("--drop-existing", action="store_true",
                   help="replace a non-empty database (dropped only after the backup is authenticated)")
    p.add_argument("--jobs", type=int, default=default_jobs(),
                   help="tables loaded and index builds run at once (default: CPU cores, at most 8)")
    p.add_argument("--validate", choices=["full", "rows"], default="full",
                   help="full (default): read every table back and compare row counts and SHA-256 with the backup; "
                        "rows: compare the loaded row counts only (faster; the bytes are still authenticated)")
    p.add_argument("--keys", help="Redis, with --to redis://...: copy back only the keys matching this glob")
    p.add_argument("--keep-owners", action="store_true", help="restore ownership and grants (roles must exist)")
    p.add_argument("--pre-hook", help="shell command run just before the target is changed (stop the application)")
    p.add_argument("--post-hook", help="shell command run after a validated restore (start the application)")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("restore-test", parents=[common],
                       help="restore a backup into a scratch PostgreSQL, validate it, measure the RTO, tear down")
    p.add_argument("backup_id", nargs="?", help="default: the newest good backup of --target")
    p.add_argument("--target", default="main")
    p.add_argument("--jobs", type=int, default=default_jobs())
    p.add_argument("--work-dir", help="where the scratch server lives (default: the policy's, else the temp dir)")
    p.set_defaults(func=cmd_restore_test)

    p = sub.add_parser("drill", parents=[common],
                       help="disaster-recovery drill: rebuild every target from the repository, measure RTO and RPO")
    p.add_argument("--jobs", type=int, default=default_jobs())
    p.add_argument("--work-dir", help="where the scratch servers live (default: the policy's, else the temp dir)")
    p.set_defaults(func=cmd_drill)

    gdpr = sub.add_parser("gdpr", help="the GDPR erasure ledger (re-applied after every restore)")
    gdpr_sub = gdpr.add_subparsers(dest="gdpr_command", required=True)
    p = gdpr_sub.add_parser("erase", parents=[common], help="record an erasure request")
    p.add_argument("target")
    p.add_argument("subject", help="the identifier the request names (e.g. the e-mail); stored only hashed")
    p.add_argument("--requested-at", help="when the subject asked (ISO 8601, UTC; default: now)")
    p.add_argument("--reference", help="your ticket or case number")
    p.set_defaults(func=cmd_gdpr_erase)
    p = gdpr_sub.add_parser("list", parents=[common], help="list recorded erasures (hashes only)")
    p.set_defaults(func=cmd_gdpr_list)

    p = sub.add_parser("prune", parents=[common], help="delete what retention no longer keeps (recorded)")
    p.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")
    p.add_argument("--check", action="store_true",
                   help="prove retention holds: exit 3 if any backup is past its retention (deletes nothing)")
    p.set_defaults(func=cmd_prune)

    keys = sub.add_parser("keys", help="the encryption keys: inventory, rotation, retirement")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    p = keys_sub.add_parser("list", parents=[common], help="every key with its dates and the backups using it")
    p.set_defaults(func=cmd_keys_list)
    p = keys_sub.add_parser("rotate", parents=[common], help="add a new primary key (older keys keep reading)")
    p.set_defaults(func=cmd_keys_rotate)
    p = keys_sub.add_parser("retire", parents=[common], help="destroy a key no backup uses any more")
    p.add_argument("key_id", type=int)
    p.add_argument("--reencrypt", action="store_true",
                   help="first re-encrypt the backups that use it under the primary key (verified before the "
                        "old objects go)")
    p.set_defaults(func=cmd_keys_retire)

    offsite = sub.add_parser("offsite", help="the off-site copy of every backup")
    offsite_sub = offsite.add_subparsers(dest="offsite_command", required=True)
    p = offsite_sub.add_parser("sync", parents=[common],
                               help="copy what the off-site repository lacks and read every backup back there")
    p.set_defaults(func=cmd_offsite_sync)

    audit = sub.add_parser("audit", help="the audit trail")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    p = audit_sub.add_parser("verify", parents=[common],
                             help="recompute the hash chain; name the first edited, deleted, inserted or moved entry")
    p.set_defaults(func=cmd_audit_verify)

    p = sub.add_parser("report", parents=[common], help="the PDF compliance report of a period (GDPR, SOX, PCI DSS)")
    p.add_argument("--period", help="YYYY-MM or YYYY-Qn (default: last month)")
    p.add_argument("--output", help="also write the PDF here")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", parents=[common], help="run the whole product on an embedded PostgreSQL")
    p.add_argument("--dir", default=".regal-demo", help="where the demo keeps its files")
    p.add_argument("--scale", type=float, default=0.05, help="dataset size (1.0 is about 80 MB)")
    p.add_argument("--keep-running", action="store_true", help="leave the demo PostgreSQL running for the UI")
    p.set_defaults(func=cmd_demo)
    return parser


class _Terminated:
    """SIGTERM unwinds the stack (locks released, partial uploads aborted, children killed). The signal
    may land inside a C extension (Tink) that wraps the exception in its own; the flag keeps the exit
    status true to the signal either way."""

    signum: int | None = None

    @classmethod
    def handler(cls, signum: int, _frame: object) -> None:
        cls.signum = signum
        raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Output(args.json)
    signal.signal(signal.SIGTERM, _Terminated.handler)
    func: Callable[[argparse.Namespace, Output], int] = args.func
    try:
        return func(args, out)
    except RegalError as exc:
        if args.json:
            print(json.dumps({"error": exc.message, "hint": exc.hint}))
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: nothing partial is visible as a backup", file=sys.stderr)
        return 130
    except BaseException:
        if _Terminated.signum is not None:
            print("terminated: nothing partial is visible as a backup", file=sys.stderr)
            return 128 + _Terminated.signum
        raise


if __name__ == "__main__":
    sys.exit(main())
