"""One suite every storage backend passes: a local directory, and S3 on a moto server (with and without a
key prefix). Repositories are opened the way the engine opens them (`open_repository`), so the retry and
logging wrappers are under test too. The retry tests put a real fault between boto3 and the moto server: a
TCP proxy that drops connections, answers 503 SlowDown, or drops everything (an outage).

A new backend is added to `BACKENDS` and `_store` below and must pass every test here unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from regal_dagster.engine.errors import LockedError, RegalError
from regal_dagster.engine.layout import REPOSITORY_MARKER
from regal_dagster.engine.policy import Policy, load_policy
from regal_dagster.engine.storage import Repository, StorageUnavailableError, backend_for, open_repository

from .conftest import MotoServer, use_test_aws_credentials

PART_SIZE_MB = 5
PART = PART_SIZE_MB * 1024 * 1024
LOCK_LEASE = 2.0  # seconds: an S3 lease held by a killed process frees itself this long after its last renewal
ATTEMPTS = 4
SECRET_KEY = "conformance-secret-Zq81vXw"  # the S3 secret: it must never reach a log record
BACKENDS = ["local", "s3", "s3-prefix"]


# --- a real S3 endpoint -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with pytest.MonkeyPatch.context() as mp:
        use_test_aws_credentials(mp, "conformance-access-key", SECRET_KEY)
        with MotoServer() as endpoint:
            yield endpoint


def _new_bucket(endpoint: str) -> str:
    name = f"conformance-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", region_name="us-east-1", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


def _policy(directory: Path, repository: dict[str, Any]) -> Policy:
    """A policy file around `repository` (small backoff and lease, so that the tests stay fast)."""
    document = {
        "repository": {**({"lock_lease": f"{LOCK_LEASE}s"} if str(repository["url"]).startswith("s3://") else {}),
                       "retry": {"attempts": ATTEMPTS, "backoff": "0.02s", "max_backoff": "0.1s"}, **repository},
        "encryption": {"keyset": "keyset.json", "master_key": {"env": "REGAL_CONFORMANCE_UNUSED"}},
        "targets": {"main": {"kind": "postgres", "dsn": "postgresql://postgres@127.0.0.1:5432/unused"}},
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "regal_backup.yaml"
    path.write_text(yaml.safe_dump(document))
    return load_policy(path)


@dataclass
class Store:
    """One backend under test: its policy, an open repository, and a look at the raw store beneath."""

    name: str
    policy: Policy
    raw_keys: Callable[[], list[str]]  # every key in the store itself (files under the root, the bucket)

    def open(self) -> Repository:
        return open_repository(self.policy)


def _store(name: str, tmp_path: Path, endpoint: Callable[[], str]) -> Store:
    if name == "local":
        policy = _policy(tmp_path, {"url": "repository"})
        root = tmp_path / "repository"
        return Store(name, policy, lambda: sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                                                  if p.is_file()))
    url_endpoint = endpoint()
    bucket = _new_bucket(url_endpoint)
    prefix = "some/prefix/" if name == "s3-prefix" else ""
    policy = _policy(tmp_path, {"url": f"s3://{bucket}/{prefix}", "endpoint_url": url_endpoint,
                                "region": "us-east-1", "part_size_mb": PART_SIZE_MB, "upload_concurrency": 2})
    s3 = boto3.client("s3", region_name="us-east-1", endpoint_url=url_endpoint)

    def raw_keys() -> list[str]:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        keys = sorted(item["Key"] for page in pages for item in page.get("Contents", []))
        assert all(k.startswith(prefix) for k in keys), keys  # nothing outside the repository's prefix
        return [k.removeprefix(prefix) for k in keys]

    return Store(name, policy, raw_keys)


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return _store(request.param, tmp_path, lambda: request.getfixturevalue("s3_endpoint"))


@pytest.fixture
def repo(store: Store) -> Repository:
    return store.open()


def _later() -> datetime:
    return datetime.now(UTC) + timedelta(days=1)


# --- the registry ----------------------------------------------------------------------------------------


def test_the_registry_opens_the_backend_a_urls_scheme_names(store: Store, repo: Repository) -> None:
    from regal_dagster.engine.storage.local import LocalRepository
    from regal_dagster.engine.storage.logged import Logged
    from regal_dagster.engine.storage.retry import Retrying
    from regal_dagster.engine.storage.s3 import S3Repository

    expected = {"local": (LocalRepository, "filesystem"), "s3": (S3Repository, "s3"), "s3-prefix": (S3Repository, "s3")}
    kind, name = expected[store.name]
    assert isinstance(repo.backend, kind) and backend_for(store.policy.repository.url).kind == name
    assert isinstance(repo, Retrying) and isinstance(repo.inner, Logged)  # the wrappers, once each
    assert repo.inner.inner is repo.backend
    assert repo.location == repo.backend.location and repo.encrypts_at_rest == (name == "s3")
    assert repo.locks_objects == (name == "s3")


def test_a_url_no_backend_serves_is_a_policy_error_listing_those_that_exist(tmp_path: Path) -> None:
    from regal_dagster.engine.errors import PolicyError

    assert backend_for("file:///srv/regal").kind == backend_for("relative/dir").kind == "filesystem"
    assert backend_for("S3://bucket/prefix").kind == "s3"
    with pytest.raises(PolicyError) as caught:
        _policy(tmp_path, {"url": "ftp://backups.example/regal"})
    assert "no repository backend serves ftp:// URLs" in str(caught.value)
    assert "file:///path" in str(caught.value) and "s3://bucket/prefix" in str(caught.value)
    with pytest.raises(PolicyError, match="s3 url needs a bucket"):
        _policy(tmp_path, {"url": "s3:///prefix"})


# --- save and load -------------------------------------------------------------------------------------


def test_a_small_document_and_a_multipart_object_load_back_byte_for_byte(store: Store, repo: Repository) -> None:
    repo.put_bytes("backups/main/b1/manifest.json", b'{"small": true}')
    assert repo.get_bytes("backups/main/b1/manifest.json") == b'{"small": true}'
    assert repo.size("backups/main/b1/manifest.json") == 15

    big = os.urandom(2 * PART + 1234)  # larger than a part: an S3 multipart upload of three parts
    with repo.writer("backups/main/b1/database.pgdump") as writer:
        for start in range(0, len(big), 1024 * 1024):
            writer.write(big[start:start + 1024 * 1024])
        assert writer.bytes_written == len(big)
    assert repo.size("backups/main/b1/database.pgdump") == len(big) > PART_SIZE_MB * 1024 * 1024
    digest = hashlib.sha256()
    with repo.reader("backups/main/b1/database.pgdump") as stream:
        while chunk := stream.read(1024 * 1024):
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(big).hexdigest()
    assert repo.get_bytes("backups/main/b1/database.pgdump") == big
    assert store.raw_keys() == ["backups/main/b1/database.pgdump", "backups/main/b1/manifest.json"]
    assert repo.abandoned_uploads(_later()) == []


def test_an_object_written_again_is_replaced(repo: Repository) -> None:
    repo.put_bytes("audit/checkpoints/1.json", b"first version, the longer one")
    repo.put_bytes("audit/checkpoints/1.json", b"second")
    assert repo.get_bytes("audit/checkpoints/1.json") == b"second"
    with repo.writer("audit/checkpoints/1.json") as writer:
        writer.write(b"third, streamed")
    assert repo.get_bytes("audit/checkpoints/1.json") == b"third, streamed"
    assert [(o.key, o.size) for o in repo.list("audit/")] == [("audit/checkpoints/1.json", 15)]


def test_a_missing_object_is_an_error_naming_its_key(repo: Repository) -> None:
    key = "backups/main/gone/database.pgdump"
    assert repo.size(key) is None
    for load in (lambda: repo.get_bytes(key), lambda: repo.read_range(key, 0, 10), lambda: repo.reader(key)):
        with pytest.raises(RegalError) as caught:
            load()
        assert key in caught.value.message and "missing" in caught.value.message
        assert caught.value.hint
        assert not isinstance(caught.value, StorageUnavailableError)  # not retried: it will not come back


def test_list_returns_committed_objects_under_a_prefix_with_their_sizes(store: Store, repo: Repository) -> None:
    objects = {"backups/a/1/manifest.json": 3, "backups/a/1/tables/00001.copy": 5, "backups/a/2/manifest.json": 7,
               "backups/ab/1/manifest.json": 11, "audit/spool/x.json": 13}
    for key, size in objects.items():
        repo.put_bytes(key, b"x" * size)
    listed = {o.key: o.size for o in repo.list("backups/a/")}
    assert listed == {k: v for k, v in objects.items() if k.startswith("backups/a/")}  # not backups/ab/
    assert {o.key for o in repo.list("backups/a/1/tables/")} == {"backups/a/1/tables/00001.copy"}
    assert list(repo.list("backups/nothing-here/")) == []
    assert {o.key: o.size for o in repo.list("")} == objects
    assert store.raw_keys() == sorted(objects)


# --- unfinished writes ---------------------------------------------------------------------------------


def test_an_unfinished_writer_is_never_listed_and_an_aborted_one_leaves_nothing(
        store: Store, repo: Repository) -> None:
    key = "backups/main/b2/tables/00001.copy"
    writer = repo.writer(key)
    writer.write(os.urandom(PART + 4096))  # a part is on its way: on S3 a multipart upload exists now
    assert repo.size(key) is None
    assert [o.key for o in repo.list("")] == []
    writer.abort()
    assert repo.size(key) is None and [o.key for o in repo.list("")] == []
    assert store.raw_keys() == []
    assert repo.abandoned_uploads(_later()) == []


def test_an_exception_inside_the_writer_block_leaves_nothing(store: Store, repo: Repository) -> None:
    with pytest.raises(RuntimeError, match="pg_dump died"), repo.writer("backups/main/b3/database.pgdump") as w:
        w.write(os.urandom(PART + 1))
        w.write(b"a little more")
        raise RuntimeError("pg_dump died")
    assert repo.size("backups/main/b3/database.pgdump") is None
    assert store.raw_keys() == [] and repo.abandoned_uploads(_later()) == []


# --- ranges, removal, usage ----------------------------------------------------------------------------


def test_read_range_returns_the_bytes_asked_for_and_fewer_at_the_end(repo: Repository) -> None:
    data = bytes(range(256)) * 40  # 10240 bytes
    repo.put_bytes("backups/main/b4/x.copy", data)
    assert repo.read_range("backups/main/b4/x.copy", 1000, 500) == data[1000:1500]
    assert repo.read_range("backups/main/b4/x.copy", 0, 1) == data[:1]
    assert repo.read_range("backups/main/b4/x.copy", len(data) - 10, 100) == data[-10:]
    assert repo.read_range("backups/main/b4/x.copy", len(data), 100) == b""
    assert repo.read_range("backups/main/b4/x.copy", len(data) + 50, 100) == b""
    assert repo.read_range("backups/main/b4/x.copy", 500, 0) == b""


def test_delete_removes_the_object_and_is_idempotent(store: Store, repo: Repository) -> None:
    repo.put_bytes("prune/probe.json", b"{}")
    repo.put_bytes("prune/stays.json", b"{}")
    repo.delete("prune/probe.json")
    assert repo.size("prune/probe.json") is None
    repo.delete("prune/probe.json")  # gone already: nothing to do
    repo.delete("prune/never-was.json")
    assert store.raw_keys() == ["prune/stays.json"]


def test_usage_bytes_counts_what_was_stored(repo: Repository) -> None:
    assert repo.usage_bytes() == 0
    repo.put_bytes("backups/main/b5/manifest.json", b"m" * 1000)
    with repo.writer("backups/main/b5/database.pgdump") as writer:
        writer.write(os.urandom(PART + 10))
    assert repo.usage_bytes() == 1000 + PART + 10


def test_check_ready_writes_nothing(repo: Repository) -> None:
    repo.check_ready()  # the marker is the engine's, sealed (engine/repository_format.py)
    repo.check_ready()
    assert list(repo.list("")) == [] and repo.size(REPOSITORY_MARKER) is None


def test_keys_cannot_leave_the_repository(store: Store, repo: Repository, tmp_path: Path) -> None:
    for key in ("../outside.json", "backups/../../outside.json", "/etc/outside.json"):
        with pytest.raises(RegalError, match="leaves the repository"):
            repo.put_bytes(key, b"escaped")
        with pytest.raises(RegalError, match="leaves the repository"):
            repo.get_bytes(key)
    assert store.raw_keys() == []
    assert not (tmp_path / "outside.json").exists()


def test_a_local_key_cannot_leave_the_root_through_a_symbolic_link(tmp_path: Path) -> None:
    store = _store("local", tmp_path, lambda: pytest.fail("no S3 here"))
    repo = store.open()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "repository" / "backups").mkdir(parents=True)
    (tmp_path / "repository" / "backups" / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RegalError, match="leaves the repository"):
        repo.put_bytes("backups/link/x.json", b"escaped")
    assert list((tmp_path / "elsewhere").iterdir()) == []


# --- the lock ------------------------------------------------------------------------------------------


def test_a_lock_excludes_a_second_holder_naming_the_first_and_is_released_after_the_block(
        store: Store, repo: Repository) -> None:
    other = store.open()
    with repo.lock("main"):
        with pytest.raises(LockedError) as caught, other.lock("main"):
            pytest.fail("a second holder got the lock")
        assert f"process {os.getpid()} on {socket.gethostname()}" in caught.value.message
        assert caught.value.hint
        with other.lock("another-target"):  # one lock per name
            pass
    with other.lock("main"):  # released after the block
        pass
    with pytest.raises(ValueError, match="inside"), repo.lock("main"):
        raise ValueError("inside")
    with other.lock("main"):  # and after a block that raised
        pass


_HOLDER = """
import sys, time
from regal_dagster.engine.policy import load_policy
from regal_dagster.engine.storage import open_repository
with open_repository(load_policy(sys.argv[1])).lock("main"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_the_lock_of_a_killed_holder_becomes_free(store: Store, repo: Repository) -> None:
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(store.policy.base_dir / "regal_backup.yaml")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held", holder.stderr
        with pytest.raises(LockedError, match=f"process {holder.pid} on"), repo.lock("main"):
            pass
        holder.send_signal(signal.SIGKILL)  # no cleanup of any kind runs
        holder.wait(timeout=10)
        killed = time.monotonic()
        while True:
            try:
                with repo.lock("main"):
                    break
            except LockedError:
                assert time.monotonic() - killed < LOCK_LEASE + 5, "the dead holder's lock never freed"
                time.sleep(0.1)
        freed_after = time.monotonic() - killed
    finally:
        holder.kill()
        holder.wait(timeout=10)
    if backend_for(store.policy.repository.url).kind == "filesystem":
        assert freed_after < 1  # the kernel drops the flock with the process
    else:
        assert 0 < freed_after <= LOCK_LEASE + 1  # the lease runs out: it is not renewed any more


# --- logging ---------------------------------------------------------------------------------------------


def test_every_operation_is_logged_at_debug_with_op_key_bytes_and_time_but_no_credentials(
        repo: Repository, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="regal_backup.storage")
    repo.put_bytes("backups/main/b6/manifest.json", b"0123456789")
    repo.get_bytes("backups/main/b6/manifest.json")
    with repo.writer("backups/main/b6/database.pgdump") as writer:
        writer.write(b"y" * 4096)
    with repo.reader("backups/main/b6/database.pgdump") as stream:
        stream.read()
    repo.size("backups/main/b6/none")
    list(repo.list("backups/"))
    repo.delete("backups/main/b6/manifest.json")
    with repo.lock("main"):
        pass
    records = [r for r in caplog.records if r.name == "regal_backup.storage"]
    assert all(r.levelno == logging.DEBUG for r in records)
    seen = {(r.op, r.key, r.bytes) for r in records}  # type: ignore[attr-defined]
    assert {("put_bytes", "backups/main/b6/manifest.json", 10), ("get_bytes", "backups/main/b6/manifest.json", 10),
            ("save", "backups/main/b6/database.pgdump", 4096), ("read", "backups/main/b6/database.pgdump", 4096),
            ("size", "backups/main/b6/none", None), ("delete", "backups/main/b6/manifest.json", None),
            ("lock", "main", None), ("unlock", "main", None)} <= seen
    assert all(isinstance(r.ms, float) and r.ms >= 0 for r in records)  # type: ignore[attr-defined]
    assert "4096 bytes in" in caplog.text
    everything = caplog.text + " ".join(str(vars(r)) for r in records)
    assert SECRET_KEY not in everything and "conformance-access-key" not in everything


# --- retries against real faults -----------------------------------------------------------------------


class FaultyProxy:
    """A TCP proxy in front of the moto server. Each new connection is passed through, or, while faults
    are queued, dropped at once (a reset, as when a load balancer or the network fails) or answered with
    503 SlowDown (as S3 does when it is overloaded). `down` drops every connection: an outage."""

    def __init__(self, upstream: str):
        self.upstream = ("127.0.0.1", int(upstream.rsplit(":", 1)[1]))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.faults: list[str] = []  # "drop" or "slowdown", one per new connection
        self.down = False
        self.connections = 0
        self.guard = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def fail_next(self, count: int, fault: str = "drop") -> None:
        with self.guard:
            self.faults = [fault] * count

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            with self.guard:
                self.connections += 1
                fault = "drop" if self.down else (self.faults.pop(0) if self.faults else None)
            threading.Thread(target=self._serve, args=(client, fault), daemon=True).start()

    def _serve(self, client: socket.socket, fault: str | None) -> None:
        if fault == "drop":
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()  # RST
            return
        if fault == "slowdown":
            head = b""
            while b"\r\n\r\n" not in head and (chunk := client.recv(65536)):
                head += chunk
            body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                    b"<Message>Please reduce your request rate.</Message><RequestId>1</RequestId></Error>")
            client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                           + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            client.close()
            return
        upstream = socket.create_connection(self.upstream)

        def pump(source: socket.socket, sink: socket.socket) -> None:
            try:
                while data := source.recv(65536):
                    sink.sendall(data)
                sink.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
        pump(client, upstream)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultyProxy]:
    faulty = FaultyProxy(s3_endpoint)
    yield faulty
    faulty.close()


