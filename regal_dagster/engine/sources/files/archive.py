"""Files as one POSIX tar stream (PAX headers), written and read a chunk at a time.

Each member is named by its absolute path without the leading `/`, so a restore under a directory D puts
`/etc/regal/tls/cert.pem` at `D/etc/regal/tls/cert.pem`. While the stream is produced every member's facts
are recorded (type, size, permissions, mtime, owner, SHA-256 of a file's content, a link's target); a file
that changes while it is read stops the backup rather than storing a copy of no moment in time.
Sockets, devices and FIFOs are not backed up: they are listed as skipped.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ...errors import IntegrityError, RegalError
from ...pipeline import CHUNK

BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
Matches = Callable[[str, str], bool]  # (recorded fingerprint, SHA-256 found) -> same content


@dataclass
class Walked:
    """What the stream held, filled in as it is produced."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _excluded(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(os.path.basename(path), p) for p in patterns)


def _walk(paths: list[str], exclude: list[str]) -> Iterator[str]:
    """Every path to store, parents before children, sorted, once."""
    seen: set[str] = set()
    for root in sorted(paths):
        if not os.path.lexists(root):
            raise RegalError(f"{root} does not exist", "fix the target's `paths` in the policy")
        candidates = [root]
        if os.path.isdir(root) and not os.path.islink(root):
            for directory, dirs, files in os.walk(root):
                dirs.sort()
                candidates += [os.path.join(directory, name) for name in sorted(dirs + files)]
        for path in candidates:
            if path not in seen and not _excluded(path, exclude):
                seen.add(path)
                yield path


def tar_stream(paths: list[str], exclude: list[str], walked: Walked) -> Iterator[bytes]:
    """The tar stream of `paths`; `walked` receives each member's facts as it is written."""
    written = 0
    for chunk in _members(paths, exclude, walked):
        written += len(chunk)
        yield chunk
    end = written + 2 * BLOCK  # two empty blocks end the archive; tar pads it to whole records
    yield b"\0" * (2 * BLOCK + (RECORD - end % RECORD) % RECORD)


def _members(paths: list[str], exclude: list[str], walked: Walked) -> Iterator[bytes]:
    for path in _walk(paths, exclude):
        info = os.lstat(path)
        member = tarfile.TarInfo(path.lstrip("/"))
        member.mode, member.mtime = stat.S_IMODE(info.st_mode), int(info.st_mtime)
        member.uid, member.gid = info.st_uid, info.st_gid
        facts: dict[str, Any] = {"path": path, "mode": f"{member.mode:04o}", "mtime": member.mtime,
                                 "uid": info.st_uid, "gid": info.st_gid}
        if stat.S_ISDIR(info.st_mode):
            member.type = tarfile.DIRTYPE
            facts["type"] = "dir"
        elif stat.S_ISLNK(info.st_mode):
            member.type, member.linkname = tarfile.SYMTYPE, os.readlink(path)
            facts.update(type="symlink", target=member.linkname)
        elif stat.S_ISREG(info.st_mode):
            member.size = info.st_size
            facts.update(type="file", size=info.st_size)
        else:
            walked.skipped.append(path)
            continue
        yield member.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        if facts["type"] == "file":
            digest = hashlib.sha256()
            yield from _content(path, info, digest)
            facts["sha256"] = digest.hexdigest()
            if info.st_size % BLOCK:
                yield b"\0" * (BLOCK - info.st_size % BLOCK)
        walked.entries.append(facts)


def _content(path: str, before: os.stat_result, digest: Any) -> Iterator[bytes]:
    left = before.st_size
    with open(path, "rb") as f:
        while left:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)
            digest.update(chunk)
            yield chunk
        grew = bool(f.read(1))
    after = os.lstat(path)
    if left or grew or (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise RegalError(f"{path} changed while it was being backed up",
                         "back up again when it is not being written (nothing partial was kept)")


def read_members(stream: IO[bytes]) -> Iterator[tuple[tarfile.TarInfo, str | None]]:
    """Each member of a tar stream with the SHA-256 of its content (None for anything but a file)."""
    with tarfile.open(fileobj=stream, mode="r|") as archive:
        for member in archive:
            digest = None
            if member.isfile():
                content = archive.extractfile(member)
                assert content is not None
                sha = hashlib.sha256()
                while chunk := content.read(CHUNK):
                    sha.update(chunk)
                digest = sha.hexdigest()
            yield member, digest


def compare_stream(stream: IO[bytes], entries: list[dict[str, Any]], where: str, matches: Matches) -> int:
    """The stream holds exactly the recorded entries with their content (`matches(fingerprint, sha256)`: the
    keyring's fingerprint_matches): IntegrityError naming the first that differs. Returns the number of
    members."""
    expected = {e["path"].lstrip("/"): e for e in entries}
    count = 0
    try:
        for member, digest in read_members(stream):
            count += 1
            facts = expected.pop(member.name, None)
            if facts is None:
                raise IntegrityError(f"{where} holds /{member.name}, which the manifest does not list",
                                     "this backup is damaged: use another one")
            if facts["type"] == "file" and (member.size != facts["size"] or not matches(facts["sha256"], str(digest))):
                raise IntegrityError(f"{where}: /{member.name} differs from the manifest's size and fingerprint",
                                     "this backup is damaged: use another one")
    except tarfile.TarError as exc:
        raise IntegrityError(f"{where} is not a readable tar stream ({exc})",
                             "this backup is damaged: use another one") from None
    if expected:
        raise IntegrityError(f"{where} lacks {len(expected)} member(s) the manifest lists, first "
                             f"/{min(expected)}", "this backup is damaged: use another one")
    return count


def compare_tree(root: Path, entries: list[dict[str, Any]], matches: Matches) -> list[str]:
    """Differences between a restored tree under `root` and the recorded entries, one sentence each."""
    problems = []
    for facts in entries:
        path = root / facts["path"].lstrip("/")
        label = facts["path"]
        if not os.path.lexists(path):
            problems.append(f"{label} is missing")
            continue
        info = os.lstat(path)
        kind = "dir" if stat.S_ISDIR(info.st_mode) else "symlink" if stat.S_ISLNK(info.st_mode) else \
            "file" if stat.S_ISREG(info.st_mode) else "other"
        if kind != facts["type"]:
            problems.append(f"{label} is a {kind}, the backup had a {facts['type']}")
        elif kind == "symlink" and os.readlink(path) != facts["target"]:
            problems.append(f"{label} points to {os.readlink(path)}, the backup had {facts['target']}")
        elif kind == "file" and not matches(facts["sha256"], _sha256(path)):
            problems.append(f"{label} has other content than the backup (SHA-256 differs)")
        elif kind != "symlink" and f"{stat.S_IMODE(info.st_mode):04o}" != facts["mode"]:
            problems.append(f"{label} has mode {stat.S_IMODE(info.st_mode):04o}, the backup had {facts['mode']}")
    return problems


def extra_paths(root: Path, entries: list[dict[str, Any]]) -> list[str]:
    """Paths under `root` that the backup does not hold."""
    recorded = {e["path"].lstrip("/") for e in entries}
    found = []
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            relative = os.path.relpath(os.path.join(directory, name), root)
            if relative not in recorded and not any(r.startswith(relative + "/") for r in recorded):
                found.append("/" + relative)
    return sorted(found)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
