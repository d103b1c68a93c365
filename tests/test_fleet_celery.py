"""Past one machine: with `fleet.executor: celery` each target's backup step goes to the Celery queue of its zone
(`regal-<zone>`, dagster-celery over the RabbitMQ on 127.0.0.1:5672) and runs on that zone's worker, whose name
the backup's materialization carries. Two real workers, one per zone, and the run's process write to one Dagster
instance with PostgreSQL storage (dagster-postgres: concurrent writers are safe, SQLite's are not), and the step's
result comes back through the broker (the default result backend, rpc://)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dagster as dg
import kombu
import psycopg
import pytest
import yaml
from dagster._core.definitions.reconstruct import ReconstructableRepository

from regal_dagster.defs import BACKUP_JOB, build_definitions
from regal_dagster.defs.fleet import CELERY_QUEUE_TAG
from regal_dagster.defs.instance import render
from regal_dagster.engine.errors import PolicyError
from regal_dagster.engine.policy import load_policy

from .conftest import DatabaseFactory, wait_for, write_policy_file

ROOT = Path(__file__).resolve().parents[1]
RABBITMQ = ("127.0.0.1", 5672)


def _rabbitmq_up() -> None:
    try:
        socket.create_connection(RABBITMQ, timeout=3).close()
    except OSError as exc:
        pytest.fail(f"RabbitMQ is not reachable on {RABBITMQ[0]}:{RABBITMQ[1]} ({exc}): start it with "
                    "`rabbitmq-server -detached` (.ci/run does)")


def _worker(name: str, queue: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "regal_dagster.defs.celery_worker", "worker", "-Q", queue,
         "-n", f"{name}@%h", "--pool", "solo", "--without-gossip", "--without-mingle", "--without-heartbeat",
         "-l", "info"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "wb"),
        start_new_session=True)


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:  # all at once: a worker's warm shutdown takes seconds
        os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_each_targets_backup_runs_on_the_celery_worker_of_its_zone(
        system_pg: DatabaseFactory, tmp_path: Path, master_key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _rabbitmq_up()
    run = uuid.uuid4().hex[:8]  # zones (and so queues) of this test only: nothing left on the broker reaches it
    zones = {"till_eu": f"eu-{run}", "till_us": f"us-{run}"}
    policy_file = write_policy_file(tmp_path, {name: system_pg.create() for name in zones},
                                    fleet={"executor": "celery", "broker": "REGAL_TEST_BROKER"})  # rpc:// results
    document = yaml.safe_load(policy_file.read_text())
    for name, zone in zones.items():
        document["targets"][name]["zone"] = zone
    policy_file.write_text(yaml.safe_dump(document))
    home = tmp_path / "dagster_home"
    home.mkdir()
    # the fleet's dagster.yaml (PostgreSQL storage), on a fresh database of the machine's server: shared by the
    # run's process and both workers, as in production
    policy = load_policy(policy_file)
    assert policy.fleet.result_backend == "rpc://"  # the default: proved here
    (home / "dagster.yaml").write_text(render(policy.fleet, storage="postgres") + "telemetry:\n  enabled: false\n")
    server = psycopg.conninfo.conninfo_to_dict(system_pg.create("regal_dagster"))
    broker = "pyamqp://guest:guest@127.0.0.1:5672//"  # a password: only ever in the environment, by NAME
    for key, value in {"DAGSTER_HOME": str(home), "REGAL_POLICY": str(policy_file), "REGAL_TEST_BROKER": broker,
                       "DAGSTER_PG_HOST": str(server.get("host", "127.0.0.1")),
                       "DAGSTER_PG_PORT": str(server.get("port", 5432)), "DAGSTER_PG_USER": str(server["user"]),
                       "DAGSTER_PG_PASSWORD": str(server.get("password", "")),
                       "DAGSTER_PG_DB": str(server["dbname"])}.items():
        monkeypatch.setenv(key, value)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    started = time.monotonic()
    instance = dg.DagsterInstance.get()  # makes the storage's schema, before a worker opens the instance (its 1st step)
    workers = {zone: _worker(zone, f"regal-{zone}", env, tmp_path / f"{zone}.log") for zone in zones.values()}
    try:  # while the workers start
        defs = build_definitions(str(policy_file))
        job = defs.resolve_job_def(BACKUP_JOB)
        assert job.executor_def.name == "regal_celery"
        keys = {name: dg.AssetKey(["postgres", name, "backup"]) for name in zones}
        assert {name: defs.resolve_assets_def(key).op.tags.get(CELERY_QUEUE_TAG) for name, key in keys.items()} \
            == {name: f"regal-{zone}" for name, zone in zones.items()}
        for zone in zones.values():  # the worker declares its queue's binding: wait for it to be ready
            wait_for(lambda z=zone: "ready." in (tmp_path / f"{z}.log").read_text(errors="replace"),
                     f"the worker of zone {zone}", seconds=30, interval=0.2)
        recon = ReconstructableRepository.for_module("regal_dagster.definitions", "defs", str(ROOT)) \
            .get_reconstructable_job(BACKUP_JOB)
        # till_eu as a schedule's request: the backup, its checks left to verify_job; till_us as the UI's
        # "Materialize": the backup with its checks, whose step goes to the zone's queue too (else the run hangs)
        selections: dict[str, set[dg.AssetCheckKey] | None] = {"till_eu": set(), "till_us": None}
        results = {name: dg.execute_job(recon.get_subset(asset_selection={key}, asset_check_selection=selections[name]),
                                        instance, raise_on_error=False, tags={"regal/target": name})
                   for name, key in keys.items()}
        logs = "\n".join((tmp_path / f"{z}.log").read_text(errors="replace")[-1500:] for z in zones.values())
        assert all(r.success for r in results.values()), logs
        ran_on = {}
        for name, key in keys.items():
            event = instance.get_latest_materialization_event(key)
            assert event is not None and event.asset_materialization is not None
            ran_on[name] = event.asset_materialization.metadata["worker"].value
        records = {name: [e for e in instance.all_logs(r.run_id)] for name, r in results.items()}
    finally:
        _stop(list(workers.values()))
        instance.dispose()
        with kombu.Connection(broker) as connection:  # this run's durable queues and exchanges: none pile up
            for zone in zones.values():
                connection.default_channel.queue_delete(f"regal-{zone}")
                connection.default_channel.exchange_delete(f"regal-{zone}")
    checks = {name: [e.dagster_event.event_specific_data for e in events  # type: ignore[union-attr]
                     if e.dagster_event and e.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION"]
              for name, events in records.items()}
    assert not checks["till_eu"] and checks["till_us"] and all(c.passed for c in checks["till_us"]), checks
    run_logs = "\n".join(str(e.message) for events in records.values() for e in events)
    assert ran_on == {name: f"{zone}@{socket.gethostname()}" for name, zone in zones.items()}, ran_on
    assert broker not in run_logs and "guest:guest" not in run_logs
    print(f"two backups on two zone workers in {time.monotonic() - started:.1f} s: {ran_on}")


def test_a_broker_url_with_a_password_is_refused(tmp_path: Path, master_key: str) -> None:
    policy_file = write_policy_file(tmp_path, {"pos": "dbname=pos"}, initialize=False)
    document = yaml.safe_load(policy_file.read_text())
    document["fleet"] = {"executor": "celery", "broker": "pyamqp://ops:s3cret@mq:5672//"}
    policy_file.write_text(yaml.safe_dump(document))
    with pytest.raises(PolicyError, match="environment variable") as error:
        load_policy(policy_file)
    assert "s3cret" not in str(error.value)


def test_every_step_of_a_celery_backup_run_goes_to_its_zones_queue(tmp_path: Path, master_key: str) -> None:
    """No worker serves dagster-celery's default queue: a step without a zone's queue tag would hang its run. The
    UI's "Materialize" plans a backup's checks in the backup run too, so the check step carries the zone's queue."""
    targets = {"pos_eu": "eu", "pos_us": "us", "pos_dc": None}  # None: fleet.default_zone
    policy_file = write_policy_file(tmp_path, {name: f"dbname={name}" for name in targets}, initialize=False,
                                    fleet={"executor": "celery", "default_zone": "dc1"})
    document = yaml.safe_load(policy_file.read_text())
    for name, zone in targets.items():
        if zone:
            document["targets"][name]["zone"] = zone
    policy_file.write_text(yaml.safe_dump(document))
    job = build_definitions(str(policy_file)).resolve_job_def(BACKUP_JOB)
    queue = {name: f"regal-{zone or 'dc1'}" for name, zone in targets.items()}
    expected = {op: queue[name] for name in targets for op in (f"postgres__{name}__backup", f"{name}_backup_checks")}
    with_checks = job.get_subset(asset_selection={dg.AssetKey(["postgres", name, "backup"]) for name in targets})
    for planned in (job, with_checks):  # the schedules' runs (backups only), and the UI's (backups and checks)
        tags = {name: node.definition.tags.get(CELERY_QUEUE_TAG) for name, node in planned.graph.node_dict.items()}
        assert tags == {op: expected[op] for op in tags}, tags
    assert set(with_checks.graph.node_dict) == set(expected)