@pytest.fixture
def proxied(tmp_path: Path, s3_endpoint: str, proxy: FaultyProxy) -> Store:
    """An S3 repository reached through the proxy."""
    bucket = _new_bucket(s3_endpoint)
    policy = _policy(tmp_path, {"url": f"s3://{bucket}/regal", "endpoint_url": proxy.endpoint,
                                "region": "us-east-1", "part_size_mb": PART_SIZE_MB, "upload_concurrency": 2})
    return Store("s3-proxied", policy, list)


def test_dropped_connections_are_retried_until_the_request_passes(
        proxied: Store, proxy: FaultyProxy, caplog: pytest.LogCaptureFixture) -> None:
    proxied.open().put_bytes("backups/main/b7/manifest.json", b"the manifest")
    operations: dict[str, Callable[[Repository], object]] = {
        "get_bytes": lambda r: r.get_bytes("backups/main/b7/manifest.json"),
        "read_range": lambda r: r.read_range("backups/main/b7/manifest.json", 4, 8),
        "size": lambda r: r.size("backups/main/b7/manifest.json"),
        "list": lambda r: [o.key for o in r.list("backups/")],
        "put_bytes": lambda r: r.put_bytes("backups/main/b7/checks.json", b"{}"),
        "locked_until": lambda r: r.locked_until("backups/main/b7/manifest.json"),
        "usage_bytes": lambda r: r.usage_bytes(),
        "delete": lambda r: r.delete("backups/main/b7/checks.json"),
    }
    expected: dict[str, object] = {
        "get_bytes": b"the manifest", "read_range": b"manifest", "size": 12, "list": ["backups/main/b7/manifest.json"],
        "put_bytes": None, "locked_until": None, "usage_bytes": 14, "delete": None}
    caplog.set_level(logging.WARNING, logger="regal_backup.storage")
    for name, operation in operations.items():
        repo = proxied.open()  # a new client: no connection is pooled yet
        proxy.fail_next(ATTEMPTS - 2)
        before, retries = proxy.connections, len(caplog.records)
        assert operation(repo) == expected[name], name
        assert proxy.connections - before >= ATTEMPTS - 1, name  # the dropped ones and the one that passed
        assert len(caplog.records) - retries == ATTEMPTS - 2, name  # one warning per retry
    assert "attempt 2 of 4" in caplog.text and "cannot reach" in caplog.text
    assert proxied.open().size("backups/main/b7/checks.json") is None  # the delete went through


