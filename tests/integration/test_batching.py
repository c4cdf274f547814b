"""Dynamic batching: concurrent requests to a model with a 20 ms queue delay merge into
fewer executions, and every request still gets exactly its own rows back."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import numpy.typing as npt
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from tests.support.metrics import sample
from tests.support.node import RunningNode
from tests.support.repositories import BATCHING_MAX_BATCH

REQUESTS = 64
LABELS = {"model": "batching", "version": "1"}


def rows(request: int) -> npt.NDArray[np.float32]:
    """Distinct rows per request; every third request carries two rows."""
    count = 2 if request % 3 == 0 else 1
    start = request * 100.0
    return (start + np.arange(count * 4, dtype=np.float32) * 0.25).reshape(count, 4)


async def infer(client: aioclient.InferenceServerClient, request: int) -> npt.NDArray[Any]:
    data = rows(request)
    infer_input = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
    infer_input.set_data_from_numpy(data)
    result = await client.infer("batching", [infer_input], request_id=str(request))
    assert result.get_response().id == str(request)
    output: npt.NDArray[Any] | None = result.as_numpy("OUTPUT0")
    assert output is not None
    return output


async def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(
    main_node: RunningNode, client: grpcclient.InferenceServerClient
) -> None:
    async with aioclient.InferenceServerClient(main_node.grpc_url) as aio:
        outputs = await asyncio.gather(*(infer(aio, request) for request in range(REQUESTS)))

    for request, output in enumerate(outputs):
        np.testing.assert_array_equal(output, rows(request) + 0.5, strict=True)

    items = sum(len(rows(request)) for request in range(REQUESTS))
    (stats,) = client.get_inference_statistics("batching").model_stats
    assert stats.inference_stats.success.count == REQUESTS
    assert stats.inference_count == items
    assert 0 < stats.execution_count < REQUESTS
    sizes = {batch.batch_size: batch.compute_infer.count for batch in stats.batch_stats}
    assert max(sizes) > 2
    assert max(sizes) <= BATCHING_MAX_BATCH
    assert sum(sizes.values()) == stats.execution_count
    assert sum(size * count for size, count in sizes.items()) == items

    metrics = main_node.metrics()
    executions = sample(metrics, "kapi_node_batch_size_count", **LABELS)
    assert executions == stats.execution_count
    assert sample(metrics, "kapi_node_batch_size_sum", **LABELS) == items
    assert sample(metrics, "kapi_node_batch_size_bucket", le="2.0", **LABELS) < executions


async def infer_bytes(
    client: aioclient.InferenceServerClient, values: list[bytes]
) -> grpcclient.InferResult:
    data = np.array([values], dtype=np.object_)
    infer_input = grpcclient.InferInput("INPUT0", [1, 4], "BYTES")
    infer_input.set_data_from_numpy(data)
    return await client.infer("batching_bytes", [infer_input])


async def test_a_bad_request_fails_alone_not_the_batch_it_would_join(
    main_node: RunningNode, client: grpcclient.InferenceServerClient
) -> None:
    """Bytes that are not UTF-8 cannot enter an ONNX string tensor; the good requests sent
    with them are batched together and succeed."""
    good = [[f"r{n}c{c}".encode() for c in range(4)] for n in range(6)]
    async with aioclient.InferenceServerClient(main_node.grpc_url) as aio:
        outcomes = await asyncio.gather(
            infer_bytes(aio, [b"ok", b"\xff", b"ok", b"ok"]),
            *(infer_bytes(aio, values) for values in good),
            return_exceptions=True,
        )

    bad, *answers = outcomes
    assert isinstance(bad, InferenceServerException)
    assert bad.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'INPUT0'" in bad.message()
    for values, answer in zip(good, answers, strict=True):
        assert isinstance(answer, grpcclient.InferResult), answer
        np.testing.assert_array_equal(answer.as_numpy("OUTPUT0"), np.array([values], object))
    (stats,) = client.get_inference_statistics("batching_bytes").model_stats
    assert stats.inference_stats.success.count == len(good)
    assert stats.execution_count < len(good)


async def transpose(aio: aioclient.InferenceServerClient, model: str, value: float) -> Any:
    data = value + np.arange(3, dtype=np.float32).reshape(1, 3)
    infer_input = grpcclient.InferInput("INPUT0", [1, 3], "FP32")
    infer_input.set_data_from_numpy(data)
    result = await aio.infer(model, [infer_input])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data.T, strict=True)


async def test_a_model_whose_outputs_lose_the_batch_is_not_batched(
    main_node: RunningNode, client: grpcclient.InferenceServerClient
) -> None:
    """Transpose looks batchable (every dimension dynamic): a probe at load sees its output
    lose the batch, so auto-complete leaves it unbatched and concurrent requests, which
    alone succeed, never fail by being merged."""
    async with aioclient.InferenceServerClient(main_node.grpc_url) as aio:
        await asyncio.gather(*(transpose(aio, "transpose", float(i)) for i in range(16)))

    config = client.get_model_config("transpose").config
    assert config.max_batch_size == 0
    assert not config.HasField("dynamic_batching")


async def test_a_config_that_batches_such_a_model_runs_its_requests_one_at_a_time(
    main_node: RunningNode, client: grpcclient.InferenceServerClient
) -> None:
    async with aioclient.InferenceServerClient(main_node.grpc_url) as aio:
        await asyncio.gather(*(transpose(aio, "transpose_batched", float(i)) for i in range(16)))

    (stats,) = client.get_inference_statistics("transpose_batched").model_stats
    assert stats.inference_stats.success.count == 16
    assert stats.execution_count == 16
    assert "'transpose_batched': its outputs do not keep the batch dimension" in main_node.log()


def test_a_batch_past_the_largest_preferred_size_runs_without_waiting_out_the_delay(
    client: grpcclient.InferenceServerClient,
) -> None:
    """preferred_batch_size [2, 6] and a one-minute delay: a batch-7 request runs at once,
    as in Triton (it reaches the largest preferred size); the client's deadline is far
    shorter than the delay."""
    data = np.arange(7 * 4, dtype=np.float32).reshape(7, 4)
    infer_input = grpcclient.InferInput("INPUT0", [7, 4], "FP32")
    infer_input.set_data_from_numpy(data)
    result = client.infer("preferred", [infer_input], client_timeout=20)

    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data + 1.0, strict=True)
    (stats,) = client.get_inference_statistics("preferred").model_stats
    assert [(batch.batch_size, batch.compute_infer.count) for batch in stats.batch_stats] == [
        (7, 1)
    ]
