"""What one request can cost the node. A malformed or huge payload is refused before it is
decoded, or decoded off the event loop, so the node answers its health probes throughout:
a liveness probe that times out is a pod Kubernetes restarts."""

from __future__ import annotations

import contextlib
import gzip
import threading
from collections.abc import Iterator

import grpc
import httpx
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.support.clients import expect_rpc_error
from tests.support.node import RunningNode

# Kubernetes' default probe timeout is 1 s; twice that keeps a busy CI machine from
# failing a probe the node answered, while a node frozen by a request fails many.
PROBE_TIMEOUT_S = 2.0
# 10 M empty BYTES elements: 38 MiB of length prefixes for a tensor of 4 elements.
MALFORMED_ELEMENTS = 10_000_000


@contextlib.contextmanager
def probing(node: RunningNode) -> Iterator[list[str]]:
    """Probe /v2/health/live as a kubelet would, until the block ends; yields the failures."""
    failures: list[str] = []
    answered = threading.Event()
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(timeout=PROBE_TIMEOUT_S) as http:
            while not done.is_set():
                try:
                    http.get(f"{node.http_url}/v2/health/live").raise_for_status()
                    answered.set()
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                done.wait(0.05)

    thread = threading.Thread(target=probe)
    thread.start()
    try:
        assert answered.wait(30), "the probe never got an answer"
        yield failures
    finally:
        done.set()
        thread.join()


def malformed_bytes_request(model: str) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 4])
    request.raw_input_contents.append(bytes(4 * MALFORMED_ELEMENTS))
    return request


def test_a_malformed_bytes_request_is_refused_without_freezing_the_node(
    main_node: RunningNode, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    with probing(main_node) as failures:
        for _ in range(3):
            expect_rpc_error(
                lambda: stub.ModelInfer(malformed_bytes_request("identity_bytes"), timeout=60),
                grpc.StatusCode.INVALID_ARGUMENT,
                "'INPUT0'",
                "go on past the 4 elements its shape has",
            )
    assert failures == []


def test_a_payload_for_an_unknown_model_is_not_decoded(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    """The model is looked up first: NOT_FOUND, not a complaint about the payload."""
    expect_rpc_error(
        lambda: stub.ModelInfer(malformed_bytes_request("no_such_model"), timeout=60),
        grpc.StatusCode.NOT_FOUND,
        "no_such_model",
    )


def test_typed_contents_of_the_wrong_count_are_refused(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    request = service_pb2.ModelInferRequest(model_name="identity_wide")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 3])
    tensor.contents.fp32_contents.extend(np.zeros(2_000_000, dtype=np.float32).tolist())

    expect_rpc_error(
        lambda: stub.ModelInfer(request, timeout=60),
        grpc.StatusCode.INVALID_ARGUMENT,
        "'INPUT0'",
        "2000000 elements in contents, expected 3",
    )


def test_large_typed_contents_decode_while_the_node_answers_probes(
    main_node: RunningNode, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    width = 2_000_000  # 8 MB of fp32_contents, converted value by value
    values = np.arange(width, dtype=np.float32)
    request = service_pb2.ModelInferRequest(model_name="identity_wide")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, width])
    tensor.contents.fp32_contents.extend(values.tolist())

    with probing(main_node) as failures:
        responses = [stub.ModelInfer(request, timeout=60) for _ in range(3)]

    assert failures == []
    for response in responses:
        output = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
        np.testing.assert_array_equal(output, values)


def test_a_request_over_the_default_message_limit_is_resource_exhausted(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    """The default limit is 64 MiB: a user's choice that holds a batch of 64 images."""
    request = service_pb2.ModelInferRequest(model_name="identity_wide")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 17 * 2**20])
    request.raw_input_contents.append(bytes(4 * 17 * 2**20))

    expect_rpc_error(
        lambda: stub.ModelInfer(request, timeout=60), grpc.StatusCode.RESOURCE_EXHAUSTED
    )


def many_inputs_request(model: str, count: int) -> service_pb2.ModelInferRequest:
    """`count` empty input headers: a few bytes each, so millions fit in one message."""
    request = service_pb2.ModelInferRequest(model_name=model)
    for index in range(count):
        request.inputs.add(name=f"i{index}")
    return request


@pytest.mark.parametrize(
    ("model", "code", "words"),
    [
        ("no_such_model", grpc.StatusCode.NOT_FOUND, "no_such_model"),
        ("identity_wide", grpc.StatusCode.INVALID_ARGUMENT, "far more than the model takes"),
    ],
)
def test_a_request_of_millions_of_headers_is_refused_before_they_are_read(
    main_node: RunningNode,
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
    model: str,
    code: grpc.StatusCode,
    words: str,
) -> None:
    """The model is looked up, and the request's counts checked against it, before its input
    headers and parameters are converted one by one (2 M of them took 10 s to convert)."""
    request = many_inputs_request(model, 2_000_000)
    with probing(main_node) as failures:
        expect_rpc_error(lambda: stub.ModelInfer(request, timeout=60), code, words)
    assert failures == []


def test_a_large_bytes_response_encodes_while_the_node_answers_probes(
    main_node: RunningNode, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    """4 M short BYTES elements in, the same out: decoded and encoded off the event loop."""
    count = 4_000_000
    request = service_pb2.ModelInferRequest(model_name="identity_bytes_wide")
    request.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, count])
    request.raw_input_contents.append(b"\x01\x00\x00\x00z" * count)

    with probing(main_node) as failures:
        response = stub.ModelInfer(request, timeout=120)

    assert failures == []
    assert list(response.outputs[0].shape) == [1, count]
    assert response.raw_output_contents[0] == request.raw_input_contents[0]


def test_a_rest_body_over_the_message_limit_is_413(main_node: RunningNode) -> None:
    """The REST API holds bodies to the same limit as gRPC messages (64 MiB by default),
    before reading them when the length is declared, and once decompressed."""
    url = main_node.http_url + "/v2/models/identity_wide/infer"
    big = httpx.post(url, content=bytes(65 * 2**20), timeout=60)
    assert big.status_code == 413
    assert "over the node's limit of 67108864 bytes" in big.json()["error"]

    bomb = gzip.compress(bytes(80 * 2**20))  # 80 KiB that inflate to 80 MiB
    inflated = httpx.post(url, content=bomb, headers={"Content-Encoding": "gzip"}, timeout=60)
    assert inflated.status_code == 413
    assert "decompressed" in inflated.json()["error"]
    assert main_node.is_ready()


def test_every_rest_body_is_held_to_the_message_limit(main_node: RunningNode) -> None:
    """Not only inference: the index and shared-memory endpoints take bodies too, and any
    client may call them."""
    for path in ("/v2/repository/index", "/v2/systemsharedmemory/region/r/register"):
        response = httpx.post(main_node.http_url + path, content=bytes(65 * 2**20), timeout=60)
        assert response.status_code == 413, path
        assert "over the node's limit" in response.json()["error"]
