"""The installed version, for `--version`: read from the package's `.dist-info/METADATA` on `sys.path` as
importlib.metadata finds it, without importing importlib.metadata and its e-mail parser (a third of the CLI's
start-up). Anything this does not find the plain way (an egg, a zip) is asked of importlib.metadata."""

from __future__ import annotations

import os
import sys

DISTRIBUTION = "regal_backup"  # "regal-backup", normalized as wheel and pip name its .dist-info folder


def installed_version() -> str:
    found = _dist_info_version()
    if found is not None:
        return found
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("regal-backup")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _dist_info_version() -> str | None:
    """The `Version:` of the first `regal_backup-*.dist-info` on sys.path (importlib.metadata's order), else
    None (importlib.metadata decides)."""
    for entry in sys.path:
        try:
            names = sorted(os.listdir(entry or "."))
        except OSError:  # not a directory (a zip), or gone
            continue
        for name in names:
            stem, dot, suffix = name.rpartition(".")
            if suffix not in ("dist-info", "egg-info") or not dot or \
                    stem.partition("-")[0].lower().replace(".", "_") != DISTRIBUTION:
                continue
            if suffix == "egg-info":  # an older layout (a source tree's `setup.py develop`): importlib's to read
                return None
            try:
                with open(os.path.join(entry or ".", name, "METADATA"), encoding="utf-8") as metadata:
                    for line in metadata:
                        if not line.strip():  # the headers end here
                            break
                        if line.startswith("Version:"):
                            return line.removeprefix("Version:").strip()
            except OSError:
                continue
            return None  # importlib.metadata would stop here too: let it say what it makes of this folder
    return None
