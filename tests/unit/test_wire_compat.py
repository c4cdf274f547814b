"""kapi's OIP protos against tritonclient's: same names, numbers, types and RPCs on the wire.

tritonclient's stubs live in the default descriptor pool, kapi's in its own; both declare
package `inference`, so every message, enum and service is compared by full name.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import tritonclient.grpc.model_config_pb2 as triton_mc
import tritonclient.grpc.service_pb2 as triton_pb
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from kapi.core._generated.inference import grpc_service_pb2 as kapi_pb
from kapi.core._generated.inference import model_config_pb2 as kapi_mc

from tests.unit._descriptors import (
    enums_of,
    file_differences,
    messages_of,
    missing_fields,
    service_differences,
)

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "inference.GRPCInferenceService"
# The ModelConfig fields kapi reads or reports; Triton's other sections are skipped.
MODEL_CONFIG_FIELDS_KAPI_USES = (
    "name",
    "platform",
    "backend",
    "version_policy",
    "max_batch_size",
    "input",
    "output",
    "dynamic_batching",
    "instance_group",
    "default_model_filename",
    "parameters",
)


# --- the contract --------------------------------------------------------------------------


def test_both_sides_declare_package_inference() -> None:
    for file in (
        kapi_pb.DESCRIPTOR,
        kapi_mc.DESCRIPTOR,
        triton_pb.DESCRIPTOR,
        triton_mc.DESCRIPTOR,
    ):
        assert file.package == "inference"


def test_kapi_stubs_live_outside_the_default_pool() -> None:
    default = descriptor_pool.Default()
    assert default.FindFileByName("grpc_service.proto") is triton_pb.DESCRIPTOR
    with pytest.raises(KeyError):
        default.FindFileByName(kapi_pb.DESCRIPTOR.name)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(kapi_pb.DESCRIPTOR, triton_pb.DESCRIPTOR), (kapi_mc.DESCRIPTOR, triton_mc.DESCRIPTOR)],
    ids=["grpc_service", "model_config"],
)
def test_shared_fields_and_enum_values_agree(ours: FileDescriptor, theirs: FileDescriptor) -> None:
    assert file_differences(ours, theirs) == []


def test_every_message_in_grpc_service_is_complete() -> None:
    assert missing_fields(kapi_pb.DESCRIPTOR, triton_pb.DESCRIPTOR) == []


def test_kapi_defines_no_message_or_enum_triton_lacks() -> None:
    for ours, theirs in ((kapi_pb, triton_pb), (kapi_mc, triton_mc)):
        assert set(messages_of(ours.DESCRIPTOR)) <= set(messages_of(theirs.DESCRIPTOR))
        assert set(enums_of(ours.DESCRIPTOR)) <= set(enums_of(theirs.DESCRIPTOR))


def test_model_config_has_the_fields_kapi_uses() -> None:
    ours = kapi_mc.ModelConfig.DESCRIPTOR.fields_by_name
    assert [name for name in MODEL_CONFIG_FIELDS_KAPI_USES if name not in ours] == []


def test_data_type_enum_is_complete() -> None:
    """Every datatype a Triton config may name must parse, so the enum is never a subset."""
    ours = kapi_mc.DataType.DESCRIPTOR.values_by_name.keys()
    assert set(ours) == set(triton_mc.DataType.DESCRIPTOR.values_by_name.keys())


def test_service_covers_every_triton_rpc() -> None:
    ours = kapi_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == SERVICE
    assert service_differences(ours, theirs) == []


def test_generated_code_matches_the_protos() -> None:
    """The checks above read the generated stubs; they must be what protos/ generates today."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# --- the comparison can fail ---------------------------------------------------------------


def _file_proto(file: FileDescriptor) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    return proto


def _message_proto(
    file: descriptor_pb2.FileDescriptorProto, path: str
) -> descriptor_pb2.DescriptorProto:
    first, *rest = path.split(".")
    message = next(m for m in file.message_type if m.name == first)
    for name in rest:
        message = next(m for m in message.nested_type if m.name == name)
    return message


def _field_proto(
    file: descriptor_pb2.FileDescriptorProto, path: str
) -> descriptor_pb2.FieldDescriptorProto:
    message_path, field_name = path.rsplit(".", 1)
    return next(f for f in _message_proto(file, message_path).field if f.name == field_name)


