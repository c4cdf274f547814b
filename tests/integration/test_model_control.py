"""Model control. With --model-control-mode explicit the client loads, unloads and reloads
models, and a reload swaps in the new files without failing requests in flight. In the
default mode load and unload are refused."""

from __future__ import annotations

import functools
import json
import queue
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.support import models
from tests.support.clients import expect_error, expect_rpc_error
from tests.support.metrics import sample
from tests.support.node import RunningNode, running_node

# A lone request waits up to 2 s in the batcher: in flight long enough to unload under it.
SLOW_CONFIG = """
max_batch_size: 4
dynamic_batching { max_queue_delay_microseconds: 2000000 }
"""


MANY_VERSIONS = 40
MANY_CONFIG = "version_policy: { all: {} }\n"


@pytest.fixture(scope="module")
def explicit_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("explicit")
    models.save_model(repository, "preloaded", models.add_constant_model(1.0))
    models.save_model(repository, "swapped", models.add_constant_model(1.0))
    models.save_model(repository, "versioned", models.add_constant_model(1.0))
    models.save_model(repository, "on_demand", models.identity_model("FP32"))
    models.save_model(repository, "metered", models.add_constant_model(1.0))
    models.save_model(repository, "rest_loaded", models.add_constant_model(1.0))
    models.save_model(repository, "overridden", models.add_constant_model(1.0))
    models.save_model(repository, "overridable", models.add_constant_model(1.0))
    models.save_model(repository, "slow_unload", models.add_constant_model(3.0), config=SLOW_CONFIG)
    for version in range(1, MANY_VERSIONS + 1):  # slow to load: a session per version
        models.save_model(
            repository, "many_versions", models.add_constant_model(1.0), version, MANY_CONFIG
        )
    models.save_model(repository, "never_loaded", models.identity_model("FP32"))
    models.save_model(repository, "broken", b"\x08\x07 not a model")
    models.save_model(repository, "kept", models.add_constant_model(1.0))
    models.save_model(repository, "misconfigured", models.identity_model("FP32"))
    (repository / "misconfigured" / "config.pbtxt").write_text("max_batch_size: [ not text")
    models.save_model(repository, "slow", models.add_constant_model(3.0), config=SLOW_CONFIG)
    return repository


@pytest.fixture(scope="module")
def explicit_node(explicit_repository: Path, node_logs: Path) -> Iterator[RunningNode]:
    with running_node(
        explicit_repository,
        node_logs,
        explicit=True,
        load_models=["preloaded", "swapped", "versioned", "kept", "slow"],
    ) as node:
        yield node


@pytest.fixture
def explicit_client(explicit_node: RunningNode) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(explicit_node.grpc_url) as client:
        yield client


def add_input() -> list[grpcclient.InferInput]:
    infer_input = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
    infer_input.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
    return [infer_input]


def added(client: grpcclient.InferenceServerClient, model: str, version: str = "") -> float:
    """The constant the served version of `model` adds (its version's tell-tale)."""
    result = client.infer(model, add_input(), model_version=version)
    output = result.as_numpy("OUTPUT0")
    assert output is not None
    assert len(set(output.reshape(-1).tolist())) == 1
    return float(output[0, 0])


def index_states(client: grpcclient.InferenceServerClient) -> dict[str, tuple[str, str, str]]:
    """name -> (version, state, reason) of the highest version row per model."""
    return {
        m.name: (m.version, m.state, m.reason) for m in client.get_model_repository_index().models
    }


def test_only_the_named_models_load_at_start(
    explicit_client: grpcclient.InferenceServerClient,
) -> None:
    states = index_states(explicit_client)

    assert states["preloaded"] == ("1", "READY", "")
    assert states["never_loaded"][1] == "UNAVAILABLE"
    assert explicit_client.is_model_ready("preloaded")
    assert not explicit_client.is_model_ready("never_loaded")
    expect_error(lambda: explicit_client.infer("never_loaded", add_input()), "StatusCode.NOT_FOUND")


