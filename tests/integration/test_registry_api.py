"""The model repository's REST API, against a real `kapi repository serve` process.

Most tests share one repository (module scope), each with models of its own names; the tests
of tokens, of closed reads and of a crash mid-upload start repositories of their own. Uploads
cut short are sent with http.client, which can promise more bytes than it sends.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import os
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from kapi.core.errors import InvalidArgument
from kapi.repository.client import RepositoryClient, variant_path

from tests.conftest import RepositoryFactory
from tests.support.node import HOST
from tests.support.registry import RunningRepository, running_repository

Key = tuple[str, str, str]
ONNX_CPU: Key = ("onnxruntime", "fp32", "cpu-x86_64")
ONNX_VNNI: Key = ("onnxruntime", "int8", "cpu-x86_64-avx512vnni")
OPENVINO_CPU: Key = ("openvino", "fp32", "cpu-x86_64")
TRT_SM90: Key = ("tensorrt", "fp16", "nvidia-sm90")
ONNX_SM80: Key = ("onnxruntime", "fp16", "nvidia-sm80")
VNNI_NODE = ["cpu-x86_64-avx512vnni", "cpu-x86_64-avx2", "cpu-x86_64"]
BASELINE_NODE = ["cpu-x86_64"]
ARTIFACT = bytes(range(256)) * 64  # 16 KiB, every 256-byte window different
SIGNATURE = {
    "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 28, 28]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
    "max_batch_size": 8,
}
WRITER: dict[str, Any] = {"name": "writer", "token": "w" * 20, "scope": "write"}
READER: dict[str, Any] = {"name": "reader", "token": "r" * 20, "scope": "read"}
DIGITS_ONLY: dict[str, Any] = {
    "name": "digits-only",
    "token": "d" * 20,
    "scope": "write",
    "models": ["digits"],
}
TOKENS = [WRITER, READER, DIGITS_ONLY]
TIMEOUT = httpx.Timeout(30.0, read=10.0)  # a read of the event stream waits 10 s at most
WAIT_S = 15.0  # for the server to finish with a connection the test dropped


# helpers: names, digests, paths


def unique(prefix: str) -> str:
    """A model name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def blob_file(data_dir: Path, digest: str) -> Path:
    """Where the local blob store keeps a blob."""
    hex_digest = digest.removeprefix("sha256:")
    return data_dir / "blobs" / "sha256" / hex_digest[:2] / hex_digest


def uploads_in_progress(data_dir: Path) -> list[Path]:
    """The local blob store's temporary files: uploads not committed (yet)."""
    return sorted((data_dir / "blobs" / "tmp").iterdir())


def bytes_in_progress(data_dir: Path) -> int:
    return sum(path.stat().st_size for path in uploads_in_progress(data_dir))


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Wait for the server to reach a state the test cannot be told of (its files)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.02)


def error_of(response: httpx.Response) -> str:
    """The message of an error response, which is always `{"error": ...}`."""
    body = response.json()
    assert isinstance(body, dict), body
    assert "error" in body, body
    return str(body["error"])


# helpers: models, versions, variants


def create_model(api: httpx.Client, name: str, **fields: Any) -> dict[str, Any]:
    response = api.post("/v1/models", json={"name": name, **fields})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def create_version(
    api: httpx.Client, model: str, lineage: dict[str, Any] | None = None, **fields: Any
) -> int:
    response = api.post(f"/v1/models/{model}/versions", json={"lineage": lineage or {}, **fields})
    assert response.status_code == 201, response.text
    return int(response.json()["number"])


def upload(
    api: httpx.Client,
    model: str,
    number: int,
    key: Key,
    data: bytes,
    *,
    digest: str | None = None,
    fmt: str = "file",
    filename: str | None = None,
) -> httpx.Response:
    params = {"digest": digest or digest_of(data), "format": fmt}
    if filename is not None:
        params["filename"] = filename
    return api.put(variant_path(model, number, key), params=params, content=data)


def uploaded(api: httpx.Client, model: str, number: int, key: Key, data: bytes) -> dict[str, Any]:
    response = upload(api, model, number, key, data)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def variant_keys(api: httpx.Client, model: str, number: int) -> list[Key]:
    response = api.get(f"/v1/models/{model}/versions/{number}")
    assert response.status_code == 200, response.text
    return [(v["runtime"], v["precision"], v["profile"]) for v in response.json()["variants"]]


def model_with_version(api: httpx.Client, prefix: str) -> str:
    """A new model with version 1 and no variants."""
    name = unique(prefix)
    create_model(api, name)
    assert create_version(api, name) == 1
    return name


def events_of(api: httpx.Client, model: str, after: int = 0) -> list[dict[str, Any]]:
    response = api.get("/v1/events", params={"model": model, "after": after})
    assert response.status_code == 200, response.text
    rows: list[dict[str, Any]] = response.json()
    return rows


def cursor(api: httpx.Client) -> int:
    response = api.get("/v1/events/cursor")
    assert response.status_code == 200, response.text
    return int(response.json()["cursor"])


def set_alias(api: httpx.Client, model: str, alias: str, **spec: Any) -> httpx.Response:
    return api.put(f"/v1/models/{model}/aliases/{alias}", json=spec)


def set_report(
    api: httpx.Client, model: str, number: int, key: Key, **report: Any
) -> httpx.Response:
    return api.put(variant_path(model, number, key) + "/report", json=report)


def resolve(
    api: httpx.Client, model: str, profiles: list[str], runtimes: list[str], ref: str = "latest"
) -> httpx.Response:
    params = {"ref": ref, "profile": profiles, "runtime": runtimes}
    return api.get(f"/v1/models/{model}/resolve", params=params)


def resolved_key(response: httpx.Response) -> Key:
    assert response.status_code == 200, response.text
    variant = response.json()["variant"]
    return variant["runtime"], variant["precision"], variant["profile"]


# helpers: tar archives


def tar_of(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    """A tar archive of these members, each with its contents (None: none, a link say)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def tar_names(archive: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as opened:
        return opened.getnames()


def file_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def symlink_member(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info, None


# helpers: raw uploads, which can be cut short


@contextlib.contextmanager
def raw_upload(
    repository: RunningRepository, path: str, token: str, declared: int
) -> Iterator[http.client.HTTPConnection]:
    """A connection that has sent an upload's headers, promising `declared` bytes; the
    body goes in with `send`, as much of it as the test likes. Closed at the end."""
    connection = http.client.HTTPConnection(HOST, repository.port, timeout=30)
    try:
        connection.putrequest("PUT", path)
        connection.putheader("Authorization", f"Bearer {token}")
        connection.putheader("Content-Type", "application/octet-stream")
        connection.putheader("Content-Length", str(declared))
        connection.endheaders()
        yield connection
    finally:
        connection.close()


def answer_of(connection: http.client.HTTPConnection) -> tuple[int, dict[str, Any]]:
    response = connection.getresponse()
    body: dict[str, Any] = json.loads(response.read())
    return response.status, body


def raw_upload_path(model: str, number: int, key: Key, digest: str) -> str:
    return f"{variant_path(model, number, key)}?digest={digest}&format=file"


# helpers: server-sent events


@dataclass(frozen=True)
class Sse:
    id: int
    kind: str
    data: dict[str, Any]


def read_sse(lines: Iterator[str], count: int, within_s: float = 30.0) -> list[Sse]:
    """The next `count` events of a stream (comments, the pings, skipped). A read waits as
    long as the client's read timeout, and all of them together `within_s` at most."""
    deadline = time.monotonic() + within_s
    events: list[Sse] = []
    fields: dict[str, str] = {}
    for line in lines:
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(events)} of {count} events within {within_s} s")
        if not line:  # the blank line that ends an event
            if "data" in fields:
                events.append(Sse(int(fields["id"]), fields["event"], json.loads(fields["data"])))
                if len(events) == count:
                    return events
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            fields[name] = f"{fields[name]}\n{value}" if name in fields else value
    raise AssertionError(f"the stream ended after {len(events)} of {count} events")


