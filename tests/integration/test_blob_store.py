"""The blob store's contract, held by both stores: a directory (LocalBlobStore) and S3
(S3BlobStore, against moto's S3-compatible server in a process of its own). What each one
adds: the files of the local store, the object keys of the S3 one, open_blob_store's URLs."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kapi.core.errors import InvalidArgument, NotFound
from kapi.repository.blobs import (
    CHUNK,
    Blob,
    BlobStore,
    DigestMismatch,
    LocalBlobStore,
    open_blob_store,
)
from kapi.repository.blobs_s3 import S3BlobStore

from tests.support.s3 import (
    ACCESS_KEY_ID,
    REGION,
    SECRET_ACCESS_KEY,
    create_bucket,
    running_s3_server,
    s3_client,
)

DATA = bytes(range(256)) * 40  # 10 240 bytes, none alike in a window of 256
UNKNOWN = "sha256:" + "0" * 64
INVALID_DIGESTS = [
    "",
    "sha256:",
    "sha256:" + "0" * 63,
    "sha256:" + "A" * 64,  # upper case
    "sha256:" + "g" * 64,
    "md5:" + "0" * 32,
    "0" * 64,  # no algorithm
    "sha256:" + "0" * 64 + "/../x",
]


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def hex_part(digest: str) -> str:
    return digest.removeprefix("sha256:")


def read_all(store: BlobStore, digest: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join(store.read(digest, start, end))


def write(store: BlobStore, data: bytes, expected: str | None = None) -> Blob:
    writer = store.writer()
    try:
        for offset in range(0, len(data), 4096):
            writer.write(data[offset : offset + 4096])
        return writer.commit(expected)
    finally:
        writer.abort()


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with running_s3_server(log) as endpoint:
        yield endpoint


@pytest.fixture
def s3(s3_endpoint: str) -> Iterator[Any]:
    """A boto3 client of the moto server, closed at the test's end."""
    client = s3_client(s3_endpoint)
    yield client
    client.close()


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    """A new, empty bucket for one test."""
    name = f"kapi-test-{uuid.uuid4().hex[:16]}"
    create_bucket(s3_endpoint, name)
    return name


def object_keys(s3: Any, bucket: str) -> list[str]:
    listing = s3.list_objects_v2(Bucket=bucket)
    return sorted(item["Key"] for item in listing.get("Contents", []))


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    s3: Any = request.getfixturevalue("s3")
    bucket: str = request.getfixturevalue("bucket")
    return S3BlobStore(bucket, "kapi/blobs", client=s3)


def nothing_visible(store: BlobStore) -> bool:
    """No blob, nor a leftover upload, in the store."""
    if isinstance(store, LocalBlobStore):
        return not any(store.tmp.iterdir()) and not (store.root / "sha256").exists()
    assert isinstance(store, S3BlobStore)
    return object_keys(store.client, store.bucket) == []


# The contract


def test_a_blob_written_reads_back_with_its_digest_and_size(store: BlobStore) -> None:
    blob = write(store, DATA)

    assert blob == Blob(digest_of(DATA), len(DATA))
    assert store.exists(blob.digest)
    assert store.size(blob.digest) == len(DATA)
    assert read_all(store, blob.digest) == DATA


def test_put_stores_what_a_file_object_reads(store: BlobStore, tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(DATA)

    with source.open("rb") as file:
        blob = store.put(file)

    assert blob == Blob(digest_of(DATA), len(DATA))
    assert read_all(store, blob.digest) == DATA


def test_commit_with_the_right_expected_digest_stores_the_blob(store: BlobStore) -> None:
    blob = write(store, DATA, expected=digest_of(DATA))

    assert blob.digest == digest_of(DATA)
    assert read_all(store, blob.digest) == DATA


def test_commit_with_a_wrong_expected_digest_stores_nothing(store: BlobStore) -> None:
    writer = store.writer()
    writer.write(DATA)

    with pytest.raises(DigestMismatch, match=digest_of(DATA)):
        writer.commit(expected=UNKNOWN)
    writer.abort()

    assert not store.exists(digest_of(DATA))
    assert not store.exists(UNKNOWN)
    assert nothing_visible(store)


def test_put_with_a_wrong_expected_digest_stores_nothing(store: BlobStore, tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(DATA)

    with source.open("rb") as file, pytest.raises(DigestMismatch):
        store.put(file, expected=digest_of(b"other bytes"))

    assert not store.exists(digest_of(DATA))
    assert nothing_visible(store)


def test_an_aborted_writer_leaves_nothing(store: BlobStore) -> None:
    writer = store.writer()
    writer.write(DATA)
    writer.abort()
    writer.abort()  # twice is safe

    assert not store.exists(digest_of(DATA))
    assert nothing_visible(store)


def test_abort_after_commit_keeps_the_blob(store: BlobStore) -> None:
    writer = store.writer()
    writer.write(DATA)
    blob = writer.commit()
    writer.abort()
    writer.abort()

    assert read_all(store, blob.digest) == DATA


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (0, None),
        (100, None),  # start only
        (100, 300),  # start and end
        (0, 1),
        (len(DATA) - 1, None),  # the last byte
        (5000, len(DATA)),  # end at the size
        (5000, len(DATA) + 1000),  # end past the size: up to the size
        (300, 300),  # an empty range
        (0, 0),
        (len(DATA), None),  # starting at the size: nothing
        (len(DATA) + 10, None),  # past the size: nothing
    ],
)
def test_read_gives_the_range_asked(store: BlobStore, start: int, end: int | None) -> None:
    blob = write(store, DATA)

    assert read_all(store, blob.digest, start, end) == DATA[start:end]


