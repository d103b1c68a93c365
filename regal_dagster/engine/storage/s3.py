"""The S3 backend: streamed multipart uploads, Object Lock, versioned deletes, lease locks.

Served for `s3://bucket/prefix` (any S3-compatible endpoint through `repository.endpoint_url`).
botocore makes each request once: refused, dropped and timed-out connections and 5xx, SlowDown and
throttling answers become TransientStorageError, which the retry wrapper (and, for the requests inside
a streamed upload, `retry.call`) tries again under `repository.retry`.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import io
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, Literal, TypeVar, cast

from pydantic import Field, field_validator

from ..errors import ObjectLockedError, RegalError
from ..layout import lock_key
from ..settings import Duration, RepositorySettings
from ..transport import Transport, url_transport
from . import retry
from .base import (
    Backend,
    ObjectMissingError,
    ObjectWriter,
    Repository,
    StoredObject,
    TransientStorageError,
    check_key,
    lock_owner,
    lock_refusal,
)

T = TypeVar("T")


class S3RepositoryConfig(RepositorySettings):
    """A repository in an S3 bucket (or an S3-compatible store): `url` is s3://bucket/prefix."""

    region: str | None = None
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://127.0.0.1:9000")
    server_side_encryption: Literal["AES256", "aws:kms"] = "AES256"
    sse_kms_key_id: str | None = None
    part_size_mb: int = Field(16, ge=5, le=512)
    upload_concurrency: int = Field(4, ge=1, le=32)
    lock_lease: Duration = Field(timedelta(seconds=60), description="S3 lock lease, renewed every third of it "
                                 "while held: a holder that dies frees the lock this long after its last renewal")

    @field_validator("url")
    @classmethod
    def _bucket(cls, url: str) -> str:
        if not url[len("s3://"):].split("/", 1)[0]:
            raise ValueError("s3 url needs a bucket: s3://bucket/prefix")
        return url

    def store_encryption(self) -> str | None:
        return self.server_side_encryption

    def failure_domain(self, base_dir: Path) -> str:
        """The S3 account at the endpoint: both repositories are written with this process's one set of
        credentials, so a second bucket at the same endpoint is in the same account, reachable by the same
        identity."""
        return f"S3 account at {self.endpoint_url or 'AWS'} (one set of credentials writes both)"

# Error codes that say "not now" rather than "no": the same request may pass a moment later.
TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded", "RequestTimeout",
    "RequestTimeoutException", "InternalError", "ServiceUnavailable", "PriorRequestNotComplete",
})


class _S3Writer(ObjectWriter):
    """Streamed multipart upload. Parts in flight are limited per repository (`upload_concurrency`, shared
    by every object being written at once), so memory stays bounded: part size x (concurrency + writers)."""

    def __init__(self, repo: S3Repository, key: str, retain_until: datetime | None):
        self.repo, self.key, self.retain_until = repo, key, retain_until
        self.part_size = repo.config.part_size_mb * 1024 * 1024
        self.buffer = bytearray()
        self.upload_id: str | None = None
        self.parts: list[Future[dict[str, Any]]] = []
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
            response = self.repo.request("create_multipart_upload", self.key, lambda: (
                self.repo.client.create_multipart_upload(
                    Bucket=self.repo.bucket, Key=self.repo.full_key(self.key), **self.repo.sse_args())))
            self.upload_id = response["UploadId"]
        for done in [p for p in self.parts if p.done()]:
            done.result()  # surface upload errors early
        self.slots.acquire()
        number = len(self.parts) + 1
        future = self.pool.submit(self._upload_part, number, body)
        future.add_done_callback(lambda _f: self.slots.release())
        self.parts.append(future)

    def _upload_part(self, number: int, body: bytes) -> dict[str, Any]:
        """One part: a whole request, made again after a transient error (its bytes are still here)."""
        upload_id = self.upload_id
        assert upload_id is not None
        response = self.repo.request(f"upload_part {number} of", self.key, lambda: self.repo.client.upload_part(
            Bucket=self.repo.bucket, Key=self.repo.full_key(self.key), UploadId=upload_id,
            PartNumber=number, Body=body))
        return {"PartNumber": number, "ETag": response["ETag"]}

    def commit(self) -> None:
        try:
            if self.upload_id is None:  # small object: one request
                body = bytes(self.buffer)
                self.repo.request("put_object", self.key,
                                  lambda: self.repo.put_bytes(self.key, body, self.retain_until))
                return
            if self.buffer:
                self._send(bytes(self.buffer))
                self.buffer.clear()
            parts: list[Any] = [p.result() for p in self.parts]
            upload_id = self.upload_id
            self.repo.request("complete_multipart_upload", self.key, lambda: self.repo.client.complete_multipart_upload(
                Bucket=self.repo.bucket, Key=self.repo.full_key(self.key), UploadId=upload_id,
                MultipartUpload={"Parts": parts}))
            lock = self.repo.lock_args(self.retain_until)
            if lock:  # set on the finished object: one request, the same for every S3 implementation
                self.repo.request("put_object_retention", self.key, lambda: self.repo.client.put_object_retention(
                    Bucket=self.repo.bucket, Key=self.repo.full_key(self.key),
                    Retention=cast(Any, {"Mode": lock["ObjectLockMode"],
                                         "RetainUntilDate": lock["ObjectLockRetainUntilDate"]})))
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

    def __init__(self, repo: S3Repository, key: str, body):
        self.repo, self.key, self.body = repo, key, body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        with self.repo._errors(self.key):
            data = self.body.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        return n

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.body.close()
        super().close()


