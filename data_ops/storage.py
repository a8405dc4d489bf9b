"""Where shards live: a local folder or `s3://bucket/prefix` on any S3-compatible store.

Two small classes with the same verbs (`open_read`, `exists`, `list`, `put_file`, `put_bytes`). S3 goes through boto3
with an explicit endpoint URL (MinIO, moto, Ceph, ...): `endpoint_url` argument, else `AWS_ENDPOINT_URL`, else AWS.
Reads stream (boto3's `StreamingBody`), so a reader never holds a whole shard in memory.

A network fault is not bad data: an S3 read that fails on the way (a reset, a timeout, the endpoint restarting) is
retried with backoff and resumed at the byte it stopped at (a ranged GET pinned to the object's ETag), so the
reader above sees one unbroken stream. When the retries run out the read raises `StorageUnavailable` naming the
object: the job stops and resumes from its checkpoint rather than skip the rest of a shard.

Why not fsspec/smart_open: they are not in the design card, and their S3 backends pull aiobotocore; what is needed
here is five calls.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import shutil
import time
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger("vtblender.storage")


class StorageError(OSError):
    """A storage location cannot be used; the message names the URI."""


class StorageUnavailable(OSError):
    """The store could not be reached, or a read kept failing, after every retry; the message names the object.
    Not a data error: whoever reads must stop (and resume later), never skip what it could not read."""


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for transient S3 faults: waits first_wait_s, 2x, 4x, ... (at most max_wait_s each),
    `attempts` tries in all. The default rides out about 40 s of outage (an endpoint restart)."""

    attempts: int = 8
    first_wait_s: float = 0.5
    max_wait_s: float = 10.0

    def waits(self):
        for k in range(self.attempts - 1):
            yield min(self.max_wait_s, self.first_wait_s * 2 ** k)


# S3 error codes that mean "try again", not "this object is wrong"
_RETRYABLE_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "503", "500", "502", "504"}


def _is_transient(e: Exception) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(e, (StorageError, StorageUnavailable)):  # already sorted: missing object, retries spent
        return False
    if isinstance(e, ClientError):
        return str(e.response.get("Error", {}).get("Code")) in _RETRYABLE_CODES
    # BotoCoreError covers connection refused/closed, timeouts and streaming errors; OSError covers resets;
    # urllib3's ProtocolError (a connection dropped mid-body) is neither
    return isinstance(e, (BotoCoreError, OSError)) or type(e).__module__.startswith("urllib3")


class LocalStorage:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.uri = str(self.root)

    def _path(self, rel: str) -> Path:
        return self.root / rel

    def open_read(self, rel: str) -> BinaryIO:
        try:
            return open(self._path(rel), "rb")
        except FileNotFoundError as e:
            raise StorageError(f"{self._path(rel)} does not exist") from e

    def exists(self, rel: str) -> bool:
        return self._path(rel).is_file()

    def put_file(self, local: Path, rel: str) -> None:
        dst = self._path(rel)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".partial")
        shutil.copyfile(local, tmp)
        os.replace(tmp, dst)  # readers never see half a file

    def list(self, prefix: str) -> list[str]:
        """Relative names of the files under folder `prefix`, sorted."""
        base = self._path(prefix)
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file()
                      and not p.name.endswith(".partial")) if base.is_dir() else []

    def put_bytes(self, data: bytes, rel: str) -> None:
        dst = self._path(rel)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".partial")
        tmp.write_bytes(data)
        os.replace(tmp, dst)


