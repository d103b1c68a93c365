"""The `redis` source kind."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, cast

from ...crypto import Keyring
from ...errors import IntegrityError, RegalError
from ...findings import Finding, finding, readable_directory
from ...manifest import Manifest
from ...outcomes import WARN, CheckOutcome, CheckSpec
from ...pipeline import StoredBackup
from ...settings import PolicyView, TargetSettings
from ...workspace import private_directory
from ..base import (
    Captured,
    Restored,
    RestoredFindings,
    RestoreRequest,
    Source,
    StoreObject,
    not_empty_refusal,
)
from ..streams import file_chunks
from .server import (
    RDB_CONTENT,
    RDB_OBJECT,
    ScratchRedis,
    aof_files,
    check_rdb,
    client,
    compare_restored,
    copy_keys,
    describe_url,
    key_sample,
    persistence_problems,
    persistence_settings,
    rdb_stream,
    server_facts,
)
from .target import RedisTarget

RESTORE_STEPS = """To put this RDB back into a Redis server:
  1. stop the server (redis-cli SHUTDOWN NOSAVE, or your service manager);
  2. copy {path} to the server's `dir` under its `dbfilename` (CONFIG GET dir / dbfilename);
  3. if the server uses AOF, move its appendonlydir (or appendonly.aof) aside: with AOF on, Redis loads the
     AOF, not the RDB; start the server with appendonly no;
  4. start it, check DBSIZE, then CONFIG SET appendonly yes (Redis rewrites the AOF from memory) and put
     `appendonly yes` back in redis.conf."""


@dataclass(frozen=True)
class RedisRestoreOptions:
    keys: str | None = None  # into a live server: only the keys matching this glob (--keys)


class RedisSource(Source):
    kind = "redis"
    label = "Redis server"
    checks: ClassVar[dict[str, CheckSpec]] = {
        "persistence_configured": CheckSpec(
            WARN, False, "The Redis server keeps its own copies as the runbook says: RDB snapshots at least every "
                         "5 minutes and the append-only file on."),
    }
    restore_test_proves = "key counts, TTL counts and the key sample"

    def capture(self, target: TargetSettings, store: StoreObject) -> Captured:
        """The RDB over the replication protocol (checked with redis-check-rdb), and the AOF files when the
        server's data directory is readable here."""
        settings = cast(RedisTarget, target)
        url = settings.resolved_url()
        facts = {**server_facts(client(url)), "endpoint": describe_url(url),
                 "key_sample": key_sample(url)}
        with private_directory("rdb") as tmp:  # private (0700); removed at once
            copy_path = Path(tmp) / RDB_OBJECT
            with copy_path.open("wb") as copy:
                def teed() -> Iterator[bytes]:
                    for chunk in rdb_stream(url):
                        copy.write(chunk)
                        yield chunk

                objects = [store(RDB_OBJECT, RDB_CONTENT, teed(), -1)]
            facts["rdb"] = check_rdb(copy_path)
        if settings.data_dir:
            objects += [store(name, "Redis append-only file", file_chunks(path), -1)
                        for name, path in aof_files(Path(settings.data_dir), facts["persistence"])]
        return Captured(objects, facts, {"redis-check-rdb": "redis " + str(facts["server_version"])})

    def preflight(self, subject: str, target: TargetSettings) -> list[Finding]:
        settings = cast(RedisTarget, target)
        url = settings.resolved_url()
        reached = finding(subject, "reachable", lambda: f"{describe_url(url)}: Redis "
                          f"{server_facts(client(url))['server_version']}", "check the URL and the password")
        found = [reached]
        if reached.passed:
            problems = persistence_problems(persistence_settings(client(url)))
            found.append(Finding(subject, "persistence", not problems, "; ".join(problems) or "RDB and AOF as the "
                                 "runbook asks", "set save/appendonly as docs/policy.md says" if problems else ""))
        if settings.data_dir:
            found.append(finding(subject, "data_dir", lambda: readable_directory(Path(str(settings.data_dir))),
                                 "run as a user that can read the server's data directory, or drop data_dir"))
        return found

    def check_structure(self, backup: StoredBackup) -> str:
        with private_directory("check") as tmp:
            rdb = check_rdb(backup.to_file(RDB_OBJECT, Path(tmp) / RDB_OBJECT))
        recorded = backup.manifest.source["rdb"]["keys"]
        if rdb["keys"] != recorded:
            raise IntegrityError(f"the RDB holds {rdb['keys']} keys, the manifest says {recorded}",
                                 "this backup is damaged: use another one")
        return f"redis-check-rdb reads {rdb['keys']} keys"

    def kind_checks(self, policy: PolicyView, target: str, manifest: Manifest,
                    earlier_good: Iterator[Manifest], trigger: Mapping[str, str]) -> list[CheckOutcome]:
        """How the Redis server keeps its own copies now (a WARN: the backup itself is fine)."""
        try:
            url = cast(RedisTarget, policy.target(target)).resolved_url()
            settings = persistence_settings(client(url))
        except RegalError as exc:
            return [CheckOutcome("persistence_configured", False, exc.message)]
        problems = persistence_problems(settings)
        description = "; ".join(problems) or f"RDB snapshots ({settings['save']}) and the append-only file are on"
        return [CheckOutcome("persistence_configured", not problems, description,
                             metadata={"save": settings["save"], "appendonly": settings["appendonly"]})]

    def summary(self, manifest: Manifest) -> dict[str, Any]:
        return {"keys": manifest.source.get("rdb", {}).get("keys", 0)}

    def describe_destination(self, to: str) -> str:
        return describe_url(to) if to.startswith(("redis://", "rediss://")) else to

    def restore_options(self, choices: Mapping[str, Any]) -> RedisRestoreOptions:
        return RedisRestoreOptions(keys=choices.get("keys"))

    def restore(self, backup: StoredBackup, request: RestoreRequest) -> Restored:
        """Into a live server (the keys matching --keys, through a scratch server holding the backup), or as
        an RDB file for a stopped server."""
        manifest = backup.manifest
        keys = request.kind_options(RedisRestoreOptions).keys
        if request.to.startswith(("redis://", "rediss://")):
            return self._copy_keys(backup, request, keys)
        if keys:
            raise RegalError("--keys copies keys into a live server", "give --to redis://... with --keys")
        started = time.monotonic()
        path = Path(request.to) / RDB_OBJECT
        if path.exists() and not request.drop_existing:
            raise not_empty_refusal(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if request.before_writing:
            request.before_writing()
        backup.install(RDB_OBJECT, path)
        rdb = manifest.source["rdb"]
        return Restored(str(path), f"restored {manifest.backup_id} to {path} ({rdb['keys']} keys, RDB version "
                                   f"{rdb['rdb_version']})", seconds={"fetch_decrypt": time.monotonic() - started},
                        details={"path": str(path)}, next_steps=RESTORE_STEPS.format(path=path))

    def _copy_keys(self, backup: StoredBackup, request: RestoreRequest, keys: str | None) -> Restored:
        from ...settings import fill_environment

        if not keys:
            raise RegalError("say which keys to copy back", "add --keys PATTERN (a Redis glob, e.g. 'session:*')")
        with private_directory("restore") as tmp:
            backup.to_file(RDB_OBJECT, Path(tmp) / RDB_OBJECT)
            with ScratchRedis(Path(tmp)) as scratch:
                if request.before_writing:
                    request.before_writing()
                counts = copy_keys(scratch.url, fill_environment(request.to, "--to"), keys,
                                   replace=request.drop_existing)
        where = describe_url(request.to)
        return Restored(where, f"copied {counts['copied']} keys matching {keys!r} from "
                               f"{backup.manifest.backup_id} into {where}; {counts['skipped_existing']} existing keys "
                               "left alone" + ("" if request.drop_existing else " (--drop-existing replaces them)"),
                        details=counts)

    @contextlib.contextmanager
    def scratch_destination(self, work_dir: Path | None, manifest: Manifest | None = None) -> Iterator[str]:
        with private_directory("redis-test", work_dir) as tmp:
            yield str(tmp)

    def verify_restored(self, destination: str, manifest: Manifest, keyring: Keyring, jobs: int) -> RestoredFindings:
        """The RDB loaded by a scratch redis-server: key counts, TTL counts and the key sample compared."""
        found = RestoredFindings()
        phase = time.monotonic()
        with ScratchRedis(Path(destination)) as scratch:
            found.seconds["load"] = time.monotonic() - phase
            phase = time.monotonic()
            found.details, found.problems = compare_restored(scratch.url, manifest.source)
            found.seconds["validate"] = time.monotonic() - phase
        return found
