"""One recoverability model per target (engine/recoverability.py), read by every face: `status`, `list`, `show`,
`verify`, `wal status` and the metrics say the same thing about what can be recovered, to which point. Real
PostgreSQL servers (a PostgreSQL 18 server streaming its WAL, the machine's PostgreSQL 15 for a logical target), a
real repository, everything through the CLI."""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from regal_dagster.engine.postgresql.server import ScratchCluster

from .conftest import SYSTEM_PG, DatabaseFactory
from .test_pitr import CLI, _ok, _run, _sql, _start_stream, _stored, _wait_for, cli

TARGET = "cluster"
NOT_BEYOND = "not recoverable beyond its end"


def _json(done: Any) -> Any:
    return json.loads(done.stdout)


def _metrics(policy: Path) -> dict[str, float]:
    """The textfile's samples by `name{labels}`."""
    path = policy.parent / "metrics.prom"
    _ok(cli(policy, "metrics", "--textfile", str(path)))
    samples = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def _wal_dir(policy: Path) -> Path:
    return policy.parent / "repository" / "wal" / TARGET


def test_a_base_backup_without_any_wal_archive_is_not_recoverable_beyond_its_end_everywhere(tmp_path: Path) -> None:
    server = ScratchCluster.persistent(tmp_path / "pgdata").start()
    try:
        done = _ok(cli(tmp_path / "unused.yaml", "init", str(tmp_path / "regal"), "--cluster-dsn", server.dsn(),
                       "--no-audit", "--json"))
        made = _json(done)
        policy = Path(made["policy"])
        assert f"wal stream {TARGET}" in made["next_step"] and "as a service" in made["next_step"], made
        assert made["next_step"].index(f"wal stream {TARGET}") < made["next_step"].index(f" backup {TARGET}"), made
        started = time.monotonic()
        backup = cli(policy, "backup", TARGET, "--json")  # nothing stores the WAL: no stream, no archive_command
        assert time.monotonic() - started < 50, "waited the whole archive timeout although nothing feeds the archive"
        assert backup.returncode == 3, backup.stderr
        backup_id = _json(backup)["backup_id"]
        assert NOT_BEYOND in backup.stderr and f"wal stream {TARGET}" in backup.stderr, backup.stderr

        status = cli(policy, "status", "--json")
        assert status.returncode == 3
        model = _json(status)["targets"][0]["recoverability"]
        assert model["point"] is None and NOT_BEYOND in model["summary"], model
        assert NOT_BEYOND in cli(policy, "status").stdout

        listed = cli(policy, "list", "--json")
        row = next(r for r in _json(listed)["backups"] if r["backup_id"] == backup_id)
        assert row["status"] == "good" and not row["recovery"]["recoverable"], row
        assert NOT_BEYOND in row["recovery"]["note"]
        assert NOT_BEYOND in cli(policy, "list").stdout

        show = cli(policy, "show", backup_id, "--json")
        assert not _json(show)["recovery"]["recoverable"] and NOT_BEYOND in _json(show)["recovery"]["note"]
        assert NOT_BEYOND in cli(policy, "show", backup_id).stdout

        metrics = _metrics(policy)
        assert metrics[f'regal_backup_recoverable{{target="{TARGET}"}}'] == 0
        assert f'regal_backup_recoverable_until_timestamp_seconds{{target="{TARGET}"}}' not in metrics
        assert metrics[f'regal_backup_rpo_age_seconds{{target="{TARGET}"}}'] == float("inf")
        assert metrics[f'regal_backup_wal_stream_up{{target="{TARGET}"}}'] == 0

        import dagster as dg

        from regal_dagster.defs import build_definitions

        defs = build_definitions(str(policy))  # Dagster: the base backup's asset says what status says
        instance = dg.DagsterInstance.ephemeral()
        _tick(defs, instance, "backups_outside_dagster", None)
        shown = _observed(instance, dg.AssetKey(["postgres", TARGET, "base_backup"]))
        assert shown["newest_good_backup"] == "none" and NOT_BEYOND in shown["recoverable_to"], shown
    finally:
        server.stop()