def test_load_then_unload(explicit_client: grpcclient.InferenceServerClient) -> None:
    explicit_client.load_model("on_demand")

    assert explicit_client.is_model_ready("on_demand")
    assert index_states(explicit_client)["on_demand"] == ("1", "READY", "")
    assert added(explicit_client, "on_demand") == 0.0

    explicit_client.unload_model("on_demand")

    assert not explicit_client.is_model_ready("on_demand")
    _, state, reason = index_states(explicit_client)["on_demand"]
    assert (state, reason) == ("UNAVAILABLE", "unloaded")
    expect_error(lambda: explicit_client.infer("on_demand", add_input()), "StatusCode.UNAVAILABLE")

    explicit_client.load_model("on_demand")
    assert added(explicit_client, "on_demand") == 0.0


def test_load_of_a_corrupt_model_fails_and_says_why(
    explicit_client: grpcclient.InferenceServerClient,
) -> None:
    expect_error(lambda: explicit_client.load_model("broken"), "StatusCode.INTERNAL", "broken")
    _, state, reason = index_states(explicit_client)["broken"]
    assert state == "UNAVAILABLE"
    assert "model.onnx" in reason
    # Strict readiness, as Triton's: not ready while a model asked for failed; unloading the
    # failed model makes the node ready again.
    assert not explicit_client.is_server_ready()
    explicit_client.unload_model("broken")
    assert index_states(explicit_client)["broken"][1:] == ("UNAVAILABLE", "unloaded")
    assert explicit_client.is_server_ready()


def test_loading_an_unknown_model_is_not_found_and_unloading_one_is_a_no_op(
    explicit_client: grpcclient.InferenceServerClient,
) -> None:
    expect_error(
        lambda: explicit_client.load_model("no_such_model"), "StatusCode.NOT_FOUND", "no_such_model"
    )
    explicit_client.unload_model("no_such_model")  # as Triton: OK, nothing to unload
    explicit_client.unload_model("never_loaded")
    assert index_states(explicit_client)["never_loaded"][1:] == ("UNAVAILABLE", "")


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("", "Model name cannot be empty. Please enter a valid name to deploy."),
        ("..", "invalid model name '..', model name must not contain path traversal characters"),
        ("../explicit", "must not contain path traversal characters"),
    ],
)
def test_a_model_name_that_is_no_name_is_invalid_in_tritons_words(
    explicit_client: grpcclient.InferenceServerClient, name: str, words: str
) -> None:
    for call in (explicit_client.load_model, explicit_client.unload_model):
        expect_error(functools.partial(call, name), "StatusCode.INVALID_ARGUMENT", words)


def test_reload_serves_a_replaced_model_file(
    explicit_repository: Path, explicit_client: grpcclient.InferenceServerClient
) -> None:
    assert added(explicit_client, "swapped") == 1.0
    models.save_model(explicit_repository, "swapped", models.add_constant_model(5.0))

    assert added(explicit_client, "swapped") == 1.0, "files change only on a load"
    explicit_client.load_model("swapped")

    assert added(explicit_client, "swapped") == 5.0


def test_reload_with_a_new_version_directory(
    explicit_repository: Path, explicit_client: grpcclient.InferenceServerClient
) -> None:
    assert added(explicit_client, "versioned") == 1.0
    models.save_model(explicit_repository, "versioned", models.add_constant_model(2.0), 2)
    failures: list[BaseException] = []
    seen: set[float] = set()
    stop = threading.Event()

    def keep_inferring() -> None:
        while not stop.is_set():
            try:
                seen.add(added(explicit_client, "versioned"))
            except BaseException as exc:
                failures.append(exc)

    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(keep_inferring) for _ in range(2)]
        explicit_client.load_model("versioned")
        stop.set()
        for future in running:
            future.result()

    assert failures == []
    assert seen <= {1.0, 2.0}
    assert added(explicit_client, "versioned") == 2.0
    assert explicit_client.get_model_metadata("versioned").versions == ["2"]
    assert not explicit_client.is_model_ready("versioned", "1")


