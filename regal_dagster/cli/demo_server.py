"""The demo's embedded PostgreSQL between demo runs: `regal-backup demo --start-postgres` starts it again as the
demo left it (its data, the policy pointed at it) for the Dagster UI, `--stop-postgres` stops it. Loads no
Dagster: starting a server for the UI takes only the server's own start-up."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml

from ..engine.bootstrap import POLICY_NAME, init_project
from ..engine.errors import UsageError
from ..engine.postgresql.server import ScratchCluster
from ..engine.postgresql.watchdog import read_postmaster_pid
from .output import cli_invocation, tool_invocation

DEMO_DATABASE = "regalpos"
AUDIT_DATABASE = "regal_audit"
ALERTS_FILE = "alerts.jsonl"
OFFSITE_DIR = "offsite-repository"


def policy_for(directory: Path, dsn: str, audit_dsn: str) -> Path:
    """A new policy as `init` writes it, or the existing one pointed at this run's server (its port changes
    between runs); with the off-site copy and the alert channel a compliant setup has. The audit trail lives
    in the same embedded server, in its own database (in production: another server)."""
    path = directory / POLICY_NAME
    if not path.exists():
        path = init_project(directory, dsn, audit_dsn=audit_dsn).policy_path
    document = yaml.safe_load(path.read_text())
    document["targets"]["main"]["dsn"] = dsn
    document["audit"] = {"dsn": audit_dsn}
    document["offsite"] = {"url": OFFSITE_DIR}  # in production: another bucket, region or site
    document["alerts"] = {"channels": [{"kind": "file", "path": ALERTS_FILE}]}  # in production: PagerDuty, e-mail
    # the demo's Dagster instance starts nothing noisy on its own (the drill and the monthly restore sample start
    # scratch servers): their schedules are off, on in the UI with one click; production keeps them running
    document.setdefault("dagster", {})["drill_schedules"] = "stopped"
    # the runbook's point-of-sale database is the most critical tier: an hourly backup, RPO 1 h, RTO 4 h
    document["tiers"] = {"pos": {"backup_every": "1h", "rpo": "1h", "rto": "4h",
                                 "description": "takes payments (the runbook's RPO and RTO)"}}
    document["targets"]["main"]["tier"] = "pos"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def dagster_home(directory: Path) -> Path:
    home = directory / "dagster_home"
    home.mkdir(exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text("# Local SQLite storage for the demo; see docs/dagster-postgres.yaml for PostgreSQL.\n"
                          "telemetry:\n  enabled: false\nfreshness:\n  enabled: true\n")
    return home


def demo_postgres(directory: Path, start: bool) -> dict[str, Any]:
    """Start the demo's embedded PostgreSQL again, as the demo left it (its data, the policy pointed at it), for
    the Dagster UI, without running the demo again; or stop it."""
    directory = directory.resolve()
    data = directory / "postgres"
    if not (directory / POLICY_NAME).exists() or not data.exists():
        raise UsageError(f"{directory} holds no demo", f"run `{cli_invocation()} demo --dir "
                                                       f"{shlex.quote(str(directory))}` first")
    cluster = ScratchCluster.persistent(data)
    stop = f"{cli_invocation()} demo --dir {shlex.quote(str(directory))} --stop-postgres"
    if not start:
        running = read_postmaster_pid(data) is not None
        if running and cluster.halt().returncode != 0:
            raise UsageError(f"the demo's PostgreSQL in {data} did not stop", f"see {data / 'regal-server.log'}")
        return {"postgres_running": False, "data_directory": str(data),
                "text": f"the demo's PostgreSQL ({data}) " + ("stopped" if running else "was not running")}
    cluster.start()  # a server already running there is reused
    policy_path = policy_for(directory, cluster.dsn(DEMO_DATABASE), cluster.dsn(AUDIT_DATABASE))
    home = dagster_home(directory)
    env = f"DAGSTER_HOME={shlex.quote(str(home))} REGAL_POLICY={shlex.quote(str(policy_path))}"
    ui = f"{env} {tool_invocation('dagster')} dev -m regal_dagster.definitions"
    return {"postgres_running": True, "data_directory": str(data), "policy": str(policy_path),
            "dagster_home": str(home), "ui_command": ui, "stop_postgres_command": stop,
            "text": f"the demo's PostgreSQL runs on {data}\n  open the Dagster UI: {ui}\n  stop it when done: "
                    f"{stop}"}