def lease_is_free(raw: bytes) -> bool:
    """A lease nobody holds any more: expired, unreadable, or held by a process of this host that is gone
    (a backup that died, or could not release it while the endpoint was down, frees it at once here)."""
    try:
        lease = json.loads(raw)
        if lease["expires"] < time.time():
            return True
        if lease["host"] == socket.gethostname() and lease["pid"] != os.getpid():
            os.kill(int(lease["pid"]), 0)  # raises when there is no such process
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # a process of another user: alive
    except (ValueError, KeyError, TypeError):
        return True
    return False


class S3Repository(Repository):
    encrypts_at_rest = True  # every object is written with the policy's server-side encryption
    locks_objects = True  # S3 Object Lock (repository.object_lock)

    def __init__(self, config: S3RepositoryConfig):
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
                          retries={"total_max_attempts": 1}))  # retries: storage/retry.py, not botocore

    def full_key(self, key: str) -> str:
        check_key(key, self.location)
        return f"{self.prefix}/{key}" if self.prefix else key

    def request(self, op: str, key: str, send: Callable[[], T]) -> T:
        """One request inside a stream (a part upload): translated errors, retried when transient."""
        def once() -> T:
            with self._errors(key):
                return send()
        return retry.call(self.config.retry, op, key, self.location, once)

    def sse_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"ServerSideEncryption": self.config.server_side_encryption}
        if self.config.sse_kms_key_id:
            args["SSEKMSKeyId"] = self.config.sse_kms_key_id
        return args

    def _errors(self, key: str):
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            HTTPClientError,
            IncompleteReadError,
            SSLError,
        )
        from botocore.exceptions import ConnectionError as BotoConnectionError

        @contextlib.contextmanager
        def translate() -> Iterator[None]:
            try:
                yield
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if code in TRANSIENT_CODES or status == 429 or (status >= 500 and status != 501):
                    raise TransientStorageError(f"{self.location} answered {code} (HTTP {status}) for {key}",
                                                "the store is overloaded or failing: check its status, "
                                                "or slow down what else writes to it") from None
                if code in ("NoSuchKey", "404"):
                    raise ObjectMissingError(f"object {key} is missing from {self.location}",
                                     "the backup is damaged: verify it and use another one") from None
                if code == "NoSuchBucket":
                    raise RegalError(f"bucket {self.bucket} does not exist",
                                     "create it, or fix repository.url") from None
                if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                    raise RegalError(f"access to {self.location} was denied ({code})",
                                     "check the credentials and the bucket policy for this identity") from None
                raise RegalError(f"S3 request for {key} failed: {code}",
                                 "retry; check the endpoint and region") from None
            except BotoCoreError as exc:
                message = f"cannot reach {self.location}: {type(exc).__name__}"
                hint = "check network access and repository.endpoint_url/region"
                if isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError)) and not isinstance(
                        exc, SSLError):  # refused, dropped, timed out: a certificate problem stays
                    raise TransientStorageError(message, hint) from None
                raise RegalError(message, hint) from None
        return translate()

    def lock_args(self, retain_until: datetime | None) -> dict[str, Any]:
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
        from botocore.exceptions import ClientError

        if length <= 0:
            return b""
        with self._errors(key):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self.full_key(key),
                                                  Range=f"bytes={start}-{start + length - 1}")
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "InvalidRange" and self.size(key) is not None:
                    return b""  # past the end of the object
                raise
            return response["Body"].read()

    def put_bytes(self, key: str, data: bytes, retain_until: datetime | None = None) -> None:
        with self._errors(key):
            self.client.put_object(Bucket=self.bucket, Key=self.full_key(key), Body=data, **self.sse_args(),
                                   **self.lock_args(retain_until))

    def get_bytes(self, key: str) -> bytes:
        with self._errors(key):
            return self.client.get_object(Bucket=self.bucket, Key=self.full_key(key))["Body"].read()

    def list(self, prefix: str) -> Iterator[StoredObject]:
        start = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        with self._errors(prefix):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.full_key(prefix)):
                for item in page.get("Contents", []):
                    yield StoredObject(item["Key"][start:], item["Size"], str(item.get("ETag", "")))

    def size(self, key: str) -> int | None:
        from botocore.exceptions import ClientError

        with self._errors(key):  # connection errors (BotoCoreError) become RegalError too
            try:
                return self.client.head_object(Bucket=self.bucket, Key=self.full_key(key))["ContentLength"]
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

        args: dict[str, Any] = {"VersionId": version} if version else {}
        with self._errors(key):
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=self.full_key(key), **args)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound", "405"):
                    return None
                raise
        return head.get("ObjectLockRetainUntilDate")

    def abandoned_uploads(self, before: datetime) -> builtins.list[str]:
        paginator = self.client.get_paginator("list_multipart_uploads")
        start = len(self.prefix) + 1 if self.prefix else 0
        with self._errors("(multipart uploads)"):
            return [f"{u['Key'][start:]}?uploadId={u['UploadId']}"
                    for page in paginator.paginate(Bucket=self.bucket, Prefix=self.full_key(""))
                    for u in page.get("Uploads", []) if u["Initiated"] < before]

    def discard_upload(self, upload: str) -> None:
        from botocore.exceptions import ClientError

        key, _, upload_id = upload.partition("?uploadId=")
        with self._errors(key):
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.full_key(key), UploadId=upload_id)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":  # gone already: done
                    raise

    def check_ready(self) -> None:
        if self.config.object_lock is not None:
            from botocore.exceptions import ClientError

            try:
                with self._errors("(object lock configuration)"):
                    enabled = self.client.get_object_lock_configuration(Bucket=self.bucket)[
                        "ObjectLockConfiguration"].get("ObjectLockEnabled") == "Enabled"
            except TransientStorageError:
                raise
            except (RegalError, ClientError):
                enabled = False
            if not enabled:
                raise RegalError(f"the policy asks for Object Lock but bucket {self.bucket} does not have it enabled",
                                 "create the bucket with Object Lock enabled (it needs versioning), or remove "
                                 "repository.object_lock from the policy")

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """A lease object created with If-None-Match and renewed while held; an expired lease is free.

        The lease carries a random token: renewal and release touch the lease only while it is still ours,
        so a holder that stalled past its lease never overwrites or deletes the lease of the process
        that took it over.
        """
        from botocore.exceptions import ClientError

        key = self.full_key(lock_key(name, ".json"))
        lease = self.config.lock_lease.total_seconds()
        token = uuid.uuid4().hex
        deadline = time.monotonic() + self.config.lock_wait.total_seconds()
        conflict = ("PreconditionFailed", "ConditionalRequestConflict")

        def code(exc: ClientError) -> str:
            return str(exc.response.get("Error", {}).get("Code", ""))

        def body() -> bytes:
            return json.dumps({**lock_owner(), "token": token, "expires": time.time() + lease}).encode()

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
                return json.loads(raw).get("token") == token
            except (ValueError, AttributeError):
                return False

        with self._errors(lock_key(name, ".json")):
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
                if lease_is_free(raw):  # take over a dead holder's lease, but only the version we read
                    try:
                        self.client.put_object(Bucket=self.bucket, Key=key, Body=body(), IfMatch=etag,
                                               **self.sse_args())
                        break
                    except ClientError as exc:
                        if code(exc) not in (*conflict, "NoSuchKey", "404"):
                            raise
                    continue
                if time.monotonic() >= deadline:
                    raise lock_refusal(name, raw)
                time.sleep(0.5)

        stop = threading.Event()
        where = lock_key(name, ".json")

        def renew_once() -> bool:
            """Extend our lease; False once it is not ours (taken over after we stalled, or released)."""
            if stop.is_set():
                return False
            with self._errors(where):
                found = current_lease()
                if found is None or not ours(found[0]):
                    return False  # never clobber the new holder's lease
                try:
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=body(), IfMatch=found[1],
                                           **self.sse_args())
                except ClientError as exc:
                    if code(exc) in conflict:
                        return False
                    raise
            return True

        def renew() -> None:
            while not stop.wait(lease / 3):
                try:
                    if not retry.call(self.config.retry, "renew lock", where, self.location, renew_once):
                        return
                except Exception:  # noqa: BLE001, S110 - still failing after the retries: again at the next tick
                    pass

        def release_once() -> None:
            with self._errors(where):
                found = current_lease()
                if found is not None and ours(found[0]):
                    self.client.delete_object(Bucket=self.bucket, Key=key)

        renewer = threading.Thread(target=renew, name=f"lock-renew-{name}", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            with contextlib.suppress(Exception):  # not released: the lease runs out by itself
                retry.call(self.config.retry, "release lock", where, self.location, release_once)

def _open(config: RepositorySettings, base_dir: Path) -> Repository:
    return S3Repository(cast(S3RepositoryConfig, config))


def _transport(config: RepositorySettings, label: str) -> Transport:
    """TLS unless the endpoint says http:// (AWS S3 itself, without an endpoint, is https)."""
    return url_transport(f"{label}: S3", cast(S3RepositoryConfig, config).endpoint_url, ("https",))


BACKEND = Backend(kind="s3", schemes=("s3",), example="s3://bucket/prefix", repository=S3Repository,
                  config=S3RepositoryConfig, open=_open, transport=_transport)
