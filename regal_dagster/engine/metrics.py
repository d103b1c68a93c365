"""Prometheus metrics: the state of the protection (engine/status.py) in the text exposition format 0.0.4,
written by prometheus_client.

`regal-backup metrics --listen [HOST:]PORT` serves them at /metrics (on 127.0.0.1 unless a host is given: the
endpoint has no authentication, see `exposure_note`); `--textfile PATH` writes them for
node_exporter's textfile collector (atomically: a temporary file renamed over PATH). Every value is read
from the repository, so the numbers are the ones `regal-backup status` prints. docs/metrics.md lists
each metric; docs/grafana-dashboard.json shows them.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .crypto import Keyring
from .errors import RegalError
from .layout import is_wal_segment
from .policy import Policy
from .recoverability import Recoverability
from .status import RepositoryStatus, repository_status
from .storage import Repository
from .transport import is_loopback

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "regal_backup_"


@dataclass
class Family:
    name: str
    help: str
    type: str = "gauge"
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float | None, **labels: str) -> None:
        if value is not None:
            self.samples.append((labels, float(value)))


def _ts(text: str | None) -> float | None:
    return datetime.fromisoformat(text).timestamp() if text else None


def _bool(value: bool | None) -> float | None:
    return None if value is None else float(bool(value))


def _version() -> str:
    try:
        return version("regal-backup")
    except PackageNotFoundError:
        return "unknown"


def families(status: RepositoryStatus, collect_seconds: float) -> list[Family]:
    """Every metric family from one reading of the repository."""
    f = {name: Family(name, text) for name, text in {
        "info": "Build information: the regal-backup version and the repository it reads.",
        "up": "1 when the repository could be read and authenticated at this scrape.",
        "last_success_timestamp_seconds": "When the newest good backup of a target and retention class finished "
                                          "(Unix time).",
        "last_success_duration_seconds": "How long the newest good backup of a target and class took.",
        "last_success_stored_bytes": "Bytes stored (compressed, encrypted) by the newest good backup of a target "
                                     "and class.",
        "last_success_read_bytes": "Bytes read from the source by the newest good backup of a target and class.",
        "rpo_age_seconds": "Age of the data of a target's newest recoverable point (+Inf: none): the data a loss now "
                           "would lose.",
        "rpo_target_seconds": "The target's recovery point objective.",
        "rpo_breached": "1 when the newest recoverable point is older than the RPO (or there is none).",
        "recoverable": "1 when a target has a recoverable point and nothing makes later points unrecoverable (a WAL "
                       "segment missing or unreadable).",
        "recoverable_until_timestamp_seconds": "When the data of a target's newest recoverable point was current "
                                               "(Unix time).",
        "unrecoverable_past_info": "1 for the first part of a target's archive that recovery cannot pass (label "
                                   "segment: a WAL segment missing or unreadable).",
        "wal_newest_stored_lsn": "The newest WAL position stored of a server (postgres_cluster), as a number.",
        "wal_newest_commit_timestamp_seconds": "Commit time of the newest COMMIT the last proof of a server's WAL "
                                               "found at its newest stored position (Unix time).",
        "wal_lag_bytes": "WAL the server has written that is not stored yet (bytes).",
        "wal_lag_seconds": "Age of the newest stored WAL while the server has written more (0: caught up).",
        "wal_gaps": "What recovery cannot pass: WAL segments missing from the oldest base backup's start on or found "
                    "unreadable by the newest WAL continuity check, and a WAL rollback.",
        "wal_stream_up": "1 when the server hands its WAL over now (its slot held by `wal stream`, or archive_command "
                         "archiving without failures since its last success).",
        "last_verification_timestamp_seconds": "When the newest check record of a target was written.",
        "last_verification_success": "1 when the newest verification of a target passed every check that decides "
                                     "'good'.",
        "last_restore_test_timestamp_seconds": "When the newest restore test of a target ran.",
        "last_restore_test_success": "1 when the newest restore test validated the restore within the RTO.",
        "restore_test_rto_seconds": "The RTO the newest restore test of a target measured.",
        "rto_target_seconds": "The target's recovery time objective.",
        "last_drill_timestamp_seconds": "When the newest disaster-recovery drill ran.",
        "last_drill_success": "1 when the newest drill restored every target within the RTO and RPO.",
        "drill_rto_seconds": "The RTO the newest drill measured (every target rebuilt).",
        "target_backups": "Backups of a target in the repository (any status).",
        "target_stored_bytes": "Bytes the backups of a target take in the repository.",
        "repository_bytes": "Bytes the repository holds (every object).",
        "repository_free_bytes": "Room left for the repository: its disk's free bytes, or its S3 quota less what it "
                                 "holds.",
        "repository_capacity_bytes": "The repository's disk size, or its S3 quota.",
        "repository_growth_bytes_per_day": "Bytes the backups of the forecast window (30 days) stored, per day.",
        "repository_days_until_full": "Days until the repository is full at that growth.",
        "damaged_backups": "Backup directories that cannot be trusted (a refused manifest, a missing one).",
        "open_alerts": "Alerts open now, by event (the conditions the alert sensors evaluate).",
        "collect_duration_seconds": "How long reading the repository for this scrape took.",
    }.items()}
    f["info"].add(1, version=_version(), repository=status.repository)
    f["up"].add(1)
    for t in status.targets:
        for retention_class, b in t.newest_good_by_class.items():
            labels = {"target": t.target, "kind": t.kind, "retention_class": retention_class}
            f["last_success_timestamp_seconds"].add(b.finished_at.timestamp(), **labels)
            f["last_success_duration_seconds"].add(b.duration_seconds, **labels)
            f["last_success_stored_bytes"].add(b.bytes_stored, **labels)
            f["last_success_read_bytes"].add(b.bytes_read, **labels)
        f["rpo_age_seconds"].add(math.inf if t.rpo_age_seconds is None else t.rpo_age_seconds, target=t.target)
        if (model := t.recoverability) is not None:
            _recoverability(f, model, status.at)
        f["rpo_target_seconds"].add(t.rpo_seconds, target=t.target)
        f["rpo_breached"].add(_bool(t.rpo_breached), target=t.target)
        if (v := t.last_verification) is not None:
            f["last_verification_timestamp_seconds"].add(_ts(v["checked_at"]), target=t.target)
            f["last_verification_success"].add(_bool(v["passed"]), target=t.target)
        if (r := t.last_restore_test) is not None:
            f["last_restore_test_success"].add(_bool(r["passed"]), target=t.target)
            if "refused" not in r:
                f["last_restore_test_timestamp_seconds"].add(_ts(r["tested_at"]), target=t.target)
                f["restore_test_rto_seconds"].add(r["rto_seconds"], target=t.target)
        f["rto_target_seconds"].add(t.rto_seconds, target=t.target)
        f["target_backups"].add(t.backups, target=t.target)
        f["target_stored_bytes"].add(t.bytes_stored, target=t.target)
    if (d := status.last_drill) is not None:
        f["last_drill_success"].add(_bool(d["passed"]))
        if "refused" not in d:
            f["last_drill_timestamp_seconds"].add(_ts(d["at"]))
            f["drill_rto_seconds"].add(d["rto_seconds"])
    f["repository_bytes"].add(status.repository_bytes)
    if (room := status.capacity) is not None:
        f["repository_free_bytes"].add(room.free_bytes)
        f["repository_capacity_bytes"].add(room.capacity_bytes)
        f["repository_growth_bytes_per_day"].add(room.growth_bytes_per_day)
        f["repository_days_until_full"].add(room.days_until_full)
    f["damaged_backups"].add(status.damaged)
    by_event: dict[str, int] = {}
    for alert in status.open_alerts:
        by_event[alert["event"]] = by_event.get(alert["event"], 0) + 1
    for event in sorted(by_event):
        f["open_alerts"].add(by_event[event], event=event)
    f["collect_duration_seconds"].add(collect_seconds)
    return list(f.values())


def _recoverability(f: dict[str, Family], model: Recoverability, now: datetime) -> None:
    """A target's recoverability (engine/recoverability.py), and its archive's state when it has one."""
    target = model.target
    f["recoverable"].add(_bool(model.point is not None and not model.unrecoverable), target=target)
    if model.point is not None:
        f["recoverable_until_timestamp_seconds"].add(model.point.at.timestamp(), target=target)
    if (state := model.archive) is None:
        return
    unreadable = (model.archive_check or {}).get("unreadable")
    if first := unreadable or next((gap for gap in state.gaps if is_wal_segment(gap)), None):
        f["unrecoverable_past_info"].add(1, target=target, segment=first)
    f["wal_newest_stored_lsn"].add(state.newest_number, target=target)
    if state.newest_commit_at is not None:
        f["wal_newest_commit_timestamp_seconds"].add(state.newest_commit_at.timestamp(), target=target)
    f["wal_lag_bytes"].add(state.behind, target=target)
    if (newest := state.newest_data_at(now)) is not None and state.behind is not None:
        f["wal_lag_seconds"].add((now - newest).total_seconds(), target=target)
    f["wal_gaps"].add(len(state.gaps), target=target)
    f["wal_stream_up"].add(_bool(state.fed), target=target)


def collect(policy: Policy, repo: Repository, keyring: Keyring) -> str:
    """The metrics text for the repository now."""
    started = time.monotonic()
    status = repository_status(policy, repo, keyring, datetime.now(UTC))
    return render(families(status, time.monotonic() - started))


def render(found: list[Family]) -> str:
    """The exposition text, written by prometheus_client (escaping, number formats) from the families."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric

    class _Reading:
        def collect(self) -> Iterator[Metric]:
            for family in found:
                metric = Metric(PREFIX + family.name, family.help, family.type)
                for labels, value in family.samples:
                    metric.add_sample(PREFIX + family.name, labels, value)
                yield metric

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Reading())
    return generate_latest(registry).decode()