# fixtures


@pytest.fixture(scope="module")
def repository(
    tmp_path_factory: pytest.TempPathFactory, node_logs: Path
) -> Iterator[RunningRepository]:
    """One repository, with its admin token, for the tests that do not interfere."""
    with running_repository(tmp_path_factory.mktemp("registry") / "data", node_logs) as running:
        yield running


@pytest.fixture(scope="module")
def api(repository: RunningRepository) -> Iterator[httpx.Client]:
    """A client with the repository's admin (write) token."""
    with httpx.Client(
        base_url=repository.url, headers=bearer(repository.admin_token), timeout=TIMEOUT
    ) as client:
        yield client


@pytest.fixture(scope="module")
def anonymous(repository: RunningRepository) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=repository.url, timeout=TIMEOUT) as client:
        yield client


@pytest.fixture(scope="module")
def client(repository: RunningRepository) -> Iterator[RepositoryClient]:
    with RepositoryClient(repository.url, repository.admin_token) as opened:
        yield opened


@pytest.fixture(scope="module")
def secured(
    tmp_path_factory: pytest.TempPathFactory, node_logs: Path
) -> Iterator[RunningRepository]:
    """A repository with the writer, reader and digits-only tokens, reads open."""
    data = tmp_path_factory.mktemp("secured") / "data"
    # At DEBUG, so that the test that no token is logged sees everything the server logs.
    with running_repository(
        data, node_logs, tokens=TOKENS, args=["--log-level", "DEBUG"]
    ) as running:
        yield running


def as_token(repository: RunningRepository, token: str | None) -> httpx.Client:
    headers = bearer(token) if token is not None else {}
    return httpx.Client(base_url=repository.url, headers=headers, timeout=TIMEOUT)


# models


def test_create_list_and_get_a_model(api: httpx.Client, anonymous: httpx.Client) -> None:
    name = unique("mnist")
    created = create_model(api, name, description="digits", signature=SIGNATURE)
    assert created["name"] == name
    assert created["description"] == "digits"
    assert created["signature"] == SIGNATURE
    assert created["aliases"] == {}
    assert created["latest_version"] is None
    assert created["created_by"] == "admin"

    listed = api.get("/v1/models")
    assert listed.status_code == 200
    assert [m for m in listed.json() if m["name"] == name] == [created]

    fetched = anonymous.get(f"/v1/models/{name}")  # reads are open by default
    assert fetched.status_code == 200
    assert fetched.json() == created


def test_a_batching_signature_needs_batch_dimensions(api: httpx.Client) -> None:
    name = unique("batched")
    unbatched = {**SIGNATURE, "inputs": [{"name": "image", "datatype": "FP32", "shape": [28]}]}
    refused = api.post("/v1/models", json={"name": name, "signature": unbatched})
    assert refused.status_code == 422
    assert "tensor 'image'" in error_of(refused)
    assert "must start with the batch dimension, -1" in error_of(refused)
    assert api.get(f"/v1/models/{name}").status_code == 404

    without_batching = {**unbatched, "max_batch_size": 0}
    assert create_model(api, name, signature=without_batching)["signature"] == without_batching


@pytest.mark.parametrize(
    "name",
    ["Upper", "under_score", "-leading", "trailing-", "a" * 64, "..", "a.b", "a/b", ""],
)
def test_an_invalid_model_name_is_refused(api: httpx.Client, name: str) -> None:
    response = api.post("/v1/models", json={"name": name})
    assert response.status_code == 422, response.text
    assert f"model name {name!r} is not valid: 1 to 63 lowercase letters" in error_of(response)
    assert name not in [m["name"] for m in api.get("/v1/models").json()]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/models/%2e%2e"),
        ("POST", "/v1/models/%2e%2e/versions"),
        ("GET", "/v1/models/a%2Fb"),
        ("POST", "/v1/models/a%2Fb/versions"),
        ("POST", "/v1/models/a/b/versions"),
        ("GET", "/v1/models/%2e%2e%2fetc/versions"),
        ("GET", "/v1/models/UPPER"),
        ("GET", "/v1/models/" + "a" * 64),
        ("PUT", "/v1/models/%2e%2e/versions/1/variants/onnxruntime/fp32/cpu-x86_64"),
    ],
)
def test_a_path_that_names_no_model_is_refused(api: httpx.Client, method: str, path: str) -> None:
    before = api.get("/v1/models").json()
    response = api.request(
        method, path, json={} if method == "POST" else None, params={"digest": digest_of(b"")}
    )
    assert response.status_code in (404, 422), response.text
    error_of(response)
    assert api.get("/v1/models").json() == before  # nothing was created


def test_requirements_of_another_model_are_refused(api: httpx.Client) -> None:
    name = unique("req")
    spec = {"model": "someone-else", "task": "classification"}
    response = api.post("/v1/models", json={"name": name, "requirements": spec})
    assert response.status_code == 400
    assert error_of(response) == f"the requirements are model 'someone-else's, not '{name}'s"
    own = api.post("/v1/models", json={"name": name, "requirements": {**spec, "model": name}})
    assert own.status_code == 201


def test_a_duplicate_model_conflicts(api: httpx.Client) -> None:
    name = unique("twice")
    create_model(api, name, description="first")
    response = api.post("/v1/models", json={"name": name, "description": "second"})
    assert response.status_code == 409
    assert error_of(response) == f"model '{name}' exists already"
    assert api.get(f"/v1/models/{name}").json()["description"] == "first"


# versions


def test_versions_are_numbered_per_model(api: httpx.Client) -> None:
    first, second = unique("first"), unique("second")
    create_model(api, first)
    create_model(api, second)
    numbers = [create_version(api, model) for model in (first, second, first, first, second)]
    assert numbers == [1, 1, 2, 3, 2]
    assert api.get(f"/v1/models/{first}").json()["latest_version"] == 3
    assert api.get(f"/v1/models/{second}").json()["latest_version"] == 2
    listed = api.get(f"/v1/models/{first}/versions").json()
    assert [v["number"] for v in listed] == [1, 2, 3]


def test_a_version_for_an_unknown_model_is_not_found(api: httpx.Client) -> None:
    name = unique("ghost")
    response = api.post(f"/v1/models/{name}/versions", json={})
    assert response.status_code == 404
    assert error_of(response) == f"model '{name}' is not in the repository"


