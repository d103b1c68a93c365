"""The CLI as a shell user meets it (issue 34): --quiet and --verbose on every command, completion generated from
the parser, and progress with the phase, a percentage and an ETA."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .conftest import DatabaseFactory, invoke_cli


def test_quiet_and_verbose_on_every_command(system_pg: DatabaseFactory, tmp_path: Path) -> None:
    made = invoke_cli(["init", str(tmp_path / "p"), "--postgres-dsn", system_pg.create(), "--no-audit", "--json"])
    assert made.returncode == 0, made.stderr
    policy = ["--policy", json.loads(made.stdout)["policy"]]

    quiet = invoke_cli(["list", "--quiet", *policy])
    assert quiet.returncode == 0 and quiet.stderr == "" and "no backups" in quiet.stdout.lower()

    verbose = invoke_cli(["-vv", "list", "--json", *policy])  # before the command, and with --json
    assert verbose.returncode == 0, verbose.stderr
    assert json.loads(verbose.stdout)["ok"] is True  # the log goes to stderr only
    assert "log: DEBUG regal_backup.storage: " in verbose.stderr  # each repository operation

    both = invoke_cli(["list", "-q", "-v", *policy])
    assert both.returncode == 2 and "--quiet and --verbose contradict each other" in both.stderr
    assert "Traceback" not in both.stderr

    from regal_dagster.cli.completion import commands
    every = [path for path, command in commands().items() if not command.subcommands or path == "completion"]
    assert len(every) >= 30
    assert all({"--quiet", "--verbose"} <= set(commands()[path].options) for path in every)


def _complete(script: Path, line: str) -> list[str]:
    """What bash offers for `line` (a trailing space: a new word), from the script's function."""
    program = ('source "$1"; read -ra COMP_WORDS <<< "$2"; [[ "$2" == *" " ]] && COMP_WORDS+=("");'
               'COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _regal_backup; printf "%s\\n" "${COMPREPLY[@]}";'
               'complete -p regal-backup >&2')
    done = subprocess.run(["bash", "-c", program, "bash", str(script), line], capture_output=True, text=True,
                          timeout=30, check=True)
    assert "-F _regal_backup regal-backup" in done.stderr  # registered for the command
    return [w for w in done.stdout.splitlines() if w]


def test_shell_completion_is_generated_from_the_parser(tmp_path: Path) -> None:
    bash = invoke_cli(["completion", "bash"])
    assert bash.returncode == 0, bash.stderr
    script = tmp_path / "regal-backup.bash"
    script.write_text(bash.stdout)

    assert {"backup", "restore", "restore-test", "verify", "wal", "completion", "pin"} <= set(
        _complete(script, "regal-backup "))
    assert _complete(script, "regal-backup re") == ["restore", "restore-test", "report"]
    assert _complete(script, "regal-backup wal p") == ["push"]  # a group's commands
    assert _complete(script, "regal-backup --policy p.yaml ver") == ["verify"]  # an option's value is skipped
    assert set(_complete(script, "regal-backup -q restore main --to x --")) >= {"--latest", "--quiet", "--verbose",
                                                                               "--drop-existing", "--to-time"}
    assert _complete(script, "regal-backup backup main --class ") == ["hourly", "daily", "weekly", "monthly"]
    assert _complete(script, "regal-backup completion ") == ["bash", "zsh"]
    assert _complete(script, "regal-backup backup main --wait ") == []  # a free value: bash's default (files)

    zsh = invoke_cli(["completion", "zsh", "--json"])
    document = json.loads(zsh.stdout)
    assert document["shell"] == "zsh" and "bashcompinit" in document["script"]
    assert bash.stdout.strip() in document["script"]  # the same function, run by zsh's bashcompinit
