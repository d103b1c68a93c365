"""A restore into a production target needs someone else's approval first (policy `restore_approval`): through
the CLI and the audit trail, on a real PostgreSQL."""

from __future__ import annotations

import getpass
import json
from pathlib import Path

import pytest

from regal_dagster.engine.audit import AuditTrail
from regal_dagster.engine.policy import load_policy
from regal_dagster.engine.storage import open_repository

from .conftest import DatabaseFactory, run_cli, verified_backup, write_policy_file


def test_a_restore_into_production_needs_someone_elses_approval_once(
        system_pg: DatabaseFactory, tmp_path: Path, master_key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    source = system_pg.create()
    audit_db = system_pg.create("regal_audit")
    policy_file = write_policy_file(tmp_path, {"pos": source}, audit={"dsn": audit_db},
                                    restore_approval={"targets": ["pos"], "valid_for": "1h"})
    backup_id = verified_backup(policy_file)
    me = getpass.getuser()
    monkeypatch.delenv("SUDO_USER", raising=False)

    def restore_into_production() -> int:
        return run_cli(policy_file, "restore", backup_id, "--to", source, "--drop-existing").returncode

    assert restore_into_production() == 2  # no approval: refused, nothing touched
    scratch = system_pg.create()  # a restore elsewhere needs none
    assert run_cli(policy_file, "restore", backup_id, "--to", scratch).returncode == 0
    self_approved = run_cli(policy_file, "approve", backup_id, "--requester", me, "--by", "Ann Lee")
    assert self_approved.returncode == 2 and "self-approval" in self_approved.stderr  # from the requester's account
    assert run_cli(policy_file, "approve", backup_id, "--requester", me, "--by", me).returncode == 2
    monkeypatch.setenv("SUDO_USER", "ann")  # the approver, at her own account
    approved = run_cli(policy_file, "approve", backup_id, "--requester", me, "--by", "Ann Lee", "--note", "CHG-7")
    assert approved.returncode == 0, approved.stderr
    monkeypatch.delenv("SUDO_USER")
    assert restore_into_production() == 0  # approved: restored
    assert restore_into_production() == 2  # an approval is used once

    policy = load_policy(policy_file)
    events = AuditTrail(policy, open_repository(policy)).events()
    approvals = [(e.outcome, e.actor, json.loads(e.details)) for e in events if e.event_type == "restore_approval"]
    assert [(outcome, d.get("refused")) for outcome, _, d in approvals] == [
        ("failure", True), ("failure", True), ("success", None)]
    assert approvals[-1][1] == "user:ann" and approvals[-1][2]["by"] == "Ann Lee"
    restores = [(e.outcome, json.loads(e.details)) for e in events if e.event_type == "restore"]
    assert [(o, d.get("refused"), d.get("approval")) for o, d in restores] == [
        ("failure", True, None), ("success", None, None),
        ("success", None, next(e.seq for e in events if e.event_type == "restore_approval" and e.outcome == "success")),
        ("failure", True, None)]
