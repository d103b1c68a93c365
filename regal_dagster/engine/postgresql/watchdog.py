"""The watchdog of a scratch server: `python -m regal_dagster.engine.postgresql.watchdog OWNER_PID OWNER_START
WORK_DIR [EXTRA_DIR ...]`.

Started detached (a session of its own) beside every scratch server. Twice a second it looks at its owner
(the process that started the server, known by pid AND start time, so a reused pid does not count): once
the owner is gone (SIGKILL, a crash, a lost terminal) it stops every server running from WORK_DIR
(PostgreSQL: SIGQUIT, an immediate shutdown, then SIGKILL of whatever is left; any other server named in a
`.regal-server-pid` file: SIGKILL) and removes WORK_DIR and the EXTRA_DIRs. It ends by itself as soon as
WORK_DIR is gone (its owner stopped the server and cleaned up as usual).

The next command that sweeps a dead owner's working directory (engine/workspace.py) stops what is left
there the same way (`stop_orphan_servers`).

Imports only the standard library and psutil: it starts in a fraction of a second.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5
SERVER_PID_FILE = ".regal-server-pid"
"""`<pid> <start time>` of a non-PostgreSQL scratch server (redis-server) running from the directory."""


def owner_alive(pid: int, started: float) -> bool:
    try:
        process = psutil.Process(pid)
        return abs(process.create_time() - started) < 0.01 and process.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _tree(pid: int, started: float | None = None) -> list[psutil.Process]:
    try:
        process = psutil.Process(abs(pid))  # initdb's standalone backend writes its pid negated
        if started is not None and abs(process.create_time() - started) >= 0.01:
            return []  # the pid now belongs to someone else
        return [process, *process.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
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
    """SIGKILL each of `processes` and wait (up to `wait` seconds) until they are gone."""
    for process in processes:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and not _gone(processes):
        time.sleep(0.05)


def _files(work_dir: Path, name: str) -> list[Path]:
    """Files called `name` below `work_dir` (os.walk: a server creating and deleting files meanwhile is fine)."""
    return [Path(root, name) for root, _, files in os.walk(work_dir) if name in files]


def stop_servers(work_dir: Path) -> None:
    """Stop every server running from `work_dir`, PostgreSQL first with an immediate shutdown."""
    for pid_file in _files(work_dir, "postmaster.pid"):
        try:
            pid = abs(int(pid_file.read_text().splitlines()[0]))
        except (OSError, ValueError, IndexError):
            continue
        processes = _tree(pid)
        if not processes:
            continue
        try:
            os.kill(pid, signal.SIGQUIT)  # what `pg_ctl stop -m immediate` sends
        except OSError:
            pass
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not _gone(processes):
            time.sleep(0.05)
        kill_processes(processes + _tree(pid))
    for pid_file in _files(work_dir, SERVER_PID_FILE):
        try:
            pid_text, started_text = pid_file.read_text().split()
            kill_processes(_tree(int(pid_text), float(started_text)))
        except (OSError, ValueError):
            continue


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


def kill_postmaster(pid: int) -> None:
    """SIGKILL the postmaster and its children and wait (up to 10 s) until they are gone."""
    logger.warning("killing PostgreSQL postmaster %s", pid)
    try:
        postmaster = psutil.Process(pid)
        processes = [postmaster, *postmaster.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    kill_processes(processes, wait=10)


def stop_orphan_servers(directory: Path) -> list[int]:
    """SIGKILL every PostgreSQL server still running from a data directory under `directory` (the working
    directory of a process that died); returns their pids."""
    stopped = []
    for root, _, files in os.walk(directory):  # os.walk: files vanishing meanwhile are no error
        info = read_postmaster_pid(Path(root)) if "postmaster.pid" in files else None
        if info is not None and process_alive(info[0]):
            kill_postmaster(info[0])
            stopped.append(info[0])
        if SERVER_PID_FILE in files:  # a scratch redis-server
            stop_servers(Path(root))
    return stopped


def _working_from(work_dir: Path) -> list[psutil.Process]:
    """Processes whose command line names `work_dir` (initdb, pg_ctl, a postmaster still starting up)."""
    me, found = os.getpid(), []
    for process in psutil.process_iter(["cmdline"]):
        if process.pid != me and any(str(work_dir) in part for part in process.info["cmdline"] or []):
            found += _tree(process.pid)
    return found


def main(argv: list[str]) -> int:
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
