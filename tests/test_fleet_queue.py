"""The run queue of a fleet, with a real `dagster-daemon`: the shipped instance configuration (SQLite storage here,
the rest as docs/dagster-fleet.yaml renders it) lets one run at a time reach a database server, whatever the queue
holds, and the runs it launches are the schedule's own requests (one per target, tagged by defs/fleet.py)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.definitions.selector import JobSubsetSelector
from dagster._core.instance.config import dagster_instance_config
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget

from regal_dagster.defs import BACKUP_JOB, build_definitions
from regal_dagster.defs.instance import render
from regal_dagster.engine.fleet import FleetConfig
from regal_dagster.engine.policy import load_policy

from .conftest import DatabaseFactory, wait_for, write_policy_file

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_instance_configuration_is_the_rendered_one_and_dagster_accepts_it(tmp_path: Path) -> None:
    shipped = (ROOT / "docs" / "dagster-fleet.yaml").read_text()
    assert shipped == render(FleetConfig()), "docs/dagster-fleet.yaml is stale: render it again (its header says how)"
    (tmp_path / "dagster.yaml").write_text(render(FleetConfig(max_backups_per_host=3)))
    config, _ = dagster_instance_config(str(tmp_path))
    host_limit, target_limit = config["concurrency"]["runs"]["tag_concurrency_limits"]
    assert host_limit == {"key": "regal/host", "value": {"applyLimitPerUniqueValue": True}, "limit": 3}
    assert target_limit["key"] == "regal/target" and target_limit["limit"] == 1
    assert config["run_monitoring"]["enabled"] and config["run_monitoring"]["free_slots_after_run_end_seconds"] > 0


def _enqueue(instance: dg.DagsterInstance, workspace: WorkspaceProcessContext, request: dg.RunRequest) -> str:
    """A schedule's run request queued as the daemon's scheduler would (the coordinator decides when it starts)."""
    context = workspace.create_request_context()
    location = context.get_code_location("regal_dagster")
    (repository,) = location.get_repositories().values()
    remote_job = location.get_job(JobSubsetSelector(location_name=location.name, repository_name=repository.name,
                                                    job_name=BACKUP_JOB, op_selection=None,
                                                    asset_selection=request.asset_selection,
                                                    asset_check_selection=request.asset_check_keys))
    plan = location.get_execution_plan(remote_job, {}, step_keys_to_execute=None, known_state=None,
                                       instance=instance).execution_plan_snapshot
    run = instance.create_run(
        job_name=BACKUP_JOB, run_id=None, run_config={}, resolved_op_selection=None,
        step_keys_to_execute=plan.step_keys_to_execute, op_selection=None, status=None, root_run_id=None,
        parent_run_id=None, tags={**remote_job.tags, **request.tags}, job_snapshot=remote_job.job_snapshot,
        execution_plan_snapshot=plan, parent_job_snapshot=remote_job.parent_job_snapshot,
        remote_job_origin=remote_job.get_remote_origin(), job_code_origin=remote_job.get_python_origin(),
        asset_selection=frozenset(request.asset_selection or []),
        asset_check_selection=frozenset(request.asset_check_keys or []),
        asset_graph=repository.asset_graph)
    instance.submit_run(run.run_id, context)
    return run.run_id


def test_two_runs_for_one_database_server_never_overlap_under_a_real_daemon(
        system_pg: DatabaseFactory, tmp_path: Path, master_key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    targets = {name: system_pg.create() for name in ("till_a", "till_b")}  # one server, two databases
    policy_file = write_policy_file(tmp_path, targets)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(render(load_policy(policy_file).fleet, storage="sqlite"))
    env = {**os.environ, "DAGSTER_HOME": str(home), "REGAL_POLICY": str(policy_file), "PYTHONPATH": str(ROOT)}
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("REGAL_POLICY", str(policy_file))
    tick = datetime(2026, 11, 24, 3, tzinfo=UTC)
    requests = build_definitions(str(policy_file)).resolve_schedule_def("hourly_backups").evaluate_tick(
        dg.build_schedule_context(scheduled_execution_time=tick)).run_requests or []
    assert len({r.tags["regal/host"] for r in requests}) == 1 and len(requests) == 2

    daemon_bin = shutil.which("dagster-daemon", path=str(Path(sys.executable).parent))
    assert daemon_bin
    daemon = subprocess.Popen([daemon_bin, "run", "-w", str(ROOT / "workspace.yaml")], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "daemon.log", "wb"),  # noqa: SIM115
                              start_new_session=True)
    started = time.monotonic()
    try:
        # the runs are made in this process (no code server of its own), as the daemon's code location would
        code = tmp_path / "code_location.py"
        code.write_text("from regal_dagster.defs import build_definitions\n"
                        f"defs = build_definitions({str(policy_file)!r})\n")
        origin = InProcessCodeLocationOrigin(LoadableTargetOrigin(python_file=str(code), working_directory=str(ROOT)),
                                             location_name="regal_dagster")
        with dg.DagsterInstance.get() as instance, \
                WorkspaceProcessContext(instance, InProcessWorkspaceLoadTarget(origin)) as workspace:
            run_ids = [_enqueue(instance, workspace, request) for request in requests]
            records = wait_for(lambda: (found := instance.get_run_records(dg.RunsFilter(run_ids=run_ids))) and all(
                r.dagster_run.is_finished for r in found) and found, "both backup runs to finish", seconds=90,
                interval=0.5)
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()
    log = (tmp_path / "daemon.log").read_text(errors="replace")[-3000:]
    assert all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in records), log
    first, second = sorted(records, key=lambda r: r.start_time or 0)
    assert first.end_time is not None and second.start_time is not None
    assert first.end_time <= second.start_time, "two runs of one server overlapped: the per-host limit did not hold"
    assert {r.dagster_run.tags["regal/target"] for r in records} == set(targets)
    print(f"two queued backups of one server ran one after the other in {time.monotonic() - started:.1f} s")
    assert yaml.safe_load((home / "dagster.yaml").read_text())["concurrency"]["runs"]["tag_concurrency_limits"]
