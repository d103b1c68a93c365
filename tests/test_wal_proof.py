"""WAL proved once stays proved: the daily verification reads proved segments again (a share each run, all with
`verify --all-wal`), every segment's object must be there, and the newest proved position (sealed state and audit
trail) makes a stored WAL that ends earlier a ROLLBACK for `wal status`, `verify` and a restore. A real PostgreSQL 18
server streams its WAL (`wal stream`) into a real repository with an audit trail."""

from __future__ import annotations

import json
import math
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from regal_dagster.engine.postgresql.server import ScratchCluster

from .test_pitr import CLI, _ok, _run, _sql, _start_stream, _stored, _wait_for, cli

TARGET = "cluster"


def _wal_dir(policy: Path) -> Path:
    return policy.parent / "repository" / "wal" / TARGET


def _segments(policy: Path) -> list[str]:
    return sorted(p.name for p in _wal_dir(policy).iterdir() if len(p.name) == 24)


def _lsn(text: str) -> int:
    high, low = text.split("/")
    return int(high, 16) << 32 | int(low, 16)


def _status(policy: Path) -> tuple[int, dict[str, Any]]:
    done = cli(policy, "wal", "status", TARGET, "--json")
    return done.returncode, json.loads(done.stdout)


def _stored_up_to(policy: Path, lsn: str) -> bool:
    status = _status(policy)[1]
    return status["newest_lsn"] is not None and _lsn(status["newest_lsn"]) >= _lsn(lsn)


def _snapshot_files(policy: Path) -> dict[str, bytes]:
    partial = _wal_dir(policy) / "partial"
    return {p.name: p.read_bytes() for p in partial.iterdir()}


def _put_back(directory: Path, files: dict[str, bytes]) -> None:
    for child in list(directory.iterdir()):
        child.unlink()
    for name, data in files.items():
        (directory / name).write_bytes(data)


def _cleared(policy: Path) -> None:
    """The WAL put back: `wal status` still names what the last verification found (every point past it is
    unrecoverable until WAL continuity is proved again); the next verification proves it, and all is clear."""
    code, status = _status(policy)
    assert code == 3 and status["recoverability"]["unrecoverable"], status
    code, checks = _verify(policy)
    assert code == 0 and checks["wal_continuity"]["passed"], checks
    code, status = _status(policy)
    assert code == 0 and status["recoverability"]["unrecoverable"] is None, status


def _verify(policy: Path, *more: str) -> tuple[int, dict[str, Any]]:
    done = cli(policy, "verify", "--latest", "--target", TARGET, "--json", *more)
    verified = json.loads(done.stdout)["verified"][0]
    return done.returncode, {c["name"]: c for c in verified["checks"]}


def _reread(policy: Path) -> list[str]:
    """The segments the last verification read again (its check record, authenticated)."""
    from regal_dagster.engine.catalog import newest_first
    from regal_dagster.engine.checks import check_status
    from regal_dagster.engine.crypto import load_keyring
    from regal_dagster.engine.policy import load_policy
    from regal_dagster.engine.storage import open_repository

    loaded = load_policy(policy)
    repo, keyring = open_repository(loaded), load_keyring(loaded)
    manifest = next(newest_first(repo, keyring, TARGET))
    record = check_status(repo, keyring, manifest).record
    assert record is not None
    outcome = record.outcome("wal_continuity")
    assert outcome is not None and outcome.passed, outcome
    return list(outcome.metadata["reread"])