def test_a_failed_reload_keeps_the_loaded_version_serving(
    explicit_repository: Path, explicit_client: grpcclient.InferenceServerClient
) -> None:
    assert added(explicit_client, "kept") == 1.0
    models.save_model(explicit_repository, "kept", b"corrupted on disk")

    expect_error(lambda: explicit_client.load_model("kept"), "StatusCode.INTERNAL", "kept")
    assert added(explicit_client, "kept") == 1.0
    assert index_states(explicit_client)["kept"] == ("1", "READY", "")


def test_load_with_an_invalid_config(explicit_client: grpcclient.InferenceServerClient) -> None:
    expect_error(
        lambda: explicit_client.load_model("misconfigured"),
        "StatusCode.INVALID_ARGUMENT",
        "config.pbtxt",
    )
    _, state, reason = index_states(explicit_client)["misconfigured"]
    assert state == "UNAVAILABLE"
    assert "config.pbtxt" in reason
    explicit_client.unload_model("misconfigured")
    assert explicit_client.is_server_ready()


def test_unload_lets_the_request_in_flight_finish(
    explicit_client: grpcclient.InferenceServerClient,
) -> None:
    outcomes: queue.Queue[tuple[object, object]] = queue.Queue()
    explicit_client.async_infer(
        "slow", add_input(), lambda result, error: outcomes.put((result, error))
    )
    time.sleep(0.5)  # the batcher holds the request for 2 s
    assert outcomes.empty()

    explicit_client.unload_model("slow")  # returns once the request has drained

    result, error = outcomes.get(timeout=30)
    assert error is None
    assert isinstance(result, grpcclient.InferResult)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 4), 3.0))
    assert not explicit_client.is_model_ready("slow")


def test_default_mode_refuses_load_and_unload(client: grpcclient.InferenceServerClient) -> None:
    for call in (client.load_model, client.unload_model):
        expect_error(
            functools.partial(call, "simple"), "StatusCode.FAILED_PRECONDITION", "explicit"
        )
    assert client.is_model_ready("simple")


def served_config(client: grpcclient.InferenceServerClient, model: str) -> Any:
    return client.get_model_config(model).config


def test_a_config_override_loads_in_place_of_config_pbtxt_until_the_next_load(
    explicit_client: grpcclient.InferenceServerClient,
) -> None:
    override = json.dumps(
        {"max_batch_size": 2, "dynamic_batching": {"max_queue_delay_microseconds": 10}}
    )
    explicit_client.load_model("overridden", config=override)
    config = served_config(explicit_client, "overridden")
    assert config.max_batch_size == 2
    assert config.dynamic_batching.max_queue_delay_microseconds == 10
    assert added(explicit_client, "overridden") == 1.0

    explicit_client.load_model("overridden")  # no override: the repository's config again
    assert served_config(explicit_client, "overridden").max_batch_size == 4


def test_a_config_and_files_load_a_model_the_repository_does_not_hold(
    explicit_repository: Path, explicit_client: grpcclient.InferenceServerClient
) -> None:
    model = models.add_constant_model(7.0).SerializeToString()
    explicit_client.load_model(
        "uploaded",
        config=json.dumps({"backend": "onnxruntime"}),
        files={"file:1/model.onnx": model},
    )
    assert added(explicit_client, "uploaded") == 7.0
    assert not (explicit_repository / "uploaded").exists()

    explicit_client.unload_model("uploaded")
    assert not explicit_client.is_model_ready("uploaded")


@pytest.mark.parametrize(
    "path", ["../escaped.onnx", "1/../../escaped.onnx", "/tmp/escaped.onnx", "../../../../x"]
)
def test_override_files_never_land_outside_their_model_directory(
    explicit_repository: Path,
    explicit_client: grpcclient.InferenceServerClient,
    tmp_path: Path,
    path: str,
) -> None:
    before = set(Path(tempfile.gettempdir()).iterdir())
    expect_error(
        lambda: explicit_client.load_model(
            "uploaded_bad", config="{}", files={f"file:{path}": b"escape"}
        ),
        "StatusCode.INVALID_ARGUMENT",
        f"Invalid file parameter 'file:{path}' with normalized path",
        "must stay within model directory.",
    )
    after = set(Path(tempfile.gettempdir()).iterdir())
    assert after == before  # no stray file, and no directory left behind
    assert not list(explicit_repository.parent.rglob("escaped.onnx"))


