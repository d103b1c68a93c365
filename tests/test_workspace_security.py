"""The start-up sweep never trusts the temp directory (issue 27): a real other local user (`nobody`) plants
directories and pid files there, in the layout the sweep used to act on and at the place of our own base
directory (a symlink, a directory of theirs), and the next `regal-backup` run as root kills nothing and
touches nothing of theirs; a genuinely orphaned scratch server of ours is still stopped and removed.

Each test uses a temp directory of its own (mode 1777 like /tmp, given as TMPDIR to the CLI's process): the
machine's /tmp is shared with other test runs."""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from .conftest import DatabaseFactory, load_awkward_data, run_cli, run_cli_process, wait_for, write_policy_file

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="plants files as another user: needs root")

NOBODY = pwd.getpwnam("nobody")
BASE_NAME = f"regal-backup-{os.geteuid()}"


@pytest.fixture
def temp_dir() -> Iterator[Path]:
    """A fresh world-writable, sticky temp directory (as /tmp is), removed afterwards."""
    path = Path("/tmp") / f"sweeptest-{secrets.token_hex(6)}"
    path.mkdir()
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def victim() -> Iterator[psutil.Process]:
    """A process of root's that nobody may have killed (and its child, a process tree)."""
    process = subprocess.Popen(["/bin/sh", "-c", "sleep 300 & wait"], start_new_session=True)
    yield psutil.Process(process.pid)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture
def policy_file(tmp_path: Path, master_key: str) -> Path:
    return write_policy_file(tmp_path, {"pos": "postgresql://127.0.0.1/regal_nowhere"})


