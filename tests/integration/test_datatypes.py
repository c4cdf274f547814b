"""Every OIP datatype round-trips through an ONNX Identity model, sent raw and as typed
contents; responses always come back raw."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from ml_dtypes import bfloat16
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor

from tests.support.clients import expect_error, expect_rpc_error
from tests.support.models import DATATYPES
from tests.support.node import RunningNode

# The InferTensorContents field that carries each datatype; FP16 has none (raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def sample(datatype: str) -> npt.NDArray[Any]:
    """A 2x4 batch holding each datatype's extremes, so a lossy round trip shows."""
    dtype = np.dtype(DATATYPES[datatype][1])
    if datatype == "BOOL":
        return np.array([[True, False, False, True], [False, True, True, False]])
    if datatype == "BYTES":
        values = [b"", b"kapi\x00nul", "\u00fcn\u00efc\u00f6d\u00e9".encode(), b"a" * 300]
        return np.array([values, values[::-1]], dtype=np.object_)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.array([[info.min, info.max, 0, 1], [2, info.max - 1, 42, info.min + 1]], dtype)
    finfo = np.finfo(dtype)
    return np.array(
        [[finfo.min, finfo.max, -0.0, 1.5], [np.inf, -np.inf, np.nan, finfo.tiny]], dtype
    )


def decode_output(response: service_pb2.ModelInferResponse, datatype: str) -> npt.NDArray[Any]:
    (output,) = response.outputs
    assert output.name == "OUTPUT0"
    assert output.datatype == datatype
    assert len(response.raw_output_contents) == 1, "outputs must come back raw"
    raw = response.raw_output_contents[0]
    array: npt.NDArray[Any]
    if datatype == "BYTES":
        array = deserialize_bytes_tensor(raw)
    else:
        array = np.frombuffer(raw, dtype=DATATYPES[datatype][1])
    return array.reshape(tuple(output.shape))


def typed_request(datatype: str, data: npt.NDArray[Any]) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=f"identity_{datatype.lower()}", id="typed")
    tensor = request.inputs.add(name="INPUT0", datatype=datatype, shape=data.shape)
    getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(data.reshape(-1).tolist())
    return request


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_raw_round_trip(client: grpcclient.InferenceServerClient, datatype: str) -> None:
    data = sample(datatype)
    infer_input = grpcclient.InferInput("INPUT0", list(data.shape), datatype)
    infer_input.set_data_from_numpy(data)

    result = client.infer(f"identity_{datatype.lower()}", [infer_input])

    output = result.as_numpy("OUTPUT0")
    assert output is not None
    assert result.get_output("OUTPUT0").datatype == datatype
    assert output.dtype == data.dtype
    np.testing.assert_array_equal(output, data, strict=True)


@pytest.mark.parametrize("datatype", sorted(CONTENTS_FIELD))
def test_typed_contents_round_trip(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, datatype: str
) -> None:
    data = sample(datatype)

    response = stub.ModelInfer(typed_request(datatype, data))

    assert response.id == "typed"
    assert response.model_name == f"identity_{datatype.lower()}"
    output = decode_output(response, datatype)
    np.testing.assert_array_equal(output, data.astype(output.dtype), strict=True)


def test_typed_contents_for_fp16_are_refused(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    """FP16 has no typed-contents field in the protocol: it must travel raw."""
    request = typed_request("FP32", sample("FP16").astype(np.float32))
    request.model_name = "identity_fp16"
    request.inputs[0].datatype = "FP16"

    expect_rpc_error(lambda: stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT, "'INPUT0'")


def test_bytes_that_are_not_utf8_are_refused_by_an_onnx_string_model(
    client: grpcclient.InferenceServerClient,
) -> None:
    """ONNX Runtime's string tensors take text: other bytes are the caller's error."""
    data = np.array([[b"ok", b"\xff\xfe", b"ok", b"ok"]], dtype=np.object_)
    infer_input = grpcclient.InferInput("INPUT0", [1, 4], "BYTES")
    infer_input.set_data_from_numpy(data)

    expect_error(
        lambda: client.infer("identity_bytes", [infer_input]),
        "StatusCode.INVALID_ARGUMENT",
        "'INPUT0'",
        "UTF-8",
    )


def test_bf16_round_trips_through_onnx_runtime(client: grpcclient.InferenceServerClient) -> None:
    """BF16 has no numpy dtype of its own: tritonclient and kapi both use ml_dtypes'."""
    data = np.array([[1.5, -2.0, 3.25, 0.0], [np.inf, -np.inf, 65536.0, 2.0**-126]], dtype=bfloat16)
    infer_input = grpcclient.InferInput("INPUT0", list(data.shape), "BF16")
    infer_input.set_data_from_numpy(data)

    result = client.infer("identity_bf16", [infer_input])

    output = result.as_numpy("OUTPUT0")
    assert result.get_output("OUTPUT0").datatype == "BF16"
    assert output is not None
    assert output.dtype == bfloat16
    np.testing.assert_array_equal(output.view(np.uint16), data.view(np.uint16), strict=True)
    assert client.get_model_metadata("identity_bf16").inputs[0].datatype == "BF16"


async def test_bf16_requests_batched_together_each_get_their_own_rows(
    main_node: RunningNode,
) -> None:
    """identity_bf16 has no config: auto-complete gives it dynamic batching, so concurrent
    requests merge (a BF16 concatenation) and split back."""
    rows = [np.full((1, 4), 2.0**n, dtype=bfloat16) for n in range(-8, 8)]

    async def send(aio: aioclient.InferenceServerClient, data: npt.NDArray[Any]) -> Any:
        infer_input = grpcclient.InferInput("INPUT0", list(data.shape), "BF16")
        infer_input.set_data_from_numpy(data)
        return (await aio.infer("identity_bf16", [infer_input])).as_numpy("OUTPUT0")

    async with aioclient.InferenceServerClient(main_node.grpc_url) as aio:
        outputs = await asyncio.gather(*(send(aio, data) for data in rows))

    for data, output in zip(rows, outputs, strict=True):
        np.testing.assert_array_equal(output.view(np.uint16), data.view(np.uint16), strict=True)