@pytest.mark.parametrize(
    ("parameters", "words"),
    [
        ({"files": {"file:1/model.onnx": b"\x08"}}, "Load parameter 'config' must be specified"),
        ({"config": "{not json"}, "Invalid config override"),
        ({"config": '{"name": "other"}'}, "does not match the model 'overridable'"),
        ({"config": '{"no_such_field": 1}'}, "Invalid config override"),
    ],
)
def test_a_bad_override_is_invalid_and_keeps_what_serves(
    explicit_client: grpcclient.InferenceServerClient, parameters: dict[str, Any], words: str
) -> None:
    explicit_client.load_model("overridable")
    expect_error(
        lambda: explicit_client.load_model("overridable", **parameters),
        "StatusCode.INVALID_ARGUMENT",
        words,
    )
    assert added(explicit_client, "overridable") == 1.0


def test_overrides_over_rest(explicit_node: RunningNode) -> None:
    """tritonclient.http sends the config as JSON text and the files in base64."""
    url = explicit_node.http_url.removeprefix("http://")
    model = models.add_constant_model(9.0).SerializeToString()
    with httpclient.InferenceServerClient(url) as rest:
        rest.load_model(
            "uploaded_rest",
            config=json.dumps({"backend": "onnxruntime", "max_batch_size": 3}),
            files={"file:1/model.onnx": model},
        )
        assert rest.get_model_config("uploaded_rest")["max_batch_size"] == 3
        data = np.zeros((1, 4), dtype=np.float32)
        tensor = httpclient.InferInput("INPUT0", [1, 4], "FP32")
        tensor.set_data_from_numpy(data)
        result = rest.infer("uploaded_rest", [tensor])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data + 9.0)
        with pytest.raises(InferenceServerException) as raised:
            rest.load_model("uploaded_rest", config="{}", files={"file:../x": b"x"})
        assert raised.value.status() == "400"
        assert "must stay within model directory" in raised.value.message()
        rest.unload_model("uploaded_rest")


