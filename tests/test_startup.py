"""The CLI loads only what the command asked for uses (issue 30): `--version` and `--help` start without the
engine's models, libraries or drivers; every command the parser names resolves to its function."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from regal_dagster.cli import command_function
from regal_dagster.cli.parser import build_parser

HEAVY = ("dagster", "pandas", "weasyprint", "boto3", "botocore", "psycopg", "pydantic", "tink", "redis",
         "zstandard", "regal_dagster.engine.policy")


def _modules_loaded_by(*argv: str) -> set[str]:
    script = ("import sys\nfrom regal_dagster.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
              "    pass\nprint('\\n'.join(sys.modules), file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=60,
                          check=False)
    return set(done.stderr.splitlines())


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["backup", "--help"], ["wal", "push", "--help"]])
def test_version_and_help_load_no_engine_model_library_or_driver(argv: list[str]) -> None:
    loaded = _modules_loaded_by(*argv)
    assert "regal_dagster.cli.parser" in loaded  # the probe saw the CLI start
    assert sorted(m for m in loaded if m.split(".")[0] in HEAVY or m in HEAVY) == []


def test_every_command_of_the_parser_resolves_to_its_function() -> None:
    parser = build_parser()
    references = []

    def walk(p: argparse.ArgumentParser) -> None:
        if (func := p.get_default("func")) is not None:
            references.append(func)
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    walk(parser)
    assert len(references) >= 25
    assert all(callable(command_function(reference)) for reference in references)
