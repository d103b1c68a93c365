"""Where backups are stored: one small interface, a local filesystem and an S3 implementation.

Keys are '/'-separated paths relative to the repository root (docs/formats.md shows the layout).
Large objects are written through `writer(key)`, which commits on success and leaves nothing visible
on failure. Small documents (manifests, lock leases) use `put_bytes`. A lock per target stops two
backups of the same target from running at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import io
import json
import os
import shutil
import socket
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO, Self

from .errors import LockedError, ObjectLockedError, RegalError
from .policy import Policy, RepositoryConfig

REPOSITORY_MARKER = "regal-repository.json"
PARTIAL_SUFFIX = ".partial"


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int


class ObjectWriter(ABC):
    """A write-only stream into one object. Use as a context manager: commit on success, abort on error."""

    bytes_written = 0

    @abstractmethod
    def write(self, data: bytes) -> int: ...

    @abstractmethod
    def commit(self) -> None: ...

    @abstractmethod
    def abort(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class Repository(ABC):
    """The object store interface the engine uses."""

    location: str  # for people: no credentials in it

    @abstractmethod
    def writer(self, key: str, retain_until: datetime | None = None) -> ObjectWriter:
        """`retain_until`: where the repository locks objects (S3 Object Lock), immutable until then."""

    @abstractmethod
    def reader(self, key: str) -> BinaryIO: ...

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, retain_until: datetime | None = None) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def list(self, prefix: str) -> Iterator[StoredObject]: ...

    @abstractmethod
    def size(self, key: str) -> int | None:
        """Size in bytes, or None when the object does not exist."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object for good (every version of it); ObjectLockedError while it is locked."""

    def locked_until(self, key: str) -> datetime | None:
        """The Object Lock retention date of an object, where the store locks objects."""
        return None

    @abstractmethod
    def abandoned_uploads(self, before: datetime) -> list[str]:
        """Unfinished writes (a crash mid-object) started before `before`: partial files, multipart uploads."""

    @abstractmethod
    def discard_upload(self, upload: str) -> None:
        """Remove one of `abandoned_uploads`."""

    @abstractmethod
    def lock(self, name: str) -> contextlib.AbstractContextManager[None]: ...

    def server_side_encryption(self, key: str) -> str | None:
        """The store's own encryption of an object at rest, where the store reports one."""
        return None

    @abstractmethod
    def read_range(self, key: str, start: int, length: int) -> bytes:
        """`length` bytes from offset `start` (fewer at the end of the object)."""

    def usage_bytes(self) -> int:
        """Bytes the repository's objects take."""
        return sum(o.size for o in self.list(""))

    def free_bytes(self) -> tuple[int, int] | None:
        """(free, total) bytes of the storage under the repository, where the store has such a limit."""
        return None

    def ensure_initialized(self) -> None:
        """Write the repository marker if it is missing (a new repository)."""
        if self.size(REPOSITORY_MARKER) is None:
            marker = {"format": "regal-backup-repository", "version": 1,
                      "created_at": datetime.now(UTC).isoformat(timespec="seconds")}
            self.put_bytes(REPOSITORY_MARKER, json.dumps(marker, indent=2).encode())


def open_repository(policy: Policy, config: RepositoryConfig | None = None) -> Repository:
    """The policy's repository, or the one `config` describes (the off-site copy)."""
    config = config or policy.repository
    if config.is_s3:
        return S3Repository(config)
    return LocalRepository(policy.local_repository_path(config), lock_wait=config.lock_wait)


def open_offsite(policy: Policy) -> Repository | None:
    return open_repository(policy, policy.offsite) if policy.offsite else None


def _owner() -> dict[str, object]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.now(UTC).isoformat(timespec="seconds")}


def _describe_owner(raw: bytes | str) -> str:
    try:
        owner = json.loads(raw)
        return f"process {owner['pid']} on {owner['host']} since {owner['since']}"
    except (ValueError, KeyError, TypeError):
        return "another process"


# --- local filesystem ---------------------------------------------------------------------------

