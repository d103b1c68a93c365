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
from .acl import EXECUTE, READ, AclUnsupportedError, grant_user, user_may
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
    account = Account(SERVICE_USER, entry.pw_uid, entry.pw_gid)
    _prepare_install_for(account)
    return account


def let_account_traverse(path: Path, account: Account) -> None:
    """Let `account`, and nobody else, pass through `path` and all its parents: a named-user ACL entry with
    execute on each directory it cannot pass through yet (acl.py); no mode bit changes. Only directories this
    process's user owns are changed: ToolError naming a directory of someone else's that blocks the way, or
    one on a filesystem without ACLs."""
    if not account.is_other or account.uid is None:
        return
    groups = _groups_of(account)
    for directory in reversed([path, *path.parents]):
        if user_may(directory, account.uid, groups, EXECUTE):
            continue
        info = directory.stat()
        if info.st_uid != os.geteuid():
            raise ToolError(f"the PostgreSQL account {account.name} cannot pass through {directory} (uid "
                            f"{info.st_uid}'s, mode {stat.S_IMODE(info.st_mode):04o}), which this user does not own",
                            "choose a work directory (restore_tests.work_dir, --work-dir) below directories it can "
                            "pass through, for instance /var/lib/regal-backup/work")
        _grant(directory, account.uid, EXECUTE)


def _grant(path: Path, uid: int, permissions: int) -> None:
    try:
        grant_user(path, uid, permissions)
    except AclUnsupportedError:
        raise ToolError(f"the filesystem of {path} keeps no access control lists, so the PostgreSQL account "
                        f"{SERVICE_USER} cannot be let in without letting in everybody",
                        f"run regal-backup as a non-root user, or mount that filesystem with ACLs (or `chmod o+x "
                        f"{path}` yourself if that is acceptable)") from None


def _groups_of(account: Account) -> set[int]:
    if account.name is None or account.gid is None:
        return set()
    return set(os.getgrouplist(account.name, account.gid))


def _prepare_install_for(account: Account) -> None:
    """Let `account` (and nobody else) read the wheel's pginstall tree and run its programs."""
    install = pg_bin_dir().parent
    let_account_traverse(install, account)
    assert account.uid is not None
    groups = _groups_of(account)
    for root, dirs, files in os.walk(install):
        for name in dirs:
            _grant_missing(Path(root, name), account.uid, groups, READ | EXECUTE)
        for name in files:
            path = Path(root, name)
            mode = path.lstat().st_mode
            if not stat.S_ISLNK(mode):
                _grant_missing(path, account.uid, groups, READ | (EXECUTE if mode & stat.S_IXUSR else 0))


def _grant_missing(path: Path, uid: int, groups: set[int], permissions: int) -> None:
    if not user_may(path, uid, groups, permissions):
        _grant(path, uid, permissions)


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
