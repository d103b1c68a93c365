"""`regal-backup wal stream TARGET`: a long-running receiver of a server's WAL (a systemd service, not a
Dagster run).

pg_receivewal holds the target's replication slot and writes into a working directory of this target
that outlives the process (`<policy dir>/wal-stream/<target>/`, mode 0700): every completed segment and
.history file there is stored through the pipeline (`wal.push_wal`) and then removed; the segment being
received (`.partial`) is stored as a snapshot whenever it grew, at most every `snapshot_seconds`. On a
restart (after a crash, a kill -9, a reboot) what the last run left there is stored first, and
pg_receivewal resumes from it; the slot keeps on the server whatever it has not confirmed. So nothing is
skipped. SIGTERM stops the receiver, stores what it wrote, and exits 0. pg_receivewal dies with the stream: a
detached watchdog (postgresql/watchdog.py, as the scratch servers have) stops it within seconds of a kill -9 of the
stream, also when the server or the network hangs; a receiver still left from an earlier run is stopped first.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from ...crypto import Keyring
from ...environment import die_with_parent
from ...errors import RegalError, UsageError
from ...layout import is_wal_segment, valid_wal_name
from ...policy import Policy
from ...postgresql.connection import connect, libpq_environment
from ...postgresql.tools import pg_tool_for_server
from ...postgresql.watchdog import start_children_watchdog, stop_recorded_child, write_child_record
from ...storage import Repository
from .wal import push_wal, remove_snapshot

SNAPSHOT_SECONDS = 10.0  # the segment in progress is stored at least this often (when it grew): the RPO bound
RESTART_SECONDS = 5.0  # after the receiver lost its connection


@dataclass
class ServerReadiness:
    server_major: int
    segment_size: int
    slot_created: bool
    facts: dict[str, Any] = field(default_factory=dict)


def check_server(dsn: str, slot: str) -> ServerReadiness:
    """The server can stream WAL to us: wal_level, max_wal_senders, the role's REPLICATION, the slot (created
    when missing). Each problem is one clear message with the setting to change."""
    with connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT current_setting('wal_level'), current_setting('max_wal_senders')::int, "
            "current_setting('server_version_num')::int, current_setting('wal_segment_size'), current_user, "
            "(SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user)").fetchone()
        assert row is not None
        wal_level, senders, version, segment_setting, role, may_replicate = row
        if wal_level == "minimal":
            raise RegalError("the server has wal_level = minimal: its WAL cannot be streamed or archived",
                             "set wal_level = replica in postgresql.conf and restart the server")
        if senders < 1:
            raise RegalError("the server has max_wal_senders = 0: no WAL can be streamed",
                             "set max_wal_senders = 10 (at least 2: base backups use one) and restart the server")
        if not may_replicate:
            raise RegalError(f"the role {role} may not replicate",
                             f"ALTER ROLE {role} REPLICATION (and allow it a `replication` line in pg_hba.conf)")
        deadline = time.monotonic() + 15  # a receiver that just died (kill -9, a restart) is let go shortly
        while True:
            found = conn.execute("SELECT slot_type, active_pid FROM pg_replication_slots WHERE slot_name = %s",
                                 (slot,)).fetchone()
            if found is None or found[1] is None or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        created = False
        if found is None:
            conn.execute("SELECT pg_create_physical_replication_slot(%s, true)", (slot,))
            created = True
        elif found[0] != "physical":
            raise RegalError(f"the replication slot {slot} is a {found[0]} slot", "give the target another `slot:` "
                             "name in the policy (a physical slot is created for it)")
        elif found[1] is not None:
            raise RegalError(f"the replication slot {slot} is in use by server process {found[1]}",
                             "another `wal stream` (or another receiver) holds it: stop it, or give this target "
                             "another `slot:`")
    from .source import _bytes

    return ServerReadiness(version // 10000, _bytes(segment_setting), created,
                           {"wal_level": wal_level, "max_wal_senders": senders})


def stream_directory(policy: Policy, target: str, work_dir: Path | None) -> Path:
    path = work_dir or policy.resolve_path(f"wal-stream/{target}")
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


class WalStreamer:
    def __init__(self, policy: Policy, repo: Repository, keyring: Keyring, target: str, directory: Path, *,
                 segment_size: int, snapshot_seconds: float = SNAPSHOT_SECONDS, say: Callable[[str], None] = print):
        self.policy, self.repo, self.keyring, self.target = policy, repo, keyring, target
        self.directory, self.segment_size, self.snapshot_seconds, self.say = (directory, segment_size,
                                                                              snapshot_seconds, say)
        self.stored = 0
        self._snapshotted: dict[str, tuple[int, int]] = {}
        self._last_snapshot = 0.0

    def store_completed(self) -> int:
        """Store every completed WAL file in the directory (history files first, then segments in order), each
        removed once stored; and the snapshots of segments now complete are dropped."""
        files = sorted((p for p in self.directory.iterdir() if valid_wal_name(p.name)),
                       key=lambda p: (not p.name.endswith(".history"), p.name))
        for path in files:
            pushed = push_wal(self.policy, self.repo, self.keyring, self.target, path)
            path.unlink()
            self.stored += 1
            self.say(f"{pushed.name}: " + ("already stored" if pushed.already else "stored"))
            if is_wal_segment(pushed.name):
                self._drop_snapshot(pushed.name)
        return len(files)

    def _drop_snapshot(self, segment: str) -> None:
        with contextlib.suppress(Exception):  # the complete segment is stored: a snapshot left over is harmless
            remove_snapshot(self.repo, self.target, segment)
        self._snapshotted.pop(segment, None)

    def complete_short_partials(self) -> None:
        """pg_receivewal pads a new segment to its full size before it writes WAL into it; a full disk can stop
        that half-way, and it then refuses the file for ever ("has N bytes, should be 0 or <segment size>").
        Extended with zeros (sparse: it takes no room) it is accepted again, and pg_receivewal streams the
        segment from its start, which the slot still keeps on the server."""
        for path in self.directory.glob("*.partial"):
            with contextlib.suppress(FileNotFoundError):
                if 0 < (size := path.stat().st_size) < self.segment_size:
                    os.truncate(path, self.segment_size)
                    self.say(f"{path.name} was left at {size} of {self.segment_size} bytes (a full disk?): completed "
                             "with zeros; pg_receivewal receives the segment again from its start")

    def snapshot_partial(self, force: bool = False) -> None:
        """Store the segment being received when it changed since its last snapshot."""
        if not force and time.monotonic() - self._last_snapshot < self.snapshot_seconds:
            return
        self._last_snapshot = time.monotonic()
        for path in self.directory.glob("*.partial"):
            segment = path.name.removesuffix(".partial")
            if not is_wal_segment(segment):
                continue
            try:
                info = path.stat()
            except FileNotFoundError:
                continue  # completed meanwhile
            state = (info.st_size, info.st_mtime_ns)
            if self._snapshotted.get(segment) == state or info.st_size < self.segment_size:
                continue  # unchanged, or still being padded (a full disk can stop that: no WAL in it yet)
            with contextlib.suppress(FileNotFoundError):
                push_wal(self.policy, self.repo, self.keyring, self.target, path, name=segment, partial=True,
                         segment_size=self.segment_size)
                self._snapshotted[segment] = state


def receiver_command(tool: Path, directory: Path, slot: str) -> list[str]:
    return [str(tool), "--directory", str(directory), "--slot", slot, "--no-loop", "--no-password",
            "--status-interval", "1", "--verbose"]


@contextlib.contextmanager
def _receiver(command: list[str], env: dict[str, str], log: Path, record: Path) -> Iterator[subprocess.Popen[bytes]]:
    """pg_receivewal running, recorded in `record` for the watchdog; ended (SIGTERM, then SIGKILL) on exit."""
    with log.open("ab") as out:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                                   preexec_fn=die_with_parent)  # noqa: PLW1509 - only prctl, async-signal-safe
    try:
        with contextlib.suppress(psutil.NoSuchProcess):  # ended at once: its exit code says why
            write_child_record(record, psutil.Process(process.pid))
        yield process
    finally:
        if process.poll() is None:
            process.terminate()  # pg_receivewal flushes what it received and exits
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _last_error(log: Path, offset: int) -> str:
    """pg_receivewal's last error in its log since `offset` (why it stopped: the server went away, the disk is
    full, the slot is gone)."""
    try:
        with log.open("rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return "its log cannot be read"
    errors = [line.removeprefix("pg_receivewal: ") for line in lines if "error:" in line or "FATAL" in line]
    return "; ".join(errors[-2:]) if errors else "no error in its log"


def run_stream(policy: Policy, repo: Repository, keyring: Keyring, target: str, *, work_dir: Path | None = None,
               snapshot_seconds: float = SNAPSHOT_SECONDS, stop: threading.Event,
               say: Callable[[str], None] = print) -> int:
    """Stream until `stop` is set; returns how many WAL files were stored."""
    if not 1 <= snapshot_seconds <= 15:
        raise UsageError("--snapshot-seconds must be between 1 and 15", "the segment in progress is the RPO: keep it "
                                                                         "short")
    settings = policy.target(target)
    dsn = settings.resolved_dsn()  # type: ignore[attr-defined]
    slot = settings.slot  # type: ignore[attr-defined]
    directory = stream_directory(policy, target, work_dir)
    log = directory.parent / f"{directory.name}.receiver.log"
    record = directory.parent / f"{directory.name}.receiver.pid"  # what the watchdog stops once we are dead
    with repo.lock(f"{target}-wal-stream"):
        if stop_recorded_child(record):  # a receiver a killed run left behind (its watchdog killed too)
            say("stopped the pg_receivewal a previous run left running")
        readiness = check_server(dsn, slot)
        if readiness.slot_created:
            say(f"created the physical replication slot {slot}: the server keeps WAL until it is stored")
        tool = pg_tool_for_server("pg_receivewal", readiness.server_major)
        streamer = WalStreamer(policy, repo, keyring, target, directory, segment_size=readiness.segment_size,
                               snapshot_seconds=snapshot_seconds, say=say)
        left = streamer.store_completed()  # what a previous run left: before anything new
        if left:
            say(f"stored {left} WAL file(s) a previous run had received")
        env = libpq_environment(dsn)
        with _children_watchdog(record):
            while not stop.is_set():
                offset = log.stat().st_size if log.exists() else 0
                streamer.complete_short_partials()
                with _receiver(receiver_command(tool.path, directory, slot), env, log, record) as process:
                    say(f"streaming WAL of {target} with {tool.path.name} {tool.version} into {directory} "
                        f"(slot {slot})")
                    while not stop.is_set() and process.poll() is None:
                        streamer.store_completed()
                        streamer.snapshot_partial()
                        stop.wait(0.5)
                streamer.store_completed()
                streamer.snapshot_partial(force=True)
                if not stop.is_set():
                    say(f"pg_receivewal stopped (exit code {process.returncode}: {_last_error(log, offset)}; see "
                        f"{log}): restarting in {RESTART_SECONDS:.0f} s")
                    stop.wait(RESTART_SECONDS)
                    _slot_again(dsn, slot, say)
    return streamer.stored


@contextlib.contextmanager
def _children_watchdog(record: Path) -> Iterator[None]:
    """A detached watchdog (postgresql/watchdog.py) that stops the pg_receivewal `record` names once this process is
    dead: its own SIGTERM on our death (die_with_parent) is not enough, as pg_receivewal ending cleanly waits for an
    answer from the server that a hung server or network never gives. Stopped when the stream ends."""
    watchdog = start_children_watchdog(record)
    try:
        yield
    finally:
        watchdog.kill()
        watchdog.wait()
        record.unlink(missing_ok=True)


def _slot_again(dsn: str, slot: str, say: Callable[[str], None]) -> None:
    """Before pg_receivewal starts again: a slot dropped meanwhile is created again (else it would fail for ever
    on "replication slot does not exist"). A server that does not answer yet is pg_receivewal's to report."""
    try:
        readiness = check_server(dsn, slot)
    except Exception:  # noqa: BLE001 - down, restarting, refusing: pg_receivewal says why in its own words
        return
    if readiness.slot_created:
        say(f"the replication slot {slot} was gone: created it again. WAL the server removed meanwhile is not in "
            "the repository: `regal-backup wal status` shows any gap (take a base backup if it does)")
