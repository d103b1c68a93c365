"""Redis: the dataset as an RDB taken over the network, the way a replica (and `redis-cli --rdb`) gets it.

The server forks and streams a point-in-time RDB; it never stops serving. The transfer goes straight into
the backup pipeline, and a private temporary copy is checked with `redis-check-rdb`, which reports the RDB
version, the server version and replication offset written into it, and the key and expiry counts. A
sample of keys (key and value digests: neither reaches the manifest in clear) is recorded so a restore
test can compare values, not only counts.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self, cast
from urllib.parse import quote, urlsplit, urlunsplit

import psutil
import redis

from ...environment import child_environment
from ...errors import RegalError, ToolError
from ...pipeline import CHUNK
from ...postgresql.watchdog import SERVER_PID_FILE

RDB_OBJECT = "dump.rdb"
RDB_CONTENT = "Redis RDB snapshot (replication transfer)"
SAMPLE_SIZE = 20
_EOF_MARK_LENGTH = 40


def describe_url(url: str) -> str:
    """host:port/db, never the password."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix:{parts.path}"
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}{parts.path or '/0'}"


def client(url: str) -> redis.Redis:
    try:
        connection = redis.Redis.from_url(url, socket_timeout=15, socket_connect_timeout=10)
        connection.ping()
        return connection
    except redis.RedisError as exc:
        raise RegalError(f"cannot reach Redis at {describe_url(url)}: {type(exc).__name__}",
                         "check that the server is up and the URL and password in the policy") from None


def server_facts(connection: redis.Redis) -> dict[str, Any]:
    info = connection.info()
    keyspace = {name: {"keys": v["keys"], "expires": v["expires"]}
                for name, v in connection.info("keyspace").items()}
    return {"server_version": info["redis_version"], "role": info.get("role"),
            "master_repl_offset": info.get("master_repl_offset"), "keyspace_at_backup": keyspace,
            "persistence": persistence_settings(connection)}


def persistence_settings(connection: redis.Redis) -> dict[str, Any]:
    config = connection.config_get("save") | connection.config_get("appendonly") | connection.config_get("dir")
    return {"save": config.get("save", ""), "appendonly": config.get("appendonly", "no"), "dir": config.get("dir")}


def persistence_problems(settings: dict[str, Any]) -> list[str]:
    """How the server differs from the runbook: RDB snapshots at least every 5 minutes, and AOF on."""
    problems = []
    rules = [int(x) for x in str(settings.get("save", "")).split()]
    intervals = [rules[i] for i in range(0, len(rules) - 1, 2)]
    if not intervals:
        problems.append('RDB snapshots are off (save ""): set `save 300 1` (CONFIG SET save "300 1", and in '
                        'redis.conf)')
    elif min(intervals) > 300:
        problems.append(f"the shortest RDB snapshot interval is {min(intervals)} s: add a rule of at most 300 s "
                        "(e.g. `save 300 1`)")
    if settings.get("appendonly") != "yes":
        problems.append("the append-only file is off: set `appendonly yes` (CONFIG SET appendonly yes, and in "
                        "redis.conf)")
    return problems


def key_sample(url: str, size: int = SAMPLE_SIZE) -> dict[str, dict[str, str]]:
    """db -> {key hash: value digest} for keys without a TTL, drawn at random."""
    sample: dict[str, dict[str, str]] = {}
    for name in client(url).info("keyspace"):
        db = int(name.removeprefix("db"))
        scoped = in_database(url, db)
        picked: dict[str, str] = {}
        for _ in range(size * 3):
            key = cast(bytes | None, scoped.randomkey())
            if key is None or len(picked) >= size:
                break
            if scoped.ttl(key) == -1 and (digest := value_digest(scoped, key)) is not None:
                picked[hashlib.sha256(key).hexdigest()] = digest
        sample[str(db)] = picked
    return sample


def in_database(url: str, db: int) -> redis.Redis:
    """A client of database `db` on the server at `url` (the URL's own /db is replaced: redis-py lets it win)."""
    parts = urlsplit(url)
    where = parts._replace(query=f"db={db}") if parts.scheme == "unix" else parts._replace(path=f"/{db}")
    return redis.Redis.from_url(urlunsplit(where), socket_timeout=15,
                                socket_connect_timeout=10)


def sample_differences(url: str, sample: dict[str, dict[str, str]]) -> int:
    """How many sampled keys are missing from the server at `url` or hold another value there."""
    differ = 0
    for db, picked in sample.items():
        scoped = in_database(url, int(db))
        keys_by_hash = {hashlib.sha256(k).hexdigest(): k for k in scoped.scan_iter(count=1000)}
        for key_hash, value_hash in picked.items():
            key = keys_by_hash.get(key_hash)
            if key is None or value_digest(scoped, key) != value_hash:
                differ += 1
    return differ


