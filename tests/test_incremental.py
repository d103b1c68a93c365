"""Incremental base backups of a whole server (PostgreSQL 18, summarize_wal = on): a full backup, then two
incrementals each on top of the previous one, the WAL archived through `regal-backup wal push`; restores
combine the chain with pg_combinebackup and are compared row by row; retention keeps the parents; a missing
or forged parent is refused naming it."""

from __future__ import annotations

import collections
import json
import random
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from regal_dagster.engine.backup import incremental_by_policy
from regal_dagster.engine.layout import target_of
from regal_dagster.engine.policy import load_policy
from regal_dagster.engine.postgresql.server import ScratchCluster
from regal_dagster.engine.sources.postgres_cluster.source import RESTORING_MARKER
from regal_dagster.engine.workspace import PREFIX

from .conftest import SYSTEM_PG
from .old_formats import manifest_body
from .test_pitr import (
    AS_ROOT,
    CLI,
    _ok,
    _push_spool,
    _run,
    _sql,
    _wait_archived,
    _wait_promoted,
    archiving_server,
    cli,
)

Rows = set[tuple[int, str]]


def _insert(dsn: str, batch: str, first: int, count: int = 200) -> Rows:
    _sql(dsn, "INSERT INTO payments SELECT g, %s FROM generate_series(%s::int, %s::int) g",
         (batch, first, first + count - 1))
    return {(i, batch) for i in range(first, first + count)}


def _backup(policy: Path, *how: str) -> dict[str, Any]:
    return json.loads(_ok(cli(policy, "backup", "cluster", "--no-verify", "--json", *how)).stdout)


def _manifest(policy: Path, backup_id: str) -> dict[str, Any]:
    return manifest_body(policy, target_of(backup_id), backup_id)


