"""Failures past validation: a model that fails at run time, a model that failed to load,
a client that gives up, messages over the size limit; and the node serving on after all."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.support import models
from tests.support.clients import expect_error, infer_input, simple_inputs
from tests.support.node import RunningNode, running_node

LIMIT = 1024 * 1024


def test_gather_out_of_range_fails_inside_the_runtime(
    client: grpcclient.InferenceServerClient,
) -> None:
    good = [infer_input("INDICES", np.array([[1, 9]], dtype=np.int64), "INT64")]
    bad = [infer_input("INDICES", np.array([[1, 100]], dtype=np.int64), "INT64")]
    np.testing.assert_array_equal(client.infer("gather", good).as_numpy("OUTPUT0"), [[1, 9]])

    expect_error(lambda: client.infer("gather", bad), "StatusCode.INTERNAL", "gather")


def test_reshape_to_a_wrong_size_fails_inside_the_runtime(
    client: grpcclient.InferenceServerClient,
) -> None:
    values = infer_input("INPUT0", np.arange(6, dtype=np.float32), "FP32")

    def reshape(shape: list[int]) -> grpcclient.InferResult:
        target = infer_input("SHAPE", np.array(shape, dtype=np.int64), "INT64")
        return client.infer("reshape", [values, target])

    np.testing.assert_array_equal(
        reshape([2, 3]).as_numpy("OUTPUT0"), np.arange(6, dtype=np.float32).reshape(2, 3)
    )
    expect_error(lambda: reshape([4, 4]), "StatusCode.INTERNAL", "reshape")


@pytest.fixture(scope="module")
def limited_node(
    tmp_path_factory: pytest.TempPathFactory, node_logs: Path
) -> Iterator[RunningNode]:
    """A node whose gRPC messages may be 1 MiB at most."""
    repository = tmp_path_factory.mktemp("limited")
    models.save_model(repository, "identity", models.identity_model("FP32", ["batch", "width"]))
    models.save_model(repository, "tile", models.tile_model(repeats=8))
    env = {"KAPI_NODE_MAX_MESSAGE_BYTES": str(LIMIT)}
    with running_node(repository, node_logs, env=env) as node:
        yield node


def test_request_over_the_message_limit(limited_node: RunningNode) -> None:
    large = np.zeros((1, LIMIT // 4 + 1024), dtype=np.float32)
    small = np.arange(1024, dtype=np.float32).reshape(1, -1)
    with grpcclient.InferenceServerClient(limited_node.grpc_url) as client:
        expect_error(
            lambda: client.infer("identity", [infer_input("INPUT0", large, "FP32")]),
            "StatusCode.RESOURCE_EXHAUSTED",
        )
        result = client.infer("identity", [infer_input("INPUT0", small, "FP32")])

    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), small)


def test_response_over_the_message_limit(limited_node: RunningNode) -> None:
    """A request under the limit whose response is over it fails as a failure, saying why,
    and the node serves on."""
    data = np.ones((1, LIMIT // 4 // 8 + 1024), dtype=np.float32)
    with grpcclient.InferenceServerClient(limited_node.grpc_url) as client:
        expect_error(
            lambda: client.infer("tile", [infer_input("INPUT0", data, "FP32")]),
            "StatusCode.RESOURCE_EXHAUSTED",
            f"take {data.nbytes * 8} bytes",
            f"over the node's message limit of {LIMIT} bytes",
        )
        result = client.infer("tile", [infer_input("INPUT0", data[:, :16], "FP32")])
        (stats,) = client.get_inference_statistics("tile").model_stats

    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.ones((1, 128)))
    assert stats.inference_stats.fail.count == 1
    assert stats.inference_stats.success.count == 1
    assert "Traceback" not in limited_node.log()


def test_response_just_under_the_limit_is_refused_with_room_for_its_envelope(
    limited_node: RunningNode,
) -> None:
    """Outputs of LIMIT - 32 KiB leave too little room for the rest of the message: kapi
    says so itself, rather than the gRPC layer failing the send."""
    data = np.ones((1, (LIMIT - 32 * 1024) // 4 // 8), dtype=np.float32)
    with grpcclient.InferenceServerClient(limited_node.grpc_url) as client:
        expect_error(
            lambda: client.infer("tile", [infer_input("INPUT0", data, "FP32")]),
            "StatusCode.RESOURCE_EXHAUSTED",
            f"take {data.nbytes * 8} bytes",
        )


def test_client_deadline_while_queued(client: grpcclient.InferenceServerClient) -> None:
    """`held` keeps a lone request queued for 1 s; the client gives up after 0.2 s. The
    abandoned request counts as a failure and the model serves the next one."""
    values = np.zeros((1, 4), dtype=np.float32)

    expect_error(
        lambda: client.infer("held", [infer_input("INPUT0", values, "FP32")], client_timeout=0.2),
        "StatusCode.DEADLINE_EXCEEDED",
    )
    result = client.infer("held", [infer_input("INPUT0", values + 1, "FP32")])

    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), values + 2)
    (stats,) = client.get_inference_statistics("held").model_stats
    assert stats.inference_stats.success.count == 1
    assert stats.inference_stats.fail.count == 1


def test_node_serves_on_after_errors(
    main_node: RunningNode, client: grpcclient.InferenceServerClient
) -> None:
    for _ in range(3):
        with pytest.raises(InferenceServerException):
            client.infer("simple", simple_inputs(columns=3))
        with pytest.raises(InferenceServerException):
            client.infer(
                "gather", [infer_input("INDICES", np.full((1, 2), -99, np.int64), "INT64")]
            )

    result = client.infer("simple", simple_inputs(batch=2))

    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((2, 16), 2, np.int32))
    assert client.is_server_ready()
    assert main_node.is_ready()
    assert main_node.process.poll() is None