def value_digest(connection: redis.Redis, key: bytes) -> str | None:
    """SHA-256 of a key's type and value in a canonical form (the same whatever the internal encoding,
    which DUMP's bytes are not: a server may encode a loaded value differently)."""
    found = connection.type(key)
    kind = found.decode() if isinstance(found, bytes) else str(found)
    if kind == "string":
        value: Any = connection.get(key)
    elif kind == "hash":
        value = sorted(connection.hgetall(key).items())
    elif kind == "set":
        value = sorted(connection.smembers(key))
    elif kind == "list":
        value = connection.lrange(key, 0, -1)
    elif kind == "zset":
        value = connection.zrange(key, 0, -1, withscores=True)
    elif kind == "stream":
        value = connection.xrange(key)
    else:
        return None  # gone meanwhile, or a module type
    return hashlib.sha256(repr((kind, value)).encode()).hexdigest()


def rdb_stream(url: str) -> Iterator[bytes]:
    """The server's RDB, as a replica receives it (SYNC), in chunks."""
    parts = urlsplit(url)
    host, port = parts.hostname or "localhost", parts.port or 6379
    try:
        raw = socket.create_connection((host, port), timeout=60)
    except OSError as exc:
        raise RegalError(f"cannot reach Redis at {describe_url(url)}: {exc}", "check the URL in the policy") from None
    sock: socket.socket = ssl.create_default_context().wrap_socket(raw, server_hostname=host) \
        if parts.scheme == "rediss" else raw
    with sock, sock.makefile("rb", buffering=CHUNK) as stream:
        if parts.password:
            auth = [parts.username, parts.password] if parts.username else [parts.password]
            _command(sock, stream, "AUTH", *auth)
        _command(sock, stream, "REPLCONF", "capa", "eof")
        _command(sock, stream, "REPLCONF", "rdb-only", "1", optional=True)  # Redis 7: no command stream after
        sock.sendall(b"SYNC\r\n")
        header = stream.readline()
        while header in (b"\n", b"\r\n"):  # keep-alives while the server forks and writes
            header = stream.readline()
        if not header.startswith(b"$"):
            raise ToolError(f"Redis refused the RDB transfer: {header.decode(errors='replace').strip()}",
                            "the backup user needs the SYNC and REPLCONF commands (ACL) on this server")
        if header.startswith(b"$EOF:"):
            yield from _until_mark(stream, header[5:5 + _EOF_MARK_LENGTH])
        else:
            yield from _exactly(stream, int(header[1:]))


def _command(sock: socket.socket, stream: Any, *args: str, optional: bool = False) -> None:
    parts = [f"*{len(args)}\r\n".encode()] + [f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args]
    sock.sendall(b"".join(parts))
    reply = stream.readline()
    if reply.startswith(b"-") and not optional:
        message = "authentication failed" if args[0] == "AUTH" else reply.decode(errors="replace").strip()
        raise RegalError(f"Redis refused {args[0]}: {message}", "check the user and password in the policy's URL")


def _exactly(stream: Any, size: int) -> Iterator[bytes]:
    left = size
    while left:
        chunk = stream.read(min(CHUNK, left))
        if not chunk:
            raise ToolError("the RDB transfer ended early", "run the backup again; check the server's log")
        left -= len(chunk)
        yield chunk


def _until_mark(stream: Any, mark: bytes) -> Iterator[bytes]:
    """Diskless transfer: the payload ends with the 40-byte mark announced in its header."""
    held = b""
    while True:
        chunk = stream.read1(CHUNK)
        if not chunk:
            raise ToolError("the RDB transfer ended early", "run the backup again; check the server's log")
        held += chunk
        if held.endswith(mark):
            if len(held) > _EOF_MARK_LENGTH:
                yield held[:-_EOF_MARK_LENGTH]
            return
        if len(held) > _EOF_MARK_LENGTH:
            yield held[:-_EOF_MARK_LENGTH]
            held = held[-_EOF_MARK_LENGTH:]


def aof_files(data_dir: Path, persistence: dict[str, Any]) -> list[tuple[str, Path]]:
    """(object name, path) of the server's append-only files: Redis 7's multi-part AOF directory (manifest,
    base and incremental files), or a single appendonly.aof of older servers."""
    directory = data_dir / "appendonlydir"
    if directory.is_dir():
        return [(f"aof/{p.name}", p) for p in sorted(directory.iterdir()) if p.is_file()]
    single = data_dir / "appendonly.aof"
    if single.is_file():
        return [("aof/appendonly.aof", single)]
    if persistence.get("appendonly") == "yes":
        raise RegalError(f"AOF is on but {data_dir} holds no append-only files",
                         "check the target's data_dir in the policy: it must be the server's `dir`")
    return []


