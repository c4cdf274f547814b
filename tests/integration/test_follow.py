"""Nodes that follow the model repository: `kapi node --repository URL --serve MODEL@ALIAS`.

End to end on loopback, with real processes: a repository, a node that follows it, and
tritonclient sending requests while aliases move.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from kapi.repository import entities as ent
from kapi.repository.client import RepositoryClient

from tests.conftest import RepositoryFactory
from tests.support.models import add_constant_model
from tests.support.node import NodeFactory, RunningNode
from tests.support.registry import RunningRepository

WAIT_S = 60.0
ROW = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
KEY = ("onnxruntime", "fp32", "cpu-x86_64")


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def push(client: RepositoryClient, tmp_path: Path, model: str, artifact: bytes) -> int:
    """A new version of `model` with one ONNX variant for cpu-x86_64; returns its number."""
    try:
        client.model(model)
    except Exception:
        client.create_model(ent.ModelCreate(name=model))
    number = client.create_version(model, ent.VersionCreate(lineage={"test": True})).number
    path = tmp_path / f"{model}-{number}.onnx"
    path.write_bytes(artifact)
    client.upload(model, number, KEY, path)
    return number


def added(constant: float) -> bytes:
    return add_constant_model(constant).SerializeToString()


def infer(client: grpcclient.InferenceServerClient, model: str) -> tuple[str, float]:
    """(the version that answered, the constant it adds)."""
    tensor = grpcclient.InferInput("INPUT0", list(ROW.shape), "FP32")
    tensor.set_data_from_numpy(ROW)
    result = client.infer(model, [tensor])
    output = result.as_numpy("OUTPUT0")
    assert output is not None
    return result.get_response().model_version, float(output[0, 0] - ROW[0, 0])


@pytest.fixture
def repository(tmp_path: Path, start_kapi_repository: RepositoryFactory) -> RunningRepository:
    return start_kapi_repository(tmp_path / "repository")


@pytest.fixture
def client(repository: RunningRepository) -> Iterator[RepositoryClient]:
    with RepositoryClient(repository.url, repository.admin_token) as client:
        yield client


def follow(
    start_kapi_node: NodeFactory, tmp_path: Path, url: str, serve: str, wait_for: str = "ready"
) -> RunningNode:
    return start_kapi_node(
        None,
        args=["--repository", url, "--serve", serve, "--cache-dir", str(tmp_path / "cache")],
        wait_for=wait_for,  # type: ignore[arg-type]
    )


def test_a_node_serves_the_alias_and_reports_its_profile(
    tmp_path: Path, client: RepositoryClient, start_kapi_node: NodeFactory
) -> None:
    push(client, tmp_path, "addone", added(1.0))
    client.set_alias("addone", "production", 1, force=True)
    node = follow(start_kapi_node, tmp_path, client.url, "addone@production")
    triton = grpcclient.InferenceServerClient(node.grpc_url)
    assert infer(triton, "addone") == ("1", 1.0)
    extensions = triton.get_server_metadata().extensions
    profiles = [e for e in extensions if e.startswith("kapi-profile:")]
    assert profiles[-1:] == ["kapi-profile:cpu-x86_64"]
    assert f"kapi-http-port:{node.http_port}" in extensions  # where its REST API is


def test_an_alias_move_under_load_switches_with_zero_failures(
    tmp_path: Path, client: RepositoryClient, start_kapi_node: NodeFactory
) -> None:
    push(client, tmp_path, "addone", added(1.0))
    client.set_alias("addone", "production", 1, force=True)
    node = follow(start_kapi_node, tmp_path, client.url, "addone@production")
    push(client, tmp_path, "addone", added(2.0))

    answers: list[tuple[str, float]] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def send() -> None:
        triton = grpcclient.InferenceServerClient(node.grpc_url)
        while not stop.is_set():
            try:
                answers.append(infer(triton, "addone"))
            except Exception as exc:  # every failure counts
                failures.append(exc)

    senders = [threading.Thread(target=send) for _ in range(4)]
    for sender in senders:
        sender.start()
    try:
        wait_until(lambda: len(answers) > 50, "requests before the move")
        client.set_alias("addone", "production", 2, force=True)
        wait_until(lambda: answers[-1] == ("2", 2.0), "the node to serve version 2")
        seen = len(answers)
        wait_until(lambda: len(answers) > seen + 50, "requests after the move")
    finally:
        stop.set()
        for sender in senders:
            sender.join()
    assert failures == []
    assert set(answers) == {("1", 1.0), ("2", 2.0)}
    first_new = answers.index(("2", 2.0))
    assert answers[first_new + 8 :].count(("1", 1.0)) == 0  # at most the in-flight old ones


def test_a_version_that_fails_to_load_leaves_the_old_one_serving(
    tmp_path: Path, client: RepositoryClient, start_kapi_node: NodeFactory
) -> None:
    push(client, tmp_path, "addone", added(1.0))
    client.set_alias("addone", "production", 1, force=True)
    node = follow(start_kapi_node, tmp_path, client.url, "addone@production")
    push(client, tmp_path, "addone", b"not an onnx model")
    client.set_alias("addone", "production", 2, force=True)
    triton = grpcclient.InferenceServerClient(node.grpc_url)

    def reason() -> str:
        index = triton.get_model_repository_index(as_json=True)["models"]
        return str(index[0].get("reason", ""))

    wait_until(lambda: "version 2" in reason(), "the failed update in the index")
    assert "failed to load" in reason()
    assert infer(triton, "addone") == ("1", 1.0)
    assert 'kapi_node_model_updates_total{model="addone",result="failed"} 1.0' in node.metrics()
    assert "model update failed" in node.log()


def test_a_node_serves_from_its_cache_while_the_repository_is_down(
    tmp_path: Path,
    repository: RunningRepository,
    client: RepositoryClient,
    start_kapi_node: NodeFactory,
    start_kapi_repository: RepositoryFactory,
) -> None:
    push(client, tmp_path, "addone", added(1.0))
    push(client, tmp_path, "addone", added(2.0))
    client.set_alias("addone", "production", 2, force=True)
    node = follow(start_kapi_node, tmp_path, client.url, "addone@production")
    repository.kill()
    triton = grpcclient.InferenceServerClient(node.grpc_url)
    assert infer(triton, "addone") == ("2", 2.0)  # the repository's outage costs nothing
    node.terminate()

    restarted = follow(start_kapi_node, tmp_path, client.url, "addone@production")
    triton = grpcclient.InferenceServerClient(restarted.grpc_url)
    assert infer(triton, "addone") == ("2", 2.0)  # booted from the cache
    assert "serving from the cache" in restarted.log()

    # The repository comes back on its port: the node reconnects and follows again.
    start_kapi_repository(repository.data, port=repository.port)
    client.set_alias("addone", "production", 1, force=True)
    wait_until(lambda: infer(triton, "addone") == ("1", 1.0), "the node to follow again")


def test_a_node_with_nothing_cached_and_no_repository_is_not_ready(
    tmp_path: Path, start_kapi_node: NodeFactory, unused_port: Callable[[], int]
) -> None:
    url = f"http://127.0.0.1:{unused_port()}"
    node = follow(start_kapi_node, tmp_path, url, "addone@production", wait_for="live")
    assert not node.is_ready()
    index = httpx.post(f"{node.http_url}/v2/repository/index", timeout=5).json()
    assert index[0]["state"] == "UNAVAILABLE"
    assert "nothing is cached" in index[0]["reason"]


def index_of(node: RunningNode) -> dict[str, dict[str, str]]:
    rows = httpx.post(f"{node.http_url}/v2/repository/index", timeout=5).json()
    return {row["name"]: row for row in rows}


def test_a_failure_outside_the_protocol_is_said_and_the_node_follows_on(
    tmp_path: Path, client: RepositoryClient, start_kapi_node: NodeFactory
) -> None:
    """The cache cannot hold one model (its directory is a file): that model fails with
    the reason, and the node goes on following the other."""
    for model in ("addone", "blocked"):
        push(client, tmp_path, model, added(1.0))
        client.set_alias(model, "production", 1, force=True)
    (tmp_path / "cache" / "models").mkdir(parents=True)
    (tmp_path / "cache" / "models" / "blocked").write_text("in the way")
    node = start_kapi_node(
        None,
        args=["--repository", client.url, "--serve", "addone@production,blocked@production",
              "--cache-dir", str(tmp_path / "cache"), "--strict-readiness", "false"],
    )  # fmt: skip
    wait_until(lambda: "failed to load" in index_of(node)["blocked"]["reason"], "the reason")
    assert index_of(node)["blocked"]["state"] == "UNAVAILABLE"
    push(client, tmp_path, "addone", added(2.0))
    client.set_alias("addone", "production", 2, force=True)
    triton = grpcclient.InferenceServerClient(node.grpc_url)
    wait_until(lambda: infer(triton, "addone") == ("2", 2.0), "the node to follow addone")
    assert "Traceback" not in node.log().split("model update failed")[0]


def test_a_better_variant_of_the_serving_version_that_fails_keeps_the_old_files(
    tmp_path: Path,
    repository: RunningRepository,
    client: RepositoryClient,
    start_kapi_node: NodeFactory,
) -> None:
    """A variant of version 1 that ranks higher here (AVX2) but does not load: version 1
    serves on from the files it had, after a restart too."""
    push(client, tmp_path, "addone", added(1.0))
    client.set_alias("addone", "production", 1, force=True)
    node = follow(start_kapi_node, tmp_path, client.url, "addone@production")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    client.upload("addone", 1, ("onnxruntime", "fp32", "cpu-x86_64-avx2"), broken)
    wait_until(lambda: "failed to load" in index_of(node)["addone"]["reason"], "the failure")
    triton = grpcclient.InferenceServerClient(node.grpc_url)
    assert infer(triton, "addone") == ("1", 1.0)
    node.terminate()

    restarted = follow(start_kapi_node, tmp_path, client.url, "addone@production")
    triton = grpcclient.InferenceServerClient(restarted.grpc_url)
    assert infer(triton, "addone") == ("1", 1.0)  # it tried the broken one again, and kept this
    restarted.terminate()
    repository.kill()
    offline = follow(start_kapi_node, tmp_path, client.url, "addone@production")
    triton = grpcclient.InferenceServerClient(offline.grpc_url)
    assert infer(triton, "addone") == ("1", 1.0)


def test_an_alias_that_is_not_there_is_the_reason(
    tmp_path: Path, client: RepositoryClient, start_kapi_node: NodeFactory
) -> None:
    push(client, tmp_path, "addone", added(1.0))
    node = follow(start_kapi_node, tmp_path, client.url, "addone@staging", wait_for="live")
    wait_until(lambda: "addone" in index_of(node), "the model in the index")
    assert "has no alias 'staging'" in index_of(node)["addone"]["reason"]