def as_nobody(script: str) -> None:
    """Run a shell script as the real user `nobody` (uid 65534)."""
    done = subprocess.run(["runuser", "-u", "nobody", "--", "/bin/sh", "-ec", script], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr


def plant(directory: Path, victim: psutil.Process, owner: str) -> None:
    """As nobody: `directory` with an owner file `owner`, postmaster.pid files (the data directory's and one at
    the top) and a server record naming `victim` with its true start time."""
    pid_file = f"{victim.pid}\\n{directory}/data\\n1700000000\\n5432\\n/tmp\\n\\n  1 2\\nready\\n"
    q = shlex.quote
    as_nobody(f"mkdir -p {q(str(directory / 'data'))}\n"
              f"printf %s {q(owner)} > {q(str(directory / '.regal-owner'))}\n"
              f"printf '{pid_file}' > {q(str(directory / 'postmaster.pid'))}\n"
              f"printf '{pid_file}' > {q(str(directory / 'data' / 'postmaster.pid'))}\n"
              f"printf '%s %s' {victim.pid} {victim.create_time()!r} > {q(str(directory / '.regal-server-pid'))}\n")
    assert (directory / ".regal-owner").stat().st_uid == NOBODY.pw_uid


def dead_owner() -> str:
    """An owner file naming a process that is gone (as one of ours would, after a SIGKILL)."""
    return json.dumps({"pid": 4194303, "started": 1.0, "host": socket.gethostname()})


def snapshot(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path below `root` (symlinks not followed): owner and content."""
    found = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        found[str(path)] = (info.st_uid, path.read_bytes() if path.is_file() and not path.is_symlink() else None)
    return found


def alive_tree(victim: psutil.Process) -> bool:
    return victim.is_running() and victim.status() != psutil.STATUS_ZOMBIE and bool(victim.children())


def cli(policy_file: Path, temp_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`regal-backup ARGS` as root in a process of its own, with `temp_dir` as its temp directory."""
    return run_cli_process(policy_file, *args, env={**os.environ, "TMPDIR": str(temp_dir)}, timeout=120)


def test_directories_planted_in_the_temp_directory_never_lead_to_a_kill(
        temp_dir: Path, victim: psutil.Process, policy_file: Path) -> None:
    plant(temp_dir / "regal-anything", victim, owner="{not json")  # the reported attack
    plant(temp_dir / "regal-pg-k2j3h4", victim, owner=dead_owner())  # one of ours, as it looked before
    before = snapshot(temp_dir)

    done = cli(policy_file, temp_dir, "list")

    assert done.returncode == 0, done.stderr
    assert alive_tree(victim), "the sweep killed a process named in a file planted by another user"
    assert snapshot(temp_dir) == before  # nothing of theirs touched


def test_a_symlink_at_our_base_directory_is_refused_and_not_followed(
        temp_dir: Path, victim: psutil.Process, policy_file: Path, system_pg: DatabaseFactory) -> None:
    elsewhere = temp_dir / "elsewhere"
    plant(elsewhere / "regal-pg-x1y2z3", victim, owner=dead_owner())
    as_nobody(f"ln -s {shlex.quote(str(elsewhere))} {shlex.quote(str(temp_dir / BASE_NAME))}")
    before = snapshot(temp_dir)

    listed = cli(policy_file, temp_dir, "list")

    assert listed.returncode == 0, listed.stderr  # a command that needs no private files still runs
    assert f"refusing to keep private working files in {temp_dir / BASE_NAME}: it is a symbolic link" in listed.stderr
    assert "what to do: remove" in listed.stderr
    assert alive_tree(victim)
    assert snapshot(temp_dir) == before  # nothing of theirs touched, nothing of ours created there
    _a_command_needing_private_files_refuses(policy_file, temp_dir, system_pg, "it is a symbolic link")
    assert snapshot(temp_dir) == before
    assert alive_tree(victim)


def test_a_base_directory_of_another_user_is_refused_and_left_alone(
        temp_dir: Path, victim: psutil.Process, policy_file: Path, system_pg: DatabaseFactory) -> None:
    base = temp_dir / BASE_NAME
    as_nobody(f"mkdir -m 0700 {shlex.quote(str(base))}")
    plant(base / "regal-pg-a1b2c3", victim, owner=dead_owner())
    plant(base / "regal-restore-d4e5f6", victim, owner="garbage")
    before = snapshot(temp_dir)

    listed = cli(policy_file, temp_dir, "list")

    assert listed.returncode == 0, listed.stderr
    assert f"it belongs to uid {NOBODY.pw_uid}, not to this user (uid 0)" in listed.stderr
    assert alive_tree(victim)
    assert snapshot(temp_dir) == before
    _a_command_needing_private_files_refuses(policy_file, temp_dir, system_pg, f"belongs to uid {NOBODY.pw_uid}")
    assert snapshot(temp_dir) == before
    assert alive_tree(victim)


def test_files_planted_inside_our_own_base_directory_never_lead_to_a_kill(
        temp_dir: Path, victim: psutil.Process, policy_file: Path) -> None:
    """Even in our base directory (here made traversable and writable for the test, as a server account that
    owns a private directory there could write into that one), a directory or server record not written by us
    is left alone; so is one of ours whose record names a process that does not run from there."""
    base = temp_dir / BASE_NAME
    base.mkdir(mode=0o700)
    theirs = base / "regal-pg-theirs"
    theirs.mkdir(mode=0o777)
    theirs.chmod(0o777)
    base.chmod(0o711)
    plant(theirs / "inner", victim, owner=dead_owner())
    as_nobody(f"printf %s {shlex.quote(dead_owner())} > {shlex.quote(str(theirs / '.regal-owner'))}")
    base.chmod(0o700)
    ours = base / "regal-pg-ours"  # our owner file (a dead owner), our record naming the victim (true start time)
    ours.mkdir(mode=0o700)
    (ours / ".regal-owner").write_text(dead_owner())
    (ours / ".regal-server-pid").write_text(f"{victim.pid} {victim.create_time()!r}\n")
    (ours / "postmaster.pid").write_text(f"{victim.pid}\n")

    done = cli(policy_file, temp_dir, "list")

    assert done.returncode == 0, done.stderr
    assert alive_tree(victim)
    assert (theirs / "inner" / "postmaster.pid").exists()  # not ours: left alone
    assert not ours.exists()  # ours, its owner dead: removed, but the process it named was not its server


@pytest.mark.parametrize("how", ["scratch", "persistent-in-private"])
def test_an_orphaned_scratch_server_of_ours_is_still_stopped_by_the_next_command(
        temp_dir: Path, policy_file: Path, how: str) -> None:
    """Its owner SIGKILLed and its watchdog too (or it had none): the next `regal-backup list` stops the server
    and removes the directory."""
    script = ("import sys, time\nfrom pathlib import Path\n"
              "from regal_dagster.engine.postgresql.server import ScratchCluster\n"
              "from regal_dagster.engine.workspace import make_private_directory\n"
              "if sys.argv[1] == 'scratch':\n    c = ScratchCluster().start()\n"
              "else:\n    c = ScratchCluster.persistent(make_private_directory('cluster-test') / 'data').start()\n"
              "print(c.pid, c.data_dir, flush=True)\ntime.sleep(600)\n")
    env = {**os.environ, "TMPDIR": str(temp_dir)}
    owner = subprocess.Popen([sys.executable, "-c", script, how], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert owner.stdout is not None
        pid_text, data_dir = owner.stdout.readline().split()
        postmaster, private = psutil.Process(int(pid_text)), Path(data_dir).parent
        assert private.parent == temp_dir / BASE_NAME
        watchdogs = [p for p in psutil.process_iter(["cmdline"])
                     if {"regal_dagster.engine.postgresql.watchdog", str(private)} <= set(p.info["cmdline"] or [])]
        assert len(watchdogs) == (how == "scratch")  # a persistent server has none: the sweep is its only net
        for process in watchdogs:  # the watchdog dies first, as in `kill -9 -1`
            process.kill()
    finally:
        owner.kill()
        owner.wait()
    assert postmaster.is_running() and private.exists()

    done = cli(policy_file, temp_dir, "list")

    assert done.returncode == 0, done.stderr
    wait_for(lambda: not postmaster.is_running() or postmaster.status() == psutil.STATUS_ZOMBIE,
             "the orphaned postmaster to be stopped", 15)
    assert not private.exists()


def _a_command_needing_private_files_refuses(policy_file: Path, temp_dir: Path, system_pg: DatabaseFactory,
                                             why: str) -> None:
    """A restore (its decrypted schema archive needs a private directory) stops with exit 1, the reason and
    what to do; no traceback, nothing created."""
    source = system_pg.create()
    load_awkward_data(source)
    directory = policy_file.parent / "with-a-source"
    directory.mkdir()
    policy = write_policy_file(directory, {"pos": source})
    backed_up = run_cli(policy, "backup", "pos", "--json")
    assert backed_up.returncode == 0, backed_up.stderr
    backup_id = json.loads(backed_up.stdout)["backup_id"]
    target = system_pg.new_name("regal_refused")

    done = cli(policy, temp_dir, "restore", backup_id, "--to", system_pg.dsn(target))

    assert done.returncode == 1, done.stderr
    assert f"error: refusing to keep private working files in {temp_dir / BASE_NAME}" in done.stderr
    assert why in done.stderr and "what to do: remove" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the server account is another one only when run as root")
def test_a_scratch_server_under_private_parents_widens_nothing_and_only_its_account_passes() -> None:
    """Its work directory below 0700 directories of root's: the server starts, and afterwards every parent
    keeps its permissions for its owner, its group and others (nothing becomes 0711; `ls -l` shows the ACL's
    mask where the group bits were): `regal_pg` passes through by an ACL entry naming it alone, `nobody` and
    the owning group still cannot."""
    from regal_dagster.engine.postgresql.acl import GROUP_OBJ, read_acl
    from regal_dagster.engine.postgresql.programs import server_account

    top = Path("/tmp") / f"closed-{secrets.token_hex(6)}"
    work = top / "inner" / "work"
    work.mkdir(parents=True)
    for directory in (top, top / "inner", work):
        directory.chmod(0o700)
    try:
        def permissions(d: Path) -> tuple[int, int]:  # owner and others from the mode, the group from its entry
            acl = read_acl(d)
            return d.stat().st_mode & 0o7707, next(perm for (tag, _), perm in acl.items() if tag == GROUP_OBJ)

        before = {d: permissions(d) for d in (top, top / "inner", work)}
        script = ("import sys\nfrom regal_dagster.engine.postgresql.server import ScratchCluster\n"
                  "with ScratchCluster().start() as c:\n    print(c.data_dir, flush=True)\n")
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                              env={**os.environ, "TMPDIR": str(work)}, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(str(work / BASE_NAME))
        assert {d: permissions(d) for d in before} == before
        account = server_account()
        for who, may in ((["-u", str(account.name)], True), (["-u", "nobody"], False),
                         (["-u", "nobody", "-g", "root"], False)):
            passed = subprocess.run(["runuser", *who, "--", "test", "-x", str(work)], check=False)
            assert (passed.returncode == 0) is may, who
    finally:
        shutil.rmtree(top, ignore_errors=True)
