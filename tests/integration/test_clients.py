"""tritonclient's three ways to talk gRPC, against a real node: sync (blocking and with a
callback), asyncio, and the bidirectional stream, including an error inside a stream."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.support.node import RunningNode

Outcome = tuple[grpcclient.InferResult | None, InferenceServerException | None]


def simple_inputs(offset: int, batch: int = 1) -> list[grpcclient.InferInput]:
    """INPUT0 = offset + 0..15, INPUT1 = all ones, for the `simple` add/sub model."""
    first = (np.arange(16, dtype=np.int32) + offset).reshape(1, 16).repeat(batch, axis=0)
    second = np.ones((batch, 16), dtype=np.int32)
    inputs = [
        grpcclient.InferInput("INPUT0", [batch, 16], "INT32"),
        grpcclient.InferInput("INPUT1", [batch, 16], "INT32"),
    ]
    inputs[0].set_data_from_numpy(first)
    inputs[1].set_data_from_numpy(second)
    return inputs


def expected_sum(offset: int) -> npt.NDArray[np.int32]:
    return (np.arange(16, dtype=np.int32) + offset + 1).reshape(1, 16)


def check_simple(result: grpcclient.InferResult, offset: int) -> None:
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), expected_sum(offset), strict=True)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), expected_sum(offset) - 2, strict=True)


def test_sync_infer_returns_every_output(client: grpcclient.InferenceServerClient) -> None:
    result = client.infer("simple", simple_inputs(7), request_id="sync-1")

    check_simple(result, 7)
    response = result.get_response()
    assert response.id == "sync-1"
    assert response.model_name == "simple"
    assert response.model_version == "1"


def test_sync_infer_returns_only_requested_outputs(
    client: grpcclient.InferenceServerClient,
) -> None:
    result = client.infer(
        "simple", simple_inputs(3), outputs=[grpcclient.InferRequestedOutput("OUTPUT1")]
    )

    assert [output.name for output in result.get_response().outputs] == ["OUTPUT1"]
    assert result.as_numpy("OUTPUT0") is None
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), expected_sum(3) - 2)


def test_sync_infer_of_a_batch(client: grpcclient.InferenceServerClient) -> None:
    result = client.infer("simple", simple_inputs(0, batch=3))

    output = result.as_numpy("OUTPUT0")
    assert output is not None
    assert output.shape == (3, 16)
    np.testing.assert_array_equal(output, expected_sum(0).repeat(3, axis=0))


def test_async_infer_with_callback(client: grpcclient.InferenceServerClient) -> None:
    outcomes: queue.Queue[Outcome] = queue.Queue()

    for offset in range(5):
        client.async_infer(
            "simple",
            simple_inputs(offset),
            callback=lambda result, error: outcomes.put((result, error)),
            request_id=str(offset),
        )

    seen = set()
    for _ in range(5):
        result, error = outcomes.get(timeout=30)
        assert error is None
        assert result is not None
        offset = int(result.get_response().id)
        check_simple(result, offset)
        seen.add(offset)
    assert seen == set(range(5))


async def test_aio_concurrent_infers(main_node: RunningNode) -> None:
    async with aioclient.InferenceServerClient(main_node.grpc_url) as client:
        assert await client.is_server_ready()
        results = await asyncio.gather(
            *(client.infer("simple", simple_inputs(n), request_id=str(n)) for n in range(20))
        )

    for offset, result in enumerate(results):
        assert result.get_response().id == str(offset)
        check_simple(result, offset)


async def test_aio_metadata_calls(main_node: RunningNode) -> None:
    async with aioclient.InferenceServerClient(main_node.grpc_url) as client:
        assert await client.is_server_live()
        assert await client.is_model_ready("simple")
        metadata = await client.get_model_metadata("simple", as_json=True)
        server = await client.get_server_metadata()

    assert metadata["name"] == "simple"
    assert [tensor["name"] for tensor in metadata["inputs"]] == ["INPUT0", "INPUT1"]
    assert server.name == "kapi"
    assert "model_repository" in server.extensions


def test_stream_answers_every_request(main_node: RunningNode) -> None:
    outcomes: queue.Queue[Outcome] = queue.Queue()
    with grpcclient.InferenceServerClient(main_node.grpc_url) as client:
        client.start_stream(callback=lambda result, error: outcomes.put((result, error)))
        for offset in range(10):
            client.async_stream_infer("simple", simple_inputs(offset), request_id=str(offset))
        client.stop_stream()  # waits for every response

    assert outcomes.qsize() == 10
    seen = set()
    while not outcomes.empty():
        result, error = outcomes.get_nowait()
        assert error is None
        assert result is not None
        offset = int(result.get_response().id)
        check_simple(result, offset)
        seen.add(offset)
    assert seen == set(range(10))


def test_stream_error_arrives_in_callback_and_stream_goes_on(main_node: RunningNode) -> None:
    outcomes: queue.Queue[Outcome] = queue.Queue()
    bad = simple_inputs(0)
    bad[1] = grpcclient.InferInput("NOT_AN_INPUT", [1, 16], "INT32")
    bad[1].set_data_from_numpy(np.zeros((1, 16), dtype=np.int32))
    with grpcclient.InferenceServerClient(main_node.grpc_url) as client:
        client.start_stream(callback=lambda result, error: outcomes.put((result, error)))
        client.async_stream_infer("simple", simple_inputs(1), request_id="before")
        assert outcomes.get(timeout=30)[1] is None
        client.async_stream_infer("simple", bad, request_id="bad")
        _, error = outcomes.get(timeout=30)
        client.async_stream_infer("simple", simple_inputs(2), request_id="after")
        after, after_error = outcomes.get(timeout=30)
        client.stop_stream()

    assert error is not None
    assert "NOT_AN_INPUT" in error.message()
    assert after_error is None
    assert after is not None
    assert after.get_response().id == "after"
    check_simple(after, 2)


async def test_aio_stream_with_an_error_in_the_middle(main_node: RunningNode) -> None:
    async def requests() -> AsyncIterator[dict[str, Any]]:
        for offset in range(6):
            model = "no_such_model" if offset == 3 else "simple"
            yield {"model_name": model, "inputs": simple_inputs(offset), "request_id": str(offset)}

    results: dict[int, grpcclient.InferResult] = {}
    errors: list[InferenceServerException] = []
    async with aioclient.InferenceServerClient(main_node.grpc_url) as client:
        async for result, error in client.stream_infer(requests()):
            if error is not None:
                errors.append(error)
            else:
                results[int(result.get_response().id)] = result

    assert sorted(results) == [0, 1, 2, 4, 5]
    for offset, result in results.items():
        check_simple(result, offset)
    assert len(errors) == 1
    assert "no_such_model" in errors[0].message()


def test_stream_error_response_names_its_request(channel: grpc.Channel) -> None:
    """On the wire (below tritonclient, which drops it) an error in a stream carries the id
    and model of the request that failed."""
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    good = service_pb2.ModelInferRequest(model_name="identity_int8", id="good")
    good.inputs.add(name="INPUT0", datatype="INT8", shape=[1, 4])
    good.raw_input_contents.append(bytes([1, 2, 3, 4]))
    bad = service_pb2.ModelInferRequest()
    bad.CopyFrom(good)
    bad.id = "bad"
    bad.raw_input_contents[0] = bytes([1, 2, 3])

    responses = list(stub.ModelStreamInfer(iter([good, bad]), timeout=30))

    by_id = {response.infer_response.id: response for response in responses}
    assert sorted(by_id) == ["bad", "good"]
    assert by_id["good"].error_message == ""
    assert by_id["good"].infer_response.raw_output_contents == [bytes([1, 2, 3, 4])]
    assert "'INPUT0'" in by_id["bad"].error_message
    assert by_id["bad"].infer_response.model_name == "identity_int8"
