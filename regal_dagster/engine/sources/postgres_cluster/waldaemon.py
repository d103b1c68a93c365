"""`regal-backup wal daemon TARGET`: the resident archiver and prefetcher of a `postgres_cluster` target, in the
manner of pgBackRest's archive-async and WAL-G's daemon: PostgreSQL's archive_command and restore_command stay
`wal push %p` / `wal get %f %p`, which hand their work to it over a UNIX socket (engine/wal_daemon_socket.py) and
so pay no start-up of the engine per 16 MB segment.

Archiving. The first push names the server's pg_wal; from then on the daemon uploads, in parallel (`workers`) and a
batch at a time, the WAL files PostgreSQL has marked `.ready` (archive_status), ahead of PostgreSQL asking. A push
is answered only once that file is sealed in the repository (object, then sealed record: `wal.push_wal`, the one
write path) or refused (other content already archived under its name, the repository unreachable): PostgreSQL
marks a file `.done`, and may recycle it, only after that answer. There is no local spool: pg_wal is the spool,
and PostgreSQL keeps every `.ready` file until an answer says it is safe. A daemon killed at any point
acknowledged nothing it had not sealed; the next push (through a new daemon, or synchronously without one) does
the rest, and a file stored twice is "already archived with the same content".

Recovery. Each `wal get` of a segment queues the next `prefetch` segments of its timeline; the workers fetch them
into a private spool, authenticated as `wal get` does (`wal.fetch_wal`: a file that fails authentication is never
written there). A request is served from that queue when it can, else fetched at once; a prefetch that failed
(not archived yet, failed authentication) is never served: the request fetches again and answers what it finds.

One daemon per policy and target: a second one refuses, naming the pid holding the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ...crypto import Keyring
from ...errors import RegalError, UsageError
from ...layout import is_wal_segment
from ...policy import Policy
from ...storage import Repository
from ...wal_daemon_socket import (
    daemon_directory,
    lock_path,
    read_message,
    send_message,
    socket_path,
    spool_path,
)
from .wal import (
    Pushed,
    RecoveryMustStopError,
    WalMissingError,
    cluster_target,
    fetch_wal,
    push_wal,
    segment_name_of,
    segment_number,
)
from .walfetch import WalFetchQueue

SCAN_SECONDS = 0.2  # how often archive_status is read for `.ready` files to upload ahead
AHEAD_PER_WORKER = 2  # uploads in flight ahead of PostgreSQL's requests, per worker
ACKNOWLEDGED_SECONDS = 120.0  # a file answered for is not uploaded ahead again while PostgreSQL marks it .done


def hold_daemon_lock(path: Path, target: str) -> int:
    """The lock of this policy and target's daemon (flock: released by the kernel when the process dies, also
    on kill -9), with our pid in it; RegalError naming the pid that holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RegalError(f"a wal daemon for target {target} of this policy already runs (pid {holder})",
                         f"one daemon serves every `wal push` and `wal get` of a target: leave it, or stop it "
                         f"(kill -TERM {holder}) before starting another") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _peer_is_us(connection: socket.socket) -> bool:
    """The client runs as this uid (or root): the private directory already says so; the kernel confirms."""
    credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", credentials)
    return uid in (os.geteuid(), 0)


def _refusal(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, RegalError):
        return {"ok": False, "error": exc.message, "hint": exc.hint, "exit_code": exc.exit_code}
    if isinstance(exc, OSError):
        return {"ok": False, "error": f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""),
                "hint": "check the path, the disk and the repository; PostgreSQL tries again", "exit_code": 1}
    return {"ok": False, "error": f"the wal daemon stopped on an unexpected {type(exc).__name__}",
            "hint": "its log (stderr) has the details; PostgreSQL tries again", "exit_code": 1}


