"""The content-addressed blob store: artifacts named by the sha256 of their bytes.

A blob becomes visible only once all its bytes are in and their digest is checked: a writer
collects the bytes aside (a temporary file), and its commit checks the digest and publishes
them in one atomic step (a rename on a file system, one PUT on S3). A writer that is aborted,
or whose process dies, leaves nothing visible. Blobs are immutable, so writing one that is
there already only drops the new copy.

The interface is synchronous: the service calls it from worker threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from kapi.core.errors import InvalidArgument, NotFound

CHUNK = 1024 * 1024
SYNC_EVERY = 16 * CHUNK  # a local upload goes to disk in steps of this, while it arrives
_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class Blob:
    digest: str  # "sha256:<64 hex digits>"
    size: int


def hex_of(digest: str) -> str:
    """The hex part of a "sha256:<hex>" digest, refused when it is not one."""
    algorithm, _, value = digest.partition(":")
    if algorithm != "sha256" or not _HEX.fullmatch(value):
        raise InvalidArgument(f"digest {digest!r} is not 'sha256:' and 64 lowercase hex digits")
    return value


class DigestMismatch(InvalidArgument):
    def __init__(self, expected: str, actual: str, size: int) -> None:
        super().__init__(
            f"the upload's digest is {actual} ({size} bytes), not the {expected} it declared; "
            "nothing was stored"
        )


class BlobWriter(ABC):
    """Bytes on their way into the store; nothing is visible before commit."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.hash(data)
        self.store(data)

    # The two halves of a write, for a caller that runs them on two threads at once (each
    # half in order): hashlib and file writes both let go of the GIL.
    def hash(self, data: bytes) -> None:
        self._hash.update(data)

    def store(self, data: bytes) -> None:
        self._write(data)
        self.size += len(data)

    @property
    def digest(self) -> str:
        return f"sha256:{self._hash.hexdigest()}"

    def commit(self, expected: str | None = None) -> Blob:
        """Publish the bytes written; with `expected`, only when their digest is that one
        (else DigestMismatch, and the bytes are dropped)."""
        digest = self.digest
        if expected is not None and expected != digest:
            self.abort()
            raise DigestMismatch(expected, digest, self.size)
        self._publish(hex_of(digest))
        return Blob(digest, self.size)

    @abstractmethod
    def _write(self, data: bytes) -> None: ...

    @abstractmethod
    def _publish(self, hex_digest: str) -> None: ...

    @abstractmethod
    def abort(self) -> None:
        """Drop what was written; safe to call more than once, and after commit."""


class BlobStore(ABC):
    @abstractmethod
    def writer(self) -> BlobWriter: ...

    @abstractmethod
    def size(self, digest: str) -> int:
        """The blob's size in bytes; NotFound when it is not there."""

    @abstractmethod
    def read(self, digest: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The bytes [start, end) of the blob (end None: to its end), in chunks; NotFound
        when it is not there."""

    @abstractmethod
    def delete(self, digest: str) -> None:
        """Remove the blob; nothing happens when it is not there."""

    def exists(self, digest: str) -> bool:
        try:
            self.size(digest)
        except NotFound:
            return False
        return True

    def local_path(self, digest: str) -> Path | None:
        """The blob's file, for a store that keeps one (then it can be sent with sendfile)."""
        return None

    def put(self, source: BinaryIO, expected: str | None = None) -> Blob:
        """Store everything a file object reads."""
        writer = self.writer()
        try:
            while chunk := source.read(CHUNK):
                writer.write(chunk)
            return writer.commit(expected)
        finally:
            writer.abort()


def not_found(digest: str) -> NotFound:
    return NotFound(f"blob {digest} is not in the blob store")


class _FileWriter(BlobWriter):
    def __init__(self, store: LocalBlobStore) -> None:
        super().__init__()
        self._store = store
        fd, name = tempfile.mkstemp(dir=store.tmp, prefix="upload-")
        self._file: BinaryIO | None = os.fdopen(fd, "wb")
        self._temp: Path | None = Path(name)
        self._unsynced = 0

    def _write(self, data: bytes) -> None:
        assert self._file is not None, "write after commit or abort"
        self._file.write(data)
        self._unsynced += len(data)
        if self._unsynced >= SYNC_EVERY:  # to disk as it comes: the commit's fsync is short
            self._file.flush()
            os.fdatasync(self._file.fileno())
            self._unsynced = 0

    def _publish(self, hex_digest: str) -> None:
        assert self._file is not None, "commit after abort"
        assert self._temp is not None, "commit after abort"
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        target = self._store.path_of(hex_digest)
        if target.exists():  # immutable and content-addressed: the same bytes are there
            self.abort()
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._temp, target)
        self._temp = None
        _fsync_dir(target.parent)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._temp is not None:
            self._temp.unlink(missing_ok=True)
            self._temp = None


class LocalBlobStore(BlobStore):
    """Blobs as files: ROOT/sha256/<first two hex digits>/<hex digest>. Uploads in progress
    live in ROOT/tmp, which is emptied at start (what a crash left there never committed)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()

    def path_of(self, hex_digest: str) -> Path:
        return self.root / "sha256" / hex_digest[:2] / hex_digest

    def writer(self) -> BlobWriter:
        return _FileWriter(self)

    def size(self, digest: str) -> int:
        try:
            return self.path_of(hex_of(digest)).stat().st_size
        except FileNotFoundError:
            raise not_found(digest) from None

    def read(self, digest: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        path = self.path_of(hex_of(digest))
        if not path.is_file():
            raise not_found(digest)
        return _chunks(path, start, end)

    def delete(self, digest: str) -> None:
        self.path_of(hex_of(digest)).unlink(missing_ok=True)

    def local_path(self, digest: str) -> Path | None:
        path = self.path_of(hex_of(digest))
        return path if path.is_file() else None


def _chunks(path: Path, start: int, end: int | None) -> Iterator[bytes]:
    """Opened when first read, so an iterator never read holds no file."""
    with path.open("rb") as file:
        file.seek(start)
        left = None if end is None else end - start
        while left is None or left > 0:
            chunk = file.read(CHUNK if left is None else min(CHUNK, left))
            if not chunk:
                return
            if left is not None:
                left -= len(chunk)
            yield chunk


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_blob_store(url: str | None, data_dir: Path) -> BlobStore:
    """The store a `--blobs` URL names: none or file:///PATH, a directory; s3://BUCKET[/PREFIX],
    S3 or an S3-compatible server (its endpoint from AWS_ENDPOINT_URL, as boto3 reads it)."""
    if url is None:
        return LocalBlobStore(data_dir / "blobs")
    if url.startswith("file://"):
        return LocalBlobStore(Path(url.removeprefix("file://")))
    if url.startswith("s3://"):
        from kapi.repository.blobs_s3 import S3BlobStore

        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        return S3BlobStore(bucket, prefix.strip("/"))
    raise InvalidArgument(f"blob store URL {url!r}: expected file:///PATH or s3://BUCKET[/PREFIX]")