def failed_scrape(problem: RegalError) -> str:
    """What a scrape returns when the repository cannot be read: `up` 0 (and the reason in a comment)."""
    up = Family("up", "1 when the repository could be read and authenticated at this scrape.")
    up.add(0)
    return f"# regal-backup could not read the repository: {problem.message}\n" + render([up])


def write_textfile(policy: Policy, repo: Repository, keyring: Keyring, path: Path) -> int:
    """Write the metrics to `path` atomically (node_exporter never reads half a file); the family count."""
    started = time.monotonic()
    status = repository_status(policy, repo, keyring, datetime.now(UTC))
    found = families(status, time.monotonic() - started)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(render(found))
    os.replace(partial, path)
    return len(found)


class _Cache:
    def __init__(self, read: Callable[[], str], seconds: float):
        self.read, self.seconds = read, seconds
        self.lock = threading.Lock()
        self.text, self.at = "", -math.inf

    def get(self) -> str:
        with self.lock:  # one reading of the repository at a time, shared by concurrent scrapes
            if time.monotonic() - self.at >= self.seconds:
                try:
                    self.text = self.read()
                except RegalError as exc:
                    self.text = failed_scrape(exc)
                self.at = time.monotonic()
            return self.text


DEFAULT_LISTEN = "127.0.0.1:9464"
"""Where `metrics --listen` serves without an address: this machine only, on the port Prometheus' exporters use."""


