"""The CLI as a shell user meets it (issue 34): --quiet and --verbose on every command, completion generated from
the parser, and progress with the phase, a percentage and an ETA."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import DatabaseFactory, invoke_cli

DURATION = r"\d+(?:\.\d)? (?:s|min|h|d)"  # how the progress display writes a duration (engine/units.py)
OTHER_UNITS = re.compile(r"\d(?:\.\d+)?s\b|\d MB\b|\d bytes\b")  # "1.3s", "12 MB", "466,517 bytes"


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


_ZSH_COMPLETE = r"""source "$1" || exit 3  # the generated script: compinit, bashcompinit, the bash function
print -r -- "${_comps[regal-backup]}" >&2
emulate -L sh; setopt kshglob noshglob braceexpand ksharrays  # as zsh's _bash_complete runs the function
COMP_WORDS=(${=2}); [[ "$2" == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
_regal_backup
cur="${COMP_WORDS[COMP_CWORD]}"
printf "%s\n" "${(M)COMPREPLY[@]:#$cur*}"  # compadd keeps the words that start with the one typed
"""


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed (.ci/run installs it)")
def test_the_zsh_completion_loads_in_zsh_and_completes(tmp_path: Path) -> None:
    """The zsh script, sourced by a real zsh without the user's configuration: no error, registered for
    regal-backup through bashcompinit, and the function offers what it offers in bash."""
    script = tmp_path / "regal-backup.zsh"
    script.write_text(invoke_cli(["completion", "zsh"]).stdout)
    program = tmp_path / "complete.zsh"
    program.write_text(_ZSH_COMPLETE)

    def complete(line: str) -> list[str]:
        done = subprocess.run(["zsh", "-f", str(program), str(script), line], capture_output=True, text=True,
                              timeout=30, check=False, cwd=tmp_path)
        assert done.returncode == 0 and done.stderr == "_bash_complete -o default -F _regal_backup\n", done.stderr
        return [w for w in done.stdout.splitlines() if w]

    assert complete("regal-backup re") == ["restore", "restore-test", "report"]
    assert complete("regal-backup wal p") == ["push"]
    assert complete("regal-backup backup main --class ") == ["hourly", "daily", "weekly", "monthly"]
    assert {"--latest", "--quiet", "--to-time"} <= set(complete("regal-backup restore main --"))


def _on_a_terminal(*argv: str) -> str:
    """What the CLI writes to a terminal (a pseudo-terminal for stdin, stdout and stderr)."""
    import os
    import pty
    import sys

    controller, terminal = pty.openpty()
    child = subprocess.Popen([sys.executable, "-m", "regal_dagster.cli", *argv], stdin=terminal, stdout=terminal,
                             stderr=terminal, close_fds=True)
    os.close(terminal)
    seen = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    assert child.wait(timeout=120) == 0, seen
    os.close(controller)
    return seen.decode(errors="replace")


def _a_policy_with_two_tables(system_pg: DatabaseFactory, tmp_path: Path) -> list[str]:
    import psycopg

    source = system_pg.create()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE t AS SELECT g, md5(g::text) AS m FROM generate_series(1, 30000) g")
        conn.execute("CREATE TABLE u AS SELECT g FROM generate_series(1, 15000) g")
    made = invoke_cli(["init", str(tmp_path / "p"), "--postgres-dsn", source, "--no-audit", "--json"])
    return ["--policy", json.loads(made.stdout)["policy"]]


def test_progress_shows_the_phase_a_percentage_and_an_eta(system_pg: DatabaseFactory, tmp_path: Path) -> None:
    """Backup (against the server's size estimate), restore and restore test (against the manifest's sizes): the
    phase under way, a percentage, an ETA, in MiB and human durations; on a terminal one redrawn line, with
    --verbose elsewhere a line per phase and per 10%, nothing with --quiet."""
    policy = _a_policy_with_two_tables(system_pg, tmp_path)
    backup = invoke_cli(["backup", "main", "-v", *policy])
    assert backup.returncode == 0, backup.stderr
    lines = backup.stderr.splitlines()
    assert any(line.startswith("backup main [reading the source]:") and "% of about " in line and " MiB, ETA "
               in line for line in lines), backup.stderr  # against pg_table_size
    assert any(line.startswith("backup main [reading the source]: 100%, ") and "(estimated " in line
               and line.endswith(", done") for line in lines), backup.stderr  # the real size, once known
    assert any(line.startswith("backup main [checking (every byte read back)]: 100% of ") for line in lines)

    restored = invoke_cli(["restore", "main", "--latest", "--to", system_pg.dsn(system_pg.new_name("r")), "-v",
                           *policy])
    assert restored.returncode == 0, restored.stderr
    phases = [line.split("[")[1].split("]")[0] for line in restored.stderr.splitlines() if line.startswith("restore ")
              and "[" in line]
    assert list(dict.fromkeys(phases)) == ["creating the schema", "loading tables", "indexes and constraints",
                                           "validating"]
    assert any("% of " in line and ", ETA " in line for line in restored.stderr.splitlines())
    total = json.loads(invoke_cli(["list", "--json", *policy]).stdout)["backups"][0]["bytes_read"]
    last = restored.stderr.splitlines()[-1]  # every byte of the manifest counted
    assert last.startswith("restore main-") and f"]: 100% of {total / 1048576:.1f} MiB, " in last, last
    assert last.endswith(" elapsed, done")

    screen = _on_a_terminal("backup", "main", *policy)
    assert "\rbackup main [reading the source]: " in screen and "% of about " in screen and " elapsed" in screen
    assert "backup main [checking (every byte read back)]: 100% of " in screen
    assert "MB" not in screen.replace("MiB", "")  # one unit system
    # ... and the result lines say durations and sizes as the progress does
    assert re.search(rf"^backup main-\S+ \(\w+\) done in {DURATION}: [\d.]+ (?:B|KiB|MiB) read, ", backup.stdout,
                     re.MULTILINE), backup.stdout
    phases = rf"\((?:\w+ {DURATION}, )+\w+ {DURATION}\)$"  # the restore's phases, each with its duration
    assert re.search(rf"rows in {DURATION} with \d+ jobs {phases}", restored.stdout, re.MULTILINE), restored.stdout
    assert not OTHER_UNITS.search(backup.stdout + restored.stdout + screen), backup.stdout + restored.stdout
    quiet = _on_a_terminal("status", "--quiet", *policy)  # shows "reading the repository, 0 s elapsed" without
    assert "elapsed" not in quiet and "newest good backup" in quiet  # the result, no progress


def test_restore_test_progress_names_its_phases(system_pg: DatabaseFactory, tmp_path: Path) -> None:
    """A restore test's display: the scratch server starting, the restore's own phases against the manifest's
    total, the check of the restored copy; --verbose adds the engine's log records."""
    policy = _a_policy_with_two_tables(system_pg, tmp_path)
    assert invoke_cli(["backup", "main", "-q", *policy]).returncode == 0
    tested = invoke_cli(["restore-test", "-v", *policy])
    assert tested.returncode == 0, tested.stderr
    phases = [line.split("[")[1].split("]")[0] for line in tested.stderr.splitlines()
              if line.startswith("restore test of ") and "[" in line]
    assert list(dict.fromkeys(phases)) == ["starting a scratch destination", "restoring", "creating the schema",
                                           "loading tables", "indexes and constraints", "validating",
                                           "checking the restored copy"], tested.stderr
    assert any("% of " in line and ", ETA " in line for line in tested.stderr.splitlines())
    assert "log: INFO regal_dagster.engine.postgresql.server: PostgreSQL started" in tested.stderr
    result = rf"\(age {DURATION}\): RTO {DURATION} against a target of {DURATION} \(within\) \("
    assert re.search(result, tested.stdout), tested.stdout  # the result line in the progress display's units
    assert not OTHER_UNITS.search(tested.stdout), tested.stdout


def test_durations_and_sizes_are_written_one_way() -> None:
    """The one formatter of the progress display and the result lines: a decimal under 10 s, then whole units."""
    from regal_dagster.cli.output import age, size
    from regal_dagster.engine.units import duration

    assert age is duration
    assert [duration(s) for s in (0.04, 4.44, 9.96, 45, 59.6, 720, 5400, 4 * 86400)] == [
        "0.0 s", "4.4 s", "10 s", "45 s", "1 min", "12 min", "1.5 h", "4.0 d"]
    assert [size(n) for n in (512, 12 * 1024 + 300, 80 * 1048576, 3 * 1024 ** 3)] == [
        "512 B", "12.3 KiB", "80.0 MiB", "3.0 GiB"]