class _LocalWriter(ObjectWriter):
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.partial = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
        self.file = open(self.partial, "xb")  # noqa: SIM115 - closed by commit() or abort()
        self.bytes_written = 0

    def write(self, data: bytes) -> int:
        try:
            self.file.write(data)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise RegalError(f"the repository disk is full while writing {self.path.name}",
                                 "free space or prune old backups; the unfinished backup was discarded") from None
            raise
        self.bytes_written += len(data)
        return len(data)

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.partial, self.path)
        _fsync_dir(self.path.parent)

    def abort(self) -> None:
        self.file.close()
        self.partial.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalRepository(Repository):
    def __init__(self, root: Path, lock_wait: timedelta = timedelta(0)):
        self.root = root
        self.location = f"file://{root}"
        self.lock_wait = lock_wait
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"key {key!r} leaves the repository")
        return path

    def writer(self, key: str, retain_until: datetime | None = None) -> ObjectWriter:
        return _LocalWriter(self._path(key))

    def reader(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise RegalError(f"object {key} is missing from {self.location}",
                             "the backup is damaged: verify it and use another one") from None

    def put_bytes(self, key: str, data: bytes, retain_until: datetime | None = None) -> None:
        with self.writer(key) as w:
            w.write(data)

    def get_bytes(self, key: str) -> bytes:
        with self.reader(key) as f:
            return f.read()

    def list(self, prefix: str) -> Iterator[StoredObject]:
        base = self._path(prefix) if prefix else self.root
        if not base.exists():
            return
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.endswith(PARTIAL_SUFFIX):
                    continue
                full = Path(dirpath) / name
                yield StoredObject(full.relative_to(self.root).as_posix(), full.stat().st_size)

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def read_range(self, key: str, start: int, length: int) -> bytes:
        with self.reader(key) as f:
            f.seek(start)
            return f.read(length)

    def free_bytes(self) -> tuple[int, int] | None:
        existing = next(p for p in (self.root, *self.root.parents) if p.exists())  # before the first backup
        usage = shutil.disk_usage(existing)
        return usage.free, usage.total

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def abandoned_uploads(self, before: datetime) -> list[str]:
        found = []
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                full = Path(dirpath) / name
                if name.endswith(PARTIAL_SUFFIX) and full.stat().st_mtime < before.timestamp():
                    found.append(full.relative_to(self.root).as_posix())
        return sorted(found)

    def discard_upload(self, upload: str) -> None:
        self._path(upload).unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """An flock on locks/NAME.lock: the kernel releases it if the process dies."""
        path = self._path(f"locks/{name}.lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.lock_wait.total_seconds()
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0)
                os.close(fd)
                if time.monotonic() >= deadline:
                    raise LockedError(f"another backup of '{name}' is running ({_describe_owner(holder)})",
                                      "wait for it to finish, or set repository.lock_wait to queue") from None
                time.sleep(0.2)
                continue
            # The holder before us may have removed the file after we opened it: lock the live file only.
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_owner()).encode(), 0)
            yield
        finally:
            path.unlink(missing_ok=True)
            os.close(fd)


# --- S3 ------------------------------------------------------------------------------------------