def listen_address(text: str) -> tuple[str, int]:
    """`[HOST:]PORT` (an IPv6 host in brackets) as (host, port); no host: 127.0.0.1, reachable from this machine
    only."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise RegalError(f"--listen {text}: give [HOST:]PORT", f"e.g. --listen {DEFAULT_LISTEN}")
    return host, int(port)


def exposure_note(host: str) -> str | None:
    """What to tell the operator when /metrics is served beyond this machine (None on a loopback address)."""
    if is_loopback(host):
        return None
    return (f"/metrics on {host} can be reached from other machines and has no authentication and no TLS: anyone "
            "who reaches it reads your targets' names, backup ages, failures and open alerts. Allow only your "
            "Prometheus to it (firewall, or a reverse proxy with authentication), or listen on 127.0.0.1")


def serve(policy: Policy, repo: Repository, keyring: Keyring, host: str, port: int, *, cache_seconds: float = 30.0,
          ready: Callable[[str], None] | None = None, stop: threading.Event | None = None) -> None:
    """Serve /metrics until interrupted (or `stop` is set)."""
    cache = _Cache(lambda: collect(policy, repo, keyring), cache_seconds)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] == "/metrics":
                body, status, kind = cache.get().encode(), 200, CONTENT_TYPE
            elif self.path == "/":
                body, status, kind = b'<a href="/metrics">regal-backup metrics</a>\n', 200, "text/html"
            else:
                body, status, kind = b"not found: try /metrics\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        raise RegalError(f"cannot listen on {host}:{port}: {exc.strerror}",
                         "choose a free port, or stop what listens there") from None
    if ready is not None:
        ready(f"http://{host}:{server.server_address[1]}")
    watcher = None
    if stop is not None:
        def shut_down_when_stopped() -> None:
            stop.wait()
            server.shutdown()

        watcher = threading.Thread(target=shut_down_when_stopped, daemon=True)
        watcher.start()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
