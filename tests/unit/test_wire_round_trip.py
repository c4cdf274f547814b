"""Messages encoded by one side decode field for field on the other (kapi and tritonclient).

Values are compared by field name after decoding, so a field that kept its name but moved to
another number shows up here as a value in the wrong place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import tritonclient.grpc.model_config_pb2 as triton_mc
import tritonclient.grpc.service_pb2 as triton_pb
from google.protobuf import descriptor_pb2, descriptor_pool, json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from google.protobuf.unknown_fields import UnknownFieldSet
from kapi.core._generated.inference import grpc_service_pb2 as kapi_pb
from kapi.core._generated.inference import model_config_pb2 as kapi_mc

from tests.unit._descriptors import messages_of

_SCALARS: dict[int, Callable[[Any, int], Any]] = {
    FieldDescriptor.CPPTYPE_STRING: lambda field, index: (
        f"{field.name}-{index}".encode()
        if field.type == FieldDescriptor.TYPE_BYTES
        else f"{field.name}-{index}"
    ),
    FieldDescriptor.CPPTYPE_BOOL: lambda field, index: True,
    FieldDescriptor.CPPTYPE_INT32: lambda field, index: -(field.number + 100 * index),
    FieldDescriptor.CPPTYPE_INT64: lambda field, index: -(2**40 + field.number + index),
    FieldDescriptor.CPPTYPE_UINT32: lambda field, index: field.number + 100 * index,
    FieldDescriptor.CPPTYPE_UINT64: lambda field, index: 2**63 + field.number + index,
    FieldDescriptor.CPPTYPE_FLOAT: lambda field, index: field.number + index + 0.5,
    FieldDescriptor.CPPTYPE_DOUBLE: lambda field, index: field.number + index + 0.25,
    FieldDescriptor.CPPTYPE_ENUM: lambda field, index: _last_enum_number(field),
}
_MAX_DEPTH = 6


def _last_enum_number(field: FieldDescriptor) -> int:
    assert field.enum_type is not None
    number: int = field.enum_type.values[-1].number
    return number


def populate(message: Message, depth: int = 0) -> Message:
    """Set every field (the last member of each oneof wins) to a value derived from the field."""
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            _populate_map(value, field.message_type, depth)
        elif field.is_repeated:
            for index in range(2):
                _append(value, field, index, depth)
        elif field.message_type is not None:
            if depth < _MAX_DEPTH:
                populate(value, depth + 1)
                value.SetInParent()
        else:
            setattr(message, field.name, _SCALARS[field.cpp_type](field, 0))
    return message


def _append(values: Any, field: Any, index: int, depth: int) -> None:
    if field.message_type is None:
        values.append(_SCALARS[field.cpp_type](field, index))
    elif depth < _MAX_DEPTH:
        populate(values.add(), depth + 1)


def _populate_map(entries: Any, entry: Any, depth: int) -> None:
    key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
    for index in range(2):
        key = _SCALARS[key_field.cpp_type](key_field, index)
        if value_field.message_type is None:
            entries[key] = _SCALARS[value_field.cpp_type](value_field, index)
        elif depth < _MAX_DEPTH:
            populate(entries[key], depth + 1)


def as_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _reaches_model_config(message: Descriptor, seen: frozenset[str] = frozenset()) -> bool:
    if message.file.name.endswith("model_config.proto"):
        return True
    return any(
        field.message_type is not None
        and field.message_type.full_name not in seen
        and _reaches_model_config(field.message_type, seen | {message.full_name})
        for field in message.fields
    )


def _pairs(ours: Any, theirs: Any, *, whole_only: bool = False) -> list[Any]:
    """(kapi class, tritonclient class) for every message both define, map entries aside."""
    their_messages = messages_of(theirs.DESCRIPTOR)
    return [
        pytest.param(GetMessageClass(message), GetMessageClass(their_messages[name]), id=name)
        for name, message in sorted(messages_of(ours.DESCRIPTOR).items())
        if not message.GetOptions().map_entry
        and not (whole_only and _reaches_model_config(message))
    ]


def _decode(sent: Message, receiver: type[Message]) -> Message:
    received = receiver.FromString(sent.SerializeToString())
    assert len(UnknownFieldSet(received)) == 0
    return received


@pytest.mark.parametrize(
    ("ours", "theirs"), _pairs(kapi_pb, triton_pb) + _pairs(kapi_mc, triton_mc)
)
def test_kapi_message_decodes_in_tritonclient(ours: type[Message], theirs: type[Message]) -> None:
    sent = populate(ours())
    assert as_dict(_decode(sent, theirs)) == as_dict(sent)


# kapi's ModelConfig is a subset of Triton's, so messages that reach it decode with unknown
# fields; they are covered by test_triton_model_config_survives_a_pass_through_kapi.
@pytest.mark.parametrize(("ours", "theirs"), _pairs(kapi_pb, triton_pb, whole_only=True))
def test_tritonclient_message_decodes_in_kapi(ours: type[Message], theirs: type[Message]) -> None:
    sent = populate(theirs())
    assert as_dict(_decode(sent, ours)) == as_dict(sent)


def test_populate_sets_nested_fields() -> None:
    """Guards the round trips above against comparing two empty messages."""
    request: Any = populate(kapi_pb.ModelInferRequest())
    assert list(request.inputs[1].contents.fp64_contents) == [7.25, 8.25]
    assert request.parameters["key-1"].uint64_param == 2**63 + 5
    assert list(request.raw_input_contents) == [b"raw_input_contents-0", b"raw_input_contents-1"]


def test_round_trip_detects_swapped_field_numbers() -> None:
    """The by-name comparison catches what a byte-for-byte comparison would not."""
    proto = descriptor_pb2.FileDescriptorProto()
    kapi_pb.DESCRIPTOR.CopyToProto(proto)
    config = descriptor_pb2.FileDescriptorProto()
    kapi_mc.DESCRIPTOR.CopyToProto(config)
    tensor = next(m for m in proto.message_type if m.name == "ModelMetadataResponse").nested_type[0]
    name, datatype = tensor.field[0], tensor.field[1]
    name.number, datatype.number = datatype.number, name.number
    pool = descriptor_pool.DescriptorPool()
    pool.Add(config)
    pool.Add(proto)
    mutated = GetMessageClass(
        pool.FindMessageTypeByName("inference.ModelMetadataResponse.TensorMetadata")
    )
    sent = populate(mutated())
    received = _decode(sent, triton_pb.ModelMetadataResponse.TensorMetadata)
    assert as_dict(received) != as_dict(sent)
    assert received.SerializeToString() == sent.SerializeToString()


def test_triton_model_config_survives_a_pass_through_kapi() -> None:
    """A gateway that decodes a Triton node's ModelConfigResponse and re-sends it loses nothing."""
    sent: Any = populate(triton_pb.ModelConfigResponse())
    relayed = kapi_pb.ModelConfigResponse.FromString(sent.SerializeToString())
    received = triton_pb.ModelConfigResponse.FromString(relayed.SerializeToString())
    assert as_dict(received) == as_dict(sent)
    assert as_dict(relayed)["config"]["max_batch_size"] == sent.config.max_batch_size


