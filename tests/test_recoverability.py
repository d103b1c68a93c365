"""One truth about recoverability (issue 29): what the CLI says right after a backup is what status, list and
the retention say."""

from __future__ import annotations

import json
from pathlib import Path

from .conftest import DatabaseFactory, load_awkward_data, run_cli, write_policy_file


def test_a_cli_backup_is_checked_before_it_returns_and_status_then_says_good(
        system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> None:
    source = system_pg.create()
    load_awkward_data(source)
    policy_file = write_policy_file(tmp_path, {"pos": source})

    done = run_cli(policy_file, "backup", "pos", "--json")

    assert done.returncode == 0, done.stderr
    backup = json.loads(done.stdout)
    assert backup["verification"]["passed"] is True and backup["verification"]["failed"] == []
    status = run_cli(policy_file, "status", "--json")
    assert status.returncode == 0, status.stdout
    (target,) = json.loads(status.stdout)["targets"]
    assert target["newest_good_backup"]["backup_id"] == backup["backup_id"] and not target["rpo_breached"]
    listed = json.loads(run_cli(policy_file, "list", "--json").stdout)["backups"]
    assert [(b["backup_id"], b["status"]) for b in listed] == [(backup["backup_id"], "good")]
    text = run_cli(policy_file, "backup", "pos")
    assert text.returncode == 0 and "verified: every check passed" in text.stdout


def test_a_backup_told_not_to_verify_says_what_that_means(system_pg: DatabaseFactory, tmp_path: Path,
                                                          master_key: str) -> None:
    policy_file = write_policy_file(tmp_path, {"pos": system_pg.create()})

    done = run_cli(policy_file, "backup", "pos", "--no-verify")

    assert done.returncode == 0, done.stderr
    assert "is unchecked: it counts as no good backup" in done.stderr and "regal-backup verify pos-" in done.stderr
    listed = json.loads(run_cli(policy_file, "list", "--json").stdout)["backups"]
    assert [b["status"] for b in listed] == ["unchecked"]
    assert run_cli(policy_file, "status").returncode == 3  # what the warning said
