"""One bad model never takes the node down: every way a model can be broken on disk leaves
that model UNAVAILABLE with its reason, while every other model serves. With strict
readiness (Triton's default) the node then reports not ready, until the model loads or is
unloaded."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.support import models
from tests.support.clients import expect_error, infer_input
from tests.support.node import NodeFactory, RunningNode, running_node

GOOD = "good"


def zipmap_model() -> onnx.ModelProto:
    """What skl2onnx makes of a classifier by default: probabilities as a sequence of maps."""
    labels = helper.make_node(
        "ZipMap", ["X"], ["probabilities"], domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2]
    )
    sequence = helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(1, []))
    )
    graph = helper.make_graph(
        [labels],
        "zipmap",
        [models.tensor("X", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_value_info("probabilities", sequence)],
    )
    opsets = [helper.make_opsetid("", models.OPSET), helper.make_opsetid("ai.onnx.ml", 3)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def float8_model() -> onnx.ModelProto:
    elem = TensorProto.FLOAT8E4M3FN
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        "float8",
        [models.tensor("INPUT0", elem, ["batch", 4])],
        [models.tensor("OUTPUT0", elem, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


# model -> words its reason must hold
BROKEN = {
    "corrupt": "model.onnx",
    "zipmap": "output 'probabilities' is of type seq(map(int64,tensor(float)))",
    "float8": "input 'INPUT0' is of type tensor(float8e4m3fn)",
    "config_not_utf8": "cannot be read as a text config",
    "config_directory": "cannot be read as a text config",
    "superscript_version": "no numeric version directory",
    # Triton's words: the ONNX Runtime here has no GPU provider, so no GPU is available.
    "gpu_only": "instance group gpu_only_0 of model gpu_only has kind KIND_GPU but no GPUs are "
    "available",
    "labels_missing": "label file",
}
# model -> the status its explicit load fails with: the runtime's own failure is INTERNAL
LOAD_STATUS = {
    **dict.fromkeys(BROKEN, "StatusCode.INVALID_ARGUMENT"),
    "corrupt": "StatusCode.INTERNAL",
    "superscript_version": "StatusCode.NOT_FOUND",
}


def build_broken_repository(root: Path) -> None:
    models.save_model(root, GOOD, models.add_constant_model(1.0))
    models.save_model(root, "corrupt", b"this is not an ONNX model")
    models.save_model(root, "zipmap", zipmap_model())
    models.save_model(root, "float8", float8_model())
    models.save_model(root, "config_not_utf8", models.identity_model("FP32"))
    (root / "config_not_utf8" / "config.pbtxt").write_bytes(b"max_batch_size: 4 # \xff\xfe\n")
    models.save_model(root, "config_directory", models.identity_model("FP32"))
    (root / "config_directory" / "config.pbtxt").mkdir()
    identity = models.identity_model("FP32").SerializeToString()
    (root / "superscript_version" / "\u00b2").mkdir(parents=True)
    (root / "superscript_version" / "\u00b2" / "model.onnx").write_bytes(identity)
    # A model with a proper version beside one named with a non-ASCII digit serves the first.
    models.save_model(
        root,
        "gpu_only",
        models.identity_model("FP32"),
        config="instance_group [ { kind: KIND_GPU } ]",
    )
    models.save_model(
        root,
        "labels_missing",
        models.identity_model("FP32"),
        config='output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 4 ] '
        'label_filename: "labels.txt" } ]',
    )
    models.save_model(root, "mixed_versions", models.add_constant_model(2.0))
    (root / "mixed_versions" / "\u0661").mkdir()
    (root / "mixed_versions" / "\u0661" / "model.onnx").write_bytes(identity)


@pytest.fixture(scope="module")
def broken_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("broken")
    build_broken_repository(root)
    return root


@pytest.fixture(scope="module")
def lenient_node(broken_repository: Path, node_logs: Path) -> Iterator[RunningNode]:
    """The broken repository served with --strict-readiness false: ready all the same."""
    with running_node(broken_repository, node_logs, args=["--strict-readiness", "false"]) as node:
        yield node


@pytest.fixture(scope="module")
def lenient_client(lenient_node: RunningNode) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(lenient_node.grpc_url) as client:
        yield client


def add_one(client: grpcclient.InferenceServerClient, model: str = GOOD) -> list[float]:
    data = np.zeros((1, 4), dtype=np.float32)
    output = client.infer(model, [infer_input("INPUT0", data, "FP32")]).as_numpy("OUTPUT0")
    assert output is not None
    return list(output.reshape(-1).tolist())


def test_the_node_starts_and_serves_its_good_models(
    lenient_node: RunningNode, lenient_client: grpcclient.InferenceServerClient
) -> None:
    assert lenient_node.process.poll() is None
    assert add_one(lenient_client) == [1.0] * 4
    assert add_one(lenient_client, "mixed_versions") == [2.0] * 4
    assert lenient_client.get_model_metadata("mixed_versions").versions == ["1"]
    assert "Traceback" not in lenient_node.log()


@pytest.mark.parametrize("model", sorted(BROKEN))
def test_each_bad_model_is_unavailable_with_its_reason(
    lenient_client: grpcclient.InferenceServerClient, model: str
) -> None:
    rows = {m.name: m for m in lenient_client.get_model_repository_index().models}
    assert rows[model].state == "UNAVAILABLE"
    assert BROKEN[model] in rows[model].reason
    assert not lenient_client.is_model_ready(model)
    expect_error(
        lambda: add_one(lenient_client, model), "StatusCode.UNAVAILABLE", model, BROKEN[model]
    )


def test_each_failed_load_is_logged_once(lenient_node: RunningNode) -> None:
    failures = [line for line in lenient_node.log().splitlines() if "failed to load" in line]
    assert sorted(line.split("model=")[1].split()[0] for line in failures) == sorted(BROKEN)


def test_the_ready_index_leaves_out_the_bad_models(lenient_node: RunningNode) -> None:
    with grpc.insecure_channel(lenient_node.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        index = stub.RepositoryIndex
        ready = {m.name for m in index(service_pb2.RepositoryIndexRequest(ready=True)).models}
        every = {m.name for m in index(service_pb2.RepositoryIndexRequest()).models}
    assert ready == {GOOD, "mixed_versions"}
    assert every == ready | set(BROKEN)


def test_statistics_leave_out_the_bad_models(
    lenient_client: grpcclient.InferenceServerClient,
) -> None:
    served = {s.name for s in lenient_client.get_inference_statistics().model_stats}
    assert served == {GOOD, "mixed_versions"}


def test_lenient_readiness_reports_ready(lenient_node: RunningNode) -> None:
    assert httpx.get(f"{lenient_node.http_url}/v2/health/ready", timeout=10).status_code == 200
    assert httpx.get(f"{lenient_node.http_url}/v2/models/corrupt/ready").status_code == 400
    http = httpclient.InferenceServerClient(f"127.0.0.1:{lenient_node.http_port}")
    try:
        assert http.is_server_ready()
        assert not http.is_model_ready("corrupt")
    finally:
        http.close()


# --- strict readiness, Triton's default ------------------------------------------------------


def test_strict_readiness_reports_not_ready_while_a_model_failed(
    broken_repository: Path, start_kapi_node: NodeFactory
) -> None:
    node = start_kapi_node(broken_repository, wait_for="live")
    with grpcclient.InferenceServerClient(node.grpc_url) as client:
        wait_for_model(client, GOOD)
        with grpc.insecure_channel(node.grpc_url) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert add_one(client) == [1.0] * 4
        assert not client.is_server_ready()
        assert client.is_server_live()
    assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert httpx.get(f"{node.http_url}/v2/health/ready", timeout=10).status_code == 400
    assert httpx.get(f"{node.http_url}/v2/health/live", timeout=10).status_code == 200


def test_explicit_loads_of_bad_models_fail_with_their_reason_and_never_stay_loading(
    broken_repository: Path, start_kapi_node: NodeFactory
) -> None:
    node = start_kapi_node(broken_repository, explicit=True, load_models=[GOOD])
    with grpcclient.InferenceServerClient(node.grpc_url) as client:
        assert client.is_server_ready()
        for model, reason in BROKEN.items():
            expect_error(
                lambda model=model: client.load_model(model), LOAD_STATUS[model], model, reason
            )
        rows = {m.name: m for m in client.get_model_repository_index().models}
        assert {name: rows[name].state for name in BROKEN} == dict.fromkeys(BROKEN, "UNAVAILABLE")
        not_ready_with_failures = client.is_server_ready()
        for model in BROKEN:
            client.unload_model(model)
        ready_once_unloaded = client.is_server_ready()
        assert add_one(client) == [1.0] * 4
    assert not not_ready_with_failures
    assert ready_once_unloaded
    assert "Traceback" not in node.log()


def wait_for_model(client: grpcclient.InferenceServerClient, model: str) -> None:
    """Wait for a model of a node that is live but will not become ready."""
    for _ in range(600):
        index = {m.name: m.state for m in client.get_model_repository_index().models}
        if index.get(model) == "READY" and "LOADING" not in index.values():
            return
        time.sleep(0.1)
    raise AssertionError(f"model {model} not ready: {index}")


def test_a_model_asked_for_at_start_that_is_not_there_keeps_the_node_not_ready(
    broken_repository: Path, start_kapi_node: NodeFactory
) -> None:
    """A typo in --load-model is a model that failed: named in the index, and the node is
    not ready until it is unloaded."""
    node = start_kapi_node(
        broken_repository, explicit=True, load_models=[GOOD, "typo_nope"], wait_for="live"
    )
    with grpcclient.InferenceServerClient(node.grpc_url) as client:
        wait_for_model(client, GOOD)
        rows = {m.name: m for m in client.get_model_repository_index().models}
        not_ready = client.is_server_ready()
        client.unload_model("typo_nope")
        ready_once_unloaded = client.is_server_ready()
    assert rows["typo_nope"].state == "UNAVAILABLE"
    assert "not in the model repository" in rows["typo_nope"].reason
    assert not not_ready
    assert ready_once_unloaded


def test_names_that_cannot_be_models_are_refused_or_not_found(
    broken_repository: Path, start_kapi_node: NodeFactory
) -> None:
    """A name no directory can have is INVALID_ARGUMENT (a path traversal in Triton's
    words); one that could be and is not there is NOT_FOUND to load, and a no-op to unload,
    as in Triton."""
    node = start_kapi_node(broken_repository, explicit=True, load_models=[GOOD])
    with grpcclient.InferenceServerClient(node.grpc_url) as client:
        for name in ("a\x00b", "../good"):
            for call in (client.load_model, client.unload_model):
                expect_error(
                    lambda name=name, call=call: call(name),
                    "StatusCode.INVALID_ARGUMENT",
                    "must not contain path traversal characters",
                )
        for name in ("x" * 5000, ".hidden"):
            expect_error(lambda name=name: client.load_model(name), "StatusCode.NOT_FOUND")
            client.unload_model(name)
        assert client.is_server_ready()
    assert "Traceback" not in node.log()
