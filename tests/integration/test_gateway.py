"""The gateway in front of three real kapi nodes (profiles: a GPU, an edge device, this CPU)
and one real NVIDIA Triton 2.51, with tritonclient as the client, unchanged.

Models: `plus` (versions 1 and 2: +1 and +2) on every kapi node; `where` on all four
backends, each adding its own constant, so an answer names the backend that gave it;
`add` on Triton only; `echo` on the CPU node only.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import REQUIRE_TRITON_ENV, require_triton
from tests.support import models
from tests.support.gateway import RunningGateway, start_gateway
from tests.support.node import RunningNode, start_node
from tests.support.triton import RunningTriton, start_triton, triton_unavailable

WHERE = {"gpu": 10.0, "edge": 20.0, "cpu": 30.0, "triton": 40.0}
PROFILES = {"gpu": "nvidia-sm90", "edge": "rpi5,cpu-arm64", "cpu": "cpu-x86_64-avx2,cpu-x86_64"}
ALL_VERSIONS = "max_batch_size: 8\nversion_policy: { all { } }\n"
TRITON_WHERE = """max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""
TRITON_ADD = """max_batch_size: 8
input [
  { name: "INPUT0" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "INPUT1" data_type: TYPE_FP32 dims: [ 4 ] }
]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


def add_two_model() -> bytes:
    from onnx import TensorProto, helper

    dims = ["batch", 4]
    model = models.graph_model(
        [helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"])],
        [
            models.tensor("INPUT0", TensorProto.FLOAT, dims),
            models.tensor("INPUT1", TensorProto.FLOAT, dims),
        ],
        [models.tensor("OUTPUT0", TensorProto.FLOAT, dims)],
    )
    return model.SerializeToString()


@dataclass
class Fleet:
    nodes: dict[str, RunningNode]
    triton: RunningTriton | None  # None where Triton is not installed (and not required)
    gateway: RunningGateway

    @property
    def kinds(self) -> list[str]:
        return [*self.nodes, *(["triton"] if self.triton is not None else [])]

    def need_triton(self) -> RunningTriton:
        """For the checks of a real Triton behind the gateway: skip (or fail where Triton
        is required) when this fleet has none."""
        if self.triton is None:
            require_triton()
        assert self.triton is not None
        return self.triton

    def client(self) -> grpcclient.InferenceServerClient:
        return grpcclient.InferenceServerClient(self.gateway.grpc_url)


def node_repository(root: Path, kind: str) -> Path:
    models.save_model(root, "plus", models.add_constant_model(1.0), 1, ALL_VERSIONS)
    models.save_model(root, "plus", models.add_constant_model(2.0), 2)
    models.save_model(root, "where", models.add_constant_model(WHERE[kind] + 1))
    if kind == "cpu":
        models.save_model(root, "echo", models.identity_model("FP32"))
    return root


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, node_logs: Path) -> Iterator[Fleet]:
    nodes: dict[str, RunningNode] = {}
    triton = None
    gateway = None
    try:
        for kind, profiles in PROFILES.items():
            root = node_repository(tmp_path_factory.mktemp(f"repo-{kind}"), kind)
            nodes[kind] = start_node(root, node_logs, env={"KAPI_PROFILES": profiles})
        config = tmp_path_factory.mktemp("gateway") / "gateway.yaml"
        config.write_text("backends: []\n")
        if triton_unavailable() is None or os.environ.get(REQUIRE_TRITON_ENV):
            triton_where = models.add_constant_model(WHERE["triton"] + 1).SerializeToString()
            triton = start_triton(
                {"where": (triton_where, TRITON_WHERE), "add": (add_two_model(), TRITON_ADD)},
                tmp_path_factory.mktemp("triton"),
                node_logs,
            )
            rest = triton.http_url.removeprefix("http://")
            config.write_text(
                "backends:\n  - "
                f"{{address: '{triton.grpc_url}', profile: cpu-x86_64, http_address: '{rest}'}}\n"
            )
        gateway = start_gateway(
            [node.grpc_url for node in nodes.values()], node_logs, args=["--config", str(config)]
        )
        gateway.wait_for(
            "serving what the backends serve",
            lambda backends: (
                len(backends) == 3 + (triton is not None)
                and all(b["models"] for b in backends.values())
            ),
        )
        yield Fleet(nodes, triton, gateway)
    finally:
        if gateway is not None:
            gateway.terminate()
        if triton is not None:
            triton.terminate()
        for node in nodes.values():
            node.terminate()


def inputs(value: float = 0.0, rows: int = 1, names: tuple[str, ...] = ("INPUT0",)) -> list:
    result = []
    for name in names:
        tensor = grpcclient.InferInput(name, [rows, 4], "FP32")
        tensor.set_data_from_numpy(np.full((rows, 4), value, np.float32))
        result.append(tensor)
    return result


def answer(client: grpcclient.InferenceServerClient, model: str, **kwargs: object) -> float:
    result = client.infer(model, inputs(), **kwargs)  # type: ignore[arg-type]
    return float(result.as_numpy("OUTPUT0")[0, 0])


def backend_of(value: float) -> str:
    return {v + 1: k for k, v in WHERE.items()}[value]


def test_each_model_goes_to_a_backend_that_serves_it(fleet: Fleet) -> None:
    with fleet.client() as client:
        echoed = client.infer("echo", inputs(7.0))
        np.testing.assert_array_equal(echoed.as_numpy("OUTPUT0"), np.full((1, 4), 7.0))
        assert {answer(client, "where") for _ in range(40)} <= {11.0, 21.0, 31.0, 41.0}


def test_a_triton_server_is_a_backend_as_the_nodes_are(fleet: Fleet) -> None:
    """`add` is on the real Triton only: inference, readiness, metadata and the index come
    from it, over gRPC and over REST (its own REST API)."""
    fleet.need_triton()
    with fleet.client() as client:
        added = client.infer("add", inputs(2.0, names=("INPUT0", "INPUT1")))
        np.testing.assert_array_equal(added.as_numpy("OUTPUT0"), np.full((1, 4), 4.0))
        assert client.is_model_ready("add")
        metadata = client.get_model_metadata("add")
        assert metadata.platform == "python"  # Triton's answer
        assert [i.name for i in metadata.inputs] == ["INPUT0", "INPUT1"]
        assert ("add", "1") in {
            (m.name, m.version) for m in client.get_model_repository_index().models
        }
    with httpclient.InferenceServerClient(fleet.gateway.http_url.removeprefix("http://")) as rest:
        assert rest.is_model_ready("add")
        tensors = []
        for name in ("INPUT0", "INPUT1"):
            tensor = httpclient.InferInput(name, [1, 4], "FP32")
            tensor.set_data_from_numpy(np.full((1, 4), 2.0, np.float32), binary_data=True)
            tensors.append(tensor)
        np.testing.assert_array_equal(
            rest.infer("add", tensors).as_numpy("OUTPUT0"), np.full((1, 4), 4.0)
        )


def test_round_robin_uses_every_backend_evenly(fleet: Fleet) -> None:
    route = {"policy": "round-robin"}
    assert fleet.gateway.admin("PUT", "/v1/routes/where", json=route).status_code == 200
    try:
        with fleet.client() as client:
            served = collections.Counter(backend_of(answer(client, "where")) for _ in range(120))
        share = 120 // len(fleet.kinds)
        assert served == dict.fromkeys(fleet.kinds, share), fleet.gateway.backends()
    finally:
        fleet.gateway.admin("DELETE", "/v1/routes/where")


def test_a_model_no_backend_serves_is_not_found_from_the_gateway(fleet: Fleet) -> None:
    with fleet.client() as client, pytest.raises(InferenceServerException) as raised:
        client.infer("nowhere", inputs())
    assert raised.value.status() == "StatusCode.NOT_FOUND"
    assert "model 'nowhere' is not served by any backend" in raised.value.message()


def test_backend_errors_reach_the_client_unchanged(fleet: Fleet) -> None:
    bad = grpcclient.InferInput("INPUT0", [1, 3], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3), np.float32))
    for request in (
        {"model_name": "echo", "inputs": [bad]},
        {"model_name": "plus", "inputs": inputs(), "model_version": "9"},
    ):
        errors = []
        for url in (fleet.gateway.grpc_url, fleet.nodes["cpu"].grpc_url):
            with grpcclient.InferenceServerClient(url) as client:
                with pytest.raises(InferenceServerException) as raised:
                    client.infer(**request)  # type: ignore[arg-type]
                errors.append((raised.value.status(), raised.value.message()))
        assert errors[0] == errors[1]
        assert errors[0][0] in ("StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND")


def test_a_90_10_split_holds_within_3_points_over_2000_requests(fleet: Fleet) -> None:
    route = {"split": {"1": 90, "2": 10}}
    assert fleet.gateway.admin("PUT", "/v1/routes/plus", json=route).status_code == 200
    try:
        with fleet.client() as client:
            versions = collections.Counter(
                client.infer("plus", inputs()).get_response().model_version for _ in range(2000)
            )
            explicit = {
                client.infer("plus", inputs(), model_version="1").get_response().model_version
                for _ in range(50)
            }
    finally:
        fleet.gateway.admin("DELETE", "/v1/routes/plus")
    assert set(versions) == {"1", "2"}
    assert abs(versions["2"] / 2000 - 0.10) <= 0.03, versions
    assert explicit == {"1"}  # an explicit version is never split


def test_hardware_preference_with_ordered_fallback(fleet: Fleet) -> None:
    with fleet.client() as client:

        def served(preference: str) -> set[str]:
            parameters = {"kapi-hardware": preference}
            return {backend_of(answer(client, "where", parameters=parameters)) for _ in range(20)}

        assert served("gpu") == {"gpu"}
        assert served("edge") == {"edge"}
        assert served("rpi5") == {"edge"}
        assert served("nvidia-sm75,jetson-orin,edge") == {"edge"}  # the first that has any
        assert served("cpu") <= {"cpu", "triton"}
        assert served("cpu-x86_64-avx2") == {"cpu"}
        with pytest.raises(InferenceServerException) as raised:
            answer(client, "where", parameters={"kapi-hardware": "quantum"})
        assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "unknown hardware 'quantum'" in raised.value.message()

    route = {"hardware": ["nvidia-sm75", "edge", "gpu"]}
    assert fleet.gateway.admin("PUT", "/v1/routes/where", json=route).status_code == 200
    try:
        with fleet.client() as client:
            assert {backend_of(answer(client, "where")) for _ in range(20)} == {"edge"}
            asked = {"kapi-hardware": "gpu"}  # the request's own preference wins
            assert backend_of(answer(client, "where", parameters=asked)) == "gpu"
    finally:
        fleet.gateway.admin("DELETE", "/v1/routes/where")


def test_shadow_traffic_records_agreement_and_never_delays_the_client(fleet: Fleet) -> None:
    route = {"shadow": {"version": "2", "fraction": 1.0}}
    assert fleet.gateway.admin("PUT", "/v1/routes/plus", json=route).status_code == 200
    try:
        with fleet.client() as client:
            for _ in range(30):
                result = client.infer("plus", inputs(rows=2), model_version="1")
                assert result.get_response().model_version == "1"  # the primary's answer
                np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.ones((2, 4)))

        def recorded() -> dict:
            return fleet.gateway.admin("GET", "/v1/routes/plus").json()["shadow_stats"]

        deadline = 100
        while recorded()["requests"] - recorded()["errors"] < 30 and deadline:
            deadline -= 1
            import time

            time.sleep(0.05)
        stats = recorded()
    finally:
        fleet.gateway.admin("DELETE", "/v1/routes/plus")
    assert stats["target"] == "version 2"
    assert stats["requests"] == 30
    assert stats["errors"] == 0
    assert stats["compared_rows"] == 60
    assert stats["top1_agreement"] == 1.0  # +1 and +2 keep every row's largest column
    metrics = fleet.gateway.metrics()
    assert 'kapi_gateway_shadow_agreement{model="plus",shadow="version 2"} 1.0' in metrics
    assert 'kapi_gateway_shadow_duration_seconds_count{model="plus",shadow="version 2"} 30.0' in (
        metrics
    )


def test_metadata_index_and_statistics_come_from_the_backends(fleet: Fleet) -> None:
    with fleet.client() as client:
        assert client.get_server_metadata().name == "kapi-gateway"
        assert client.is_server_ready()
        assert client.is_model_ready("echo")
        assert not client.is_model_ready("nowhere")
        metadata = client.get_model_metadata("echo")  # the CPU node's answer
        assert metadata.platform == "onnxruntime_onnx"
        assert [i.name for i in metadata.inputs] == ["INPUT0"]
        index = {(m.name, m.version) for m in client.get_model_repository_index().models}
        assert {("plus", "1"), ("plus", "2"), ("where", "1"), ("echo", "1")} <= index
        for _ in range(8):
            answer(client, "where")
        through = client.get_inference_statistics("where").model_stats
    direct = 0
    others = [fleet.triton.grpc_url] if fleet.triton is not None else []
    for url in [n.grpc_url for n in fleet.nodes.values()] + others:
        with grpcclient.InferenceServerClient(url) as backend:
            direct += backend.get_inference_statistics("where").model_stats[0].inference_count
    assert [(s.name, s.version) for s in through] == [("where", "1")]
    # Summed over the four backends (the count can only grow between the two reads).
    assert 8 <= through[0].inference_count <= direct


def test_streams_are_routed_and_answered_in_order(fleet: Fleet) -> None:
    answers: list[float] = []
    with fleet.client() as client:
        client.start_stream(
            callback=lambda result, error: answers.append(
                error if error is not None else float(result.as_numpy("OUTPUT0")[0, 0])
            )
        )
        for value in range(20):
            client.async_stream_infer("plus", inputs(float(value)), model_version="2")
        client.stop_stream()
    assert answers == [float(value) + 2 for value in range(20)]


def test_shared_memory_is_refused_through_the_gateway(fleet: Fleet) -> None:
    with fleet.client() as client, pytest.raises(InferenceServerException) as raised:
        client.register_system_shared_memory("region", "/kapi-none", 64)
    assert raised.value.status() == "StatusCode.UNIMPLEMENTED"
    assert "register shared memory with the node itself" in raised.value.message()


def test_metrics_count_requests_per_model_version_and_backend(fleet: Fleet) -> None:
    with fleet.client() as client:
        for _ in range(5):
            client.infer("echo", inputs())
    cpu = fleet.nodes["cpu"].grpc_url
    metrics = fleet.gateway.metrics()
    assert f'kapi_gateway_requests_total{{backend="{cpu}",code="OK",model="echo",version=""}}' in (
        metrics
    )
    assert "kapi_gateway_request_duration_seconds_bucket" in metrics
    assert f'kapi_gateway_in_flight{{backend="{cpu}"}} 0.0' in metrics
    assert f'kapi_gateway_backend_healthy{{backend="{cpu}"}} 1.0' in metrics


def test_admin_writes_need_the_token_and_routes_are_validated(
    fleet: Fleet, node_logs: Path
) -> None:
    gateway = start_gateway(
        [fleet.nodes["cpu"].grpc_url], node_logs, args=["--admin-token", "s3cret-admin-token"]
    )
    try:
        url = f"{gateway.http_url}/v1/routes/plus"
        import httpx

        assert httpx.put(url, json={"policy": "round-robin"}).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert httpx.put(url, json={"policy": "round-robin"}, headers=wrong).status_code == 403
        assert gateway.admin("PUT", "/v1/routes/plus", json={"policy": "round-robin"}).is_success
        bad = gateway.admin("PUT", "/v1/routes/plus", json={"policy": "fastest"})
        assert bad.status_code == 422
        assert "unknown policy 'fastest'" in bad.json()["error"]
        bad = gateway.admin("PUT", "/v1/routes/plus", json={"split": {"one": 100}})
        assert bad.status_code == 422
        assert "positive integer" in bad.json()["error"]
        assert httpx.get(url).json()["route"]["policy"] == "round-robin"  # reads are open
        assert gateway.admin("GET", "/v1/routes/none").status_code == 404
    finally:
        gateway.terminate()


def test_grpc_health_of_the_gateway(fleet: Fleet) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(fleet.gateway.grpc_url) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert check.status == health_pb2.HealthCheckResponse.SERVING


def test_rest_requests_are_forwarded_to_the_backends_rest_apis(fleet: Fleet) -> None:
    url = fleet.gateway.http_url.removeprefix("http://")
    with httpclient.InferenceServerClient(url) as client:
        assert client.get_server_metadata()["name"] == "kapi-gateway"
        assert client.is_server_ready()
        assert client.is_model_ready("echo")

        def rest_inputs(value: float, names: tuple[str, ...] = ("INPUT0",)) -> list:
            tensors = []
            for name in names:
                tensor = httpclient.InferInput(name, [1, 4], "FP32")
                tensor.set_data_from_numpy(np.full((1, 4), value, np.float32), binary_data=True)
                tensors.append(tensor)
            return tensors

        echoed = client.infer("echo", rest_inputs(5.0))  # the CPU node's REST, binary tensors
        np.testing.assert_array_equal(echoed.as_numpy("OUTPUT0"), np.full((1, 4), 5.0))
        for kind in ("gpu", "edge"):
            result = client.infer("where", rest_inputs(0.0), headers={"kapi-hardware": kind})
            assert backend_of(float(result.as_numpy("OUTPUT0")[0, 0])) == kind
        assert client.get_model_metadata("plus", "2")["versions"] == ["1", "2"]
        index = {(m["name"], m.get("version")) for m in client.get_model_repository_index()}
        assert {("echo", "1"), ("plus", "2")} <= index
        assert client.get_inference_statistics("echo")["model_stats"][0]["inference_count"] >= 1
        # A model's statistics over REST are summed over the backends that serve it.
        (stats,) = client.get_inference_statistics("where")["model_stats"]
        assert stats["name"] == "where"

        errors = []
        bad = httpclient.InferInput("INPUT0", [1, 3], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 3), np.float32))
        for target in (url, fleet.nodes["cpu"].http_url.removeprefix("http://")):
            with httpclient.InferenceServerClient(target) as direct:
                with pytest.raises(InferenceServerException) as raised:
                    direct.infer("echo", [bad])
                errors.append((raised.value.status(), raised.value.message()))
        assert errors[0] == errors[1]  # the backend's answer, unchanged
        with pytest.raises(InferenceServerException) as raised:
            client.infer("nowhere", rest_inputs(0.0))
        assert "model 'nowhere' is not served by any backend" in raised.value.message()


def test_rest_traffic_follows_the_split(fleet: Fleet) -> None:
    route = {"split": {"2": 100}}
    assert fleet.gateway.admin("PUT", "/v1/routes/plus", json=route).status_code == 200
    try:
        url = fleet.gateway.http_url.removeprefix("http://")
        with httpclient.InferenceServerClient(url) as client:
            tensor = httpclient.InferInput("INPUT0", [1, 4], "FP32")
            tensor.set_data_from_numpy(np.zeros((1, 4), np.float32))
            versions = {
                client.infer("plus", [tensor]).get_response()["model_version"] for _ in range(10)
            }
    finally:
        fleet.gateway.admin("DELETE", "/v1/routes/plus")
    assert versions == {"2"}
