"""Conversion between OIP protobuf messages and kapi's transport-free inference types."""

from __future__ import annotations

from typing import Any

from kapi.core._generated.inference import grpc_service_pb2 as pb
from kapi.core.errors import InvalidArgument
from kapi.core.inference import (
    EncodedTensor,
    InferenceRequest,
    InferenceResponse,
    Parameter,
    RequestedOutput,
    RequestLimits,
    check_counts,
)
from kapi.core.tensors import DATATYPES, check_shape, to_raw

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


def request_from_proto(message: pb.ModelInferRequest, limits: RequestLimits) -> InferenceRequest:
    """The request with its inputs still encoded: headers are checked here, within the
    model's `limits`, and contents are decoded only once the model has checked them."""
    check_counts(message.model_name, len(message.inputs), len(message.outputs), limits)
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise InvalidArgument(
            f"{len(raw)} raw_input_contents for {len(message.inputs)} inputs: "
            "send one raw entry per input, in order"
        )
    inputs = [
        _input_from_proto(tensor, raw[index] if raw else None, limits.parameters)
        for index, tensor in enumerate(message.inputs)
    ]
    outputs = [
        RequestedOutput(
            output.name,
            parameters_from_proto(output.parameters, limits.parameters, f"output '{output.name}'"),
        )
        for output in message.outputs
    ]
    return InferenceRequest(
        model_name=message.model_name,
        model_version=message.model_version,
        id=message.id,
        inputs=inputs,
        outputs=outputs,
        parameters=parameters_from_proto(message.parameters, limits.parameters, "the request"),
    )


def response_to_proto(response: InferenceResponse) -> pb.ModelInferResponse:
    message = pb.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id
    )
    for tensor in response.outputs:
        message.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        message.raw_output_contents.append(to_raw(tensor))
    return message


def parameters_from_proto(parameters: Any, limit: int, where: str) -> dict[str, Parameter]:
    """An InferParameter map as plain Python values; more than `limit` entries are refused
    before any is converted."""
    if len(parameters) > limit:
        raise InvalidArgument(
            f"{where} carries {len(parameters)} parameters; kapi takes at most {limit}"
        )
    decoded: dict[str, Parameter] = {}
    for key, value in parameters.items():
        choice = value.WhichOneof("parameter_choice")
        if choice is not None:
            decoded[key] = getattr(value, choice)
    return decoded


def _input_from_proto(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, parameter_limit: int
) -> EncodedTensor:
    shape = check_shape(tensor.name, list(tensor.shape))
    parameters = parameters_from_proto(tensor.parameters, parameter_limit, f"input '{tensor.name}'")
    if raw is not None:
        if tensor.HasField("contents"):
            raise InvalidArgument(
                f"input '{tensor.name}': both raw and typed contents given; send one"
            )
        return EncodedTensor(tensor.name, tensor.datatype, shape, raw, parameters=parameters)
    field_name = CONTENTS_FIELD.get(tensor.datatype)
    if field_name is None and tensor.datatype in DATATYPES:
        raise InvalidArgument(
            f"input '{tensor.name}': datatype '{tensor.datatype}' must be sent as raw contents"
        )
    # The repeated field itself, not a copy: it is counted now and converted only if valid.
    values = getattr(tensor.contents, field_name) if field_name else ()
    return EncodedTensor(tensor.name, tensor.datatype, shape, None, values, parameters)
