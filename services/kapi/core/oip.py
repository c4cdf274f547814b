"""Conversion between OIP protobuf messages and kapi's transport-free inference types."""

from __future__ import annotations

from typing import Any

from kapi.core._generated.inference import grpc_service_pb2 as pb
from kapi.core.errors import InvalidArgument
from kapi.core.inference import InferenceRequest, InferenceResponse, Parameter
from kapi.core.tensors import Tensor, check_shape, from_raw, from_values, to_raw

# Which InferTensorContents field carries each datatype (FP16 and BF16 travel raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def request_from_proto(message: pb.ModelInferRequest) -> InferenceRequest:
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise InvalidArgument(
            f"{len(raw)} raw_input_contents for {len(message.inputs)} inputs: "
            "send one raw entry per input, in order"
        )
    inputs = [
        _input_from_proto(tensor, raw[index] if raw else None)
        for index, tensor in enumerate(message.inputs)
    ]
    return InferenceRequest(
        model_name=message.model_name,
        model_version=message.model_version,
        id=message.id,
        inputs=inputs,
        requested_outputs=[output.name for output in message.outputs],
        parameters=parameters_from_proto(message.parameters),
    )


def response_to_proto(response: InferenceResponse) -> pb.ModelInferResponse:
    message = pb.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id
    )
    for tensor in response.outputs:
        message.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        message.raw_output_contents.append(to_raw(tensor))
    return message


def parameters_from_proto(parameters: Any) -> dict[str, Parameter]:
    decoded: dict[str, Parameter] = {}
    for key, value in parameters.items():
        choice = value.WhichOneof("parameter_choice")
        if choice is not None:
            decoded[key] = getattr(value, choice)
    return decoded


def _input_from_proto(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> Tensor:
    shape = check_shape(tensor.name, list(tensor.shape))
    if raw is not None:
        if tensor.HasField("contents"):
            raise InvalidArgument(
                f"input '{tensor.name}': both raw and typed contents given; send one"
            )
        return from_raw(tensor.name, tensor.datatype, shape, raw)
    field_name = CONTENTS_FIELD.get(tensor.datatype)
    if field_name is None:
        raise InvalidArgument(
            f"input '{tensor.name}': datatype '{tensor.datatype}' must be sent as raw contents"
        )
    return from_values(
        tensor.name, tensor.datatype, shape, list(getattr(tensor.contents, field_name))
    )
