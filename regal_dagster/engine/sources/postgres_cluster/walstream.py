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
import re
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
from .wal import format_lsn, push_wal, remove_snapshot

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
        server = f"{conn.info.host}:{conn.info.port}"  # with a multi-host DSN: the one libpq chose
    from .source import _bytes

    return ServerReadiness(version // 10000, _bytes(segment_setting), created,
                           {"wal_level": wal_level, "max_wal_senders": senders, "server": server})


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
        self.forked_ends: list[tuple[int, int]] = []  # (timeline, end) of WAL set aside at a fork (resume_at_fork)
        self._last_snapshot = 0.0

    def store_completed(self) -> int:
        """Store every completed WAL file in the directory (history files first, then segments in order), each
        removed once stored; and the snapshots of segments now complete are dropped."""
        files = sorted((p for p in self.directory.iterdir() if valid_wal_name(p.name)),
                       key=lambda p: (not p.name.endswith(".history"), p.name))
        for path in files:
            if path.name.endswith(".history"):
                self.timeline_switch(path)
            pushed = push_wal(self.policy, self.repo, self.keyring, self.target, path)
            path.unlink()
            self.stored += 1
            self.say(f"{pushed.name}: " + ("already stored" if pushed.already else "stored"))
            if is_wal_segment(pushed.name):
                self._drop_snapshot(pushed.name)
        return len(files)

    def timeline_switch(self, history: Path) -> None:
        """A history file arrived: the server's timeline changed (a promotion). What of the old timeline the stream
        received past the switch point is LOST at the failover: said with its range (`wal status` says it too)."""
        from .failover import lost_range, parse_history, received_end_on_disk
        from .wal import archived_names, segment_number

        switch = parse_history(history.name, history.read_text(errors="replace"))
        if switch is None:
            return
        ends = [end for end in [received_end_on_disk(self.directory, switch.parent, self.segment_size)] if end]
        ends += [(segment_number(name, self.segment_size)[1] + 1) * self.segment_size
                 for name in archived_names(self.repo, self.target)
                 if is_wal_segment(name) and segment_number(name, self.segment_size)[0] == switch.parent]
        ends += [end for tli, end in self.forked_ends if tli == switch.parent]
        received = max(ends, default=None)
        if lost := lost_range(switch, received):
            self.say(f"WAL LOST at the failover to timeline {switch.timeline}: {lost}")
        else:
            self.say(f"timeline {switch.timeline} began at {format_lsn(switch.lsn)} (a promotion): following it; "
                     f"no WAL of timeline {switch.parent} was received past that point, nothing lost")

    def resume_at_fork(self, parent: int, fork: int) -> None:
        """The new primary's history left timeline `parent` at `fork`, before the end of what the stream received
        from the old primary (stored already: complete segments and the snapshot of the partial one); pg_receivewal
        would ask for its newest file's position on `parent` for ever. Those files are set aside (beside the working
        directory, `<dir>.timeline<P>-past-<LSN>`: the lost WAL, kept), and an empty (sparse) .partial of the fork's
        segment on `parent` makes pg_receivewal stream from that segment's start: the rest of `parent` up to the
        fork, then the new timeline and its history file, which reports the loss (timeline_switch)."""
        from .failover import received_end_on_disk
        from .wal import segment_name, segment_number

        size = self.segment_size
        past = format_lsn(fork).replace("/", "-")
        aside = self.directory.parent / f"{self.directory.name}.timeline{parent}-past-{past}"
        aside.mkdir(mode=0o700, exist_ok=True)
        for path in list(self.directory.iterdir()):
            name = path.name.removesuffix(".partial")
            if is_wal_segment(name) and segment_number(name, size)[0] == parent and \
                    segment_number(name, size)[1] >= fork // size:
                path.replace(aside / path.name)
        if (end := received_end_on_disk(aside, parent, size)) is not None:
            self.forked_ends.append((parent, end))
        start = self.directory / (segment_name(parent, fork, size) + ".partial")
        with start.open("wb") as f:
            f.truncate(size)
        self._snapshotted.pop(start.name.removesuffix(".partial"), None)

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


_FORKED = re.compile(r"history forked from timeline (\d+) at ([0-9A-F]+/[0-9A-F]+)")


def _fork_point(log: Path, offset: int) -> tuple[int, int] | None:
    """pg_receivewal asked a new primary for a position on the old timeline past the point where the new one's
    history forked from it ("requested starting point ... is not in this server's history"): (old timeline, fork)."""
    from .wal import parse_lsn

    try:
        with log.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    if "is not in this server's history" not in text or (found := _FORKED.search(text)) is None:
        return None
    return int(found.group(1)), parse_lsn(found.group(2))


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
    # the servers the primary may be among: `dsn` (a multi-host DSN with target_session_attrs=primary follows a
    # failover by itself), then the `standbys`, one of which a failover promotes
    candidates = [settings.resolved_dsn(), *settings.resolved_standbys()]  # type: ignore[attr-defined]
    dsn = _primary_among(candidates, target)
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
        server = readiness.facts.get("server")
        with _children_watchdog(record):
            while not stop.is_set():
                env = libpq_environment(dsn)
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
                if not stop.is_set() and (fork := _fork_point(log, offset)) is not None:
                    say(f"the primary's history left timeline {fork[0]} at {format_lsn(fork[1])}, before the end of "
                        "what the stream had received: resuming from there (what it received past that point is "
                        "set aside and reported as lost)")
                    streamer.resume_at_fork(*fork)
                    continue
                if not stop.is_set():
                    say(f"pg_receivewal stopped (exit code {process.returncode}: {_last_error(log, offset)}; see "
                        f"{log}): restarting in {RESTART_SECONDS:.0f} s")
                    stop.wait(RESTART_SECONDS)
                    dsn, server = _follow_primary(candidates, dsn, server, slot, say)
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


def _primary_among(candidates: list[str], target: str) -> str:
    """The DSN to stream from first: `dsn` alone when the target names no standbys (check_server then says what is
    wrong with it), else the first server that answers as a primary."""
    if len(candidates) == 1:
        return candidates[0]
    from .failover import current_primary

    found, reasons = current_primary(candidates)
    if found is None:
        raise RegalError(f"none of the servers of target {target} is a primary that answers: " + "; ".join(reasons),
                         "start the primary, or promote a standby (pg_ctl promote), then start the stream again")
    return found


def _follow_primary(candidates: list[str], dsn: str, server: str | None, slot: str,
                    say: Callable[[str], None]) -> tuple[str, str | None]:
    """Before pg_receivewal starts again: the current primary among the target's servers (after a failover, the
    promoted one), its slot created when missing (else pg_receivewal would fail for ever on "replication slot does
    not exist"). A server that does not answer yet is pg_receivewal's to report. pg_receivewal then resumes from
    what the working directory holds and follows the timeline switch (it stores the .history file)."""
    from .failover import current_primary

    if len(candidates) > 1:
        found, _reasons = current_primary(candidates)
        dsn = found or dsn
    try:
        readiness = check_server(dsn, slot)
    except Exception:  # noqa: BLE001 - down, restarting, refusing: pg_receivewal says why in its own words
        return dsn, server
    now = readiness.facts.get("server")
    if server is not None and now != server:
        say(f"the primary is now {now} (it was {server}): following it"
            + (f"; created the physical replication slot {slot} there" if readiness.slot_created else ""))
        return dsn, now
    if readiness.slot_created:
        say(f"the replication slot {slot} was gone: created it again. WAL the server removed meanwhile is not in "
            "the repository: `regal-backup wal status` shows any gap (take a base backup if it does)")
    return dsn, now