@pytest.fixture(scope="module")
def proved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A server whose WAL `wal stream` stored (a base backup, eight segments closed after it, a snapshot of the
    segment being received), proved by `verify` twice: once with an older snapshot (kept aside with the continuity
    state of then), once with the newer one. The policy keeps an audit trail (on the server itself)."""
    base = tmp_path_factory.mktemp("walproof")
    server = ScratchCluster.persistent(base / "pgdata").start()
    stream = None
    try:
        dsn = server.dsn()
        made = json.loads(_run([*CLI, "init", str(base / "regal"), "--cluster-dsn", dsn, "--json"]).stdout)
        policy = Path(made["policy"])
        assert made["audit"], made
        stream = _start_stream(policy, base / "stream.log")
        _sql(dsn, "CREATE TABLE payments (id int PRIMARY KEY, note text)")
        _sql(dsn, "INSERT INTO payments VALUES (1, 'before the base backup')")
        backup_id = json.loads(_ok(cli(policy, "backup", TARGET, "--json")).stdout)["backup_id"]
        for i in range(2, 10):
            _sql(dsn, "INSERT INTO payments VALUES (%s, 'in a closed segment')", (i,))
            closed = _sql(dsn, "SELECT pg_walfile_name(pg_switch_wal())")[0][0]
            _wait_for(lambda closed=closed: _stored(policy, closed), f"{closed} to be stored")
        _sql(dsn, "INSERT INTO payments VALUES (100, 'in the older snapshot')")
        lsn = _sql(dsn, "SELECT pg_current_wal_lsn()::text")[0][0]
        _wait_for(lambda: _stored_up_to(policy, lsn), "a snapshot holding row 100")
        stream.send_signal(signal.SIGTERM)  # a still repository while the older snapshot is proved
        assert stream.wait(timeout=30) == 0
        code, checks = _verify(policy)
        assert code == 0 and checks["wal_continuity"]["passed"], checks
        older = _snapshot_files(policy)
        older_state = (_wal_dir(policy) / "continuity" / "state").read_bytes()
        stream = _start_stream(policy, base / "stream.log")
        _sql(dsn, "INSERT INTO payments VALUES (101, 'only in the newer snapshot')")
        lsn = _sql(dsn, "SELECT pg_current_wal_lsn()::text")[0][0]
        _wait_for(lambda: _stored_up_to(policy, lsn), "a snapshot holding row 101")
        stream.send_signal(signal.SIGTERM)
        assert stream.wait(timeout=30) == 0
        stream = None
        code, checks = _verify(policy)
        assert code == 0 and checks["wal_continuity"]["passed"], checks
        assert _snapshot_files(policy) != older
        yield {"policy": policy, "base": base, "dsn": dsn, "backup_id": backup_id, "older_snapshot": older,
               "older_state": older_state}
    finally:
        if stream is not None and stream.poll() is None:
            stream.kill()
            stream.wait()
        server.stop()


def _flip(path: Path) -> bytes:
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0x01
    path.write_bytes(bytes(damaged))
    return original


def test_a_byte_flipped_in_a_proved_segment_is_found_by_reading_all_the_wal_again(proved: dict[str, Any]) -> None:
    policy = proved["policy"]
    victim = _segments(policy)[-4]
    original = _flip(_wal_dir(policy) / victim)
    try:
        code, checks = _verify(policy, "--all-wal")
        found = checks["wal_continuity"]
        assert code == 3 and not found["passed"], checks
        assert found["failing_object"] == victim
        assert f"WAL segment {victim} (timeline 1" in found["description"]
        assert proved["backup_id"] in found["description"] and "fails authentication" in found["description"]
    finally:
        (_wal_dir(policy) / victim).write_bytes(original)
    code, checks = _verify(policy, "--all-wal")
    assert code == 0 and checks["wal_continuity"]["passed"]
    assert victim in _reread(policy) and _segments(policy)[-1] in _reread(policy)


def test_the_daily_verification_rereads_a_rotating_share_and_finds_a_flipped_byte_within_a_week(
        proved: dict[str, Any]) -> None:
    """Each run reads again the proved segments read longest ago, at least 1/7 of them: consecutive runs read
    different segments, and a byte flipped in any of them is found within seven runs, naming it."""
    policy = proved["policy"]
    _ok(cli(policy, "verify", "--latest", "--all-wal"))  # every segment read now: the rotation starts afresh
    proved_segments = set(_reread(policy))
    share = math.ceil(len(proved_segments) / 7)
    victim = sorted(proved_segments)[-2]  # read late in the rotation (the oldest-read first, then the lowest)
    original = _flip(_wal_dir(policy) / victim)
    try:
        seen: list[list[str]] = []
        for _run_number in range(7):
            code, checks = _verify(policy)
            if not checks["wal_continuity"]["passed"]:
                break
            assert code == 0
            seen.append(_reread(policy))
        else:
            pytest.fail(f"seven daily verifications did not find the byte flipped in {victim}")
        assert code == 3 and checks["wal_continuity"]["failing_object"] == victim
        assert all(len(run) >= share for run in seen) and len(seen) >= 1
        flat = [name for run in seen for name in run]
        assert len(flat) == len(set(flat)), seen  # a rotation: no segment read twice before all were read
        assert victim not in flat and set(flat) | {victim} <= proved_segments
    finally:
        (_wal_dir(policy) / victim).write_bytes(original)


def test_a_deleted_segment_object_is_found_by_the_next_verification_and_wal_status(proved: dict[str, Any]) -> None:
    policy = proved["policy"]
    victim = _segments(policy)[-3]
    original = (_wal_dir(policy) / victim).read_bytes()
    (_wal_dir(policy) / victim).unlink()  # its record stays: the listing of records shows no gap
    try:
        code, status = _status(policy)
        assert code == 3 and victim in status["gaps"], status
        code, checks = _verify(policy)
        found = checks["wal_continuity"]
        assert code == 3 and found["failing_object"] == victim and "is missing" in found["description"], found
    finally:
        (_wal_dir(policy) / victim).write_bytes(original)
    _cleared(policy)


def test_deleting_the_newest_segments_and_the_snapshot_is_a_rollback_named_everywhere(proved: dict[str, Any]) -> None:
    policy, base = proved["policy"], proved["base"]
    wal_dir = _wal_dir(policy)
    newest = _segments(policy)[-2:]
    kept = {name: (wal_dir / name).read_bytes() for n in newest for name in (n, n + ".json")}
    snapshot = _snapshot_files(policy)
    for name in kept:
        (wal_dir / name).unlink()
    _put_back(wal_dir / "partial", {})
    try:
        code, status = _status(policy)
        assert code == 3 and status["gaps"] == [], status
        rollback = status["rollback"]
        assert rollback.startswith("ROLLBACK") and f"{newest[0]} to {newest[1]} deleted" in rollback, rollback
        assert "the snapshot of" in rollback and "the audit trail" in rollback
        code, checks = _verify(policy)
        assert code == 3 and checks["wal_continuity"]["description"].startswith("ROLLBACK"), checks
        target = base / "rolled-back"
        done = cli(policy, "restore", TARGET, "--to-dir", str(target), "--latest", "--with-wal")
        assert done.returncode == 3 and "ROLLBACK" in done.stderr and newest[0] in done.stderr, done.stderr
        assert "nothing was written" in done.stderr and not target.exists()
    finally:
        for name, data in kept.items():
            (wal_dir / name).write_bytes(data)
        _put_back(wal_dir / "partial", snapshot)
    _cleared(policy)


def test_an_older_snapshot_put_back_is_a_rollback_even_with_the_older_continuity_state(
        proved: dict[str, Any]) -> None:
    """The older snapshot's record and object put back: a rollback. The older (genuine, sealed) continuity state put
    back with it still is: the audit trail's verification event recorded the newer position."""
    policy, base = proved["policy"], proved["base"]
    wal_dir = _wal_dir(policy)
    newer, state = _snapshot_files(policy), (wal_dir / "continuity" / "state").read_bytes()
    _put_back(wal_dir / "partial", proved["older_snapshot"])
    try:
        code, status = _status(policy)
        assert code == 3 and "is an older one" in status["rollback"], status
        assert "the sealed continuity state and the audit trail" in status["rollback"]
        (wal_dir / "continuity" / "state").write_bytes(proved["older_state"])
        code, status = _status(policy)
        assert code == 3 and "is an older one" in status["rollback"], status
        assert "(recorded in the audit trail)" in status["rollback"]
        done = cli(policy, "restore", TARGET, "--to-dir", str(base / "older"), "--latest", "--with-wal")
        assert done.returncode == 3 and "is an older one" in done.stderr and not (base / "older").exists()
        code, checks = _verify(policy)
        assert code == 3 and "is an older one" in checks["wal_continuity"]["description"]
    finally:
        _put_back(wal_dir / "partial", newer)
        (wal_dir / "continuity" / "state").write_bytes(state)
    _cleared(policy)


