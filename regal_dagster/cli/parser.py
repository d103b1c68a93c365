"""The command line: every command, its arguments and their help."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, NoReturn

from ..engine.retention_classes import RETENTION_CLASSES

JOBS_HELP = "parallel workers (default: the policy's `jobs` for the target: the CPU count, at most 8)"
BACKUP_ID_HELP = "a backup id as `regal-backup list` shows it, e.g. main-20261124T020000Z-a1b2c3"
TARGET_HELP = "a target named in the policy's `targets:` (e.g. main)"


def _version() -> str:
    from .version import installed_version  # reads the installed metadata: only for --version

    return installed_version()


class _PrintVersion(argparse.Action):
    """argparse's `version` action, but the version is looked up only when asked (not for every command)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        print(f"regal-backup {_version()}")
        parser.exit()


class CommandLineError(Exception):
    """The command line cannot be parsed: argparse's message, and the command's usage (exit 2)."""

    def __init__(self, message: str, usage: str, command: str):
        super().__init__(message)
        self.message, self.usage, self.command = message, usage, command


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line raises (so that `--json` gets its envelope) instead of exiting."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("regal-backup").strip() or "regal-backup"
        raise CommandLineError(message, self.format_usage(), command)


def build_parser() -> argparse.ArgumentParser:
    def options(parser: argparse.ArgumentParser, default: Any) -> argparse.ArgumentParser:
        parser.add_argument("--policy", default=default,
                            help="policy file (default: $REGAL_POLICY or ./regal_backup.yaml)")
        parser.add_argument("--json", action="store_true", default=default if default is argparse.SUPPRESS else False,
                            help="one JSON document on stdout, the same envelope for every command "
                                 "(docs/cli-json.md); no progress display")
        parser.add_argument("-q", "--quiet", action="store_true",
                            default=default if default is argparse.SUPPRESS else False,
                            help="no progress and no informational lines (notes, what is being done); errors, "
                                 "warnings and the result are still printed")
        parser.add_argument("-v", "--verbose", action="count", default=default if default is argparse.SUPPRESS else 0,
                            help="more detail: each phase on its own line, and the engine's log records on stderr "
                                 "(-vv: its debug records too, e.g. every repository operation)")
        parser.add_argument("--from-offsite", action="store_true",
                            default=default if default is argparse.SUPPRESS else False,
                            help="use the off-site repository instead of the primary one (disaster recovery)")
        return parser

    # The options are accepted before and after the command; the command's copy must not reset them.
    common = options(_Parser(add_help=False), argparse.SUPPRESS)
    parser = options(_Parser(prog="regal-backup",
                                             description="Back up, verify and restore the Regal POS backend.",
                                             epilog="Exit status: 0 success, 1 operational failure, 2 bad usage or "
                                                    "policy, 3 a check, verification or validation failed "
                                                    "(status: an RPO is breached); 126 wal get "
                                                    "--restore-command could not serve a WAL file that may be "
                                                    "archived."), None)
    parser.add_argument("--version", action=_PrintVersion, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", parents=[common],
                       help="create a policy (mode 0600), a local repository, a keyset and the audit trail")
    p.add_argument("directory", help="where the policy, the keyset, the master key and the repository go "
                                     "(created if missing; refused if it already holds a policy)")
    p.add_argument("--postgres-dsn", help="DSN of the database to back up (target `main`); use ${VAR} for secrets")
    p.add_argument("--cluster-dsn", help="DSN of a PostgreSQL server to back up whole and physically, for "
                                         "point-in-time recovery (target `cluster`; its role may replicate)")
    p.add_argument("--master-key-env", help="keep the master key in this environment variable instead of a file")
    p.add_argument("--redis-url", help="also back up this Redis server, as the target `cache` (${VAR} for secrets)")
    p.add_argument("--audit-dsn", help="keep the audit trail in this PostgreSQL database (default: a database "
                                       "`<database>_audit` created on the target's server)")
    p.add_argument("--no-audit", action="store_true",
                   help="no audit trail (not recommended: nothing is recorded for reports until `audit.dsn` is "
                        "added)")
    p.set_defaults(func="commands:cmd_init")

    p = sub.add_parser("master-key", parents=[common], help="print a new master key (for --master-key-env)")
    p.set_defaults(func="commands:cmd_master_key")

    p = sub.add_parser("backup", parents=[common], help="back up one target now")
    p.add_argument("target", help=TARGET_HELP)
    p.add_argument("--wait", help="when another backup of the target holds its lock, wait this long for it "
                                  "(e.g. 10m; default: the policy's repository.lock_wait)")
    p.add_argument("--class", dest="retention_class", choices=RETENTION_CLASSES, default="hourly",
                   help="the retention class the backup counts for (default: hourly)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--incremental", action="store_true", default=None,
                      help="postgres_cluster: pg_basebackup --incremental on top of the newest good base backup "
                           "(PostgreSQL 17+, summarize_wal = on); a full one when there is none yet "
                           "(default: as the target's `incremental` option says for the class)")
    kind.add_argument("--full", dest="incremental", action="store_false",
                      help="postgres_cluster: a full base backup whatever the policy says")
    p.add_argument("--no-verify", action="store_true",
                   help="do not run the checks now (they read every byte back): the backup stays unchecked, and "
                        "counts as no good backup, until `verify` or the daily verification checks it")
    p.set_defaults(func="commands:cmd_backup")

    p = sub.add_parser("list", parents=[common],
                       help="list backups with their status and the date retention deletes each one")
    p.add_argument("target", nargs="?", help="only this target's backups (default: every target)")
    p.set_defaults(func="listing:cmd_list")

    p = sub.add_parser("verify", parents=[common], help="read back and authenticate every byte of a backup")
    p.add_argument("backup_id", nargs="?", help=BACKUP_ID_HELP + " (or --latest, --unchecked)")
    p.add_argument("--latest", action="store_true", help="the newest backup (of --target, or of every target)")
    p.add_argument("--unchecked", action="store_true",
                   help="every backup no check record vouches for yet (of --target, or of every target); with "
                        "--latest as well: what the daily verification does")
    p.add_argument("--all", action="store_true", help="every backup of every target (of --target with it), oldest "
                                                       "first, with a summary table")
    p.add_argument("--target", help="with --latest, --unchecked or --all: only this target (default: every target)")
    p.add_argument("--sample", metavar="N%",
                   help="read only a random N%% of each backup's objects in full (at least one), the others for "
                        "presence and size (as restic check --read-data-subset); a backup not yet good is read "
                        "whole. The seed and the objects drawn are recorded in the check record and the audit trail")
    p.add_argument("--seed", help="with --sample: draw with this seed (repeats an earlier draw; default: random, "
                                  "printed)")
    p.add_argument("--jobs", type=int, help=JOBS_HELP)
    p.add_argument("--all-wal", action="store_true",
                   help="postgres_cluster: read every proved WAL segment again (default: the daily share, see "
                        "docs/pitr.md)")
    p.set_defaults(func="verifying:cmd_verify")

    p = sub.add_parser("restore", parents=[common], help="restore a backup into a database, or a server to a point "
                                                         "in time (TARGET --to-dir DIR)")
    p.add_argument("backup_id", nargs="?", help=BACKUP_ID_HELP + " (or --target with --latest or --before); with "
                                                                 "--to-dir: the postgres_cluster target")
    p.add_argument("--to", help="PostgreSQL: DSN of the database to restore into (created if missing); "
                                               "Redis: the directory for dump.rdb, or redis://... with --keys; "
                                               "Terraform: the state file to write; config: a new directory to "
                                               "clone into")
    p.add_argument("--target", help="with --latest or --before: the target whose backups to choose from (or give "
                                    "it in place of BACKUP_ID: restore TARGET --latest)")
    p.add_argument("--latest", action="store_true", help="the newest backup of --target that passed its checks")
    p.add_argument("--before", help="the newest good backup started before this UTC time (ISO 8601)")
    p.add_argument("--drop-existing", action="store_true",
                   help="replace a non-empty database (only once the backup is authenticated, loaded aside "
                        "and validated)")
    p.add_argument("--jobs", type=int, help=JOBS_HELP)
    p.add_argument("--validate", choices=["full", "rows"], default="full",
                   help="full (default): read every table back and compare row counts and SHA-256 with the backup; "
                        "rows: compare the loaded row counts only (faster; the bytes are still authenticated)")
    p.add_argument("--keys", help="Redis, with --to redis://...: copy back only the keys matching this glob")
    p.add_argument("--no-owners", action="store_true",
                   help="PostgreSQL: restore no ownership and no grants (as pg_restore --no-owner --no-privileges); "
                        "by default they are restored as the backup recorded them")
    p.add_argument("--no-create-roles", action="store_true",
                   help="PostgreSQL: do not create the roles the backup's database refers to that the server lacks "
                        "(what needs them then fails, and the restore says so)")
    p.add_argument("--no-tablespaces", action="store_true",
                   help="PostgreSQL: put every table, index and the database in the server's default tablespace "
                        "(by default they go where they were, and a server lacking one of those is refused)")
    p.add_argument("--use-target-locale", action="store_true",
                   help="PostgreSQL: create the database with the server's default collation provider and locale "
                        "instead of the backup's (by default it gets the backup's provider, collation, ctype and "
                        "ICU locale, and a server that cannot provide them is refused before anything is created)")
    p.add_argument("--accept-ledger-rollback", action="store_true",
                   help="restore although the GDPR erasure ledger is older than the repository or the audit trail "
                        "knows (recorded in the audit trail; erasures may be missing afterwards)")
    p.add_argument("--pre-hook", help="shell command run just before the target is changed (stop the application)")
    p.add_argument("--post-hook", help="shell command run after a validated restore (start the application)")
    p.add_argument("--to-dir", help="postgres_cluster: the new data directory; recovery replays WAL from the "
                                    "repository to --latest, --to-time, --to-lsn or --to-name")
    p.add_argument("--to-time", help="with --to-dir: recover up to this UTC time (ISO 8601)")
    p.add_argument("--to-lsn", help="with --to-dir: recover up to this WAL position (e.g. 0/3000148)")
    p.add_argument("--to-name", help="with --to-dir: recover up to this restore point (pg_create_restore_point)")
    p.add_argument("--base-backup", help="with --to-dir: start from this base backup (default: the newest good one "
                                         "that can reach the point)")
    p.add_argument("--with-wal", action="store_true",
                   help="with --to-dir: copy the WAL recovery replays into DIR/regal_wal first (and check it with "
                        "pg_verifybackup): the server then needs neither regal-backup nor the keys")
    p.add_argument("--preview", action="store_true",
                   help="with --to-dir: say which base backup and which WAL would be used; change nothing")
    p.set_defaults(func="commands:cmd_restore")

    wal = sub.add_parser("wal", help="the WAL archive of postgres_cluster targets (point-in-time recovery)")
    wal_sub = wal.add_subparsers(dest="wal_command", required=True)
    p = wal_sub.add_parser("push", parents=[common],
                           help="archive one WAL file (archive_command = 'regal-backup --policy P wal push %%p')")
    p.add_argument("path", help="the WAL file (PostgreSQL's %%p)")
    p.add_argument("--target", help="the postgres_cluster target (default: the policy's only one)")
    p.set_defaults(func="walclient:cmd_wal_push")
    p = wal_sub.add_parser("get", parents=[common],
                           help="fetch one WAL file (restore_command = 'regal-backup --policy P wal get %%f %%p'); "
                                "exit 1 when it is not archived")
    p.add_argument("name", help="the WAL file's name (PostgreSQL's %%f)")
    p.add_argument("destination", help="where to write it (PostgreSQL's %%p)")
    p.add_argument("--target", help="the postgres_cluster target (default: the policy's only one)")
    p.add_argument("--restore-command", action="store_true", dest="serving_recovery",
                   help="run as PostgreSQL's restore_command (restores write it): exit 1 only when the file is not "
                        "archived; any other failure exits 126, which stops recovery instead of ending it early")
    p.set_defaults(func="walclient:cmd_wal_get")

    p = wal_sub.add_parser("status", parents=[common],
                           help="newest stored WAL position and time, lag behind the server in bytes and seconds, "
                                "gaps; exit 3 when there is a gap")
    p.add_argument("target", nargs="?", help="the postgres_cluster target (default: the policy's only one)")
    p.set_defaults(func="pitr:cmd_wal_status")
    p = wal_sub.add_parser("stream", parents=[common],
                           help="receive the server's WAL continuously (pg_receivewal on the target's slot) and store "
                                "every segment; runs until SIGTERM (a systemd service: docs/pitr.md)")
    p.add_argument("target", help="the postgres_cluster target")
    p.add_argument("--work-dir", help="where the WAL being received waits to be stored (kept across restarts so "
                                      "nothing is skipped; default: wal-stream/TARGET beside the policy)")
    p.add_argument("--snapshot-seconds", type=float, default=10.0,
                   help="store the segment being received at least this often when it grew (default: 10)")
    p.set_defaults(func="pitr:cmd_wal_stream")
    p = wal_sub.add_parser("daemon", parents=[common],
                           help="the resident archiver and prefetcher: `wal push` and `wal get` hand their work to it "
                                "over a UNIX socket; uploads .ready WAL ahead, in parallel; runs until SIGTERM "
                                "(run it as the account PostgreSQL runs as: docs/pitr.md)")
    p.add_argument("target", nargs="?", help="the postgres_cluster target (default: the policy's only one)")
    p.add_argument("--workers", type=int, default=4, help="uploads and fetches at once (default: 4)")
    p.add_argument("--prefetch", type=int, default=16,
                   help="WAL segments fetched ahead of recovery's requests (default: 16; 0: none)")
    p.set_defaults(func="walclient:cmd_wal_daemon")

    p = sub.add_parser("restore-test", parents=[common],
                       help="restore a backup into a scratch PostgreSQL, validate it, measure the RTO, tear down")
    p.add_argument("backup_id", nargs="?", help="default: the newest good backup of --target")
    p.add_argument("--target", help="whose newest good backup to test (default: the policy's only target)")
    p.add_argument("--jobs", type=int, help=JOBS_HELP)
    p.add_argument("--work-dir", help="where the scratch server lives (default: the policy's, else the temp dir)")
    p.set_defaults(func="commands:cmd_restore_test")

    p = sub.add_parser("drill", parents=[common],
                       help="disaster-recovery drill: rebuild every target from the repository, measure RTO and RPO")
    p.add_argument("--jobs", type=int, help=JOBS_HELP)
    p.add_argument("--work-dir", help="where the scratch servers live (default: the policy's, else the temp dir)")
    p.set_defaults(func="commands:cmd_drill")

    gdpr = sub.add_parser("gdpr", help="the GDPR erasure ledger (re-applied after every restore)")
    gdpr_sub = gdpr.add_subparsers(dest="gdpr_command", required=True)
    p = gdpr_sub.add_parser("erase", parents=[common], help="record an erasure request")
    p.add_argument("target", help="the target holding the subject's data (its `gdpr.subjects` say where)")
    p.add_argument("subject", help="the identifier the request names (e.g. the e-mail); stored only hashed")
    p.add_argument("--requested-at", help="when the subject asked (ISO 8601, UTC; default: now)")
    p.add_argument("--reference", help="your ticket or case number")
    p.set_defaults(func="commands:cmd_gdpr_erase")
    p = gdpr_sub.add_parser("list", parents=[common], help="list recorded erasures (hashes only)")
    p.set_defaults(func="commands:cmd_gdpr_list")

    p = sub.add_parser("prune", parents=[common], help="delete what retention no longer keeps (recorded)")
    p.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")
    p.add_argument("--check", action="store_true",
                   help="prove retention holds: exit 3 if any backup is past its retention (deletes nothing)")
    p.set_defaults(func="commands:cmd_prune")

    p = sub.add_parser("delete", parents=[common],
                       help="delete one backup now (audited; refused for the newest good backup of its target, a "
                            "backup under Object Lock or a legal hold, and one an incremental is built on)")
    p.add_argument("backup_id", help=BACKUP_ID_HELP)
    p.add_argument("--reason", help="why (recorded in the audit trail)")
    p.set_defaults(func="by_hand:cmd_delete")
    p = sub.add_parser("pin", parents=[common],
                       help="a legal hold: retention keeps the backup until --until or `unpin` (audited; shown by "
                            "list, show, status and the report)")
    p.add_argument("backup_id", help=BACKUP_ID_HELP)
    p.add_argument("--reason", required=True, help="why it is held (e.g. a litigation or audit reference)")
    p.add_argument("--until", help="hold it until this UTC time (ISO 8601; default: until `unpin`)")
    p.set_defaults(func="by_hand:cmd_pin")
    p = sub.add_parser("unpin", parents=[common], help="lift a backup's legal hold (audited)")
    p.add_argument("backup_id", help=BACKUP_ID_HELP)
    p.add_argument("--reason", help="why the hold ends (recorded in the audit trail)")
    p.set_defaults(func="by_hand:cmd_unpin")
    p = sub.add_parser("annotate", parents=[common],
                       help="attach free text to a backup, shown by list and show (an empty TEXT removes it)")
    p.add_argument("backup_id", help=BACKUP_ID_HELP)
    p.add_argument("text", nargs="*", help="the annotation")
    p.set_defaults(func="by_hand:cmd_annotate")

    keys = sub.add_parser("keys", help="the encryption keys: inventory, rotation, retirement")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    p = keys_sub.add_parser("list", parents=[common], help="every key with its dates and the backups using it")
    p.set_defaults(func="commands:cmd_keys_list")
    p = keys_sub.add_parser("rotate", parents=[common], help="add a new primary key (older keys keep reading)")
    p.set_defaults(func="commands:cmd_keys_rotate")
    p = keys_sub.add_parser("retire", parents=[common], help="destroy a key no backup uses any more")
    p.add_argument("key_id", type=int, help="the key's number as `regal-backup keys list` shows it")
    p.add_argument("--reencrypt", action="store_true",
                   help="first re-encrypt the backups that use it under the primary key (verified before the "
                        "old objects go)")
    p.set_defaults(func="commands:cmd_keys_retire")

    offsite = sub.add_parser("offsite", help="the off-site copy of every backup")
    offsite_sub = offsite.add_subparsers(dest="offsite_command", required=True)
    p = offsite_sub.add_parser("sync", parents=[common],
                               help="copy what the off-site repository lacks and read every backup back there; name a "
                                    "damaged primary copy whose off-site copy is good (exit 3: `offsite repair`)")
    p.set_defaults(func="offsite:cmd_offsite_sync")
    p = offsite_sub.add_parser("repair", parents=[common],
                               help="put back a backup's damaged or missing objects in the primary repository from "
                                    "its good off-site copy, then verify it (audited)")
    p.add_argument("backup_id", help=BACKUP_ID_HELP)
    p.set_defaults(func="offsite:cmd_offsite_repair")

    audit = sub.add_parser("audit", help="the audit trail")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    p = audit_sub.add_parser("verify", parents=[common],
                             help="recompute the hash chain; name the first edited, deleted, inserted or moved entry")
    p.add_argument("--resume", action="store_true", help="recompute only from the newest authentic checkpoint on "
                   "(faster on a long trail; the entries before it are checked for presence, order and links, "
                   "not recomputed: an edit there that kept its hashes goes unseen). Default: every entry")
    p.set_defaults(func="commands:cmd_audit_verify")

    p = sub.add_parser("report", parents=[common], help="the PDF compliance report of a period (PCI DSS, SOX, GDPR, "
                                                        "SOC 2, ISO 27001, HIPAA, DORA, NIS2, NIST SP 800-53)")
    p.add_argument("--framework", action="append", metavar="ID",
                   help="a framework in scope (repeatable): pci, sox, gdpr, soc2, iso27001, hipaa, dora, nis2, "
                        "nist80053 (default: the policy's reports.frameworks)")
    p.add_argument("--period", help="YYYY-MM or YYYY-Qn (default: last month; the current one is an interim "
                                    "report, a future one is refused)")
    p.add_argument("--output", help="also write the PDF here, and its OSCAL results beside it "
                                    "(NAME.oscal-ar.json)")
    p.set_defaults(func="commands:cmd_report")

    p = sub.add_parser("signoff", parents=[common], help="management sign-off of a passed restore test or drill "
                                                         "(an audit event; the report's SO-01)")
    p.add_argument("result_id", metavar="RESULT_ID", help="the audit entry of the restore test or drill (the "
                                                          "report's 'Entry' column)")
    p.add_argument("--by", required=True, help="the signer's name")
    p.add_argument("--role", required=True, help="the signer's role (e.g. 'IT operations manager')")
    p.add_argument("--note", help="what was reviewed, or a reference")
    p.set_defaults(func="attest:cmd_signoff")

    p = sub.add_parser("approve", parents=[common], help="approve a restore into a production target (policy "
                                                         "restore_approval; by someone other than the requester)")
    p.add_argument("backup_id", metavar="BACKUP_ID", help="the backup to be restored")
    p.add_argument("--requester", required=True, help="the OS account that will run the restore")
    p.add_argument("--by", required=True, help="the approver's name (not the requester)")
    p.add_argument("--note", help="a change ticket or reason")
    p.set_defaults(func="attest:cmd_approve")

    p = sub.add_parser("upgrade", parents=[common],
                       help="encrypt every document of a repository written by an earlier regal-backup (format 1 or 2)")
    p.set_defaults(func="commands:cmd_upgrade")

    p = sub.add_parser("check", parents=[common],
                       help="before the first backup, and after any change: the repository (reachable, writable), "
                            "the keys, the audit trail and each target (reachable, privileges, WAL settings and "
                            "slot, clock, programs), each with its fix; exit 1 when one fails")
    p.add_argument("target", nargs="?", help="only this target (default: every target)")
    p.set_defaults(func="check:cmd_check")

    p = sub.add_parser("status", parents=[common],
                       help="one screen per target: newest good backup against the RPO, verification, restore "
                            "test, drill, open alerts; exit 3 when an RPO is breached (a monitoring check)")
    p.add_argument("target", nargs="?", help="only this target (default: every target)")
    watch = p.add_mutually_exclusive_group()
    watch.add_argument("--heartbeat", metavar="URL",
                       help="after reading the repository, ping this dead man's switch (healthchecks.io style; the "
                            "Dagster sensor watchdog_heartbeat pings the policy's every minute)")
    watch.add_argument("--alert", action="store_true",
                       help="the watchdog (cron or systemd timer, docs/watchdog.md): when the Dagster daemon of "
                            "$DAGSTER_HOME is silent, raise 'daemon silent' and the RPO alerts through the policy's "
                            "channels, once; resolved when it returns; exit 3 while it is silent")
    p.set_defaults(func="status:cmd_status")

    p = sub.add_parser("show", parents=[common],
                       help="one backup in full: objects, tables, checks, retention decision and date, lock")
    p.add_argument("backup_id", help=BACKUP_ID_HELP)
    p.set_defaults(func="commands:cmd_show")

    p = sub.add_parser("metrics", parents=[common],
                       help="Prometheus metrics: serve them over HTTP, write them for node_exporter, or publish "
                            "them to CloudWatch")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--listen", metavar="[HOST:]PORT", nargs="?", const="127.0.0.1:9464",  # metrics.DEFAULT_LISTEN
                       help="serve /metrics on this address until stopped (default: 127.0.0.1:9464; without a "
                            "host, 127.0.0.1: this machine only). The endpoint has no authentication: another "
                            "host (0.0.0.0) prints a note saying so")
    where.add_argument("--textfile", metavar="PATH",
                       help="write the metrics once to PATH (node_exporter's textfile collector: a *.prom file "
                            "in its --collector.textfile.directory; written atomically)")
    where.add_argument("--cloudwatch", action="store_true",
                       help="publish the metrics once to CloudWatch (PutMetricData; the policy's "
                            "monitoring.cloudwatch: namespace, dimensions, region; boto3's credentials)")
    p.add_argument("--cache-seconds", type=float, default=30.0,
                   help="with --listen: reuse a reading of the repository this long (default: 30)")
    p.set_defaults(func="commands:cmd_metrics")

    p = sub.add_parser("completion", parents=[common],
                       help="print a shell completion script: `source <(regal-backup completion bash)` (bash), "
                            "`source <(regal-backup completion zsh)` (zsh)")
    p.add_argument("shell", choices=["bash", "zsh"], help="the shell the script is for")
    p.set_defaults(func="completion:cmd_completion")

    p = sub.add_parser("demo", parents=[common], help="run the whole product on an embedded PostgreSQL")
    p.add_argument("--dir", default=".regal-demo", help="where the demo keeps its files")
    p.add_argument("--scale", type=float, default=0.05, help="dataset size (1.0 is about 80 MB)")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--keep-running", action="store_true",
                      help="leave the demo PostgreSQL running for the UI (stop it with --stop-postgres)")
    when.add_argument("--start-postgres", action="store_true",
                      help="only start the demo's PostgreSQL again (for the Dagster UI), without running the demo")
    when.add_argument("--stop-postgres", action="store_true", help="only stop the demo's PostgreSQL")
    p.set_defaults(func="commands:cmd_demo")
    return parser


