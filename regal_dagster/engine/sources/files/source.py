"""The `files` source kind."""

from __future__ import annotations

import contextlib
import functools
import os
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, cast

from ...crypto import Keyring
from ...errors import RegalError
from ...findings import Finding, finding, readable_path
from ...manifest import Manifest
from ...pipeline import StoredBackup
from ...settings import TargetSettings
from ...workspace import private_directory
from ..base import Captured, Restored, RestoredFindings, RestoreRequest, Source, StoreObject
from .archive import Walked, compare_stream, compare_tree, extra_paths, tar_stream
from .target import FilesTarget

ARCHIVE_OBJECT = "files.tar"
ARCHIVE_CONTENT = "POSIX tar (PAX) of the target's paths"


class FilesSource(Source):
    kind = "files"
    label = "set of files"
    restore_test_proves = "every file's type, permissions and SHA-256, every link's target, and nothing more"

    def capture(self, target: TargetSettings, store: StoreObject) -> Captured:
        settings = cast(FilesTarget, target)
        walked = Walked()
        record = store(ARCHIVE_OBJECT, ARCHIVE_CONTENT, tar_stream(settings.paths, settings.exclude, walked), 0)
        files = [e for e in walked.entries if e["type"] == "file"]
        return Captured([record], {"paths": settings.paths, "exclude": settings.exclude, "entries": walked.entries,
                                   "files": len(files), "bytes": sum(e["size"] for e in files),
                                   "skipped": walked.skipped})

    def preflight(self, subject: str, target: TargetSettings) -> list[Finding]:
        return [finding(subject, f"path {path}", functools.partial(readable_path, Path(path)),
                        "fix the path in the policy, or run as a user that can read it")
                for path in cast(FilesTarget, target).paths]

    def check_structure(self, backup: StoredBackup) -> str:
        where = f"object {backup.manifest.object(ARCHIVE_OBJECT).key}"
        with plaintext_pipe(backup) as stream:
            members = compare_stream(stream, backup.manifest.source["entries"], where,
                                     backup.keyring.fingerprint_matches)
        return f"the tar stream holds the {members} recorded members with their SHA-256"

    def plaintext_needles(self, manifest: Manifest) -> list[bytes]:
        names = {os.path.basename(e["path"]).encode() for e in manifest.source.get("entries", [])}
        return sorted({n for n in names if len(n) >= 8} | {b"-----BEGIN "})  # file names; PEM keys/certs

    def summary(self, manifest: Manifest) -> dict[str, Any]:
        return {"files": manifest.source.get("files", 0), "file_bytes": manifest.source.get("bytes", 0)}

    def restore(self, backup: StoredBackup, request: RestoreRequest) -> Restored:
        """Every path under the directory `request.to`; then each file compared with the manifest."""
        root = Path(request.to)
        if root.exists() and any(root.iterdir()) and not request.drop_existing:
            raise RegalError(f"{root} is not empty", "restore into a new directory, or pass --drop-existing to "
                                                     "write over what is there")
        root.mkdir(parents=True, exist_ok=True)
        if request.before_writing:
            request.before_writing()
        started = time.monotonic()
        with plaintext_pipe(backup) as stream, tarfile.open(fileobj=stream, mode="r|") as archive:
            archive.extractall(root, filter="tar")  # refuses paths outside root, also through links
        entries = backup.manifest.source["entries"]
        seconds = {"extract": time.monotonic() - started}
        started = time.monotonic()
        problems = compare_tree(root, entries, backup.keyring.fingerprint_matches)
        seconds["validate"] = time.monotonic() - started
        files = backup.manifest.source.get("files", 0)
        return Restored(str(root), f"restored {backup.manifest.backup_id}: {files} files and their directories "
                                   f"under {root}", problems, seconds, {"path": str(root), "files": files},
                        next_steps=f"Compare, then copy into place: e.g. rsync -a {root}/etc/ /etc/")

    @contextlib.contextmanager
    def scratch_destination(self, work_dir: Path | None, manifest: Manifest | None = None) -> Iterator[str]:
        with private_directory("files-test", work_dir) as tmp:
            yield str(Path(tmp) / "restored")

    def verify_restored(self, destination: str, manifest: Manifest, keyring: Keyring, jobs: int) -> RestoredFindings:
        """Nothing under the destination that the backup did not hold."""
        extra = extra_paths(Path(destination), manifest.source["entries"])
        return RestoredFindings([f"{path} was restored but is not in the backup" for path in extra])


@contextlib.contextmanager
def plaintext_pipe(backup: StoredBackup, name: str = ARCHIVE_OBJECT) -> Iterator[IO[bytes]]:
    """The archive's authenticated plaintext as a readable stream, decrypted by a thread into a pipe: never
    whole in memory or on disk. A failure on either side reaches the reader."""
    read_end, write_end = os.pipe()
    failure: list[BaseException] = []

    def produce() -> None:
        with open(write_end, "wb") as sink:
            try:
                backup.stream(name, sink.write)
            except BrokenPipeError:
                pass  # the reader stopped early: its own error is the one to report
            except BaseException as exc:  # noqa: BLE001 - handed to the reader
                failure.append(exc)

    producer = threading.Thread(target=produce, name="files-decrypt", daemon=True)
    producer.start()
    try:
        with open(read_end, "rb") as stream:
            yield stream
            stream.read()  # drain: the producer checks the SHA-256 at the very end
    finally:  # the read end is closed first, so a producer blocked on a full pipe stops
        producer.join()
        if failure:  # the cause (an object that fails authentication) wins over what the reader saw
            raise failure[0]