def test_lineage_and_metrics_round_trip(api: httpx.Client) -> None:
    name = unique("lineage")
    create_model(api, name)
    lineage = {
        "dataset": "sha256:" + "ab" * 32,
        "config": {"lr": 0.001, "layers": [64, 32], "augment": True},
        "study": "hpo-7",
        "trial": 12,
        "code": "git:baed919",
    }
    metrics = {"accuracy": 0.9912, "loss": 0.031, "per_class": {"0": 0.99, "1": 1.0}}
    number = create_version(api, name, lineage=lineage, metrics=metrics)
    for body in (
        api.get(f"/v1/models/{name}/versions/{number}").json(),
        api.get(f"/v1/models/{name}/versions").json()[0],
    ):
        assert body["lineage"] == lineage
        assert body["metrics"] == metrics
        assert body["model"] == name
        assert body["variants"] == []


@pytest.mark.parametrize("method", ["PUT", "PATCH", "POST"])
def test_a_version_cannot_be_modified(api: httpx.Client, method: str) -> None:
    name = unique("immutable")
    create_model(api, name)
    create_version(api, name, lineage={"dataset": "original"})
    response = api.request(
        method, f"/v1/models/{name}/versions/1", json={"lineage": {"dataset": "forged"}}
    )
    assert response.status_code == 405
    assert error_of(response) == "Method Not Allowed"
    assert "GET" in response.headers["allow"]  # Starlette names the first route's methods
    assert api.get(f"/v1/models/{name}/versions/1").json()["lineage"] == {"dataset": "original"}


def test_an_unknown_version_is_not_found(api: httpx.Client) -> None:
    name = model_with_version(api, "one-version")
    response = api.get(f"/v1/models/{name}/versions/9")
    assert response.status_code == 404
    assert error_of(response) == f"model '{name}' has no version 9"
    assert api.get(f"/v1/models/{name}/versions/0").status_code == 422


# uploads


def test_an_upload_becomes_a_variant(repository: RunningRepository, api: httpx.Client) -> None:
    name = model_with_version(api, "upload")
    variant = uploaded(api, name, 1, ONNX_CPU, ARTIFACT)
    assert variant["digest"] == digest_of(ARTIFACT)
    assert variant["size"] == len(ARTIFACT)
    assert variant["format"] == "file"
    assert variant["filename"] == "model.onnx"
    assert variant["verified"] is False
    assert variant["report"] is None
    assert variant["created_by"] == "admin"
    assert variant_keys(api, name, 1) == [ONNX_CPU]
    assert api.get(variant_path(name, 1, ONNX_CPU)).json() == variant
    assert blob_file(repository.data, variant["digest"]).read_bytes() == ARTIFACT
    uploads = [e for e in events_of(api, name) if e["kind"] == "variant.uploaded"]
    assert [e["detail"] for e in uploads] == [
        {"variant": "onnxruntime/fp32/cpu-x86_64", "digest": variant["digest"], "size": 16384}
    ]


def test_an_upload_with_the_wrong_digest_is_refused(
    repository: RunningRepository, api: httpx.Client
) -> None:
    name = model_with_version(api, "wrong-digest")
    data = os.urandom(4096)
    declared = digest_of(b"something else")
    response = upload(api, name, 1, ONNX_CPU, data, digest=declared)
    assert response.status_code == 400
    assert error_of(response) == (
        f"the upload's digest is {digest_of(data)} (4096 bytes), not the {declared} it "
        "declared; nothing was stored"
    )
    assert api.get(variant_path(name, 1, ONNX_CPU)).status_code == 404
    assert variant_keys(api, name, 1) == []
    assert not blob_file(repository.data, digest_of(data)).exists()
    assert not blob_file(repository.data, declared).exists()
    assert uploads_in_progress(repository.data) == []


# uploads in two steps: the bytes, then the variant that names them


def sent(api: httpx.Client, data: bytes) -> dict[str, Any]:
    response = api.post("/v1/uploads", content=data)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def named(api: httpx.Client, model: str, key: Key, upload_id: str, digest: str) -> httpx.Response:
    params = {"digest": digest, "upload": upload_id}
    return api.put(variant_path(model, 1, key), params=params)


def test_bytes_sent_first_become_a_variant_once_named(
    repository: RunningRepository, api: httpx.Client
) -> None:
    name = model_with_version(api, "two-step")
    data = os.urandom(5000)
    body = sent(api, data)
    assert (body["digest"], body["size"]) == (digest_of(data), len(data))
    assert variant_keys(api, name, 1) == []  # kept aside: visible to no one yet
    assert not blob_file(repository.data, body["digest"]).exists()
    response = named(api, name, ONNX_CPU, body["upload"], digest_of(data))
    assert response.status_code == 201, response.text
    assert blob_file(repository.data, body["digest"]).read_bytes() == data
    again = named(api, name, ONNX_VNNI, body["upload"], digest_of(data))
    assert again.status_code == 404  # an upload names one variant
    assert "taken already" in error_of(again)


def test_bytes_sent_first_with_another_digest_are_dropped(
    repository: RunningRepository, api: httpx.Client
) -> None:
    name = model_with_version(api, "two-step-wrong")
    data = os.urandom(3000)
    body = sent(api, data)
    response = named(api, name, ONNX_CPU, body["upload"], digest_of(b"other bytes"))
    assert response.status_code == 400
    assert "nothing was stored" in error_of(response)
    assert variant_keys(api, name, 1) == []
    assert not blob_file(repository.data, digest_of(data)).exists()
    wait_for(lambda: uploads_in_progress(repository.data) == [], "the upload's file to go")


def test_an_unknown_upload_or_a_body_beside_one_is_refused(api: httpx.Client) -> None:
    name = model_with_version(api, "two-step-bad")
    unknown = named(api, name, ONNX_CPU, "no-such-upload", digest_of(ARTIFACT))
    assert unknown.status_code == 404
    body = sent(api, ARTIFACT)
    params = {"digest": digest_of(ARTIFACT), "upload": body["upload"]}
    both = api.put(variant_path(name, 1, ONNX_CPU), params=params, content=ARTIFACT)
    assert both.status_code == 400
    assert "no body of its own" in error_of(both)
    used = named(api, name, ONNX_CPU, body["upload"], digest_of(ARTIFACT))
    assert used.status_code == 404  # a refused naming uses the upload up: nothing lingers


def test_only_the_token_that_sent_bytes_names_them(
    tmp_path: Path, start_kapi_repository: RepositoryFactory
) -> None:
    secured = start_kapi_repository(tmp_path / "data", tokens=TOKENS)
    with (
        as_token(secured, WRITER["token"]) as writer,
        as_token(secured, DIGITS_ONLY["token"]) as other,
        as_token(secured, READER["token"]) as reader,
        as_token(secured, None) as nobody,
    ):
        create_model(writer, "digits")
        number = create_version(writer, "digits")
        assert reader.post("/v1/uploads", content=ARTIFACT).status_code == 403
        assert nobody.post("/v1/uploads", content=ARTIFACT).status_code == 401
        body = sent(writer, ARTIFACT)
        params = {"digest": digest_of(ARTIFACT), "upload": body["upload"]}
        path = variant_path("digits", number, ONNX_CPU)
        stolen = other.put(path, params=params)
        assert stolen.status_code == 403
        assert "another token" in error_of(stolen)
        mine = writer.put(path, params=params)
        assert mine.status_code == 201, mine.text


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:abc",
        "sha256:" + "A" * 64,
        "md5:" + "0" * 32,
        "0" * 64,
        "sha256:" + "0" * 64 + "/../x",
    ],
)
def test_a_malformed_digest_is_refused(api: httpx.Client, digest: str) -> None:
    name = model_with_version(api, "bad-digest")
    response = upload(api, name, 1, ONNX_CPU, ARTIFACT, digest=digest)
    assert response.status_code == 400
    assert error_of(response) == f"digest {digest!r} is not 'sha256:' and 64 lowercase hex digits"
    assert variant_keys(api, name, 1) == []