def test_unknown_load_and_unload_parameters_are_invalid(explicit_node: RunningNode) -> None:
    with grpc.insecure_channel(explicit_node.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        load = service_pb2.RepositoryModelLoadRequest(model_name="on_demand")
        load.parameters["poll"].bool_param = True
        unload = service_pb2.RepositoryModelUnloadRequest(model_name="preloaded")
        unload.parameters["force"].bool_param = True
        expect_rpc_error(
            lambda: stub.RepositoryModelLoad(load),
            grpc.StatusCode.INVALID_ARGUMENT,
            "unrecognized load parameter 'poll'",
        )
        expect_rpc_error(
            lambda: stub.RepositoryModelUnload(unload),
            grpc.StatusCode.INVALID_ARGUMENT,
            "unrecognized unload parameter 'force'",
        )


def test_unloaded_versions_leave_no_prometheus_series(
    explicit_node: RunningNode, explicit_client: grpcclient.InferenceServerClient
) -> None:
    """Reloads keep one set of series per loaded version; an unload removes its set."""
    labels = {"model": "metered", "version": "1"}
    requests = "kapi_node_inference_requests_total"
    for _ in range(5):
        explicit_client.load_model("metered")
        added(explicit_client, "metered")
    series_while_loaded = series_of(explicit_node.metrics(), "metered")
    counted = sample(explicit_node.metrics(), requests, outcome="success", **labels)

    explicit_client.unload_model("metered")

    assert series_of(explicit_node.metrics(), "metered") == 0
    assert counted == 5  # the reloads shared the version's series, and counted on
    explicit_client.load_model("metered")
    assert series_of(explicit_node.metrics(), "metered") == series_while_loaded


def series_of(metrics: str, model: str) -> int:
    return sum(
        1
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if s.labels.get("model") == model
    )


def wait_state(client: grpcclient.InferenceServerClient, model: str, state: str) -> str:
    """Wait until `model`'s index row reaches `state`; its reason."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        _, now, reason = index_states(client)[model]
        if now == state:
            return reason
        time.sleep(0.05)
    raise AssertionError(f"{model} never reached {state}: {index_states(client)[model]}")


def test_a_load_whose_client_gives_up_still_completes(
    explicit_client: grpcclient.InferenceServerClient,
) -> None:
    """As in Triton, a load runs to its end whatever the client does: cut short by the
    client's deadline it would leave the model half loaded and the node not ready."""
    expect_error(
        lambda: explicit_client.load_model("many_versions", client_timeout=0.01),
        "StatusCode.DEADLINE_EXCEEDED",
    )
    wait_state(explicit_client, "many_versions", "READY")
    assert explicit_client.get_model_metadata("many_versions").versions == [
        str(v) for v in range(1, MANY_VERSIONS + 1)
    ]
    assert explicit_client.is_server_ready()


def test_an_unload_whose_client_gives_up_still_completes(
    explicit_node: RunningNode, explicit_client: grpcclient.InferenceServerClient
) -> None:
    explicit_client.load_model("slow_unload")
    outcomes: queue.Queue[tuple[object, object]] = queue.Queue()
    explicit_client.async_infer(
        "slow_unload", add_input(), lambda result, error: outcomes.put((result, error))
    )
    time.sleep(0.5)  # the batcher holds the request for 2 s: the unload waits for it

    expect_error(
        lambda: explicit_client.unload_model("slow_unload", client_timeout=0.2),
        "StatusCode.DEADLINE_EXCEEDED",
    )

    result, error = outcomes.get(timeout=30)
    assert error is None
    assert isinstance(result, grpcclient.InferResult)
    assert wait_state(explicit_client, "slow_unload", "UNAVAILABLE") == "unloaded"
    assert series_of(explicit_node.metrics(), "slow_unload") == 0
    assert explicit_client.is_server_ready()


def test_load_and_unload_over_rest(explicit_node: RunningNode) -> None:
    """tritonclient.http's load and unload, on the node's KServe v2 REST API."""
    url = explicit_node.http_url.removeprefix("http://")
    with httpclient.InferenceServerClient(url) as rest:
        rest.load_model("rest_loaded")
        assert rest.is_model_ready("rest_loaded")
        rows = {row["name"]: row for row in rest.get_model_repository_index()}
        assert rows["rest_loaded"]["state"] == "READY"

        rest.unload_model("rest_loaded")
        assert not rest.is_model_ready("rest_loaded")
        rows = {row["name"]: row for row in rest.get_model_repository_index()}
        assert (rows["rest_loaded"]["state"], rows["rest_loaded"]["reason"]) == (
            "UNAVAILABLE",
            "unloaded",
        )

        with pytest.raises(InferenceServerException) as raised:
            rest.load_model("no_such_model")
        assert raised.value.status() == "404"
        assert "no_such_model" in raised.value.message()
        rest.load_model("rest_loaded")


def test_override_parameters_of_the_wrong_type_are_invalid_in_tritons_words(
    explicit_node: RunningNode,
) -> None:
    with grpc.insecure_channel(explicit_node.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        config = service_pb2.RepositoryModelLoadRequest(model_name="overridable")
        config.parameters["config"].bytes_param = b"{}"
        files = service_pb2.RepositoryModelLoadRequest(model_name="overridable")
        files.parameters["config"].string_param = "{}"
        files.parameters["file:1/model.onnx"].string_param = "not bytes"
        expect_rpc_error(
            lambda: stub.RepositoryModelLoad(config),
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid value type for load parameter 'config', expected string_param.",
        )
        expect_rpc_error(
            lambda: stub.RepositoryModelLoad(files),
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid value type for load parameter 'file:1/model.onnx', expected bytes_param.",
        )


def test_a_model_with_a_long_name_loads_from_files(
    explicit_client: grpcclient.InferenceServerClient,
) -> None:
    """The override's directory is not named after the model: any name fits."""
    name = "n" * 300
    explicit_client.load_model(
        name,
        config=json.dumps({"backend": "onnxruntime"}),
        files={"file:1/model.onnx": models.add_constant_model(2.0).SerializeToString()},
    )
    assert added(explicit_client, name) == 2.0
    explicit_client.unload_model(name)
