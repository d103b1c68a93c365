"""Point-in-time recovery of a whole server: base backups through the pipeline, WAL archived by
`regal-backup wal push` as the server's archive_command, restores to a time, a WAL position, a named
restore point and the end of the archive, each started with PostgreSQL and compared row by row."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self

import psycopg
import pytest
from psycopg import sql

from regal_dagster.engine.postgresql.programs import let_account_traverse, server_account
from regal_dagster.engine.postgresql.server import ScratchCluster

from .conftest import DatabaseFactory, invoke_cli, wait_archived, wait_for, wait_promoted
from .old_formats import manifest_body

CLI = [sys.executable, "-m", "regal_dagster.cli"]

# As root, PostgreSQL runs as regal_pg, which cannot run this Python (it lives under /root here): the server
# then archives into a spool that a thread of the test stores as it comes (what `wal push` would do), and
# restores copy their WAL in (--with-wal). As any other user, the server runs `wal push` and `wal get` itself.
AS_ROOT = os.geteuid() == 0


def cli(policy: Path, *args: str) -> Any:
    return invoke_cli([*args, "--policy", str(policy)])  # in this process (conftest.invoke_cli)


def _give_to_server_account(path: Path) -> None:
    """PostgreSQL runs as regal_pg when the tests run as root: its archive_command and restore_command read
    the policy, the keys and the repository as that user."""
    account = server_account()
    if account.is_other:
        let_account_traverse(path, account)
        account.chown_tree(path)


def _sql(dsn: str, query: str, params: tuple[Any, ...] = ()) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cursor = conn.execute(query, params or None)
        return cursor.fetchall() if cursor.description else None


def _wait_archived(dsn: str) -> None:
    """A WAL switch, then wait until the server has archived the segment it closed."""
    wait_archived(dsn)


def archiving_server(base: Path, **settings: str) -> tuple[ScratchCluster, Path, Path]:
    """A PostgreSQL 18 server in `base` that archives its WAL (through `wal push`; as root, whose server account
    cannot run it, into a spool `_push_spool` stores), with `settings` too, and a `regal-backup init
    --cluster-dsn` project: (the running server, the policy file, the spool)."""
    server = ScratchCluster.persistent(base / "pgdata").start()
    try:
        project = base / "regal"
        made = json.loads(_run([*CLI, "init", str(project), "--cluster-dsn", server.dsn(), "--no-audit",
                                "--json"]).stdout)
        policy = Path(made["policy"])
        _give_to_server_account(project)
        spool = base / "spool"
        spool.mkdir()
        _give_to_server_account(spool)
        push = (f"test ! -f {spool}/%f && cp %p {spool}/.%f && mv {spool}/.%f {spool}/%f" if AS_ROOT else
                " ".join([sys.executable, "-m", "regal_dagster.cli", "--policy", str(policy), "wal", "push", "%p"]))
        for name, value in {"archive_mode": "on", "archive_command": push, **settings}.items():
            _sql(server.dsn(), sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name),
                                                                          sql.Literal(value)).as_string())
        server.stop()
        server.start()
        if AS_ROOT:  # what `wal push` as the archive_command would do: store each file as it is archived
            threading.Thread(target=_keep_pushing, args=(policy, spool, base / "pgdata" / "postmaster.pid"),
                             daemon=True).start()
    except BaseException:
        server.stop()
        raise
    return server, policy, spool


_SPOOL = threading.Lock()  # one pusher of the spool at a time


def _keep_pushing(policy_file: Path, spool: Path, pid_file: Path) -> None:
    """Store what the server archives into `spool` as it comes (a backup waits for its WAL to be stored), until
    the server has been stopped for 30 s."""
    from regal_dagster.engine.crypto import load_keyring
    from regal_dagster.engine.policy import load_policy
    from regal_dagster.engine.sources.postgres_cluster.wal import push_wal
    from regal_dagster.engine.storage import open_repository

    policy = load_policy(policy_file)
    repo, keyring = open_repository(policy), load_keyring(policy)
    stopped_at = None
    while stopped_at is None or time.monotonic() - stopped_at < 30:
        stopped_at = None if pid_file.exists() else stopped_at or time.monotonic()
        with _SPOOL:
            for path in sorted(p for p in spool.iterdir() if not p.name.startswith(".")):
                push_wal(policy, repo, keyring, "cluster", path)
                path.unlink()
        time.sleep(0.2)


@pytest.fixture(scope="module")
def archived_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A PostgreSQL 18 server archiving through `regal-backup wal push`, two base backups, and rows written at
    known times, WAL positions and a named restore point."""
    base = tmp_path_factory.mktemp("pitr")
    server, policy, spool = archiving_server(base)
    try:
        dsn = server.dsn()
        _sql(dsn, "CREATE TABLE payments (id int PRIMARY KEY, note text)")
        _sql(dsn, "INSERT INTO payments VALUES (1, 'before the first base backup')")
        # the WAL reaches the repository through a spool pushed below, after the backups: checked later
        first = json.loads(_ok(cli(policy, "backup", "cluster", "--no-verify", "--json")).stdout)["backup_id"]
        _push_spool(policy, spool)
        _sql(dsn, "INSERT INTO payments VALUES (2, 'before the time')")
        time.sleep(0.3)
        at_time = _sql(dsn, "SELECT clock_timestamp()")[0][0]
        time.sleep(0.3)
        _sql(dsn, "INSERT INTO payments VALUES (3, 'after the time, before the position')")
        at_lsn = _sql(dsn, "SELECT pg_current_wal_lsn()::text")[0][0]
        _sql(dsn, "INSERT INTO payments VALUES (4, 'after the position, before the restore point')")
        _sql(dsn, "SELECT pg_create_restore_point('before_five')")
        second = json.loads(_ok(cli(policy, "backup", "cluster", "--no-verify", "--json")).stdout)["backup_id"]
        _push_spool(policy, spool)
        _sql(dsn, "INSERT INTO payments VALUES (5, 'after the restore point and the second base backup')")
        _sql(dsn, "INSERT INTO payments VALUES (6, 'the newest')")
        _wait_archived(dsn)
        _push_spool(policy, spool)
        yield {"policy": policy, "base": base, "dsn": dsn, "first": first, "second": second, "at_time": at_time,
               "at_lsn": at_lsn, "server": server}
    finally:
        server.stop()


def _push_spool(policy: Path, spool: Path) -> None:
    with _SPOOL:
        for path in sorted(p for p in spool.iterdir() if not p.name.startswith(".")):
            _ok(cli(policy, "wal", "push", str(path)))
            path.unlink()


def _run(command: list[str]) -> Any:
    """`[*CLI, ARGS]` run (in this process) and succeeded."""
    assert command[:len(CLI)] == CLI, command
    done = invoke_cli(command[len(CLI):])
    assert done.returncode == 0, done.stderr
    return done