def test_an_upload_without_a_digest_is_refused(api: httpx.Client) -> None:
    name = model_with_version(api, "no-digest")
    response = api.put(variant_path(name, 1, ONNX_CPU), content=ARTIFACT)
    assert response.status_code == 422
    assert "digest" in error_of(response)
    assert variant_keys(api, name, 1) == []


def test_a_variant_keeps_the_filename_it_was_given(api: httpx.Client) -> None:
    name = model_with_version(api, "filename")
    response = upload(api, name, 1, ONNX_CPU, ARTIFACT, filename="digits.onnx")
    assert response.status_code == 201, response.text
    assert response.json()["filename"] == "digits.onnx"
    artifact = api.get(variant_path(name, 1, ONNX_CPU) + "/artifact")
    assert artifact.headers["content-disposition"] == 'attachment; filename="digits.onnx"'
    config = api.get(variant_path(name, 1, ONNX_CPU) + "/config.pbtxt").text
    assert 'default_model_filename: "digits.onnx"' in config


@pytest.mark.parametrize("filename", ["../model.onnx", "sub/model.onnx", ".hidden", ".."])
def test_a_filename_that_is_no_file_name_is_refused(api: httpx.Client, filename: str) -> None:
    name = model_with_version(api, "bad-filename")
    response = upload(api, name, 1, ONNX_CPU, ARTIFACT, filename=filename)
    assert response.status_code == 400
    assert error_of(response).startswith(f"file name {filename!r} is not valid")
    assert variant_keys(api, name, 1) == []


def test_an_upload_cut_short_leaves_nothing(
    repository: RunningRepository, api: httpx.Client
) -> None:
    name = model_with_version(api, "truncated")
    data = os.urandom(4 * 1024 * 1024)
    sent = 2 * 1024 * 1024 + 1000  # more than one 1 MiB write reaches the temporary file
    path = raw_upload_path(name, 1, ONNX_CPU, digest_of(data))
    with raw_upload(repository, path, repository.admin_token, len(data)) as connection:
        connection.send(data[:sent])
        wait_for(lambda: bytes_in_progress(repository.data) > 0, "the upload's bytes on disk")
    # The connection is closed, the body 2 MiB short of its Content-Length.
    wait_for(lambda: uploads_in_progress(repository.data) == [], "the upload to be dropped")
    assert api.get(variant_path(name, 1, ONNX_CPU)).status_code == 404
    assert variant_keys(api, name, 1) == []
    assert not blob_file(repository.data, digest_of(data)).exists()
    # And the variant is still free to upload.
    assert uploaded(api, name, 1, ONNX_CPU, data)["size"] == len(data)


def test_a_duplicate_variant_conflicts(repository: RunningRepository, api: httpx.Client) -> None:
    name = model_with_version(api, "duplicate")
    first = uploaded(api, name, 1, ONNX_CPU, ARTIFACT)
    other = os.urandom(1024)
    response = upload(api, name, 1, ONNX_CPU, other)
    assert response.status_code == 409
    assert error_of(response) == (
        f"model '{name}' version 1 has a variant onnxruntime/fp32/cpu-x86_64 already; "
        "variants are immutable"
    )
    assert api.get(variant_path(name, 1, ONNX_CPU)).json()["digest"] == first["digest"]
    assert not blob_file(repository.data, digest_of(other)).exists()


def test_the_loser_of_a_race_for_a_variant_leaves_no_blob(
    repository: RunningRepository, api: httpx.Client
) -> None:
    """Two uploads of one variant at once: the second to finish is refused, and the bytes it
    brought are not kept (no variant would ever name them)."""
    name = model_with_version(api, "variant-race")
    slow = os.urandom(2 * 1024 * 1024)
    slow_digest = digest_of(slow)
    path = raw_upload_path(name, 1, ONNX_CPU, slow_digest)
    with raw_upload(repository, path, repository.admin_token, len(slow)) as connection:
        connection.send(slow[:1024])
        wait_for(lambda: uploads_in_progress(repository.data) != [], "the slow upload to begin")
        fast = uploaded(api, name, 1, ONNX_CPU, ARTIFACT)
        connection.send(slow[1024:])
        status, body = answer_of(connection)
    assert status == 409
    assert body["error"].endswith("variants are immutable")
    assert api.get(variant_path(name, 1, ONNX_CPU)).json()["digest"] == fast["digest"]
    assert not blob_file(repository.data, slow_digest).exists()
    assert blob_file(repository.data, fast["digest"]).exists()


def test_an_upload_to_a_version_deleted_meanwhile_leaves_no_blob(
    repository: RunningRepository, api: httpx.Client
) -> None:
    name = model_with_version(api, "deleted-meanwhile")
    data = os.urandom(2 * 1024 * 1024)
    digest = digest_of(data)
    path = raw_upload_path(name, 1, ONNX_CPU, digest)
    with raw_upload(repository, path, repository.admin_token, len(data)) as connection:
        connection.send(data[:1024])
        wait_for(lambda: uploads_in_progress(repository.data) != [], "the upload to begin")
        assert api.delete(f"/v1/models/{name}/versions/1").status_code == 204
        connection.send(data[1024:])
        status, body = answer_of(connection)
    assert status == 404
    assert body["error"] == f"model '{name}' has no version 1"
    assert not blob_file(repository.data, digest).exists()


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (("pytorch", "fp32", "cpu-x86_64"), "runtime 'pytorch' is not one of"),
        (("onnxruntime", "fp64", "cpu-x86_64"), "precision 'fp64' is not one of"),
        (("onnxruntime", "fp32", "cpu-sparc"), "profile 'cpu-sparc' is not a known hardware"),
        (("onnxruntime", "fp32", "nvidia-smXY"), "profile 'nvidia-smXY' is not a known hardware"),
    ],
)
def test_an_unknown_runtime_precision_or_profile_is_refused(
    api: httpx.Client, key: Key, message: str
) -> None:
    name = model_with_version(api, "unknown-key")
    response = upload(api, name, 1, key, ARTIFACT)
    assert response.status_code == 400
    assert error_of(response).startswith(message)
    assert variant_keys(api, name, 1) == []


def test_an_upload_to_an_unknown_model_or_version_is_not_found(api: httpx.Client) -> None:
    name = model_with_version(api, "upload-target")
    missing_model = upload(api, unique("ghost"), 1, ONNX_CPU, ARTIFACT)
    assert missing_model.status_code == 404
    assert error_of(missing_model).endswith("is not in the repository")
    missing_version = upload(api, name, 2, ONNX_CPU, ARTIFACT)
    assert missing_version.status_code == 404
    assert error_of(missing_version) == f"model '{name}' has no version 2"
    unknown_variant = api.get(variant_path(name, 1, ONNX_CPU))
    assert unknown_variant.status_code == 404
    assert error_of(unknown_variant) == (
        f"model '{name}' version 1 has no variant onnxruntime/fp32/cpu-x86_64"
    )


