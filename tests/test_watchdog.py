"""The watchdog for the watcher, with a real temporary Dagster instance (DAGSTER_HOME) and a real HTTP receiver:
the daemon's heartbeat goes stale -> `status --alert` raises "daemon silent" and the RPO alert once through the
webhook channel; the heartbeat is fresh again -> both are resolved. The dead man's switch is pinged by
`status --heartbeat URL` and by the watchdog_heartbeat sensor."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster._daemon.types import DaemonHeartbeat

from regal_dagster.defs import build_definitions

from .conftest import run_cli, write_policy_file


class Receiver:
    """Records webhook POSTs (JSON) and heartbeat GETs."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.pings: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                receiver.posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def do_GET(self) -> None:
                receiver.pings.append(self.path)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.server.shutdown()


def _beat(instance: dg.DagsterInstance, seconds_ago: float) -> None:
    for daemon in ("SENSOR", "SCHEDULER"):  # as the daemon writes them
        instance.add_daemon_heartbeat(DaemonHeartbeat(time.time() - seconds_ago, daemon, "daemon-under-test"))


def test_a_silent_daemon_alerts_once_through_the_channels_and_resolves_when_it_returns(
        tmp_path: Path, master_key: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("REGAL_TEST_HEARTBEAT_URL", f"{receiver.url}/ping/sensor-check")
    (tmp_path / "site").mkdir()
    policy_file = write_policy_file(
        tmp_path / "site", {"pos": "postgresql://regal@127.0.0.1:1/regalpos"},
        alerts={"channels": [{"kind": "webhook", "url": f"{receiver.url}/hook", "timeout": "5s"}]},
        monitoring={"watchdog": {"silent_after": "2m", "heartbeat_url_env": "REGAL_TEST_HEARTBEAT_URL"}})
    instance = dg.DagsterInstance.get()

    _beat(instance, seconds_ago=600)  # the daemon stopped ten minutes ago
    first = run_cli(policy_file, "status", "--alert", "--json")
    assert first.returncode == 3, first.stderr
    report = json.loads(first.stdout)["watchdog"]
    assert any("SENSOR daemon's newest heartbeat is 10 min old" in line for line in report["silent"])
    assert sorted(p["event"] for p in receiver.posts) == ["daemon_silent", "rpo_breach"]
    assert all(p["status"] == "alert" for p in receiver.posts)
    assert run_cli(policy_file, "status", "--alert").returncode == 3  # still silent: told once, nothing new
    assert len(receiver.posts) == 2
    assert (policy_file.parent / ".regal-watchdog.json").stat().st_mode & 0o077 == 0

    _beat(instance, seconds_ago=5)  # the daemon is back
    back = run_cli(policy_file, "status", "--alert", "--json")
    assert back.returncode == 0, back.stderr
    resolved = receiver.posts[2:]
    assert sorted(p["event"] for p in resolved) == ["daemon_silent", "rpo_breach"]
    assert all(p["status"] == "resolved" for p in resolved)
    assert run_cli(policy_file, "status", "--alert").returncode == 0 and len(receiver.posts) == 4

    # the dead man's switch: pinged by the CLI and by the sensor each minute
    assert run_cli(policy_file, "status", "--heartbeat", f"{receiver.url}/ping/cron-check").returncode == 0
    defs = build_definitions(str(policy_file))
    context = dg.build_sensor_context(instance=instance, definitions=defs, resources=defs.resources)
    assert "heartbeat sent" in str(defs.resolve_sensor_def("watchdog_heartbeat")(context))
    assert receiver.pings == ["/ping/cron-check", "/ping/sensor-check"]

    monkeypatch.delenv("DAGSTER_HOME")
    refused = run_cli(policy_file, "status", "--alert")
    assert refused.returncode == 2 and "DAGSTER_HOME is not set" in refused.stderr


def test_a_sensor_whose_last_evaluation_is_older_than_the_bound_alerts_once_and_resolves_when_it_ticks(
        tmp_path: Path, master_key: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch,
        moto_endpoint: str) -> None:
    """The daemon's heartbeats are fresh but the watched sensor (rpo_watch) last ticked ten minutes ago (a sensor
    stuck or stopped in a daemon that runs): `status --alert` says so and alerts once, and publishes the metrics to
    CloudWatch (moto) in the silent sensors' stead (an unreachable CloudWatch: a warning, the alerts unaffected); a
    fresh tick resolves it."""
    import boto3
    from dagster._core.remote_origin import RegisteredCodeLocationOrigin, RemoteInstigatorOrigin, RemoteRepositoryOrigin
    from dagster._core.scheduler.instigation import (
        InstigatorState,
        InstigatorStatus,
        InstigatorType,
        TickData,
        TickStatus,
    )

    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    (tmp_path / "site").mkdir()
    policy_file = write_policy_file(
        tmp_path / "site", {"pos": "postgresql://regal@127.0.0.1:1/regalpos"},
        alerts={"channels": [{"kind": "webhook", "url": f"{receiver.url}/hook", "timeout": "5s"}]},
        monitoring={"watchdog": {"silent_after": "2m", "sensor": "rpo_watch"},
                    "cloudwatch": {"namespace": "RegalWatchdog", "region": "us-east-1", "endpoint_url": moto_endpoint}})
    instance = dg.DagsterInstance.get()
    origin = RemoteInstigatorOrigin(RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("regal"), "__repository__"),
                                    "rpo_watch")
    state = InstigatorState(origin, InstigatorType.SENSOR, InstigatorStatus.RUNNING)
    instance.add_instigator_state(state)

    def tick(seconds_ago: float) -> None:  # as the daemon records an evaluation
        instance.create_tick(TickData(state.instigator_origin_id, "rpo_watch", InstigatorType.SENSOR,
                                      TickStatus.SKIPPED, time.time() - seconds_ago, selector_id=state.selector_id))

    _beat(instance, seconds_ago=5)
    tick(seconds_ago=600)
    first = run_cli(policy_file, "status", "--alert", "--json")
    assert first.returncode == 3, first.stderr
    assert json.loads(first.stdout)["watchdog"]["silent"] == ["the sensor rpo_watch was last evaluated 10 min ago"]
    assert sorted((p["status"], p["event"]) for p in receiver.posts) == [("alert", "daemon_silent"),
                                                                         ("alert", "rpo_breach")]
    assert "rpo_watch was last evaluated 10 min ago" in next(p["what"] for p in receiver.posts
                                                             if p["event"] == "daemon_silent")
    assert json.loads(first.stdout)["cloudwatch"]["data_points"] > 0
    cloudwatch = boto3.client("cloudwatch", region_name="us-east-1", endpoint_url=moto_endpoint)
    published = {m["MetricName"] for m in cloudwatch.list_metrics(Namespace="RegalWatchdog")["Metrics"]}
    assert {"RpoBreached", "OpenAlerts", "RepositoryBytes"} <= published, published
    policy_file.write_text(policy_file.read_text().replace(moto_endpoint, "http://127.0.0.1:1"))
    again = run_cli(policy_file, "status", "--alert")
    assert again.returncode == 3 and len(receiver.posts) == 2  # told once
    assert "CloudWatch not updated (the alerts above are unaffected): CloudWatch unreachable" in again.stderr

    _beat(instance, seconds_ago=5)
    tick(seconds_ago=1)
    back = run_cli(policy_file, "status", "--alert", "--json")
    assert back.returncode == 0 and json.loads(back.stdout)["watchdog"]["silent"] == [], back.stdout + back.stderr
    assert sorted((p["status"], p["event"]) for p in receiver.posts[2:]) == [("resolved", "daemon_silent"),
                                                                            ("resolved", "rpo_breach")]
