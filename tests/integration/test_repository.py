"""A repository written as a Triton user writes it: config.pbtxt, several versions and
version policies. What the node answers to ModelConfig, ModelMetadata, ModelReady and
RepositoryIndex, and that a request for a version reaches that version."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.support.clients import expect_error, expect_rpc_error

# Each model serves versions 1-3 of "OUTPUT0 = INPUT0 + version"; which ones load depends
# on its version_policy.
SERVED_VERSIONS = {"triton_all": [1, 2, 3], "triton_latest": [2, 3], "triton_default": [3]}


def add_input(values: list[float]) -> list[grpcclient.InferInput]:
    infer_input = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
    infer_input.set_data_from_numpy(np.array([values], dtype=np.float32))
    return [infer_input]


def test_config_pbtxt_is_served_as_written(client: grpcclient.InferenceServerClient) -> None:
    config = client.get_model_config("triton_all").config

    assert config.name == "triton_all"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("INPUT0", mc.TYPE_FP32, [4])
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("OUTPUT0", mc.TYPE_FP32, [4])
    ]
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (2, mc.ModelInstanceGroup.KIND_CPU)
    ]
    assert config.version_policy.WhichOneof("policy_choice") == "all"
    assert config.parameters["intra_op_thread_count"].string_value == "1"


def test_an_auto_completed_config_reads_back_as_triton_fills_it(
    client: grpcclient.InferenceServerClient,
) -> None:
    """No config.pbtxt: what Triton's auto-complete and normalization report for the same
    ONNX model on a machine without a GPU."""
    config = client.get_model_config("identity_fp32").config

    assert (config.backend, config.platform) == ("onnxruntime", "onnxruntime_onnx")
    assert config.default_model_filename == "model.onnx"
    assert config.max_batch_size == 4
    assert list(config.dynamic_batching.preferred_batch_size) == [4]
    assert config.version_policy.WhichOneof("policy_choice") == "latest"
    assert config.version_policy.latest.num_versions == 1
    assert [(g.name, g.kind, g.count) for g in config.instance_group] == [
        ("identity_fp32", mc.ModelInstanceGroup.KIND_CPU, 2)
    ]


def test_an_openvino_config_reads_back_with_its_defaults(
    client: grpcclient.InferenceServerClient,
) -> None:
    config = client.get_model_config("cnn_openvino").config

    assert config.backend == "openvino"
    assert config.default_model_filename == "model.xml"
    assert [(g.name, g.kind, g.count) for g in config.instance_group] == [
        ("cnn_openvino", mc.ModelInstanceGroup.KIND_CPU, 1)
    ]


def test_declared_instance_groups_are_named_as_triton_names_them(
    client: grpcclient.InferenceServerClient,
) -> None:
    (group,) = client.get_model_config("triton_all").config.instance_group
    assert (group.name, group.count) == ("triton_all_0", 2)


def test_config_of_one_version(client: grpcclient.InferenceServerClient) -> None:
    config = client.get_model_config("triton_all", "2").config

    assert config.name == "triton_all"
    assert config.max_batch_size == 8


@pytest.mark.parametrize(("model", "versions"), sorted(SERVED_VERSIONS.items()))
def test_metadata_lists_the_served_versions(
    client: grpcclient.InferenceServerClient, model: str, versions: list[int]
) -> None:
    metadata = client.get_model_metadata(model)

    assert metadata.name == model
    assert list(metadata.versions) == [str(v) for v in versions]
    assert metadata.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("INPUT0", "FP32", [-1, 4])
    ]


@pytest.mark.parametrize(("model", "versions"), sorted(SERVED_VERSIONS.items()))
def test_model_ready_per_version(
    client: grpcclient.InferenceServerClient, model: str, versions: list[int]
) -> None:
    assert client.is_model_ready(model)
    for version in (1, 2, 3, 4):
        assert client.is_model_ready(model, str(version)) == (version in versions)


@pytest.mark.parametrize(("model", "versions"), sorted(SERVED_VERSIONS.items()))
def test_each_served_version_answers_with_its_own_model(
    client: grpcclient.InferenceServerClient, model: str, versions: list[int]
) -> None:
    for version in versions:
        result = client.infer(model, add_input([0, 1, 2, 3]), model_version=str(version))

        assert result.get_response().model_version == str(version)
        np.testing.assert_array_equal(
            result.as_numpy("OUTPUT0"), [[version, version + 1, version + 2, version + 3]]
        )


@pytest.mark.parametrize(("model", "versions"), sorted(SERVED_VERSIONS.items()))
def test_without_a_version_the_highest_answers(
    client: grpcclient.InferenceServerClient, model: str, versions: list[int]
) -> None:
    result = client.infer(model, add_input([10, 20, 30, 40]))

    assert result.get_response().model_version == str(max(versions))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), [[13, 23, 33, 43]])


@pytest.mark.parametrize("model", ["triton_latest", "triton_default"])
def test_a_version_the_policy_leaves_out_is_not_found(
    client: grpcclient.InferenceServerClient, model: str
) -> None:
    expect_error(
        lambda: client.infer(model, add_input([0, 0, 0, 0]), model_version="1"),
        "StatusCode.NOT_FOUND",
        model,
    )


def test_repository_index_lists_every_version(
    client: grpcclient.InferenceServerClient,
) -> None:
    index = client.get_model_repository_index()

    rows = {(m.name, m.version): (m.state, m.reason) for m in index.models}
    for model, versions in SERVED_VERSIONS.items():
        for version in versions:
            assert rows[(model, str(version))] == ("READY", "")


def test_ready_index_lists_what_is_ready(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    ready = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True))

    ready_names = {m.name for m in ready.models}
    assert {"triton_all", "simple", "cnn_openvino"} <= ready_names
    assert all(m.state == "READY" for m in ready.models)


def test_config_of_an_unknown_version_is_not_found(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    expect_rpc_error(
        lambda: stub.ModelConfig(service_pb2.ModelConfigRequest(name="triton_latest", version="1")),
        grpc.StatusCode.NOT_FOUND,
    )