# tar variants


def test_a_tar_variant_uploads(api: httpx.Client) -> None:
    name = model_with_version(api, "tar")
    archive = tar_of(file_member("model.xml", b"<net/>"), file_member("model.bin", ARTIFACT))
    response = upload(api, name, 1, OPENVINO_CPU, archive, fmt="tar")
    assert response.status_code == 201, response.text
    assert response.json()["format"] == "tar"
    assert response.json()["digest"] == digest_of(archive)
    assert variant_keys(api, name, 1) == [OPENVINO_CPU]
    assert api.get(variant_path(name, 1, OPENVINO_CPU) + "/artifact").content == archive
    config = api.get(variant_path(name, 1, OPENVINO_CPU) + "/config.pbtxt")
    assert config.status_code == 200
    assert 'platform: "openvino"' in config.text


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (file_member("../evil", b"x"), "the archive member '../evil' points outside"),
        (file_member("sub/../../evil", b"x"), "the archive member 'sub/../../evil' points"),
        (file_member("/etc/x", b"x"), "the archive member '/etc/x' points outside"),
        (symlink_member("link", "/etc/passwd"), "the archive member 'link' is not a regular"),
        (file_member("model.xml/x", b"x"), "the archive member 'model.xml/x' is under a file"),
        (file_member("model.xml", b"x"), "the archive member 'model.xml' is there twice"),
    ],
    ids=["dot-dot", "nested-dot-dot", "absolute", "symlink", "under-a-file", "twice"],
)
def test_a_tar_with_an_unsafe_member_is_refused(
    repository: RunningRepository,
    api: httpx.Client,
    member: tuple[tarfile.TarInfo, bytes | None],
    message: str,
) -> None:
    name = model_with_version(api, "unsafe-tar")
    archive = tar_of(file_member("model.xml", b"<net/>"), member)
    assert tar_names(archive) == ["model.xml", member[0].name]  # kept as given
    response = upload(api, name, 1, OPENVINO_CPU, archive, fmt="tar")
    assert response.status_code == 400
    assert error_of(response).startswith(message)
    assert variant_keys(api, name, 1) == []
    assert api.get(variant_path(name, 1, OPENVINO_CPU)).status_code == 404
    assert not blob_file(repository.data, digest_of(archive)).exists()


def test_a_tar_variant_that_is_no_tar_is_refused(
    repository: RunningRepository, api: httpx.Client
) -> None:
    name = model_with_version(api, "not-tar")
    response = upload(api, name, 1, OPENVINO_CPU, ARTIFACT, fmt="tar")
    assert response.status_code == 400
    assert error_of(response).startswith("the artifact is not a readable tar archive")
    assert variant_keys(api, name, 1) == []


# downloads


@pytest.fixture(scope="module")
def downloadable(api: httpx.Client) -> str:
    """A variant's artifact path, its bytes ARTIFACT."""
    name = model_with_version(api, "download")
    uploaded(api, name, 1, ONNX_CPU, ARTIFACT)
    return variant_path(name, 1, ONNX_CPU) + "/artifact"


def test_a_whole_download(anonymous: httpx.Client, downloadable: str) -> None:
    response = anonymous.get(downloadable)
    assert response.status_code == 200
    assert response.content == ARTIFACT
    assert response.headers["x-kapi-digest"] == digest_of(ARTIFACT)
    assert response.headers["etag"] == f'"{digest_of(ARTIFACT)}"'
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["content-length"] == str(len(ARTIFACT))
    assert "content-range" not in response.headers


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [("bytes=0-9", 0, 10), ("bytes=10-", 10, len(ARTIFACT)), ("bytes=-5", len(ARTIFACT) - 5, None)],
)
def test_a_range_download(
    anonymous: httpx.Client, downloadable: str, header: str, start: int, end: int | None
) -> None:
    response = anonymous.get(downloadable, headers={"range": header})
    expected = ARTIFACT[start:end]
    assert response.status_code == 206
    assert response.content == expected
    last = start + len(expected) - 1
    assert response.headers["content-range"] == f"bytes {start}-{last}/{len(ARTIFACT)}"
    assert response.headers["content-length"] == str(len(expected))
    assert response.headers["x-kapi-digest"] == digest_of(ARTIFACT)


@pytest.mark.parametrize(
    "header", [f"bytes={len(ARTIFACT)}-", f"bytes={len(ARTIFACT) + 10}-{len(ARTIFACT) + 20}"]
)
def test_a_range_past_the_end_is_not_satisfiable(
    anonymous: httpx.Client, downloadable: str, header: str
) -> None:
    response = anonymous.get(downloadable, headers={"range": header})
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{len(ARTIFACT)}"
    assert response.content == b""


def test_a_range_that_ends_before_it_starts_is_ignored(
    anonymous: httpx.Client, downloadable: str
) -> None:
    response = anonymous.get(downloadable, headers={"range": "bytes=5-3"})
    assert response.status_code == 200
    assert response.content == ARTIFACT


def test_head_tells_the_size_without_the_bytes(anonymous: httpx.Client, downloadable: str) -> None:
    response = anonymous.head(downloadable)
    assert response.status_code == 200
    assert response.headers["content-length"] == str(len(ARTIFACT))
    assert response.headers["x-kapi-digest"] == digest_of(ARTIFACT)
    assert response.content == b""
    ranged = anonymous.head(downloadable, headers={"range": "bytes=10-"})
    assert (ranged.status_code, ranged.headers["content-length"]) == (206, str(len(ARTIFACT) - 10))


def test_the_client_resumes_a_partial_download(
    client: RepositoryClient, api: httpx.Client, tmp_path: Path
) -> None:
    name = model_with_version(api, "resume")
    data = os.urandom(3 * 1024 * 1024 + 7)
    uploaded(api, name, 1, ONNX_CPU, data)
    target = tmp_path / "model.onnx"
    part = tmp_path / "model.onnx.part"
    half = len(data) // 2
    part.write_bytes(data[:half])
    seen: list[tuple[str | None, int]] = []
    client.http.event_hooks["response"] = [
        lambda response: seen.append((response.request.headers.get("range"), response.status_code))
    ]
    try:
        assert client.download(name, 1, ONNX_CPU, target, digest_of(data)) == target
    finally:
        client.http.event_hooks["response"] = []
    assert target.read_bytes() == data
    assert not part.exists()
    assert seen == [(f"bytes={half}-", 206)]  # only the missing half was sent


