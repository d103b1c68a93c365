"""Redis targets against real redis-server processes with real data (strings, hashes, sets, expiring keys,
several databases): the RDB over the replication protocol, AOF files, checks, restore tests and restore."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from regal_dagster.engine.backup import run_backup
from regal_dagster.engine.checks import run_checks
from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.policy import Policy, load_policy
from regal_dagster.engine.restore_test import run_restore_test
from regal_dagster.engine.storage import open_repository

from .conftest import init_repository, invoke_cli

PASSWORD = "redis-s3cret-pw"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self, directory: Path, *args: str) -> None:
        self.directory = directory
        self.port = free_port()
        self.process = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                         "--dir", str(directory), *args],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = redis.Redis(port=self.port, password=PASSWORD if "--requirepass" in args else None)
        for _ in range(100):
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)

    def fill(self) -> None:
        c = self.client
        for i in range(500):
            c.set(f"session:{i}", f"value {i} ✓".encode())
        c.hset("customer:1", mapping={"name": "José Müller", "email": "jose@example.com"})
        c.sadd("tags", "a", "b", "c")
        for i in range(50):
            c.set(f"ttl:{i}", "soon gone", ex=3600)
        other = redis.Redis(port=self.port, db=3, password=c.connection_pool.connection_kwargs.get("password"))
        other.rpush("queue", *[f"job{i}" for i in range(20)])

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def plain_redis(tmp_path: Path) -> Iterator[RedisServer]:
    (tmp_path / "redis-plain").mkdir()
    server = RedisServer(tmp_path / "redis-plain", "--save", "", "--appendonly", "no", "--requirepass", PASSWORD)
    server.fill()
    yield server
    server.stop()


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[RedisServer]:
    (tmp_path / "redis-aof").mkdir()
    server = RedisServer(tmp_path / "redis-aof", "--save", "300 1", "--appendonly", "yes")
    server.fill()
    yield server
    server.stop()


def _policy(tmp_path: Path, target: dict[str, Any]) -> Policy:
    path = tmp_path / "regal_backup.yaml"
    path.write_text(yaml.safe_dump({
        "repository": {"url": "repository"},
        "encryption": {"keyset": "keyset.json", "master_key": {"env": "REGAL_TEST_MASTER_KEY"}},
        "targets": {"cache": {"kind": "redis", **target}}}))
    policy = load_policy(path)
    init_repository(policy)
    return policy


def test_redis_round_trip_with_checks_and_a_restore_test(plain_redis: RedisServer, tmp_path: Path,
                                                         master_key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_PASSWORD", PASSWORD)
    policy = _policy(tmp_path, {"url": f"redis://:${{REDIS_PASSWORD}}@127.0.0.1:{plain_redis.port}/0"})

    manifest = run_backup(policy, "cache").manifest

    assert [o.name for o in manifest.objects] == ["dump.rdb"]
    facts = manifest.source
    assert facts["rdb"]["keys"] == 553 and facts["rdb"]["expires"] == 50 and facts["rdb"]["rdb_version"] >= 9
    assert facts["rdb"]["databases"] == [0, 3] and facts["server_version"].startswith("7")
    assert facts["rdb"]["keyspace"] == {"0": {"keys": 552, "expires": 50}, "3": {"keys": 1, "expires": 0}}
    assert facts["keyspace_at_backup"] == {"db0": {"keys": 552, "expires": 50}, "db3": {"keys": 1, "expires": 0}}
    assert sum(len(v) for v in facts["key_sample"].values()) >= 5
    assert PASSWORD not in json.dumps(manifest.body())  # not even inside the encrypted manifest

    repo, keyring = open_repository(policy), load_keyring(policy)
    record = run_checks(policy, repo, keyring, manifest.backup_id)
    assert record.passed  # the persistence warning does not make the backup bad
    persistence = record.outcome("persistence_configured")
    assert persistence is not None and not persistence.passed and persistence.severity == "WARN"
    assert "save 300 1" in persistence.description and "appendonly yes" in persistence.description
    assert "redis-check-rdb reads 553 keys" in record.outcome("integrity").description  # type: ignore[union-attr]

    result = run_restore_test(policy, repo, keyring, manifest)
    assert result.validation_passed, result.problems
    assert result.details["keys_without_ttl"] == 503 and result.details["sampled_keys_differing"] == 0
    assert set(result.seconds) >= {"fetch_decrypt", "load", "validate", "total"}


def test_a_restore_test_notices_a_changed_value(plain_redis: RedisServer, tmp_path: Path, master_key: str) -> None:
    policy = _policy(tmp_path, {"url": f"redis://:{PASSWORD}@127.0.0.1:{plain_redis.port}/0"})
    manifest = run_backup(policy, "cache").manifest
    sample = {db: {key: "0" * 64 for key in keys} for db, keys in manifest.source["key_sample"].items()}
    rdb = {**manifest.source["rdb"], "keyspace": {**manifest.source["rdb"]["keyspace"], "3": {"keys": 2, "expires": 0}}}
    lying = manifest.model_copy(update={"source": {**manifest.source, "key_sample": sample, "rdb": rdb}})

    result = run_restore_test(policy, open_repository(policy), load_keyring(policy), lying)

    sampled = sum(len(v) for v in sample.values())
    assert result.problems == ["database 3: 1 keys without a TTL restored, the RDB held 2",
                               f"{sampled} of {sampled} sampled keys are missing or hold other values"]


def test_aof_files_are_backed_up_and_persistence_passes(persistent_redis: RedisServer, tmp_path: Path,
                                                        master_key: str) -> None:
    policy = _policy(tmp_path, {"url": f"redis://127.0.0.1:{persistent_redis.port}",
                                "data_dir": str(persistent_redis.directory)})
    manifest = run_backup(policy, "cache").manifest

    names = [o.name for o in manifest.objects]
    assert names[0] == "dump.rdb" and any(n.endswith(".manifest") for n in names)
    assert any(".base." in n for n in names) and any(".incr." in n for n in names)
    record = run_checks(policy, open_repository(policy), load_keyring(policy), manifest.backup_id)
    assert record.passed and record.outcome("persistence_configured").passed  # type: ignore[union-attr]


def test_restore_writes_an_rdb_a_stopped_server_loads(plain_redis: RedisServer, tmp_path: Path,
                                                      master_key: str) -> None:
    policy = _policy(tmp_path, {"url": f"redis://:{PASSWORD}@127.0.0.1:{plain_redis.port}"})
    manifest = run_backup(policy, "cache").manifest
    target = tmp_path / "restored"

    done = invoke_cli(["restore", manifest.backup_id, "--to", str(target), "--json", "--policy",
                       str(tmp_path / "regal_backup.yaml")])

    assert done.returncode == 0, done.stderr
    restored = json.loads(done.stdout)  # the CLI's one JSON envelope (docs/cli-json.md), restore's fields
    assert set(restored) == {"schema", "command", "ok", "exit_code", "warnings", "backup_id", "target", "kind",
                             "destination", "passed", "problems", "seconds", "details", "erasures"}
    assert {k: restored[k] for k in ("schema", "command", "ok", "exit_code", "backup_id", "target", "kind",
                                     "passed", "problems", "details")} == {
        "schema": "regal-backup-cli/1", "command": "restore", "ok": True, "exit_code": 0,
        "backup_id": manifest.backup_id, "target": "cache", "kind": "redis", "passed": True, "problems": [],
        "details": {"path": str(target / "dump.rdb")}}
    assert str(target) in restored["destination"]
    again = invoke_cli(["restore", manifest.backup_id, "--to", str(target), "--policy",
                        str(tmp_path / "regal_backup.yaml")])
    assert again.returncode == 1 and "--drop-existing" in again.stderr
    server = RedisServer(target, "--dbfilename", "dump.rdb", "--appendonly", "no", "--save", "")
    try:
        assert server.client.dbsize() == 552
        assert server.client.hget("customer:1", "name") == "José Müller".encode()
        assert redis.Redis(port=server.port, db=3).llen("queue") == 20
        assert 0 < server.client.ttl("ttl:7") <= 3600
    finally:
        server.stop()


def test_init_adds_a_redis_target_named_cache(tmp_path: Path) -> None:
    done = invoke_cli(["init", str(tmp_path / "regal"), "--postgres-dsn", "postgresql://x@db/pos",
                       "--redis-url", "redis://:${REDIS_PASSWORD}@cache:6379/0", "--json"])
    assert done.returncode == 0, done.stderr
    policy = load_policy(json.loads(done.stdout)["policy"])
    assert policy.targets["cache"].kind == "redis"
    assert policy.targets["cache"].url == "redis://:${REDIS_PASSWORD}@cache:6379/0"  # type: ignore[union-attr]


def test_the_redis_target_is_an_asset_with_its_checks(plain_redis: RedisServer, tmp_path: Path,
                                                      master_key: str) -> None:
    import dagster as dg

    from regal_dagster.defs import build_definitions

    from .conftest import backup_then_checks

    _policy(tmp_path, {"url": f"redis://:{PASSWORD}@127.0.0.1:{plain_redis.port}"})
    defs = build_definitions(str(tmp_path / "regal_backup.yaml"))
    result, checks = backup_then_checks(defs, dg.DagsterInstance.ephemeral())
    assert result.success and checks is not None
    evaluations = {e.check_name: e for e in checks.get_asset_check_evaluations()}
    assert set(evaluations) == {"manifest", "integrity", "encryption", "size", "persistence_configured",
                                "key_cryptoperiod"}
    assert evaluations["persistence_configured"].severity == dg.AssetCheckSeverity.WARN
    assert not evaluations["persistence_configured"].passed and evaluations["integrity"].passed
    assert result.asset_materializations_for_node("redis__cache__backup")


def test_selected_keys_are_copied_back_into_a_live_server(plain_redis: RedisServer, tmp_path: Path,
                                                          master_key: str) -> None:
    policy_file = tmp_path / "regal_backup.yaml"
    _policy(tmp_path, {"url": f"redis://:{PASSWORD}@127.0.0.1:{plain_redis.port}"})
    manifest = run_backup(load_policy(policy_file), "cache").manifest
    live = plain_redis.client
    live.delete(*[f"session:{i}" for i in range(10)])  # lost by mistake
    live.set("session:11", "changed since")
    url = f"redis://:{PASSWORD}@127.0.0.1:{plain_redis.port}"

    done = invoke_cli(["restore", manifest.backup_id, "--to", url, "--keys", "session:1*", "--json",
                       "--policy", str(policy_file)])

    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout)["details"]  # restore's kind-specific facts
    # session:1, session:10..19, session:100..199 match; only session:1 was deleted, the rest exist
    assert counts["copied"] == 1 and counts["skipped_existing"] == 110
    assert live.get("session:1") == "value 1 ✓".encode() and live.get("session:11") == b"changed since"
    assert live.get("session:2") is None  # not selected
    assert redis.Redis(port=plain_redis.port, db=3, password=PASSWORD).dbsize() == 1  # other databases untouched
    assert PASSWORD not in done.stdout + done.stderr
