"""Running PostgreSQL's programs, as the operating-system account that owns the server's files.

PostgreSQL refuses to run as root. When this process is root, every PostgreSQL program runs as the
system user `regal_pg` (created when missing), which owns the data directory.
"""

from __future__ import annotations

import functools
import os
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..environment import child_environment
from ..errors import ToolError
from .installations import pg_bin_dir, pg_program

SERVICE_USER = "regal_pg"
"""The operating-system user that runs PostgreSQL when this process is root."""


# --- running as root ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Account:
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
def server_account() -> Account:
    """Who runs PostgreSQL: this process, or `regal_pg` when this process is root."""
    if os.geteuid() != 0:
        return Account()
    import pwd

    _ensure_service_user(SERVICE_USER)
    entry = pwd.getpwnam(SERVICE_USER)
    _prepare_install_for_others()
    return Account(SERVICE_USER, entry.pw_uid, entry.pw_gid)


def make_traversable(path: Path) -> None:
    """Let other users pass through `path` and all its parents (adds o+x, g+x where missing) that this process's
    user owns: another user's directory is never changed."""
    wanted = stat.S_IXGRP | stat.S_IXOTH
    for directory in [path, *path.parents]:
        info = directory.stat()
        if info.st_mode & wanted != wanted and info.st_uid == os.geteuid():
            directory.chmod(stat.S_IMODE(info.st_mode) | wanted)


def _prepare_install_for_others() -> None:
    """Make the wheel's pginstall tree readable and its programs runnable by other users."""
    install = pg_bin_dir().parent
    make_traversable(install)
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


def run_pg(
    program: str, args: list[str], account: Account, cwd: Path, timeout: float, bin_dir: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run one of the wheel's programs (or `bin_dir`'s) as `account`; output goes through temp files
    (pg_ctl start leaves a server behind, and pipes it might inherit could keep `run` waiting)."""
    command = [str(bin_dir / program) if bin_dir is not None else pg_program(program), *args]
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
