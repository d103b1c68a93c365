"""A symbolic link planted in a local repository (by anyone who can write there) is never followed and never
stops a prune: it is reported and left out of every listing; deleting a key that is a link removes the link,
never what it points to."""

from __future__ import annotations

import json
import os
from pathlib import Path

from regal_dagster.engine.storage.local import LocalRepository

from .conftest import DatabaseFactory, run_cli, write_policy_file


def test_planted_symbolic_links_never_make_prune_fail_nor_reach_outside(
        system_pg: DatabaseFactory, tmp_path: Path, master_key: str) -> None:
    source = system_pg.create()
    policy = write_policy_file(tmp_path, {"pos": source}, retention={"daily": 1})
    ids = []
    for _ in range(2):
        done = run_cli(policy, "backup", "pos", "--class", "daily", "--json")
        assert done.returncode == 0, done.stderr
        ids.append(json.loads(done.stdout)["backup_id"])
        assert run_cli(policy, "verify", ids[-1]).returncode == 0  # checked: prune may delete the older one
    old, new = (tmp_path / "repository" / "backups" / "pos" / i for i in ids)
    outside = tmp_path / "outside"
    outside.mkdir()
    precious = outside / "precious.txt"
    precious.write_text("not the repository's")
    # an object of the backup prune deletes replaced by a link to a file outside the repository
    (victim,) = old.rglob("schema.pgdump")
    victim.unlink()
    victim.symlink_to(precious)
    # links to a file, to a directory, and a dangling one, beside real objects
    (new / "planted").symlink_to(precious)
    (new / "dangling").symlink_to(outside / "nothing")
    (tmp_path / "repository" / "backups" / "pos" / "linked-dir").symlink_to(outside, target_is_directory=True)

    pruned = run_cli(policy, "prune", "--json")

    assert pruned.returncode == 0, pruned.stderr
    assert "symbolic link" in pruned.stderr and "not followed" in pruned.stderr
    report = json.loads(pruned.stdout)
    assert [d["backup_id"] for d in report["decisions"]["pos"] if d["keep"]] == [ids[1]]
    assert precious.read_text() == "not the repository's" and sorted(p.name for p in outside.iterdir()) == [
        "precious.txt"]
    repo = LocalRepository(tmp_path / "repository")
    listed = {o.key for o in repo.list("backups/pos/")}
    assert listed and not {k for k in listed if k.endswith(("planted", "dangling")) or "linked-dir" in k}
    assert list(repo.list("backups/pos/linked-dir/")) == []  # a linked directory is not listed through
    assert run_cli(policy, "verify", ids[1]).returncode == 0
    assert run_cli(policy, "prune").returncode == 0  # and again: the links left never make it fail
    # deleting a key that is a link removes the link, never what it points to
    repo.delete(f"backups/pos/{ids[1]}/planted")
    assert not os.path.lexists(new / "planted") and precious.read_text() == "not the repository's"