def _ok(done: Any) -> Any:
    assert done.returncode == 0, done.stderr + done.stdout
    return done


def _restore_and_read(setup: dict[str, Any], name: str, *how: str) -> tuple[dict[str, Any], list[int]]:
    """Restore to a new data directory, start PostgreSQL on it, wait for the promotion, read the rows."""
    data = setup["base"] / f"restored-{name}"
    done = _ok(cli(setup["policy"], "restore", "cluster", "--to-dir", str(data), *how, "--json",
                   *(["--with-wal"] if AS_ROOT else [])))
    report = json.loads(done.stdout)
    assert (data / "recovery.signal").exists()
    restored = ScratchCluster.persistent(data).start()
    try:
        _wait_promoted(restored)
        rows = [r[0] for r in _sql(restored.dsn(), "SELECT id FROM payments ORDER BY id")]
        _sql(restored.dsn(), "INSERT INTO payments VALUES (100, 'open for writes')")  # promoted
    finally:
        restored.stop()
        shutil.rmtree(data, ignore_errors=True)
    return report, rows


def test_a_base_backup_is_a_verified_pg_basebackup_stream_with_its_wal_range(archived_server: dict[str, Any]) -> None:
    policy = archived_server["policy"]
    shown = json.loads(_ok(cli(policy, "show", archived_server["first"], "--json")).stdout)
    assert [o["name"] for o in shown["objects"]] == ["base.tar", "backup_manifest"]
    done = _ok(cli(policy, "verify", archived_server["second"], "--json"))
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    assert all(c["passed"] for c in checks.values()), checks
    assert "files of PostgreSQL's backup manifest with their SHA-256" in checks["integrity"]["description"]
    assert "parsed by pg_waldump" in checks["wal_continuity"]["description"], checks["wal_continuity"]
    manifest = manifest_body(policy, "cluster", archived_server["first"])
    source = manifest["source"]
    assert source["timeline"] == 1 and source["start_lsn"] <= source["stop_lsn"]
    assert manifest["tool_versions"]["pg_basebackup"].startswith("18")


def test_restores_to_a_time_a_position_a_restore_point_and_the_end(archived_server: dict[str, Any]) -> None:
    setup = archived_server
    preview = json.loads(_ok(cli(setup["policy"], "restore", "cluster", "--to-dir", str(setup["base"] / "never"),
                                 "--to-time", setup["at_time"].isoformat(), "--preview", "--json")).stdout)
    assert preview["preview"] and preview["base_backup"] == setup["first"]  # the second ends after the time
    assert not (setup["base"] / "never").exists()

    report, rows = _restore_and_read(setup, "time", "--to-time", setup["at_time"].isoformat())
    assert rows == [1, 2] and report["details"]["base_backup"] == setup["first"]
    report, rows = _restore_and_read(setup, "lsn", "--to-lsn", setup["at_lsn"])
    assert rows == [1, 2, 3]
    report, rows = _restore_and_read(setup, "name", "--to-name", "before_five")
    assert rows == [1, 2, 3, 4] and report["details"]["base_backup"] == setup["first"]
    report, rows = _restore_and_read(setup, "latest", "--latest")
    assert rows == [1, 2, 3, 4, 5, 6] and report["details"]["base_backup"] == setup["second"]