def test_a_wal_position_beyond_the_stored_wal_is_refused_naming_the_newest_reachable_point(
        proved: dict[str, Any]) -> None:
    policy, base = proved["policy"], proved["base"]
    code, status = _status(policy)
    assert code == 0 and status["rollback"] is None
    record = status["newest_record_lsn"]
    target = base / "too-far"
    for beyond in (f"{_lsn(record) + 1 >> 32:X}/{_lsn(record) + 1 & 0xFFFFFFFF:X}", "FF/0"):
        done = cli(policy, "restore", TARGET, "--to-dir", str(target), "--to-lsn", beyond, "--preview")
        assert done.returncode == 2, done.stderr
        assert f"its newest record starts at {record}" in done.stderr and status["newest_commit_at"] in done.stderr
        assert "Nothing was written" in done.stderr and f"--to-lsn {record}" in done.stderr and not target.exists()
    preview = json.loads(_ok(cli(policy, "restore", TARGET, "--to-dir", str(target), "--to-lsn", record,
                                 "--preview", "--json")).stdout)
    assert preview["base_backup"] == proved["backup_id"]
    shutil.rmtree(target, ignore_errors=True)


def test_the_daily_verification_reads_all_the_wal_again_on_sundays(proved: dict[str, Any]) -> None:
    from datetime import UTC, datetime

    import dagster as dg

    from regal_dagster.defs import build_definitions
    from regal_dagster.defs.backups.checks import WAL_REREAD_TAG

    verification = build_definitions(str(proved["policy"])).resolve_schedule_def("daily_verification")
    for day, tags in ((datetime(2026, 3, 1, 3, 30, tzinfo=UTC), {WAL_REREAD_TAG: "all"}),  # a Sunday
                      (datetime(2026, 3, 2, 3, 30, tzinfo=UTC), {})):
        requests = verification.evaluate_tick(dg.build_schedule_context(scheduled_execution_time=day)).run_requests
        assert requests is not None and len(requests) == 1
        assert {k: v for k, v in requests[0].tags.items() if k == WAL_REREAD_TAG} == tags
