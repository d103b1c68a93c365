"""How the CLI speaks: human text on a terminal, or one JSON document with --json; progress only on a
terminal; sizes for people.

Every command's JSON is one object in the same envelope (docs/cli-json.md):

    {"schema": "regal-backup-cli/1", "command": "restore", "ok": true, "exit_code": 0, "warnings": [],
     ...the command's own fields..., "error": {"message": ..., "hint": ...}  (only when it failed)}

`ok` is the one success key: true exactly when the exit status is 0. The command's own fields follow
the naming rules the document lists (`target` is always the policy's target, never a destination).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ..engine.units import duration as age  # the one way every command writes durations and sizes
from ..engine.units import mib, size

if TYPE_CHECKING:  # the CLI starts without the engine's models (`--version`, `--help`, `wal push`)
    from ..engine.manifest import Manifest
    from ..engine.pipeline import Progress

if TYPE_CHECKING:

    from ..engine.restore import RestoreResult

SCHEMA = "regal-backup-cli/1"
ENVELOPE = ("schema", "command", "ok", "exit_code", "warnings", "error")


class Output:
    """Human text on a terminal, or one JSON document with --json (written when the command ends)."""

    def __init__(self, as_json: bool, command: str = "", verbosity: int = 0):
        self.as_json = as_json
        self.command = command
        self.verbosity = verbosity  # -1 --quiet, 0, 1 --verbose, 2 -vv
        self.payload: dict[str, Any] = {}
        self.warnings: list[str] = []
        self.done = False

    def result(self, payload: dict[str, Any], text: str) -> None:
        clash = sorted(set(payload) & set(ENVELOPE))
        if clash:
            raise ValueError(f"a command's JSON may not use the envelope's keys {clash}")  # a bug, not an input
        self.payload = payload
        if not self.as_json:
            print(text)

    def warn(self, text: str) -> None:
        """A warning: on stderr for people, in `warnings` for scripts."""
        self.warnings.append(text)
        print(f"warning: {text}", file=sys.stderr)

    def note(self, text: str) -> None:
        """A note (a backup passed over, ...): on stderr (not with --quiet), and in `warnings`."""
        self.warnings.append(text)
        if self.verbosity >= 0:
            print(f"note: {text}", file=sys.stderr)

    def info(self, text: str) -> None:
        """What is being done (a step of the demo, a service listening): on stderr, not with --quiet."""
        if self.verbosity >= 0:
            print(text, file=sys.stderr, flush=True)

    def detail(self, text: str) -> None:
        """More than people usually want: on stderr with --verbose only."""
        if self.verbosity > 0:
            print(text, file=sys.stderr, flush=True)

    def finish(self, exit_code: int) -> None:
        if self.as_json and not self.done:
            self._emit(exit_code, None)

    def fail(self, message: str, hint: str | None, exit_code: int) -> None:
        if self.as_json and not self.done:
            self._emit(exit_code, {"message": message, "hint": hint})

    def _emit(self, exit_code: int, error: dict[str, Any] | None) -> None:
        self.done = True
        import json  # here: `--help` and `wal push` start without it

        document = {"schema": SCHEMA, "command": self.command, "ok": exit_code == 0, "exit_code": exit_code,
                    "warnings": self.warnings, **self.payload, **({"error": error} if error else {})}
        print(json.dumps(document, indent=2, default=str))

    def progress(self, description: str, total: int | None = None, *, phase: str | None = None,
                 estimated: bool = False) -> _ProgressBar:
        """Bytes done against `total` (a percentage and an ETA; `estimated`: the total is the source's estimate,
        so never above 99% before the end), the phase under way and the elapsed time: one line redrawn on a
        terminal; with --verbose elsewhere, a line per phase and per 10%; nothing with --json or --quiet."""
        return _ProgressBar(description, total, self.progress_mode(), phase, estimated)

    def progress_mode(self) -> str | None:
        """"bar" (a terminal), "lines" (--verbose elsewhere) or None (no display: --json, --quiet, or piped)."""
        if self.as_json or self.verbosity < 0:
            return None
        return "bar" if sys.stderr.isatty() else "lines" if self.verbosity > 0 else None

    @contextmanager
    def activity(self, description: str, phase: str | None = None) -> Iterator[None]:
        """For steps without bytes to count (a report, a drill's phases): a line that shows the elapsed time."""
        with self.progress(description, phase=phase) as advance:
            del advance
            yield


class _ProgressBar:
    """The one progress display of every command (backup, verify, restore, restore test, drill, ...): the
    engine calls it with the bytes just processed, and `phase(name)` (engine/pipeline.announce_phase) when a
    step starts."""

    def __init__(self, description: str, total: int | None, mode: str | None, phase: str | None = None,
                 estimated: bool = False):
        import threading  # here, not at the top: --help and --version start without it
        import time

        self.description, self.total, self.mode, self.estimated = description, total or None, mode, estimated
        self.phase_name = phase
        self.done = 0
        self.clock = time.monotonic
        self.started = self.clock()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.ticker: threading.Thread | None = None
        self.reported_tenth = 0  # "lines": the last 10% step written
        self.width = 0

    def line(self, finished: bool = False) -> str:
        elapsed = self.clock() - self.started
        text = self.description + (f" [{self.phase_name}]" if self.phase_name else "") + ": "
        if self.total and finished and self.estimated:  # the real size is known now
            text += f"100%, {mib(self.done)} (estimated {mib(self.total)})"
        elif self.total:
            fraction = self.done / self.total
            shown = min(fraction, 1.0 if finished or not self.estimated else 0.99)
            text += f"{shown * 100:3.0f}% of {'about ' if self.estimated else ''}{mib(self.total)}"
            if not finished and 0.01 <= fraction < 1:
                text += f", ETA {age(elapsed * (1 - fraction) / fraction)}"
        elif self.done:
            text += mib(self.done)
        return (text + f", {age(elapsed)} elapsed").replace(": , ", ": ") + (", done" if finished else "")

    def _draw(self, finished: bool = False) -> None:
        text = self.line(finished)
        if self.mode == "bar":
            pad = max(self.width - len(text), 0)
            self.width = len(text)
            sys.stderr.write("\r" + text + " " * pad + ("\n" if finished else ""))
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def __call__(self, n: int) -> None:
        with self.lock:
            self.done += n
            if self.mode == "lines" and self.total and (tenth := int(10 * self.done / self.total)) > \
                    self.reported_tenth and tenth < 10:
                self.reported_tenth = tenth
                self._draw()

    def phase(self, name: str) -> None:
        with self.lock:
            self.phase_name = name
            self._draw()

    def __enter__(self) -> Progress | None:
        if self.mode is None:
            return None
        if self.mode == "bar":
            import threading

            def tick() -> None:  # the elapsed time moves even while nothing is counted (a scratch server starting)
                while not self.stop.wait(0.5):
                    with self.lock:
                        self._draw()

            self.ticker = threading.Thread(target=tick, name="progress", daemon=True)
            self.ticker.start()
        with self.lock:
            self._draw()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.ticker is not None:
            self.ticker.join()
        if self.mode is not None and exc[0] is None:
            with self.lock:
                self._draw(finished=True)
        elif self.mode == "bar":
            sys.stderr.write("\n")


def manifest_summary(m: Manifest) -> dict[str, Any]:
    from ..engine.sources.registry import source_for

    return {
        "backup_id": m.backup_id, "target": m.target, "kind": m.kind, "retention_class": m.retention_class,
        "started_at": m.started_at.isoformat(), "finished_at": m.finished_at.isoformat(),
        "duration_seconds": round(m.duration_seconds, 3), "bytes_read": m.plaintext_bytes,
        "bytes_stored": m.stored_bytes, "key_id": m.objects[0].encryption.key_id if m.objects else None,
        "tables": len(m.source.get("tables", [])), "rows": sum(m.table_rows().values()),
        "retain_until": m.locked_until.isoformat() if m.locked_until else None, **source_for(m.kind).summary(m),
    }


def backup_line(row: dict[str, Any], retention: str, recovery_note: str | None) -> str:
    """One backup in `list`, as `pgbackrest info` shows one: target, id, class, start, the database's size against
    the stored size, status and retention; below it what a kind adds (a base backup's type, parent, WAL positions
    and timeline; tables and rows when there are any), how far it recovers, a legal hold and an annotation."""
    indent = " " * 13
    line = (f"{row['target']:12} {row['backup_id']:40} {row['retention_class']:8} {row['started_at'][:19]:20} "
            f"{size(row['bytes_read']):>10} {size(row['bytes_stored']):>10}  {row['status']:9} {retention}"
            + (f" ({row['status_note']})" if row["status_note"] else ""))
    details = []
    if "backup_type" in row:
        details.append(f"{row['backup_type']}" + (f" on {row['parent_backup_id']}" if row.get("parent_backup_id")
                                                   else "")
                       + f", WAL {row.get('start_lsn') or '?'} - {row.get('stop_lsn') or '?'}, timeline "
                         f"{row.get('timeline') or '?'}")
    if row.get("tables"):
        details.append(f"{row['tables']} tables, {row['rows']} rows")
    details += [recovery_note] if recovery_note else []
    if hold := row.get("legal_hold"):
        details.append(f"LEGAL HOLD: {hold['reason']}" + (f" (until {hold['until'][:16]})" if hold["until"] else ""))
    if note := row.get("annotation"):
        details.append(f"note: {note}")
    return line + "".join(f"\n{indent}{d}" for d in details)


def command_name(args: Any) -> str:
    """The command as typed: "restore", "keys list", "gdpr erase"."""
    groups = [value for key, value in vars(args).items() if key.endswith("_command") and value]
    return " ".join([args.command, *groups])


def cli_invocation() -> str:
    """How to run regal-backup from here, as the shell will find it: `regal-backup` when that name on PATH
    is this installation, else the script next to this Python (`.venv/bin/regal-backup`)."""
    return tool_invocation("regal-backup")


def tool_invocation(name: str) -> str:
    """A command installed with this Python (regal-backup, dagster), as the user can type it here."""
    import os
    import shutil
    from pathlib import Path

    beside = Path(sys.executable).parent / name
    found = shutil.which(name)
    if found and beside.exists() and Path(found).resolve() == beside.resolve():
        return name
    if not beside.exists():
        return name
    try:
        relative = os.path.relpath(beside, Path.cwd())
    except ValueError:  # another drive
        return str(beside)
    return relative if not relative.startswith("..") else str(beside)


def restored_text(result: RestoreResult, plan: str = "") -> str:
    text = result.summary + (f"\n{plan}" if plan else "")
    if result.problems:
        text += "\nVALIDATION FAILED:\n" + "\n".join(f"  - {p}" for p in result.problems)
    if result.erasures and result.erasures.subjects:
        text += (f"\nGDPR: {result.erasures.subjects} erasure(s) re-applied, rows erased: "
                 + ", ".join(f"{t} {n}" for t, n in result.erasures.rows_erased.items()))
    if result.next_steps and result.ok:
        text += "\n" + result.next_steps
    return text