class _Archiver:
    """Uploads `.ready` WAL ahead and answers pushes once sealed."""

    def __init__(self, daemon: WalDaemon):
        self.daemon = daemon
        self.lock = threading.Lock()
        self.uploads: dict[str, tuple[Path, bool, Future[Pushed]]] = {}  # name: (path, ahead?, upload)
        self.acknowledged: dict[str, float] = {}
        self.pg_wal: Path | None = None
        self.pushed = self.pushed_ahead = 0

    def _upload(self, path: Path, ahead: bool) -> tuple[Path, bool, Future[Pushed]]:
        d = self.daemon
        self.uploads[path.name] = entry = (path, ahead, d.pool.submit(push_wal, d.policy, d.repo, d.keyring,
                                                                         d.target, path))
        return entry

    def scan(self) -> None:
        """Queue the oldest `.ready` files not yet under way, up to the look-ahead bound."""
        if self.pg_wal is None:
            return
        try:
            ready = sorted(entry.name[:-len(".ready")] for entry in os.scandir(self.pg_wal / "archive_status")
                           if entry.name.endswith(".ready"))
        except OSError:
            return
        now = time.monotonic()
        with self.lock:
            self.acknowledged = {n: t for n, t in self.acknowledged.items() if now - t < ACKNOWLEDGED_SECONDS}
            for name in [n for n, (_p, _a, u) in self.uploads.items() if u.done() and n not in ready]:
                del self.uploads[name]  # archived by someone else meanwhile (a synchronous push)
            room = self.daemon.workers * AHEAD_PER_WORKER - sum(not u.done() for _p, _a, u in self.uploads.values())
            for name in ready:
                if room <= 0:
                    break
                if name not in self.uploads and name not in self.acknowledged:
                    self._upload(self.pg_wal / name, ahead=True)
                    room -= 1

    def push(self, path: Path) -> dict[str, Any]:
        if self.pg_wal is None and (path.parent / "archive_status").is_dir():
            self.pg_wal = path.parent
            self.daemon.say(f"archiving ahead from {self.pg_wal}")
        with self.lock:
            found = self.uploads.get(path.name)
            if found is None or found[0] != path or (found[2].done() and found[2].exception() is not None):
                found = self._upload(path, ahead=False)  # asked for: this file, tried again
        _path, ahead, upload = found
        try:
            pushed = upload.result()
        except BaseException as exc:  # noqa: BLE001 - cancelled at shutdown too: refused, PostgreSQL asks again
            with self.lock:
                if self.uploads.get(path.name) is found:
                    del self.uploads[path.name]
            self.daemon.say(f"{path.name}: REFUSED: {exc}")
            return _refusal(exc)
        with self.lock:
            if self.uploads.get(path.name) is found:
                del self.uploads[path.name]
            self.acknowledged[path.name] = time.monotonic()
            self.pushed += 1
            self.pushed_ahead += ahead
        self.daemon.say(f"{pushed.name}: " + ("already archived" if pushed.already else "archived")
                        + (" (uploaded ahead)" if ahead else ""))
        return {"ok": True, "target": self.daemon.target, "name": pushed.name, "already": pushed.already,
                "plaintext_bytes": pushed.plaintext_bytes, "stored_bytes": pushed.stored_bytes}


class _Prefetcher:
    """Fetches the next segments of a recovery ahead into a private spool, authenticated (walfetch.WalFetchQueue,
    the parallel fetch `restore --with-wal` uses too)."""

    def __init__(self, daemon: WalDaemon, spool: Path):
        self.daemon, self.spool = daemon, spool
        self.queue = WalFetchQueue(daemon.repo, daemon.keyring, daemon.target, spool, daemon.pool)
        self.lock = threading.Lock()
        self.served = self.served_prefetched = 0

    def _queue_after(self, name: str, segment_size: int) -> None:
        """Queue the `prefetch` segments after `name` on its timeline; drop what is no longer ahead."""
        if not is_wal_segment(name) or segment_size < 1 << 20 or segment_size & (segment_size - 1):
            return
        timeline, number = segment_number(name, segment_size)
        self.queue.keep([segment_name_of(timeline, number + i, segment_size)
                         for i in range(1, self.daemon.prefetch + 1)])

    def get(self, name: str, destination: Path, serving_recovery: bool) -> dict[str, Any]:
        fetch = self.queue.take(name)
        found = None
        if fetch is not None:
            with contextlib.suppress(Exception):  # not archived yet, failed authentication: fetched again below
                ready = fetch.result()
                _hand_over(self.spool / name, destination)
                found = ready
        try:
            prefetched = found is not None
            if found is None:
                d = self.daemon
                found = fetch_wal(d.repo, d.keyring, d.target, name, destination)
        except WalMissingError as exc:
            return _refusal(exc)
        except (RegalError, OSError) as exc:
            self.daemon.say(f"{name}: NOT SERVED: {exc}")
            if not serving_recovery:
                return _refusal(exc)
            message, hint = (exc.message, exc.hint) if isinstance(exc, RegalError) else (str(exc), None)
            return _refusal(RecoveryMustStopError.because(message, hint))
        with self.lock:
            self.served += 1
            self.served_prefetched += prefetched
        self.daemon.say(f"{name}: served " + ("from the prefetch queue" if prefetched else "(fetched on request)"))
        if self.daemon.prefetch and not found.partial:
            with contextlib.suppress(OSError):
                self._queue_after(name, destination.stat().st_size)
        return {"ok": True, "target": self.daemon.target, "name": found.name, "partial": found.partial,
                "bytes": found.record.plaintext_size, "prefetched": prefetched}

    def close(self) -> None:
        self.queue.close()


