"""The config's reshape on inputs and outputs, and scalar model tensors: clients send and
get the config's dims, the model takes and gives its own shape, as in Triton."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import tritonclient.http as httpclient

from tests.integration.test_datatypes import sample
from tests.support.node import RunningNode
from tests.support.repositories import RESHAPE_DATATYPES


def grpc_input(name: str, data: npt.NDArray[Any], datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    return tensor


@pytest.mark.parametrize("datatype", RESHAPE_DATATYPES)
def test_reshaped_inputs_and_outputs_keep_the_clients_shape(
    client: grpcclient.InferenceServerClient, datatype: str
) -> None:
    data = sample(datatype)  # [2, 4]: the config's dims, the model's [2, 2] per row
    result = client.infer(f"reshape_{datatype.lower()}", [grpc_input("INPUT0", data, datatype)])

    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data, strict=True)
    metadata = client.get_model_metadata(f"reshape_{datatype.lower()}")
    assert list(metadata.inputs[0].shape) == [-1, 4]
    config = client.get_model_config(f"reshape_{datatype.lower()}").config
    assert list(config.input[0].reshape.shape) == [2, 2]


async def test_reshaped_requests_batch_together(
    main_node: RunningNode, client: grpcclient.InferenceServerClient
) -> None:
    rows = [np.arange(4, dtype=np.float32).reshape(1, 4) + 10 * n for n in range(8)]
    async with aioclient.InferenceServerClient(main_node.grpc_url) as aio:
        results = await asyncio.gather(
            *(aio.infer("reshape_fp32", [grpc_input("INPUT0", row, "FP32")]) for row in rows)
        )

    for row, result in zip(rows, results, strict=True):
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), row, strict=True)
    (stats,) = client.get_inference_statistics("reshape_fp32").model_stats
    assert stats.execution_count < stats.inference_stats.success.count


def test_a_batched_scalar_row_is_declared_one_and_reshaped(
    client: grpcclient.InferenceServerClient,
) -> None:
    """Auto-complete of a model whose rows are scalars: dims [1] with reshape [], as
    Triton's ONNX Runtime backend completes it."""
    data = np.array([[1.5], [2.5], [-3.0]], dtype=np.float32)
    result = client.infer("scalar_batched", [grpc_input("INPUT0", data, "FP32")])

    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data, strict=True)
    config = client.get_model_config("scalar_batched").config
    assert config.max_batch_size > 0
    assert list(config.input[0].dims) == [1]
    assert config.input[0].HasField("reshape")
    assert list(config.input[0].reshape.shape) == []


@pytest.mark.parametrize("model", ["scalar", "scalar_auto"])
def test_a_scalar_model_declared_one_without_batching(
    client: grpcclient.InferenceServerClient, model: str
) -> None:
    data = np.array([42], dtype=np.int32)
    result = client.infer(model, [grpc_input("INPUT0", data, "INT32")])

    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data, strict=True)
    config = client.get_model_config(model).config
    assert (config.max_batch_size, list(config.input[0].dims)) == (0, [1])


def test_a_scalar_reshape_over_rest(main_node: RunningNode) -> None:
    url = main_node.http_url.removeprefix("http://")
    data = np.array([0.25], dtype=np.float32)
    with httpclient.InferenceServerClient(url) as rest:
        tensor = httpclient.InferInput("INPUT0", [1], "FP32")
        tensor.set_data_from_numpy(data, binary_data=False)
        output = httpclient.InferRequestedOutput("OUTPUT0", binary_data=False)
        result = rest.infer("scalar_reshape", [tensor], outputs=[output])

    assert result.get_response()["outputs"][0]["shape"] == [1]
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data, strict=True)