def test_wal_push_is_idempotent_and_refuses_other_content(archived_server: dict[str, Any], tmp_path: Path) -> None:
    policy = archived_server["policy"]
    wal_dir = policy.parent / "repository" / "wal" / "cluster"
    segment = min(p.name for p in wal_dir.iterdir() if len(p.name) == 24)
    fetched = tmp_path / segment
    _ok(cli(policy, "wal", "get", segment, str(fetched)))
    assert fetched.stat().st_size == 16 * 1024 * 1024
    again = _ok(cli(policy, "wal", "push", str(fetched), "--json"))
    assert json.loads(again.stdout)["already"] is True
    with fetched.open("r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    refused = cli(policy, "wal", "push", str(fetched))
    assert refused.returncode == 1 and "already archived" in refused.stderr and segment in refused.stderr
    absent = cli(policy, "wal", "get", "00000001000000FF000000FF", str(tmp_path / "absent"))
    assert absent.returncode == 1 and not (tmp_path / "absent").exists()


def test_a_changed_wal_object_fails_authentication(archived_server: dict[str, Any], tmp_path: Path) -> None:
    """`wal get` refuses it; so does the parallel fetch of `restore --with-wal` (and of cluster restore tests,
    walfetch.fetch_wal_files): the files after it were fetched ahead, yet only those before it stay, and nothing of
    it is ever written; the restore names it and writes nothing."""
    from regal_dagster.engine.crypto import load_keyring
    from regal_dagster.engine.errors import IntegrityError
    from regal_dagster.engine.policy import load_policy
    from regal_dagster.engine.sources.postgres_cluster.walfetch import fetch_wal_files
    from regal_dagster.engine.storage import open_repository

    policy = archived_server["policy"]
    wal_dir = policy.parent / "repository" / "wal" / "cluster"
    segments = sorted(p.name for p in wal_dir.iterdir() if len(p.name) == 24)
    segment = segments[1]
    original = (wal_dir / segment).read_bytes()
    try:
        damaged = bytearray(original)
        damaged[len(damaged) // 2] ^= 0x01
        (wal_dir / segment).write_bytes(bytes(damaged))
        done = cli(policy, "wal", "get", segment, str(tmp_path / segment))
        assert done.returncode == 3 and "fails authentication" in done.stderr
        assert not (tmp_path / segment).exists()
        loaded = load_policy(policy)
        repo, keyring = open_repository(loaded), load_keyring(loaded)
        fetched = tmp_path / "fetched"
        fetched.mkdir()
        with pytest.raises(IntegrityError, match=f"wal/cluster/{segment}"):
            fetch_wal_files(repo, keyring, "cluster", segments, fetched, workers=3, ahead=4)
        assert sorted(p.name for p in fetched.iterdir()) == segments[:1]
        everything = fetch_wal_files(repo, keyring, "cluster", segments[2:], fetched, workers=3, ahead=2)
        assert [f.name for f in everything] == segments[2:]
        for name in segments[2:]:  # each whole and as archived
            got = cli(policy, "wal", "get", name, str(tmp_path / name))
            assert got.returncode == 0 and (tmp_path / name).read_bytes() == (fetched / name).read_bytes()
        target = archived_server["base"] / "damaged"
        done = cli(policy, "restore", "cluster", "--to-dir", str(target), "--to-time",
                   archived_server["at_time"].isoformat(), "--with-wal")
        assert done.returncode == 3 and f"wal/cluster/{segment}" in done.stderr, done.stderr
        assert "fails authentication" in done.stderr and not target.exists()
    finally:
        (wal_dir / segment).write_bytes(original)


def test_a_segment_swapped_for_another_is_refused_naming_it(archived_server: dict[str, Any], tmp_path: Path) -> None:
    """Another sealed segment of the same target copied over one (its object, then its record too): `wal get`
    refuses naming the file, as restore_command it exits above 125 (PostgreSQL stops recovery instead of
    promoting at the swapped segment), and a restore refuses without writing anything."""
    policy = archived_server["policy"]
    wal_dir = policy.parent / "repository" / "wal" / "cluster"
    segments = sorted(p.name for p in wal_dir.iterdir() if len(p.name) == 24)
    victim, other = segments[1], segments[2]  # the restore to the time replays both
    kept = {name: (wal_dir / name).read_bytes() for name in (victim, victim + ".json")}
    try:
        shutil.copyfile(wal_dir / other, wal_dir / victim)
        done = cli(policy, "wal", "get", victim, str(tmp_path / victim))
        assert done.returncode == 3 and f"wal/cluster/{victim}" in done.stderr, done.stderr
        done = cli(policy, "wal", "get", "--restore-command", victim, str(tmp_path / victim))
        assert done.returncode == 126 and "recovery stops here" in done.stderr, done.stderr
        shutil.copyfile(wal_dir / (other + ".json"), wal_dir / (victim + ".json"))
        done = cli(policy, "wal", "get", "--restore-command", victim, str(tmp_path / victim))
        assert done.returncode == 126 and f"wal/cluster/{victim}.json fails authentication" in done.stderr
        assert not (tmp_path / victim).exists()
        target = archived_server["base"] / "swapped"
        done = cli(policy, "restore", "cluster", "--to-dir", str(target), "--to-time",
                   archived_server["at_time"].isoformat(), "--with-wal")
        assert done.returncode == 3 and f"wal/cluster/{victim}.json" in done.stderr, done.stderr
        assert not target.exists()
        absent = cli(policy, "wal", "get", "--restore-command", "00000001000000FF000000FF", str(tmp_path / "x"))
        assert absent.returncode == 1  # not archived: recovery ends there, as it should
    finally:
        for name, data in kept.items():
            (wal_dir / name).write_bytes(data)


def test_a_missing_wal_segment_is_refused_naming_it(archived_server: dict[str, Any]) -> None:
    policy = archived_server["policy"]
    wal_dir = policy.parent / "repository" / "wal" / "cluster"
    segments = sorted(p.name for p in wal_dir.iterdir() if len(p.name) == 24)
    gone = segments[1]
    kept = (wal_dir / (gone + ".json")).read_bytes()
    (wal_dir / (gone + ".json")).unlink()
    try:
        target = archived_server["base"] / "refused"
        done = cli(policy, "restore", "cluster", "--to-dir", str(target), "--to-time",
                   archived_server["at_time"].isoformat())
        assert done.returncode == 1 and f"lacks {gone}" in done.stderr, done.stderr
        assert not target.exists()
        verified = cli(policy, "verify", archived_server["second"], "--json")
        checks = {c["name"]: c for c in json.loads(verified.stdout)["checks"]}
        assert verified.returncode == 3 and not checks["wal_continuity"]["passed"]  # every point past it is lost
        assert checks["wal_continuity"]["failing_object"] == gone and gone in checks["wal_continuity"]["description"]
        status = cli(policy, "wal", "status", "cluster", "--json")
        assert status.returncode == 3 and json.loads(status.stdout)["gaps"] == [gone]
    finally:
        (wal_dir / (gone + ".json")).write_bytes(kept)
        os.utime(wal_dir / (gone + ".json"))
    # put back, it is unrecoverable past it until WAL continuity is proved again
    assert cli(policy, "wal", "status", "cluster").returncode == 3
    _ok(cli(policy, "verify", archived_server["second"]))
    _ok(cli(policy, "wal", "status", "cluster"))


def test_wal_status_measures_the_newest_stored_position_against_the_server(archived_server: dict[str, Any]) -> None:
    policy = archived_server["policy"]
    wal_dir = policy.parent / "repository" / "wal" / "cluster"
    newest = max(p.name for p in wal_dir.iterdir() if len(p.name) == 24)
    done = _ok(cli(policy, "wal", "status", "cluster", "--json"))
    status = json.loads(done.stdout)
    assert status["newest_segment"] == newest and status["gaps"] == [] and status["segments"] >= 5
    assert status["oldest_base_backup"] == archived_server["first"]
    server_lsn = _sql(archived_server["dsn"], "SELECT pg_current_wal_lsn()::text")[0][0]
    assert status["server_lsn"] == server_lsn
    stored = (int(newest[8:16], 16) << 32) + (int(newest[16:], 16) + 1) * 16 * 1024 * 1024
    high, low = server_lsn.split("/")
    assert status["lag_bytes"] == max(0, (int(high, 16) << 32 | int(low, 16)) - stored)


def test_dagster_shows_base_backups_and_the_wal_whose_freshness_is_the_rpo(archived_server: dict[str, Any]) -> None:
    from datetime import timedelta

    import dagster as dg

    from regal_dagster.defs import build_definitions

    defs = build_definitions(str(archived_server["policy"]))
    dg.Definitions.validate_loadable(defs)
    base, wal = dg.AssetKey(["postgres", "cluster", "base_backup"]), dg.AssetKey(["postgres", "cluster", "wal"])
    assert defs.resolve_assets_def(base).get_asset_spec(base).group_name == "backups_default_postgres_cluster"
    spec = defs.resolve_assets_def(wal).get_asset_spec(wal)
    assert spec.freshness_policy.fail_window.to_timedelta() == timedelta(hours=1)  # the policy's RPO
    assert [d.asset_key for d in spec.deps] == [base] and spec.group_name == "wal_default"

    instance = dg.DagsterInstance.ephemeral()
    _sql(archived_server["dsn"], "INSERT INTO payments VALUES (7, 'written, not yet stored')")

    def tick(cursor: str | None) -> str | None:
        context = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs, resources=defs.resources)
        result = defs.resolve_sensor_def("wal_stream_watch")(context)
        for event in result.asset_events:  # type: ignore[union-attr]
            instance.report_runless_asset_event(event)
        return result.cursor  # type: ignore[union-attr]

    cursor = tick(None)
    event = instance.get_latest_materialization_event(wal)
    assert event is not None and event.asset_materialization is not None
    metadata = event.asset_materialization.metadata
    status = json.loads(_ok(cli(archived_server["policy"], "wal", "status", "--json")).stdout)
    assert metadata["newest_lsn"].value == status["newest_lsn"] and metadata["gaps"].value == 0
    assert metadata["lag_bytes"].value > 0  # the row just written is on the server only
    tick(cursor)  # nothing newer stored and the server is ahead: no event, the asset ages towards the RPO
    assert len(instance.fetch_materializations(wal, limit=10).records) == 1


def test_the_rpo_watch_alerts_on_the_age_of_the_newest_stored_wal(archived_server: dict[str, Any]) -> None:
    from datetime import UTC, datetime, timedelta

    from regal_dagster.engine.alerts import rpo_conditions
    from regal_dagster.engine.crypto import load_keyring
    from regal_dagster.engine.policy import load_policy
    from regal_dagster.engine.storage import open_repository

    cli(archived_server["policy"], "verify", archived_server["second"])  # a good base backup: the WAL decides
    policy = load_policy(archived_server["policy"])
    repo, keyring = open_repository(policy), load_keyring(policy)
    _sql(archived_server["dsn"], "INSERT INTO payments VALUES (8, 'on the server only')")
    now = datetime.now(UTC)
    assert rpo_conditions(policy, repo, keyring, now) == []  # the newest WAL was stored minutes ago: within 1 h
    later = rpo_conditions(policy, repo, keyring, now + timedelta(hours=2))  # the stream stopped two hours ago
    assert [c.key for c in later] == ["rpo:cluster"]
    assert "newest stored WAL is" in later[0].what and "bytes ahead" in later[0].what
    shown = json.loads(_ok(cli(archived_server["policy"], "status", "cluster", "--json")).stdout)["targets"][0]
    stored_at = datetime.fromisoformat(json.loads(_ok(cli(archived_server["policy"], "wal", "status", "--json"))
                                                  .stdout)["newest_stored_at"])
    assert not shown["rpo_breached"]
    assert abs(shown["rpo_age_seconds"] - (datetime.now(UTC) - stored_at).total_seconds()) < 30  # the WAL's age


def test_a_restore_test_recovers_the_base_backup_and_opens_every_database(archived_server: dict[str, Any]) -> None:
    """With `restore_point_facts: false` the test never connects to the server: the newest point and a random one."""
    import yaml

    policy = archived_server["policy"]
    original = policy.read_text()
    document = yaml.safe_load(original)
    document["targets"]["cluster"]["restore_point_facts"] = False
    policy.write_text(yaml.safe_dump(document))
    try:
        done = cli(policy, "restore-test", "--target", "cluster", "--json")
    finally:
        policy.write_text(original)
    report = json.loads(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert report["backup_id"] == archived_server["second"] and report["problems"] == []
    assert report["details"]["databases"] == ["postgres", "template1"]  # as the backup recorded them
    assert "restore_point" not in report["details"]
    assert [r["point"] for r in report["details"]["recoveries"]] == ["newest", "random"]
    newest = report["details"]["recoveries"][0]
    assert newest["newest_commit"] == report["details"]["newest_stored_commit"]  # the insert of row 6
    assert report["details"]["rpo_basis"].endswith("the server was not asked)")
    assert report["rto_seconds"] == max(r["rto_seconds"] for r in report["details"]["recoveries"]) > 0


def test_a_point_in_time_restore_onto_the_servers_own_host_needs_someone_elses_approval(
        archived_server: dict[str, Any], system_pg: DatabaseFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """With `restore_approval`, a point-in-time restore of a production server into a data directory on that
    server's own host is a restore into production, as `restore` into its own database is: refused before anything
    is written until someone else approves the base backup it starts from; the approval is used once, audited."""
    import yaml

    from regal_dagster.engine.approval import os_account
    from regal_dagster.engine.audit import AuditTrail
    from regal_dagster.engine.policy import load_policy
    from regal_dagster.engine.storage import open_repository

    setup = archived_server
    guarded = setup["policy"].with_name("guarded.yaml")  # beside it: the same repository and keys
    settings = yaml.safe_load(setup["policy"].read_text())
    settings.update(audit={"dsn": system_pg.create("regal_audit")},
                    restore_approval={"targets": ["cluster"], "valid_for": "1h"})
    guarded.write_text(yaml.safe_dump(settings))
    data = setup["base"] / "restored-approved"
    monkeypatch.delenv("SUDO_USER", raising=False)

    def restore() -> Any:
        return cli(guarded, "restore", "cluster", "--to-dir", str(data), "--latest", "--json",
                   *(["--with-wal"] if AS_ROOT else []))

    refused = restore()
    error = json.loads(refused.stdout)["error"]
    assert refused.returncode == 2 and "needs an approval" in error["message"], refused.stdout
    assert f"approve {setup['second']}" in error["hint"] and not data.exists()  # names the base backup to approve
    me = _ok(cli(guarded, "approve", setup["second"], "--requester", "ops1", "--by", "Ann Lee", "--json"))
    assert json.loads(me.stdout)["requester"] == "ops1"  # approved for another account: no use to this one
    assert restore().returncode == 2
    requester = os_account()  # the account running the restores
    monkeypatch.setenv("SUDO_USER", "ann")  # the approver, at her own account
    _ok(cli(guarded, "approve", setup["second"], "--requester", requester, "--by", "Ann Lee"))
    monkeypatch.delenv("SUDO_USER")
    done = _ok(restore())
    assert json.loads(done.stdout)["details"]["base_backup"] == setup["second"] and (data / "recovery.signal").exists()
    shutil.rmtree(data)
    assert restore().returncode == 2 and not data.exists()  # an approval is used once

    policy = load_policy(guarded)
    events = AuditTrail(policy, open_repository(policy)).events()
    approved = max(e.seq for e in events if e.event_type == "restore_approval" and e.outcome == "success")
    restores = [(e.outcome, json.loads(e.details)) for e in events if e.event_type == "restore"]
    assert [(o, d.get("refused"), d.get("approval")) for o, d in restores] == [
        ("failure", True, None), ("failure", True, None), ("success", None, approved), ("failure", True, None)]


def test_prune_keeps_the_wal_the_kept_base_backups_need_and_nothing_older(archived_server: dict[str, Any]) -> None:
    policy = archived_server["policy"]
    wal_dir = policy.parent / "repository" / "wal" / "cluster"
    before = sorted(p.name for p in wal_dir.iterdir() if p.name.endswith(".json"))
    dry = json.loads(_ok(cli(policy, "prune", "--dry-run", "--json")).stdout)
    kept = sorted(d["backup_id"] for d in dry["decisions"]["cluster"] if d["keep"])
    assert kept == [archived_server["second"]]  # one hourly backup per hour: the first one goes
    manifest = manifest_body(policy, "cluster", kept[0])
    high, low = manifest["source"]["start_lsn"].split("/")
    first = (int(high, 16) << 32 | int(low, 16)) // (16 * 1024 * 1024)
    older = [n for n in before if int(n[8:16], 16) * 256 + int(n[16:24], 16) < first]
    assert any(len(n) == 24 + 5 for n in older)  # segments before the kept base backup started
    assert dry["wal_deleted"] == {"cluster": len(older)}
    assert sorted(p.name for p in wal_dir.iterdir() if p.name.endswith(".json")) == before  # a dry run
    _ok(cli(policy, "prune", "--json"))
    assert sorted(p.name for p in wal_dir.iterdir() if p.name.endswith(".json")) == [n for n in before
                                                                                     if n not in older]
    status = json.loads(_ok(cli(policy, "wal", "status", "--json")).stdout)
    assert status["gaps"] == [] and status["oldest_base_backup"] == kept[0]
    preview = json.loads(_ok(cli(policy, "restore", "cluster", "--to-dir", str(archived_server["base"] / "x"),
                                 "--latest", "--preview", "--json")).stdout)
    assert preview["base_backup"] == kept[0]


def test_init_writes_a_cluster_target_beside_a_database(tmp_path: Path) -> None:
    done = _ok(cli(tmp_path / "unused.yaml", "init", str(tmp_path / "p"), "--postgres-dsn",
                   "postgresql://backup@db/pos", "--cluster-dsn", "postgresql://replicator@db/postgres",
                   "--no-audit", "--json"))
    import yaml

    document = yaml.safe_load(Path(json.loads(done.stdout)["policy"]).read_text())
    assert document["targets"]["main"] == {"kind": "postgres", "dsn": "postgresql://backup@db/pos"}
    assert document["targets"]["cluster"] == {"kind": "postgres_cluster", "dsn": "postgresql://replicator@db/postgres",
                                              "slot": "regal_backup"}


def _stored(policy: Path, name: str) -> bool:
    return (policy.parent / "repository" / "wal" / "cluster" / (name + ".json")).exists()


def _wait_for(condition: Any, what: str, seconds: float = 60) -> None:
    wait_for(condition, what, seconds, 0.2)


def _wait_promoted(server: ScratchCluster, seconds: float = 120) -> None:
    """Until the restored server has recovered and been promoted (open for writes); its log's end if not."""
    wait_promoted(server.dsn(), seconds, server.log_tail)


def _start_stream(policy: Path, log: Path) -> Any:
    import subprocess

    with log.open("a") as out:
        process = subprocess.Popen([*CLI, "--policy", str(policy), "wal", "stream", "cluster", "--snapshot-seconds",
                                    "1"], stdout=subprocess.DEVNULL, stderr=out)
    _wait_for(lambda: "streaming WAL" in log.read_text() or process.poll() is not None, "the stream to start")
    assert process.poll() is None, log.read_text()
    return process


def test_the_wal_stream_survives_kill_9_and_restores_to_its_newest_snapshot(tmp_path: Path) -> None:
    """A streamer killed with SIGKILL and started again leaves no gap (the slot and its working directory keep
    the WAL); SIGTERM stops it cleanly; a restore reaches the last commit, held only in the snapshot of the
    segment being received."""
    import signal

    server = ScratchCluster.persistent(tmp_path / "pgdata").start()
    stream = None
    try:
        dsn = server.dsn()
        made = json.loads(_run([*CLI, "init", str(tmp_path / "regal"), "--cluster-dsn", dsn, "--no-audit",
                                "--json"]).stdout)
        policy = Path(made["policy"])
        log = tmp_path / "stream.log"
        stream = _start_stream(policy, log)
        assert _sql(dsn, "SELECT active FROM pg_replication_slots WHERE slot_name = 'regal_backup'") == [(True,)]
        _sql(dsn, "CREATE TABLE payments (id int PRIMARY KEY, note text)")
        _sql(dsn, "INSERT INTO payments VALUES (1)")
        _ok(cli(policy, "backup", "cluster"))  # waits for the stream to store its end, then checks it
        _sql(dsn, "INSERT INTO payments VALUES (2)")
        closed = _sql(dsn, "SELECT pg_walfile_name(pg_switch_wal())")[0][0]
        _wait_for(lambda: _stored(policy, closed), f"{closed} to be stored")

        stream.send_signal(signal.SIGKILL)
        stream.wait()
        _sql(dsn, "INSERT INTO payments VALUES (3)")
        _sql(dsn, "SELECT pg_switch_wal()")
        _sql(dsn, "INSERT INTO payments VALUES (4)")
        closed = _sql(dsn, "SELECT pg_walfile_name(pg_switch_wal())")[0][0]
        stream = _start_stream(policy, log)
        _wait_for(lambda: _stored(policy, closed), f"{closed} to be stored after the restart")
        _sql(dsn, "INSERT INTO payments VALUES (5)")  # in the segment being received: only a snapshot holds it
        in_progress = _sql(dsn, "SELECT pg_walfile_name(pg_current_wal_lsn())")[0][0]
        written = time.time()
        partial = policy.parent / "repository" / "wal" / "cluster" / "partial" / (in_progress + ".json")
        _wait_for(lambda: partial.exists() and partial.stat().st_mtime > written + 0.5, "a snapshot of "
                  f"{in_progress}")
        stream.send_signal(signal.SIGTERM)
        assert stream.wait(timeout=30) == 0, log.read_text()
        stream = None
        text = log.read_text()
        assert "storing what was received, then stopping" in text

        status = json.loads(_ok(cli(policy, "wal", "status", "--json")).stdout)
        assert status["snapshot"] == in_progress and status["gaps"] == []
        assert status["newest_lsn"].split("/")[0] == status["server_lsn"].split("/")[0]
        preview = json.loads(_ok(cli(policy, "restore", "cluster", "--to-dir", str(tmp_path / "x"), "--latest",
                                     "--preview", "--json")).stdout)
        assert preview["last_segment"] == in_progress  # no gap from the base backup to the snapshot
        _report, rows = _restore_and_read({"policy": policy, "base": tmp_path}, "stream", "--latest")
        assert rows == [1, 2, 3, 4, 5]

        # A timeline switch: a restored, promoted server (timeline 2) streamed into the target in its place.
        data = tmp_path / "promoted"
        _ok(cli(policy, "restore", "cluster", "--to-dir", str(data), "--latest",
                *(["--with-wal"] if AS_ROOT else [])))
        promoted = ScratchCluster.persistent(data).start()
        try:
            _wait_promoted(promoted, 60)
            import yaml

            document = yaml.safe_load(policy.read_text())
            document["targets"]["cluster"]["dsn"] = promoted.dsn()
            policy.write_text(yaml.safe_dump(document))
            stream = _start_stream(policy, log)
            _sql(promoted.dsn(), "INSERT INTO payments VALUES (6, 'on the new timeline')")
            closed = _sql(promoted.dsn(), "SELECT pg_walfile_name(pg_switch_wal())")[0][0]
            assert closed.startswith("00000002")
            _wait_for(lambda: _stored(policy, closed), f"{closed} to be stored")
            assert _stored(policy, "00000002.history")
            stream.send_signal(signal.SIGTERM)
            assert stream.wait(timeout=30) == 0
            stream = None
        finally:
            promoted.stop()
        _report, rows = _restore_and_read({"policy": policy, "base": tmp_path}, "timeline2", "--latest")
        assert rows == [1, 2, 3, 4, 5, 6]  # recovery followed the history file onto timeline 2
    finally:
        if stream is not None and stream.poll() is None:
            stream.kill()
            stream.wait()
        server.stop()


def test_the_stream_checks_the_server_first_with_clear_messages(tmp_path: Path) -> None:
    with ScratchCluster(base_dir=tmp_path) as minimal:  # tuned for restores: wal_level minimal, no WAL senders
        made = json.loads(_run([*CLI, "init", str(tmp_path / "a"), "--cluster-dsn", minimal.dsn(), "--no-audit",
                                "--json"]).stdout)
        done = cli(Path(made["policy"]), "wal", "stream", "cluster")
        assert done.returncode == 1
        assert "wal_level = minimal" in done.stderr and "set wal_level = replica" in done.stderr
    server = ScratchCluster.persistent(tmp_path / "pgdata").start()
    try:
        _sql(server.dsn(), "CREATE ROLE clerk LOGIN")
        made = json.loads(_run([*CLI, "init", str(tmp_path / "b"), "--cluster-dsn",
                                server.dsn().replace("postgres@", "clerk@"), "--no-audit", "--json"]).stdout)
        done = cli(Path(made["policy"]), "wal", "stream", "cluster")
        assert done.returncode == 1 and "the role clerk may not replicate" in done.stderr
        assert "ALTER ROLE clerk REPLICATION" in done.stderr
        assert _sql(server.dsn(), "SELECT count(*) FROM pg_replication_slots") == [(0,)]  # nothing was created
    finally:
        server.stop()


@pytest.fixture(scope="module")
def streamed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A PostgreSQL 18 server (commit timestamps on, autovacuum off: no commit but the test's) whose WAL `wal stream`
    stores, one base backup, and rows written before it and after it."""
    import signal

    base = tmp_path_factory.mktemp("points")
    server = ScratchCluster.persistent(base / "pgdata").start()
    stream = None
    try:
        _sql(server.dsn(), "ALTER SYSTEM SET track_commit_timestamp = on")
        _sql(server.dsn(), "ALTER SYSTEM SET autovacuum = off")
        server.stop()
        server.start()
        dsn = server.dsn()
        made = json.loads(_run([*CLI, "init", str(base / "regal"), "--cluster-dsn", dsn, "--no-audit",
                                "--json"]).stdout)
        policy = Path(made["policy"])
        stream = _start_stream(policy, base / "stream.log")
        _sql(dsn, "CREATE TABLE payments (id int PRIMARY KEY, note text, at timestamptz DEFAULT now())")
        _sql(dsn, "CREATE TABLE ledger (id int, amount numeric, memo bytea)")
        _sql(dsn, "INSERT INTO payments SELECT g, 'before the base backup' FROM generate_series(1, 50) g")
        _sql(dsn, "INSERT INTO ledger SELECT g, g * 1.5, 'x'::bytea FROM generate_series(1, 20) g")
        backup_id = json.loads(_ok(cli(policy, "backup", "cluster", "--json")).stdout)["backup_id"]
        for i in range(51, 81):
            _sql(dsn, "INSERT INTO payments VALUES (%s, 'after the base backup')", (i,))
        _sql(dsn, "SELECT pg_switch_wal()")
        _sql(dsn, "INSERT INTO ledger VALUES (21, -3.25, NULL)")
        yield {"policy": policy, "base": base, "dsn": dsn, "backup_id": backup_id}
    finally:
        if stream is not None and stream.poll() is None:
            stream.send_signal(signal.SIGTERM)
            stream.wait(timeout=30)
        server.stop()


class _Writer:
    """Inserts a row every 100 ms in its own thread, while a restore test runs: writes before and after the
    restore point."""

    def __init__(self, dsn: str, first_id: int):
        import threading

        self.dsn, self.next_id, self.stop = dsn, first_id, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            _sql(self.dsn, "INSERT INTO payments VALUES (%s, 'written during the restore test')", (self.next_id,))
            self.next_id += 1
            time.sleep(0.1)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _facts_by_xid(dsn: str, table: str, next_xid: str) -> dict[str, Any]:
    """A table's rows committed below `next_xid` (insert-only tables: each row's xmin is its inserting transaction),
    counted and hashed the way the restore test records facts."""
    from regal_dagster.engine.sources.postgres_cluster.pointfacts import OUTPUT_SETTINGS

    with psycopg.connect(dsn, autocommit=True) as conn:
        for name, value in OUTPUT_SETTINGS.items():
            conn.execute(sql.SQL("SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
        row = conn.execute(sql.SQL(
            "SELECT count(*), encode(sha256(convert_to(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text "
            "COLLATE \"C\"), ''), 'UTF8')), 'hex') FROM {} t WHERE xmin::text::bigint < %s").format(
            sql.Identifier(table)), (int(next_xid),)).fetchone()
    assert row is not None
    return {"rows": row[0], "sha256": row[1]}


def test_a_cluster_restore_test_recovers_the_newest_point_a_random_one_and_a_restore_point_exactly(
        streamed_server: dict[str, Any]) -> None:
    setup = streamed_server
    with _Writer(setup["dsn"], 1000) as writer:
        done = cli(setup["policy"], "restore-test", "--target", "cluster", "--json")
    assert writer.next_id > 1000
    report = json.loads(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert report["backup_id"] == setup["backup_id"] and report["problems"] == []
    details = report["details"]
    point = details["restore_point"]
    assert point["facts"] is not None, point["note"]  # five attempts against one insert every 100 ms
    recoveries = {r["point"]: r for r in details["recoveries"]}
    assert list(recoveries) == ["newest", "random", "restore_point"]
    assert all(r["problems"] == [] and r["rto_seconds"] > 0 for r in recoveries.values())

    # The facts are exactly the rows committed before the restore point, and the recovery to it matched them.
    for table in ("payments", "ledger"):
        assert point["facts"]["postgres"]["sample"][f"public.{table}"] == _facts_by_xid(setup["dsn"], table,
                                                                                           point["next_xid"])
    assert point["facts"]["postgres"]["tables"] == 2
    rows_at_point = point["facts"]["postgres"]["sample"]["public.payments"]["rows"]
    assert 80 <= rows_at_point < 80 + (writer.next_id - 1000)  # rows were written after the point too
    assert recoveries["restore_point"]["facts_checked"] == 3
    assert recoveries["restore_point"]["replayed_to_lsn"] == point["lsn"]
    assert f'recovery stopping at restore point "{point["name"]}"' in " ".join(recoveries["restore_point"]["log"])
    assert {(t["schema"], t["name"]) for t in report["tables"]} == {("postgres:public", "payments"),
                                                                    ("postgres:public", "ledger")}
    assert all(t["matches"] for t in report["tables"])

    # The random point: drawn between the base backup's consistency point and the newest stored record, and reached.
    drawn = details["random_point"]
    import random

    assert drawn["lsn"] == _lsn_text(random.Random(drawn["seed"]).randint(_lsn(drawn["low"]), _lsn(drawn["high"])))
    assert recoveries["random"]["target_lsn"] == drawn["lsn"]
    assert _lsn(recoveries["random"]["replayed_to_lsn"]) >= _lsn(drawn["lsn"])
    assert "recovery stopping" in " ".join(recoveries["random"]["log"])

    # The newest point: nothing the server had written when the test began was lost.
    assert details["rpo_seconds"] == 0.0 and recoveries["newest"]["rpo_seconds"] == 0.0
    from datetime import datetime

    restored_commit = datetime.fromisoformat(recoveries["newest"]["newest_commit"])
    assert restored_commit >= datetime.fromisoformat(details["newest_stored_commit"])
    assert report["rto_seconds"] == max(r["rto_seconds"] for r in recoveries.values())


def _lsn(text: str) -> int:
    high, low = text.split("/")
    return int(high, 16) << 32 | int(low, 16)


def _lsn_text(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def test_a_fact_that_does_not_hold_at_the_restore_point_fails_the_restore_test_naming_it(
        streamed_server: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The facts recorded on the server changed (one row more than it had): the recovery to the restore point is
    refused, naming the table; the other recoveries pass."""
    from regal_dagster.engine.catalog import newest_first
    from regal_dagster.engine.crypto import load_keyring
    from regal_dagster.engine.policy import load_policy
    from regal_dagster.engine.restore_test import run_restore_test
    from regal_dagster.engine.sources.postgres_cluster import recovery_test as cluster_restore_test
    from regal_dagster.engine.storage import open_repository

    real = cluster_restore_test.create_restore_point

    def tampered(dsn: str, name: str) -> Any:
        point = real(dsn, name)
        assert point.facts is not None, point.note
        point.facts["postgres"]["sample"]["public.ledger"]["rows"] += 1
        return point

    monkeypatch.setattr(cluster_restore_test, "create_restore_point", tampered)
    policy = load_policy(streamed_server["policy"])
    repo, keyring = open_repository(policy), load_keyring(policy)
    manifest = next(newest_first(repo, keyring, "cluster"))
    result = run_restore_test(policy, repo, keyring, manifest, work_dir=streamed_server["base"])
    assert not result.validation_passed
    assert len(result.problems) == 1, result.problems
    assert "restore point 'regal_restore_test_" in result.problems[0]
    assert "table public.ledger restored with 21 row(s)" in result.problems[0] and "had 22" in result.problems[0]
    by_point = {r["point"]: r["problems"] for r in result.details["recoveries"]}
    assert by_point["newest"] == [] and by_point["random"] == []
    assert [(t["name"], t["matches"]) for t in sorted(result.tables, key=lambda t: t["name"])] == [
        ("ledger", False), ("payments", True)]

    from regal_dagster.defs.restore_tests.assets import restore_test_metadata

    metadata = restore_test_metadata(result)
    shown = {r.data["point"]: r.data for r in metadata["recoveries"].value.records}
    assert list(shown) == ["newest", "random", "restore_point"]
    assert not shown["restore_point"]["passed"] and shown["restore_point"]["facts_checked"] == 3
    assert shown["newest"]["passed"] and shown["newest"]["rto_seconds"] > 0
    assert metadata["restore_point"].value["name"].startswith("regal_restore_test_")
    assert metadata["rpo_seconds"].value == 0.0

    from regal_dagster.engine.restore_test import recovery_evidence

    evidence = recovery_evidence(result.details)  # the audit event's, so the compliance report's
    assert [(r["point"], r["passed"]) for r in evidence["recoveries"]] == [
        ("newest", True), ("random", True), ("restore_point", False)]
    assert evidence["restore_point_facts"] and evidence["rpo_seconds"] == 0.0


def test_a_drill_recovers_the_cluster_without_touching_the_server(streamed_server: dict[str, Any]) -> None:
    """The drill reads only the repository: the newest point and a random one, no restore point; its RPO is the
    age of the newest restored commit at the simulated loss."""
    from datetime import datetime

    before = _sql(streamed_server["dsn"], "SELECT pg_current_wal_lsn()::text")[0][0]
    done = cli(streamed_server["policy"], "drill", "--json")
    record = json.loads(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    [entry] = record["targets"]
    assert entry["recovered"] and [r["point"] for r in entry["restored"]["recoveries"]] == ["newest", "random"]
    newest_data = datetime.fromisoformat(entry["restored"]["newest_data_at"])
    assert entry["rpo_seconds"] == max(0.0, (datetime.fromisoformat(record["loss_at"]) - newest_data).total_seconds())
    _sql(streamed_server["dsn"], "SELECT pg_create_restore_point('after_the_drill')")
    data = streamed_server["base"] / "pgdata"
    _wait_for(lambda: _restore_points_since(data, before), "the WAL writer to write the restore point")
    assert _restore_points_since(data, before) == ["after_the_drill"]  # and none by the drill, earlier


def _restore_points_since(data: Path, lsn: str) -> list[str]:
    import re
    import subprocess

    from regal_dagster.engine.postgresql.tools import pg_tool_for_server

    tool = pg_tool_for_server("pg_waldump", 18)
    done = subprocess.run([str(tool.path), "--path", str(data / "pg_wal"), "--start", lsn, "--rmgr", "XLOG"],
                          capture_output=True, text=True, check=False)
    return re.findall(r"desc: RESTORE_POINT (\S+)", done.stdout)


def test_a_restore_point_needs_the_right_to_create_it_and_facts_only_cover_readable_tables(
        streamed_server: dict[str, Any]) -> None:
    from regal_dagster.engine.sources.postgres_cluster.pointfacts import create_restore_point

    dsn = streamed_server["dsn"]
    _sql(dsn, "CREATE ROLE clerk LOGIN")
    clerk = dsn.replace("postgres@", "clerk@")
    refused = create_restore_point(clerk, "by_the_clerk")
    assert refused.lsn is None and refused.facts is None
    assert refused.note.startswith("no restore point: permission denied for function pg_create_restore_point")
    _sql(dsn, "GRANT EXECUTE ON FUNCTION pg_create_restore_point(text) TO clerk")
    _sql(dsn, "GRANT SELECT ON ledger TO clerk")
    point = create_restore_point(clerk, "by_the_clerk")
    assert point.lsn is not None and point.facts is not None, point.note
    assert point.facts["postgres"]["tables"] == 2 and list(point.facts["postgres"]["sample"]) == ["public.ledger"]


def test_wal_status_shows_the_commit_time_of_the_last_stored_commit(streamed_server: dict[str, Any]) -> None:
    """The newest commit of the stored WAL is the server's last commit: its commit timestamp (track_commit_timestamp)
    is the COMMIT record's own, so they are equal to the microsecond."""
    dsn = streamed_server["dsn"]
    _sql(dsn, "INSERT INTO ledger VALUES (99, 0, 'the last commit')")
    committed, lsn = _sql(dsn, "SELECT pg_xact_commit_timestamp(xmin), pg_current_wal_lsn()::text FROM ledger "
                               "WHERE id = 99")[0]
    policy = streamed_server["policy"]

    def stored() -> bool:
        newest = json.loads(_ok(cli(policy, "wal", "status", "--json")).stdout)["newest_lsn"]
        return _lsn(newest) >= _lsn(lsn)

    _wait_for(stored, "the last commit to be stored")
    status = json.loads(_ok(cli(policy, "wal", "status", "--json")).stdout)
    from datetime import datetime

    assert datetime.fromisoformat(status["newest_commit_at"]) == committed
    assert _lsn(status["newest_commit_lsn"]) < _lsn(lsn) <= _lsn(status["newest_record_lsn"]) + 1024
    text = _ok(cli(policy, "wal", "status")).stdout
    assert f"newest commit stored: {status['newest_commit_at']}" in text


def test_a_snapshot_replaced_while_it_is_read_is_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream replaces a segment's snapshot (object, then record) while `wal get` reads it: the record read first
    no longer matches the bytes; the newer snapshot is read instead, authenticated. A snapshot that never matches is
    refused."""
    from regal_dagster.engine.crypto import load_keyring
    from regal_dagster.engine.errors import IntegrityError
    from regal_dagster.engine.policy import load_policy
    from regal_dagster.engine.sources.postgres_cluster import wal
    from regal_dagster.engine.storage import open_repository

    made = json.loads(_run([*CLI, "init", str(tmp_path / "regal"), "--cluster-dsn", "postgresql://r@db/postgres",
                            "--no-audit", "--json"]).stdout)
    policy = load_policy(Path(made["policy"]))
    repo, keyring = open_repository(policy), load_keyring(policy)
    name = "000000010000000000000007"
    older, newer = tmp_path / "older", tmp_path / "newer"
    older.write_bytes(b"\x01" * 5000)
    newer.write_bytes(b"\x02" * 9000)
    wal.push_wal(policy, repo, keyring, "cluster", older, name=name, partial=True, segment_size=16 * 1024 * 1024)
    real, calls = wal.read_stream, []

    def stream_replaces_it_first(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[1].plaintext_size)
        if len(calls) == 1:
            wal.push_wal(policy, repo, keyring, "cluster", newer, name=name, partial=True,
                         segment_size=16 * 1024 * 1024)
        return real(*args, **kwargs)

    monkeypatch.setattr(wal, "read_stream", stream_replaces_it_first)
    fetched = wal.fetch_wal(repo, keyring, "cluster", name, tmp_path / name)
    assert calls == [5000, 9000] and fetched.record.plaintext_size == 9000
    assert (tmp_path / name).read_bytes()[:9000] == newer.read_bytes()

    def always_replaced(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[1].plaintext_size)
        raise IntegrityError("stored bytes differ from the manifest", "")

    monkeypatch.setattr(wal, "read_stream", always_replaced)
    calls.clear()
    with pytest.raises(IntegrityError):
        wal.fetch_wal(repo, keyring, "cluster", name, tmp_path / "again")
    assert len(calls) == wal.SNAPSHOT_READS and not (tmp_path / "again").exists()


def test_read_ahead_hands_on_every_chunk_in_order_raises_the_readers_error_and_stops_when_left() -> None:
    """pg_basebackup's output (and a stored object's authenticated bytes) is read by a thread of its own
    (pipeline.py read_ahead)."""
    import io
    import threading

    from regal_dagster.engine.pipeline import CHUNK, read_ahead

    data = bytes(range(256)) * (CHUNK // 256) * 5 + b"tail"
    assert b"".join(read_ahead(io.BytesIO(data), depth=2)) == data

    class Failing(io.RawIOBase):
        def __init__(self) -> None:
            self.reads = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            self.reads += 1
            if self.reads > 2:
                raise OSError("the pipe broke")
            buffer[:1] = b"x"
            return 1

    with pytest.raises(OSError, match="the pipe broke"):
        list(read_ahead(Failing()))  # type: ignore[arg-type]

    before = threading.active_count()
    chunks = read_ahead(io.BytesIO(data), depth=1)
    assert next(chunks) == data[:CHUNK]
    chunks.close()  # the consumer stops early: the reader, blocked on a full queue, ends
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before


def test_a_time_after_the_newest_stored_commit_is_refused_naming_the_newest_reachable_point(
        archived_server: dict[str, Any]) -> None:
    """PostgreSQL would recover to the end of the stored WAL without reaching the time, and refuse to start: the
    restore refuses first, writing nothing, and names the newest commit (the latest time it can reach)."""
    policy = archived_server["policy"]
    status = json.loads(_ok(cli(policy, "wal", "status", "cluster", "--json")).stdout)
    newest_commit = datetime.fromisoformat(status["newest_commit_at"])
    target = archived_server["base"] / "too-late"
    for later in (newest_commit + timedelta(seconds=1), datetime.now(UTC) + timedelta(days=1)):
        done = cli(policy, "restore", "cluster", "--to-dir", str(target), "--to-time", later.isoformat())
        assert done.returncode == 2, done.stderr
        assert f"its newest commit is at {newest_commit.isoformat()}" in done.stderr, done.stderr
        assert "Nothing was written" in done.stderr and not target.exists()
    preview = json.loads(_ok(cli(policy, "restore", "cluster", "--to-dir", str(target), "--to-time",
                                 newest_commit.isoformat(), "--preview", "--json")).stdout)
    assert preview["base_backup"] == archived_server["second"]  # the newest commit itself is reachable