def test_slowdown_answers_are_retried(proxied: Store, proxy: FaultyProxy) -> None:
    proxied.open().put_bytes("backups/main/b8/manifest.json", b"slow")
    for operation in (lambda r: r.get_bytes("backups/main/b8/manifest.json"),
                      lambda r: r.size("backups/main/b8/manifest.json")):
        repo = proxied.open()
        proxy.fail_next(ATTEMPTS - 1, "slowdown")  # the last attempt passes
        assert operation(repo) in (b"slow", 4)
        assert proxy.faults == []


def test_a_lock_is_taken_through_dropped_connections(proxied: Store, proxy: FaultyProxy) -> None:
    repo = proxied.open()
    proxy.fail_next(2)
    with repo.lock("main"):
        assert proxy.faults == []  # taken on the third try
        with pytest.raises(LockedError, match=f"process {os.getpid()}"), proxied.open().lock("main"):
            pass
    with proxied.open().lock("main"):  # and released
        pass


def test_a_multipart_upload_passes_through_dropped_connections(proxied: Store, proxy: FaultyProxy) -> None:
    data = os.urandom(2 * PART + 77)
    repo = proxied.open()
    proxy.fail_next(2)  # the upload's first request, then a part's: each is made again, not the stream
    with repo.writer("backups/main/b9/database.pgdump") as writer:
        for start in range(0, len(data), 1024 * 1024):
            writer.write(data[start:start + 1024 * 1024])
    assert proxy.faults == []
    assert repo.get_bytes("backups/main/b9/database.pgdump") == data
    assert repo.abandoned_uploads(_later()) == []