class _S3Writer(ObjectWriter):
    """Streamed multipart upload. Parts in flight are limited per repository (`upload_concurrency`, shared
    by every object being written at once), so memory stays bounded: part size x (concurrency + writers)."""

    def __init__(self, repo: S3Repository, key: str, retain_until: datetime | None):
        self.repo, self.key, self.retain_until = repo, key, retain_until
        self.part_size = repo.config.part_size_mb * 1024 * 1024
        self.buffer = bytearray()
        self.upload_id: str | None = None
        self.parts: list[Future[dict[str, object]]] = []
        self.pool = ThreadPoolExecutor(max_workers=repo.config.upload_concurrency)
        self.slots = repo.upload_slots
        self.bytes_written = 0
        self.aborted = False

    def write(self, data: bytes) -> int:
        if self.aborted:
            # A late flush after a failure (e.g. the Tink stream's finalizer) goes nowhere: it must not
            # start a new multipart upload that nobody completes or aborts.
            return len(data)
        self.buffer += data
        self.bytes_written += len(data)
        while len(self.buffer) >= self.part_size:
            self._send(bytes(self.buffer[: self.part_size]))
            del self.buffer[: self.part_size]
        return len(data)

    def _send(self, body: bytes) -> None:
        if self.upload_id is None:
            with self.repo._errors(self.key):
                response = self.repo.client.create_multipart_upload(
                    Bucket=self.repo.bucket, Key=self.repo.full_key(self.key), **self.repo.sse_args())
            self.upload_id = response["UploadId"]
        for done in [p for p in self.parts if p.done()]:
            done.result()  # surface upload errors early
        self.slots.acquire()
        number = len(self.parts) + 1
        future = self.pool.submit(self._upload_part, number, body)
        future.add_done_callback(lambda _f: self.slots.release())
        self.parts.append(future)

    def _upload_part(self, number: int, body: bytes) -> dict[str, object]:
        with self.repo._errors(self.key):
            response = self.repo.client.upload_part(
                Bucket=self.repo.bucket, Key=self.repo.full_key(self.key), UploadId=self.upload_id,
                PartNumber=number, Body=body)
        return {"PartNumber": number, "ETag": response["ETag"]}

    def commit(self) -> None:
        try:
            if self.upload_id is None:  # small object: one request
                self.repo.put_bytes(self.key, bytes(self.buffer), self.retain_until)
                return
            if self.buffer:
                self._send(bytes(self.buffer))
                self.buffer.clear()
            parts = [p.result() for p in self.parts]
            with self.repo._errors(self.key):
                self.repo.client.complete_multipart_upload(
                    Bucket=self.repo.bucket, Key=self.repo.full_key(self.key), UploadId=self.upload_id,
                    MultipartUpload={"Parts": parts})
                lock = self.repo.lock_args(self.retain_until)
                if lock:  # set on the finished object: one request, the same for every S3 implementation
                    self.repo.client.put_object_retention(
                        Bucket=self.repo.bucket, Key=self.repo.full_key(self.key),
                        Retention={"Mode": lock["ObjectLockMode"], "RetainUntilDate": lock["ObjectLockRetainUntilDate"]})
        except BaseException:
            self.abort()
            raise
        finally:
            self.pool.shutdown(wait=True)

    def abort(self) -> None:
        self.aborted = True
        self.buffer.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.upload_id is not None:
            with contextlib.suppress(Exception):
                self.repo.client.abort_multipart_upload(
                    Bucket=self.repo.bucket, Key=self.repo.full_key(self.key), UploadId=self.upload_id)
            self.upload_id = None


class _S3Reader(io.RawIOBase):
    """An object's body; network errors while streaming become RegalError like every other S3 error."""

    def __init__(self, repo: S3Repository, key: str, body):  # type: ignore[no-untyped-def]
        self.repo, self.key, self.body = repo, key, body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def, override]
        with self.repo._errors(self.key):
            data = self.body.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        return n

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.body.close()
        super().close()


