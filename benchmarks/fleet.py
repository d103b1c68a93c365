"""A fleet under a real `dagster-daemon`: the shipped instance configuration (docs/dagster-fleet.yaml as
`python -m regal_dagster.defs.instance` renders it: PostgreSQL storage by dagster-postgres in a fresh database on
127.0.0.1:5432, the queued run coordinator with its per-server limit), N small `postgres` targets spread over 4
database servers (the machine's PostgreSQL 15 and 3 scratch PostgreSQL 18 servers, N/4 tiny databases each), and
several ticks of the hourly class back to back. One target hangs on a lock (a session holds ACCESS EXCLUSIVE on one
of its tables: the backup waits its `lock_timeout`, 60 s by default, then fails), one fails (its database dropped).

    .venv/bin/python benchmarks/fleet.py --targets 40 --ticks 2 [--per-host 2]

The ticks: the `hourly_backups` schedule is evaluated in this process for consecutive hourly tick times, and its
run requests are created and submitted to the queue as the daemon's scheduler does for a tick (the daemon's own
schedules are stopped so that a real top of the hour adds nothing); the daemon's queue coordinator launches them,
its sensors (`backup_alerts` among them) run as in production. Everything started is stopped at the end.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SYSTEM_PG = os.environ.get("REGAL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
SERVERS = 4
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]


def _with_db(dsn: str, name: str) -> str:
    return psycopg.conninfo.make_conninfo(dsn, dbname=name)


class Sampler(threading.Thread):
    """Every 0.2 s, per server: how many of the fleet's databases have a session other than the lock holder
    (a backup in progress), and the daemon's process tree RSS."""

    def __init__(self, servers: dict[str, str], prefix: str) -> None:
        super().__init__(daemon=True)
        self.servers, self.prefix = servers, prefix
        self.peak: dict[str, int] = dict.fromkeys(servers, 0)
        self.samples = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        conns = {host: psycopg.connect(dsn, autocommit=True) for host, dsn in self.servers.items()}
        try:
            while not self.stop_event.wait(0.2):
                for host, conn in conns.items():
                    row = conn.execute(
                        "SELECT count(DISTINCT datname) FROM pg_stat_activity WHERE datname LIKE %s "
                        "AND backend_type = 'client backend' AND pid <> pg_backend_pid() "
                        "AND application_name <> 'fleet-bench-lock'", (self.prefix + "%",)).fetchone()
                    self.peak[host] = max(self.peak[host], row[0] if row else 0)
                self.samples += 1
        finally:
            for conn in conns.values():
                conn.close()