def test_a_permanent_outage_is_one_clear_error_after_the_last_attempt(proxied: Store, proxy: FaultyProxy) -> None:
    repo = proxied.open()
    proxy.down = True
    before = proxy.connections
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError) as caught:
        repo.get_bytes("backups/main/b10/manifest.json")
    assert proxy.connections - before == ATTEMPTS  # each attempt one request: no second retry layer beneath
    assert time.monotonic() - started < 5
    message, hint = caught.value.message, caught.value.hint or ""
    assert message.startswith(f"cannot reach {proxied.policy.repository.url}")  # the repository
    assert "get_bytes backups/main/b10/manifest.json" in message  # the operation and its key
    assert f"after {ATTEMPTS} attempts" in message
    assert "endpoint_url" in hint and "run the command again" in hint and "repository.retry" in hint
    assert isinstance(caught.value, RegalError)
    for operation in (lambda: repo.size("x"), lambda: list(repo.list("backups/")), lambda: repo.put_bytes("x", b"")):
        with pytest.raises(StorageUnavailableError, match=f"after {ATTEMPTS} attempts"):
            operation()


def test_a_permanent_error_is_not_retried(tmp_path: Path, s3_endpoint: str, proxy: FaultyProxy) -> None:
    policy = _policy(tmp_path, {"url": "s3://conformance-no-such-bucket/regal", "endpoint_url": proxy.endpoint,
                                "region": "us-east-1"})
    repo = open_repository(policy)
    before = proxy.connections
    with pytest.raises(RegalError, match="does not exist") as caught:
        repo.get_bytes("backups/main/b11/manifest.json")
    assert type(caught.value) is RegalError
    assert proxy.connections - before == 1