@pytest.fixture(scope="module")
def streamed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A policy with a logical target (a database on the machine's PostgreSQL 15) and a cluster target (a
    PostgreSQL 18 server whose WAL `wal stream` stored), each with a good backup; four segments closed after the
    base backup, stored; the stream stopped (a still repository)."""
    base = tmp_path_factory.mktemp("model")
    databases = DatabaseFactory(SYSTEM_PG)
    logical = databases.create("regal_model")
    with psycopg.connect(logical, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY); INSERT INTO orders VALUES (1), (2)")
    server = ScratchCluster.persistent(base / "pgdata").start()
    stream = None
    try:
        dsn = server.dsn()
        made = _json(_run([*CLI, "init", str(base / "regal"), "--postgres-dsn", logical, "--cluster-dsn", dsn,
                           "--no-audit", "--json"]))
        policy = Path(made["policy"])
        stream = _start_stream(policy, base / "stream.log")
        _sql(dsn, "CREATE TABLE payments (id int PRIMARY KEY)")
        cluster_backup = _json(_ok(cli(policy, "backup", TARGET, "--json")))["backup_id"]
        main_backup = _json(_ok(cli(policy, "backup", "main", "--json")))["backup_id"]
        closed = []
        for i in range(4):
            _sql(dsn, "INSERT INTO payments VALUES (%s)", (i,))
            closed.append(_sql(dsn, "SELECT pg_walfile_name(pg_switch_wal())")[0][0])
            _wait_for(lambda name=closed[-1]: _stored(policy, name), f"{closed[-1]} to be stored")
        stream.send_signal(signal.SIGTERM)
        assert stream.wait(timeout=30) == 0
        stream = None
        yield {"policy": policy, "cluster_backup": cluster_backup, "main_backup": main_backup, "closed": closed}
    finally:
        if stream is not None and stream.poll() is None:
            stream.kill()
            stream.wait()
        server.stop()
        databases.drop_all()


def _timestamp(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def _lsn_number(text: str) -> int:
    high, low = text.split("/")
    return int(high, 16) << 32 | int(low, 16)


def test_status_list_wal_status_and_metrics_agree_on_the_newest_recoverable_point(streamed: dict[str, Any]) -> None:
    policy = streamed["policy"]
    status = _json(_ok(cli(policy, "status", "--json")))
    by_status = {t["target"]: t["recoverability"]["point"] for t in status["targets"]}
    by_list = {name: model["point"] for name, model in _json(_ok(cli(policy, "list", "--json")))
               ["recoverability"].items()}
    by_wal_status = {TARGET: _json(_ok(cli(policy, "wal", "status", TARGET, "--json")))["recoverability"]["point"]}
    metrics = _metrics(policy)
    by_metrics = {name: metrics.get(f'regal_backup_recoverable_until_timestamp_seconds{{target="{name}"}}')
                  for name in ("main", TARGET)}
    stored_lsn = metrics[f'regal_backup_wal_newest_stored_lsn{{target="{TARGET}"}}']

    def faces(name: str) -> list[tuple[str, str | None]]:
        return [(p["backup_id"], p["position"]) for p in
                (by_status[name], by_list[name], *([by_wal_status[name]] if name in by_wal_status else []))]

    # one assertion over the faces: the same backup and position everywhere, the same time (a point at the
    # archive's caught-up end is "now": within the seconds between the readings), the metric's stored position
    at = {name: _timestamp(by_status[name]["at"]) for name in by_status}
    assert (faces("main") == [(streamed["main_backup"], None)] * 2
            and faces(TARGET) == [(streamed["cluster_backup"], by_status[TARGET]["position"])] * 3
            and _lsn_number(by_status[TARGET]["position"]) == stored_lsn
            and all(abs(by_metrics[name] - at[name]) < 30 for name in ("main", TARGET))
            and at["main"] == _timestamp(by_list["main"]["at"])), (by_status, by_list, by_wal_status, by_metrics)
    assert metrics[f'regal_backup_recoverable{{target="{TARGET}"}}'] == 1
    assert metrics[f'regal_backup_wal_gaps{{target="{TARGET}"}}'] == 0


def test_an_unreadable_wal_segment_makes_every_point_past_it_unrecoverable_on_every_face(
        streamed: dict[str, Any]) -> None:
    policy = streamed["policy"]
    victim = streamed["closed"][1]  # stored after the base backup's end, not proved yet
    path = _wal_dir(policy) / victim
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0x01
    path.write_bytes(bytes(damaged))
    try:
        verify = cli(policy, "verify", "--latest", "--target", TARGET, "--json")
        found = {c["name"]: c for c in _json(verify)["verified"][0]["checks"]}["wal_continuity"]
        assert verify.returncode == 3 and found["failing_object"] == victim, found
        assert _json(verify)["verified"][0]["unrecoverable_past"] == victim

        status = cli(policy, "status", "--json")
        target = next(t for t in _json(status)["targets"] if t["target"] == TARGET)
        assert status.returncode == 3 and victim in target["recoverability"]["unrecoverable"], target
        assert any(victim in line for line in _json(status)["unrecoverable"])
        assert f"UNRECOVERABLE     every point past {victim}" in cli(policy, "status").stdout
        point = target["recoverability"]["point"]
        assert point["backup_id"] == streamed["cluster_backup"]
        assert _lsn_number(point["position"]) == int(victim[8:16], 16) << 32 | int(victim[16:], 16) * 16 * 1024 ** 2

        listed = cli(policy, "list", "--json")
        row = next(r for r in _json(listed)["backups"] if r["backup_id"] == streamed["cluster_backup"])
        assert listed.returncode == 3 and f"NOT PAST WAL segment {victim}" in row["recovery"]["note"], row
        # the backup's row, its cluster line (type, parent, WAL, timeline), then the recovery note
        assert re.search(rf"{streamed['cluster_backup']}.*\n(.*\n)?.*NOT PAST WAL segment {victim}",
                         cli(policy, "list").stdout)

        wal = cli(policy, "wal", "status", TARGET)
        assert wal.returncode == 3 and f"UNRECOVERABLE: every point past {victim}" in wal.stdout, wal.stdout

        metrics = _metrics(policy)
        assert metrics[f'regal_backup_last_verification_success{{target="{TARGET}"}}'] == 0
        assert metrics[f'regal_backup_recoverable{{target="{TARGET}"}}'] == 0
        assert metrics[f'regal_backup_unrecoverable_past_info{{segment="{victim}",target="{TARGET}"}}'] == 1
        assert metrics[f'regal_backup_wal_gaps{{target="{TARGET}"}}'] == 1
        assert metrics['regal_backup_recoverable{target="main"}'] == 1  # the other target is untouched

        from regal_dagster.engine.compliance.evidence import recoverability_rows  # the report's table
        from regal_dagster.engine.crypto import load_keyring
        from regal_dagster.engine.policy import load_policy
        from regal_dagster.engine.storage import open_repository

        loaded = load_policy(policy)
        reported = {r["target"]: r for r in recoverability_rows(loaded, open_repository(loaded), load_keyring(loaded),
                                                                 datetime.now(UTC))}
        assert reported[TARGET]["unreadable"] == victim and victim in reported[TARGET]["unrecoverable"]
        assert reported["main"]["unrecoverable"] is None and reported["main"]["checks_passed"]
    finally:
        path.write_bytes(original)
    verify = cli(policy, "verify", "--latest", "--target", TARGET)  # the segment back: proved, all clear again
    assert verify.returncode == 0, verify.stdout
    assert _ok(cli(policy, "status")).returncode == 0
    assert _metrics(policy)[f'regal_backup_recoverable{{target="{TARGET}"}}'] == 1


def _tick(defs: Any, instance: Any, sensor: str, cursor: str | None) -> str | None:
    """One evaluation of a sensor, its runless events reported to the instance as the daemon does."""
    import dagster as dg

    context = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs, resources=defs.resources)
    result = defs.resolve_sensor_def(sensor)(context)
    assert isinstance(result, dg.SensorResult)
    for event in result.asset_events or []:
        instance.report_runless_asset_event(event)
    return result.cursor


def _observed(instance: Any, key: Any) -> dict[str, Any]:
    """The metadata of the asset's newest observation."""
    newest = instance.fetch_observations(key, limit=1).records[0].asset_observation
    assert newest is not None
    return {k: v.value for k, v in newest.metadata.items()}


