"""One backup by hand: `delete` (refused for the newest good backup and one under a legal hold, audited, nothing
left behind), `pin`/`unpin` (a legal hold retention honours, shown everywhere, which a repository writer without
the keys can neither forge nor roll back unseen) and `annotate`."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from regal_dagster.engine.audit import AuditTrail
from regal_dagster.engine.layout import holds_key
from regal_dagster.engine.policy import load_policy
from regal_dagster.engine.storage import open_repository

from .conftest import DatabaseFactory, run_cli, verified_backup, write_policy_file


def test_an_operator_pins_annotates_and_deletes_one_backup_and_a_rolled_back_pin_still_holds(
        system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> None:
    policy_file = write_policy_file(tmp_path, {"pos": system_pg.create()}, audit={"dsn": system_pg.create("audit")})
    cli = functools.partial(run_cli, policy_file)
    older, newest = verified_backup(policy_file), verified_backup(policy_file)
    repo = open_repository(load_policy(policy_file))

    refused = cli("delete", newest)
    assert refused.returncode == 2 and "is the newest good backup of 'pos'" in refused.stderr, refused.stderr

    assert cli("annotate", older, "restored", "for", "INC-7", "by", "hand").returncode == 0
    before_pin = repo.get_bytes(holds_key("pos"))  # an old, genuine holds document: no pin in it
    pinned = cli("pin", older, "--reason", "litigation hold LH-12", "--json")
    assert pinned.returncode == 0 and json.loads(pinned.stdout)["legal_hold"]["reason"] == "litigation hold LH-12"

    def shown() -> dict[str, dict]:
        return {b["backup_id"]: b for b in json.loads(cli("list", "--json").stdout)["backups"]}

    row = shown()[older]
    assert row["legal_hold"]["until"] is None and row["annotation"] == "restored for INC-7 by hand"
    assert row["retention"]["state"] == "legal_hold" and row["retention"]["summary"] == "kept: a legal hold (pinned)"
    text = cli("list").stdout
    assert "LEGAL HOLD: litigation hold LH-12" in text and "note: restored for INC-7 by hand" in text
    assert "0 rows" not in text and text.startswith("TARGET")
    show = cli("show", older)
    assert "legal hold  LEGAL HOLD (litigation hold LH-12)" in show.stdout and "annotation  restored" in show.stdout
    status = json.loads(cli("status", "--json").stdout)
    assert status["targets"][0]["legal_holds"][0]["backup_id"] == older
    assert f"LEGAL HOLD on {older}" in cli("status").stdout
    refused = cli("delete", older)
    assert refused.returncode == 2 and "under a legal hold (litigation hold LH-12)" in refused.stderr

    # Rollback: the old genuine document put back lifts the pin in the repository; the audit trail still knows it.
    repo.put_bytes(holds_key("pos"), before_pin)
    row = shown()[older]
    assert row["legal_hold"]["reason"] == "litigation hold LH-12"
    assert any("legal holds of pos were rolled back" in r for r in row["retention"]["reasons"])
    assert shown()[newest]["retention"]["state"] == "rolled_back"  # every backup of the target kept meanwhile
    assert cli("delete", older).returncode == 2

    # Refusals of pin and unpin, each with what to do.
    for args, words in [(("pin", older, "--reason", "x", "--until", "2001-01-01"), "in the past"),
                        (("pin", "pos-20010101T000000Z-abcdef", "--reason", "x"), "no backup"),
                        (("unpin", newest), "is not pinned")]:
        done = cli(*args)
        assert done.returncode == 2 and words in done.stderr and "what to do" in done.stderr, done.stderr
    assert cli("pin", older).returncode == 2  # --reason is required

    assert cli("unpin", older, "--reason", "case closed").returncode == 0
    assert shown()[older]["legal_hold"] is None
    deleted = cli("delete", older, "--reason", "restored copy no longer needed", "--json")
    assert deleted.returncode == 0, deleted.stderr
    assert not (tmp_path / "repository" / "backups" / "pos" / older).exists()  # no directory left behind
    assert list(shown()) == [newest]
    events = AuditTrail(load_policy(policy_file), repo).events()
    kinds = [(e.event_type, e.resource) for e in events if e.resource == older]
    assert kinds[-4:] == [("backup_annotated", older), ("backup_pinned", older), ("backup_unpinned", older),
                          ("backup_deleted", older)], kinds
    assert any("deleted by hand: restored copy no longer needed" in e.details for e in events
               if e.event_type == "backup_deleted" and e.resource == older)