class _ResumableS3Read(io.RawIOBase):
    """One S3 object as a raw stream that survives transient faults: a read that fails mid-body is retried with the
    storage's backoff (`S3Storage.retrying`) from a ranged GET at the next byte (If-Match the first response's ETag,
    so a replaced object fails instead of mixing two)."""

    def __init__(self, storage: "S3Storage", key: str):
        self.storage, self.key, self.pos = storage, key, 0
        self.etag = self.size = None
        self.body = None
        storage.retrying(self._open, f"open {self._name()}")

    def _name(self) -> str:
        return f"s3://{self.storage.bucket}/{self.key}"

    def _open(self) -> None:
        from botocore.exceptions import ClientError

        kwargs = {"Bucket": self.storage.bucket, "Key": self.key}
        if self.pos:
            kwargs.update(Range=f"bytes={self.pos}-", IfMatch=self.etag)
        try:
            resp = self.storage.client.get_object(**kwargs)
        except ClientError as e:
            if _is_transient(e):
                raise
            raise StorageError(f"{self._name()}: {e.response['Error'].get('Code', e)}") from e
        if self.etag is None:
            self.etag, self.size = resp["ETag"], resp["ContentLength"]
        self.body = resp["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self.size is not None and self.pos >= self.size:
            return 0
        return self.storage.retrying(lambda: self._read_once(buf), f"reading {self._name()} at byte {self.pos}")

    def _read_once(self, buf) -> int:
        try:
            if self.body is None:  # the previous connection failed: reopen at self.pos
                self._open()
            data = self.body.read(len(buf))
        except Exception:
            self._drop_body()
            raise
        # botocore checks the length at the end of the body: an early EOF raises, it is never an empty read
        buf[:len(data)] = data
        self.pos += len(data)
        return len(data)

    def _drop_body(self) -> None:
        if self.body is not None:
            try:
                self.body.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is dropped anyway
                pass
        self.body = None

    def close(self) -> None:
        self._drop_body()
        super().close()


class S3Storage:
    def __init__(self, uri: str, endpoint_url: str | None = None, retry: RetryPolicy = RetryPolicy()):
        rest = uri[len("s3://"):]
        self.bucket, _, prefix = rest.partition("/")
        if not self.bucket:
            raise StorageError(f"{uri}: no bucket name; write s3://bucket/prefix")
        self.prefix = prefix.strip("/")
        self.uri = uri.rstrip("/")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self.retry = retry
        self._client = None

    def __getstate__(self):  # the boto3 client is not picklable; Ray tasks rebuild it
        return {**self.__dict__, "_client": None}

    @property
    def client(self):
        if self._client is None:
            import boto3

            self._client = boto3.client("s3", endpoint_url=self.endpoint_url)
        return self._client

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def retrying(self, call, what: str):
        """call() until it succeeds or fails with a non-transient error; StorageUnavailable after the retries."""
        waits = self.retry.waits()
        while True:
            try:
                return call()
            except Exception as e:  # noqa: BLE001 - sorted by _is_transient
                if not _is_transient(e):
                    raise
                wait = next(waits, None)
                if wait is None:
                    raise StorageUnavailable(f"{what}: failed {self.retry.attempts} times; last: "
                                             f"{type(e).__name__}: {e}") from e
                logger.warning("%s failed (%s: %s); retrying in %.1f s", what, type(e).__name__, e, wait)
                time.sleep(wait)

    def open_read(self, rel: str) -> BinaryIO:
        """A buffered stream of the object that resumes after transient faults (see the module's docstring).
        StorageError when it does not exist; StorageUnavailable when the store stays unreachable."""
        return io.BufferedReader(_ResumableS3Read(self, self._key(rel)), buffer_size=1 << 18)

    def exists(self, rel: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(rel))
            return True
        except ClientError:
            return False

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    def put_file(self, local: Path, rel: str) -> None:
        self.client.upload_file(str(local), self.bucket, self._key(rel))

    def list(self, prefix: str) -> list[str]:
        """Relative names of the objects under folder `prefix` ("" for all of this storage's), sorted."""
        rel = prefix.strip("/")
        names, base = [], self._key(rel) + "/" if rel else (f"{self.prefix}/" if self.prefix else "")
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
            for obj in page.get("Contents", []):
                names.append(obj["Key"][len(self.prefix) + 1:] if self.prefix else obj["Key"])
        return sorted(names)

    def put_bytes(self, data: bytes, rel: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)


Storage = LocalStorage | S3Storage


def is_remote(uri: str | Path) -> bool:
    """Object storage (read through `S3Storage`), not a local path."""
    return str(uri).startswith("s3://")


def open_storage(uri: str | Path, endpoint_url: str | None = None) -> Storage:
    """`s3://bucket/prefix` -> S3Storage; anything else (a path or `file://...`) -> LocalStorage."""
    uri = str(uri)
    if is_remote(uri):
        return S3Storage(uri, endpoint_url)
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"{uri}: only local paths, file:// and s3:// are supported")
    return LocalStorage(uri[len("file://"):] if uri.startswith("file://") else uri)