def test_dagster_fails_wal_continuity_naming_an_unreadable_segment_and_says_nothing_past_it_is_recoverable(
        streamed: dict[str, Any]) -> None:
    """Through Dagster's own check run and through the mirror of a CLI verify: a failed `wal_continuity` evaluation
    naming the segment, and the assets' metadata (the recoverability model) unrecoverable past it."""
    import dagster as dg

    from regal_dagster.defs import build_definitions

    policy, victim = streamed["policy"], streamed["closed"][2]
    defs = build_definitions(str(policy))
    instance = dg.DagsterInstance.ephemeral()
    base, wal = dg.AssetKey(["postgres", TARGET, "base_backup"]), dg.AssetKey(["postgres", TARGET, "wal"])
    check = dg.AssetCheckKey(base, "wal_continuity")
    mirror = _tick(defs, instance, "backups_outside_dagster", None)  # the CLI's base backup shown on its asset
    watch = _tick(defs, instance, "wal_stream_watch", None)

    def evaluation() -> dg.AssetCheckEvaluation:
        found = instance.event_log_storage.get_latest_asset_check_execution_by_key([check])[check].evaluation
        assert found is not None
        return found

    path = _wal_dir(policy) / victim
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0x01
    path.write_bytes(bytes(damaged))
    past = f"every point past {victim} is unrecoverable"
    try:
        checks = {k for k in defs.resolve_job_def("verify_job").asset_layer.asset_graph.asset_check_keys
                  if k.asset_key == base}  # the base backup's checks, as the Sunday verification: all WAL read again
        run = defs.resolve_job_def("verify_job").get_subset(asset_check_selection=checks).execute_in_process(
            instance=instance, tags={"regal/wal_reread": "all"}, raise_on_error=False)
        assert run.success  # a failed non-blocking check does not fail the run
        found = evaluation()
        assert not found.passed and found.metadata["failing_object"].value == victim, found
        assert victim in (found.description or "") and past in str(found.metadata["unrecoverable"].value)
        assert found.metadata["newest_good_backup"].value == streamed["cluster_backup"]  # the point before the gap

        mirror = _tick(defs, instance, "backups_outside_dagster", mirror)  # the model's change, on the asset
        shown = _observed(instance, base)
        assert past in shown["unrecoverable"] and shown["newest_good_backup"] == streamed["cluster_backup"], shown
        _tick(defs, instance, "wal_stream_watch", watch)
        assert past in _observed(instance, wal)["unrecoverable"]

        verify = cli(policy, "verify", "--latest", "--target", TARGET, "--all-wal")  # the CLI finds it too
        assert verify.returncode == 3, verify.stdout
        _tick(defs, instance, "backups_outside_dagster", mirror)  # within one sensor interval
        mirrored = evaluation()
        assert not mirrored.passed and mirrored.metadata["failing_object"].value == victim
        assert "checked_outside_dagster" in mirrored.metadata
    finally:
        path.write_bytes(original)
    _ok(cli(policy, "verify", "--latest", "--target", TARGET, "--all-wal"))  # put back: proved again, all clear
