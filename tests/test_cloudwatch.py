"""CloudWatch: the Prometheus metrics published with PutMetricData to a real moto server and read back with
ListMetrics and GetMetricData; a throttled CloudWatch (a real HTTP peer answering Throttling before it lets the
calls through) is retried with backoff; the alarms of docs/cloudwatch-alarms.json watch metrics we publish."""

from __future__ import annotations

import datetime as dt
import json
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import dagster as dg
import pytest

from regal_dagster.defs import build_definitions
from regal_dagster.engine.cloudwatch import metric_names

from .conftest import DatabaseFactory, run_cli, verified_backup, write_policy_file

ROOT = Path(__file__).resolve().parent.parent


class ThrottlingProxy:
    """A real HTTP peer in front of moto: answers the first `throttle` calls as a throttled CloudWatch does
    (awsQueryCompatible error Throttling), then forwards every call to moto."""

    def __init__(self, upstream: str, throttle: int) -> None:
        self.throttle, self.calls = throttle, 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                proxy.calls += 1
                if proxy.calls <= proxy.throttle:  # as CloudWatch's JSON protocol answers (awsQueryCompatible)
                    error = json.dumps({"__type": "com.amazonaws.cloudwatch#Throttling",
                                        "message": "Rate exceeded"}).encode()
                    self.send_response(400)
                    for name, value in {"Content-Type": "application/x-amz-json-1.0",
                                        "x-amzn-query-error": "Throttling;Sender",
                                        "Content-Length": str(len(error))}.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(error)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                request = urllib.request.Request(upstream + self.path, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=10) as response:
                    answer, status, answer_headers = response.read(), response.status, response.headers.items()
                self.send_response(status)
                for name, value in answer_headers:
                    if name.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def throttling(moto_endpoint: str) -> Iterator[ThrottlingProxy]:
    proxy = ThrottlingProxy(moto_endpoint, throttle=2)
    try:
        yield proxy
    finally:
        proxy.server.shutdown()


def _value(cloudwatch, metric: str, dimensions: list[dict[str, str]]) -> list[float]:  # type: ignore[no-untyped-def]
    now = dt.datetime.now(dt.UTC)
    answer = cloudwatch.get_metric_data(
        MetricDataQueries=[{"Id": "m", "MetricStat": {"Metric": {"Namespace": "RegalTest", "MetricName": metric,
                                                                   "Dimensions": dimensions},
                                                        "Period": 60, "Stat": "Maximum"}}],
        StartTime=now - dt.timedelta(hours=1), EndTime=now + dt.timedelta(minutes=5))
    return list(answer["MetricDataResults"][0]["Values"])


def test_metrics_are_published_to_cloudwatch_read_back_and_throttling_is_retried(
        system_pg: DatabaseFactory, tmp_path: Path, master_key: str, moto_endpoint: str,
        throttling: ThrottlingProxy) -> None:
    policy_file = write_policy_file(tmp_path, {"pos": system_pg.create()}, monitoring={"cloudwatch": {
        "namespace": "RegalTest", "region": "us-east-1", "endpoint_url": throttling.url,
        "dimensions": {"Environment": "test"}}})
    verified_backup(policy_file)

    done = run_cli(policy_file, "metrics", "--cloudwatch", "--json")
    assert done.returncode == 0, done.stderr
    published = json.loads(done.stdout)["cloudwatch"]
    assert published["throttled"] == 2 and published["calls"] == 3 and throttling.calls == 3
    assert "throttled PutMetricData" not in done.stdout

    cloudwatch = boto3.client("cloudwatch", region_name="us-east-1", endpoint_url=moto_endpoint)
    listed = {m["MetricName"]: m["Dimensions"] for m in cloudwatch.list_metrics(Namespace="RegalTest")["Metrics"]}
    for name in ("LastSuccessAgeSeconds", "BackupDurationSeconds", "BackupStoredBytes", "LastVerificationSuccess",
                 "RpoAgeSeconds", "RpoBreached", "TargetStoredBytes", "RepositoryBytes"):
        assert name in listed, (name, sorted(listed))
    assert {"Name": "Environment", "Value": "test"} in listed["RpoBreached"]

    # the same numbers as the Prometheus exposition (one source): the stored bytes of the target
    textfile = tmp_path / "regal.prom"
    assert run_cli(policy_file, "metrics", "--textfile", str(textfile)).returncode == 0
    prometheus = next(float(line.rsplit(" ", 1)[1]) for line in textfile.read_text().splitlines()
                      if line.startswith('regal_backup_target_stored_bytes{target="pos"}'))
    target = [{"Name": "Target", "Value": "pos"}, {"Name": "Environment", "Value": "test"}]
    assert _value(cloudwatch, "TargetStoredBytes", target) == [prometheus]
    assert _value(cloudwatch, "RpoBreached", target) == [0.0]
    assert _value(cloudwatch, "LastVerificationSuccess", target) == [1.0]

    # the Dagster sensor publishes the same way (and never fails a tick: a refusal is logged)
    defs = build_definitions(str(policy_file))
    context = dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral(), definitions=defs,
                                      resources=defs.resources)
    result = defs.resolve_sensor_def("cloudwatch_metrics")(context)
    assert "published" in str(result), result


def test_the_ready_made_alarms_watch_metrics_we_publish() -> None:
    template = json.loads((ROOT / "docs" / "cloudwatch-alarms.json").read_text())
    alarms = [r["Properties"] for r in template["Resources"].values() if r["Type"] == "AWS::CloudWatch::Alarm"]
    assert len(alarms) >= 6
    for alarm in alarms:
        assert alarm["MetricName"] in metric_names(), alarm["MetricName"]
        assert alarm["Namespace"] == {"Ref": "Namespace"}
        for ref in [alarm["Threshold"], alarm["Period"]]:
            assert not isinstance(ref, dict) or ref["Ref"] in template["Parameters"]
