"""OIP messages to kapi's inference types and back, as tritonclient sends and reads them."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.service_pb2 as triton_pb
from kapi.core._generated.inference import grpc_service_pb2 as pb
from kapi.core.errors import InvalidArgument
from kapi.core.inference import InferenceResponse, RequestLimits
from kapi.core.oip import CONTENTS_FIELD, request_from_proto, response_to_proto
from kapi.core.tensors import Tensor
from ml_dtypes import bfloat16

# tritonclient builds its request with this helper in InferenceServerClient.infer; calling it
# directly gives the exact message tritonclient puts on the wire, without a server.
from tritonclient.grpc._utils import _get_inference_request

# A model that takes many inputs and outputs: the limits do not get in these tests' way.
LIMITS = RequestLimits(inputs=64, outputs=64)


def _request(**tensors: tuple[str, list[int]]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="digits")
    for name, (datatype, shape) in tensors.items():
        request.inputs.add(name=name, datatype=datatype, shape=shape)
    return request


def test_raw_inputs_decode_in_order() -> None:
    request = _request(image=("FP32", [1, 2]), label=("BYTES", [2]))
    request.model_version, request.id = "3", "r-7"
    request.outputs.add(name="probs")
    request.outputs.add(name="classes")
    request.raw_input_contents.extend(
        [np.array([0.5, -1.0], dtype=np.float32).tobytes(), b"\x01\x00\x00\x00a\x00\x00\x00\x00"]
    )
    decoded = request_from_proto(request, LIMITS)
    assert (decoded.model_name, decoded.model_version, decoded.id) == ("digits", "3", "r-7")
    assert [output.name for output in decoded.outputs] == ["probs", "classes"]
    image, label = (tensor.decode() for tensor in decoded.inputs)
    assert (image.name, image.datatype, image.shape) == ("image", "FP32", (1, 2))
    np.testing.assert_array_equal(image.data, [[0.5, -1.0]])
    assert label.data.tolist() == [b"a", b""]


TYPED = {
    "BOOL": [True, False],
    "INT8": [-128, 127],
    "INT16": [-(2**15), 2**15 - 1],
    "INT32": [-(2**31), 2**31 - 1],
    "INT64": [-(2**63), 2**63 - 1],
    "UINT8": [0, 255],
    "UINT16": [0, 2**16 - 1],
    "UINT32": [0, 2**32 - 1],
    "UINT64": [0, 2**64 - 1],
    "FP32": [1.5, -np.inf],
    "FP64": [1e300, -0.25],
    "BYTES": [b"\x00hi", b""],
}


def test_every_typed_field_is_tested() -> None:
    assert set(TYPED) == set(CONTENTS_FIELD)


@pytest.mark.parametrize("datatype", sorted(TYPED))
def test_typed_contents_decode(datatype: str) -> None:
    request = _request(x=(datatype, [2, 1]))
    getattr(request.inputs[0].contents, CONTENTS_FIELD[datatype]).extend(TYPED[datatype])
    (encoded,) = request_from_proto(request, LIMITS).inputs
    tensor = encoded.decode()
    assert tensor.shape == (2, 1)
    assert tensor.data.reshape(-1).tolist() == TYPED[datatype]


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_half_precision_typed_contents_are_rejected(datatype: str) -> None:
    request = _request(half=(datatype, [1]))
    request.inputs[0].contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidArgument, match=f"input 'half': datatype '{datatype}' must be sent"):
        request_from_proto(request, LIMITS)


def test_typed_contents_with_a_wrong_count() -> None:
    request = _request(x=("INT32", [3]))
    request.inputs[0].contents.int_contents.extend([1, 2])
    with pytest.raises(InvalidArgument, match="input 'x': 2 elements in contents, expected 3"):
        request_from_proto(request, LIMITS).inputs[0].decode()


def test_typed_contents_that_overflow_the_datatype() -> None:
    request = _request(x=("INT8", [1]))
    request.inputs[0].contents.int_contents.append(1000)
    with pytest.raises(InvalidArgument, match="input 'x': contents do not fit INT8"):
        request_from_proto(request, LIMITS).inputs[0].decode()


@pytest.mark.parametrize(("raw_count", "input_count"), [(1, 2), (3, 2)])
def test_raw_count_must_match_the_inputs(raw_count: int, input_count: int) -> None:
    request = _request(**{f"in{index}": ("UINT8", [1]) for index in range(input_count)})
    request.raw_input_contents.extend([b"\x00"] * raw_count)
    with pytest.raises(
        InvalidArgument,
        match=f"{raw_count} raw_input_contents for the {input_count} inputs that take one",
    ):
        request_from_proto(request, LIMITS)


def test_raw_and_typed_contents_together_are_rejected() -> None:
    request = _request(x=("INT32", [1]))
    request.inputs[0].contents.int_contents.append(1)
    request.raw_input_contents.append(b"\x01\x00\x00\x00")
    with pytest.raises(InvalidArgument, match="contents field must not be specified when using"):
        request_from_proto(request, LIMITS)


def test_a_negative_dimension_is_rejected() -> None:
    request = _request(x=("FP32", [-1, 2]))
    request.raw_input_contents.append(b"")
    with pytest.raises(InvalidArgument, match=r"input 'x': shape \[-1, 2\] has a negative"):
        request_from_proto(request, LIMITS)


def test_raw_contents_of_the_wrong_size_name_the_input() -> None:
    request = _request(x=("FP32", [2]))
    request.raw_input_contents.append(b"\x00" * 7)
    with pytest.raises(InvalidArgument, match="input 'x': 7 bytes of raw contents, expected 8"):
        request_from_proto(request, LIMITS).inputs[0].decode()


def test_parameters_decode_to_python_values() -> None:
    request = _request()
    request.parameters["flag"].bool_param = True
    request.parameters["timeout"].int64_param = -(2**40)
    request.parameters["sequence_id"].string_param = "s-1"
    request.parameters["temperature"].double_param = 0.75
    request.parameters["priority"].uint64_param = 2**64 - 1
    request.parameters["unset"].SetInParent()
    assert request_from_proto(request, LIMITS).parameters == {
        "flag": True,
        "timeout": -(2**40),
        "sequence_id": "s-1",
        "temperature": 0.75,
        "priority": 2**64 - 1,
    }


def test_response_is_always_raw() -> None:
    outputs = [
        Tensor("probs", "FP32", (1, 2), np.array([[0.25, 0.75]], dtype=np.float32)),
        Tensor("names", "BYTES", (2,), np.array([b"cat", "d\u00f6g"], dtype=np.object_)),
    ]
    message = response_to_proto(InferenceResponse("digits", "3", "r-1", outputs))
    assert (message.model_name, message.model_version, message.id) == ("digits", "3", "r-1")
    assert [(o.name, o.datatype, list(o.shape)) for o in message.outputs] == [
        ("probs", "FP32", [1, 2]),
        ("names", "BYTES", [2]),
    ]
    assert not any(output.HasField("contents") for output in message.outputs)
    assert list(message.raw_output_contents) == [
        np.array([0.25, 0.75], dtype=np.float32).tobytes(),
        b"\x03\x00\x00\x00cat\x04\x00\x00\x00d\xc3\xb6g",
    ]


# --- against tritonclient ------------------------------------------------------------------


def _interop_arrays() -> dict[str, npt.NDArray[Any]]:
    arrays: dict[str, npt.NDArray[Any]] = {
        "BOOL": np.array([[True, False, True]]),
        "UINT8": np.array([[0, 7, 255]], dtype=np.uint8),
        "UINT16": np.array([[0, 7, 65535]], dtype=np.uint16),
        "UINT32": np.array([[0, 7, 2**32 - 1]], dtype=np.uint32),
        "UINT64": np.array([[0, 7, 2**64 - 1]], dtype=np.uint64),
        "INT8": np.array([[-128, 0, 127]], dtype=np.int8),
        "INT16": np.array([[-(2**15), 0, 7]], dtype=np.int16),
        "INT32": np.array([[-(2**31), 0, 7]], dtype=np.int32),
        "INT64": np.array([[-(2**63), 0, 2**63 - 1]], dtype=np.int64),
        "FP16": np.array([[0.5, -2.0, 65504.0]], dtype=np.float16),
        "FP32": np.array([[0.5, -2.0, 3.4e38]], dtype=np.float32),
        "FP64": np.array([[0.5, -2.0, 1e308]], dtype=np.float64),
        "BYTES": np.array([[b"a", b"", "\u00e9".encode()]], dtype=np.object_),
        "BF16": np.array([[0.5, -2.0, 1.0]], dtype=bfloat16),
    }
    return arrays


INTEROP = _interop_arrays()


def test_tritonclient_request_decodes_in_kapi() -> None:
    inputs = []
    for datatype, array in INTEROP.items():
        infer_input = triton.InferInput(f"in_{datatype}", list(array.shape), datatype)
        inputs.append(infer_input.set_data_from_numpy(array))
    outputs = [triton.InferRequestedOutput("out")]
    sent = _get_inference_request(
        model_name="digits",
        inputs=inputs,
        model_version="2",
        request_id="r-9",
        outputs=outputs,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=3,
        timeout=None,
        parameters={"custom": "value"},
    )
    decoded = request_from_proto(pb.ModelInferRequest.FromString(sent.SerializeToString()), LIMITS)
    assert (decoded.model_name, decoded.model_version, decoded.id) == ("digits", "2", "r-9")
    assert [output.name for output in decoded.outputs] == ["out"]
    assert decoded.parameters == {"priority": 3, "custom": "value"}
    assert [tensor.datatype for tensor in decoded.inputs] == list(INTEROP)
    tensors = [encoded.decode() for encoded in decoded.inputs]
    for tensor, expected in zip(tensors, INTEROP.values(), strict=True):
        assert tensor.data.dtype == expected.dtype
        np.testing.assert_array_equal(tensor.data, expected)


def test_kapi_response_decodes_in_tritonclient() -> None:
    outputs = [
        Tensor(f"out_{datatype}", datatype, array.shape, array)
        for datatype, array in INTEROP.items()
    ]
    message = response_to_proto(InferenceResponse("digits", "2", "r-9", outputs))
    result = triton.InferResult(
        triton_pb.ModelInferResponse.FromString(message.SerializeToString())
    )
    for datatype, expected in INTEROP.items():
        received = result.as_numpy(f"out_{datatype}")
        assert received is not None, datatype
        assert received.shape == expected.shape, datatype
        assert received.tolist() == expected.tolist(), datatype


@pytest.mark.parametrize(
    ("inputs", "outputs", "words"),
    [(3, 0, "3 inputs in the request, more than 2"), (0, 5, "5 outputs requested, more than 4")],
)
def test_more_inputs_or_outputs_than_the_model_takes_are_refused_unconverted(
    inputs: int, outputs: int, words: str
) -> None:
    request = pb.ModelInferRequest(model_name="digits")
    for index in range(inputs):
        request.inputs.add(name=f"x{index}", datatype="FP32", shape=[-1])  # never checked
    for _ in range(outputs):
        request.outputs.add(name="y")
    with pytest.raises(InvalidArgument, match=words):
        request_from_proto(request, RequestLimits(inputs=2, outputs=4))


@pytest.mark.parametrize("where", ["request", "input", "output"])
def test_a_parameter_map_larger_than_kapi_takes_is_refused(where: str) -> None:
    request = _request(x=("FP32", [1]))
    request.raw_input_contents.append(bytes(4))
    holder = {
        "request": request,
        "input": request.inputs[0],
        "output": request.outputs.add(name="y"),
    }[where]
    for index in range(9):
        holder.parameters[f"p{index}"].bool_param = True
    with pytest.raises(InvalidArgument, match="carries 9 parameters; kapi takes at most 8"):
        request_from_proto(request, LIMITS)