def _hand_over(spooled: Path, destination: Path) -> None:
    """The prefetched file at `destination`, appearing only whole (a rename; across file systems a copy first)."""
    try:
        os.replace(spooled, destination)
    except OSError:
        scratch = destination.with_name(destination.name + ".regal-partial")
        try:
            shutil.copyfile(spooled, scratch)
            os.replace(scratch, destination)
        finally:
            scratch.unlink(missing_ok=True)
            spooled.unlink(missing_ok=True)


class WalDaemon:
    def __init__(self, policy: Policy, repo: Repository, keyring: Keyring, target: str, policy_path: Path, *,
                 workers: int = 4, prefetch: int = 16, say: Callable[[str], None] = print):
        if not 1 <= workers <= 64:
            raise UsageError("--workers must be between 1 and 64", "a few per core is plenty (default: 4)")
        if not 0 <= prefetch <= 256:
            raise UsageError("--prefetch must be between 0 and 256", "16 segments (256 MB) is plenty")
        self.policy, self.repo, self.keyring, self.target = policy, repo, keyring, target
        self.policy_path, self.workers, self.prefetch, self.say = policy_path, workers, prefetch, say
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wal-daemon")

    def _answer(self, connection: socket.socket, archiver: _Archiver, prefetcher: _Prefetcher) -> None:
        with contextlib.closing(connection):
            try:
                connection.settimeout(30)
                if not _peer_is_us(connection) or (request := read_message(connection)) is None:
                    return
                connection.settimeout(None)
                if request.get("target") and request["target"] != self.target or not request.get("target") and \
                        cluster_target(self.policy, None) != self.target:
                    reply = _refusal(UsageError(f"this wal daemon serves target {self.target}",
                                                f"say --target {self.target}, or start a daemon for the target"))
                elif request.get("op") == "push":
                    reply = archiver.push(Path(str(request["path"])))
                elif request.get("op") == "get":
                    reply = prefetcher.get(str(request["name"]), Path(str(request["destination"])),
                                           bool(request.get("serving_recovery")))
                else:
                    reply = _refusal(UsageError(f"unknown request {request.get('op')!r}", "use `wal push` or "
                                                                                          "`wal get`"))
                send_message(connection, reply)
            except (OSError, RegalError) as exc:  # the client went away: PostgreSQL asks again
                self.say(f"a request was not answered: {exc}")

    def run(self, stop: threading.Event) -> dict[str, int]:
        """Serve until `stop` is set; returns what was done."""
        directory = daemon_directory()
        lock_fd = hold_daemon_lock(lock_path(directory, self.policy_path, self.target), self.target)
        path = socket_path(directory, self.policy_path, self.target)
        spool = spool_path(directory, self.policy_path, self.target)
        shutil.rmtree(spool, ignore_errors=True)  # what a killed daemon fetched: fetched again when asked
        spool.mkdir(mode=0o700)
        archiver, prefetcher = _Archiver(self), _Prefetcher(self, spool)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            path.unlink(missing_ok=True)  # a killed daemon's: we hold the lock
            listener.bind(str(path))
            path.chmod(0o600)
            listener.listen(128)
            listener.settimeout(SCAN_SECONDS)
            self.say(f"wal daemon for target {self.target} (pid {os.getpid()}) listening on {path}: {self.workers} "
                     f"worker(s), {self.prefetch} segment(s) prefetched")
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    connection, _ = listener.accept()
                    threading.Thread(target=self._answer, args=(connection, archiver, prefetcher),
                                     name="wal-daemon-request", daemon=True).start()
                archiver.scan()
        finally:
            listener.close()
            path.unlink(missing_ok=True)
            prefetcher.close()
            self.pool.shutdown(wait=True, cancel_futures=True)
            shutil.rmtree(spool, ignore_errors=True)
            os.close(lock_fd)
        return {"pushed": archiver.pushed, "pushed_ahead": archiver.pushed_ahead, "served": prefetcher.served,
                "served_prefetched": prefetcher.served_prefetched}