def _backup_dir(policy: Path, backup_id: str) -> Path:
    return policy.parent / "repository" / "backups" / "cluster" / backup_id


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Full backup; rows A; incremental 1; rows B (a time and a WAL position recorded after them); incremental 2
    (a daily backup, incremental because the policy says so); rows C; all the WAL archived."""
    base = tmp_path_factory.mktemp("incremental")
    server, policy, spool = archiving_server(base, summarize_wal="on")
    try:
        dsn = server.dsn()
        _sql(dsn, "CREATE TABLE payments (id int PRIMARY KEY, batch text)")
        _sql(dsn, "CREATE TABLE ballast AS SELECT g AS id, repeat('x', 200) AS pad FROM generate_series(1, 20000) g")
        full = _backup(policy)["backup_id"]
        rows_a = _insert(dsn, "A", 1)
        first = _backup(policy, "--incremental")["backup_id"]
        rows_b = _insert(dsn, "B", 1001)
        time.sleep(0.3)
        at_time = _sql(dsn, "SELECT clock_timestamp()")[0][0]
        at_lsn = _sql(dsn, "SELECT pg_current_wal_lsn()::text")[0][0]
        time.sleep(0.3)
        policy.write_text(policy.read_text().replace("    slot: regal_backup\n",
                                                     "    slot: regal_backup\n    incremental: true\n"))
        second = _backup(policy, "--class", "daily")["backup_id"]
        rows_c = _insert(dsn, "C", 2001)
        _wait_archived(dsn)
        _push_spool(policy, spool)
        yield {"policy": policy, "base": base, "dsn": dsn, "spool": spool, "server": server, "full": full,
               "first": first, "second": second, "at_time": at_time, "at_lsn": at_lsn, "A": rows_a, "B": rows_b,
               "C": rows_c}
    finally:
        server.stop()


def _leftovers(data: Path) -> list[Path]:
    """Private directories of a chain restore (unpacked members, the combined copy) in or beside `data`."""
    return [p for where in (data.parent, data) if where.is_dir() for p in where.iterdir()
            if p.name.startswith(PREFIX) and p.is_dir()]


def _restore_and_read(policy: Path, data: Path, *how: str) -> tuple[dict[str, Any], Rows]:
    """Restore into a new data directory, start PostgreSQL on it, wait for the promotion, read every row."""
    report = json.loads(_ok(cli(policy, "restore", "cluster", "--to-dir", str(data), *how, "--json",
                                *(["--with-wal"] if AS_ROOT else []))).stdout)
    assert (data / "recovery.signal").exists()
    assert not _leftovers(data)  # the chain's directories went
    restored = ScratchCluster.persistent(data).start()
    try:
        _wait_promoted(restored)
        rows = {(r[0], r[1]) for r in _sql(restored.dsn(), "SELECT id, batch FROM payments")}
    finally:
        restored.stop()
        shutil.rmtree(data, ignore_errors=True)
    return report, rows


def test_an_incremental_records_its_parent_and_chain_and_is_checked(chain: dict[str, Any]) -> None:
    policy = chain["policy"]
    full, first, second = (_manifest(policy, chain[k]) for k in ("full", "first", "second"))
    assert full["source"]["backup_type"] == "full" and "chain" not in full["source"]
    assert first["source"]["backup_type"] == "incremental"
    assert first["source"]["parent_backup_id"] == chain["full"] and first["source"]["chain"] == [chain["full"]]
    assert second["retention_class"] == "daily" and second["source"]["backup_type"] == "incremental"
    assert second["source"]["chain"] == [chain["full"], chain["first"]]
    assert second["source"]["parent_backup_id"] == chain["first"]
    # an incremental holds the changed blocks: far less than the whole cluster
    tar_bytes = {name: next(o["plaintext_size"] for o in m["objects"] if o["name"] == "base.tar")
                 for name, m in (("full", full), ("second", second))}
    assert tar_bytes["second"] * 3 < tar_bytes["full"], tar_bytes
    checks = {c["name"]: c for c in json.loads(_ok(cli(policy, "verify", chain["second"], "--json")).stdout)["checks"]}
    assert all(c["passed"] for c in checks.values()), checks
    assert f"incremental on top of {chain['first']}" in checks["integrity"]["description"]
    assert chain["full"] in checks["integrity"]["description"]
    # `list` says what `pgbackrest info` says: type, parent, WAL positions and timeline, in the text too
    listed = _ok(cli(policy, "list", "cluster")).stdout
    lines = listed.splitlines()
    described = lines[next(i for i, line in enumerate(lines) if line.split()[1:2] == [chain["second"]]) + 1]
    assert re.search(rf"incremental on {chain['first']}, WAL [0-9A-F]+/[0-9A-F]+ - [0-9A-F]+/[0-9A-F]+, timeline \d+",
                     described), listed
    refused = cli(policy, "delete", chain["full"])  # what incrementals are built on cannot be deleted by hand
    assert refused.returncode == 2, refused.stderr
    assert f"base of the incremental backup(s) {chain['first']}, {chain['second']}" in refused.stderr


def test_the_policy_makes_hourly_and_daily_backups_incremental_and_keeps_weekly_full(chain: dict[str, Any]) -> None:
    target = load_policy(chain["policy"]).target("cluster")
    assert [incremental_by_policy(target, c) for c in ("hourly", "daily", "weekly", "monthly")] == [
        True, True, False, False]


def test_restore_latest_combines_the_chain_and_brings_back_every_row(chain: dict[str, Any]) -> None:
    policy = chain["policy"]
    never = chain["base"] / "never"
    preview = json.loads(_ok(cli(policy, "restore", "cluster", "--to-dir", str(never), "--latest", "--preview",
                                 "--json")).stdout)
    assert preview["base_backup"] == chain["second"] and preview["backup_type"] == "incremental"
    assert preview["chain"] == [chain["full"], chain["first"], chain["second"]]
    assert not never.exists()
    text = _ok(cli(policy, "restore", "cluster", "--to-dir", str(never), "--latest", "--preview")).stdout
    assert f"{chain['full']} + {chain['first']} + {chain['second']}" in text
    report, rows = _restore_and_read(policy, chain["base"] / "latest", "--latest")
    assert rows == chain["A"] | chain["B"] | chain["C"]
    assert report["details"]["chain"] == [chain["full"], chain["first"], chain["second"]]


def test_a_restore_killed_at_random_leaves_nothing_the_next_one_has_to_clean(chain: dict[str, Any]) -> None:
    """SIGKILL while the chain is unpacked, combined or checked: what it leaves cannot pass for a restored
    data directory (its marker says it is being restored), and the next restore into the same directory
    empties it, removes the unpacked chain beside it, and brings back every row."""
    policy, data = chain["policy"], chain["base"] / "killed"
    rng = random.Random(15)
    outcomes: collections.Counter[str] = collections.Counter()
    for trial in range(3):
        restore = subprocess.Popen([*CLI, "restore", "cluster", "--to-dir", str(data), "--latest",
                                    *(["--with-wal"] if AS_ROOT else []), "--policy", str(policy)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not (data / RESTORING_MARKER).exists() and restore.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        # trials 0 and 2 kill as soon as the restore has begun (a state, not a time: a fast or a loaded
        # machine kills it midway all the same); trial 1 at a seeded random moment after, maybe too late
        if trial % 2:
            time.sleep(rng.uniform(0, 1.5))
        restore.send_signal(signal.SIGKILL)
        _out, err = restore.communicate()
        if restore.returncode != -signal.SIGKILL:  # it finished first
            assert restore.returncode == 0, err
            assert (data / "recovery.signal").exists() and not (data / RESTORING_MARKER).exists()
            shutil.rmtree(data)
            outcomes["finished first"] += 1
        else:  # half-restored, never configured to start (or not begun: empty)
            assert not (data / "recovery.signal").exists() or (data / RESTORING_MARKER).exists()
            outcomes["killed"] += 1
        _report, rows = _restore_and_read(policy, data, "--latest")  # no private directory left in or beside it
        assert rows == chain["A"] | chain["B"] | chain["C"]
    print(f"chain restore, SIGKILL at random: {dict(outcomes)}")
    assert outcomes["killed"] >= 2, outcomes


def test_restore_from_the_first_incremental_to_a_position_and_a_time(chain: dict[str, Any]) -> None:
    policy = chain["policy"]
    report, rows = _restore_and_read(policy, chain["base"] / "to-lsn", "--base-backup", chain["first"],
                                     "--to-lsn", chain["at_lsn"])
    assert rows == chain["A"] | chain["B"]
    assert report["details"]["chain"] == [chain["full"], chain["first"]]
    report, rows = _restore_and_read(policy, chain["base"] / "to-time", "--base-backup", chain["first"],
                                     "--to-time", chain["at_time"].isoformat())
    assert rows == chain["A"] | chain["B"]


def test_a_restore_test_of_the_newest_incremental_recovers_and_opens_every_database(chain: dict[str, Any]) -> None:
    done = cli(chain["policy"], "restore-test", "--target", "cluster", "--json")
    report = json.loads(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert report["backup_id"] == chain["second"] and report["problems"] == []
    assert report["details"]["databases"] == ["postgres", "template1"]


def _copy_project(chain: dict[str, Any], tmp_path: Path) -> Path:
    """The policy, keys and repository copied: a damaged copy leaves the shared chain alone."""
    project = tmp_path / "regal"
    shutil.copytree(chain["policy"].parent, project)
    return project / chain["policy"].name


def _refused(policy: Path, data: Path, *how: str) -> str:
    done = cli(policy, "restore", "cluster", "--to-dir", str(data), "--latest", *how,
               *(["--with-wal"] if AS_ROOT else []))
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr
    assert not (data / "recovery.signal").exists()
    assert not _leftovers(data)  # removed also on failure
    return done.stderr


def test_a_deleted_parent_object_is_refused_naming_it(chain: dict[str, Any], tmp_path: Path) -> None:
    policy = _copy_project(chain, tmp_path)
    tar = _backup_dir(policy, chain["first"]) / "base.tar"
    tar.unlink()
    message = _refused(policy, tmp_path / "restored")
    assert "base.tar" in message and chain["first"] in message, message


def test_a_forged_parent_manifest_is_refused_naming_it(chain: dict[str, Any], tmp_path: Path) -> None:
    policy = _copy_project(chain, tmp_path)
    sealed = _backup_dir(policy, chain["first"]) / "manifest.json"
    document = _manifest(policy, chain["first"])  # as the genuine one says (an attacker cannot read it)
    document["source"]["stop_lsn"] = "0/0"
    sealed.write_text(json.dumps(document))
    message = _refused(policy, tmp_path / "restored")
    assert chain["first"] in message, message

    policy = _copy_project(chain, tmp_path / "again")
    parent = _backup_dir(policy, chain["first"]) / "backup_manifest"
    shutil.copyfile(_backup_dir(policy, chain["second"]) / "backup_manifest", parent)  # another backup's
    done = cli(policy, "verify", chain["second"], "--json")  # the child's check reads its parent's manifest
    assert done.returncode == 3, done.stderr
    integrity = next(c for c in json.loads(done.stdout)["checks"] if c["name"] == "integrity")
    assert not integrity["passed"] and f"{chain['first']}/backup_manifest" in integrity["description"], integrity


def test_prune_keeps_every_parent_of_a_kept_incremental(chain: dict[str, Any]) -> None:
    policy = chain["policy"]
    dry = json.loads(_ok(cli(policy, "prune", "--dry-run", "--json")).stdout)
    decisions = {d["backup_id"]: d for d in dry["decisions"]["cluster"]}
    assert all(d["keep"] for d in decisions.values()), decisions
    assert any(f"parent of the incremental {chain['second']}" in r for r in decisions[chain["full"]]["reasons"])
    assert any(f"parent of the incremental {chain['second']}" in r for r in decisions[chain["first"]]["reasons"])
    _ok(cli(policy, "prune", "--json"))
    assert all((_backup_dir(policy, chain[k]) / "manifest.json").exists() for k in ("full", "first", "second"))


def test_dagster_daily_runs_are_incremental_and_weekly_ones_full_as_the_policy_says(chain: dict[str, Any]) -> None:
    import dagster as dg

    from regal_dagster.defs import BACKUP_JOB, build_definitions
    from regal_dagster.defs.backups.assets import RETENTION_CLASS_TAG

    defs = build_definitions(str(chain["policy"]))
    instance = dg.DagsterInstance.ephemeral()
    found = {}
    for retention_class in ("daily", "weekly"):
        result = defs.resolve_job_def(BACKUP_JOB).execute_in_process(
            instance=instance, tags={RETENTION_CLASS_TAG: retention_class})
        (event,) = result.get_asset_materialization_events()
        found[retention_class] = event.materialization.metadata
    assert found["daily"]["source/backup_type"].value == "incremental"
    assert found["daily"]["source/parent_backup_id"].value == chain["second"]
    assert found["weekly"]["source/backup_type"].value == "full"
    assert "source/parent_backup_id" not in found["weekly"]


def test_summarize_wal_off_and_missing_summaries_are_refused_with_what_to_do(chain: dict[str, Any]) -> None:
    dsn = chain["dsn"]
    _sql(dsn, "ALTER SYSTEM SET summarize_wal = 'off'")
    _sql(dsn, "SELECT pg_reload_conf()")
    try:
        deadline = time.monotonic() + 10
        while _sql(dsn, "SHOW summarize_wal")[0][0] != "off" and time.monotonic() < deadline:
            time.sleep(0.1)
        done = cli(chain["policy"], "backup", "cluster", "--incremental")
        assert done.returncode == 2, done.stderr
        assert "summarize_wal is off" in done.stderr and "set summarize_wal = on and reload" in done.stderr
        for _ in range(3):  # WAL written while nothing summarizes it, recycled by checkpoints
            _insert(dsn, "unsummarized", 10_000 + _ * 1000, 500)
            _sql(dsn, "SELECT pg_switch_wal()")
            _sql(dsn, "CHECKPOINT")
    finally:
        _sql(dsn, "ALTER SYSTEM SET summarize_wal = 'on'")
        _sql(dsn, "SELECT pg_reload_conf()")
    done = cli(chain["policy"], "backup", "cluster", "--incremental")  # the summaries have a hole since `second`
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "WAL summaries are required" in done.stderr and "take a full backup" in done.stderr, done.stderr
    full = _backup(chain["policy"], "--full")["backup_id"]  # the fix: a full one, then incrementals on top
    after = _backup(chain["policy"], "--incremental")
    assert _manifest(chain["policy"], after["backup_id"])["source"]["chain"] == [full]


def test_a_server_older_than_17_is_refused(tmp_path: Path) -> None:
    made = json.loads(_run([*CLI, "init", str(tmp_path / "regal"), "--cluster-dsn", SYSTEM_PG, "--no-audit",
                            "--json"]).stdout)
    done = cli(Path(made["policy"]), "backup", "cluster", "--incremental")
    assert done.returncode == 2, done.stderr
    assert "incremental base backups need PostgreSQL 17 or newer" in done.stderr


def test_an_incremental_with_nothing_to_build_on_is_a_full_backup_saying_so(chain: dict[str, Any]) -> None:
    policy = chain["policy"]
    policy.write_text(policy.read_text().replace("targets:\n", f"targets:\n  fresh:\n    kind: postgres_cluster\n"
                                                               f"    dsn: {chain['dsn']}\n", 1))
    done = cli(policy, "backup", "fresh", "--incremental", "--json")
    assert "there is no good base backup of this target yet: took a full base backup" in done.stderr, done.stderr
    # the server archives its WAL into the other target's archive: this one holds none, and says so
    assert done.returncode == 3 and "not recoverable beyond its end" in done.stderr, done.stderr
    backup_id = json.loads(done.stdout)["backup_id"]
    source = manifest_body(policy, "fresh", backup_id)["source"]
    assert source["backup_type"] == "full" and "took a full base backup" in source["incremental_note"]