def test_an_empty_blob(store: BlobStore) -> None:
    blob = write(store, b"")

    assert blob == Blob(digest_of(b""), 0)
    assert store.exists(blob.digest)
    assert store.size(blob.digest) == 0
    assert read_all(store, blob.digest) == b""
    assert read_all(store, blob.digest, 0, 0) == b""
    assert read_all(store, blob.digest, 0, 10) == b""


@pytest.mark.parametrize(("start", "end"), [(0, None), (10, None), (10, 20), (5, 5)])
def test_an_unknown_digest_is_not_found(store: BlobStore, start: int, end: int | None) -> None:
    write(store, DATA)  # some other blob is there

    assert not store.exists(UNKNOWN)
    with pytest.raises(NotFound, match=UNKNOWN):
        store.size(UNKNOWN)
    with pytest.raises(NotFound, match=UNKNOWN):
        store.read(UNKNOWN, start, end)  # at the call, before the bytes are asked for


@pytest.mark.parametrize("digest", INVALID_DIGESTS)
def test_an_invalid_digest_is_refused(store: BlobStore, digest: str) -> None:
    with pytest.raises(InvalidArgument):
        store.size(digest)
    with pytest.raises(InvalidArgument):
        store.read(digest)
    with pytest.raises(InvalidArgument):
        store.exists(digest)
    with pytest.raises(InvalidArgument):
        store.delete(digest)


def test_the_same_bytes_twice_are_one_blob(store: BlobStore) -> None:
    first = write(store, DATA)
    second = write(store, DATA, expected=first.digest)

    assert first == second
    assert read_all(store, first.digest) == DATA
    if isinstance(store, LocalBlobStore):
        assert [p for p in (store.root / "sha256").rglob("*") if p.is_file()] == [
            store.path_of(hex_part(first.digest))
        ]
        assert not any(store.tmp.iterdir())
    else:
        assert isinstance(store, S3BlobStore)
        assert object_keys(store.client, store.bucket) == [store.key_of(hex_part(first.digest))]


def test_delete_removes_the_blob_and_only_it(store: BlobStore) -> None:
    kept = write(store, b"kept")
    deleted = write(store, DATA)

    store.delete(deleted.digest)

    assert not store.exists(deleted.digest)
    with pytest.raises(NotFound):
        store.read(deleted.digest)
    assert read_all(store, kept.digest) == b"kept"
    store.delete(deleted.digest)  # not there: nothing happens
    store.delete(UNKNOWN)


def test_a_deleted_blob_can_be_written_again(store: BlobStore) -> None:
    blob = write(store, DATA)
    store.delete(blob.digest)

    assert write(store, DATA) == blob
    assert read_all(store, blob.digest) == DATA


def test_a_multi_megabyte_blob(store: BlobStore) -> None:
    data = os.urandom(20 * 1024 * 1024 + 123)  # past boto3's 8 MiB multipart threshold

    blob = write(store, data, expected=digest_of(data))

    assert blob == Blob(digest_of(data), len(data))
    assert store.size(blob.digest) == len(data)
    chunks = list(store.read(blob.digest))
    assert b"".join(chunks) == data
    assert len(chunks) > 1
    assert all(0 < len(chunk) <= CHUNK for chunk in chunks)
    start, end = 9 * 1024 * 1024 - 7, 15 * 1024 * 1024 + 5
    assert read_all(store, blob.digest, start, end) == data[start:end]
    if isinstance(store, S3BlobStore):  # uploaded in parts: a multipart ETag, "<md5>-<parts>"
        head = store.client.head_object(
            Bucket=store.bucket, Key=store.key_of(hex_part(blob.digest))
        )
        assert "-" in head["ETag"]


