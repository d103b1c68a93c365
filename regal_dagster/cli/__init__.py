"""`regal-backup`: the operator's CLI. Same engine as the Dagster assets; works when Dagster is down.

Exit status: 0 success, 1 operational failure, 2 bad usage or policy, 3 a backup failed verification.
Parsing (parser.py) and rendering (output.py, commands.py) only: every operation is the engine's.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable

from ..engine.errors import RegalError
from .output import Output, command_name
from .parser import build_parser


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
    args = build_parser().parse_args(argv)
    out = Output(args.json, command_name(args))
    signal.signal(signal.SIGTERM, _Terminated.handler)
    func: Callable[[argparse.Namespace, Output], int] = args.func
    try:
        code = func(args, out)
        out.finish(code)
        return code
    except RegalError as exc:
        out.fail(exc.message, exc.hint, exc.exit_code)
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: nothing partial is visible as a backup", file=sys.stderr)
        return 130
    except BaseException:
        if _Terminated.signum is not None:
            print("terminated: nothing partial is visible as a backup", file=sys.stderr)
            return 128 + _Terminated.signum
        raise