def check_rdb(path: Path) -> dict[str, Any]:
    """`redis-check-rdb` on an RDB file: its facts, or ToolError if it does not check."""
    try:
        run = subprocess.run(["redis-check-rdb", str(path)], capture_output=True, text=True, check=False, timeout=3600,
                             env=child_environment())
    except FileNotFoundError:
        raise ToolError("redis-check-rdb is not installed", "install the redis-tools package") from None
    out = run.stdout + run.stderr
    if run.returncode != 0 or "RDB looks OK" not in out:
        raise ToolError(f"redis-check-rdb rejects the RDB: {out.strip()[-400:]}",
                        "the RDB is damaged: use another backup")
    aux = dict(re.findall(r"AUX FIELD ([\w-]+) = '([^']*)'", out))
    counts = {name: int(n) for n, name in re.findall(r"\[info\] (\d+) (keys read|expires|already expired)", out)}
    with path.open("rb") as f:
        header = f.read(9)
        per_database = {db: _resizedb(f, int(offset))
                        for offset, db in re.findall(r"\[offset (\d+)\] Selecting DB ID (\d+)", out)}
    return {"rdb_version": int(header[5:9]) if header[:5] == b"REDIS" else None,
            "rdb_server_version": aux.get("redis-ver"), "repl_offset": int(aux.get("repl-offset", 0) or 0),
            "keys": counts.get("keys read", 0), "expires": counts.get("expires", 0),
            "already_expired": counts.get("already expired", 0),
            "databases": [int(db) for db in per_database], "keyspace": per_database}


def _resizedb(f: Any, offset: int) -> dict[str, int]:
    """The key and expiry counts a database section of the RDB announces: the RESIZEDB opcode that follows
    SELECTDB, at the offset redis-check-rdb reports for "Selecting DB ID"."""
    f.seek(offset)
    data = f.read(32)
    if not data or data[0] != 0xFB:  # no RESIZEDB (very old writers): counts unknown
        return {"keys": -1, "expires": -1}
    keys, position = _length(data, 1)
    expires, _ = _length(data, position)
    return {"keys": keys, "expires": expires}


def _length(data: bytes, position: int) -> tuple[int, int]:
    """An RDB length encoding at `position`: (value, next position)."""
    first = data[position]
    kind = first >> 6
    if kind == 0:
        return first & 0x3F, position + 1
    if kind == 1:
        return ((first & 0x3F) << 8) | data[position + 1], position + 2
    if first == 0x80:
        return int.from_bytes(data[position + 1:position + 5], "big"), position + 5
    if first == 0x81:
        return int.from_bytes(data[position + 1:position + 9], "big"), position + 9
    raise ToolError("the RDB has an unexpected length encoding", "the RDB is damaged: use another backup")


# --- scratch servers and restores ------------------------------------------------------------------

