"""The watchdog of a scratch server: `python -m regal_dagster.engine.postgresql.watchdog OWNER_PID OWNER_START
WORK_DIR [EXTRA_DIR ...]`; and of a long-running command's client programs (`wal stream`'s pg_receivewal):
`... watchdog --children OWNER_PID OWNER_START RECORD` (see `watch_children`).

Started detached (a session of its own) beside every scratch server. Twice a second it looks at its owner
(the process that started the server, known by pid AND start time, so a reused pid does not count): once
the owner is gone (SIGKILL, a crash, a lost terminal) it stops every server running from WORK_DIR
(PostgreSQL: SIGQUIT, an immediate shutdown, then SIGKILL of whatever is left; any other server named in a
`.regal-server-pid` file: SIGKILL; then programs of ours or of the server account whose command line names
WORK_DIR, such as an initdb) and removes WORK_DIR and the EXTRA_DIRs. A pid read from a file is only ever
signalled when that process is a scratch server (postgres, redis-server) whose working directory is in
WORK_DIR. It ends by itself as soon as
WORK_DIR is gone (its owner stopped the server and cleaned up as usual).

The next command that sweeps a dead owner's working directory (engine/workspace.py) stops what is left
there (`stop_orphan_servers`): only the servers our own records name, still running from there and started
at the recorded time.

Imports only the standard library and psutil: it starts in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5
SERVER_PID_FILE = ".regal-server-pid"
"""`<pid> <start time>` of a scratch server (a postmaster, a redis-server) we started, running from the directory
the file is in or below it: written by us (our uid), read by the sweep (stop_orphan_servers)."""


def owner_alive(pid: int, started: float) -> bool:
    try:
        process = psutil.Process(pid)
        return abs(process.create_time() - started) < 0.01 and process.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


SERVER_NAMES = frozenset({"postgres", "redis-server"})
"""The programs a scratch server runs as: nothing else is ever stopped from a record or a pid file."""
POSTGRES = frozenset({"postgres"})


def _runs_from(process: psutil.Process, directory: Path, names: frozenset[str]) -> bool:
    """Whether `process` runs one of the programs `names` and its working directory is `directory` or below it
    (PostgreSQL changes into its data directory, redis-server into its `dir`)."""
    try:
        if process.name() not in names:
            return False
        cwd = os.path.realpath(process.cwd())
    except (psutil.Error, OSError):
        return False
    root = os.path.realpath(directory)
    return cwd == root or cwd.startswith(root + os.sep)


def _server_tree(pid: int, directory: Path, started: float | None = None,
                 names: frozenset[str] = SERVER_NAMES) -> list[psutil.Process]:
    """Process `pid` and its children, when it is a live scratch server running from `directory` (and, with
    `started`, started then: a reused pid does not count); else nothing. A pid read from a file is never
    enough by itself."""
    try:
        process = psutil.Process(pid)
        if started is not None and abs(process.create_time() - started) >= 0.01:
            return []  # the pid now belongs to someone else
        if process.status() == psutil.STATUS_ZOMBIE or not _runs_from(process, directory, names):
            return []
        return [process, *process.children(recursive=True)]
    except (psutil.Error, ValueError):
        return []


def _gone(processes: list[psutil.Process]) -> bool:
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            continue
    return True


def kill_processes(processes: list[psutil.Process], wait: float = 5) -> None:
    """SIGKILL each of `processes` and wait (up to `wait` seconds) until they are gone (psutil checks that a
    process is still the one it looked at: a reused pid is not signalled)."""
    for process in processes:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and not _gone(processes):
        time.sleep(0.05)


def _files(work_dir: Path, name: str) -> list[Path]:
    """Files called `name` below `work_dir` (os.walk: a server creating and deleting files meanwhile is fine;
    symbolic links to directories are not followed)."""
    return [Path(root, name) for root, _, files in os.walk(work_dir) if name in files]


def write_server_record(directory: Path, process: psutil.Process) -> None:
    """Record a scratch server we started (`<pid> <start time>`) in `directory`, the private directory it runs
    from: what the sweep may stop once we are dead."""
    path = directory / SERVER_PID_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{process.pid} {process.create_time()!r}\n")


def _recorded_server(record: Path) -> list[psutil.Process]:
    """The server a record of ours names (a regular file this uid wrote, `<pid> <start time>`), when it still
    runs from the record's directory and started at that time; else nothing."""
    try:
        fd = os.open(record, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            status = os.fstat(f.fileno())
            if not stat.S_ISREG(status.st_mode) or status.st_uid != os.geteuid() or status.st_nlink != 1:
                logger.warning("%s is not a server record of ours: ignored", record)
                return []
            pid_text, started_text = f.read(200).decode().split()
        return _server_tree(int(pid_text), record.parent, float(started_text))
    except (OSError, ValueError, UnicodeDecodeError):
        return []


def _postmaster(pid_file: Path) -> list[psutil.Process]:
    """The postmaster a postmaster.pid names, with its children, when it is a PostgreSQL server running from
    that data directory (initdb's standalone backend writes its pid negated)."""
    try:
        pid = abs(int(pid_file.read_text().splitlines()[0]))
    except (OSError, ValueError, IndexError):
        return []
    return _server_tree(pid, pid_file.parent, names=POSTGRES)


def stop_servers(work_dir: Path) -> None:
    """Stop every server running from `work_dir`, PostgreSQL first with an immediate shutdown. Only processes
    that are scratch servers running from `work_dir` (working directory and program checked) are signalled."""
    for pid_file in _files(work_dir, "postmaster.pid"):
        processes = _postmaster(pid_file)
        if not processes:
            continue
        try:
            processes[0].send_signal(signal.SIGQUIT)  # what `pg_ctl stop -m immediate` sends
        except psutil.Error:
            pass
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not _gone(processes):
            time.sleep(0.05)
        kill_processes(processes)
    for record in _files(work_dir, SERVER_PID_FILE):
        kill_processes(_recorded_server(record))


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (no init process may reap it here)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def read_postmaster_pid(data_dir: Path) -> tuple[int, int | None, str] | None:
    """(pid, port, status) from data_dir/postmaster.pid, or None when there is no such file."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
    except (FileNotFoundError, PermissionError):
        return None
    if not lines or not lines[0].strip().isdigit():
        return None
    port = int(lines[3]) if len(lines) > 3 and lines[3].strip().isdigit() else None
    status = lines[7].strip() if len(lines) > 7 else ""
    return int(lines[0]), port, status


def kill_postmaster(pid: int, data_dir: Path) -> None:
    """SIGKILL the postmaster and its children and wait (up to 10 s) until they are gone: only when `pid` is a
    PostgreSQL server running from `data_dir` (a pid read from a file is never enough by itself)."""
    processes = _server_tree(pid, data_dir, names=POSTGRES)
    if not processes:
        logger.warning("process %s is not a PostgreSQL server running from %s: left alone", pid, data_dir)
        return
    logger.warning("killing PostgreSQL postmaster %s", pid)
    kill_processes(processes, wait=10)


def stop_orphan_servers(directory: Path) -> list[int]:
    """SIGKILL every scratch server still running from `directory` (the private directory of a process of ours
    that died) that one of our records there names: a live process started at the recorded time, a
    PostgreSQL server or redis-server running from that directory. Returns their pids. A postmaster.pid (or
    any other file) alone never leads to a signal."""
    stopped = []
    for record in _files(directory, SERVER_PID_FILE):
        processes = _recorded_server(record)
        if processes:
            logger.warning("stopping scratch server %s left running by a dead process", processes[0].pid)
            kill_processes(processes, wait=10)
            stopped.append(processes[0].pid)
    return stopped


def _working_from(work_dir: Path) -> list[psutil.Process]:
    """Processes of ours or of the server account (the owner of `work_dir`) whose command line names `work_dir`
    (initdb, pg_ctl, a postmaster still starting up)."""
    me, found = os.getpid(), []
    try:
        owners = {os.geteuid(), work_dir.stat().st_uid}
    except OSError:
        owners = {os.geteuid()}
    for process in psutil.process_iter(["cmdline", "uids"]):
        uids = process.info["uids"]
        if process.pid == me or uids is None or uids.real not in owners:
            continue
        if any(str(work_dir) in part for part in process.info["cmdline"] or []):
            with contextlib.suppress(psutil.Error):
                found += [process, *process.children(recursive=True)]
    return found


CHILD_NAMES = frozenset({"pg_receivewal"})
"""The client programs a children watchdog stops: nothing else is ever signalled from a child record."""
CHILD_GRACE_SECONDS = 3.0
"""How long a child has, once its owner is dead, to end by itself on SIGTERM before SIGKILL (pg_receivewal ending
cleanly waits for the server's answer, which a hung server or network never gives)."""


def write_child_record(record: Path, process: psutil.Process) -> None:
    """Record a child program the watchdog is to stop once its owner is dead (`<pid> <start time>`): replaced
    atomically, so the watchdog reads either the previous child or this one."""
    temporary = record.with_name(record.name + ".new")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{process.pid} {process.create_time()!r}\n")
    os.replace(temporary, record)


def _recorded_child(record: Path) -> list[psutil.Process]:
    """The child a record of ours names (a regular file this uid wrote), when it still runs one of CHILD_NAMES and
    started at the recorded time; else nothing."""
    try:
        fd = os.open(record, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            status = os.fstat(f.fileno())
            if not stat.S_ISREG(status.st_mode) or status.st_uid != os.geteuid():
                return []
            pid_text, started_text = f.read(200).decode().split()
        process = psutil.Process(int(pid_text))
        if abs(process.create_time() - float(started_text)) >= 0.01 or process.name() not in CHILD_NAMES:
            return []
        return [] if process.status() == psutil.STATUS_ZOMBIE else [process]
    except (OSError, ValueError, UnicodeDecodeError, psutil.Error):
        return []


def stop_recorded_child(record: Path, grace: float = CHILD_GRACE_SECONDS) -> list[int]:
    """Stop the child `record` names (SIGTERM, then SIGKILL after `grace` seconds) and remove the record; returns
    the pids stopped."""
    processes = _recorded_child(record)
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and not _gone(processes):
        time.sleep(0.05)
    kill_processes(processes)
    with contextlib.suppress(FileNotFoundError):
        record.unlink()
    return [p.pid for p in processes]


def watch_children(owner_pid: int, owner_start: float, record: Path) -> int:
    """Once the owner is dead (SIGKILL, a crash), stop the child program its record names; the owner that ends
    normally stops its children itself and kills this watchdog."""
    while owner_alive(owner_pid, owner_start):
        time.sleep(POLL_SECONDS)
    stop_recorded_child(record)
    return 0


def start_children_watchdog(record: Path) -> subprocess.Popen[bytes]:
    """A detached watchdog (a session of its own) that stops the child `record` names once this process is dead."""
    from ..environment import child_environment

    me = psutil.Process()
    return subprocess.Popen(
        [sys.executable, "-m", "regal_dagster.engine.postgresql.watchdog", "--children", str(me.pid),
         repr(me.create_time()), str(record)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=child_environment(), start_new_session=True, close_fds=True)


def main(argv: list[str]) -> int:
    if argv[0] == "--children":
        return watch_children(int(argv[1]), float(argv[2]), Path(argv[3]))
    owner_pid, owner_start, work_dir = int(argv[0]), float(argv[1]), Path(argv[2])
    extra = [Path(a) for a in argv[3:]]
    while work_dir.exists():
        if not owner_alive(owner_pid, owner_start):
            deadline = time.monotonic() + 5  # a server may still be starting: look again until none is left
            while True:
                try:
                    stop_servers(work_dir)
                    kill_processes(_working_from(work_dir))
                except (OSError, ValueError, psutil.Error):
                    pass  # look again
                if time.monotonic() > deadline or not _working_from(work_dir):
                    break
                time.sleep(0.2)
            for _ in range(20):  # a server that was dying may still have been writing files
                for directory in [work_dir, *extra]:
                    shutil.rmtree(directory, ignore_errors=True)
                if not any(d.exists() for d in [work_dir, *extra]):
                    break
                kill_processes(_working_from(work_dir))
                time.sleep(0.25)
            return 0
        time.sleep(POLL_SECONDS)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