def vm_hwm_mb(pid: int) -> float:
    """The peak resident set (VmHWM) of a live process, in MB."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def enqueue(instance: Any, workspace: Any, request: Any) -> str:
    """A schedule's run request queued as the daemon's scheduler does (tests/test_fleet_queue.py)."""
    from dagster._core.definitions.selector import JobSubsetSelector

    from regal_dagster.defs import BACKUP_JOB

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
    return str(run.run_id)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=int, default=200)
    parser.add_argument("--ticks", type=int, default=3)
    parser.add_argument("--per-host", type=int, default=2, help="fleet.max_backups_per_host (the policy default: 1)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for the runs to finish")
    parser.add_argument("--alert-wait", type=float, default=150,
                        help="seconds to wait after the runs for backup_alerts (evaluated each minute)")
    args = parser.parse_args()
    if args.targets < 2 * SERVERS:
        parser.error(f"--targets: give at least {2 * SERVERS}")

    from regal_dagster.engine import crypto
    from regal_dagster.engine.policy import load_policy
    from regal_dagster.engine.postgresql.server import ScratchCluster
    from regal_dagster.engine.repository_format import initialize
    from regal_dagster.engine.storage import open_repository

    base = Path(tempfile.mkdtemp(prefix="regal-fleet-"))
    tag = uuid.uuid4().hex[:8]
    prefix = f"regal_fleet_{tag}_"
    dagster_db = f"regal_fleet_dagster_{tag}"
    stack = contextlib.ExitStack()
    cleanups: list[Any] = []

    def cleanup() -> None:
        while cleanups:
            with contextlib.suppress(Exception):
                cleanups.pop()()
        stack.close()
        shutil.rmtree(base, ignore_errors=True)

    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        # the servers: the machine's PostgreSQL 15 and 3 scratch PostgreSQL 18
        servers: dict[str, str] = {"127.0.0.1:5432 (PG 15)": SYSTEM_PG}
        for index in range(SERVERS - 1):
            cluster = stack.enter_context(ScratchCluster(base_dir=base / f"pg18_{index}", tuned_for_restore=False))
            servers[f"scratch PG 18 #{index + 1}"] = cluster.dsn("postgres")
        with psycopg.connect(SYSTEM_PG, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{dagster_db}"')

        def drop_system_dbs() -> None:
            with psycopg.connect(SYSTEM_PG, autocommit=True) as conn:
                names = [r[0] for r in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                                                    (f"regal_fleet_%{tag}%",))]
                for name in names:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cleanups.append(drop_system_dbs)

        # the targets: N tiny databases, round-robin over the servers
        started_setup = time.monotonic()
        targets: dict[str, str] = {}
        host_of_server: dict[str, str] = {}
        names = list(servers)
        for index in range(args.targets):
            server = names[index % SERVERS]
            dbname = f"{prefix}{index:04d}"
            with psycopg.connect(servers[server], autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{dbname}"')
            with psycopg.connect(_with_db(servers[server], dbname), autocommit=True) as conn:
                conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text);"
                             "INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 100) g")
            targets[f"store_{index:04d}"] = _with_db(servers[server], dbname)
        hung, failed = "store_0000", "store_0001"  # on two different servers
        with psycopg.connect(servers[names[1]], autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{prefix}0001"')  # the failing target's DSN names a dropped database
        holder = psycopg.connect(targets[hung], application_name="fleet-bench-lock")
        cleanups.append(holder.close)
        holder.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")  # held in an open transaction until the end
        print(f"{args.targets} databases on {SERVERS} servers in {time.monotonic() - started_setup:.0f} s",
              file=sys.stderr)

        # the policy, repository and instance
        os.environ["REGAL_BENCH_MASTER_KEY"] = crypto.generate_master_key()
        policy_file = base / "regal_backup.yaml"
        policy_file.write_text(yaml.safe_dump({
            "repository": {"url": "repository"},
            "encryption": {"keyset": "keyset.json", "master_key": {"env": "REGAL_BENCH_MASTER_KEY"}},
            "targets": {name: {"kind": "postgres", "dsn": dsn} for name, dsn in targets.items()},
            "fleet": {"max_backups_per_host": args.per_host},
            "alerts": {"channels": [{"kind": "file", "path": "alerts.jsonl"}]},
        }))
        policy = load_policy(policy_file)
        initialize(open_repository(policy), crypto.create_keyset(policy))
        hosts = {t: policy.host_of(t) for t in targets}
        for index, server in enumerate(names):
            host_of_server[server] = hosts[f"store_{index:04d}"]
        assert len(set(hosts.values())) == SERVERS, hosts

        from regal_dagster.defs.instance import render

        home = base / "dagster_home"
        home.mkdir()
        (home / "dagster.yaml").write_text(render(policy.fleet, storage="postgres"))
        os.environ.update({"DAGSTER_HOME": str(home), "REGAL_POLICY": str(policy_file),
                           "DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": "5432", "DAGSTER_PG_USER": "postgres",
                           "DAGSTER_PG_PASSWORD": "", "DAGSTER_PG_DB": dagster_db,
                           "PYTHONPATH": str(ROOT)})

        import dagster as dg
        from dagster._core.workspace.context import WorkspaceProcessContext
        from dagster._core.workspace.load_target import WorkspaceFileTarget

        from regal_dagster.defs import build_definitions

        instance = stack.enter_context(dg.DagsterInstance.get())
        workspace = stack.enter_context(WorkspaceProcessContext(
            instance, WorkspaceFileTarget(paths=[str(ROOT / "workspace.yaml")])))
        location = workspace.create_request_context().get_code_location("regal_dagster")
        (repository,) = location.get_repositories().values()
        for remote_schedule in repository.get_schedules():  # a real top of the hour adds nothing to the measure
            instance.stop_schedule(remote_schedule.get_remote_origin_id(), remote_schedule.selector_id,
                                   remote_schedule)

        daemon_bin = shutil.which("dagster-daemon", path=str(Path(sys.executable).parent))
        assert daemon_bin
        daemon_log = open(base / "daemon.log", "wb")  # noqa: SIM115
        daemon = subprocess.Popen([daemon_bin, "run", "-w", str(ROOT / "workspace.yaml")], cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=daemon_log, start_new_session=True)

        code_servers: set[int] = set()  # the daemon's code server runs in a session of its own

        def stop_daemon() -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(daemon.pid, signal.SIGTERM)
            for pid in code_servers:  # still ours: the same command line
                with contextlib.suppress(OSError):
                    if b"dagster" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        os.kill(pid, signal.SIGTERM)
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait()
        cleanups.append(stop_daemon)

        peak_rss = {"daemon": 0.0, "code servers": 0.0}

        def rss_watch() -> None:
            while daemon.poll() is None:
                peak_rss["daemon"] = max(peak_rss["daemon"], vm_hwm_mb(daemon.pid))
                kids = children(daemon.pid)
                code_servers.update(kids)
                peak_rss["code servers"] = max(peak_rss["code servers"], sum(vm_hwm_mb(k) for k in kids))
                time.sleep(1)
        threading.Thread(target=rss_watch, daemon=True).start()

        sampler = Sampler({host_of_server[s]: dsn for s, dsn in servers.items()}, prefix)
        sampler.start()
        cleanups.append(sampler.stop_event.set)

        # the ticks, back to back
        defs = build_definitions(str(policy_file))
        schedule = defs.resolve_schedule_def("hourly_backups")
        first_tick = datetime(2026, 11, 24, 3, tzinfo=UTC)
        runs: dict[str, tuple[int, str, float]] = {}  # run id -> (tick, target, when the tick was submitted)
        for tick in range(args.ticks):
            when = first_tick + timedelta(hours=tick)
            requests = schedule.evaluate_tick(dg.build_schedule_context(scheduled_execution_time=when)).run_requests
            assert requests and len(requests) == args.targets, f"tick {when}: {len(requests or [])} run requests"
            submitted = time.time()
            for request in requests:
                runs[enqueue(instance, workspace, request)] = (tick, request.tags["regal/target"], submitted)
            print(f"tick {tick + 1}: {len(requests)} runs queued in {time.time() - submitted:.1f} s", file=sys.stderr)

        deadline = time.monotonic() + args.timeout
        records: list[Any] = []
        while time.monotonic() < deadline:
            records = instance.get_run_records(dg.RunsFilter(run_ids=list(runs)))
            done = sum(r.dagster_run.status.value in FINISHED for r in records)
            if done == len(runs):
                break
            if daemon.poll() is not None:
                raise SystemExit(f"the daemon stopped: {(base / 'daemon.log').read_text(errors='replace')[-2000:]}")
            time.sleep(2)
        all_done = time.time()
        sampler.stop_event.set()
        print(f"runs finished: {sum(r.dagster_run.status.value in FINISHED for r in records)}/{len(runs)}",
              file=sys.stderr)

        # alerts: backup_alerts evaluates each minute
        alert_file = base / "alerts.jsonl"
        alert_deadline = time.monotonic() + args.alert_wait
        alerts: list[dict[str, Any]] = []
        while time.monotonic() < alert_deadline:
            alerts = [json.loads(line) for line in alert_file.read_text().splitlines()] if alert_file.exists() else []
            if {hung, failed} <= {str(a.get("target", "")) for a in alerts}:
                time.sleep(5)  # any late duplicates
                alerts = [json.loads(line) for line in alert_file.read_text().splitlines()]
                break
            time.sleep(2)
        alert_seconds = time.time() - all_done

        # the figures
        by_id = {r.dagster_run.run_id: r for r in records}
        good = {t for t in targets if t not in (hung, failed)}
        backed_up = sum(1 for run_id, (_, target, _) in runs.items() if target in good and run_id in by_id
                        and by_id[run_id].dagster_run.status.value == "SUCCESS")
        broken = {target: sorted(by_id[run_id].dagster_run.status.value for run_id, (_, t, _) in runs.items()
                                 if t == target and run_id in by_id) for target in (hung, failed)}
        to_start = [r.start_time - runs[i][2] for i, r in by_id.items() if r.start_time]
        to_end = [r.end_time - runs[i][2] for i, r in by_id.items() if r.end_time and runs[i][1] in good]
        per_host_peak = max(sampler.peak.values())
        alert_lines = [f"{a.get('status')} {a.get('event')} {a.get('target')}" for a in alerts]

        rows = [
            ("targets × ticks (servers)", f"{args.targets} × {args.ticks} ({SERVERS}: 1 PG 15, {SERVERS - 1} PG 18)"),
            ("storage / coordinator", "PostgreSQL (dagster-postgres, fresh database) / queued, shipped config"),
            ("other targets backed up at every tick", f"{backed_up} of {len(good) * args.ticks}"),
            (f"hung target ({hung}) runs", ", ".join(broken[hung])),
            (f"failed target ({failed}) runs", ", ".join(broken[failed])),
            ("most backups at once on one server (limit)",
             f"{per_host_peak} ({args.per_host}); per server: "
             + ", ".join(str(v) for v in sampler.peak.values()) + f"; {sampler.samples} samples"),
            ("tick to run start p50 / p99", f"{percentile(to_start, 50):.1f} s / {percentile(to_start, 99):.1f} s"),
            ("tick to backup finished p50 / p99", f"{percentile(to_end, 50):.1f} s / {percentile(to_end, 99):.1f} s"),
            ("last tick's runs all finished after", f"{all_done - max(s for _, _, s in runs.values()):.0f} s"),
            ("daemon peak RSS (its code server)",
             f"{peak_rss['daemon']:.0f} MB ({peak_rss['code servers']:.0f} MB)"),
            ("alerts raised (within s of the last run)",
             f"{len(alerts)}: {'; '.join(alert_lines) or 'none'} ({alert_seconds:.0f} s)"),
        ]
        print("\n| measure | value |\n|---|---|")
        for name, value in rows:
            print(f"| {name} | {value} |")
        if per_host_peak > args.per_host:
            print("the per-server limit was exceeded", file=sys.stderr)
            return 1
        return 0
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
