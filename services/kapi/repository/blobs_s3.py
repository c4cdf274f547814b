"""The blob store on S3 or an S3-compatible server: one object per blob, PREFIX/sha256/<hex>.

A writer spools the bytes into a local temporary file while they are hashed; its commit
uploads that file (boto3's managed transfer, multipart for big files). S3 makes an object
visible only once its upload completes, so an aborted or crashed writer leaves nothing to
read (a crash in a multipart upload may leave invisible parts: a bucket lifecycle rule that
aborts incomplete multipart uploads clears them).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import IO, Any

import boto3
from botocore.exceptions import ClientError

from kapi.repository.blobs import CHUNK, BlobStore, BlobWriter, hex_of, not_found

# A missing key, not a missing bucket (NoSuchBucket, also a 404). HEAD answers carry no body,
# so there the code is only the status, "404", for either.
_MISSING = frozenset({"404", "NoSuchKey", "NotFound"})


def _code(error: Any) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _is_missing(error: Any) -> bool:
    return _code(error) in _MISSING


def _is_bad_range(error: Any) -> bool:
    return _code(error) in {"416", "InvalidRange"}


class _S3Writer(BlobWriter):
    def __init__(self, store: S3BlobStore) -> None:
        super().__init__()
        self._store = store
        # Closed by abort, which commit calls too; the file system drops it when closed.
        self._file: IO[bytes] | None = tempfile.TemporaryFile(prefix="kapi-upload-")  # noqa: SIM115

    def _write(self, data: bytes) -> None:
        assert self._file is not None, "write after commit or abort"
        self._file.write(data)

    def _publish(self, hex_digest: str) -> None:
        assert self._file is not None, "commit after abort"
        try:
            key = self._store.key_of(hex_digest)
            # Content-addressed and immutable: a key that is there holds these very bytes.
            if not self._store.has_key(key):
                self._file.seek(0)
                self._store.client.upload_fileobj(self._file, self._store.bucket, key)
        finally:
            self.abort()

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class S3BlobStore(BlobStore):
    def __init__(self, bucket: str, prefix: str = "", client: Any | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client: Any = client if client is not None else boto3.client("s3")

    def key_of(self, hex_digest: str) -> str:
        key = f"sha256/{hex_digest}"
        return f"{self.prefix}/{key}" if self.prefix else key

    def has_key(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as error:
            if _is_missing(error):
                return False
            raise
        return True

    def writer(self) -> BlobWriter:
        return _S3Writer(self)

    def size(self, digest: str) -> int:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key_of(hex_of(digest)))
        except ClientError as error:
            if _is_missing(error):
                raise not_found(digest) from None
            raise
        return int(head["ContentLength"])

    def read(self, digest: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        key = self.key_of(hex_of(digest))
        if end is not None and end <= start:  # nothing to read: HTTP ranges cannot say so
            if not self.has_key(key):
                raise not_found(digest)
            return iter(())
        request: dict[str, str] = {"Bucket": self.bucket, "Key": key}
        if start > 0 or end is not None:
            request["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            response = self.client.get_object(**request)
        except ClientError as error:
            if _is_missing(error):
                raise not_found(digest) from None
            if _is_bad_range(error):  # starts at or past the end (an empty blob, say)
                return iter(())
            raise
        return _chunks(response["Body"])

    def delete(self, digest: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key_of(hex_of(digest)))


def _chunks(body: Any) -> Iterator[bytes]:
    try:
        for chunk in body.iter_chunks(CHUNK):
            if chunk:
                yield chunk
    finally:
        body.close()