class S3Repository(Repository):
    def __init__(self, config: RepositoryConfig):
        import boto3
        from botocore.config import Config

        self.config = config
        self.upload_slots = threading.Semaphore(config.upload_concurrency)  # parts in flight, all writers
        bucket, _, prefix = config.url[len("s3://"):].partition("/")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.location = config.url
        self.client = boto3.client(
            "s3", region_name=config.region, endpoint_url=config.endpoint_url,
            config=Config(max_pool_connections=max(10, config.upload_concurrency * 2),
                          retries={"max_attempts": 5, "mode": "standard"}))

    def full_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def sse_args(self) -> dict[str, str]:
        args = {"ServerSideEncryption": self.config.server_side_encryption}
        if self.config.sse_kms_key_id:
            args["SSEKMSKeyId"] = self.config.sse_kms_key_id
        return args

    def _errors(self, key: str):  # type: ignore[no-untyped-def]
        from botocore.exceptions import BotoCoreError, ClientError

        @contextlib.contextmanager
        def translate() -> Iterator[None]:
            try:
                yield
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code in ("NoSuchKey", "404"):
                    raise RegalError(f"object {key} is missing from {self.location}",
                                     "the backup is damaged: verify it and use another one") from None
                if code == "NoSuchBucket":
                    raise RegalError(f"bucket {self.bucket} does not exist", "create it, or fix repository.url") from None
                if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                    raise RegalError(f"access to {self.location} was denied ({code})",
                                     "check the credentials and the bucket policy for this identity") from None
                raise RegalError(f"S3 request for {key} failed: {code}", "retry; check the endpoint and region") from None
            except BotoCoreError as exc:
                raise RegalError(f"cannot reach {self.location}: {type(exc).__name__}",
                                 "check network access and repository.endpoint_url/region") from None
        return translate()

    def lock_args(self, retain_until: datetime | None) -> dict[str, object]:
        lock = self.config.object_lock
        if lock is None or retain_until is None or retain_until <= datetime.now(UTC):
            return {}  # S3 refuses a date in the past: the retention is over, there is nothing left to lock
        return {"ObjectLockMode": lock.mode, "ObjectLockRetainUntilDate": retain_until}

    def writer(self, key: str, retain_until: datetime | None = None) -> ObjectWriter:
        return _S3Writer(self, key, retain_until)

    def reader(self, key: str) -> BinaryIO:
        with self._errors(key):
            body = self.client.get_object(Bucket=self.bucket, Key=self.full_key(key))["Body"]
        return _S3Reader(self, key, body)  # type: ignore[return-value]

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        with self._errors(key):
            response = self.client.get_object(Bucket=self.bucket, Key=self.full_key(key),
                                              Range=f"bytes={start}-{start + length - 1}")
            return response["Body"].read()  # type: ignore[no-any-return]

    def put_bytes(self, key: str, data: bytes, retain_until: datetime | None = None) -> None:
        with self._errors(key):
            self.client.put_object(Bucket=self.bucket, Key=self.full_key(key), Body=data, **self.sse_args(),
                                   **self.lock_args(retain_until))  # type: ignore[arg-type]

    def get_bytes(self, key: str) -> bytes:
        with self._errors(key):
            return self.client.get_object(Bucket=self.bucket, Key=self.full_key(key))["Body"].read()  # type: ignore[no-any-return]

    def list(self, prefix: str) -> Iterator[StoredObject]:
        start = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        with self._errors(prefix):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.full_key(prefix)):
                for item in page.get("Contents", []):
                    yield StoredObject(item["Key"][start:], item["Size"])

    def size(self, key: str) -> int | None:
        from botocore.exceptions import ClientError

        with self._errors(key):  # connection errors (BotoCoreError) become RegalError too
            try:
                return self.client.head_object(Bucket=self.bucket, Key=self.full_key(key))["ContentLength"]  # type: ignore[no-any-return]
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise

    def server_side_encryption(self, key: str) -> str | None:
        with self._errors(key):
            return self.client.head_object(Bucket=self.bucket, Key=self.full_key(key)).get("ServerSideEncryption")

    @functools.cached_property
    def versioned(self) -> bool:
        """Object Lock buckets are versioned: a plain delete there only hides the data behind a marker."""
        with self._errors("(bucket versioning)"):
            return self.client.get_bucket_versioning(Bucket=self.bucket).get("Status") in ("Enabled", "Suspended")

    def delete(self, key: str) -> None:

        full = self.full_key(key)
        if not self.versioned:
            with self._errors(key):
                self.client.delete_object(Bucket=self.bucket, Key=full)
            return
        paginator = self.client.get_paginator("list_object_versions")
        with self._errors(key):
            versions = [v["VersionId"] for page in paginator.paginate(Bucket=self.bucket, Prefix=full)
                        for v in page.get("Versions", []) + page.get("DeleteMarkers", []) if v["Key"] == full]
        for version in versions:
            try:
                with self._errors(key):
                    self.client.delete_object(Bucket=self.bucket, Key=full, VersionId=version)
            except RegalError:
                until = self.locked_until(key, version)
                if until is not None and until > datetime.now(UTC):
                    raise ObjectLockedError(f"object {key} is under Object Lock until {until:%Y-%m-%d %H:%M} UTC",
                                            "it goes after that date; nothing can remove it earlier") from None
                raise

    def locked_until(self, key: str, version: str | None = None) -> datetime | None:
        from botocore.exceptions import ClientError

        args = {"VersionId": version} if version else {}
        with self._errors(key):
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=self.full_key(key), **args)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound", "405"):
                    return None
                raise
        return head.get("ObjectLockRetainUntilDate")  # type: ignore[no-any-return]

    def abandoned_uploads(self, before: datetime) -> list[str]:
        paginator = self.client.get_paginator("list_multipart_uploads")
        start = len(self.prefix) + 1 if self.prefix else 0
        with self._errors("(multipart uploads)"):
            return [f"{u['Key'][start:]}?uploadId={u['UploadId']}"
                    for page in paginator.paginate(Bucket=self.bucket, Prefix=self.full_key(""))
                    for u in page.get("Uploads", []) if u["Initiated"] < before]

    def discard_upload(self, upload: str) -> None:
        key, _, upload_id = upload.partition("?uploadId=")
        with self._errors(key):
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.full_key(key), UploadId=upload_id)

    def ensure_initialized(self) -> None:
        if self.config.object_lock is not None:
            from botocore.exceptions import ClientError

            try:
                with self._errors("(object lock configuration)"):
                    enabled = self.client.get_object_lock_configuration(Bucket=self.bucket)[
                        "ObjectLockConfiguration"].get("ObjectLockEnabled") == "Enabled"
            except (RegalError, ClientError):
                enabled = False
            if not enabled:
                raise RegalError(f"the policy asks for Object Lock but bucket {self.bucket} does not have it enabled",
                                 "create the bucket with Object Lock enabled (it needs versioning), or remove "
                                 "repository.object_lock from the policy")
        super().ensure_initialized()

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """A lease object created with If-None-Match and renewed while held; an expired lease is free.

        The lease carries a random token: renewal and release touch the lease only while it is still ours,
        so a holder that stalled past its lease never overwrites or deletes the lease of the process
        that took it over.
        """
        from botocore.exceptions import ClientError

        key = self.full_key(f"locks/{name}.json")
        lease = self.config.lock_lease.total_seconds()
        token = uuid.uuid4().hex
        deadline = time.monotonic() + self.config.lock_wait.total_seconds()
        conflict = ("PreconditionFailed", "ConditionalRequestConflict")

        def code(exc: ClientError) -> str:
            return str(exc.response.get("Error", {}).get("Code", ""))

        def body() -> bytes:
            return json.dumps({**_owner(), "token": token, "expires": time.time() + lease}).encode()

        def current_lease() -> tuple[bytes, str] | None:
            """The lease object's bytes and ETag, or None when there is none."""
            try:
                current = self.client.get_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if code(exc) in ("NoSuchKey", "404", "NotFound"):
                    return None
                raise
            return current["Body"].read(), current["ETag"]

        def ours(raw: bytes) -> bool:
            try:
                return json.loads(raw).get("token") == token  # type: ignore[no-any-return]
            except (ValueError, AttributeError):
                return False

        with self._errors(f"locks/{name}.json"):
            while True:
                try:
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=body(), IfNoneMatch="*",
                                           **self.sse_args())
                    break
                except ClientError as exc:
                    if code(exc) not in conflict:
                        raise
                found = current_lease()
                if found is None:
                    continue  # released meanwhile
                raw, etag = found
                try:
                    expired = json.loads(raw)["expires"] < time.time()
                except (ValueError, KeyError, TypeError):
                    expired = True
                if expired:  # take over a dead holder's lease, but only the version we read
                    try:
                        self.client.put_object(Bucket=self.bucket, Key=key, Body=body(), IfMatch=etag,
                                               **self.sse_args())
                        break
                    except ClientError as exc:
                        if code(exc) not in (*conflict, "NoSuchKey", "404"):
                            raise
                    continue
                if time.monotonic() >= deadline:
                    raise LockedError(f"another backup of '{name}' is running ({_describe_owner(raw)})",
                                      "wait for it to finish, or set repository.lock_wait to queue")
                time.sleep(0.5)

        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(lease / 3):
                try:
                    found = current_lease()
                    if found is None or not ours(found[0]):
                        return  # lost (taken over after we stalled): never clobber the new holder's lease
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=body(), IfMatch=found[1],
                                           **self.sse_args())
                except ClientError as exc:
                    if code(exc) in conflict:
                        return
                except Exception:  # noqa: BLE001, S110 - transient (network): try again at the next tick
                    pass

        renewer = threading.Thread(target=renew, name=f"lock-renew-{name}", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            with contextlib.suppress(Exception):
                found = current_lease()
                if found is not None and ours(found[0]):
                    self.client.delete_object(Bucket=self.bucket, Key=key)
