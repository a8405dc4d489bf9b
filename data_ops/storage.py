"""Where shards live: a local folder or `s3://bucket/prefix` on any S3-compatible store.

Two small classes with the same verbs (`open_read`, `exists`, `list`, `put_file`, `put_bytes`). S3 goes through boto3
with an explicit endpoint URL (MinIO, moto, Ceph, ...): `endpoint_url` argument, else `AWS_ENDPOINT_URL`, else AWS.
Reads stream (boto3's `StreamingBody`), so a reader never holds a whole shard in memory.

Why not fsspec/smart_open: they are not in the design card, and their S3 backends pull aiobotocore; what is needed
here is five calls.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import BinaryIO


class StorageError(OSError):
    """A storage location cannot be used; the message names the URI."""


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


class S3Storage:
    def __init__(self, uri: str, endpoint_url: str | None = None):
        rest = uri[len("s3://"):]
        self.bucket, _, prefix = rest.partition("/")
        if not self.bucket:
            raise StorageError(f"{uri}: no bucket name; write s3://bucket/prefix")
        self.prefix = prefix.strip("/")
        self.uri = uri.rstrip("/")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
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

    def open_read(self, rel: str) -> BinaryIO:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"]
        except ClientError as e:
            raise StorageError(f"s3://{self.bucket}/{self._key(rel)}: {e.response['Error'].get('Code', e)}") from e

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
        """Relative names of the objects under folder `prefix`, sorted."""
        names, base = [], self._key(prefix.rstrip("/") + "/")
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
            for obj in page.get("Contents", []):
                names.append(obj["Key"][len(self.prefix) + 1:] if self.prefix else obj["Key"])
        return sorted(names)

    def put_bytes(self, data: bytes, rel: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)


Storage = LocalStorage | S3Storage


def open_storage(uri: str | Path, endpoint_url: str | None = None) -> Storage:
    """`s3://bucket/prefix` -> S3Storage; anything else (a path or `file://...`) -> LocalStorage."""
    uri = str(uri)
    if uri.startswith("s3://"):
        return S3Storage(uri, endpoint_url)
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"{uri}: only local paths, file:// and s3:// are supported")
    return LocalStorage(uri[len("file://"):] if uri.startswith("file://") else uri)
