"""Conversion between OIP protobuf messages and kapi's transport-free inference types."""

from __future__ import annotations

from typing import Any

from google.protobuf.message import DecodeError, Message

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

# kapi's own entries in ServerMetadata's extensions: a node's hardware profiles, best first
# ("kapi-profile:nvidia-sm90"), and its REST port ("kapi-http-port:8000"). A gateway learns
# them over the protocol itself.
PROFILE_EXTENSION = "kapi-profile:"
HTTP_PORT_EXTENSION = "kapi-http-port:"

SHARED_MEMORY_REGION = "shared_memory_region"
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
    raw = list(message.raw_input_contents)
    # As Triton reads them: raw entries go, in order, to the inputs that have neither typed
    # contents nor shared memory.
    taking = [
        not tensor.HasField("contents") and SHARED_MEMORY_REGION not in tensor.parameters
        for tensor in message.inputs
    ]
    for tensor in message.inputs:
        if raw and tensor.HasField("contents"):  # Triton's words
            raise InvalidArgument(
                f"contents field must not be specified when using raw_input_contents for "
                f"'{tensor.name}' for model '{message.model_name}'"
            )
    if raw and len(raw) != sum(taking):
        raise InvalidArgument(
            f"{len(raw)} raw_input_contents for the {sum(taking)} inputs that take one (those "
            "without typed contents or shared memory): send one raw entry per input, in order"
        )
    entries = iter(raw)
    inputs = [
        _input_from_proto(tensor, next(entries) if raw and takes else None, limits.parameters)
        for tensor, takes in zip(message.inputs, taking, strict=True)
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
    """Every output with its raw entry; one written to shared memory has an empty entry, as
    Triton answers it."""
    message = pb.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id
    )
    for tensor in response.outputs:
        message.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        in_shm = tensor.name in response.shared_memory
        message.raw_output_contents.append(b"" if in_shm else to_raw(tensor))
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
    tensor: pb.ModelInferRequest.InferInputTensor,
    raw: bytes | None,
    parameter_limit: int,
) -> EncodedTensor:
    shape = check_shape(tensor.name, list(tensor.shape))
    parameters = parameters_from_proto(tensor.parameters, parameter_limit, f"input '{tensor.name}'")
    if raw is not None:
        return EncodedTensor(tensor.name, tensor.datatype, shape, raw, parameters=parameters)
    if SHARED_MEMORY_REGION in parameters:  # its data is found in the region, later
        if tensor.HasField("contents"):
            raise InvalidArgument(
                f"unexpected 'content' provided when using shared memory for input tensor "
                f"'{tensor.name}'"
            )
        return EncodedTensor(tensor.name, tensor.datatype, shape, None, parameters=parameters)
    field_name = CONTENTS_FIELD.get(tensor.datatype)
    if field_name is None and tensor.datatype in DATATYPES:
        raise InvalidArgument(
            f"input '{tensor.name}': datatype '{tensor.datatype}' must be sent as raw contents"
        )
    # The repeated field itself, not a copy: it is counted now and converted only if valid.
    values = getattr(tensor.contents, field_name) if field_name else ()
    return EncodedTensor(tensor.name, tensor.datatype, shape, None, values, parameters)


def parse(message_type: type[Message], data: bytes) -> Any:
    """A message from its bytes; INVALID_ARGUMENT with the reason when they do not parse."""
    try:
        return message_type.FromString(data)
    except DecodeError as exc:
        raise InvalidArgument(
            f"the {message_type.DESCRIPTOR.name} message could not be parsed: {exc}"
        ) from exc