class ScratchRedis:
    """A throwaway redis-server over a (private) directory holding dump.rdb: no TCP, a Unix socket in that
    0700 directory and a random password; a watchdog stops it if this process dies; stopped on exit."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.password = secrets.token_urlsafe(24)
        self.process: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.directory / "redis.sock"

    @property
    def url(self) -> str:
        return f"unix://:{quote(self.password, safe='')}@{self.socket_path}?db=0"

    def __enter__(self) -> Self:
        config = self.directory / "scratch-redis.conf"  # the password stays off the command line
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"port 0\nunixsocket {self.socket_path}\nunixsocketperm 700\nrequirepass {self.password}\n"
                    f"dir {self.directory}\ndbfilename {RDB_OBJECT}\nsave \"\"\nappendonly no\n")
        try:
            self.process = subprocess.Popen(["redis-server", str(config)], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL, env=child_environment())
        except FileNotFoundError:
            raise ToolError("redis-server is not installed", "install the redis-server package") from None
        try:
            started = psutil.Process(self.process.pid).create_time()
            (self.directory / SERVER_PID_FILE).write_text(f"{self.process.pid} {started!r}\n")
            me = psutil.Process()
            self._watchdog = subprocess.Popen(
                [sys.executable, "-m", "regal_dagster.engine.postgresql.watchdog", str(me.pid),
                 repr(me.create_time()), str(self.directory)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env=child_environment(), start_new_session=True)
            connection = redis.Redis(unix_socket_path=str(self.socket_path), password=self.password,
                                     socket_timeout=30)
            for _ in range(600):  # loading a big RDB takes a while; PING answers LOADING until it is done
                if self.process.poll() is not None:
                    raise ToolError("the scratch redis-server exited while loading the RDB", "the RDB is damaged")
                try:
                    connection.ping()
                    return self
                except (redis.BusyLoadingError, redis.ConnectionError):
                    time.sleep(0.1)
            raise ToolError("the scratch redis-server did not come up", "see the server's log")
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self._watchdog is not None:
            self._watchdog.kill()
            self._watchdog.wait()
            self._watchdog = None


def compare_restored(url: str, facts: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The restored server's keyspace against the backup's facts: (what was found, problems)."""
    connection = client(url)
    keyspace = {name.removeprefix("db"): {"keys": v["keys"], "expires": v["expires"]}
                for name, v in connection.info("keyspace").items()}
    lasting = sum(v["keys"] - v["expires"] for v in keyspace.values())
    volatile = sum(v["expires"] for v in keyspace.values())
    rdb = facts["rdb"]
    problems = []
    if lasting != rdb["keys"] - rdb["expires"]:
        problems.append(f"{lasting} keys without a TTL restored, the RDB held {rdb['keys'] - rdb['expires']}")
    if volatile > rdb["expires"]:
        problems.append(f"{volatile} keys with a TTL restored, more than the RDB's {rdb['expires']}")
    for db, expected in sorted(rdb.get("keyspace", {}).items()):  # per database (TTL'd keys may expire)
        found = keyspace.get(db, {"keys": 0, "expires": 0})
        if expected["keys"] >= 0 and found["keys"] - found["expires"] != expected["keys"] - expected["expires"]:
            problems.append(f"database {db}: {found['keys'] - found['expires']} keys without a TTL restored, the "
                            f"RDB held {expected['keys'] - expected['expires']}")
    differ = sample_differences(url, facts.get("key_sample", {}))
    if differ:
        sampled = sum(len(v) for v in facts.get("key_sample", {}).values())
        problems.append(f"{differ} of {sampled} sampled keys are missing or hold other values")
    return {"keyspace": keyspace, "keys_without_ttl": lasting, "keys_with_ttl": volatile,
            "sampled_keys_differing": differ}, problems


def copy_keys(source_url: str, target_url: str, pattern: str, replace: bool) -> dict[str, int]:
    """Copy the keys matching `pattern` (a Redis glob), with their TTLs, from one server to another, database by
    database. Keys that exist in the target are skipped unless `replace`. Returns copied/skipped counts."""
    copied = skipped = 0
    for name in client(source_url).info("keyspace"):
        db = int(name.removeprefix("db"))
        source, target = in_database(source_url, db), in_database(target_url, db)
        for key in set(source.scan_iter(match=pattern, count=1000)):  # SCAN may return a key twice
            payload, ttl = source.dump(key), source.pttl(key)
            if payload is None:
                continue  # expired meanwhile
            try:
                target.restore(key, max(ttl, 0), payload, replace=replace)
                copied += 1
            except redis.ResponseError as exc:
                if "BUSYKEY" not in str(exc):
                    raise RegalError(f"Redis refused to restore a key: {exc}", "check the target server") from None
                skipped += 1
    return {"copied": copied, "skipped_existing": skipped, **copy_functions(source_url, target_url, replace)}


def copy_functions(source_url: str, target_url: str, replace: bool) -> dict[str, int]:
    """Copy the Redis 7 function libraries (FUNCTION LOAD of each library's code) from one server to
    another; a library the target has already is left alone unless `replace`. Servers before 7: none."""
    source, target = client(source_url), client(target_url)
    try:
        libraries = source.execute_command("FUNCTION", "LIST", "WITHCODE")
    except redis.ResponseError:
        return {"function_libraries_copied": 0, "function_libraries_skipped": 0}  # no functions before Redis 7
    existing = {_field(library, "library_name") for library in target.execute_command("FUNCTION", "LIST")}
    copied = skipped = 0
    for library in libraries:
        name = _field(library, "library_name")
        if name in existing and not replace:
            skipped += 1
            continue
        code = _field(library, "library_code")
        try:
            target.execute_command("FUNCTION", "LOAD", *(["REPLACE"] if name in existing else []), code)
        except redis.ResponseError as exc:
            raise RegalError(f"Redis refused to load the function library {name!r}: {exc}",
                             "check the target server (Redis 7 or newer, same modules)") from None
        copied += 1
    return {"function_libraries_copied": copied, "function_libraries_skipped": skipped}


def _field(reply: Any, name: str) -> Any:
    """A field of a FUNCTION LIST entry (a flat [name, value, ...] list, or a map under RESP3)."""
    if isinstance(reply, dict):
        return reply.get(name, reply.get(name.encode()))
    pairs = dict(zip(reply[::2], reply[1::2], strict=False))
    value = pairs.get(name, pairs.get(name.encode()))
    return value.decode() if isinstance(value, bytes) and name == "library_name" else value
