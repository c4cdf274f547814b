"""What operators and load balancers look at: HTTP health, Prometheus metrics and
ModelStatistics (with counts that match the requests sent), grpc.health.v1, reflection."""

from __future__ import annotations

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.support.clients import expect_error, expect_rpc_error
from tests.support.metrics import sample
from tests.support.node import RunningNode

SERVICE = "inference.GRPCInferenceService"


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v2/health/live", 200),
        ("/v2/health/ready", 200),
        ("/v2/models/simple/ready", 200),
        ("/v2/models/triton_latest/versions/3/ready", 200),
        # Not ready is 400, as the KServe v2 protocol (4xx) and Triton answer it.
        ("/v2/models/triton_latest/versions/1/ready", 400),
        ("/v2/models/no_such_model/ready", 400),
        # A version that is not ASCII digits names no route, as Triton routes it
        # (`/versions/([0-9]+)`); gRPC answers INVALID_ARGUMENT with the reason.
        ("/v2/models/simple/versions/%C2%B2/ready", 404),
        ("/v2/models/simple/versions/x1/ready", 404),
    ],
)
def test_http_health(main_node: RunningNode, path: str, status: int) -> None:
    assert httpx.get(main_node.http_url + path, timeout=10).status_code == status


def test_http_server_metadata(main_node: RunningNode) -> None:
    metadata = httpx.get(main_node.http_url + "/v2", timeout=10).json()

    assert metadata["name"] == "kapi"
    assert "model_repository" in metadata["extensions"]


def test_tritonclient_http_health(main_node: RunningNode) -> None:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{main_node.http_port}")
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("triton_all", "2")
        assert not client.is_model_ready("no_such_model")
    finally:
        client.close()


def test_counts_match_the_requests_sent(
    main_node: RunningNode, client: grpcclient.InferenceServerClient
) -> None:
    """`counted` serves only this test: 5 good requests (8 items), 2 with a wrong shape."""
    batches = [1, 2, 3, 1, 1]
    for batch in batches:
        good = grpcclient.InferInput("INPUT0", [batch, 4], "FP32")
        good.set_data_from_numpy(np.full((batch, 4), batch, dtype=np.float32))
        client.infer("counted", [good])
    for _ in range(2):
        bad = grpcclient.InferInput("INPUT0", [1, 5], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 5), dtype=np.float32))
        with pytest.raises(InferenceServerException):
            client.infer("counted", [bad])

    (stats,) = client.get_inference_statistics("counted").model_stats
    assert (stats.name, stats.version) == ("counted", "1")
    assert stats.inference_stats.success.count == 5
    assert stats.inference_stats.fail.count == 2
    assert stats.inference_stats.queue.count == 5
    assert stats.inference_stats.compute_infer.count == 5
    assert stats.inference_count == sum(batches)
    assert stats.execution_count == 5  # one at a time: nothing to batch
    assert {b.batch_size: b.compute_infer.count for b in stats.batch_stats} == {1: 3, 2: 1, 3: 1}
    assert stats.last_inference > 0
    assert stats.inference_stats.success.ns > 0

    metrics = main_node.metrics()
    labels = {"model": "counted", "version": "1"}
    requests = "kapi_node_inference_requests_total"
    assert sample(metrics, requests, outcome="success", **labels) == 5
    assert sample(metrics, requests, outcome="failure", **labels) == 2
    assert sample(metrics, "kapi_node_request_duration_seconds_count", **labels) == 7
    assert sample(metrics, "kapi_node_queue_duration_seconds_count", **labels) == 5
    assert sample(metrics, "kapi_node_compute_duration_seconds_count", **labels) == 5
    assert sample(metrics, "kapi_node_batch_size_count", **labels) == 5
    assert sample(metrics, "kapi_node_batch_size_sum", **labels) == sum(batches)


def test_statistics_of_every_model_and_version(client: grpcclient.InferenceServerClient) -> None:
    every = client.get_inference_statistics().model_stats
    one_version = client.get_inference_statistics("triton_all", "2").model_stats

    served = {(s.name, s.version) for s in every}
    assert {("triton_all", "1"), ("triton_all", "2"), ("triton_all", "3")} <= served
    assert ("triton_latest", "1") not in served
    assert [(s.name, s.version) for s in one_version] == [("triton_all", "2")]
    # A model without a version: every version of it loaded, as Triton's statistics
    # extension documents ("if not provided Triton will return statistics for all versions").
    every_version = client.get_inference_statistics("triton_all").model_stats
    assert sorted((s.name, s.version) for s in every_version) == [
        ("triton_all", "1"),
        ("triton_all", "2"),
        ("triton_all", "3"),
    ]


def test_metrics_carry_model_and_version_labels(
    main_node: RunningNode, client: grpcclient.InferenceServerClient
) -> None:
    for version in ("1", "3"):
        infer_input = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
        infer_input.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
        client.infer("triton_all", [infer_input], model_version=version)

    metrics = main_node.metrics()

    for family in (
        "kapi_node_request_duration_seconds",
        "kapi_node_queue_duration_seconds",
        "kapi_node_compute_duration_seconds",
        "kapi_node_batch_size",
    ):
        assert f"# TYPE {family} histogram" in metrics
        for version in ("1", "3"):
            count = sample(metrics, f"{family}_count", model="triton_all", version=version)
            assert count >= 1, (family, version)
    assert "# TYPE kapi_node_inference_requests_total counter" in metrics


@pytest.mark.parametrize("call", ["get_cuda_shared_memory_status", "unregister_cuda_shared_memory"])
def test_cuda_shared_memory_is_unimplemented_without_a_gpu(
    client: grpcclient.InferenceServerClient, call: str
) -> None:
    expect_error(lambda: getattr(client, call)(), "StatusCode.UNIMPLEMENTED", "CUDA shared memory")


@pytest.mark.parametrize("service", ["", SERVICE])
def test_grpc_health_check_serving(channel: grpc.Channel, service: str) -> None:
    health = health_pb2_grpc.HealthStub(channel)

    response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)

    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_grpc_health_check_of_an_unknown_service(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)

    expect_rpc_error(
        lambda: health.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=10),
        grpc.StatusCode.NOT_FOUND,
    )


def reflect(channel: grpc.Channel, **request: str) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    (response,) = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=10
    )
    return response


def test_reflection_lists_the_inference_service(channel: grpc.Channel) -> None:
    response = reflect(channel, list_services="")

    names = {service.name for service in response.list_services_response.service}
    assert SERVICE in names
    assert "grpc.reflection.v1alpha.ServerReflection" in names


def test_reflection_describes_the_inference_service(channel: grpc.Channel) -> None:
    response = reflect(channel, file_containing_symbol=SERVICE)

    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in response.file_descriptor_response.file_descriptor_proto
    ]
    services = {
        f"{file.package}.{service.name}": [method.name for method in service.method]
        for file in files
        for service in file.service
    }
    assert {"ModelInfer", "ModelStreamInfer", "RepositoryIndex"} <= set(services[SERVICE])