# The local store


def test_local_blobs_are_files_under_sha256(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")

    blob = write(store, DATA)

    hex_digest = hex_part(blob.digest)
    path = tmp_path / "blobs" / "sha256" / hex_digest[:2] / hex_digest
    assert path.read_bytes() == DATA
    assert store.local_path(blob.digest) == path
    assert store.local_path(UNKNOWN) is None
    assert not any(store.tmp.iterdir())


def test_local_uploads_in_progress_stay_in_tmp(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    writer = store.writer()
    writer.write(DATA)

    assert len(list(store.tmp.iterdir())) == 1
    assert not (store.root / "sha256").exists()
    writer.abort()
    assert not any(store.tmp.iterdir())


def test_a_crashed_upload_is_removed_when_the_local_store_opens(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    kept = write(LocalBlobStore(root), b"kept")
    leftover = root / "tmp" / "upload-crashed"
    leftover.write_bytes(DATA)  # what a process that died before its commit left

    store = LocalBlobStore(root)

    assert not leftover.exists()
    assert not any(store.tmp.iterdir())
    assert not store.exists(digest_of(DATA))
    assert read_all(store, kept.digest) == b"kept"


def test_open_blob_store_gives_a_local_store(tmp_path: Path) -> None:
    default = open_blob_store(None, tmp_path)
    assert isinstance(default, LocalBlobStore)
    assert default.root == tmp_path / "blobs"

    named = open_blob_store(f"file://{tmp_path / 'elsewhere'}", tmp_path)
    assert isinstance(named, LocalBlobStore)
    assert named.root == tmp_path / "elsewhere"
    assert read_all(named, write(named, DATA).digest) == DATA


def test_open_blob_store_refuses_other_urls(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        open_blob_store("gs://bucket/prefix", tmp_path)


# The S3 store


@pytest.mark.parametrize(("prefix", "key_prefix"), [("", ""), ("a/b", "a/b/"), ("/a/", "a/")])
def test_s3_keys_are_prefix_sha256_hex(s3: Any, bucket: str, prefix: str, key_prefix: str) -> None:
    store = S3BlobStore(bucket, prefix, client=s3)

    blob = write(store, DATA)

    assert object_keys(s3, bucket) == [f"{key_prefix}sha256/{hex_part(blob.digest)}"]
    assert store.local_path(blob.digest) is None


def test_s3_stores_with_other_prefixes_do_not_see_each_other(s3: Any, bucket: str) -> None:
    one = S3BlobStore(bucket, "one", client=s3)
    other = S3BlobStore(bucket, "other", client=s3)

    blob = write(one, DATA)

    assert one.exists(blob.digest)
    assert not other.exists(blob.digest)


def test_a_missing_bucket_is_an_error_not_a_missing_blob(s3: Any) -> None:
    store = S3BlobStore(f"kapi-missing-{uuid.uuid4().hex[:16]}", client=s3)

    with pytest.raises(Exception) as raised:  # noqa: PT011 - botocore's ClientError
        list(store.read(UNKNOWN))
    assert not isinstance(raised.value, NotFound)


@pytest.fixture
def s3_environment(monkeypatch: pytest.MonkeyPatch, s3_endpoint: str, tmp_path: Path) -> None:
    """What boto3 reads from the environment, pointing at the moto server only."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("path", "key_prefix"), [("", ""), ("/", ""), ("/models", "models/"), ("/a/b/", "a/b/")]
)
def test_open_blob_store_gives_an_s3_store_from_the_environment(
    s3_environment: None, s3: Any, bucket: str, tmp_path: Path, path: str, key_prefix: str
) -> None:
    store = open_blob_store(f"s3://{bucket}{path}", tmp_path)
    assert isinstance(store, S3BlobStore)
    try:
        blob = write(store, DATA)

        assert read_all(store, blob.digest) == DATA
        assert object_keys(s3, bucket) == [f"{key_prefix}sha256/{hex_part(blob.digest)}"]
    finally:
        store.client.close()
    assert not (tmp_path / "blobs").exists()