def test_the_client_drops_a_corrupted_partial_download(
    client: RepositoryClient, api: httpx.Client, tmp_path: Path
) -> None:
    name = model_with_version(api, "corrupt-part")
    data = os.urandom(1024 * 1024)
    uploaded(api, name, 1, ONNX_CPU, data)
    target = tmp_path / "model.onnx"
    part = tmp_path / "model.onnx.part"
    corrupted = bytearray(data[: len(data) // 2])
    corrupted[100] ^= 0xFF
    part.write_bytes(bytes(corrupted))
    with pytest.raises(InvalidArgument, match=f"not {digest_of(data)}; it was dropped"):
        client.download(name, 1, ONNX_CPU, target, digest_of(data))
    assert not part.exists()
    assert not target.exists()
    # Started afresh, the download succeeds.
    assert client.download(name, 1, ONNX_CPU, target, digest_of(data)).read_bytes() == data


# resolution


def cpu_variants(api: httpx.Client, prefix: str) -> str:
    """A model whose version 1 has a baseline x86 variant and an AVX-512 VNNI one."""
    name = model_with_version(api, prefix)
    uploaded(api, name, 1, ONNX_CPU, b"baseline " + ARTIFACT)
    uploaded(api, name, 1, ONNX_VNNI, b"vnni " + ARTIFACT)
    return name


def test_resolve_picks_the_best_profile_a_node_has(api: httpx.Client) -> None:
    name = cpu_variants(api, "resolve-profile")
    assert resolved_key(resolve(api, name, VNNI_NODE, ["onnxruntime"])) == ONNX_VNNI
    assert resolved_key(resolve(api, name, BASELINE_NODE, ["onnxruntime"])) == ONNX_CPU
    answer = resolve(api, name, VNNI_NODE, ["onnxruntime"], ref="1").json()
    assert answer["model"]["name"] == name
    assert answer["version"]["number"] == 1
    assert answer["variant"]["digest"] == digest_of(b"vnni " + ARTIFACT)


def test_resolve_prefers_a_verified_variant(api: httpx.Client) -> None:
    name = cpu_variants(api, "resolve-verified")
    digest = digest_of(b"baseline " + ARTIFACT)
    assert set_report(api, name, 1, ONNX_CPU, passed=True, digest=digest).status_code == 200
    assert resolved_key(resolve(api, name, VNNI_NODE, ["onnxruntime"])) == ONNX_CPU


def test_resolve_prefers_a_faster_variant_among_equals(api: httpx.Client) -> None:
    name = cpu_variants(api, "resolve-faster")
    for key, results in (
        (ONNX_CPU, {"cpu-x86_64": {"latency_p50_ms": 1.0}}),
        (ONNX_VNNI, {"cpu-x86_64-avx512vnni": {"latency_p50_ms": 3.0}}),
    ):
        response = api.put(variant_path(name, 1, key) + "/benchmarks", json=results)
        assert response.status_code == 200, response.text
        assert response.json()["benchmarks"] == results
    assert resolved_key(resolve(api, name, VNNI_NODE, ["onnxruntime"])) == ONNX_CPU


def test_benchmarks_on_an_unknown_profile_are_refused(api: httpx.Client) -> None:
    name = cpu_variants(api, "bench-profile")
    results = {"cpu-sparc": {"latency_p50_ms": 1.0}}
    response = api.put(variant_path(name, 1, ONNX_CPU) + "/benchmarks", json=results)
    assert response.status_code == 400
    assert error_of(response) == "profile 'cpu-sparc' is not a known hardware profile"


def test_resolve_without_a_compatible_variant_is_not_found(api: httpx.Client) -> None:
    name = cpu_variants(api, "resolve-none")
    for profiles, runtimes in ((["cpu-arm64"], ["onnxruntime"]), (VNNI_NODE, ["openvino"])):
        response = resolve(api, name, profiles, runtimes)
        assert response.status_code == 404
        message = error_of(response)
        assert message.startswith(f"model '{name}@latest' (version 1) has no variant for ")
        assert message.endswith(
            "it has ['onnxruntime/fp32/cpu-x86_64', 'onnxruntime/int8/cpu-x86_64-avx512vnni']"
        )


def test_resolve_an_unknown_reference_is_not_found(api: httpx.Client) -> None:
    name = cpu_variants(api, "resolve-ref")
    for ref, message in (
        ("canary", f"model '{name}' has no alias 'canary'"),
        ("7", f"model '{name}' has no version 7"),
    ):
        response = resolve(api, name, VNNI_NODE, ["onnxruntime"], ref=ref)
        assert response.status_code == 404
        assert error_of(response) == message


def test_a_tensorrt_engine_runs_only_on_its_own_gpu(api: httpx.Client) -> None:
    name = model_with_version(api, "gpu")
    uploaded(api, name, 1, TRT_SM90, b"engine " + ARTIFACT)
    uploaded(api, name, 1, ONNX_SM80, b"onnx " + ARTIFACT)
    both = ["tensorrt", "onnxruntime"]
    sm89 = ["nvidia-sm89", "cpu-x86_64"]
    assert resolved_key(resolve(api, name, sm89, both)) == ONNX_SM80
    assert resolve(api, name, sm89, ["tensorrt"]).status_code == 404
    assert resolved_key(resolve(api, name, ["nvidia-sm90"], ["tensorrt"])) == TRT_SM90
    # Without the runtime in the node's list, the ONNX variant is not offered either.
    assert resolve(api, name, sm89, ["openvino"]).status_code == 404


# aliases


def test_production_needs_a_passing_report(api: httpx.Client) -> None:
    name = model_with_version(api, "unverified")
    uploaded(api, name, 1, ONNX_CPU, ARTIFACT)
    start = cursor(api)
    response = set_alias(api, name, "production", version=1)
    assert response.status_code == 412
    assert error_of(response).startswith(
        f"model '{name}' version 1 has no variant with a passing verification report"
    )
    assert api.get(f"/v1/models/{name}").json()["aliases"] == {}
    [rejected] = events_of(api, name, after=start)
    assert rejected["kind"] == "alias.rejected"
    assert rejected["actor"] == "admin"
    assert rejected["detail"] == {
        "alias": "production",
        "to": 1,
        "forced": False,
        "reason": error_of(response),
    }

    forced = set_alias(api, name, "production", version=1, force=True)
    assert forced.status_code == 200, forced.text
    assert forced.json()["aliases"] == {"production": 1}
    moved = events_of(api, name, after=rejected["id"])
    assert [e["kind"] for e in moved] == ["alias.moved"]
    assert moved[0]["detail"] == {"alias": "production", "from": None, "to": 1, "forced": True}


def test_a_failing_report_does_not_verify(api: httpx.Client) -> None:
    name = model_with_version(api, "failing")
    variant = uploaded(api, name, 1, ONNX_CPU, ARTIFACT)
    response = set_report(api, name, 1, ONNX_CPU, passed=False, digest=variant["digest"])
    assert response.status_code == 200
    assert response.json()["verified"] is False
    assert set_alias(api, name, "production", version=1).status_code == 412


def test_a_report_for_another_artifact_is_refused(api: httpx.Client) -> None:
    name = model_with_version(api, "other-report")
    variant = uploaded(api, name, 1, ONNX_CPU, ARTIFACT)
    other = digest_of(b"another artifact")
    response = set_report(api, name, 1, ONNX_CPU, passed=True, digest=other)
    assert response.status_code == 400
    assert error_of(response) == (
        f"the report judged {other}, not this variant's artifact {variant['digest']}; "
        "a report belongs to the artifact it checked"
    )
    assert api.get(variant_path(name, 1, ONNX_CPU)).json()["report"] is None
    assert set_alias(api, name, "production", version=1).status_code == 412


def test_a_passing_report_lets_production_move(api: httpx.Client) -> None:
    name = model_with_version(api, "verified")
    variant = uploaded(api, name, 1, ONNX_CPU, ARTIFACT)
    checks = [{"name": "accuracy", "passed": True}]
    report = set_report(
        api, name, 1, ONNX_CPU, passed=True, digest=variant["digest"], checks=checks
    )
    assert report.status_code == 200, report.text
    assert report.json()["verified"] is True
    assert report.json()["report"]["checks"] == checks
    start = cursor(api)
    response = set_alias(api, name, "production", version=1)
    assert response.status_code == 200, response.text
    assert response.json()["aliases"] == {"production": 1}
    [moved] = events_of(api, name, after=start)
    assert moved["kind"] == "alias.moved"
    assert moved["detail"]["forced"] is False
    assert resolved_key(resolve(api, name, BASELINE_NODE, ["onnxruntime"], "production")) == (
        ONNX_CPU
    )


def test_concurrent_alias_moves_expecting_the_same_version(
    repository: RunningRepository, api: httpx.Client
) -> None:
    name = unique("race")
    create_model(api, name)
    for _ in range(3):
        create_version(api, name)
    assert set_alias(api, name, "canary", version=1, expected_version=0).status_code == 200
    start = cursor(api)
    racers = 8
    barrier = threading.Barrier(racers, timeout=30)

    def move(version: int) -> tuple[int, int]:
        with as_token(repository, repository.admin_token) as own:
            own.get("/healthz")  # connected before the race starts
            barrier.wait()
            response = set_alias(own, name, "canary", version=version, expected_version=1)
            return version, response.status_code

    with ThreadPoolExecutor(racers) as pool:
        results = list(pool.map(move, [2, 3] * (racers // 2)))
    winners = [version for version, status in results if status == 200]
    assert len(winners) == 1, results
    assert sorted(status for _, status in results) == [200] + [409] * (racers - 1)
    assert api.get(f"/v1/models/{name}").json()["aliases"] == {"canary": winners[0]}

    log = events_of(api, name, after=start)
    moved = [e for e in log if e["kind"] == "alias.moved"]
    rejected = [e for e in log if e["kind"] == "alias.rejected"]
    assert len(log) == racers
    assert [(e["detail"]["from"], e["detail"]["to"]) for e in moved] == [(1, winners[0])]
    assert len(rejected) == racers - 1
    assert sorted(e["detail"]["to"] for e in rejected + moved) == sorted([2, 3] * (racers // 2))
    for event in rejected:
        assert event["detail"]["reason"].startswith(
            f"alias 'canary' of model '{name}' is at version {winners[0]}, not at the version 1"
        )


def test_an_expected_version_that_no_longer_holds_conflicts(api: httpx.Client) -> None:
    name = model_with_version(api, "stale")
    create_version(api, name)
    assert set_alias(api, name, "canary", version=1, expected_version=0).status_code == 200
    again = set_alias(api, name, "canary", version=2, expected_version=0)
    assert again.status_code == 409
    assert error_of(again) == (
        f"alias 'canary' of model '{name}' is at version 1, not at the version 0 the move "
        "expected; read it again"
    )
    assert set_alias(api, name, "canary", version=2, expected_version=1).status_code == 200


def test_an_aliased_version_cannot_be_deleted(
    repository: RunningRepository, api: httpx.Client
) -> None:
    name = model_with_version(api, "delete")
    create_version(api, name)
    first = uploaded(api, name, 1, ONNX_CPU, b"one " + ARTIFACT)
    uploaded(api, name, 2, ONNX_CPU, b"two " + ARTIFACT)
    assert set_alias(api, name, "production", version=1, force=True).status_code == 200

    refused = api.delete(f"/v1/models/{name}/versions/1")
    assert refused.status_code == 409
    assert error_of(refused) == (
        f"model '{name}' version 1 cannot be deleted: aliases ['production'] point at it; "
        "move them first"
    )
    assert api.get(f"/v1/models/{name}/versions/1").status_code == 200
    assert blob_file(repository.data, first["digest"]).exists()

    assert set_alias(api, name, "production", version=2, force=True).status_code == 200
    deleted = api.delete(f"/v1/models/{name}/versions/1")
    assert deleted.status_code == 204
    assert api.get(f"/v1/models/{name}/versions/1").status_code == 404
    assert not blob_file(repository.data, first["digest"]).exists()
    assert [e["kind"] for e in events_of(api, name)][-1] == "version.deleted"


def test_deleting_a_version_keeps_a_blob_another_variant_uses(
    repository: RunningRepository, api: httpx.Client
) -> None:
    name = model_with_version(api, "shared-blob")
    create_version(api, name)
    shared = uploaded(api, name, 1, ONNX_CPU, ARTIFACT)
    assert uploaded(api, name, 2, ONNX_CPU, ARTIFACT)["digest"] == shared["digest"]
    assert api.delete(f"/v1/models/{name}/versions/1").status_code == 204
    assert blob_file(repository.data, shared["digest"]).exists()
    assert api.get(variant_path(name, 2, ONNX_CPU) + "/artifact").content == ARTIFACT


# tokens


@pytest.mark.parametrize(
    ("authorization", "message"),
    [
        (None, "writes need a bearer token"),
        ("Bearer " + "x" * 20, "the bearer token is not valid"),
        ("Basic xyz", "the Authorization header is not 'Bearer <token>'"),
        ("Bearer", "the Authorization header is not 'Bearer <token>'"),
    ],
    ids=["none", "wrong", "basic", "empty"],
)
def test_a_write_without_a_valid_token_is_unauthenticated(
    secured: RunningRepository, authorization: str | None, message: str
) -> None:
    name = unique("anonymous")
    headers = {"authorization": authorization} if authorization is not None else {}
    response = httpx.post(
        f"{secured.url}/v1/models", json={"name": name}, headers=headers, timeout=TIMEOUT
    )
    assert response.status_code == 401
    assert error_of(response) == message
    assert httpx.get(f"{secured.url}/v1/models/{name}", timeout=TIMEOUT).status_code == 404


def test_a_read_token_cannot_write(secured: RunningRepository) -> None:
    name = unique("read-only")
    with as_token(secured, READER["token"]) as reader:
        response = reader.post("/v1/models", json={"name": name})
        assert response.status_code == 403
        assert error_of(response) == "token 'reader' has read scope; this is a write"
        assert reader.get("/v1/models").status_code == 200


def test_a_token_limited_to_some_models(secured: RunningRepository) -> None:
    other = unique("other")
    with (
        as_token(secured, DIGITS_ONLY["token"]) as digits,
        as_token(secured, WRITER["token"]) as writer,
    ):
        refused = digits.post("/v1/models", json={"name": other})
        assert refused.status_code == 403
        assert error_of(refused) == f"token 'digits-only' is not allowed model '{other}'"

        assert create_model(writer, other)["created_by"] == "writer"
        for response in (
            digits.post(f"/v1/models/{other}/versions", json={}),
            digits.get(f"/v1/models/{other}"),
        ):
            assert response.status_code == 403
            assert error_of(response) == f"token 'digits-only' is not allowed model '{other}'"

        created = create_model(digits, "digits")
        assert created["created_by"] == "digits-only"
        assert create_version(digits, "digits") == 1
        assert [m["name"] for m in digits.get("/v1/models").json()] == ["digits"]
        seen = {e["model"] for e in digits.get("/v1/events").json()}
        assert seen == {"digits"}
        # A page holds the events the token may see: it is never empty while more are there.
        page = digits.get("/v1/events", params={"after": 0, "limit": 1}).json()
        assert [(e["model"], e["kind"]) for e in page] == [("digits", "model.created")]

        actors = {(e["model"], e["kind"]): e["actor"] for e in writer.get("/v1/events").json()}
        assert actors[(other, "model.created")] == "writer"
        assert actors[("digits", "model.created")] == "digits-only"
        assert actors[("digits", "version.created")] == "digits-only"


def test_no_token_value_reaches_the_log(secured: RunningRepository) -> None:
    for spec in TOKENS:
        with as_token(secured, str(spec["token"])) as session:
            session.get("/v1/models")
            session.post("/v1/models", json={"name": unique("log")})
    with as_token(secured, "not-a-token-" + "z" * 20) as wrong:
        assert wrong.get("/v1/models").status_code == 401
    log = secured.log()
    assert "repository ready" in log
    for spec in TOKENS:
        assert str(spec["token"]) not in log
    assert "z" * 20 not in log


def test_closed_reads_need_a_token(
    start_kapi_repository: RepositoryFactory, tmp_path: Path
) -> None:
    closed = start_kapi_repository(
        tmp_path / "data", tokens=TOKENS, env={"KAPI_REPOSITORY_OPEN_READS": "false"}
    )
    with as_token(closed, None) as anonymous, as_token(closed, READER["token"]) as reader:
        for path in ("/v1/models", "/v1/events", "/v1/events/cursor", "/v1/events/stream"):
            response = anonymous.get(path)
            assert response.status_code == 401, path
            assert error_of(response) == "reads need a bearer token"
        assert reader.get("/v1/models").status_code == 200
        assert reader.get("/v1/events/cursor").json() == {"cursor": 0}


def test_without_tokens_an_admin_token_is_made(
    start_kapi_repository: RepositoryFactory, tmp_path: Path
) -> None:
    running = start_kapi_repository(tmp_path / "data")
    token_file = running.data / "admin-token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    token = running.admin_token
    assert len(token) >= 32
    assert token not in running.log()
    response = httpx.post(f"{running.url}/v1/models", json={"name": "x"}, timeout=TIMEOUT)
    assert response.status_code == 401
    with as_token(running, token) as admin:
        assert create_model(admin, "x")["created_by"] == "admin"


# the event stream


def test_the_event_stream_resumes_from_last_event_id(api: httpx.Client) -> None:
    start = cursor(api)
    name = model_with_version(api, "stream")  # model.created, version.created
    create_version(api, name)
    params: dict[str, Any] = {"model": name, "after": start}
    with api.stream("GET", "/v1/events/stream", params=params) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        first = read_sse(response.iter_lines(), 2)
    assert [e.kind for e in first] == ["model.created", "version.created"]
    assert [e.data["version"] for e in first] == [None, 1]
    assert all(e.data["id"] == e.id and e.data["model"] == name for e in first)

    create_version(api, name)  # committed while no stream is open
    resume = {"last-event-id": str(first[-1].id)}
    with api.stream("GET", "/v1/events/stream", params=params, headers=resume) as response:
        assert response.status_code == 200
        rest = read_sse(response.iter_lines(), 2)
    assert [(e.kind, e.data["version"]) for e in rest] == [
        ("version.created", 2),
        ("version.created", 3),
    ]
    logged = [e["id"] for e in events_of(api, name, after=start)]
    assert [e.id for e in first + rest] == logged  # no gap, no repeat


def test_the_event_stream_delivers_a_live_event(api: httpx.Client) -> None:
    name = model_with_version(api, "live")
    params: dict[str, Any] = {"model": name, "after": cursor(api)}
    with api.stream("GET", "/v1/events/stream", params=params) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        create_version(api, name)  # while the stream waits
        [event] = read_sse(lines, 1)  # the read times out after TIMEOUT.read seconds
    assert event.kind == "version.created"
    assert event.data["model"] == name
    assert event.data["version"] == 2
    assert event.data["actor"] == "admin"


def test_a_bad_last_event_id_is_refused(api: httpx.Client) -> None:
    response = api.get("/v1/events/stream", headers={"last-event-id": "five"})
    assert response.status_code == 400
    assert error_of(response) == "Last-Event-ID 'five' is not an event id"


def test_the_cursor_is_the_newest_event(api: httpx.Client) -> None:
    before = cursor(api)
    name = model_with_version(api, "cursor")
    after = cursor(api)
    logged = events_of(api, name, after=before)
    assert after == logged[-1]["id"]
    assert api.get("/v1/events", params={"after": after}).json() == []


# a crash


def test_a_crash_mid_upload_leaves_nothing(
    start_kapi_repository: RepositoryFactory, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    running = start_kapi_repository(data_dir)
    token = running.admin_token
    with as_token(running, token) as admin:
        name = model_with_version(admin, "crash")
    artifact = os.urandom(30 * 1024 * 1024)
    path = raw_upload_path(name, 1, ONNX_CPU, digest_of(artifact))
    with raw_upload(running, path, token, len(artifact)) as connection:
        connection.send(artifact[: 10 * 1024 * 1024])
        wait_for(lambda: bytes_in_progress(data_dir) > 0, "the upload's bytes on disk")
        running.kill()
    assert uploads_in_progress(data_dir) != []  # what the crash left behind

    restarted = start_kapi_repository(data_dir)
    assert uploads_in_progress(data_dir) == []
    with as_token(restarted, token) as admin:
        assert admin.get(variant_path(name, 1, ONNX_CPU)).status_code == 404
        assert variant_keys(admin, name, 1) == []
        assert not blob_file(data_dir, digest_of(artifact)).exists()
    file = tmp_path / "model.onnx"
    file.write_bytes(artifact)
    with RepositoryClient(restarted.url, token) as again:
        variant = again.upload(name, 1, ONNX_CPU, file)
    assert variant.digest == digest_of(artifact)
    assert variant.size == len(artifact)
    assert blob_file(data_dir, variant.digest).stat().st_size == len(artifact)


# documentation


def test_the_openapi_document_and_docs(anonymous: httpx.Client) -> None:
    document = anonymous.get("/openapi.json")
    assert document.status_code == 200
    paths = document.json()["paths"]
    assert "/v1/models" in paths
    assert {"get", "post"} <= set(paths["/v1/models"])
    assert "/v1/models/{model}/resolve" in paths
    docs = anonymous.get("/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()


def test_uploads_waiting_to_be_named_are_limited_per_token(
    tmp_path: Path, start_kapi_repository: RepositoryFactory
) -> None:
    secured = start_kapi_repository(tmp_path / "data", tokens=TOKENS)
    with (
        as_token(secured, WRITER["token"]) as writer,
        as_token(secured, DIGITS_ONLY["token"]) as other,
    ):
        for _ in range(8):
            sent(writer, ARTIFACT)
        refused = writer.post("/v1/uploads", content=ARTIFACT)
        assert refused.status_code == 409
        assert "has 8 uploads waiting" in error_of(refused)
        assert other.post("/v1/uploads", content=ARTIFACT).status_code == 201  # not blocked


def test_a_filename_for_a_tar_is_refused(api: httpx.Client) -> None:
    name = model_with_version(api, "tar-filename")
    archive = tar_of(file_member("model.xml", b"<net/>"))
    response = upload(api, name, 1, OPENVINO_CPU, archive, fmt="tar", filename="net.xml")
    assert response.status_code == 400
    assert "files keep theirs" in error_of(response)
