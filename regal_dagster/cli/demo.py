"""`regal-backup demo`: the whole product on a machine with no PostgreSQL.

Starts an embedded PostgreSQL 18, generates the point-of-sale database, writes a policy with a local
repository and a new keyset, materializes the backup assets through Dagster (the runs land in a local
Dagster instance the UI can show), verifies the backup and prints a summary.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

from ..defs import BACKUP_JOB, build_definitions
from ..defs.backups.assets import RETENTION_CLASS_TAG
from ..engine import catalog
from ..engine.bootstrap import POLICY_NAME, init_project
from ..engine.crypto import load_keyring
from ..engine.datagen import create_pos_database
from ..engine.policy import load_policy
from ..engine.postgresql.server import ScratchCluster
from ..engine.report import Period, build_report
from ..engine.storage import open_repository
from ..engine.verify import verify_backup

DEMO_DATABASE = "regalpos"
AUDIT_DATABASE = "regal_audit"


def _say(echo: bool, text: str) -> None:
    if echo:
        print(f"demo: {text}", file=sys.stderr, flush=True)


def _policy_for(directory: Path, dsn: str, audit_dsn: str) -> Path:
    """A new policy, or the existing one pointed at this run's server (its port changes between runs).
    The audit trail lives in the same embedded server, in its own database (in production: elsewhere)."""
    path = directory / POLICY_NAME
    if not path.exists():
        path = init_project(directory, dsn).policy_path
    document = yaml.safe_load(path.read_text())
    document["targets"]["main"]["dsn"] = dsn
    document["audit"] = {"dsn": audit_dsn}
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def run_demo(directory: Path, scale: float = 0.05, keep_running: bool = False, echo: bool = True) -> dict[str, Any]:
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    cluster = ScratchCluster.persistent(directory / "postgres")
    _say(echo, f"starting embedded PostgreSQL in {directory / 'postgres'}")
    cluster.start()
    try:
        with dg.DagsterInstance.from_config(str(_dagster_home(directory))) as instance:
            return _run(directory, cluster, instance, scale, keep_running, echo)
    finally:
        if not keep_running:
            cluster.stop()


def _dagster_home(directory: Path) -> Path:
    home = directory / "dagster_home"
    home.mkdir(exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text("# Local SQLite storage for the demo; see docs/dagster-postgres.yaml for PostgreSQL.\n"
                          "telemetry:\n  enabled: false\nfreshness:\n  enabled: true\n")
    return home


def _run(directory: Path, cluster: ScratchCluster, instance: dg.DagsterInstance, scale: float,
         keep_running: bool, echo: bool) -> dict[str, Any]:
    for name in (DEMO_DATABASE, AUDIT_DATABASE):
        with contextlib.suppress(Exception):  # exists from an earlier run (the point-of-sale one is regenerated)
            cluster.create_database(name)
    dsn = cluster.dsn(DEMO_DATABASE)
    _say(echo, f"generating the point-of-sale database at scale {scale}")
    rows = create_pos_database(dsn, scale, replace=True)
    policy_path = _policy_for(directory, dsn, cluster.dsn(AUDIT_DATABASE))
    _say(echo, "materializing the backup assets through Dagster")
    result = build_definitions(str(policy_path)).resolve_job_def(BACKUP_JOB).execute_in_process(
        instance=instance, tags={RETENTION_CLASS_TAG: "daily"})
    (event,) = result.get_asset_materialization_events()
    backup_id = event.materialization.metadata["backup_id"].value
    policy = load_policy(policy_path)
    repo, keyring = open_repository(policy), load_keyring(policy)
    manifest = catalog.load_manifest(repo, keyring, str(backup_id))
    _say(echo, f"verifying {backup_id}")
    verified = verify_backup(repo, keyring, manifest)
    _say(echo, "writing this month's compliance report")
    report = build_report(policy, Period.parse(f"{manifest.started_at:%Y-%m}"), repo=repo, trigger={"cli": "demo"})
    report_file = directory / "compliance-report.pdf"
    report_file.write_bytes(report.pdf)
    home = directory / "dagster_home"
    ui = (f"DAGSTER_HOME={home} REGAL_POLICY={policy_path} dagster dev -w workspace.yaml"
          + ("" if keep_running else "   (first: regal-backup demo --keep-running, so the database is up)"))
    text = "\n".join([
        f"dataset     {sum(rows.values())} rows in {len(rows)} tables ({DEMO_DATABASE} on {cluster.dsn(DEMO_DATABASE)})",
        f"backup      {manifest.backup_id} ({manifest.retention_class}), Dagster run {result.run_id}",
        (f"stored      {manifest.stored_bytes:,} bytes from {manifest.plaintext_bytes:,} "
         f"(ratio {manifest.plaintext_bytes / max(manifest.stored_bytes, 1):.1f}), "
         f"key {manifest.objects[0].encryption.key_id}"),
        f"verified    {'yes: every byte authenticated and checksummed' if verified.ok else 'NO: ' + '; '.join(verified.problems)}",
        (f"report      {report_file} (audit trail {'intact' if report.chain_ok else 'BROKEN'}; controls failed: "
         f"{', '.join(c.control_id for c in report.controls if c.result == 'FAIL') or 'none'})"),
        f"policy      {policy_path}",
        f"repository  {repo.location}",
        f"open the UI {ui}",
    ])
    return {"backup_id": manifest.backup_id, "run_id": result.run_id, "rows": rows, "verified": verified.ok,
            "policy": str(policy_path), "repository": repo.location, "report": str(report_file), "dagster_home": str(home),
            "postgres_running": keep_running, "text": text}