def _mutated_files(
    mutate: Callable[
        [descriptor_pb2.FileDescriptorProto, descriptor_pb2.FileDescriptorProto], None
    ],
) -> tuple[FileDescriptor, FileDescriptor]:
    """kapi's two files, changed by `mutate`, built in a fresh pool."""
    config, service = _file_proto(kapi_mc.DESCRIPTOR), _file_proto(kapi_pb.DESCRIPTOR)
    mutate(config, service)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(config)
    pool.Add(service)
    return pool.FindFileByName(config.name), pool.FindFileByName(service.name)


def _renumber_raw_input_contents(
    _: descriptor_pb2.FileDescriptorProto, service: descriptor_pb2.FileDescriptorProto
) -> None:
    _field_proto(service, "ModelInferRequest.raw_input_contents").number = 17


def _narrow_shape(
    _: descriptor_pb2.FileDescriptorProto, service: descriptor_pb2.FileDescriptorProto
) -> None:
    field = _field_proto(service, "ModelInferRequest.InferInputTensor.shape")
    field.type = descriptor_pb2.FieldDescriptorProto.TYPE_INT32


def _make_dims_singular(
    config: descriptor_pb2.FileDescriptorProto, _: descriptor_pb2.FileDescriptorProto
) -> None:
    _field_proto(
        config, "ModelInput.dims"
    ).label = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL


def _swap_name_and_datatype(
    _: descriptor_pb2.FileDescriptorProto, service: descriptor_pb2.FileDescriptorProto
) -> None:
    name = _field_proto(service, "ModelInferResponse.InferOutputTensor.name")
    datatype = _field_proto(service, "ModelInferResponse.InferOutputTensor.datatype")
    name.number, datatype.number = datatype.number, name.number


def _renumber_enum_value(
    config: descriptor_pb2.FileDescriptorProto, _: descriptor_pb2.FileDescriptorProto
) -> None:
    data_type = next(e for e in config.enum_type if e.name == "DataType")
    next(v for v in data_type.value if v.name == "TYPE_BF16").number = 15


def _retarget_contents(
    _: descriptor_pb2.FileDescriptorProto, service: descriptor_pb2.FileDescriptorProto
) -> None:
    field = _field_proto(service, "ModelInferRequest.InferInputTensor.contents")
    field.type_name = ".inference.InferParameter"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_renumber_raw_input_contents, "ModelInferRequest.raw_input_contents: number is 17"),
        (_narrow_shape, "InferInputTensor.shape: type is"),
        (_make_dims_singular, "ModelInput.dims: repeated is False"),
        (_swap_name_and_datatype, "InferOutputTensor: number 1 is 'datatype'"),
        (_renumber_enum_value, "DataType.TYPE_BF16 is 15"),
        (_retarget_contents, "contents: message is inference.InferParameter"),
    ],
    ids=lambda value: getattr(value, "__name__", "")[1:] or None,
)
def test_comparison_detects_a_changed_descriptor(
    mutate: Callable[
        [descriptor_pb2.FileDescriptorProto, descriptor_pb2.FileDescriptorProto], None
    ],
    expected: str,
) -> None:
    config, service = _mutated_files(mutate)
    found = file_differences(service, triton_pb.DESCRIPTOR) + file_differences(
        config, triton_mc.DESCRIPTOR
    )
    assert any(expected in difference for difference in found), found


def test_unmutated_copy_has_no_differences() -> None:
    config, service = _mutated_files(lambda config, service: None)
    assert file_differences(service, triton_pb.DESCRIPTOR) == []
    assert file_differences(config, triton_mc.DESCRIPTOR) == []


def test_coverage_detects_a_dropped_field() -> None:
    def drop_id(
        _: descriptor_pb2.FileDescriptorProto, service: descriptor_pb2.FileDescriptorProto
    ) -> None:
        request = _message_proto(service, "ModelInferRequest")
        kept = [field for field in request.field if field.name != "id"]
        del request.field[:]
        request.field.extend(kept)

    _, service = _mutated_files(drop_id)
    assert missing_fields(service, triton_pb.DESCRIPTOR) == ["inference.ModelInferRequest.id"]


def test_service_comparison_detects_a_lost_stream() -> None:
    def unary_stream(
        _: descriptor_pb2.FileDescriptorProto, service: descriptor_pb2.FileDescriptorProto
    ) -> None:
        rpc = next(m for m in service.service[0].method if m.name == "ModelStreamInfer")
        rpc.client_streaming = False

    _, service = _mutated_files(unary_stream)
    found = service_differences(
        service.services_by_name["GRPCInferenceService"],
        triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
    )
    assert found == ["rpc ModelStreamInfer: client_streaming differs from Triton's"]