def _infer_request(module: Any) -> Any:
    request = module.ModelInferRequest(model_name="digits", model_version="3", id="r-1")
    request.parameters["priority"].uint64_param = 2
    request.parameters["sequence_id"].string_param = "s-9"
    request.parameters["timeout"].int64_param = -5
    request.parameters["temperature"].double_param = 0.75
    request.parameters["sequence_start"].bool_param = True
    tensor = request.inputs.add(name="image", datatype="FP32", shape=[2, 3])
    tensor.parameters["shared_memory_region"].string_param = "region"
    tensor.contents.fp32_contents.extend([1.5, -2.0])
    tensor.contents.bytes_contents.extend([b"\x00\x01", b""])
    request.inputs.add(name="label", datatype="BYTES", shape=[1])
    output = request.outputs.add(name="probs")
    output.parameters["classification"].int64_param = 3
    request.raw_input_contents.extend([b"\x00" * 24, b"\x02\x00\x00\x00hi"])
    return request


def _infer_response(module: Any) -> Any:
    response = module.ModelInferResponse(model_name="digits", model_version="3", id="r-1")
    response.parameters["triton_final_response"].bool_param = True
    output = response.outputs.add(name="probs", datatype="FP32", shape=[2, 10])
    output.parameters["binary_data_size"].int64_param = 80
    output.contents.int64_contents.extend([-(2**62), 7])
    output.contents.uint64_contents.append(2**64 - 1)
    response.raw_output_contents.extend([bytes(range(80))])
    return response


@pytest.mark.parametrize("build", [_infer_request, _infer_response])
@pytest.mark.parametrize(
    ("sender", "receiver"),
    [
        pytest.param(kapi_pb, triton_pb, id="kapi-to-triton"),
        pytest.param(triton_pb, kapi_pb, id="triton-to-kapi"),
    ],
)
def test_infer_messages_round_trip(build: Callable[[Any], Any], sender: Any, receiver: Any) -> None:
    sent = build(sender)
    expected = build(receiver)
    received = _decode(sent, type(expected))
    assert received == expected
    assert as_dict(received) == as_dict(sent)
    assert received.SerializeToString(deterministic=True) == sent.SerializeToString(
        deterministic=True
    )
